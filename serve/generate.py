"""Write the deployment files from the deployment spec (charrnn/deployment.py) and serve/templates/.

A template is the file as it is committed, with `{{NAME}}` where a fact of the spec goes; a placeholder alone on
its line takes a block (a list of mounts, of ports) indented to the placeholder's column. Every generated file
starts with a "generated - do not edit" line naming its template.

    python -m serve.generate            # make generate: write every file that is not current
    python -m serve.generate --check    # exit 1 and list the stale files (tests/test_generated.py)

Exit codes: 0 current (or written), 1 stale files (--check), 2 a template names an unknown placeholder.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from charrnn import deployment as d
from charrnn.cli import parser
from charrnn.contract import (
    CAPACITY_MESSAGE,
    INFER_KEY_ENV,
    INFER_KEY_HEADER,
    ROUTING_HEADER,
)
from charrnn.errors import UserError, cli
from charrnn.repository import CPU_CONFIG_NAME, STEP_MODELS

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"
# template (under serve/templates/) -> the files written from it (under the repository's root)
OUTPUTS: dict[str, tuple[str, ...]] = {
    "docker-compose.yml": ("docker-compose.yml",),
    "haproxy.cfg": (
        "serve/haproxy.cfg",
        "serve/k8s/haproxy.cfg",
    ),  # kustomize reads only serve/k8s/
    "Dockerfile": ("serve/Dockerfile",),
    "Dockerfile.slim": ("serve/Dockerfile.slim",),
    **{
        f"k8s/{name}": (f"serve/k8s/{name}",)
        for name in (
            "triton.yaml",
            "triton-replica-service.yaml",
            "proxy.yaml",
            "service.yaml",
            "networkpolicy.yaml",
            "secret.example.yaml",
            "models.example.yaml",
            "gpu/kustomization.yaml",
            "gpu/triton-gpu.yaml",
        )
    },
    "monitoring/prometheus.yml": ("serve/monitoring/prometheus.yml",),
}
PLACEHOLDER = re.compile(r"\{\{([A-Za-z0-9_]+)\}\}")
BLOCK = re.compile(r"^([ \t]*)\{\{([A-Za-z0-9_]+)\}\}[ \t]*$", re.M)


def compose_ports(server: d.Server) -> str:
    """docker-compose.yml `ports:` items: the server's host ports on loopback -> the container's."""
    host, inner = server.ports, d.CONTAINER_PORTS
    return "\n".join(
        f'- "127.0.0.1:${{{server.env}_{what.upper()}_PORT:-{getattr(host, what)}}}:'
        f'{getattr(inner, what)}"   # {label}'
        for what, label in (
            ("http", "HTTP/REST (KServe v2)"),
            ("grpc", "gRPC (streaming client, perf_analyzer)"),
            ("metrics", "Prometheus metrics"),
        )
    )


def compose_mounts(service: str) -> str:
    """docker-compose.yml `volumes:` items: each of the service's models, read-only, from MODEL_REPOSITORY."""
    return "\n".join(
        f"- type: bind\n"
        f"  source: ${{MODEL_REPOSITORY:-./model_repository}}/{model}\n"
        f"  target: /models/{model}\n"
        f"  read_only: true\n"
        f"  bind: {{create_host_path: false}}"
        for model in d.BY_SERVICE[service].models
    )


def values() -> dict[str, str]:
    """Every placeholder a template may name."""
    v = {
        "ENTRYPOINT": d.ENTRYPOINT,
        "ENTRYPOINT_SOURCE": d.ENTRYPOINT_SOURCE,
        "NGC_RELEASE": d.NGC_RELEASE,
        "TRITON_VERSION": d.TRITON_VERSION,
        "EXIT_TIMEOUT_S": str(d.EXIT_TIMEOUT_S),
        "STOP_GRACE_S": str(d.EXIT_TIMEOUT_S + 10),
        "K8S_GRACE_S": str(d.EXIT_TIMEOUT_S + 15),
        "STATS_PORT": str(d.PROXY_STATS_PORT),
        "PROMETHEUS_PORT": str(d.PROMETHEUS_PORT),
        "REPLICA_SLOTS": str(d.REPLICA_SLOTS),
        "PROXY_HTTP_BACKEND": d.PROXY_BACKENDS["http"],
        "PROXY_GRPC_BACKEND": d.PROXY_BACKENDS["grpc"],
        "ADMIN_KEY_ENV": d.ADMIN_KEY_ENV,
        "INFER_KEY_ENV": INFER_KEY_ENV,
        "INFER_KEY_HEADER": INFER_KEY_HEADER,
        "ROUTING_HEADER": ROUTING_HEADER,
        "CAPACITY_MESSAGE": CAPACITY_MESSAGE,
        "CPU_CONFIG_NAME": CPU_CONFIG_NAME,
        # perf_analyzer's default models on the GPU server (compose's perf): the per-character ones
        "PERF_MODELS": " ".join(STEP_MODELS),
    }
    for server in d.SERVERS:
        prefix = "" if server is d.MAIN else f"{server.name.upper()}_"
        for what in ("http", "grpc", "metrics"):
            v[f"{prefix}{what.upper()}_PORT"] = str(getattr(server.ports, what))
        v[f"{prefix}PORTS"] = compose_ports(server)
    for what in ("http", "grpc", "metrics"):
        v[f"CONTAINER_{what.upper()}_PORT"] = str(getattr(d.CONTAINER_PORTS, what))
    for key, image in d.IMAGES.items():
        v[f"IMAGE_{key.upper()}"] = str(image)
        # k8s names the NGC image {{IMAGE_NGC_NAME}}:{{NGC_RELEASE}} (no ${TRITON_RELEASE} there)
        v[f"IMAGE_{key.upper()}_NAME"] = image.name
    for deployment in d.DEPLOYMENTS:
        slug = deployment.service.upper().replace("-", "_")
        v[f"MOUNTS_{slug}"] = compose_mounts(deployment.service)
        v[f"MODELS_{slug}"] = " ".join(deployment.models)
    return v


def render(template: str, text: str, v: dict[str, str]) -> str:
    """The template's text with every placeholder filled; a block placeholder's lines take its indent."""
    unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(v))
    if unknown:
        raise UserError(
            f"serve/templates/{template}",
            f"unknown placeholder(s) {', '.join(unknown)}",
            "use a name serve/generate.py values() defines, or add it there",
        )

    def block(m: re.Match) -> str:
        return "\n".join(m.group(1) + line if line else line for line in v[m.group(2)].split("\n"))

    text = BLOCK.sub(block, text)
    return PLACEHOLDER.sub(lambda m: v[m.group(1)], text)


def header(source: str) -> str:
    """The first line(s) of a generated file."""
    return (
        f"# generated by `make generate` (python -m serve.generate) from {source} - do not edit:\n"
        "# edit that and run `make generate`.\n"
    )


def entrypoint() -> str:
    """serve/tritonserver.sh: tritonserver with the project's flags (TRITONSERVER_FLAGS), then "$@"."""
    why = [
        textwrap.fill(
            f"{re.search(r'--[a-z-]+', flag).group()}: {reason}",
            width=116,
            initial_indent="#   ",
            subsequent_indent="#     ",
        )
        for flag, reason in d.TRITONSERVER_FLAGS
        if reason
    ]
    lines = [
        "#!/bin/sh",
        header("charrnn/deployment.py").rstrip("\n"),
        "#",
        "# Every Triton server of the project starts here: the local launcher (serve/local_triton.py), the slim",
        f"# and NGC images (on PATH as {d.ENTRYPOINT}), compose and k8s. Arguments are passed on to tritonserver",
        "# after the project's flags (a later --http-port wins). The environment gives the rest:",
        "#   TRITONSERVER               the binary (default: tritonserver on PATH)",
        f"#   {d.ADMIN_KEY_ENV}, {INFER_KEY_ENV}   the keys, required (a default key would be public)",
        "#   TRITON_MODEL_REPOSITORY    default /models",
        "#   TRITON_ADDRESS             of every endpoint, default 0.0.0.0 (the local launcher's: 127.0.0.1)",
        f"#   TRITON_EXIT_TIMEOUT_S      default {d.EXIT_TIMEOUT_S}",
        f"#   TRITON_MODEL_CONFIG_NAME   {CPU_CONFIG_NAME} on CPU-only servers",
        "# Why each flag:",
        *why,
        "set -eu",
        *(
            f'[ -n "${{{env}:-}}" ] || {{ echo "error: {env}: not set: there is no default key (set it to a '
            'random secret, e.g. openssl rand -hex 16)" >&2; exit 2; }'
            for env in (d.ADMIN_KEY_ENV, INFER_KEY_ENV)
        ),
        f'admin_key="${d.ADMIN_KEY_ENV}" infer_key="${INFER_KEY_ENV}"',
        f"unset {d.ADMIN_KEY_ENV} {INFER_KEY_ENV}  # on the command line only, not in the stubs' environment",
        'TRITON_ADDRESS="${TRITON_ADDRESS:-0.0.0.0}"',
        'exec "${TRITONSERVER:-tritonserver}" \\',
        *(f"    {flag} \\" for flag, _ in d.TRITONSERVER_FLAGS),
        '    "$@"',
    ]
    return "\n".join(lines) + "\n"


def make_variables(v: dict[str, str]) -> str:
    """serve/deployment.mk: the ports as Make variables (the Makefile includes it; `make help` prints them)."""
    ports = [name for name in v if name.endswith("_PORT") and not name.startswith("CONTAINER_")]
    return header("charrnn/deployment.py") + "".join(f"{name} := {v[name]}\n" for name in ports)


def generated() -> dict[str, str]:
    """{path under the repository: its content} for every generated file."""
    v = values()
    out = {d.ENTRYPOINT_SOURCE: entrypoint(), "serve/deployment.mk": make_variables(v)}
    for template, paths in OUTPUTS.items():
        text = header(f"serve/templates/{template} and charrnn/deployment.py") + render(
            template, (TEMPLATES / template).read_text(), v
        )
        out.update({path: text for path in paths})
    return out


def stale(root: Path = ROOT) -> list[str]:
    """The generated files whose committed content differs from what the spec gives."""
    return [
        path
        for path, text in generated().items()
        if not (root / path).exists() or (root / path).read_text() != text
    ]


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m serve.generate", __doc__)
    p.add_argument(
        "--check", action="store_true", help="list stale files and exit 1; write nothing"
    )
    args = p.parse_args(argv)
    if args.check:
        paths = stale()
        for path in paths:
            print(f"error: {path}: not current (run `make generate`)", file=sys.stderr)
        return 1 if paths else 0
    for path, text in generated().items():
        target = ROOT / path
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            if path == d.ENTRYPOINT_SOURCE:
                target.chmod(0o755)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docker-compose.yml, the Dockerfiles and bench/perf.sh, checked statically.

The NGC services need a GPU and nvcr.io, which our machines do not have, so they are checked here only: on the
parsed YAML (PyYAML, anchors and `<<` merges resolved as Compose resolves them) and on the text of the Dockerfiles
and the perf script, against the rules in the README's "docker compose". The slim services are checked here too
and run for real in tests/test_compose_slim.py.

Moved to tests/test_generated.py: docker-compose.yml and both Dockerfiles are generated from the deployment spec
(charrnn/deployment.py, serve/templates/; tritonserver's flags are serve/tritonserver.sh's), so the tests that
compared their copies (mount lists against charrnn/repository.py, every TRITON_RELEASE default against
serve/Dockerfile's ARG, the flags of each service, image tags) are gone: test_generated.py checks that every
generated file is current. What stays here are the properties a user relies on (loopback-only ports, the
unprivileged hardened servers, keys required, read-only model mounts, what each server serves), read from
the spec instead of literals.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from charrnn import deployment as spec
from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.repository import (
    CPU_CONFIG_NAME,
    DECOUPLED_MODELS,
    GEN_TRT,
    GPU_ONLY_MODELS,
    SERVED_MODELS,
    STEP_MODELS,
    TRT,
    mixed_decoupled,
)
from serve.images import IMAGES, pins
from tests.helpers import ROOT, docker_or_skip

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "serve" / "Dockerfile"
PERF_SH = ROOT / "bench" / "perf.sh"
ENTRYPOINT = ROOT / spec.ENTRYPOINT_SOURCE

SERVER_SERVICES = tuple(d.service for d in spec.DEPLOYMENTS)
# Replicas (profile scale) publish nothing: clients reach them through the proxy (tests/test_scale.py).
PUBLISHING_SERVERS = tuple(s for s in SERVER_SERVICES if s != "triton-replica")
NGC_SERVICES = ("triton", "triton-cpu", "triton-stream", "export-trt", "perf")
PROFILES = {
    "triton": None,
    "triton-cpu": ["cpu"],
    "triton-stream": None,
    "export-trt": ["export"],
    "perf": ["perf"],
    "triton-slim": ["slim"],
    "triton-slim-stream": ["slim"],
    "perf-slim": ["perf-slim"],
    "triton-replica": ["scale"],
    "proxy": ["scale"],
    "prometheus": ["monitoring"],
}
DEFAULT_VAR = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
RELEASE_VAR = re.compile(r"\$\{TRITON_RELEASE(?::-([^}]*))?\}")
KEYS = (spec.ADMIN_KEY_ENV, INFER_KEY_ENV)
# Restricted-API categories Triton knows (src/restricted_features.h) and the ones we lock.
KNOWN_CATEGORIES = {
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
}
LOCKED = {"model-repository", "shared-memory", "logging", "trace"}
# What clients and perf_analyzer use; locking any of these would break serving or benchmarking. HTTP inference
# is keyed (TRITON_INFER_KEY); perf_analyzer and the streaming client use gRPC.
MUST_STAY_OPEN = {
    "--grpc-restricted-protocol": {"health", "metadata", "inference", "model-config", "statistics"},
    "--http-restricted-api": {"health", "metadata", "model-config", "statistics"},
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command_args(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]


def with_defaults(text: str) -> str:
    """`${VAR:-default}` -> default: the value Compose uses when VAR is unset."""
    return DEFAULT_VAR.sub(lambda m: m.group(1), text)


def bind_mounts(service: dict) -> list[dict]:
    """Every volume as {source, target, read_only}, short or long syntax; sources with variable defaults."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append(
                {
                    "source": parts[0],
                    "target": parts[1],
                    "read_only": parts[2:] == ["ro"],
                    "type": "bind",
                }
            )
        else:
            out.append(
                {
                    "source": with_defaults(v.get("source")),
                    "target": v["target"],
                    "read_only": bool(v.get("read_only")),
                    "type": v["type"],
                }
            )
    return out


def image_env(dockerfile: Path) -> dict[str, str]:
    """The image's ENV that the entrypoint reads (TRITON_*, TRITONSERVER), as written in the Dockerfile."""
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", dockerfile.read_text(), re.M):
        for item in shlex.split(block.replace("\\\n", " ")):
            name, value = item.split("=", 1)
            if name.startswith("TRITON") and name != "TRITON_DIST":
                env[name] = value
    return env


def tritonserver_argv(service: dict, tmp_path: Path, image: Path | None = None) -> list[str]:
    """What tritonserver receives when the service starts: its command run by the real entrypoint
    (serve/tritonserver.sh) with the service's environment (the keys resolved) and its image's ENV, the binary
    replaced by a probe that prints its arguments."""
    probe = tmp_path / "tritonserver"
    probe.write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\n\' "$a"; done\n')
    probe.chmod(0o755)
    env = {"PATH": os.environ["PATH"], **(image_env(image) if image else {})}
    for name, value in service.get("environment", {}).items():
        env[name] = f"value-of-{name}" if name in KEYS else with_defaults(str(value))
    env["TRITONSERVER"] = str(probe)
    command = command_args(service)
    assert command[0] == spec.ENTRYPOINT
    r = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *command[1:]], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def dockerfile_of(services: dict, name: str) -> Path:
    build = services[name]["build"]
    return (ROOT / build["context"] / build["dockerfile"]).resolve()


# ---- services and profiles ----------------------------------------------------------------------------------


def test_yaml_parses_and_has_every_service(services):
    assert set(PROFILES) == set(services)


@pytest.mark.parametrize("name", PROFILES)
def test_profiles(services, name):
    assert services[name].get("profiles") == PROFILES[name]


def test_server_services_are_exactly_the_ones_running_tritonserver(services):
    """The spec's deployments, and only they, run the project's entrypoint (which execs tritonserver)."""
    running = {n for n, s in services.items() if command_args(s) == [spec.ENTRYPOINT]}
    assert running == set(SERVER_SERVICES)
    others = [n for n in services if n not in running]
    assert not any("tritonserver" in " ".join(command_args(services[n])) for n in others)


# ---- network exposure -----------------------------------------------------------------------------------------


def test_every_port_binds_loopback_only(services):
    seen = 0
    for name, s in services.items():
        for p in s.get("ports", []):
            seen += 1
            if isinstance(p, dict):
                assert p.get("host_ip") == "127.0.0.1", f"{name}: {p}"
            else:
                assert isinstance(p, str) and p.startswith(
                    "127.0.0.1:"
                ), f"{name}: port {p!r} not on 127.0.0.1"
    assert seen, "no ports published at all"


@pytest.mark.parametrize("name", PUBLISHING_SERVERS)
def test_server_ports_http_grpc_metrics(services, name):
    """Each server's host ports (by default its server's in the spec; the variables move them) onto the ports the
    entrypoint listens on in the container."""
    server, inner = spec.BY_SERVICE[name].server, spec.CONTAINER_PORTS
    published = [with_defaults(p).split(":")[1:] for p in services[name]["ports"]]
    assert published == [
        [str(server.ports.http), str(inner.http)],
        [str(server.ports.grpc), str(inner.grpc)],
        [str(server.ports.metrics), str(inner.metrics)],
    ]
    variables = [re.search(r"\$\{(\w+):-", p).group(1) for p in services[name]["ports"]]
    assert variables == [f"{server.env}_{kind}_PORT" for kind in ("HTTP", "GRPC", "METRICS")]


def test_replicas_publish_nothing_and_the_proxy_takes_the_slim_servers_ports(services):
    assert services["triton-replica"]["ports"] == []
    proxy = [p.split(":", 1)[1] for p in services["proxy"]["ports"]]
    slim = [p.split(":", 1)[1] for p in services["triton-slim"]["ports"]]
    assert proxy[:2] == slim[:2]  # HTTP and gRPC: the same variables and container ports
    stats = spec.PROXY_STATS_PORT
    assert proxy[2] == f"${{HAPROXY_STATS_PORT:-{stats}}}:{stats}"
    assert f"/dev/tcp/127.0.0.1/{stats} " in services["proxy"]["healthcheck"]["test"][-1]


def test_proxy_service(services):
    """HAProxy (serve/Dockerfile.haproxy): unprivileged, read-only root, serve/haproxy.cfg mounted read-only."""
    s = services["proxy"]
    assert s["user"] == "haproxy" and s["read_only"] is True
    assert s["build"]["dockerfile"] == "serve/Dockerfile.haproxy"
    assert (
        s["build"]["args"]["BASE_IMAGE"]
        == f"${{{IMAGES['proxy'].base_variable}:-{IMAGES['proxy'].official_base}}}"
    )
    (mount,) = bind_mounts(s)
    assert (Path(mount["source"]), mount["target"], mount["read_only"]) == (
        Path("serve/haproxy.cfg"),
        "/etc/haproxy/haproxy.cfg",
        True,
    )
    assert s["environment"]["TRITON_REPLICAS_DNS"] == "triton-replica"
    assert s["depends_on"] == ["triton-replica"]
    assert "!serve/Dockerfile.haproxy" in (ROOT / ".dockerignore").read_text().split()


# ---- server flags and keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_server_hardening_flags(services, name, tmp_path):
    """What tritonserver is started with in each service (the entrypoint's flags, as the service's environment
    leaves them): /models, never changed at run time, ready only when every model is, and Docker waits longer
    than Triton's exit timeout before SIGKILL."""
    args = tritonserver_argv(services[name], tmp_path)
    assert flag_values(args, "--model-repository") == ["/models"]
    assert flag_values(args, "--model-control-mode") == ["none"]
    assert flag_values(args, "--strict-readiness") == ["true"]
    assert not any(
        a.startswith("--load-model") for a in args
    ), "--load-model only applies to explicit mode"
    (timeout,) = flag_values(args, "--exit-timeout-secs")
    assert int(timeout) == spec.EXIT_TIMEOUT_S
    grace = services[name]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > int(
        timeout
    ), "Docker would SIGKILL before Triton's timeout"
    # The ports compose publishes are the ones the server listens on, on every address of the container.
    ports = spec.CONTAINER_PORTS
    for kind in ("http", "grpc", "metrics"):
        assert flag_values(args, f"--{kind}-port") == [str(getattr(ports, kind))]
        assert flag_values(args, f"--{kind}-address") == ["0.0.0.0"]


@pytest.mark.parametrize("name", SERVER_SERVICES)
@pytest.mark.parametrize("flag", ["--http-restricted-api", "--grpc-restricted-protocol"])
def test_restricted_apis(services, name, flag, tmp_path):
    """Admin categories need TRITON_ADMIN_KEY on both protocols; HTTP inference needs TRITON_INFER_KEY (a JSON
    request's declared shape aborts Triton 2.51: charrnn/contract.py INFER_KEY_HEADER); nothing else is locked.
    """
    keyed = {}
    for value in flag_values(tritonserver_argv(services[name], tmp_path), flag):
        # Syntax per the docs (fact sheet 7.2): <categories>:<key>=<value>, with a colon.
        m = re.fullmatch(r"([a-z,-]+):([A-Za-z0-9-]+)=(.+)", value)
        assert m, f"{flag}={value} is not <apis>:<key>=<value>"
        keyed[frozenset(m.group(1).split(","))] = (m.group(2), m.group(3))
    want = {frozenset(LOCKED): (spec.ADMIN_HEADER, spec.ADMIN_KEY_ENV)}
    if flag == "--http-restricted-api":
        want[frozenset({"inference"})] = (INFER_KEY_HEADER, INFER_KEY_ENV)
    assert set(keyed) == set(want)
    for categories, (header, value) in keyed.items():
        assert categories <= KNOWN_CATEGORIES and not categories & MUST_STAY_OPEN[flag]
        assert (header, value) == (want[categories][0], f"value-of-{want[categories][1]}")


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_keys_come_from_the_environment_and_have_no_default(services, name):
    """The keys reach the server through its environment, as `${VAR:?message}`: Compose refuses to start
    without them (a default written here would be public)."""
    environment = services[name]["environment"]
    for key in KEYS:
        assert re.fullmatch(r"\$\{%s:\?[^}$]+\}" % key, environment[key]), environment[key]
    assert not set(environment) - set(KEYS), "the entrypoint's other settings keep their defaults"


def test_compose_refuses_to_start_without_the_keys(tmp_path):
    """`docker compose config` (no engine needed, nothing started) accepts the file with both keys set and
    names the missing key otherwise; --env-file keeps a local .env out of it."""
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
    ):
        docker_or_skip()  # skips (or fails under CHARRNN_REQUIRE_DOCKER=1) and says why
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in KEYS and not k.startswith("COMPOSE_")}
    profiles = [
        a
        for p in ("cpu", "export", "perf", "slim", "perf-slim", "scale", "monitoring")
        for a in ("--profile", p)
    ]

    def config(**keys: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "docker",
                "compose",
                "--env-file",
                str(empty),
                "-f",
                str(COMPOSE_FILE),
                *profiles,
                "config",
                "-q",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**base, **keys},
            timeout=60,
        )

    r = config(**{k: "k" for k in KEYS})
    assert r.returncode == 0, r.stderr
    for missing in KEYS:
        r = config(**{k: "k" for k in KEYS if k != missing})
        assert (
            r.returncode != 0 and f"required variable {missing} is missing a value" in r.stderr
        ), r.stderr


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_memory_ceiling(services, name):
    """A bounded server: Triton 2.51 has no request-size limit, and keeps a high-water mark of the largest ones."""
    assert re.fullmatch(r"\$\{TRITON_MEM_LIMIT:-\d+g\}", services[name]["mem_limit"]), services[
        name
    ]["mem_limit"]


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_healthcheck_shm_and_user(services, name):
    s = services[name]
    test = s["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] in ("curl", "python3")
    port = spec.CONTAINER_PORTS.http
    assert any(re.search(rf"//(localhost|127\.0\.0\.1):{port}/v2/health/ready\b", a) for a in test)
    assert s["shm_size"]
    assert s.get("user") == "triton-server"
    assert s["restart"] == "unless-stopped"


def test_prometheus_service(services):
    """Prometheus (serve/Dockerfile.prometheus, profile monitoring): unprivileged, read-only root, its
    configuration mounted read-only, its database on a named volume, its port on loopback only."""
    s = services["prometheus"]
    assert s["user"] == "prometheus" and s["read_only"] is True
    assert s["build"]["dockerfile"] == "serve/Dockerfile.prometheus"
    assert (
        s["build"]["args"]["BASE_IMAGE"]
        == f"${{{IMAGES['prometheus'].base_variable}:-{IMAGES['prometheus'].official_base}}}"
    )
    mounts = {m["target"]: m for m in bind_mounts(s)}
    assert mounts["/etc/prometheus"]["source"] == "./serve/monitoring"
    assert mounts["/etc/prometheus"]["read_only"] is True
    assert mounts["/var/lib/prometheus/data"]["type"] == "volume"
    port = spec.PROMETHEUS_PORT
    assert s["ports"] == [f"127.0.0.1:${{PROMETHEUS_PORT:-{port}}}:{port}"]
    assert f"/dev/tcp/127.0.0.1/{port} " in s["healthcheck"]["test"][-1]
    assert "!serve/Dockerfile.prometheus" in (ROOT / ".dockerignore").read_text().split()
    assert s["restart"] == "unless-stopped"
    # Every Triton service of the CPU profiles is a scrape target (found by its DNS name on the metrics port).
    config = yaml.safe_load((ROOT / "serve" / "monitoring" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == {d.service for d in spec.DEPLOYMENTS if d.image == "slim"}
    assert sd["port"] == spec.CONTAINER_PORTS.metrics


@pytest.mark.parametrize("name", [*SERVER_SERVICES, "perf-slim", "proxy", "prometheus"])
def test_no_capabilities_and_no_new_privileges(services, name):
    assert services[name]["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in services[name]["security_opt"]


# ---- GPU ------------------------------------------------------------------------------------------------------


def gpu_devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices", []
    )


@pytest.mark.parametrize("name", ["triton", "export-trt"])
def test_gpu_reserved(services, name):
    (dev,) = gpu_devices(services[name])
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]


@pytest.mark.parametrize(
    "name",
    [
        "triton-cpu",
        "triton-stream",
        "perf",
        "triton-slim",
        "triton-slim-stream",
        "perf-slim",
        "triton-replica",
        "proxy",
        "prometheus",
    ],
)
def test_no_gpu(services, name):
    assert not gpu_devices(services[name])


# ---- mounts and models ----------------------------------------------------------------------------------------


def test_every_host_path_exists_or_is_a_served_model_folder(services):
    for name, s in services.items():
        for m in bind_mounts(s):
            if (name, m["type"], m["source"]) == ("prometheus", "volume", "prometheus-data"):
                continue  # Prometheus's database: the one named volume
            assert m["type"] == "bind", f"{name}: only bind mounts expected"
            rel = Path(m["source"])
            assert not rel.is_absolute(), f"{name}: {rel} must be relative to the repository"
            parts = (ROOT / rel).resolve().relative_to(ROOT).parts
            # model_repository/* is produced by `make export`; the names must be ones we serve.
            if parts[:1] == ("model_repository",):
                assert len(parts) <= 2, f"{name}: mount {rel} inside a model folder"
                assert (
                    len(parts) == 1 or parts[1] in SERVED_MODELS
                ), f"{name}: {rel} is not in SERVED_MODELS"
            else:
                assert (
                    ROOT / rel
                ).exists(), f"{name}: host path {rel} does not exist in the repository"


def test_every_model_named_is_served():
    named = set(re.findall(r"model_repository/([A-Za-z0-9_]+)", COMPOSE_FILE.read_text()))
    named |= set(re.findall(r"\b(charrnn_[a-z0-9_]+)\b", COMPOSE_FILE.read_text()))
    assert named and named <= set(SERVED_MODELS), named - set(SERVED_MODELS)


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_servers_mount_their_models_read_only_decoupled_apart(services, name):
    """Each server mounts exactly its deployment's models, each folder on its own, read-only, from
    MODEL_REPOSITORY (./model_repository by default); the decoupled model in a server of its own (Triton 2.51
    crashes when both kinds stream on one server); TensorRT models only where there is a GPU, and never in the
    slim image (CPU-only)."""
    deployment = spec.BY_SERVICE[name]
    mounts = bind_mounts(services[name])
    assert all(m["read_only"] for m in mounts)
    assert sorted(Path(m["source"]).name for m in mounts) == sorted(deployment.models)
    assert all(m["target"] == f"/models/{Path(m['source']).name}" for m in mounts)
    assert all(Path(m["source"]).parent == Path("model_repository") for m in mounts)
    sources = [v["source"] for v in services[name]["volumes"]]
    assert all(s.startswith("${MODEL_REPOSITORY:-./model_repository}/") for s in sources), sources
    assert not mixed_decoupled(deployment.models)
    gpu_only = any(m in GPU_ONLY_MODELS for m in deployment.models)
    assert bool(gpu_devices(services[name])) == gpu_only
    assert not (gpu_only and deployment.image == "slim")


def test_the_stream_servers_serve_the_decoupled_models_and_the_others_the_rest():
    """On a GPU host `triton` + `triton-stream` serve every model; on a CPU host `triton-cpu` (or the slim
    servers) + their stream server every model that needs no GPU."""
    models = {d.service: set(d.models) for d in spec.DEPLOYMENTS}
    cpu_models = set(SERVED_MODELS) - set(GPU_ONLY_MODELS)
    assert models["triton"] | models["triton-stream"] == set(SERVED_MODELS)
    assert models["triton-cpu"] | models["triton-stream"] == cpu_models
    assert models["triton-slim"] | models["triton-slim-stream"] == cpu_models
    assert models["triton-stream"] == models["triton-slim-stream"] == set(DECOUPLED_MODELS)
    assert models["triton-replica"] == models["triton-slim"]


def test_slim_servers_publish_different_host_ports(services):
    host = [
        with_defaults(p).split(":")[1]
        for n in ("triton-slim", "triton-slim-stream")
        for p in services[n]["ports"]
    ]
    assert len(set(host)) == 6, host


# ---- one release for every NGC image -----------------------------------------------------------------------------


def test_one_triton_release_everywhere(services):
    """TRITON_RELEASE moves every NGC image at once (server, SDK, TensorRT: a plan loads only on the TensorRT it
    was built with); its default is the spec's, and the Dockerfile builds FROM it."""
    text = COMPOSE_FILE.read_text()
    assert {m.group(1) for m in RELEASE_VAR.finditer(text)} == {spec.NGC_RELEASE}
    for name in NGC_SERVICES:
        s = services[name]
        image = s.get("image", "")
        assert RELEASE_VAR.search(image), f"{name}: image {image!r} does not use TRITON_RELEASE"
        if "build" in s:
            assert RELEASE_VAR.fullmatch(str(s["build"]["args"]["TRITON_RELEASE"]))
            assert dockerfile_of(services, name) == DOCKERFILE
    # No release number written out anywhere else (an image tag that escaped the variable).
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        assert not re.search(r"\d\d\.\d\d-py3", RELEASE_VAR.sub("", code)), line
    dockerfile = DOCKERFILE.read_text()
    assert re.findall(r"^ARG TRITON_RELEASE=(\S+)$", dockerfile, re.M) == [spec.NGC_RELEASE]
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert froms == ["nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3"]
    assert dockerfile.index("ARG TRITON_RELEASE") < dockerfile.index("FROM ")


def test_images_are_the_ngc_ones(services):
    assert services["export-trt"]["image"].startswith("nvcr.io/nvidia/tensorrt:")
    assert services["export-trt"]["image"].endswith("-py3")
    assert services["perf"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert services["perf"]["image"].endswith("-py3-sdk")


# ---- the images -------------------------------------------------------------------------------------------------


def test_dockerfile_adds_what_charrnn_python_needs():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install .*\"onnxruntime==\d+\.\d+\.\d+\"", text), "pin onnxruntime"
    assert '"numpy<2"' in text
    assert re.search(r"^COPY .*charrnn/ /opt/charrnn/charrnn/$", text, re.M)
    assert re.search(r"PYTHONPATH=/opt/charrnn\b", text)
    assert re.search(r"^USER triton-server$", text, re.M)
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in dockerignore and "!charrnn/" in dockerignore


@pytest.mark.parametrize("name", ["triton", "triton-slim"])
def test_images_run_the_entrypoint(services, name):
    """Both images install serve/tritonserver.sh on PATH (root-owned, 755) and run it by default; their
    healthcheck asks the port it serves HTTP on. Only the slim image (CPU-only) sets the CPU configs, and it
    points the entrypoint at the wheel's binary."""
    path = dockerfile_of(services, name)
    text = path.read_text()
    target = f"/opt/tritonserver/bin/{spec.ENTRYPOINT}"
    copy = re.search(rf"^COPY (--chown=root:root )?{spec.ENTRYPOINT_SOURCE} {target}$", text, re.M)
    chmod = re.search(rf"^RUN chmod 755 {target}\b", text, re.M)
    # installed as root, before the image switches to its unprivileged user
    assert copy and chmod and copy.start() < chmod.start() < text.index("\nUSER triton-server\n")
    assert re.findall(r"^CMD (.*)$", text, re.M) == [f'["{spec.ENTRYPOINT}"]']
    assert f"!{spec.ENTRYPOINT_SOURCE}" in (ROOT / ".dockerignore").read_text().split()
    (healthcheck,) = re.findall(r"^HEALTHCHECK .*\n.*$", text, re.M)
    assert f":{spec.CONTAINER_PORTS.http}/v2/health/ready" in healthcheck
    want = (
        {}
        if name == "triton"
        else {
            "TRITON_MODEL_CONFIG_NAME": CPU_CONFIG_NAME,
            "TRITONSERVER": "$TRITON_DIST/bin/tritonserver",
        }
    )
    assert image_env(path) == want


@pytest.mark.parametrize("name, config_name", [("triton", None), ("triton-slim", CPU_CONFIG_NAME)])
def test_only_the_slim_image_loads_the_cpu_configs(services, name, config_name, tmp_path):
    """The ONNX Runtime models load configs/cpu.pbtxt (KIND_CPU) in the CPU-only slim image, config.pbtxt
    (KIND_AUTO) in NVIDIA's: the same compose command, the image's environment decides."""
    args = tritonserver_argv(services[name], tmp_path, dockerfile_of(services, name))
    assert flag_values(args, "--model-config-name") == ([config_name] if config_name else [])
    assert "--model-config-name" not in " ".join(command_args(services[name]))


# ---- export and perf services -----------------------------------------------------------------------------------


def test_export_service_runs_build_plan(services):
    s = services["export-trt"]
    script = " ".join(command_args(s))
    assert "python3 -m export.build_plan" in script
    assert f"--out model_repository/{TRT}/1/model.plan" in script
    assert f"--out model_repository/{GEN_TRT}/1/model.plan" in script  # the generation graph's plan
    writable = [m for m in bind_mounts(s) if not m["read_only"]]
    assert [Path(m["source"]).parts for m in writable] == [
        ("model_repository", name) for name in GPU_ONLY_MODELS
    ]


def test_perf_service(services):
    s = services["perf"]
    assert s["depends_on"]["triton"]["condition"] == "service_healthy"
    assert command_args(s) == ["bash", "/bench/perf.sh"]
    targets = {m["target"]: m for m in bind_mounts(s)}
    assert Path(targets["/bench"]["source"]).parts == ("bench",) and targets["/bench"]["read_only"]
    assert Path(targets["/results"]["source"]).parts == ("bench", "results")
    assert s["environment"]["TRITON_GRPC"] == f"triton:{spec.CONTAINER_PORTS.grpc}"
    # the step models of the table, in its order (perf.sh has no default of its own), all served by `triton`
    models = with_defaults(s["environment"]["MODELS"]).split()
    assert models == list(STEP_MODELS) and set(models) <= set(spec.BY_SERVICE["triton"].models)


def test_perf_script_is_valid_bash_with_the_sequence_flags():
    subprocess.run(["bash", "-n", str(PERF_SH)], check=True)
    text = PERF_SH.read_text()
    for flag in [
        '-m "$model"',
        '-u "$TRITON_GRPC"',
        "-i grpc",
        "--streaming",
        "--input-data",
        '--sequence-length "$length"',
        "--sequence-length-variation 0",
        "--sequence-id-range",
        "--concurrency-range",
        "--stability-percentage",
        '-f "$out"',
    ]:
        assert flag in text, flag
    assert "/results/perf_input.json" in text and "/results/perf_input_gen.json" in text
    assert '-f "$out"' in text and 'merged="$RESULTS/perf_$model.csv"' in text


# ---- the slim images (no NGC registry) ---------------------------------------------------------------------------

SLIM_DOCKERFILES = {
    "triton-slim": ROOT / "serve" / "Dockerfile.slim",
    "perf-slim": ROOT / "bench" / "Dockerfile.perf",
}


@pytest.mark.parametrize("name", SLIM_DOCKERFILES)
def test_slim_base_image_is_one_build_argument_with_one_default(services, name):
    """Compose's BASE_IMAGE default, the Dockerfile's ARG default and serve.images' official base agree."""
    image, build = IMAGES[name], services[name]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == SLIM_DOCKERFILES[name]
    assert build["args"]["BASE_IMAGE"] == f"${{{image.base_variable}:-{image.official_base}}}"
    text = SLIM_DOCKERFILES[name].read_text()
    assert re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M) == [image.official_base]
    assert re.findall(r"^FROM (\S+)$", text, re.M) == ["${BASE_IMAGE}"]
    assert re.search(
        rf"^COPY build/wheels/{name}/ ", text, re.M
    ), "install from the host-made wheelhouse"
    assert "--no-index" in text, "no package index inside the build (containers cannot reach PyPI)"
    assert (
        f"!{SLIM_DOCKERFILES[name].relative_to(ROOT)}"
        in (ROOT / ".dockerignore").read_text().split()
    )


def test_slim_images_are_tagged_with_what_they_hold(services):
    """perf-slim's tag is pyproject's perf-analyzer pin; triton-slim's is the spec's TRITON_VERSION, the
    nvidia-pytriton 0.7.0 server, 2.51.0 (test_compose_slim checks the running server reports it).
    """
    assert services["perf-slim"]["image"] == f"charrnn-perf-analyzer:{pins()['perf-analyzer']}"
    assert pins()["nvidia-pytriton"] == "0.7.0" and spec.TRITON_VERSION == "2.51.0"
    assert spec.IMAGES["slim"].tag == spec.TRITON_VERSION
    for name in ("triton-slim", "triton-slim-stream", "triton-replica"):
        assert services[name]["image"] == str(spec.IMAGES["slim"])


def test_slim_server_image_runs_unprivileged_with_the_stub_of_its_python():
    text = SLIM_DOCKERFILES["triton-slim"].read_text()
    assert re.search(r"^USER triton-server$", text, re.M)
    assert re.search(r"useradd --uid 1000 .*triton-server$", text, re.M)
    version = IMAGES["triton-slim"].python
    assert f"python_backend_stubs/{version}/triton_python_backend_stub" in text
    assert f"/opt/venv/lib/python{version}/site-packages/charrnn/" in text
    assert re.search(
        rf'v == "{re.escape(version)}"', text
    ), "the build must refuse a base with another Python"


def test_perf_slim_service(services):
    s = services["perf-slim"]
    assert s["depends_on"]["triton-slim"]["condition"] == "service_healthy"
    assert command_args(s) == ["bash", "/bench/perf.sh"]
    assert s["environment"]["TRITON_GRPC"] == f"triton-slim:{spec.CONTAINER_PORTS.grpc}"
    # what triton-slim serves
    assert with_defaults(s["environment"]["MODELS"]).split() == list(
        spec.BY_SERVICE["triton-slim"].models
    )
    assert not s.get(
        "ports"
    ), "perf_analyzer reaches the server on the compose network; nothing to publish"
    targets = {m["target"]: m for m in bind_mounts(s)}
    assert Path(targets["/bench"]["source"]).parts == ("bench",) and targets["/bench"]["read_only"]
    assert Path(targets["/results"]["source"]).parts == ("bench", "results")


def test_ci_installs_docker_and_makes_the_docker_skip_a_failure():
    run = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/docker.sh" in run and "export CHARRNN_REQUIRE_DOCKER=1" in run
    assert run.index("docker.sh") < run.index("make test")
    docker_sh = ROOT / ".ci" / "docker.sh"
    subprocess.run(["bash", "-n", str(docker_sh)], check=True)
    assert (
        "/etc/apt/sources.list" not in docker_sh.read_text()
    ), "CI must not change the system's apt sources"


# ---- serve.images without Docker: pins, platforms, errors ----------------------------------------------------


def test_image_pins_come_from_pyproject():
    from serve.images import pinned

    table = pins()
    for image in IMAGES.values():
        for pin in pinned(image.packages + image.packages_no_deps):
            name, version = pin.split("==")
            assert table[name] == version and re.fullmatch(r"\d+(\.\d+)+", version), pin


def test_unpinned_package_is_a_clear_error():
    from charrnn.errors import UserError
    from serve.images import pinned

    with pytest.raises(
        UserError, match=r"constraints.txt: no exact pin \(name==version\) for no-such-package"
    ):
        pinned(("numpy", "no-such-package"))


def test_wheel_platforms_stay_within_the_image_glibc():
    from serve.images import manylinux_platforms

    tags = manylinux_platforms((2, 36))
    assert tags[0].startswith("manylinux_2_36_") and not any(
        "2_37" in t or "2_38" in t for t in tags
    )
    assert any(t.startswith("manylinux2014_") for t in tags) and any(
        t.startswith("manylinux_2_17_") for t in tags
    )
    # perf_analyzer's wheel is manylinux_2_38: the Debian 13 image (glibc 2.41) must accept it, bookworm's not.
    assert any(
        t.startswith("manylinux_2_38_") for t in manylinux_platforms(IMAGES["perf-slim"].glibc)
    )
    assert IMAGES["triton-slim"].glibc < (2, 38) <= IMAGES["perf-slim"].glibc


def test_images_cli_refuses_an_unknown_service(capsys):
    from serve.images import main

    assert main(["no-such-image"]) == 2
    assert (
        "error: SERVICE: unknown no-such-image (choose from triton-slim, perf-slim, proxy, prometheus)"
        in capsys.readouterr().err
    )


def test_images_cli_without_docker_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from serve.images import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no docker on PATH
    assert main([]) == 3
    assert (
        "error: docker: not found (install Docker >= 20.10 and Compose v2"
        in capsys.readouterr().err
    )

"""The client alone on Debian 13's Python 3.13: pyproject.toml's ranges (the core dependencies and the client
extra) install there, and `python -m client` from the checkout generates the same text through a real local server
as on the host's 3.11 (gRPC and HTTP), and still checks its flags first.

Needs Docker and the charrnn-base:trixie-python3.13 image (`python -m serve.images perf-slim` makes it). Containers
here cannot reach PyPI: the wheels are downloaded on the host (`pip download --python-version 3.13`) into
build/wheels/client-py313/ and installed in the container with --no-index. No constraints.txt here: it pins the
3.11 closure (numpy 1.26.4 has no 3.13 wheel); the ranges are what is tested."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from charrnn.repository import PYTHON
from tests.helpers import ROOT, docker_or_skip, run_client_on

IMAGE = "charrnn-base:trixie-python3.13"
WHEELS = ROOT / "build" / "wheels" / "client-py313"


def client_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["client"])


@pytest.fixture(scope="module")
def wheelhouse() -> list[str]:
    """The client's wheels for CPython 3.13 on glibc 2.41 (Debian 13), downloaded once per set of ranges."""
    docker_or_skip()
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        pytest.skip(f"no {IMAGE} image (`python -m serve.images perf-slim` makes it)")
    from serve.images import manylinux_platforms

    requirements = client_requirements()
    stamp = "\n".join(requirements) + "\n"
    if (WHEELS / "requirements.txt").is_file() and (
        WHEELS / "requirements.txt"
    ).read_text() == stamp:
        return requirements
    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    platforms = [a for p in manylinux_platforms((2, 41)) for a in ("--platform", p)]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet"]
        + ["--only-binary=:all:", "--python-version", "3.13", "--implementation", "cp"]
        + ["--abi", "cp313", "--abi", "abi3", "--abi", "none", *platforms, "--dest", str(WHEELS)]
        + requirements,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode:
        pytest.skip(
            f"cannot download the 3.13 wheels on this host (PyPI unreachable?): {r.stderr[-500:]}"
        )
    (WHEELS / "requirements.txt").write_text(stamp)
    return requirements


def in_py313(requirements: list[str], *commands: str, env: dict | None = None):
    """Install the wheelhouse in a fresh venv of the 3.13 container, then run `commands` (shell) from the
    checkout (read-only), on the host's network (the local server listens on 127.0.0.1)."""
    script = " && ".join(
        [
            "python3 -m venv /tmp/venv",
            "/tmp/venv/bin/pip install --quiet --disable-pip-version-check --no-index --find-links /wheels "
            + " ".join(f"'{r}'" for r in requirements),
            "/tmp/venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 13), sys.version'",
            *commands,
        ]
    )
    env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "host", "-e", "PYTHONDONTWRITEBYTECODE=1", *env_args]
        + ["-v", f"{WHEELS}:/wheels:ro", "-v", f"{ROOT}:/src:ro", "-w", "/src", IMAGE]
        + ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_client_extra_on_python_313_generates_what_311_does(wheelhouse, server):
    flags = "--model charrnn_python --greedy --length 60 --prompt JULIET:"
    py = "/tmp/venv/bin/python -m client"
    r = in_py313(
        wheelhouse,
        f"{py} -u grpc://{server.grpc_url} {flags}",
        f"{py} -u http://{server.http_url} {flags}",
        f"{{ {py} --top-k -1; test $? -eq 2; }}",  # flags still checked before connecting
        env={"TRITON_INFER_KEY": server.infer_key},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    host = run_client_on(server, "--greedy", "--length", "60", "--prompt", "JULIET:")
    assert host.returncode == 0, host.stderr
    assert r.stdout == host.stdout * 2, (r.stdout, host.stdout)
    assert f"[{PYTHON} via grpc://{server.grpc_url}: 1 x 60 characters]" in r.stderr
    assert f"[{PYTHON} via http://{server.http_url}: 1 x 60 characters]" in r.stderr
    assert "error: top-k: must be >= 0" in r.stderr

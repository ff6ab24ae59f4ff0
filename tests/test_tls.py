"""gRPC over TLS on the slim server, for real: `python -m serve.tls` (`make tls-certs`) and docker-compose.tls.yml.

serve.tls is checked without Docker (files, modes, owners, what the certificates say, a second run, bad input).
Then one compose project of triton-slim with the override, on free loopback ports: the client over TLS that
trusts the CA generates TensorFlow's text; a plain-text client and a client that does not trust the CA are
refused; HTTP stays plain text. The same container is then recreated with mutual TLS (TRITON_GRPC_TLS_MUTUAL=true):
TLS without a client certificate, or with one from another CA, is refused, and the client certificate works.
The Docker tests skip without Docker (CHARRNN_REQUIRE_DOCKER=1 makes that a failure), like test_compose_slim.py.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from charrnn.repository import GEN_ONNX, ONNX
from charrnn.sampling import SamplingParams
from serve import tls
from serve.local_triton import free_port
from tests.helpers import ROOT, ComposeStack, docker_or_skip, tf_text

OVERRIDE = ROOT / "docker-compose.tls.yml"
COMPOSE_FILES = ("-f", "docker-compose.yml", "-f", "docker-compose.tls.yml")
SERVICE = "triton-slim"
TLS_SERVICES = ("triton-slim", "triton-slim-stream")
FLAGS = (
    "--grpc-use-ssl=true",
    '--grpc-use-ssl-mutual="$TRITON_GRPC_TLS_MUTUAL"',
    "--grpc-server-cert=/etc/triton-tls/server.crt",
    "--grpc-server-key=/etc/triton-tls/server.key",
    "--grpc-root-cert=/etc/triton-tls/ca.crt",
)


def make_certs(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.tls", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def openssl(*args: str) -> str:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tls") / "certs"
    r = make_certs(out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> Path:
    """A second, unrelated CA (and its server and client certificates)."""
    out = tmp_path_factory.mktemp("tls-other") / "certs"
    assert make_certs(out).returncode == 0
    return out


# --- serve.tls (no Docker) ------------------------------------------------------------------------------
def test_tls_certs_are_private_and_the_server_can_read_its_key(certs):
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert sorted(p.name for p in certs.iterdir()) == sorted(tls.KEYS + tls.CERTS)
    for name in tls.KEYS:
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    for name in tls.CERTS:
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o644, name
    # uid 1000 (the container's triton-server) owns the server key; as uid 1000 it is one's own anyway.
    assert (certs / "server.key").stat().st_uid == tls.SERVER_UID
    if os.geteuid() != tls.SERVER_UID:
        assert (certs / "ca.key").stat().st_uid == os.geteuid()


def test_tls_certs_say_what_they_are_for(certs):
    openssl("verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt"))
    openssl("verify", "-CAfile", str(certs / "ca.crt"), str(certs / "client.crt"))
    server = openssl("x509", "-in", str(certs / "server.crt"), "-noout", "-text")
    assert "TLS Web Server Authentication" in server and "CA:FALSE" in server
    client = openssl("x509", "-in", str(certs / "client.crt"), "-noout", "-text")
    assert "TLS Web Client Authentication" in client
    ca = openssl("x509", "-in", str(certs / "ca.crt"), "-noout", "-text")
    assert "CA:TRUE" in ca and "Certificate Sign" in ca
    sans = tls.cert_sans(certs / "server.crt")
    assert {"DNS:localhost", "IP:127.0.0.1", f"IP:{ipaddress.ip_address('::1')}"} <= sans
    assert {"DNS:triton-slim", "DNS:triton-slim-stream"} <= sans


def test_a_second_run_keeps_valid_certs_and_force_or_new_names_replace_them(tmp_path):
    out = tmp_path / "tls"
    assert make_certs(out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = make_certs(out)
    assert r.returncode == 0 and "up to date" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = make_certs(out, "--host", "triton.example.org", "--host", "10.1.2.3")
    assert r.returncode == 0 and "up to date" not in r.stderr
    assert {"DNS:triton.example.org", "IP:10.1.2.3"} <= tls.cert_sans(out / "server.crt")
    assert (out / "ca.crt").read_bytes() != before["ca.crt"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary left behind
    r = make_certs(out, "--force", "--host", "triton.example.org", "--host", "10.1.2.3")
    assert r.returncode == 0 and "up to date" not in r.stderr


@pytest.mark.parametrize(
    "args, what",
    [
        (["--days", "0"], "--days"),
        (["--host", "not a name"], "--host"),
        (["--server-uid", "-1"], "--server-uid"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, what):
    r = make_certs(tmp_path / "tls", *args)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {what}:"), r.stderr
    assert not (tmp_path / "tls").exists()


def test_a_user_who_cannot_give_the_key_to_the_server_is_refused(tmp_path, monkeypatch):
    """Neither root nor the server's uid: the key could not be read by the server, so nothing is made."""
    from charrnn.errors import UserError

    monkeypatch.setattr(tls.os, "geteuid", lambda: 4321)
    with pytest.raises(UserError, match="--server-uid 4321 if the server runs as you"):
        tls.make_certificates(tmp_path / "tls", tls.san_entries(["localhost"]), 1, tls.SERVER_UID)
    assert tls.key_owner(4321) is None  # the server runs as this user: the key is its own


# --- docker-compose.tls.yml, statically --------------------------------------------------------------------
def test_the_override_keeps_the_base_command_and_mounts_the_certs_read_only():
    """An entrypoint that execs docker-compose.yml's command (not restated here) with the TLS flags appended."""
    override = yaml.safe_load(OVERRIDE.read_text())
    assert set(override["services"]) == set(TLS_SERVICES)
    for name in TLS_SERVICES:
        service = override["services"][name]
        assert "command" not in service
        sh, dash_c, script, zero = service["entrypoint"]
        assert (sh, dash_c, zero) == ("sh", "-c", "grpc-tls")
        assert script.split() == ["exec", '"$$@"', *(f.replace("$", "$$") for f in FLAGS)]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert set(mounts) == {
            f"/etc/triton-tls/{f}" for f in ("server.crt", "server.key", "ca.crt")
        }
        for target, v in mounts.items():
            assert v["read_only"] and v["bind"] == {"create_host_path": False}, target
            assert v["source"] == "${TRITON_TLS_DIR:-./build/tls}/" + target.rsplit("/", 1)[1]
        assert "ca.key" not in str(service) and "client" not in str(mounts)


# --- the server, for real ---------------------------------------------------------------------------------
@dataclass
class Stack(ComposeStack):
    """triton-slim with docker-compose.tls.yml, on free loopback ports."""

    PROFILES: ClassVar[tuple[str, ...]] = ("slim",)

    def compose(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return super().compose(*COMPOSE_FILES, *args, **kw)

    def up(self, mutual: bool) -> None:
        t0 = time.monotonic()
        env = {"TRITON_GRPC_TLS_MUTUAL": "true" if mutual else "false"}
        r = self.compose("up", "-d", "--wait", SERVICE, env=env)
        if r.returncode != 0:
            logs = self.compose("logs", "--no-color", "--tail", "40").stdout
            pytest.fail(f"docker compose up --wait failed ({r.returncode}):\n{r.stderr}\n{logs}")
        print(f"triton-slim over TLS (mutual={mutual}) healthy in {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="module")
def stack(certs, shipped_repo):
    docker_or_skip()
    image = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][SERVICE]["image"]
    have = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60)
    # The image as `make images` left it (tests/test_compose_slim.py tests the build): built only if missing.
    bases = {}
    if have.returncode != 0:
        from serve.images import build

        bases = build([SERVICE])
    ports = {
        name: free_port()
        for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")
    }
    env = {
        **os.environ,
        **bases,
        **{k: str(v) for k, v in ports.items()},
        "TRITON_ADMIN_KEY": secrets.token_hex(16),
        "TRITON_INFER_KEY": secrets.token_hex(16),
        "TRITON_MEM_LIMIT": "3g",
        "TRITON_TLS_DIR": str(certs),
        "MODEL_REPOSITORY": str(shipped_repo),
    }
    s = Stack(
        f"charrnn-tls-{secrets.token_hex(4)}",
        env,
        ports["TRITON_HTTP_PORT"],
        ports["TRITON_GRPC_PORT"],
    )
    try:
        s.up(mutual=False)
        yield s
    finally:
        r = s.compose("down", "--remove-orphans", "--volumes")
        assert r.returncode == 0, r.stderr


def grpc_call(stack, **tls_kw):
    """is_model_ready(charrnn_onnx) through tritonclient.grpc with these TLS arguments: True, or the error."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    c = tc.InferenceServerClient(stack.grpc_url, **tls_kw)
    try:
        return c.is_model_ready(ONNX)
    except InferenceServerException as e:
        return e
    finally:
        c.close()


def client(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", "--url", stack.grpc_url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("model, flags", [(ONNX, []), (GEN_ONNX, ["--chunk", "32"])])
def test_the_client_over_tls_generates_tensorflows_text(stack, certs, shipped, model, flags):
    want = tf_text(shipped, "ROMEO:", 200, SamplingParams(greedy=True))
    r = client(
        stack,
        "--ssl",
        "--root-certificates",
        str(certs / "ca.crt"),
        "--model",
        model,
        *flags,
        "--greedy",
        "--prompt",
        "ROMEO:",
        "--length",
        "200",
        "--expect",
        want,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ROMEO:{want}\n"
    assert f"[{model} via grpc://{stack.grpc_url}: 1 x 200 characters" in r.stderr


def test_a_plain_text_client_is_refused(stack, certs):
    assert grpc_call(stack, ssl=True, root_certificates=str(certs / "ca.crt")) is True
    error = grpc_call(stack)
    assert not isinstance(error, bool) and "UNAVAILABLE" in str(error), error
    r = client(stack, "--length", "5")
    assert r.returncode == 3, r.stderr  # unreachable (exit code 3): it never gets a byte of gRPC
    assert f"error: server {stack.grpc_url}" in r.stderr


def test_a_client_that_does_not_trust_the_ca_is_refused(stack, certs, other_certs):
    assert grpc_call(stack, ssl=True, root_certificates=str(certs / "ca.crt")) is True
    for kw in (
        dict(ssl=True, root_certificates=str(other_certs / "ca.crt")),  # another CA
        dict(ssl=True),  # the system's CAs
    ):
        error = grpc_call(stack, **kw)
        assert not isinstance(error, bool) and "UNAVAILABLE" in str(error), (kw, error)
    r = client(stack, "--ssl", "--root-certificates", str(other_certs / "ca.crt"), "--length", "5")
    assert r.returncode == 3, r.stderr


def test_http_stays_plain_text_and_keyed(stack):
    """Triton 2.51 has no TLS for HTTP: it still answers in plain text (health open, inference keyed)."""
    import tritonclient.http as th

    c = th.InferenceServerClient(stack.http_url)
    try:
        assert c.is_server_ready()
    finally:
        c.close()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(stack, certs, other_certs, shipped):
    """The same container recreated with TRITON_GRPC_TLS_MUTUAL=true (last: it changes the module's server)."""
    stack.up(mutual=True)
    ca = str(certs / "ca.crt")
    for kw in (
        dict(ssl=True, root_certificates=ca),  # no client certificate
        # a client certificate of another CA
        dict(
            ssl=True,
            root_certificates=ca,
            private_key=str(other_certs / "client.key"),
            certificate_chain=str(other_certs / "client.crt"),
        ),
    ):
        error = grpc_call(stack, **kw)
        assert not isinstance(error, bool) and "UNAVAILABLE" in str(error), (kw, error)
    want = tf_text(shipped, "JULIET:", 100, SamplingParams(greedy=True))
    r = client(
        stack,
        "--ssl",
        "--root-certificates",
        ca,
        "--private-key",
        str(certs / "client.key"),
        "--certificate-chain",
        str(certs / "client.crt"),
        "--model",
        ONNX,
        "--greedy",
        "--prompt",
        "JULIET:",
        "--length",
        "100",
        "--expect",
        want,
    )
    assert r.returncode == 0, r.stderr
    r = client(stack, "--ssl", "--root-certificates", ca, "--length", "5")
    assert r.returncode == 3, r.stderr

"""N Triton replicas behind HAProxy (compose profile `scale`, serve/haproxy.cfg, docs/scaling.md), for real.

The proxy's image accepts the config (`haproxy -c`); the services are hardened as compose resolves them; with 3
replicas the proxy finds all of them through Docker's DNS and checks them UP; generation through it over gRPC
and HTTP equals TensorFlow, on the python backend and on Triton's ONNX Runtime backend (charrnn_onnx: Triton
keeps each sequence's state on its replica); one x-sequence-key stays on one replica while different keys
spread over all three (counted on each replica's own /metrics); an HTTP body over the proxy's bound gets 413
and no replica sees it.

Needs a Docker engine and Compose v2; without them the tests skip and say why, and CHARRNN_REQUIRE_DOCKER=1 (set
by .ci/run) turns the skip into a failure. The run is its own compose project on free loopback ports, serving a
fresh export of the shipped model (MODEL_REPOSITORY), so it never touches a user's `make compose-up-scale`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from charrnn.contract import INFER_KEY_HEADER, ROUTING_HEADER
from charrnn.local_triton import free_port
from charrnn.repository import ONNX, PYTHON, SHARED_CPU_MODELS
from charrnn.sampling import SamplingParams
from serve.scale import BACKENDS, servers, stats_url, up, wait_for_replicas
from tests.conftest import ROOT, ComposeStack, docker_or_skip, tf_text

PROXY, REPLICA = "proxy", "triton-replica"
REPLICAS = 3
SLOTS = 8  # server-template replica 8 in serve/haproxy.cfg
MODEL = PYTHON
BODY_LIMIT = 16 * 2**20  # serve/haproxy.cfg: deny ... 413 if content-length > 16777216
# Each replica's Prometheus metrics, read inside it (replicas publish no port).
METRICS = (
    "import urllib.request as u; "
    "print(u.urlopen('http://127.0.0.1:8002/metrics', timeout=5).read().decode())"
)


def sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Stack(ComposeStack):
    """One compose project of the scale profile on free loopback ports."""

    PROFILES: ClassVar[tuple[str, ...]] = ("scale",)
    stats_port: int = 0

    @property
    def stats(self) -> str:
        return stats_url(self.stats_port)

    def containers(self, service: str) -> list[str]:
        return sorted(self.compose("ps", "-q", service).stdout.split())

    def inspect(self, container: str) -> dict:
        return json.loads(sh("docker", "inspect", container).stdout)[0]

    def pids(self, container: str, comm: str) -> list[int]:
        """Host pids of the container's processes named `comm` (docker top lists host pids)."""
        top = sh("docker", "top", container, "-eo", "pid,comm").stdout.splitlines()[1:]
        return [int(line.split()[0]) for line in top if line.split()[1] == comm]

    def requests_served(self, model: str = MODEL) -> dict[str, int]:
        """{replica container: successful requests of `model`}, from each replica's own Triton metrics."""
        out = {}
        for c in self.containers(REPLICA):
            text = sh("docker", "exec", c, "python3", "-c", METRICS).stdout
            m = re.search(
                rf'^nv_inference_request_success{{model="{model}",version="1"}} (\d+)$',
                text,
                re.MULTILINE,
            )
            assert m, text[-2000:]
            out[c] = int(m.group(1))
        return out


def resolved_config(env: dict) -> dict:
    """`docker compose config` of the slim and scale profiles: the file as Compose itself reads it (anchors,
    merges, variables)."""
    r = subprocess.run(
        [
            "docker",
            "compose",
            "--profile",
            "slim",
            "--profile",
            "scale",
            "config",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]


def keyed_env(**extra) -> dict:
    return {
        **os.environ,
        "TRITON_ADMIN_KEY": secrets.token_hex(16),
        "TRITON_INFER_KEY": secrets.token_hex(16),
        **extra,
    }


@pytest.fixture(scope="module")
def images() -> dict:
    """The replicas' and the proxy's images, as `make compose-up-scale` builds them (cached when present)."""
    docker_or_skip()
    from serve.images import build

    return build(["triton-slim", PROXY])


@contextlib.contextmanager
def scale_stack(images: dict, repo: Path, prefix: str, replicas: int = REPLICAS):
    """A compose project of the scale profile on free loopback ports, `replicas` replicas UP in the proxy;
    taken down on exit. tests/test_failover.py starts its own with this too."""
    ports = {
        name: free_port() for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "HAPROXY_STATS_PORT")
    }
    env = keyed_env(
        **images,
        **{k: str(v) for k, v in ports.items()},
        TRITON_MEM_LIMIT="2g",
        MODEL_REPOSITORY=str(repo),
    )
    s = Stack(
        f"{prefix}-{secrets.token_hex(4)}",
        env,
        ports["TRITON_HTTP_PORT"],
        ports["TRITON_GRPC_PORT"],
        ports["HAPROXY_STATS_PORT"],
    )
    try:
        t0 = time.monotonic()
        r = s.compose("up", "-d", "--wait", "--scale", f"{REPLICA}={replicas}", PROXY, REPLICA)
        healthy = time.monotonic() - t0
        if r.returncode != 0:
            pytest.fail(
                f"docker compose up --wait failed ({r.returncode}):\n{r.stderr}\n"
                f"{s.compose('logs', '--no-color', '--tail', '30').stdout}"
            )
        assert wait_for_replicas(replicas, s.stats, timeout=60) == 0
        print(
            f"scale stack: {replicas} replicas + proxy healthy in {healthy:.1f} s, "
            f"all UP in the proxy after {time.monotonic() - t0:.1f} s"
        )
        yield s
    finally:
        s.compose("down", "--remove-orphans", "--volumes")


@pytest.fixture(scope="module")
def stack(images, shipped_repo):
    with scale_stack(images, shipped_repo, "charrnn-scale") as s:
        yield s


# --- the proxy's image and the compose services, before anything runs -----------------------------------------
def test_haproxy_in_the_image_accepts_the_config(images):
    """`haproxy -c` of serve/haproxy.cfg by the image's HAProxy (Debian 12's 2.6), as compose runs it:
    unprivileged, no capabilities, read-only root, the file mounted read-only. No warning either."""
    # (Docker's default network: HAProxy connects its resolvers' UDP sockets even when only checking.)
    r = sh(
        "docker",
        "run",
        "--rm",
        "--user",
        "haproxy",
        "--cap-drop",
        "ALL",
        "--read-only",
        "--security-opt",
        "no-new-privileges:true",
        "-v",
        f"{ROOT / 'serve' / 'haproxy.cfg'}:/etc/haproxy/haproxy.cfg:ro",
        "charrnn-haproxy:2.6-bookworm",
        "haproxy",
        "-c",
        "-f",
        "/etc/haproxy/haproxy.cfg",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Configuration file is valid" in r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr and "ALERT" not in r.stdout + r.stderr, (
        r.stdout + r.stderr
    )
    version = sh(
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "charrnn-haproxy:2.6-bookworm",
        "haproxy",
        "-v",
    )
    assert re.search(r"HAProxy version 2\.6\.\d+-\d+\+deb12u\d+", version.stdout), version.stdout


def test_services_are_hardened_as_compose_resolves_them():
    docker_or_skip()
    ports = {
        "TRITON_HTTP_PORT": "18000",
        "TRITON_GRPC_PORT": "18001",
        "HAPROXY_STATS_PORT": "18404",
    }
    services = resolved_config(keyed_env(**ports))
    proxy, replica, slim = services[PROXY], services[REPLICA], services["triton-slim"]
    assert proxy["profiles"] == replica["profiles"] == ["scale"]
    for s in (proxy, replica):
        assert s["cap_drop"] == ["ALL"] and "no-new-privileges:true" in s["security_opt"]
        assert s["volumes"] and all(v["read_only"] for v in s["volumes"]), s["volumes"]
        assert s["restart"] == "unless-stopped" and s["healthcheck"]["test"] and s["mem_limit"]
    # The proxy: the package's unprivileged user, a read-only root, its config the only mount, loopback ports.
    assert proxy["user"] == "haproxy" and proxy["read_only"] is True
    assert [(v["source"], v["target"]) for v in proxy["volumes"]] == [
        (str(ROOT / "serve" / "haproxy.cfg"), "/etc/haproxy/haproxy.cfg")
    ]
    assert {p["host_ip"] for p in proxy["ports"]} == {"127.0.0.1"}
    assert sorted(p["target"] for p in proxy["ports"]) == [8000, 8001, 8404]
    assert sorted(p["published"] for p in proxy["ports"]) == sorted(ports.values())
    assert proxy["environment"]["TRITON_REPLICAS_DNS"] == REPLICA
    # The replicas: triton-slim's server (image, user, flags, models) and no published port at all.
    assert not replica.get("ports"), replica.get("ports")
    for key in (
        "image",
        "user",
        "command",
        "volumes",
        "shm_size",
        "mem_limit",
        "ulimits",
        "stop_grace_period",
    ):
        assert replica[key] == slim[key], key
    assert replica["user"] == "triton-server"
    assert sorted(Path(v["target"]).name for v in replica["volumes"]) == sorted(SHARED_CPU_MODELS)
    assert "--model-control-mode=none" in replica["command"]
    # The proxy takes triton-slim's host ports: the same variables.
    assert [p["published"] for p in proxy["ports"][:2]] == [
        p["published"] for p in slim["ports"][:2]
    ]


# --- running: discovery, health, hardening ---------------------------------------------------------------------
def test_proxy_finds_every_replica_through_dockers_dns_and_checks_them_up(stack):
    replicas = stack.containers(REPLICA)
    assert len(replicas) == REPLICAS
    addresses = sorted(
        ip
        for c in replicas
        for ip in [n["IPAddress"] for n in stack.inspect(c)["NetworkSettings"]["Networks"].values()]
    )
    table = servers(stack.stats)
    for backend, port in zip(BACKENDS, (8000, 8001)):
        rows = table[backend]
        assert sorted(rows) == sorted(f"replica{i}" for i in range(1, SLOTS + 1))
        assert sorted(r["addr"] for r in rows.values() if r["status"] == "UP") == sorted(
            f"{ip}:{port}" for ip in addresses
        ), rows
        assert sorted(r["status"] for r in rows.values() if r["status"] != "UP") == [
            "MAINT (resolution)"
        ] * (
            SLOTS - REPLICAS
        )  # the empty template slots
        assert {r["check_status"] for r in rows.values() if r["status"] == "UP"} == {"L7OK"}
    # The nameserver is Docker's embedded DNS (parse-resolv-conf), and it answered.
    r = sh(
        "docker",
        "exec",
        stack.containers(PROXY)[0],
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9999 && echo 'show resolvers dns' >&3 && timeout 3 cat <&3",
    )
    assert "nameserver 127.0.0.11:" in r.stdout, r.stdout + r.stderr
    assert int(re.search(r"valid:\s+(\d+)", r.stdout).group(1)) > 0, r.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.stats_port}/healthz", timeout=5) as h:
        assert h.status == 200


def test_running_containers_are_unprivileged_read_only_and_publish_only_the_proxy(stack):
    (proxy,) = stack.containers(PROXY)
    for container, comm, uid in [(proxy, "haproxy", None)] + [
        (c, "tritonserver", "1000") for c in stack.containers(REPLICA)
    ]:
        pids = stack.pids(container, comm)
        assert pids, f"no {comm} process in {container}"
        for pid in pids:  # haproxy: master and worker
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
            uids = fields["Uid"].split()
            assert "0" not in uids and (uid is None or set(uids) == {uid}), (comm, fields["Uid"])
            assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, (
                comm,
                fields["CapEff"],
            )
            assert fields["NoNewPrivs"].strip() == "1", comm
        info = stack.inspect(container)
        assert info["Mounts"] and not any(m["RW"] for m in info["Mounts"]), info["Mounts"]
        bindings = [b for spec in info["NetworkSettings"]["Ports"].values() for b in (spec or [])]
        if container == proxy:
            assert info["HostConfig"]["ReadonlyRootfs"] is True
            assert sorted(int(b["HostPort"]) for b in bindings) == sorted(
                [stack.http_port, stack.grpc_port, stack.stats_port]
            )
            assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, bindings
        else:
            assert bindings == [], f"replica {container} publishes {bindings}"


# --- serving through the proxy ---------------------------------------------------------------------------------
def generate_through(
    stack: Stack, protocol: str, prompts: list[str], length: int, shards: int, model: str = MODEL
) -> list[str]:
    """Greedy texts of the client library through the proxy, with `shards` routing keys (client --shards)."""
    from client.connection import Connection
    from client.generate import generate

    url = stack.grpc_url if protocol == "grpc" else stack.http_url
    conn = Connection(url, protocol, infer_key=stack.infer_key, shards=shards)
    try:
        model = conn.pick_model(model)
        vocab = conn.vocabulary(model)
        seqs = generate(conn, model, vocab, prompts, length, SamplingParams(greedy=True))
    finally:
        conn.close()
    return [vocab.decode(s.generated) for s in seqs]


PROMPTS = [
    "ROMEO:\n",
    "JULIET:\n",
    "First Citizen:\n",
    "KING HENRY VI:\nO",
    "MENENIUS:\n",
    "All:\n",
]


def test_generation_through_the_proxy_equals_tensorflow_over_grpc_and_http(stack, shipped):
    want = [tf_text(shipped, p, 60, SamplingParams(greedy=True)) for p in PROMPTS]
    before = stack.requests_served()
    assert generate_through(stack, "grpc", PROMPTS, 60, shards=2 * REPLICAS) == want
    assert generate_through(stack, "http", PROMPTS[:3], 60, shards=2) == want[:3]
    served = {c: n - before[c] for c, n in stack.requests_served().items()}
    assert sum(served.values()) >= 9 * 60, served
    assert (
        sum(1 for n in served.values() if n) >= 2
    ), f"every sequence went to one replica: {served}"


def test_charrnn_onnx_through_the_proxy_equals_tensorflow(stack, shipped):
    """Triton's ONNX Runtime backend on every replica: each sequence's state lives in Triton on the replica its
    key hashes to (affinity), and the text equals TensorFlow's; the keys spread over the replicas.
    """
    want = [tf_text(shipped, p, 60, SamplingParams(greedy=True)) for p in PROMPTS]
    before = stack.requests_served(ONNX)
    assert generate_through(stack, "grpc", PROMPTS, 60, shards=2 * REPLICAS, model=ONNX) == want
    served = {c: n - before[c] for c, n in stack.requests_served(ONNX).items()}
    assert sum(served.values()) >= 6 * 60, served
    assert (
        sum(1 for n in served.values() if n) >= 2
    ), f"every sequence went to one replica: {served}"


def step(
    stack: Stack, protocol: str, sequence_id: int, start: bool, end: bool, key: str | None
) -> None:
    """One request of a sequence of MODEL through the proxy, with the routing header `key` (None: without)."""
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    client = tc.InferenceServerClient(stack.grpc_url if protocol == "grpc" else stack.http_url)
    headers = {} if key is None else {ROUTING_HEADER: key}
    if protocol == "http":
        headers[INFER_KEY_HEADER] = stack.infer_key
    ids = tc.InferInput("INPUT_IDS", [1, 1], "INT32")
    ids.set_data_from_numpy(np.array([[20]], dtype=np.int32))
    try:
        result = client.infer(
            MODEL,
            [ids],
            sequence_id=sequence_id,
            sequence_start=start,
            sequence_end=end,
            headers=headers or None,
        )
        assert result.as_numpy("LOGITS").shape == (1, 65)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_key_stays_on_one_replica_and_keys_spread_over_all(stack, protocol):
    base = int.from_bytes(secrets.token_bytes(4), "big") << 8
    # Two sequences of 10 requests under one key: the state of each lives on one replica, so every request must
    # land there (a request on another replica would fail: that replica never saw the sequence start).
    before = stack.requests_served()
    for s in range(2):
        for i in range(10):
            step(stack, protocol, base + s, start=i == 0, end=i == 9, key=f"same-{base}")
    served = sorted(n - before[c] for c, n in stack.requests_served().items())
    assert served == [0] * (REPLICAS - 1) + [20], served
    # 30 different keys (one-request sequences): consistent hashing spreads them over every replica.
    before = stack.requests_served()
    for k in range(30):
        step(stack, protocol, base + 100 + k, start=True, end=True, key=f"key-{k}-{base}")
    served = {c: n - before[c] for c, n in stack.requests_served().items()}
    assert sum(served.values()) == 30 and all(served.values()), served
    # Without the header the proxy still balances (round robin).
    before = stack.requests_served()
    for k in range(30):
        step(stack, protocol, base + 200 + k, start=True, end=True, key=None)
    served = {c: n - before[c] for c, n in stack.requests_served().items()}
    assert sum(served.values()) == 30 and all(served.values()), served


def test_http_inference_through_the_proxy_still_needs_the_infer_key(stack):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c = th.InferenceServerClient(stack.http_url)
    ids = th.InferInput("INPUT_IDS", [1, 1], "INT32")
    ids.set_data_from_numpy(np.array([[20]], dtype=np.int32))
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            c.infer(MODEL, [ids], sequence_id=1, sequence_start=True, sequence_end=True)
    finally:
        c.close()


# --- the request-size bound --------------------------------------------------------------------------------------
def post(port: int, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """A raw HTTP/1.1 POST (tritonclient would not send these); returns the status and the head of the answer.
    The body is sent until the answer starts: the proxy refuses as soon as it has the headers."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: triton\r\n{head}\r\n".encode())
        for i in range(0, len(body), 2**16):
            if select.select([s], [], [], 0)[0]:
                break  # answered already
            try:
                s.sendall(body[i : i + 2**16])
            except (BrokenPipeError, ConnectionResetError):
                break  # answered and closed
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_http_body_over_the_bound_gets_413_and_no_replica_sees_it(stack):
    n = BODY_LIMIT // 2 + 1000  # "7," per element: a JSON document just over 16 MiB
    body = (
        b'{"inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, %d], "data": [' % n
        + b"7," * (n - 1)
        + b"7]}]}"
    )
    assert BODY_LIMIT < len(body) < BODY_LIMIT + 2**20
    restarts = {c: stack.inspect(c)["RestartCount"] for c in stack.containers(REPLICA)}
    status, answer = post(
        stack.http_port,
        {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            INFER_KEY_HEADER: stack.infer_key,
        },
        body,
    )
    assert status == 413, answer[
        :500
    ]  # from the proxy: Triton 2.51 has no size limit and never says 413
    # A body of unknown length cannot be bounded before it is forwarded: 411.
    status, answer = post(
        stack.http_port,
        {
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            INFER_KEY_HEADER: stack.infer_key,
        },
        b"2\r\n{}\r\n0\r\n\r\n",
    )
    assert status == 411, answer[:500]
    # Just under the bound is forwarded: Triton answers this one itself, with its JSON error (the data is shorter
    # than the declared shape; Triton 2.51 says 500), where the proxy's refusals are HTML or text.
    small = body[: BODY_LIMIT - 100].rsplit(b",", 1)[0] + b"]}]}"
    status, answer = post(
        stack.http_port,
        {
            "Content-Type": "application/json",
            "Content-Length": str(len(small)),
            INFER_KEY_HEADER: stack.infer_key,
        },
        small,
    )
    assert status not in (411, 413) and b"content-type: application/json" in answer.lower(), answer[
        :500
    ]
    # Every replica is still up, unrestarted, checked UP by the proxy, and serves.
    assert {c: stack.inspect(c)["RestartCount"] for c in stack.containers(REPLICA)} == restarts
    assert all(
        stack.inspect(c)["State"]["Health"]["Status"] == "healthy"
        for c in stack.containers(REPLICA)
    )
    assert all(len(a) == REPLICAS for a in up(stack.stats).values())
    step(stack, "http", 7, start=True, end=True, key="after-413")


def test_bench_scale_measures_direct_and_proxied_side_by_side(images, shipped_repo, tmp_path):
    """`make bench-scale`'s code path, small: one replica direct and behind the proxy, the table and JSON."""
    from bench.scale import main

    flags = ["--replicas", "1", "--sequences", "4", "--length", "10", "--repo", str(shipped_repo)]
    assert main([*flags, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "scale.json").read_text())
    assert [r["config"] for r in report["rows"]] == ["direct", "proxy, 1 replica(s)"]
    assert all(
        r["chars_per_s"] > 0 and r["cpu_pct_of_machine"]["client"] > 0 for r in report["rows"]
    )
    proxied = report["rows"][1]["cpu_pct_of_machine"]
    # where the CPU went, measured (the proxy's share of 40 requests can be under one clock tick)
    assert proxied["triton-replica"] > 0 and proxied["proxy"] >= 0, proxied
    assert "| proxy, 1 replica(s) |" in (tmp_path / "scale.md").read_text()
    assert main(["--replicas", "9"]) == 2  # haproxy.cfg has 8 slots

"""N Triton replicas behind HAProxy (compose profile `scale`, serve/haproxy.cfg, docs/scaling.md), for real.

The proxy's image accepts the config (`haproxy -c`); the services are hardened as compose resolves them; with 3
replicas the proxy finds all of them through Docker's DNS and checks them UP; generation through it over gRPC
and HTTP equals TensorFlow, on the python backend and on Triton's ONNX Runtime backend (charrnn_onnx: Triton
keeps each sequence's state on its replica); one x-sequence-key stays on one replica while different keys
spread over all three (counted on each replica's own /metrics); an HTTP body over the proxy's bound gets 413
and no replica sees it; the proxy's request checks (docs/failures.md, "At the proxy"): JSON tensor data, shapes
outside the contract and every caller's mistake that Triton 2.51 answers 500/501 get 400, a live sequence next to
a refused huge shape goes on, and two misleading gRPC status codes are corrected.

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

from charrnn import deployment
from charrnn.contract import INFER_KEY_HEADER, ROUTING_HEADER
from charrnn.repository import ONNX, PYTHON, SHARED_CPU_MODELS
from charrnn.sampling import SamplingParams
from serve.local_triton import free_port
from serve.scale import BACKENDS, servers, stats_url, up, wait_for_replicas
from tests.helpers import ROOT, ComposeStack, docker_or_skip, tf_text

PROXY, REPLICA = "proxy", "triton-replica"
REPLICAS = 3
SLOTS = deployment.REPLICA_SLOTS  # server-template replica <slots> in serve/haproxy.cfg
PROXY_IMAGE = str(deployment.IMAGES["proxy"])
MODEL = PYTHON
BODY_LIMIT = 16 * 2**20  # serve/haproxy.cfg: deny ... 413 if content-length > 16777216
# Each replica's Prometheus metrics, read inside it (replicas publish no port).
METRICS = (
    "import urllib.request as u; "
    f"print(u.urlopen('http://127.0.0.1:{deployment.CONTAINER_PORTS.metrics}/metrics', timeout=5)"
    ".read().decode())"
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
        PROXY_IMAGE,
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
        PROXY_IMAGE,
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
    # The ports serve/haproxy.cfg binds: the main server's HTTP and gRPC (the proxy takes its place), and stats.
    main = deployment.MAIN.ports
    assert sorted(p["target"] for p in proxy["ports"]) == sorted(
        [main.http, main.grpc, deployment.PROXY_STATS_PORT]
    )
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
    # the project's entrypoint: every flag (--model-control-mode=none among them) is in serve/tritonserver.sh
    assert replica["command"] == [deployment.ENTRYPOINT]
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
    for backend, port in zip(
        BACKENDS, (deployment.CONTAINER_PORTS.http, deployment.CONTAINER_PORTS.grpc)
    ):
        rows = table[backend]
        assert sorted(rows) == sorted(f"replica{i}" for i in range(1, SLOTS + 1))
        assert sorted(r["addr"] for r in rows.values() if r["status"] == "UP") == sorted(
            f"{ip}:{port}" for ip in addresses
        ), rows
        assert sorted(r["status"] for r in rows.values() if r["status"] != "UP") == [
            "MAINT (resolution)"
            # the empty template slots
        ] * (SLOTS - REPLICAS)
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
    from client.generate import complete

    url = stack.grpc_url if protocol == "grpc" else stack.http_url
    conn = Connection(url, protocol, infer_key=stack.infer_key, shards=shards)
    try:
        model = conn.pick_model(model)
        vocab = conn.vocabulary(model)
        seqs = complete(conn, model, vocab, prompts, length, SamplingParams(greedy=True))
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


BINARY_HEADER = (
    "Inference-Header-Content-Length"  # the binary tensor data extension (tritonclient.http)
)


def binary_header(
    shape: str = "[1, 1]",
    sequence_id: str = "7",
    size: int = 4,
    extra_input: str = "",
    extra_parameters: str = "",
) -> bytes:
    """The JSON header of a binary request for INPUT_IDS, written by hand (tritonclient would not send these)."""
    return (
        '{"inputs": [{"name": "INPUT_IDS", "shape": %s, "datatype": "INT32", '
        '"parameters": {"binary_data_size": %d}%s}], '
        '"parameters": {"sequence_id": %s, "sequence_start": true, "sequence_end": true%s}}'
        % (shape, size, extra_input, sequence_id, extra_parameters)
    ).encode()


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
    # from the proxy: Triton 2.51 has no size limit and never says 413
    assert status == 413, answer[:500]
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
    # Just under the bound is forwarded: Triton answers this one itself, with its JSON error (the binary data is
    # longer than the declared shape: 400 "input byte size mismatch"), where the proxy's refusals are HTML or
    # text. (Binary tensor data: the proxy refuses JSON tensor data for inference, see below.)
    header = binary_header()
    small = header + b"\x07" * (BODY_LIMIT - 100 - len(header))
    status, answer = post(
        stack.http_port,
        {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(small)),
            BINARY_HEADER: str(len(header)),
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


# --- the request checks at the proxy (serve/haproxy.cfg "Inference requests", docs/failures.md) -------------------
def infer_raw(
    stack: Stack,
    body: bytes,
    header_length: int | None = None,
    model: str = MODEL,
    key: str | None = None,
    path: str | None = None,
) -> tuple[int, str, bytes]:
    """One keyed POST to /v2/models/<model>/infer through the proxy: (status, content type, body). With
    `header_length`, the body is binary tensor data (that header); without, JSON."""
    import http.client

    headers = {INFER_KEY_HEADER: stack.infer_key, "Content-Type": "application/json"}
    if header_length is not None:
        headers[BINARY_HEADER] = str(header_length)
        headers["Content-Type"] = "application/octet-stream"
    if key is not None:
        headers[ROUTING_HEADER] = key
    c = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=60)
    try:
        c.request("POST", path or f"/v2/models/{model}/infer", body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.getheader("content-type", ""), r.read()
    finally:
        c.close()


def json_request(data: list, shape: list | None = None, sequence_id=7) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT_IDS",
                    "shape": shape or [1, len(data)],
                    "datatype": "INT32",
                    "data": data,
                }
            ],
            "parameters": {
                "sequence_id": sequence_id,
                "sequence_start": True,
                "sequence_end": True,
            },
        }
    ).encode()


JSON_DATA_REFUSED = (
    "error: HTTP inference with JSON tensor data: refused by this proxy, Triton 2.51 wraps JSON integers to 32 "
    "bits without an error (send binary tensor data: tritonclient.http's set_data_from_numpy(binary_data=True), "
    "the default)"
)
SHAPE_REFUSED = (
    "error: HTTP inference shape: refused by this proxy, every input has 1 to 3 dims of 0..256"
)


def proxy_pattern(acl: str) -> str:
    """The regular expression of `acl <name> var(txn.infer_json) -m reg '<regex>'` in serve/haproxy.cfg."""
    text = (ROOT / "serve" / "haproxy.cfg").read_text()
    m = re.search(rf"^\s*acl {acl}\s+var\(txn\.infer_json\) -m reg '([^']+)'$", text, re.MULTILINE)
    assert m, f"acl {acl} not found in serve/haproxy.cfg"
    return m.group(1)


def test_the_proxys_shape_bound_is_the_contracts(shipped_contract_vocab):
    """The proxy refuses a header whose "shape" is not 1..R dims of 0..D; R and D must be the contract's: the
    highest rank of any input and its largest legitimate dim (MAX_T, MAX_K, the vocabulary, batch 1 per
    sequence request). Fails when charrnn/contract.py's maxima move past the pattern (or it drifts above them).
    """
    from charrnn.contract import MAX_K, MAX_T, STATE_IN

    contract, vocab = shipped_contract_vocab
    # What clients send (STATE_IN is the graphs' own: Triton's implicit state, or the python model's).
    rank = max(len(shape) for name, (_, shape) in contract.gen_inputs().items() if name != STATE_IN)
    largest = max(MAX_T, MAX_K, len(vocab), 1)
    refused = re.compile(proxy_pattern("header_shape"))

    def ok(dims: str) -> bool:
        return not refused.search(f'{{"shape": [{dims}]}}')

    for r in range(1, rank + 1):
        for d in (0, 1, 9, 10, 65, 99, 100, 199, largest - 1, largest):
            assert ok(", ".join([str(d)] * r)), (r, d)
        assert not ok(", ".join(["1"] * (r - 1) + [str(largest + 1)])), r
    assert ok(f"1,{largest},{len(vocab)}") and ok(f" 1 , {MAX_T} ")  # NOISE (1, K, V); spaces
    for bad in (
        "",
        ", ".join(["1"] * (rank + 1)),
        "1, 1099511627776",
        "-1, 1",
        "1.0, 1",
        "1e2",
        '"1"',
        "01",
    ):
        assert not ok(bad), bad
    # sequence_id: an integer of at most 19 digits (all of 0..2^63 - 1) or a string; no sign, fraction, exponent
    seq = re.compile(proxy_pattern("header_seq_bad"))
    for good in ("7,", str(2**63 - 1) + "}", '"k:1",', str(10**19 - 1) + " ,"):
        assert not seq.search(f'"sequence_id": {good}'), good
    for bad in (str(2**64) + ",", "-1,", "1.5,", "true,", "1e3,", "null}", "07,"):
        assert seq.search(f'"sequence_id": {bad}'), bad


def test_http_json_tensor_data_gets_400_not_a_wrapped_answer(stack):
    """Triton 2.51 answers 2^32 + 30 as id 30 (200, the logits of 30). Through the proxy: 400, the reason in
    text, for JSON tensor data (any value) and for a binary request whose JSON header still carries "data";
    no replica answers any of them."""
    before = stack.requests_served()
    for value in (2**32 + 30, -(2**32) + 30, 2**40 + 30, 30):
        status, ctype, body = infer_raw(stack, json_request([value]))
        assert (status, ctype) == (400, "text/plain"), (value, status, body[:300])
        assert body.decode() == JSON_DATA_REFUSED
    # the versioned path too
    status, _, body = infer_raw(
        stack, json_request([2**32 + 30]), path=f"/v2/models/{MODEL}/versions/1/infer"
    )
    assert status == 400 and body.decode() == JSON_DATA_REFUSED, body[:300]
    # binary header with a JSON "data" next to binary_data_size, plainly or with the key \u-escaped
    for extra in (', "data": [4294967326]', ', "d\\u0061ta": [4294967326]'):
        header = binary_header(extra_input=extra)
        status, _, body = infer_raw(stack, header + b"\x1e\0\0\0", header_length=len(header))
        assert status == 400 and body.startswith(b"error: HTTP inference"), body[:300]
    assert stack.requests_served() == before
    # the same request as binary tensor data (what tritonclient.http sends) is served
    header = binary_header()
    status, _, body = infer_raw(stack, header + b"\x1e\0\0\0", header_length=len(header))
    assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 65], body[:300]


def test_a_huge_declared_shape_gets_400_and_a_live_sequence_next_to_it_continues(stack, shipped):
    """`"shape": [1, 2^40], "data": [1]` aborted tritonserver 2.51 (std::bad_alloc). Sent with the routing key
    of a live sequence (so on its replica) between two of its requests: 400 from the proxy, as JSON and as a
    binary header, with any dim or rank outside the contract; every replica stays up, unrestarted, and the
    sequence goes on to TensorFlow's text. The largest legitimate request (charrnn_gen_python, 256 ids,
    NOISE 1 x 256 x 65) still passes."""
    import tritonclient.http as th

    from charrnn.contract import MAX_K, MAX_T

    model, vocab = shipped
    prompt, length = "ROMEO:\n", 40
    want = tf_text(shipped, prompt, length, SamplingParams(greedy=True))
    restarts = {c: stack.inspect(c)["RestartCount"] for c in stack.containers(REPLICA)}
    key, sid = f"live-{secrets.token_hex(4)}", int.from_bytes(secrets.token_bytes(6), "big")
    client = th.InferenceServerClient(stack.http_url)
    headers = {ROUTING_HEADER: key, INFER_KEY_HEADER: stack.infer_key}

    def feed(ids: list[int], start: bool) -> int:
        x = th.InferInput("INPUT_IDS", [1, len(ids)], "INT32")
        x.set_data_from_numpy(np.array([ids], np.int32))
        r = client.infer(MODEL, [x], sequence_id=sid, sequence_start=start, headers=headers)
        return int(np.argmax(r.as_numpy("LOGITS")[0]))

    try:
        generated = [feed([int(i) for i in vocab.encode(prompt)], start=True)]
        for _ in range(length // 2 - 1):
            generated.append(feed([generated[-1]], start=False))
        huge = [
            json_request([1], shape=[1, 2**40]),  # the reported crash: JSON, refused for its data
        ]
        for body in huge:
            status, _, answer = infer_raw(stack, body, key=key)
            assert status == 400 and answer.decode() == JSON_DATA_REFUSED, answer[:300]
        for shape in (
            "[1, 1099511627776]",
            f"[1, {MAX_T + 1}]",
            "[1, 1, 1, 1]",
            "[-1, 1]",
            "[1.5, 1]",
        ):
            header = binary_header(shape=shape)
            status, _, answer = infer_raw(stack, header + b"\1\0\0\0", len(header), key=key)
            assert status == 400 and answer.decode().startswith(SHAPE_REFUSED), (
                shape,
                answer[:300],
            )
        for _ in range(length - len(generated)):
            generated.append(feed([generated[-1]], start=False))
    finally:
        client.close()
    assert vocab.decode(generated) == want
    assert {c: stack.inspect(c)["RestartCount"] for c in stack.containers(REPLICA)} == restarts
    assert all(len(a) == REPLICAS for a in up(stack.stats).values())
    # The largest legitimate request: 256 ids, NOISE of K = 256 rows of 65 (binary, 66 KiB), greedy.
    gen = th.InferenceServerClient(stack.http_url)
    inputs = []
    for name, value in (
        ("INPUT_IDS", np.full((1, MAX_T), 3, np.int32)),
        ("NOISE", np.full((1, MAX_K, len(vocab)), 0.5, np.float32)),
        ("TEMPERATURE", np.zeros((1, 1), np.float32)),
        ("TOP_K", np.zeros((1, 1), np.int32)),
    ):
        x = th.InferInput(name, list(value.shape), "INT32" if value.dtype == np.int32 else "FP32")
        x.set_data_from_numpy(value)
        inputs.append(x)
    try:
        r = gen.infer(
            "charrnn_gen_python",
            inputs,
            sequence_id=sid + 1,
            sequence_start=True,
            sequence_end=True,
            headers={INFER_KEY_HEADER: stack.infer_key},
        )
        assert r.as_numpy("OUTPUT_IDS").shape == (1, MAX_K)
    finally:
        gen.close()


# (name, body, header length or None for JSON, model): each a caller's mistake that Triton 2.51 answers 500/501.
CALLER_MISTAKES = [
    *[
        (f"sequence_id {v}", binary_header(sequence_id=v) + b"\x1e\0\0\0", True, MODEL)
        for v in (str(2**64), "-1", "1.5")
    ],
    *[
        (f"JSON value {v}", json_request([v], shape=[1, 1]), None, MODEL)
        for v in (30.7, "30", True, 2**64 - 1)
    ],
    ("JSON shape [1, 2] for 1 value", json_request([1], shape=[1, 2]), None, MODEL),
    (
        'sequence_start "yes"',
        binary_header(extra_parameters=', "sequence_start": "yes"').replace(
            b'"sequence_start": true, ', b""
        )
        + b"\x1e\0\0\0",
        True,
        MODEL,
    ),
    (
        "sequence_id of 129 characters",
        binary_header(sequence_id='"%s"' % ("a" * 129)) + b"\x1e\0\0\0",
        True,
        MODEL,
    ),
    ("header not JSON", b'{"inputs": [1}' + b"\x1e\0\0\0", True, MODEL),
    ("id 99 to the ONNX Runtime model", binary_header() + b"\x63\0\0\0", True, ONNX),
]


@pytest.mark.parametrize(
    "name,body,binary,model", CALLER_MISTAKES, ids=[c[0] for c in CALLER_MISTAKES]
)
def test_caller_mistakes_get_400_not_500(stack, name, body, binary, model):
    """Refused at the proxy (text) or Triton's 500/501 answer made a 400 (Triton's JSON error kept)."""
    header_length = len(body) - 4 if binary else None
    status, ctype, answer = infer_raw(stack, body, header_length=header_length, model=model)
    assert status == 400, (name, status, answer[:300])
    text = answer.decode()
    assert text.startswith("error: ") or json.loads(text)["error"], text


def test_grpc_admin_call_without_key_and_a_long_string_id_get_honest_status_codes(stack):
    """Triton 2.51 answers a gRPC admin call without the admin key with UNAVAILABLE (which clients take for a
    server that is down) and a string sequence id over 128 characters with UNIMPLEMENTED. Both are unary
    trailers-only answers, so the proxy rewrites their status: PERMISSION_DENIED and INVALID_ARGUMENT, the
    message unchanged. Other errors keep their status (an unknown model: NOT_FOUND)."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    c = tg.InferenceServerClient(stack.grpc_url)
    ids = tg.InferInput("INPUT_IDS", [1, 1], "INT32")
    ids.set_data_from_numpy(np.array([[20]], np.int32))
    try:
        for call in (c.get_log_settings, c.get_model_repository_index):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "StatusCode.PERMISSION_DENIED", e.value
            assert e.value.message() == (
                "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
            )
        with pytest.raises(InferenceServerException) as e:
            c.infer(MODEL, [ids], sequence_id="a" * 129, sequence_start=True, sequence_end=True)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
        assert e.value.message() == "string correlation ID cannot be longer than 128 characters"
        c.infer(MODEL, [ids], sequence_id="a" * 128, sequence_start=True, sequence_end=True)
        with pytest.raises(InferenceServerException) as e:
            c.infer("no_such_model", [ids])
        assert e.value.status() == "StatusCode.NOT_FOUND", e.value
    finally:
        c.close()


def scaled_to(stack: Stack, replicas: int) -> None:
    """`docker compose up --scale` the stack's replicas to exactly `replicas`, each backend of the proxy with
    exactly that many UP (the others' slots empty)."""
    r = stack.compose("up", "-d", "--wait", "--scale", f"{REPLICA}={replicas}", PROXY, REPLICA)
    assert r.returncode == 0, r.stderr
    deadline, seen = time.monotonic() + 60, None
    while (seen := up(stack.stats)) and any(len(a) != replicas for a in seen.values()):
        assert (
            time.monotonic() < deadline
        ), f"not {replicas} replica(s) UP in the proxy after 60 s: {seen}"
        time.sleep(0.5)  # polling HAProxy's table with a deadline


def test_at_capacity_is_429_over_http_and_resource_exhausted_over_grpc(stack):
    """A replica whose sequence slots are all held (one careless client's STARTs): a START sent with Triton's
    request timeout is answered "at capacity" within about a second, as 429 over HTTP and RESOURCE_EXHAUSTED over
    unary gRPC (Triton says 503 / UNAVAILABLE, which reads as "server down"). The stack runs one replica for this
    test, so every request reaches the full one whatever its key. With three, the test relied on the proxy's
    hash ring (slot -> replica) sending the key where the flood went, and a CI run once saw that key's unary
    START admitted: a health check or DNS answer failing for a moment on a loaded machine re-fills the ring, so
    the key may move. With one replica an admitted START is a real failure. The slots are given back at the end
    (every held sequence ENDed) and the replicas scaled back, so the other tests find the stack as it was.
    """
    import queue

    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    from charrnn.contract import ADMISSION_TIMEOUT_US, CAPACITY_MESSAGE, MAX_SEQUENCES

    key, base, answers = f"full-{secrets.token_hex(4)}", 9_300_000_000, queue.Queue()
    ids = np.array([[30]], np.int32)

    def grpc_input():
        t = tg.InferInput("INPUT_IDS", [1, 1], "INT32")
        t.set_data_from_numpy(ids)
        return t

    def refused(infer, **kwargs) -> InferenceServerException:
        """The error of a START under `key`, asked again while the proxy has no replica UP for a moment."""
        for _ in range(10):
            try:
                infer(sequence_id=base - 2, sequence_start=True, **kwargs)
            except InferenceServerException as error:
                if CAPACITY_MESSAGE in (error.message() or "") or error.status() not in (
                    "503",
                    "StatusCode.UNAVAILABLE",
                ):
                    return error
                print(f"no replica answered ({error}); asking again once it is UP")
                assert wait_for_replicas(1, stack.stats, timeout=60) == 0
            else:
                pytest.fail("a START found a free slot on the full replica")
        pytest.fail("10 STARTs, no replica answered")

    scaled_to(stack, 1)
    flood = tg.InferenceServerClient(stack.grpc_url)
    flood.start_stream(
        callback=lambda result, error: answers.put(error), headers={ROUTING_HEADER: key}
    )
    try:
        for i in range(MAX_SEQUENCES):
            flood.async_stream_infer(
                MODEL, [grpc_input()], sequence_id=base + i, sequence_start=True
            )
        for _ in range(MAX_SEQUENCES):
            assert answers.get(timeout=120) is None

        unary = tg.InferenceServerClient(stack.grpc_url)
        error = refused(
            unary.infer,
            model_name=MODEL,
            inputs=[grpc_input()],
            timeout=ADMISSION_TIMEOUT_US,
            headers={ROUTING_HEADER: key},
        )
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
        assert error.message() == CAPACITY_MESSAGE

        http = th.InferenceServerClient(stack.http_url, network_timeout=60)
        http_input = th.InferInput("INPUT_IDS", [1, 1], "INT32")
        http_input.set_data_from_numpy(ids)
        t0 = time.monotonic()
        error = refused(
            http.infer,
            model_name=MODEL,
            inputs=[http_input],
            timeout=ADMISSION_TIMEOUT_US,
            headers={ROUTING_HEADER: key, INFER_KEY_HEADER: stack.infer_key},
        )
        assert error.status() == "429" and CAPACITY_MESSAGE in error.message(), error
        assert time.monotonic() - t0 < 10
    finally:
        for i in range(MAX_SEQUENCES):  # give the slots back
            flood.async_stream_infer(MODEL, [grpc_input()], sequence_id=base + i, sequence_end=True)
        for _ in range(MAX_SEQUENCES):
            answers.get(timeout=120)
        flood.stop_stream()
        flood.close()
        scaled_to(stack, REPLICAS)
    # the replicas take sequences again
    step(stack, "grpc", base - 3, start=True, end=True, key=key)


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

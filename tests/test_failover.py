"""Failover behind the proxy (compose profile `scale`, docs/scaling.md): real replicas killed, paused and scaled
while the client generates, and every final text equal to the single-server text.

The client (client/generate.py) routes with its own keys (--shards: K gRPC streams; HTTP: a key per sequence),
re-primes only the sequences of a broken stream, and names every re-primed sequence "<key>:<epoch>". The stale
state test runs twice: with the epochs, and with them removed (a re-prime that keeps its id), to show that then
a replica coming back with an old state continues it silently.

Needs Docker (see tests/test_scale.py). Its own compose project, 3 replicas.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from charrnn.deployment import CONTAINER_PORTS, PROXY_BACKENDS
from charrnn.repository import PYTHON
from charrnn.sampling import SamplingParams
from serve.scale import servers, up, wait_for_replicas
from tests.helpers import served, wait_for
from tests.test_scale import (
    PROXY,
    REPLICA,
    Stack,
    images,  # noqa: F401  (a fixture this module uses too)
    scale_stack,
    sh,
)

REPLICAS = 3
PROMPTS = [
    "ROMEO:\n",
    "JULIET:\n",
    "KING HENRY VI:\nO",
    "First Citizen:\n",
    "MENENIUS:\n",
    "O, ",
    "A",
    "HAMLET:\n",
]


def seeded(n: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.9, top_k=20, seed=100 + i) for i in range(n)]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


@pytest.fixture(scope="module")
def stack(images, shipped_repo):  # noqa: F811 (images: the fixture imported above)
    with scale_stack(images, shipped_repo, "charrnn-failover") as s:
        yield s


def scale(s: Stack, n: int, env: dict | None = None) -> None:
    """`up --scale` to n replicas (also starts or recreates the proxy), then wait until the proxy sees exactly n
    UP in every backend (after a scale-down the removed replica stays UP until its health checks fail).
    """
    if env:
        s.env.update(env)
    r = s.compose("up", "-d", "--wait", "--scale", f"{REPLICA}={n}", PROXY, REPLICA)
    assert r.returncode == 0, r.stderr
    assert wait_for_replicas(n, s.stats, timeout=90) == 0
    wait_for(
        lambda: all(len(addresses) == n for addresses in up(s.stats).values()),
        60,
        f"the proxy to see exactly {n} replicas UP in every backend (HAProxy's stats)",
        period=0.5,
    )


def up_addresses(s: Stack) -> set[str]:
    return {
        row["addr"]
        for row in servers(s.stats)[PROXY_BACKENDS["http"]].values()
        if row["status"] == "UP"
    }


def open_grpc_streams(s: Stack) -> int:
    """gRPC streams the proxy holds open to the replicas now (HAProxy's stats: scur of triton_grpc's servers)."""
    return sum(int(row["scur"] or 0) for row in servers(s.stats)[PROXY_BACKENDS["grpc"]].values())


def address(s: Stack, container: str) -> str:
    networks = s.inspect(container)["NetworkSettings"]["Networks"]
    return f"{next(iter(networks.values()))['IPAddress']}:{CONTAINER_PORTS.http}"


def run(s: Stack, n: int, length: int, protocol: str, shards: int, on_text=None, messages=None):
    """(texts, sequences) of n seeded sequences through the proxy, with retries."""
    from client.connection import Connection
    from client.generate import RetryPolicy, complete

    url = s.grpc_url if protocol == "grpc" else s.http_url
    conn = Connection(url, protocol, infer_key=s.infer_key, shards=shards)
    try:
        vocab = conn.vocabulary(PYTHON)
        seqs = complete(
            conn,
            PYTHON,
            vocab,
            prompts(n),
            length,
            seeded(n),
            on_text=on_text,
            retry=RetryPolicy(retries=20, delay=0.2, max_delay=2.0, max_wait=180),
            on_retry=(messages.append if messages is not None else None),
        )
    finally:
        conn.close()
    return [vocab.decode(q.generated) for q in seqs], seqs


@pytest.fixture(scope="module")
def reference(server):
    """Single-server texts (the local server, no proxy) of the same seeded sequences."""
    cache = {}

    def get(n: int, length: int) -> list[str]:
        if (n, length) not in cache:
            cache[n, length] = served(server, prompts(n), length, seeded(n))
        return cache[n, length]

    return get


def test_affinity_24_grpc_and_4_http_sequences_equal_single_server_and_use_every_replica(
    stack, reference
):
    before = stack.requests_served()
    results = {}

    def http():
        results["http"] = run(stack, 4, 150, "http", shards=2)[0]

    thread = threading.Thread(target=http)
    thread.start()
    results["grpc"] = run(stack, 24, 200, "grpc", shards=2 * REPLICAS)[0]
    thread.join(timeout=300)
    assert results["grpc"] == reference(24, 200)
    assert results["http"] == reference(4, 150)
    after = stack.requests_served()
    assert all(after[c] > before.get(c, 0) for c in after) and len(after) == REPLICAS, (
        before,
        after,
        {c[:12]: stack.inspect(c)["RestartCount"] for c in after},
        up_addresses(stack),
    )


def test_hard_failover_reprimes_only_the_killed_replicas_sequences(stack, reference):
    scale(stack, REPLICAS)
    before = stack.requests_served()
    killed, messages = [], []

    def on_text(index, text):
        if not killed and sum(len(t) for t in progress) >= 12 * 60:
            now = stack.requests_served()  # kill a replica that serves some of the streams
            victim = max(now, key=lambda c: now[c] - before.get(c, 0))
            pid = stack.pids(victim, "tritonserver")[0]
            killed.append(sh("kill", "-KILL", str(pid)).returncode)
        progress[index].append(text)

    progress = [[] for _ in range(12)]
    texts, seqs = run(
        stack, 12, 200, "grpc", shards=2 * REPLICAS, on_text=on_text, messages=messages
    )
    assert killed == [0]
    assert texts == reference(12, 200)
    restarted = {q.shard for q in seqs if q.restarts}
    untouched = {q.shard for q in seqs if not q.restarts}
    assert restarted and untouched and not restarted & untouched, (restarted, untouched, messages)
    assert all(m.startswith(("warning: server", "reconnected")) for m in messages), messages
    assert any("(stream " in m for m in messages), messages  # per stream, not the whole connection


@pytest.mark.parametrize("epochs", [True, False], ids=["epochs", "no-epochs"])
def test_stale_state_of_a_paused_replica_is_never_continued(stack, reference, monkeypatch, epochs):
    """Pause a replica until the proxy marks it DOWN (its sequences move and are re-primed elsewhere), go on,
    unpause it until it is UP again (their keys hash back to it, where the old state still waits), go on.
    With epochs the old replica does not know the new ids and the client re-primes: every text is right.
    Without (a re-prime keeping its id) the old replica continues the stale state: some text must differ.
    """
    from client import generate as g

    if not epochs:
        original = g.Sequence.reprime

        def keep_id(self, sequence_id=None, max_t=g.MAX_T):
            same = self.sequence_id
            original(self, sequence_id, max_t)
            self.sequence_ids.pop()
            self.sequence_id = same  # the epoch scheme removed: the same id again

        monkeypatch.setattr(g.Sequence, "reprime", keep_id)
    scale(stack, REPLICAS)
    before = stack.requests_served()
    messages: list[str] = []
    n, length = 9, 160
    at = SimpleNamespace(chars=0, steps=[], victim=None, address=None)

    def on_text(index, text):
        at.chars += len(text)
        if not at.steps and at.chars >= n * 50:
            at.steps.append("pause")
            # pause the replica that serves the most of these sequences
            now = stack.requests_served()
            at.victim = max(now, key=lambda c: now[c] - before.get(c, 0))
            at.address = address(stack, at.victim)
            assert sh("docker", "pause", at.victim).returncode == 0
            wait_for(lambda: at.address not in up_addresses(stack), 30, "the proxy to mark it DOWN")
        elif at.steps == ["pause"] and at.chars >= n * 100:
            at.steps.append("unpause")
            assert sh("docker", "unpause", at.victim).returncode == 0
            wait_for(lambda: at.address in up_addresses(stack), 30, "the proxy to mark it UP")

    try:
        texts, seqs = run(stack, n, length, "http", shards=2, on_text=on_text, messages=messages)
    finally:
        if at.victim:
            sh("docker", "unpause", at.victim)
    assert at.steps == ["pause", "unpause"]
    moved = [q for q in seqs if q.restarts]
    assert moved, f"no sequence was on the paused replica: {messages}"
    if epochs:
        assert texts == reference(n, length), messages
        assert all(q.sequence_id == f"{q.key}:{q.epoch}" for q in seqs)
        assert any(
            q.epoch >= 2 for q in moved
        ), "came back to the old replica and was re-primed again"
    else:
        assert texts != reference(
            n, length
        ), f"without epochs the stale state must show: {messages}"


def test_scale_up_and_down_under_load_loses_nothing(stack, reference):
    """2 -> 3 -> 2 replicas while 12 sequences run: the new replica takes some keys, the removed one's streams
    break and their sequences are re-primed; every text equals the single-server one. The client runs at full
    speed while a change is under way, but holds at a third of the text until the first change is done, and at
    two thirds until the second one is: both changes finish while the sequences still run."""
    scale(stack, 2)
    steps, errors = [], []

    def change(n):
        try:
            scale(stack, n)
        except BaseException as e:  # reported below
            errors.append(e)

    def on_text(index, text):
        chars[0] += len(text)
        if not steps and chars[0] >= 12 * 40:
            steps.append(threading.Thread(target=change, args=(3,)))
            steps[-1].start()
        elif len(steps) == 1 and not steps[0].is_alive():
            steps.append(threading.Thread(target=change, args=(2,)))
            steps[-1].start()
        for change_thread, n, hold_at in zip(steps, (3, 2), (12 * 100, 12 * 200)):
            if chars[0] >= hold_at and change_thread.is_alive():
                wait_for(
                    lambda: not change_thread.is_alive(),
                    300,
                    f"the change to {n} replicas (compose up --scale, then the proxy seeing them UP) to "
                    f"finish while the client held at {chars[0]} of {12 * 300} characters",
                    period=0.2,
                )

    chars = [0]
    texts, seqs = run(stack, 12, 300, "grpc", shards=6, on_text=on_text)
    for t in steps:
        t.join(timeout=180)
    assert not errors, errors
    assert (
        len(steps) == 2 and not steps[-1].is_alive()
    ), "both changes started while the sequences ran"
    assert texts == reference(12, 300)


def test_a_stream_idle_past_the_proxys_timeout_is_reprimed_not_continued(stack, reference):
    scale(stack, REPLICAS, env={"HAPROXY_IDLE_TIMEOUT": "2s"})
    try:
        messages, stalled, progress = [], [], [0]

        def on_text(index, text):
            progress[0] += len(text)
            if not stalled and progress[0] >= 4 * 60:
                stalled.append(open_grpc_streams(stack))
                # the client idles (sends nothing) until the proxy's timeout (2 s) has cut its streams
                wait_for(
                    lambda: open_grpc_streams(stack) == 0,
                    30,
                    "the proxy to cut the idle client's gRPC streams (HAPROXY_IDLE_TIMEOUT=2s): HAProxy's "
                    "stats still count streams open to the replicas",
                    period=0.2,
                )

        texts, seqs = run(stack, 4, 150, "grpc", shards=2, on_text=on_text, messages=messages)
        assert texts == reference(4, 150)
        assert (
            stalled and stalled[0] > 0
        ), f"no stream open through the proxy when the client idled: {stalled}"
        assert any(q.restarts for q in seqs), messages
    finally:
        scale(stack, REPLICAS, env={"HAPROXY_IDLE_TIMEOUT": "1h"})

"""Capacity and identity of sequences on a real local Triton, for the python and the ONNX Runtime models.

  - more sequences than slots (charrnn.contract MAX_SEQUENCES), live or abandoned, never hang a client: a START
    that finds no free slot is answered "at capacity" within the admission timeout (ADMISSION_TIMEOUT_US), the
    client says so and exits 3, and sequences already running carry on with the right text;
  - a START under another client's live id is refused by the python models (Triton's implicit state of
    charrnn_onnx cannot refuse it), and the client draws every id at random.
Each test gets its own server (filling every slot would leave the next test without one for 60 s).
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from charrnn.contract import LIVE_ID_MESSAGE, MAX_SEQUENCES, ErrorCode, error_code
from charrnn.repository import ONNX, PYTHON
from tests.helpers import GREEDY, ROOT, RawStream, client_cmd, served, start_server, tf_text

BOTH = pytest.mark.parametrize("model", [PYTHON, ONNX])
# Generous bounds for a loaded 2-core machine; before the admission timeout these waits took 41-57 s (a new
# sequence behind 1,100 abandoned STARTs) or never ended (one client with 1,025 sequences on one stream).
AT_CAPACITY_WITHIN_S = 10.0


@pytest.fixture
def fresh_server(shipped_repo, ort_backend, tmp_path):
    """charrnn_python and charrnn_onnx on one local server of their own."""
    s = start_server(shipped_repo, tmp_path, models=(PYTHON, ONNX))
    yield s
    s.stop()


def flood(server, model: str, n: int) -> RawStream:
    """A careless client: n STARTs on one stream, never continued nor ended, without an admission timeout."""
    stream = RawStream(server.grpc_url, model)
    for i in range(n):
        stream.send(f"flood{i}", [[30]], 7_000_000_000 + i, start=True)
    return stream


def wait_for_answers(stream: RawStream, n: int, timeout: float = 60.0) -> None:
    """Until the first n STARTs (the ones that got a slot) are answered."""
    for i in range(n):
        stream.logits(f"flood{i}", timeout=timeout)


@BOTH
def test_one_client_with_more_sequences_than_slots_is_told_at_capacity_at_once(
    fresh_server, shipped, model
):
    from client.generate import GenerationFailed

    t0 = time.perf_counter()
    with pytest.raises(GenerationFailed) as failed:
        served(fresh_server, ["A"] * (MAX_SEQUENCES + 1), 20, GREEDY, model=model)
    elapsed = time.perf_counter() - t0
    assert "at capacity" in failed.value.message(), failed.value.message()
    assert failed.value.exit_code == 3
    assert elapsed < AT_CAPACITY_WITHIN_S, f"told after {elapsed:.1f} s"
    # The client ended the sequences it had started: the slots are free again at once.
    assert served(fresh_server, ["ROMEO:\n"], 80, GREEDY, model=model) == [
        tf_text(shipped, "ROMEO:\n", 80, GREEDY)
    ]


@BOTH
def test_abandoned_starts_neither_stall_a_live_sequence_nor_hang_a_new_one(
    fresh_server, shipped, model
):
    length, started, result = 3000, threading.Event(), {}

    def on_text(index: int, text: str) -> None:
        result["chars"] = result.get("chars", 0) + len(text)
        if result["chars"] >= 100:
            started.set()

    def bystander() -> None:
        try:
            result["text"] = served(
                fresh_server, ["KING:\n"], length, GREEDY, model=model, on_text=on_text
            )[0]
        except Exception as e:  # reported by the assertion below
            result["error"] = e
            started.set()

    thread = threading.Thread(target=bystander)
    thread.start()
    assert started.wait(60), "the live sequence did not start"
    stream = flood(fresh_server, model, MAX_SEQUENCES + 76)  # 1 slot is the bystander's
    try:
        wait_for_answers(stream, MAX_SEQUENCES - 1)
        t0 = time.perf_counter()
        cli = subprocess.run(
            [*client_cmd(fresh_server, "--prompt", "A", "--length", "5"), "--model", model],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.perf_counter() - t0
        assert cli.returncode == 3, cli.stderr
        assert "at capacity" in cli.stderr and "retry later" in cli.stderr, cli.stderr
        assert elapsed < AT_CAPACITY_WITHIN_S + 5, f"told after {elapsed:.1f} s"
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert result["text"] == tf_text(shipped, "KING:\n", length, GREEDY)
    finally:
        stream.close()


def test_a_start_under_a_live_id_is_refused_and_the_owner_keeps_its_text(fresh_server, shipped):
    """Client B's START under client A's live id: B gets the error, A's greedy text stays TensorFlow's (before:
    B was answered OK and A's text diverged silently at character 45)."""
    from client.generate import new_sequence_ids

    owner_id, length, hit, seen = new_sequence_ids(1)[0], 400, threading.Event(), []

    def on_text(index: int, text: str) -> None:
        seen.append(text)
        if len(seen) == 45:
            intruder = RawStream(fresh_server.grpc_url, PYTHON)
            try:
                intruder.send("b", [[30]], owner_id, start=True)
                seen.append(intruder.error(timeout=30))
            finally:
                intruder.close()
            hit.set()

    text = served(
        fresh_server,
        ["ROMEO:\n"],
        length,
        GREEDY,
        model=PYTHON,
        sequence_ids=[owner_id],
        on_text=on_text,
    )[0]
    assert hit.is_set()
    refusal = seen[45]
    assert f"sequence {owner_id}: {LIVE_ID_MESSAGE}" in refusal, refusal
    assert error_code(refusal) == ErrorCode.SEQUENCE_ID_IN_USE, refusal
    assert text == tf_text(shipped, "ROMEO:\n", length, GREEDY)


def test_the_client_draws_every_sequence_id_at_random():
    """Numbered ids (a random base + 0, 1, 2, ...) let anyone who sees one id reach the others' sequences."""
    from client.generate import new_sequence_ids

    ids = sorted(new_sequence_ids(64))
    assert len(set(ids)) == 64 and all(1 <= i < 2**63 for i in ids)
    gaps = [b - a for a, b in zip(ids, ids[1:])]
    # 64 uniform draws from 2^63 values: a gap under 2^32 has probability ~2^-20 (numbered ids: every gap is 1).
    assert min(gaps) > 2**32, min(gaps)

"""The served python models (model_repository/charrnn_python, charrnn_gen_python: serve.runtime.sequence_state,
serve.runtime.gen_serving inside Triton's python backend) at their boundary, through a real local Triton server:

  - bad input: an error for that request only (the caller's status: INVALID_ARGUMENT / HTTP 400), in a busy
    batch, naming the sequence, and the sequence's state untouched;
  - the sequence lifecycle: unknown sequences, idle eviction, id reuse after END, a client killed without END;
  - every sequence keeps its own state: batched together, on two instances, more sequences than the batch.
No fixed sleeps: every wait polls a condition under a deadline.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from charrnn import repository
from charrnn.contract import (
    INFER_KEY_HEADER,
    INPUT_IDS,
    MAX_K,
    ErrorCode,
    error_code,
    error_sequence,
)
from charrnn.repository import PYTHON
from charrnn.sampling import SamplingParams
from tests.helpers import (
    GREEDY,
    ROOT,
    SHORT_IDLE_US,
    RawStream,
    chunked,
    client_cmd,
    evictions,
    ids_of,
    inference_count,
    log_size,
    served,
    start_server,
    wait_for,
)

# --- 1. bad input at the served model boundary --------------------------------------------------------
V = 65  # vocabulary size of the shipped model (checked in the test)
BAD_REQUESTS = [  # name, array, Triton dtype, what the error must say (Triton's or the model's own check)
    (
        "INT64 ids",
        np.array([[1, 2, 3]], np.int64),
        "INT64",
        rf"data-type is 'INT64', but model '{PYTHON}' expects 'INT32'",
    ),
    (
        "FP32 ids",
        np.array([[1.0, 2.0]], np.float32),
        "FP32",
        rf"data-type is 'FP32', but model '{PYTHON}' expects 'INT32'",
    ),
    (
        "1-D ids",
        np.array([1, 2, 3], np.int32),
        "INT32",
        r"unexpected shape for input 'INPUT_IDS'.*got \[3\]",
    ),
    (
        "3-D ids",
        np.array([[[1, 2, 3]]], np.int32),
        "INT32",
        r"unexpected shape for input 'INPUT_IDS'.*got \[1,1,3\]",
    ),
    ("batch of 2", np.array([[1, 2], [3, 4]], np.int32), "INT32", r"must specify batch-size 1"),
    (
        "negative id",
        np.array([[1, -5, 3]], np.int32),
        "INT32",
        r"sequence {seq}: INPUT_IDS: ids must be in 0\.\.64, got -5\.\.3",
    ),
    (
        "id == V",
        np.array([[1, V, 3]], np.int32),
        "INT32",
        r"sequence {seq}: INPUT_IDS: ids must be in 0\.\.64, got 1\.\.65",
    ),
    (
        "huge id",
        np.array([[2**31 - 1]], np.int32),
        "INT32",
        r"sequence {seq}: INPUT_IDS: ids must be in 0\.\.64",
    ),
    (
        "T = 0",
        np.ones((1, 0), np.int32),
        "INT32",
        r"sequence {seq}: INPUT_IDS: shape must be \[1, T\] with 1 <= T <= 256, got \[1, 0\]",
    ),
    (
        "T = MAX_T + 1",
        np.ones((1, 257), np.int32),
        "INT32",
        r"sequence {seq}: INPUT_IDS: shape must be \[1, T\] with 1 <= T <= 256, got \[1, 257\]",
    ),
]


def test_bad_requests_fail_alone_in_a_busy_batch_and_keep_the_sequence_state(server):
    """Good greedy sequences run on one stream while, on the SAME stream, each bad request goes to a started
    'victim' sequence: it gets its own error, the good texts equal their solo runs, and the victim's next good
    request gives the logits of a clean sequence that never saw the bad request."""
    from charrnn.contract import MAX_T

    assert MAX_T == 256
    prompts = ["ROMEO:\n", "JULIET:\n", "HAMLET:\n", "KING LEAR:\n"]
    max_steps = 5000  # the good sequences run until the bad requests are all done (bounded)
    prime, follow = ids_of(server, "First Citizen:\nBefore we"), ids_of(server, " p")
    prompt_ids = [ids_of(server, p) for p in prompts]

    stream = RawStream(server.grpc_url)
    base = 7_000_000_000 + int(time.time()) % 1_000_000 * 1000
    good_ids = [base + i for i in range(len(prompts))]
    texts: list[list[int]] = [[] for _ in prompts]
    started, bad_done = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def run_good():  # greedy; one request in flight per sequence, all on the shared stream
        try:
            for i in range(len(prompts)):
                stream.send(f"g{i}/0", prompt_ids[i], good_ids[i], start=True)
            finishing = False
            for step in range(max_steps):
                for i in range(len(prompts)):
                    texts[i].append(int(np.argmax(stream.logits(f"g{i}"))))
                if finishing:
                    return
                if step == 20:
                    started.set()
                finishing = (bad_done.is_set() and step >= 50) or step == max_steps - 2
                for i in range(len(prompts)):
                    stream.send(f"g{i}/{step + 1}", [[texts[i][-1]]], good_ids[i], end=finishing)
        except BaseException as e:  # reported below
            failure.append(e)
        finally:
            started.set()

    good = threading.Thread(target=run_good, daemon=True)
    good.start()
    try:
        assert started.wait(120), "good sequences did not start"
        clean_seq = base + 50
        stream.send("clean/0", prime, clean_seq, start=True)
        stream.logits("clean")
        stream.send("clean/1", follow, clean_seq, end=True)
        clean = stream.logits("clean")
        outcomes = {}
        for k, (name, array, dtype, pattern) in enumerate(BAD_REQUESTS):
            victim = base + 100 + k
            stream.send(f"v{k}/0", prime, victim, start=True)
            stream.logits(f"v{k}")
            stream.send(f"v{k}/bad", array, victim, dtype=dtype)
            error = stream.error()
            stream.send(f"v{k}/1", follow, victim, end=True)
            after = stream.logits(f"v{k}")
            outcomes[name] = (error, after)
            assert not any(
                str(g) in error for g in good_ids
            ), f"{name}: error names a good sequence: {error}"
            assert re.search(pattern.format(seq=victim), error), f"{name}: unclear error {error!r}"
            np.testing.assert_allclose(
                after,
                clean,
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{name}: the failed request changed sequence {victim}'s state",
            )
        assert (
            good.is_alive()
        ), f"the good sequences ended before the bad requests were all sent {[str(e) for e in failure]}"
        bad_done.set()
        good.join(timeout=300)
        assert not failure, f"a good sequence failed: {failure[0]!r}"
        assert stream.errors.empty(), f"unexpected extra errors: {list(stream.errors.queue)}"
    finally:
        stream.close()
    from client.connection import Connection

    conn = Connection(server.grpc_url)
    vocab = conn.vocabulary(PYTHON)
    conn.close()
    assert len(vocab) == V
    length = len(texts[0])
    assert 50 < length < max_steps and all(len(t) == length for t in texts)
    greedy = SamplingParams(greedy=True)
    solo = [served(server, [p], length, [greedy])[0] for p in prompts]
    assert [
        vocab.decode(t) for t in texts
    ] == solo, "a good sequence's text changed next to the bad requests"
    assert server.process.poll() is None and server.is_ready(), "the server must keep running"
    assert sorted(outcomes) == sorted(name for name, *_ in BAD_REQUESTS)


def test_non_start_request_for_an_unknown_sequence_is_an_error_naming_it(server):
    stream = RawStream(server.grpc_url)
    try:
        stream.send("x/0", [[1]], 8_123_456_789)
        error = stream.error()
    finally:
        stream.close()
    assert "sequence 8123456789" in error and "must specify the START flag" in error, error


def test_sequence_whose_start_failed_is_unknown_to_the_model(server):
    """Triton accepted the START (it holds a slot) but the model rejected it: the next request of that
    sequence gets the model's own 'unknown sequence' error naming it; a new START works."""
    stream = RawStream(server.grpc_url)
    seq = 8_200_000_001
    try:
        stream.send("s/0", [[-1]], seq, start=True)
        error = stream.error()
        assert f"sequence {seq}: INPUT_IDS: ids must be in 0..64" in error, error
        assert error_code(error) == ErrorCode.INVALID_INPUT, error
        stream.send("s/1", [[1]], seq)
        error = stream.error()
        # the code, for programs (the client re-primes on it), and the sequence it names
        assert error_code(error) == ErrorCode.UNKNOWN_SEQUENCE, error
        assert error_sequence(error) == str(seq), error
        assert (
            f"sequence {seq}: unknown sequence" in error and "sequence_start=True" in error
        ), error
        stream.send("s/2", [[1]], seq, start=True)
        stream.logits("s")
        stream.send("s/3", [[1]], seq, end=True)
        stream.logits("s")
    finally:
        stream.close()


def test_a_bad_request_is_the_callers_error_400_and_invalid_argument(server):
    """The models' request checks answer with the caller's status (not INTERNAL / HTTP 500)."""
    import json
    import urllib.error
    import urllib.request

    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    body = {
        "parameters": {"sequence_id": 8_400_000_001, "sequence_start": True, "sequence_end": True},
        "inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, 1], "data": [99]}],
    }
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{PYTHON}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", INFER_KEY_HEADER: server.infer_key},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "ids must be in 0..64" in e.value.read().decode()
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        ids = tg.InferInput("INPUT_IDS", [1, 1], "INT32")
        ids.set_data_from_numpy(np.array([[99]], np.int32))
        with pytest.raises(InferenceServerException) as e:
            client.infer(
                PYTHON, [ids], sequence_id=8_400_000_002, sequence_start=True, sequence_end=True
            )
        assert (
            e.value.status() == "StatusCode.INVALID_ARGUMENT"
            and "ids must be in 0..64" in e.value.message()
        )
    finally:
        client.close()


def test_missing_sequence_id_is_refused(server):
    stream = RawStream(server.grpc_url)
    try:
        stream.send("z/0", [[1]], 0, start=True)
        error = stream.error()
    finally:
        stream.close()
    assert "must specify a non-zero or non-empty correlation ID" in error, error


def test_gen_python_rejects_bad_requests_and_keeps_the_state(gen_server, shipped):
    """A bad request gets its own error; the sequence's state is untouched, so the text continues as if it
    had never been sent."""
    from charrnn.contract import NOISE, OUTPUT_IDS, TEMPERATURE, TOP_K
    from client.connection import Connection

    _, vocab = shipped
    V = len(vocab)
    stream = Connection(gen_server.grpc_url)

    def call(ids, noise, t=0.0, k=0, start=False, end=False, seq=424242):
        inputs = {
            INPUT_IDS: np.asarray(ids, np.int32).reshape(1, -1),
            NOISE: noise[None],
            TEMPERATURE: np.array([[t]], np.float32),
            TOP_K: np.array([[k]], np.int32),
        }
        stream.send(f"{seq}:{time.monotonic_ns()}", repository.GEN_PYTHON, inputs, seq, start, end)
        _, result, error, *_ = stream.results.get(timeout=30)
        return (None if result is None else result.as_numpy(OUTPUT_IDS).reshape(-1)), error

    half = np.full((4, V), 0.5, np.float32)
    try:
        first, error = call(vocab.encode("ROMEO:\n"), half, start=True)
        assert error is None
        for noise, t, k, words in (
            (np.zeros((4, V), np.float32), 1.0, 0, "open interval (0, 1)"),
            (np.full((4, V), 1.5, np.float32), 1.0, 0, "open interval (0, 1)"),
            (half, -1.0, 0, "TEMPERATURE: must be 0 (greedy) or >= 0.001"),
            # subnormal: logits / T overflowed into degenerate text, returned as success
            (half, 1e-45, 0, "TEMPERATURE: must be 0 (greedy) or >= 0.001"),
            (half, 1.0, V + 1, f"TOP_K: must be in 0..{V}"),
            (np.full((MAX_K + 1, V), 0.5, np.float32), 0.0, 0, f"1 <= K <= {MAX_K}"),
        ):
            _, error = call(first[-1:], noise, t, k)
            assert (
                error is not None and words in str(error) and "sequence 424242" in str(error)
            ), str(error)
        _, error = call([V + 3], half)
        assert error is not None and "ids must be in" in str(error)
        rest, error = call(first[-1:], half, end=True)
        assert error is None
        whole, error = call(
            vocab.encode("ROMEO:\n"),
            np.full((8, V), 0.5, np.float32),
            start=True,
            end=True,
            seq=434343,
        )
        assert error is None and whole.tolist() == first.tolist() + rest.tolist()
    finally:
        stream.close()


# --- 2. sequence lifecycle ------------------------------------------------------------------------------
def test_idle_sequence_is_evicted_and_triton_then_wants_start(short_idle_server):
    s = short_idle_server
    offset = log_size(s)
    seq = 8_300_000_001
    stream = RawStream(s.grpc_url)
    try:
        stream.send("i/0", ids_of(s, "ROMEO:"), seq, start=True)
        stream.logits("i")
        t0 = time.monotonic()
        found = wait_for(lambda: evictions(s, offset), 30, "the model's eviction log line")
        idle = time.monotonic() - t0
        assert found == [(1, 0)], found
        assert idle >= SHORT_IDLE_US / 1e6, f"evicted after {idle:.1f} s, before the idle timeout"
        stream.send("i/1", [[1]], seq)
        error = stream.error()
    finally:
        stream.close()
    assert f"sequence {seq}" in error and "must specify the START flag" in error, error


def test_sequence_id_reused_after_end_starts_fresh(short_idle_server):
    s = short_idle_server
    greedy = SamplingParams(greedy=True)
    reused = 8_400_000_001
    first = served(s, ["ROMEO:\n"], 120, [greedy], sequence_ids=[reused])
    other = served(s, ["JULIET:\n"], 120, [greedy], sequence_ids=[reused])  # same id, other text
    again = served(s, ["ROMEO:\n"], 120, [greedy], sequence_ids=[reused])
    fresh = served(s, ["ROMEO:\n"], 120, [greedy])
    assert first == again == fresh
    assert other != first


def test_killed_client_leaves_no_state_behind(short_idle_server):
    s = short_idle_server
    offset, before = log_size(s), inference_count(s)
    n = 3
    client = subprocess.Popen(
        client_cmd(
            s,
            "--num-sequences",
            str(n),
            "--length",
            "20000",
            "--seed",
            "1",
            "--quiet",
            "--retries",
            "0",
        ),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: inference_count(s) - before >= n * 30 or client.poll() is not None,
            120,
            "the client to be generating",
        )
        assert client.poll() is None, "the client ended before it was killed"
        client.send_signal(signal.SIGKILL)  # no END, no goodbye
    finally:
        client.kill()
        client.wait(timeout=30)
    wait_for(
        lambda: sum(k for k, _ in evictions(s, offset)) >= n, 30, f"{n} evictions in the server log"
    )
    found = evictions(s, offset)
    assert sum(k for k, _ in found) == n and found[-1][1] == 0, f"state left behind: {found}"
    assert s.process.poll() is None and s.is_ready()
    assert served(s, ["ROMEO:"], 20, [SamplingParams(greedy=True)])[0]  # still serving


# --- 3. every sequence keeps its own state --------------------------------------------------------------
def test_concurrent_sequences_do_not_leak_state(server):
    """8 sequences interleaved on one stream (batched by the server) each equal their solo run."""
    prompts = [
        f"{name}:\n"
        for name in ("ROMEO", "JULIET", "HAMLET", "LEAR", "MACBETH", "OTHELLO", "PUCK", "IAGO")
    ]
    params = [SamplingParams(temperature=1.0, seed=100 + i) for i in range(len(prompts))]
    together = served(server, prompts, 150, params)
    solo = [served(server, [p], 150, [q])[0] for p, q in zip(prompts, params)]
    assert together == solo
    assert len(set(together)) == len(together)


def test_sequences_stay_on_their_instance_with_two_instances(tmp_path, shipped_repo):
    """With 2 model instances (each holds its own states), concurrent sequences still match solo runs."""
    import shutil

    two = tmp_path / "repo2"
    shutil.copytree(shipped_repo / PYTHON, two / PYTHON)
    config = two / PYTHON / "config.pbtxt"
    text = config.read_text()
    assert "count: 1 " in text
    config.write_text(text.replace("count: 1 ", "count: 2 "))
    s = start_server(two, tmp_path / "serve")
    try:
        prompts = [f"{c}:" for c in "ABCDEFGHIJKL"]
        params = [SamplingParams(temperature=1.0, seed=7 + i) for i in range(len(prompts))]
        together = served(s, prompts, 100, params)
        solo = [served(s, [p], 100, [q])[0] for p, q in zip(prompts, params)]
        log = s.log_path.read_text()
    finally:
        s.stop()
    assert together == solo
    assert f"{PYTHON}_0_1" in log, "the second instance should have been created"


@pytest.mark.parametrize("n", [65, 500])
def test_more_sequences_than_the_batch_all_finish(server, n):
    """Regression: with sequence slots == batch size (64) the 65th START waited in Triton's backlog and, since
    Triton answers one gRPC stream in order, every later answer on the stream waited behind it: a hang.
    """
    greedy = [SamplingParams(greedy=True)] * n
    t0 = time.monotonic()
    texts = served(server, ["ROMEO:\n"] * n, 8, greedy)
    print(f"{n} sequences x 8 characters on one stream: {time.monotonic() - t0:.1f} s")
    assert texts == served(server, ["ROMEO:\n"], 8, greedy[:1]) * n


def test_abandoned_sequences_do_not_block_a_new_one(server):
    """64 sequences started and never ended (they hold their slots until the idle timeout) must not keep a
    new sequence waiting: it starts at once."""
    abandoned, fresh = RawStream(server.grpc_url), RawStream(server.grpc_url)
    try:
        for i in range(64):
            abandoned.send(f"a{i}/0", ids_of(server, "ROMEO:"), 8_500_000_000 + i, start=True)
        for i in range(64):
            abandoned.logits(f"a{i}")
        t0 = time.monotonic()
        fresh.send("f/0", ids_of(server, "JULIET:"), 8_500_001_000, start=True, end=True)
        fresh.logits("f", timeout=10)
        assert time.monotonic() - t0 < 1.0, f"a new sequence waited {time.monotonic() - t0:.1f} s"
        for i in range(64):  # leave the server as found
            abandoned.send(f"e{i}/0", [[1]], 8_500_000_000 + i, end=True)
        for i in range(64):
            abandoned.logits(f"e{i}")
    finally:
        abandoned.close()
        fresh.close()


def test_gen_model_answers_65_sequences_at_once(gen_server):
    """Regression: `--chunk 4 --num-sequences 65` never finished with 64 sequence slots (the 65th START waited
    for a slot and blocked every later answer on the client's gRPC stream)."""
    got, _ = chunked(
        gen_server, repository.GEN_PYTHON, ["ROMEO:\n"] * 65, [GREEDY] * 65, 4, length=20
    )
    alone, _ = chunked(gen_server, repository.GEN_PYTHON, ["ROMEO:\n"], [GREEDY], 4, length=20)
    assert got == alone * 65

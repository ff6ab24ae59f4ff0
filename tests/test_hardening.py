"""Hardening (issue 6), against the real local Triton server (python backend):

  1. bad input at the served model boundary: an error for that request only, in a busy batch;
  2. sequence lifecycle: idle eviction, id reuse after END, a client killed without END;
  3. restart-safe generation: the server is SIGKILLed and restarted mid-generation, nothing is lost;
  5. security defaults: loopback only, model control mode none, admin APIs need the admin key, no
     pickle/eval/exec anywhere (the --trust-pickle vocabulary path is data-only).
The soak (4.) is bench/soak.py; its test is marked slow.
No fixed sleeps: every wait polls a condition under a deadline.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.sampling import SamplingParams
from tests.conftest import ROOT, free_port

MODEL = "charrnn_python"
SHORT_IDLE_US = 2_000_000  # the lifecycle server's max_sequence_idle_microseconds


# --- servers ----------------------------------------------------------------------------------------
def start_server(repo: Path, run_dir: Path, models: tuple[str, ...] = (MODEL,), **kw):
    from charrnn.local_triton import LocalTriton

    return LocalTriton.on_free_ports(repo=repo, run_dir=run_dir, models=models, **kw).start()


@pytest.fixture(scope="module")
def server(shipped_repo, tmp_path_factory):
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short_idle_server(shipped_repo, tmp_path_factory):
    """A server whose charrnn_python frees idle sequences after 2 s (the model evicts 1 s later)."""
    import shutil

    short = tmp_path_factory.mktemp("repo-short-idle")
    shutil.copytree(shipped_repo / MODEL, short / MODEL)
    config = short / MODEL / "config.pbtxt"
    text = config.read_text()
    new, n = re.subn(r"max_sequence_idle_microseconds: \d+", f"max_sequence_idle_microseconds: {SHORT_IDLE_US}", text)
    assert n == 1, "config.pbtxt should set max_sequence_idle_microseconds once"
    config.write_text(new)
    s = start_server(short, tmp_path_factory.mktemp("serve-short-idle"))
    assert f"idle eviction after {SHORT_IDLE_US / 1e6 + 1:.1f} s" in s.log_path.read_text()
    yield s
    s.stop()


def wait_for(condition, timeout: float, what: str, period: float = 0.05):
    """Poll condition() until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)  # polling period of a deadline-bounded wait


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def kill_server(server) -> None:
    """SIGKILL the server's process group (server + python stubs), as a crash would; clean /dev/shm after it."""
    pgid = server.process.pid
    regions = []
    for pid in group_pids(pgid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions += [a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region_")]
    os.killpg(pgid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.process = None
    wait_for(lambda: not group_pids(pgid), 30, "the killed server's process group to be gone")
    for name in regions:  # a killed stub cannot unlink its shared memory region
        Path("/dev/shm", name).unlink(missing_ok=True)


def test_launcher_removes_its_own_leftovers_of_a_crash_and_only_its_own(shipped_repo, tmp_path):
    """After tritonserver is SIGKILLed its python stubs can outlive it (seen: one 136 MB orphan) and its
    /dev/shm regions stay. The next start of the same run directory removes them; other regions stay."""
    run_dir = tmp_path / "serve"
    s = start_server(shipped_repo, run_dir)
    stubs = [p for p in group_pids(s.process.pid) if p != s.process.pid]
    regions = list(Path("/dev/shm").glob(s.shm_prefix + "*"))
    assert stubs and regions, (stubs, regions)
    foreign = [Path("/dev/shm", "triton_python_backend_shm_region_not-ours-" + os.urandom(4).hex()),
               Path("/dev/shm", "charrnn_000000000000_not-ours-" + os.urandom(4).hex())]
    for f in foreign:
        f.write_bytes(b"x")
    try:
        for pid in stubs:  # a hung stub: it cannot notice that its server is gone
            os.kill(pid, signal.SIGSTOP)
        os.kill(s.process.pid, signal.SIGKILL)  # the server alone, as a segfault would
        s.process.wait(timeout=30)
        s.process = None
        assert all(Path(f"/proc/{pid}").exists() for pid in stubs) and all(r.exists() for r in regions)
        s2 = start_server(shipped_repo, run_dir)
        try:
            assert not any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
                           for pid in stubs), "the crashed server's stubs are still running"
            assert not any(r.exists() for r in regions), "the crashed server's shared memory is still there"
            assert all(f.exists() for f in foreign), "removed a region that was not ours"
            assert "removed what a crashed server" in s2.log_path.read_text()
            assert served(s2, ["ROMEO:\n"], 20, [SamplingParams(greedy=True)])[0][0]
        finally:
            s2.stop()
    finally:
        for f in foreign:
            f.unlink(missing_ok=True)
        for pid in stubs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def restart_later(server) -> threading.Thread:
    """Start the server again on the SAME ports, in a thread (the client retries meanwhile)."""
    errors = []

    def run():
        try:
            server.start()
        except BaseException as e:  # reported by the test through thread.errors
            errors.append(e)

    thread = threading.Thread(target=run, name="restart-server", daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def log_text(server, offset: int = 0) -> str:
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(server) -> int:
    return server.log_path.stat().st_size


def inference_count(server) -> int:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(MODEL, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0].get("inference_count", 0))


def served(server, prompts, length, params, protocol="grpc", model=MODEL, **kw):
    """Texts of generate() through the server (kw: chunk, sequence_ids, retry, on_text, on_retry)."""
    from client.connection import Connection
    from client.generate import generate

    conn = Connection(server.grpc_url if protocol == "grpc" else server.http_url, protocol,
                      infer_key=server.infer_key)
    try:
        vocab = conn.vocabulary(model)
        seqs = generate(conn, model, vocab, prompts, length, params, **kw)
    finally:
        conn.close()
    return [vocab.decode(s.generated) for s in seqs], seqs


def client_cmd(server, *args) -> list[str]:
    return [sys.executable, "-m", "client", "--url", server.grpc_url, "--model", MODEL, *args]


def run_client(server, *args, timeout=180):
    return subprocess.run(client_cmd(server, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --- raw requests on one gRPC stream ------------------------------------------------------------------
class RawStream:
    """tritonclient requests on ONE stream; successes are routed by request id, errors (which carry no id
    on a stream) go to `errors`. Thread-safe sends: async_stream_infer only enqueues."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as tc

        self.tc = tc
        self.client = tc.InferenceServerClient(url)
        self.results: dict[str, queue.Queue] = {}
        self.errors: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error) -> None:
        if error is not None:
            self.errors.put(str(error))
            return
        rid = result.get_response().id
        with self.lock:
            q = self.results.setdefault(rid.split("/")[0], queue.Queue())
        q.put((rid, result.as_numpy("LOGITS")[0]))

    def send(self, rid: str, ids, seq: int, start=False, end=False, dtype="INT32") -> None:
        array = ids if isinstance(ids, np.ndarray) else np.asarray(ids, np.int32)
        inp = self.tc.InferInput("INPUT_IDS", list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        self.client.async_stream_infer(MODEL, [inp], request_id=rid, sequence_id=seq, sequence_start=start,
                                       sequence_end=end)

    def logits(self, route: str, timeout=60.0) -> np.ndarray:
        with self.lock:
            q = self.results.setdefault(route, queue.Queue())
        try:
            return q.get(timeout=timeout)[1]
        except queue.Empty:
            pytest.fail(f"no result for {route} after {timeout:.0f} s; errors: {list(self.errors.queue)}")

    def error(self, timeout=60.0) -> str:
        try:
            return self.errors.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no error response after {timeout:.0f} s")

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def ids_of(server, text: str) -> np.ndarray:
    from client.connection import Connection

    conn = Connection(server.grpc_url)
    try:
        return conn.vocabulary(MODEL).encode(text).reshape(1, -1).astype(np.int32)
    finally:
        conn.close()


# --- 1. bad input at the served model boundary --------------------------------------------------------
V = 65  # vocabulary size of the shipped model (checked in the test)
BAD_REQUESTS = [  # name, array, Triton dtype, what the error must say (Triton's or the model's own check)
    ("INT64 ids", np.array([[1, 2, 3]], np.int64), "INT64", r"data-type is 'INT64', but model 'charrnn_python' expects 'INT32'"),
    ("FP32 ids", np.array([[1.0, 2.0]], np.float32), "FP32", r"data-type is 'FP32', but model 'charrnn_python' expects 'INT32'"),
    ("1-D ids", np.array([1, 2, 3], np.int32), "INT32", r"unexpected shape for input 'INPUT_IDS'.*got \[3\]"),
    ("3-D ids", np.array([[[1, 2, 3]]], np.int32), "INT32", r"unexpected shape for input 'INPUT_IDS'.*got \[1,1,3\]"),
    ("batch of 2", np.array([[1, 2], [3, 4]], np.int32), "INT32", r"must specify batch-size 1"),
    ("negative id", np.array([[1, -5, 3]], np.int32), "INT32", r"sequence {seq}: INPUT_IDS: ids must be in 0\.\.64, got -5\.\.3"),
    ("id == V", np.array([[1, V, 3]], np.int32), "INT32", r"sequence {seq}: INPUT_IDS: ids must be in 0\.\.64, got 1\.\.65"),
    ("huge id", np.array([[2**31 - 1]], np.int32), "INT32", r"sequence {seq}: INPUT_IDS: ids must be in 0\.\.64"),
    ("T = 0", np.ones((1, 0), np.int32), "INT32", r"sequence {seq}: INPUT_IDS: shape must be \[1, T\] with 1 <= T <= 256, got \[1, 0\]"),
    ("T = MAX_T + 1", np.ones((1, 257), np.int32), "INT32", r"sequence {seq}: INPUT_IDS: shape must be \[1, T\] with 1 <= T <= 256, got \[1, 257\]"),
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
            assert not any(str(g) in error for g in good_ids), f"{name}: error names a good sequence: {error}"
            assert re.search(pattern.format(seq=victim), error), f"{name}: unclear error {error!r}"
            np.testing.assert_allclose(after, clean, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name}: the failed request changed sequence {victim}'s state")
        assert good.is_alive(), f"the good sequences ended before the bad requests were all sent {[str(e) for e in failure]}"
        bad_done.set()
        good.join(timeout=300)
        assert not failure, f"a good sequence failed: {failure[0]!r}"
        assert stream.errors.empty(), f"unexpected extra errors: {list(stream.errors.queue)}"
    finally:
        stream.close()
    from client.connection import Connection

    conn = Connection(server.grpc_url)
    vocab = conn.vocabulary(MODEL)
    conn.close()
    assert len(vocab) == V
    length = len(texts[0])
    assert 50 < length < max_steps and all(len(t) == length for t in texts)
    greedy = SamplingParams(greedy=True)
    solo = [served(server, [p], length, [greedy])[0][0] for p in prompts]
    assert [vocab.decode(t) for t in texts] == solo, "a good sequence's text changed next to the bad requests"
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
        assert f"sequence {seq}: INPUT_IDS: ids must be in 0..64" in stream.error()
        stream.send("s/1", [[1]], seq)
        error = stream.error()
        assert error.startswith(f"sequence {seq}: unknown sequence") and "sequence_start=True" in error, error
        stream.send("s/2", [[1]], seq, start=True)
        stream.logits("s")
        stream.send("s/3", [[1]], seq, end=True)
        stream.logits("s")
    finally:
        stream.close()


def test_http_inference_needs_the_key_so_a_huge_declared_shape_cannot_abort_the_server(server):
    """Triton 2.51 allocates a JSON input's declared shape before it reads the data: ONE request with
    "shape": [1, 2**40] aborted tritonserver (std::bad_alloc) in 1.3 s. The restricted-API check runs before the
    body is parsed, so without the inference key that request, and any HTTP inference, is refused; the server
    and a gRPC sequence running alongside carry on. The key works over HTTP, and the CLI explains a missing key."""
    import json
    import urllib.error
    import urllib.request

    def post(body: dict, headers: dict) -> tuple[int, str]:
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}/infer",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def body(shape: list[int], seq: int) -> dict:
        return {"parameters": {"sequence_id": seq, "sequence_start": True, "sequence_end": True},
                "inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": shape, "data": [1]}]}

    canary = RawStream(server.grpc_url)
    try:
        canary.send("c/0", [[1]], 8_500_000_001, start=True)
        canary.logits("c")
        for headers in ({}, {INFER_KEY_HEADER: "guess"}):
            code, text = post(body([1, 2**40], 8_500_000_002), headers)
            assert code == 403 and f"expecting header '{INFER_KEY_HEADER}'" in text, (code, text)
        assert server.is_ready()
        assert post(body([1, 1], 8_500_000_003), {INFER_KEY_HEADER: server.infer_key})[0] == 200
        canary.send("c/1", [[2]], 8_500_000_001, end=True)  # the sequence kept its state through all of it
        canary.logits("c")
    finally:
        canary.close()
    env = {k: v for k, v in os.environ.items() if k != INFER_KEY_ENV}
    p = subprocess.run([sys.executable, "-m", "client", "--url", server.http_url, "--protocol", "http",
                        "--model", MODEL, "--length", "5", "--greedy"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: --protocol http: the server refused HTTP inference "
                                                     "with no key"), p.stderr
    assert INFER_KEY_ENV in p.stderr
    p = subprocess.run([sys.executable, "-m", "client", "--url", server.http_url, "--protocol", "http",
                        "--model", MODEL, "--length", "5", "--greedy"], cwd=ROOT, capture_output=True, text=True,
                       env={**env, INFER_KEY_ENV: server.infer_key}, timeout=120)
    assert p.returncode == 0, p.stderr


def test_a_bad_request_is_the_callers_error_400_and_invalid_argument(server):
    """The models' request checks answer with the caller's status (not INTERNAL / HTTP 500)."""
    import json
    import urllib.error
    import urllib.request

    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    body = {"parameters": {"sequence_id": 8_400_000_001, "sequence_start": True, "sequence_end": True},
            "inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, 1], "data": [99]}]}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", INFER_KEY_HEADER: server.infer_key})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "ids must be in 0..64" in e.value.read().decode()
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        ids = tg.InferInput("INPUT_IDS", [1, 1], "INT32")
        ids.set_data_from_numpy(np.array([[99]], np.int32))
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, [ids], sequence_id=8_400_000_002, sequence_start=True, sequence_end=True)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "ids must be in 0..64" in e.value.message()
    finally:
        client.close()


@pytest.mark.parametrize("n", [65, 500])
def test_more_sequences_than_the_batch_all_finish(server, n):
    """Regression: with sequence slots == batch size (64) the 65th START waited in Triton's backlog and, since
    Triton answers one gRPC stream in order, every later answer on the stream waited behind it: a hang."""
    greedy = [SamplingParams(greedy=True)] * n
    t0 = time.monotonic()
    texts, _ = served(server, ["ROMEO:\n"] * n, 8, greedy)
    print(f"{n} sequences x 8 characters on one stream: {time.monotonic() - t0:.1f} s")
    assert texts == served(server, ["ROMEO:\n"], 8, greedy[:1])[0] * n


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


def test_reprime_after_an_outage_ends_the_sequences_it_replaces(server):
    """The stream breaks while the server stays up: the client re-primes under new ids and ENDs the old ones,
    which otherwise held their slots until the idle timeout (with --num-sequences 10000: 10,000 of them)."""
    from client.generate import RetryPolicy, generate
    from client.connection import Connection

    conn = Connection(server.grpc_url, "grpc")
    greedy = [SamplingParams(greedy=True)] * 3
    broken = []

    def break_stream(index, char):
        if not broken and sum(len(s) for s in texts_so_far) >= 30:
            broken.append(True)
            conn.abort()  # the client's side of the stream goes away; the server keeps the sequences

    texts_so_far = [[], [], []]
    try:
        vocab = conn.vocabulary(conn.pick_model(MODEL))
        seqs = generate(conn, MODEL, vocab, ["ROMEO:\n", "JULIET:\n", "HAMLET:\n"], 60, greedy,
                        on_text=lambda i, c: (texts_so_far[i].append(c), break_stream(i, c)),
                        retry=RetryPolicy(retries=5, delay=0.1, max_wait=30))
    finally:
        conn.close()
    assert broken and all(s.restarts == 1 and len(s.sequence_ids) == 1 for s in seqs)
    assert [vocab.decode(s.generated) for s in seqs] == served(server, ["ROMEO:\n", "JULIET:\n", "HAMLET:\n"], 60,
                                                               greedy)[0]
    probe = RawStream(server.grpc_url)
    try:
        for seq in seqs:  # Triton no longer knows the replaced ids: they were ended, not left to idle out
            probe.send(f"p{seq.sequence_ids[0]}/0", [[1]], seq.sequence_ids[0])
            assert "must specify the START flag" in probe.error(timeout=10)
    finally:
        probe.close()


def test_missing_sequence_id_is_refused(server):
    stream = RawStream(server.grpc_url)
    try:
        stream.send("z/0", [[1]], 0, start=True)
        error = stream.error()
    finally:
        stream.close()
    assert "must specify a non-zero or non-empty correlation ID" in error, error


def test_64_concurrent_sequences_keep_the_server_up(server):
    """Regression: with gRPC's default allocation pool (8) tritonserver 2.51 segfaulted within seconds once
    more than ~32 sequences streamed at once (measured at 40, 48, 63, 64); serve.local sets a larger pool."""
    n, length = 64, 120
    prompts = [("ROMEO:\n", "JULIET:\n", "First Citizen:\n", "HAMLET:\n")[i % 4] for i in range(n)]
    texts, seqs = served(server, prompts, length, [SamplingParams(temperature=1.0, seed=i) for i in range(n)])
    assert [len(t) for t in texts] == [length] * n
    assert len(set(texts)) > n // 2  # different seeds: different texts
    assert server.process.poll() is None and "Signal (11)" not in server.log_path.read_text()


# --- 2. sequence lifecycle ------------------------------------------------------------------------------
EVICTED = re.compile(r"evicted (\d+) idle sequence\(s\); (\d+) live")


def evictions(server, offset: int) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in EVICTED.findall(log_text(server, offset))]


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
    first, _ = served(s, ["ROMEO:\n"], 120, [greedy], sequence_ids=[reused])
    other, _ = served(s, ["JULIET:\n"], 120, [greedy], sequence_ids=[reused])  # same id, other text
    again, _ = served(s, ["ROMEO:\n"], 120, [greedy], sequence_ids=[reused])
    fresh, _ = served(s, ["ROMEO:\n"], 120, [greedy])
    assert first == again == fresh
    assert other != first


def test_killed_client_leaves_no_state_behind(short_idle_server):
    s = short_idle_server
    offset, before = log_size(s), inference_count(s)
    n = 3
    client = subprocess.Popen(client_cmd(s, "--num-sequences", str(n), "--length", "20000", "--seed", "1",
                                         "--quiet", "--retries", "0"),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: inference_count(s) - before >= n * 30 or client.poll() is not None, 120,
                 "the client to be generating")
        assert client.poll() is None, "the client ended before it was killed"
        client.send_signal(signal.SIGKILL)  # no END, no goodbye
    finally:
        client.kill()
        client.wait(timeout=30)
    wait_for(lambda: sum(k for k, _ in evictions(s, offset)) >= n, 30, f"{n} evictions in the server log")
    found = evictions(s, offset)
    assert sum(k for k, _ in found) == n and found[-1][1] == 0, f"state left behind: {found}"
    assert s.process.poll() is None and s.is_ready()
    assert served(s, ["ROMEO:"], 20, [SamplingParams(greedy=True)])[0][0]  # still serving


def test_client_reprimes_sequences_the_server_forgot(short_idle_server):
    """The client stalls past the idle timeout: the server forgets its sequences ("must specify the START
    flag"); with retries each is re-primed under a new id and the text equals an uninterrupted run."""
    from client.generate import RetryPolicy

    s = short_idle_server
    prompts, length = ["ROMEO:\n", "JULIET:\n"], 120
    greedy = [SamplingParams(greedy=True)] * 2
    want, _ = served(s, prompts, length, greedy)
    offset, chars, messages = log_size(s), [0], []

    def on_char(index, char):
        chars[0] += 1
        if chars[0] == 60:  # stall (no request in flight) until the model has evicted both sequences
            wait_for(lambda: sum(k for k, _ in evictions(s, offset)) >= 2, 30, "both sequences to be evicted")

    got, seqs = served(s, prompts, length, greedy, on_text=on_char, on_retry=messages.append,
                       retry=RetryPolicy(retries=2))
    assert got == want
    assert sum("unknown to the server; re-primed it as" in m for m in messages) == 2, messages
    assert all(seq.restarts == 1 for seq in seqs)


@pytest.mark.parametrize("message, kind", [
    ("inference request for sequence 5 to model 'charrnn_python' must specify the START flag on the first "
     "request of the sequence", "lost"),
    ("sequence 5: unknown sequence (never started, ended, or idle longer than 60 s) (start it again with "
     "sequence_start=True)", "lost"),
    ("[StatusCode.UNAVAILABLE] Stream removed (Socket closed)", "outage"),
    ("The stream is no longer in valid state, the error detail is reported through provided callback.", "outage"),
    ("sequence 5: INPUT_IDS: ids must be in 0..64, got -2..3", "fatal"),
    ("[request id: 1] inference input 'INPUT_IDS' data-type is 'INT64', but model 'charrnn_python' expects "
     "'INT32'", "fatal"),
], ids=["triton-wants-start", "model-unknown-sequence", "stream-removed", "dead-stream", "bad-ids", "bad-dtype"])
def test_client_classifies_server_errors(message, kind):
    from tritonclient.utils import InferenceServerException

    from client.generate import classify

    status = "StatusCode.UNAVAILABLE" if "UNAVAILABLE" in message else None
    assert classify(InferenceServerException(message.split("] ", 1)[-1] if status else message, status)) == kind
    assert classify(ConnectionRefusedError(111, "Connection refused")) == "outage"


# --- 3. restart-safe generation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def restartable(shipped_repo, tmp_path_factory):
    """A server the tests kill and restart (on the same ports)."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve-restart"))
    yield s
    s.stop()


def ensure_up(server) -> None:
    if server.process is None or server.process.poll() is not None:
        server.start()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generation_survives_a_server_crash_4_sequences_greedy(restartable, protocol):
    from client.generate import RetryPolicy

    s = restartable
    ensure_up(s)
    prompts = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "KING HENRY VI:\nO"]
    length = 300 if protocol == "grpc" else 150
    greedy = [SamplingParams(greedy=True)] * len(prompts)
    want, _ = served(s, prompts, length, greedy, protocol=protocol)
    chars, messages, restart = [0], [], []

    def on_char(index, char):
        chars[0] += 1
        if chars[0] == 40 * len(prompts):  # mid-generation: crash the server, bring it back in a thread
            kill_server(s)
            restart.append(restart_later(s))

    got, seqs = served(s, prompts, length, greedy, protocol=protocol, on_text=on_char, on_retry=messages.append,
                       retry=RetryPolicy(retries=10, delay=0.2, max_wait=120))
    restart[0].join(timeout=120)
    assert not restart[0].errors, restart[0].errors
    assert got == want, "text after the restart differs from the uninterrupted run"
    assert any("retry 1/10" in m for m in messages) and any(m.startswith("reconnected") for m in messages), messages
    for seq in seqs:
        assert seq.restarts >= 1 and seq.sequence_id not in seq.sequence_ids


@pytest.mark.parametrize("model", ["charrnn_gen_python", "charrnn_gen_stream"])
def test_chunked_generation_survives_a_server_crash_seeded(shipped_repo, tmp_path, model):
    """--chunk K reconnects and re-primes like the per-character path: SIGKILL mid-generation, restart, and
    the seeded texts equal an uninterrupted run (the noise stream continues at row len(generated))."""
    from client.generate import RetryPolicy

    s = start_server(shipped_repo, tmp_path, models=(model,))
    try:
        prompts = ["ROMEO:\n", "JULIET:\n", "KING HENRY VI:\nO"]
        params = [SamplingParams(temperature=0.9, top_k=20, seed=11 + i) for i in range(len(prompts))]
        want, _ = served(s, prompts, 200, params, model=model, chunk=8)
        chars, messages, restart = [0], [], []

        def on_text(index, text):
            chars[0] += len(text)
            if not restart and chars[0] >= 60 * len(prompts):  # mid-generation: crash, bring it back in a thread
                kill_server(s)
                restart.append(restart_later(s))

        got, seqs = served(s, prompts, 200, params, model=model, chunk=8, on_text=on_text,
                           on_retry=messages.append, retry=RetryPolicy(retries=10, delay=0.2, max_wait=120))
        restart[0].join(timeout=120)
        assert not restart[0].errors, restart[0].errors
        assert got == want, "text after the restart differs from the uninterrupted run"
        assert any(m.startswith("reconnected") for m in messages), messages
        assert all(seq.restarts >= 1 for seq in seqs)
    finally:
        s.stop()


def test_cli_seeded_generation_survives_a_server_crash(restartable):
    s = restartable
    ensure_up(s)
    flags = ["--prompt", "ROMEO:", "--length", "1000", "--seed", "7", "--temperature", "0.9", "--top-k", "20",
             "--retry-delay", "0.2", "--retries", "10"]
    want = run_client(s, *flags)
    assert want.returncode == 0, want.stderr
    client = subprocess.Popen(client_cmd(s, *flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = read_until(client, len("ROMEO:") + 150)
        kill_server(s)
        restart = restart_later(s)
        rest, err = client.communicate(timeout=180)
    finally:
        client.kill()
    restart.join(timeout=120)
    assert client.returncode == 0, err.decode()
    assert (out + rest).decode() == want.stdout
    assert "retry 1/10" in err.decode() and "reconnected" in err.decode(), err.decode()


def read_until(process, n: int, timeout: float = 120) -> bytes:
    """At least n bytes of the process's stdout (read as they stream)."""
    out, deadline = b"", time.monotonic() + timeout
    while len(out) < n:
        if time.monotonic() > deadline or process.poll() is not None:
            pytest.fail(f"the client printed {len(out)} bytes, expected {n}: {out[-200:]!r}")
        out += os.read(process.stdout.fileno(), n - len(out))
    return out


def test_cli_without_retries_exits_3_and_prints_the_text_so_far(restartable):
    s = restartable
    ensure_up(s)
    flags = ["--prompt", "ROMEO:", "--length", "1000", "--greedy"]
    want = run_client(s, *flags)
    assert want.returncode == 0, want.stderr
    client = subprocess.Popen(client_cmd(s, *flags, "--retries", "0"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        out = read_until(client, len("ROMEO:") + 100)
        kill_server(s)
        rest, err = client.communicate(timeout=60)
    finally:
        client.kill()
        s.start()
    err = err.decode()
    assert client.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: server {re.escape(s.grpc_url)}: connection lost \(.+\); \d+ of 1000 characters "
                    r"kept \(restart the server, then run again with --retries N", last), last
    text = (out + rest).decode()
    assert text.endswith("\n") and want.stdout.startswith(text[:-1]) and len(text) > len("ROMEO:") + 100
    kept = int(re.search(r"(\d+) of 1000 characters kept", last).group(1))
    assert len(text) - 1 - len("ROMEO:") == kept, "everything generated must be on stdout"


def test_cli_gives_up_after_its_retries_and_prints_partial_texts_of_every_sequence(restartable):
    """The server stays down: after --retries attempts the client exits 3, every sequence's text so far on stdout."""
    s = restartable
    ensure_up(s)
    before = inference_count(s)
    client = subprocess.Popen(client_cmd(s, "--prompt", "ROMEO:", "--length", "20000", "--greedy",
                                         "--num-sequences", "2", "--retries", "2", "--retry-delay", "0.1"),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: inference_count(s) - before >= 100 or client.poll() is not None, 120,
                 "the client to be generating")
        kill_server(s)
        out, err = client.communicate(timeout=60)
    finally:
        client.kill()
        s.start()
    assert client.returncode == 3, err
    heads = re.findall(r"=== sequence (\d) \(charrnn_python, seed None; partial: (\d+) of 20000 characters\) ===\n"
                       r"ROMEO:", out)
    assert [h[0] for h in heads] == ["0", "1"], out[:500]
    assert all(int(h[1]) > 0 for h in heads)
    lines = err.strip().splitlines()
    assert sum("warning: server" in line and "retry" in line for line in lines) == 2, err
    assert re.match(rf"error: server {re.escape(s.grpc_url)}: still unavailable \(.*\), gave up after 2 retries; "
                    rf"{sum(int(h[1]) for h in heads)} of 40000 characters kept \(check the server", lines[-1]), lines[-1]


def test_retry_flags_are_checked():
    for flags, pattern in ((["--retries", "-1"], r"^error: --retries: must be >= 0"),
                           (["--retry-delay", "0"], r"^error: --retry-delay: must be > 0"),
                           (["--retry-max-wait", "-1"], r"^error: --retry-max-wait: must be >= 0")):
        r = subprocess.run([sys.executable, "-m", "client", "--url", f"127.0.0.1:{free_port()}", *flags],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and re.search(pattern, r.stderr), r.stderr


# --- 5. security defaults ---------------------------------------------------------------------------------
def listening(port: int) -> list[tuple[str, int]]:
    """(local address hex, socket inode) of LISTEN sockets on `port`, IPv4 and IPv6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and int(address.rsplit(":", 1)[1], 16) == port:
                found.append((address.rsplit(":", 1)[0], inode))
    return found


def socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except OSError:
            pass
    return inodes


# 127.0.0.1 in /proc/net/tcp, and in /proc/net/tcp6 as ::ffff:127.0.0.1 (gRPC's socket) or ::1.
LOOPBACK = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")


def test_server_listens_on_loopback_only(server):
    mine = socket_inodes(group_pids(server.process.pid))
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        sockets = listening(port)
        assert sockets, f"nothing listens on port {port}"
        assert all(address in LOOPBACK for address, _ in sockets), f"port {port} not loopback-only: {sockets}"
        assert all(inode in mine for _, inode in sockets), f"port {port} is not the server's"


def admin_clients(server):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from charrnn.local_triton import ADMIN_HEADER

    return (tg.InferenceServerClient(server.grpc_url), {f"triton-grpc-protocol-{ADMIN_HEADER}": server.admin_key},
            th.InferenceServerClient(server.http_url), {ADMIN_HEADER: server.admin_key})


def refused(call) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value)


def test_model_repository_api_needs_the_admin_key_and_control_mode_is_none(server):
    g, gkey, h, hkey = admin_clients(server)
    try:
        for call in (lambda kw: g.get_model_repository_index(**kw), lambda kw: g.load_model(MODEL, **kw),
                     lambda kw: g.unload_model(MODEL, **kw)):
            assert "restricted, expecting header 'triton-grpc-protocol-admin-key'" in refused(lambda: call({}))
            assert "restricted" in refused(lambda: call({"headers": {"triton-grpc-protocol-admin-key": "guess"}}))
        for call in (lambda kw: h.get_model_repository_index(**kw), lambda kw: h.load_model(MODEL, **kw),
                     lambda kw: h.unload_model(MODEL, **kw)):
            assert "restricted, expecting header 'admin-key'" in refused(lambda: call({}))
            assert "restricted" in refused(lambda: call({"headers": {"admin-key": "guess"}}))
        index = g.get_model_repository_index(headers=gkey, as_json=True)["models"]
        assert [(m["name"], m["state"]) for m in index] == [(MODEL, "READY")]
        assert [(m["name"], m["state"]) for m in h.get_model_repository_index(headers=hkey)] == [(MODEL, "READY")]
        # Even with the key the repository cannot be changed: model control mode none.
        for call in (lambda: g.load_model(MODEL, headers=gkey), lambda: g.unload_model(MODEL, headers=gkey),
                     lambda: h.load_model(MODEL, headers=hkey), lambda: h.unload_model(MODEL, headers=hkey)):
            assert "explicit model load / unload is not allowed" in refused(call)
        assert g.is_model_ready(MODEL), "the model must still be loaded"
    finally:
        g.close()
        h.close()
    assert "--model-control-mode=none" in Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()


def test_logging_api_needs_the_admin_key(server):
    g, gkey, h, hkey = admin_clients(server)
    try:
        assert "restricted" in refused(lambda: g.get_log_settings())
        assert "restricted" in refused(lambda: g.update_log_settings({"log_verbose_level": 1}))
        assert "restricted" in refused(lambda: h.get_log_settings())
        assert "restricted" in refused(lambda: h.update_log_settings({"log_verbose_level": 1}))
        assert g.get_log_settings(headers=gkey, as_json=True)["settings"]["log_verbose_level"]["uint32_param"] == 0
        assert h.get_log_settings(headers=hkey)["log_verbose_level"] == 0
    finally:
        g.close()
        h.close()


UNSAFE = re.compile(r"\bpickle\s*\.\s*loads?\s*\(|(?<![\w.])eval\s*\(|(?<![\w.])exec\s*\(|\bmarshal\s*\.\s*loads?\s*\("
                    r"|allow_pickle\s*=\s*True|\byaml\s*\.\s*load\s*\(|\bshell\s*=\s*True")


def test_no_pickle_eval_exec_anywhere():
    """No unsafe deserialization or evaluation in any committed Python file. (The importer's --trust-pickle
    path unpickles data only: tests/test_import_tf1.py checks a pickle with a global is refused.)"""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(files) > 20
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0]
            if UNSAFE.search(code) and not (name == "tests/test_hardening.py" and "UNSAFE" in code):
                hits.append((name, number, line.strip()))
    assert hits == [], f"unsafe deserialization/evaluation: {hits}"


# --- 4. soak (slow) ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_64_sequences_no_errors_and_flat_server_memory(shipped_repo, tmp_path):
    from bench.soak import main as soak_main

    assert soak_main(["--repo", str(shipped_repo), "--run-dir", str(tmp_path / "serve"), "--sequences", "64",
                      "--length", "2000"]) == 0


@pytest.mark.slow
def test_mixed_soak_10_minutes_no_crash_no_wrong_text_flat_memory():
    """`make soak-mixed`: every python model at once, over gRPC and HTTP, per character, chunked and streamed,
    with bad requests mixed in, for 10 minutes (bench/mixed_soak.py checks texts, errors and memory)."""
    r = subprocess.run([sys.executable, "-m", "bench.mixed_soak", "--minutes", "10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 crashes, 0 wrong texts" in r.stdout

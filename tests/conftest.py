"""Shared fixtures and helpers, defined here once and imported by the test files from `tests.conftest`.

- the corpus, a tiny model trained for real by the project's trainer, the shipped model (TensorFlow) and its
  export (`python -m export`, once per session), tiny exports of every cell;
- local Triton servers (the python backend, charrnn.local_triton): `server` (charrnn_python), `gen_server`
  (the non-decoupled python models), `stream_server` (the decoupled one, on a server of its own) for the
  whole session; `short_idle_server` and `restartable` per test module (the second one is killed and
  restarted by its tests, so no other module shares it);
- what the server tests drive them with: served() (the client library's generate()), chunked(), RawStream
  (raw requests on one gRPC stream), the client command line, and deadline-bounded waits (no fixed sleeps).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import psutil
import pytest

from charrnn.contract import MAX_T, Contract
from charrnn.repository import GEN_STREAM, ONNX, ORT_MODELS, PYTHON, SHARED_PYTHON_MODELS
from charrnn.sampling import SamplingParams
from charrnn.vocab import Vocab

if TYPE_CHECKING:
    import onnx

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
# CHARRNN_TEST_MODEL: run the suite against another model directory (e.g. a snapshot while training).
SHIPPED_MODEL = Path(
    os.environ.get("CHARRNN_TEST_MODEL", ROOT / "models" / "shakespeare-lstm-2x512")
)
COMMITTED_REPO = ROOT / "model_repository"
PY = sys.executable

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Small but real: trained by train.train on the real corpus (a few seconds on 2 cores).
TINY_FLAGS = [
    "--hidden-size",
    "48",
    "--embedding-size",
    "16",
    "--num-layers",
    "2",
    "--dropout",
    "0",
    "--batch-size",
    "16",
    "--seq-length",
    "50",
    "--max-steps",
    "60",
    "--eval-every",
    "30",
    "--checkpoint-every",
    "30",
    "--learning-rate",
    "0.01",
    "--quiet",
]
# The `exported` fixture's GRU / SimpleRNN models, even smaller than the tiny LSTM: only their export is tested.
TINY_OTHER_CELL = [
    "--hidden-size",
    "16",
    "--embedding-size",
    "8",
    "--max-steps",
    "2",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
]


def run(*args, timeout=120):
    """`python <args>` in the checkout, output captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_json(path):
    return json.loads(path.read_text())


# --- the corpus and the tiny model ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"{CORPUS} missing: run `make data` (make test does it)")
    return CORPUS


@pytest.fixture(scope="session")
def corpus_text(corpus) -> str:
    return corpus.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def corpus_vocab(corpus_text) -> Vocab:
    """The vocabulary of the whole corpus (65 characters)."""
    return Vocab.from_text(corpus_text)


def train_tiny(out: Path, extra: list[str] | None = None) -> Path:
    from train.train import main

    rc = main(["--data", str(CORPUS), "--out", str(out), *TINY_FLAGS, *(extra or [])])
    assert rc == 0, f"tiny training failed with exit code {rc}"
    return out


@pytest.fixture(scope="session")
def tiny_model(corpus, tmp_path_factory) -> Path:
    """A 2x48 LSTM model directory trained for 60 steps (shared by the whole session: don't modify)."""
    return train_tiny(tmp_path_factory.mktemp("tiny") / "tiny-lstm")


@pytest.fixture(scope="session")
def tiny(tiny_model):
    """(model, vocab, step function) of the tiny model, loaded in TensorFlow."""
    from charrnn.model import load_model_dir

    model, vocab, _ = load_model_dir(tiny_model)
    return model, vocab, model.step_fn()


def tiny_text(tiny, prompt="ROMEO:", length=40, **kw) -> str:
    """`length` characters after `prompt` from the tiny model with charrnn.sampling.generate (kw: SamplingParams)."""
    from charrnn.sampling import Sampler, generate

    model, vocab, step = tiny
    seen = []
    ids = generate(
        step,
        vocab.encode(prompt),
        length,
        Sampler(SamplingParams(**kw), len(vocab)),
        on_id=seen.append,
    )
    assert seen == ids and len(ids) == length
    return vocab.decode(ids)


# --- the shipped model and its export -------------------------------------------------------------------
@pytest.fixture(scope="session")
def shipped():
    """(model, vocab) of the shipped model, loaded in TensorFlow (the reference)."""
    from charrnn.model import load_model_dir

    model, vocab, _ = load_model_dir(SHIPPED_MODEL)
    return model, vocab


@pytest.fixture(scope="session")
def shipped_repo(tmp_path_factory) -> Path:
    """`python -m export` of the shipped model into a fresh repository (step and generation graphs, every
    config), once per session. Read-only: a test that changes a config copies the model folder first.
    """
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("shipped-repo")
    assert export_main(["--model", str(SHIPPED_MODEL), "--repo", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def shipped_onnx(shipped_repo) -> Path:
    return shipped_repo / ONNX / "1" / "model.onnx"


@pytest.fixture(scope="session")
def shipped_proto(shipped_onnx):
    import onnx

    return onnx.load(str(shipped_onnx))


@pytest.fixture(scope="session")
def shipped_contract_vocab() -> tuple[Contract, Vocab]:
    """The shipped model's contract and vocabulary, read from its model directory (no TensorFlow needed)."""
    from charrnn.model import ModelConfig

    config = ModelConfig.from_dict(json.loads((SHIPPED_MODEL / "config.json").read_text()))
    return config.contract, Vocab.load(SHIPPED_MODEL / "vocab.json")


def committed_text(name: str) -> str:
    """The committed model_repository/<name>/config.pbtxt."""
    from charrnn import repository

    return (COMMITTED_REPO / name / repository.CONFIG).read_text()


def tf_text(shipped, prompt: str, length: int, params) -> str:
    """The TensorFlow reference: `length` characters after `prompt` with the project's sampler."""
    from charrnn.sampling import Sampler

    model, vocab = shipped
    return vocab.decode(model.generate(vocab.encode(prompt), length, Sampler(params, len(vocab))))


# --- the generation graph (server-side sampling) --------------------------------------------------------
GEN_LENGTH = 160
# The second prompt is longer than MAX_T: two prime requests (the first one's id is discarded).
LONG_PROMPT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 4
)[: MAX_T + 40]
GEN_PROMPTS = ["ROMEO:\n", LONG_PROMPT]
SEEDED = [
    SamplingParams(temperature=0.9, top_k=20, seed=11),
    SamplingParams(temperature=1.1, seed=12),
    SamplingParams(temperature=0.7, top_k=3, seed=13),
]
GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="session")
def gen_onnx(shipped_repo):
    from charrnn import repository

    return shipped_repo / repository.GEN_ONNX / "1" / "model.onnx"


@pytest.fixture(scope="session")
def gen_proto(gen_onnx):
    import onnx

    return onnx.load(str(gen_onnx))


@pytest.fixture(scope="session")
def tf_texts(shipped):
    """(prompt, params) -> the TF reference ids, computed once."""
    from charrnn.sampling import Sampler

    model, vocab = shipped
    cache = {}

    def get(prompt: str, params: SamplingParams, length: int = GEN_LENGTH) -> list[int]:
        key = (prompt, params, length)
        if key not in cache:
            cache[key] = model.generate(vocab.encode(prompt), length, Sampler(params, len(vocab)))
        return cache[key]

    return get


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- tiny exports of every cell -------------------------------------------------------------------------
@dataclass
class Exported:
    """A model directory, its Keras model and vocab, and its ONNX export (path, proto, ORT session)."""

    cell: str
    model_dir: Path
    model: object
    vocab: Vocab
    onnx_path: Path
    proto: onnx.ModelProto
    session: object

    @property
    def contract(self) -> Contract:
        return self.model.config.contract

    @functools.cached_property
    def tf_step(self):
        """model.step as one tf.function traced once for any (B, T): eager Keras RNNs are far too slow here."""
        import tensorflow as tf

        spec = (
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None, *self.contract.state_dims], tf.float32),
        )
        step = tf.function(lambda ids, state: self.model.step(ids, state), input_signature=spec)
        return lambda ids, state: tuple(t.numpy() for t in step(ids, state))


def _export(model_dir: Path, onnx_path: Path) -> Exported:
    from charrnn.model import load_model_dir
    from export.onnx_export import export_onnx
    from export.verify import ort_session

    model, vocab, _ = load_model_dir(model_dir)
    proto = export_onnx(model, onnx_path)
    return Exported(
        model.config.cell, model_dir, model, vocab, onnx_path, proto, ort_session(onnx_path)
    )


@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory):
    """exported(cell) -> Exported for a tiny model of that cell (trained and exported once per session)."""
    cache: dict[str, Exported] = {}
    root = tmp_path_factory.mktemp("tiny-exports")

    def get(cell: str) -> Exported:
        if cell not in cache:
            model_dir = (
                tiny_model
                if cell == "lstm"
                else train_tiny(root / f"tiny-{cell}", ["--cell", cell, *TINY_OTHER_CELL])
            )
            cache[cell] = _export(model_dir, root / f"{cell}.onnx")
        return cache[cell]

    return get


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in proto.graph.node))


# --- local Triton servers (python backend) ----------------------------------------------------------------
SHORT_IDLE_US = 2_000_000  # short_idle_server's max_sequence_idle_microseconds


def start_server(repo: Path, run_dir: Path, models: tuple[str, ...] = (PYTHON,), **kw):
    from charrnn.local_triton import LocalTriton

    return LocalTriton.on_free_ports(repo=repo, run_dir=run_dir, models=models, **kw).start()


@pytest.fixture(scope="session")
def server(shipped_repo, tmp_path_factory):
    """A local server of charrnn_python alone, for the whole session (tests leave it as they found it)."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gen_server(shipped_repo, tmp_path_factory):
    """The non-decoupled python models (charrnn_python, charrnn_gen_python) on one local server."""
    s = start_server(
        shipped_repo, tmp_path_factory.mktemp("gen-serve"), models=SHARED_PYTHON_MODELS
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def stream_server(shipped_repo, tmp_path_factory):
    """The decoupled model on a server of its own (charrnn/repository.py DECOUPLED_MODELS: mixing crashes 2.51)."""
    s = start_server(
        shipped_repo, tmp_path_factory.mktemp("gen-stream-serve"), models=(GEN_STREAM,)
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ort_backend() -> Path:
    """Triton's ONNX Runtime backend, built from source as `make backend` does (nothing to do when up to date)."""
    from serve.backend import build

    return build()


@pytest.fixture(scope="session")
def ort_server(shipped_repo, ort_backend, tmp_path_factory):
    """charrnn_onnx and charrnn_gen_onnx on Triton's ONNX Runtime backend (built from source), with Triton's
    implicit state, for the whole session."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("ort-serve"), models=ORT_MODELS)
    yield s
    s.stop()


def with_idle_timeout(src: Path, dest: Path, names: tuple[str, ...], idle_us: int) -> Path:
    """A copy of `names` from repository `src` in `dest` whose configs free idle sequences after `idle_us`."""
    import shutil

    for name in names:
        shutil.copytree(src / name, dest / name)
        for config in (dest / name).rglob("*.pbtxt"):
            new, n = re.subn(
                r"max_sequence_idle_microseconds: \d+",
                f"max_sequence_idle_microseconds: {idle_us}",
                config.read_text(),
            )
            assert n == 1, f"{config} should set max_sequence_idle_microseconds once"
            config.write_text(new)
    return dest


@pytest.fixture(scope="module")
def short_idle_server(shipped_repo, tmp_path_factory):
    """A server whose charrnn_python frees idle sequences after 2 s (the model evicts 1 s later); one per test
    module, so evictions logged by one module's sequences never reach another's counts."""
    short = tmp_path_factory.mktemp("repo-short-idle")
    with_idle_timeout(shipped_repo, short, (PYTHON,), SHORT_IDLE_US)
    s = start_server(short, tmp_path_factory.mktemp("serve-short-idle"))
    assert f"idle eviction after {SHORT_IDLE_US / 1e6 + 1:.1f} s" in s.log_path.read_text()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def restartable(shipped_repo, tmp_path_factory):
    """A server the tests kill and restart (on the same ports): one per test module, never shared."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve-restart"))
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
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                pids.append(pid)
        except OSError:
            pass  # gone meanwhile
    return pids


def kill_server(server) -> None:
    """SIGKILL the server's process group (server + python stubs), as a crash would; clean /dev/shm after it."""
    pgid = server.process.pid
    regions = []
    for pid in group_pids(pgid):
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        regions += [a for a in args if a.startswith("triton_python_backend_shm_region_")]
    os.killpg(pgid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.process = None
    wait_for(lambda: not group_pids(pgid), 30, "the killed server's process group to be gone")
    for name in regions:  # a killed stub cannot unlink its shared memory region
        Path("/dev/shm", name).unlink(missing_ok=True)


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


def ensure_up(server) -> None:
    if server.process is None or server.process.poll() is not None:
        server.start()


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
        stats = client.get_inference_statistics(PYTHON, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0].get("inference_count", 0))


# --- the sequence lifecycle, as the python models log it ----------------------------------------------------
EVICTED = re.compile(r"evicted (\d+) idle sequence\(s\); (\d+) live")


def evictions(server, offset: int) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in EVICTED.findall(log_text(server, offset))]


# --- clients --------------------------------------------------------------------------------------------
def served(server, prompts, length, params, protocol="grpc", model=None, sequences=False, **kw):
    """Texts of the client library's generate() through `server` (anything with grpc_url / http_url /
    infer_key). model: None picks the first ready one, as the client does; kw: chunk, sequence_ids, retry,
    on_text, on_retry. sequences=True returns (texts, the client's Sequence objects)."""
    from client.connection import Connection
    from client.generate import generate

    conn = Connection(
        server.grpc_url if protocol == "grpc" else server.http_url,
        protocol,
        infer_key=server.infer_key,
    )
    try:
        model = conn.pick_model(None) if model is None else model
        vocab = conn.vocabulary(model)
        seqs = generate(conn, model, vocab, prompts, length, params, **kw)
    finally:
        conn.close()
    texts = [vocab.decode(s.generated) for s in seqs]
    return (texts, seqs) if sequences else texts


def chunked(server, model, prompts, params, chunk, length=GEN_LENGTH, on_text=None):
    from client.connection import Connection
    from client.generate import generate

    conn = Connection(server.grpc_url)
    try:
        vocab = conn.vocabulary(model)
        seqs = generate(
            conn, model, vocab, list(prompts), length, list(params), chunk=chunk, on_text=on_text
        )
    finally:
        conn.close()
    return [s.generated for s in seqs], seqs


def client_cmd(server, *args) -> list[str]:
    return [sys.executable, "-m", "client", "--url", server.grpc_url, "--model", PYTHON, *args]


def run_client_on(server, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m client --url <server> --model charrnn_python <args>`."""
    return subprocess.run(
        client_cmd(server, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def all_strings(node) -> list[str]:
    """Every string in a parsed YAML document, keys included (compose file, Kubernetes manifests)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in all_strings(k) + all_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in all_strings(v)]
    return []


# --- raw requests on one gRPC stream ------------------------------------------------------------------
class RawStream:
    """tritonclient requests on ONE stream; successes are routed by request id, errors (which carry no id
    on a stream) go to `errors`. Thread-safe sends: async_stream_infer only enqueues."""

    def __init__(self, url: str, model: str = PYTHON) -> None:
        import tritonclient.grpc as tc

        self.tc, self.model = tc, model
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
        self.client.async_stream_infer(
            self.model,
            [inp],
            request_id=rid,
            sequence_id=seq,
            sequence_start=start,
            sequence_end=end,
        )

    def logits(self, route: str, timeout=60.0) -> np.ndarray:
        with self.lock:
            q = self.results.setdefault(route, queue.Queue())
        try:
            return q.get(timeout=timeout)[1]
        except queue.Empty:
            pytest.fail(
                f"no result for {route} after {timeout:.0f} s; errors: {list(self.errors.queue)}"
            )

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
        return conn.vocabulary(PYTHON).encode(text).reshape(1, -1).astype(np.int32)
    finally:
        conn.close()


# --- Docker compose projects (tests/test_compose_slim.py, test_scale.py, test_failover.py) ------------------------
REQUIRE_DOCKER = os.environ.get("CHARRNN_REQUIRE_DOCKER") == "1"


def docker_or_skip() -> None:
    """Skip without a Docker engine and Compose v2, or fail when .ci/run requires them (CHARRNN_REQUIRE_DOCKER=1)."""
    from charrnn.errors import UnavailableError
    from serve.images import check_docker

    try:
        check_docker()
    except UnavailableError as e:
        why = f"needs a Docker engine and Compose v2: {e.message()}"
        if REQUIRE_DOCKER:
            pytest.fail(f"{why} -- CHARRNN_REQUIRE_DOCKER=1: these tests must run here")
        pytest.skip(why)


@dataclass
class ComposeStack:
    """One compose project of the PROFILES (set by a subclass) on free loopback ports."""

    PROFILES: ClassVar[tuple[str, ...]] = ()
    project: str
    env: dict
    http_port: int
    grpc_port: int

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def infer_key(self) -> str:
        return self.env["TRITON_INFER_KEY"]

    def compose(
        self, *args: str, timeout: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        profiles = [flag for profile in self.PROFILES for flag in ("--profile", profile)]
        return subprocess.run(
            ["docker", "compose", "-p", self.project, *profiles, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

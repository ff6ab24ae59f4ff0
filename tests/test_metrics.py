"""The python models' custom metrics (docs/production.md, "Metrics").

Without Triton: SequenceStates' counters and on_change deltas, MetricsSink, and the model files' guard when the
python backend has no metrics API. With real local servers (serve.local_triton) and the client library: the
values on /metrics, exactly: live sequences while sequences are open and after END, sequences started,
characters generated against what the client received, and abandoned sequences counted as evicted after a
short idle timeout. Waits are deadline-bounded polls, never fixed sleeps.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from charrnn.contract import INPUT_IDS, NOISE, TEMPERATURE, TOP_K
from charrnn.repository import GEN_PYTHON, GEN_STREAM, PYTHON, SHARED_PYTHON_MODELS
from charrnn.sampling import SamplingParams
from serve.runtime import sequence_state
from serve.runtime.sequence_state import END, METRICS, START, MetricsSink, SequenceStates
from tests.helpers import ROOT, wait_for

LIVE, STARTED, EVICTED, CHARS = (m[0] for m in METRICS)
NAMES = {LIVE, STARTED, EVICTED, CHARS}
SHORT_IDLE_S = 2  # the eviction server's max_sequence_idle_microseconds, in seconds (the model evicts 1 s later)


# === without Triton ==========================================================================================
def one(value: float, b: int = 1) -> np.ndarray:
    return np.full((b, 2, 2, 8), value, np.float32)  # (B, S, L, H)


class Clock:
    """Stands in for serve.runtime.sequence_state's time.monotonic."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(sequence_state, "time", fake)
    return fake


@pytest.fixture
def reported(clock):
    """A store (idle 100 s: the reaper's first pass is 5 s away) whose on_change deltas are collected."""
    deltas: list[dict[str, int]] = []
    s = SequenceStates((2, 2, 8), 100.0, log=lambda m: None, on_change=deltas.append)
    s.deltas = deltas
    yield s
    s.close()


def test_a_new_store_counts_nothing(reported):
    assert (
        reported.stats() == {"live": 0, "started": 0, "ended": 0, "evicted": 0}
        and reported.deltas == []
    )


def test_start_continue_and_end_are_counted_and_reported_as_deltas(reported):
    reported.scatter([(1, START), (2, START), (3, START)], one(1.0, 3))
    assert reported.deltas == [{"live": 3, "started": 3}]
    # continuing: nothing changes, nothing is reported
    reported.scatter([(1, 0), (2, 0)], one(2.0, 2))
    assert reported.deltas == [{"live": 3, "started": 3}]
    reported.scatter([(1, END), (3, 0)], one(3.0, 2))
    assert reported.deltas[-1] == {"live": -1, "ended": 1}
    assert reported.stats() == {"live": 2, "started": 3, "ended": 1, "evicted": 0}


def test_a_restart_under_a_live_id_and_a_one_request_sequence(reported):
    reported.scatter([(1, START)], one(1.0))
    # the client started id 1 again: started, still one live
    reported.scatter([(1, START)], one(2.0))
    assert reported.deltas[-1] == {"started": 1}
    reported.scatter([(2, START | END)], one(3.0))  # one request: started, never held, not "ended"
    assert reported.deltas[-1] == {"started": 1}
    assert reported.stats() == {"live": 1, "started": 3, "ended": 0, "evicted": 0}


def test_eviction_is_counted_and_reported(clock, reported):
    reported.scatter([(1, START), (2, START)], one(1.0, 2))  # at t = 1000
    clock.now = 1000 + 100 + 0.5  # past the batcher's timeout, not past the store's (+1 s)
    assert reported.evict_idle() == 0
    reported.scatter([(2, 0)], one(2.0))  # sequence 2 is used again
    clock.now = 1000 + 100 + 1.1
    assert reported.evict_idle() == 1
    assert reported.deltas[-1] == {"live": -1, "evicted": 1}
    assert reported.stats() == {"live": 1, "started": 2, "ended": 0, "evicted": 1}


def test_the_reaper_thread_reports_evictions(monkeypatch):
    """The real clock and reaper: idle 0 s -> evicted 1 s after the last use, checked every 0.25 s."""
    deltas, seen = [], threading.Event()

    def on_change(delta):
        deltas.append(delta)
        if "evicted" in delta:
            seen.set()

    s = SequenceStates((2, 2, 8), 0.0, log=lambda m: None, on_change=on_change)
    try:
        s.scatter([(7, START)], one(1.0))
        assert seen.wait(30), "the reaper evicted nothing within 30 s"
        assert deltas == [{"live": 1, "started": 1}, {"live": -1, "evicted": 1}]
        assert s.stats()["evicted"] == 1
    finally:
        s.close()


def test_close_reports_the_live_sequences_gone(reported):
    reported.scatter([(1, START), (2, START)], one(1.0, 2))
    reported.close()
    assert reported.deltas[-1] == {"live": -2}
    assert reported.stats()["live"] == 0


class FakeMetric:
    def __init__(self, fail: bool = False) -> None:
        self.value, self.calls, self.fail = 0.0, 0, fail

    def increment(self, value: float) -> None:
        if self.fail:
            raise RuntimeError("Invalid metric operation")
        assert isinstance(value, float)
        self.value += value
        self.calls += 1


def test_the_sink_increments_the_metric_of_each_key_and_ignores_the_rest():
    metrics = {key: FakeMetric() for *_, key in METRICS}
    sink = MetricsSink(metrics, log=pytest.fail)
    sink({"live": 3, "started": 3, "ended": 0})
    sink({"live": -1, "ended": 1, "evicted": 1, "characters": 40})
    sink({"characters": 0})  # zero: no call
    assert {k: m.value for k, m in metrics.items()} == {
        "live": 2,
        "started": 3,
        "evicted": 1,
        "characters": 40,
    }
    assert metrics["characters"].calls == 1


def test_a_failing_metric_is_logged_once_and_then_skipped():
    logged = []
    good, bad = FakeMetric(), FakeMetric(fail=True)
    sink = MetricsSink({"live": bad, "characters": good}, log=logged.append)
    sink({"live": 1, "characters": 2})
    sink({"live": 1, "characters": 2})
    assert good.value == 4 and len(logged) == 1 and "'live' disabled: RuntimeError" in logged[0]


def test_a_sink_without_metrics_or_after_close_takes_reports_silently():
    """A model serving without metrics (no metrics API) reports every change as usual, and a report that arrives
    after finalize() closed the sink must not touch the Metric objects it dropped: each such report is accepted,
    nothing is incremented, nothing is logged."""
    logged = []
    empty = MetricsSink(log=logged.append)
    empty({"live": 1, "started": 1, "characters": 5})
    empty({"live": -1, "ended": 1, "evicted": 1})
    metric = FakeMetric()
    closed = MetricsSink({"characters": metric, "live": metric}, log=logged.append)
    closed({"characters": 2})
    closed.close()
    closed({"live": -1, "evicted": 1, "characters": 5})
    assert (metric.value, metric.calls) == (2, 1), "a closed sink still incremented a metric"
    assert empty.metrics == closed.metrics == {} and logged == []


def test_concurrent_reports_add_up():
    metric = FakeMetric()
    sink = MetricsSink({"characters": metric})
    threads = [
        threading.Thread(target=lambda: [sink({"characters": 1}) for _ in range(500)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metric.value == 2000


def test_the_store_and_the_sink_together_mirror_stats(reported):
    metrics = {key: FakeMetric() for *_, key in METRICS}
    s = SequenceStates((2, 2, 8), 100.0, log=lambda m: None, on_change=MetricsSink(metrics))
    try:
        s.scatter([(1, START), (2, START), (3, START | END)], one(1.0, 3))
        s.scatter([(1, END)], one(1.0))
        stats = s.stats()
        assert (
            (metrics["live"].value, metrics["started"].value, metrics["evicted"].value)
            == (stats["live"], stats["started"], stats["evicted"])
            == (1, 3, 0)
        )
    finally:
        s.close()
    assert metrics["live"].value == 0


def fake_pb_utils(with_metrics: bool, fail: bool = False) -> types.ModuleType:
    """The parts of triton_python_backend_utils that create_metrics touches."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.logged = []
    pb.Logger = types.SimpleNamespace(log_info=pb.logged.append, log_warn=pb.logged.append)
    if with_metrics:

        class MetricFamily:
            COUNTER, GAUGE = "counter", "gauge"

            def __init__(self, name, description, kind):
                if fail:
                    raise RuntimeError("metrics not supported")
                self.name, self.kind = name, kind

            def Metric(self, labels=None):  # noqa: N802 (pb_utils' name)
                metric = FakeMetric()
                metric.family, metric.labels = self, labels
                return metric

        pb.MetricFamily = MetricFamily
    return pb


def load_model_file(path: Path, pb) -> types.ModuleType:
    """Import a model file with `pb` as triton_python_backend_utils (not left in sys.modules)."""
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = pb
    try:
        spec = importlib.util.spec_from_file_location(
            f"_metrics_test_{path.parent.name}_{path.stem}", path
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved


# Where the python models get create_metrics: charrnn_python's model.py imports it; the generation models'
# model.py files build a serve.runtime.gen_model.GenModel, which calls it from there.
MODEL_FILES = ["model.py", "gen_model.py"]


def create_metrics_of(name: str, pb):
    if name == "model.py":
        path = ROOT / "model_repository" / PYTHON / "1" / "model.py"
        return load_model_file(path, pb).create_metrics
    return importlib.import_module("serve.runtime.gen_model").create_metrics


@pytest.mark.parametrize("name", MODEL_FILES)
def test_create_metrics_makes_one_labelled_metric_per_family(name):
    pb = fake_pb_utils(with_metrics=True)
    families, sink = create_metrics_of(name, pb)(pb, "charrnn_x")
    assert [(f.name, f.kind) for f in families] == [
        (LIVE, "gauge"),
        (STARTED, "counter"),
        (EVICTED, "counter"),
        (CHARS, "counter"),
    ]
    assert {k: (m.family.name, m.labels) for k, m in sink.metrics.items()} == {
        "live": (LIVE, {"model": "charrnn_x"}),
        "started": (STARTED, {"model": "charrnn_x"}),
        "evicted": (EVICTED, {"model": "charrnn_x"}),
        "characters": (CHARS, {"model": "charrnn_x"}),
    }
    assert pb.logged == []


@pytest.mark.parametrize("name", MODEL_FILES)
@pytest.mark.parametrize("fail", [False, True], ids=["no-metrics-api", "metrics-not-supported"])
def test_without_metrics_the_model_serves_without_them_and_says_so(name, fail):
    pb = fake_pb_utils(with_metrics=fail, fail=fail)
    families, sink = create_metrics_of(name, pb)(pb, "charrnn_x")
    assert families == [] and sink.metrics == {}
    sink({"live": 1, "characters": 3})  # a no-op
    assert len(pb.logged) == 1 and pb.logged[0].startswith(
        "charrnn_x: custom metrics unavailable, serving " "without them ("
    )


# === on real local servers ===================================================================================
SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape_text(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def scrape(server, model: str) -> dict[str, float]:
    """{metric name: value} of our metrics labelled model=<model>."""
    values = {}
    for line in scrape_text(server).splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) in NAMES and dict(LABEL.findall(m.group(2))).get("model") == model:
            values[m.group(1)] = float(m.group(3))
    return values


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in (STARTED, EVICTED, CHARS)}


def copy_repo(
    shipped_repo: Path, dest: Path, models: tuple[str, ...], idle_s: int | None = None
) -> Path:
    """The shipped export's `models` in a repository of their own, with another idle timeout if given."""
    for name in models:
        shutil.copytree(shipped_repo / name, dest / name, symlinks=True)
        if idle_s is not None:
            config = dest / name / "config.pbtxt"
            text, n = re.subn(
                r"max_sequence_idle_microseconds: \d+",
                f"max_sequence_idle_microseconds: " f"{idle_s * 1_000_000}",
                config.read_text(),
            )
            assert n == 1, f"{config} should set max_sequence_idle_microseconds once"
            config.write_text(text)
    return dest


def start(repo: Path, run_dir: Path, models: tuple[str, ...]):
    from serve.local_triton import LocalTriton

    server = LocalTriton.on_free_ports(repo=repo, run_dir=run_dir, models=models).start()
    server.initial = {model: scrape(server, model) for model in models}  # before any request
    return server


@pytest.fixture(scope="module")
def shared(shipped_repo, tmp_path_factory):
    """charrnn_python and charrnn_gen_python as exported (idle 60 s) on a server of this module's own."""
    s = start(shipped_repo, tmp_path_factory.mktemp("metrics-serve"), SHARED_PYTHON_MODELS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def streaming(shipped_repo, tmp_path_factory):
    """charrnn_gen_stream (decoupled: a server of its own)."""
    s = start(shipped_repo, tmp_path_factory.mktemp("metrics-stream"), (GEN_STREAM,))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short_idle(shipped_repo, tmp_path_factory):
    """charrnn_python and charrnn_gen_python freeing sequences idle for SHORT_IDLE_S (model: + 1 s)."""
    repo = copy_repo(
        shipped_repo,
        tmp_path_factory.mktemp("metrics-repo-short-idle"),
        SHARED_PYTHON_MODELS,
        SHORT_IDLE_S,
    )
    s = start(repo, tmp_path_factory.mktemp("metrics-serve-short-idle"), SHARED_PYTHON_MODELS)
    assert f"idle eviction after {SHORT_IDLE_S + 1:.1f} s" in s.log_path.read_text()
    yield s
    s.stop()


@pytest.fixture(params=[PYTHON, GEN_PYTHON, GEN_STREAM])
def served(request):
    """(server, model) for each python model."""
    model = request.param
    return request.getfixturevalue("streaming" if model == GEN_STREAM else "shared"), model


def open_sequences(
    conn, model: str, vocab, n: int, prompt: str = "ROMEO:"
) -> list[tuple[int, int]]:
    """Start n sequences with one request each (the prompt; no END); returns [(sequence id, last id)] once
    every answer is in. A generation model generates K = 1 (greedy)."""
    from client.generate import new_sequence_ids

    ids = vocab.encode(prompt).reshape(1, -1).astype(np.int32)
    seq_ids = new_sequence_ids(n)
    for sid in seq_ids:
        conn.send(f"{sid}:open", model, request_inputs(model, ids), sid, start=True, end=False)
    answers = collect(conn, n)
    return [(sid, answers[f"{sid}:open"]) for sid in seq_ids]


def end_sequences(conn, model: str, opened: list[tuple[int, int]]) -> None:
    """Send each sequence's last id with END; return once every answer is in."""
    for sid, last in opened:
        conn.send(
            f"{sid}:end",
            model,
            request_inputs(model, np.array([[last]], np.int32)),
            sid,
            start=False,
            end=True,
        )
    collect(conn, len(opened))


def request_inputs(model: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    if model == PYTHON:
        return {INPUT_IDS: ids}
    v = 65
    return {
        INPUT_IDS: ids,
        NOISE: np.full((1, 1, v), 0.5, np.float32),
        TEMPERATURE: np.zeros((1, 1), np.float32),
        TOP_K: np.zeros((1, 1), np.int32),
    }


def collect(conn, n: int, timeout: float = 60.0) -> dict[str, int]:
    """n answers (one response each) -> {request id: the id they carry (argmax of LOGITS or OUTPUT_IDS)}."""
    import queue

    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            answer = conn.results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"{len(got)} of {n} answers after {timeout:.0f} s")
        assert answer.error is None, answer.error
        result = answer.result
        names = {o.name for o in result.get_response().outputs}
        got[answer.request_id] = (
            int(result.as_numpy("OUTPUT_IDS").reshape(-1)[0])
            if "OUTPUT_IDS" in names
            else int(np.argmax(result.as_numpy("LOGITS")[0]))
        )
    return got


def connect(server):
    from client.connection import Connection

    return Connection(server.grpc_url, infer_key=server.infer_key)


def test_every_metric_is_exposed_with_its_type_and_help_and_starts_at_zero(shared, streaming):
    text = scrape_text(shared)
    for name, kind, description, _ in METRICS:
        assert f"# TYPE {name} {kind.lower()}" in text
        assert f"# HELP {name} {description}" in text
    for server in (shared, streaming):
        for model, values in server.initial.items():
            assert values == {LIVE: 0, STARTED: 0, EVICTED: 0, CHARS: 0}, model


def test_live_sequences_rise_while_open_and_return_to_zero_after_end(served):
    server, model = served
    before = scrape(server, model)
    assert before[LIVE] == 0
    conn = connect(server)
    try:
        vocab = conn.vocabulary(model)
        first = open_sequences(conn, model, vocab, 2)
        now = scrape(server, model)
        assert now[LIVE] == 2 and delta(now, before) == {STARTED: 2, EVICTED: 0, CHARS: 2}
        second = open_sequences(conn, model, vocab, 3, prompt="JULIET:\nO Romeo")
        now = scrape(server, model)
        assert now[LIVE] == 5 and delta(now, before) == {STARTED: 5, EVICTED: 0, CHARS: 5}
        end_sequences(conn, model, first)
        now = scrape(server, model)
        assert now[LIVE] == 3 and delta(now, before) == {STARTED: 5, EVICTED: 0, CHARS: 7}
        end_sequences(conn, model, second)
    finally:
        conn.close()
    after = scrape(server, model)
    # Every request gave one character (a step model's LOGITS, or K = 1 ids), the END requests too.
    assert after[LIVE] == 0 and delta(after, before) == {STARTED: 5, EVICTED: 0, CHARS: 10}


@pytest.mark.parametrize("length", [1, 37])
def test_characters_generated_equal_what_the_client_received(served, length):
    from client.generate import complete

    server, model = served
    chunk = None if model == PYTHON else 8  # K = 8: the last request of 37 asks for 5
    params = [
        SamplingParams(temperature=0.9, top_k=20, seed=3),
        SamplingParams(greedy=True),
        SamplingParams(temperature=1.1, seed=4),
    ]
    before = scrape(server, model)
    conn = connect(server)
    try:
        seqs = complete(
            conn,
            model,
            conn.vocabulary(model),
            ["ROMEO:", "First Citizen:\n", "KING"],
            length,
            params,
            chunk=chunk,
        )
    finally:
        conn.close()
    after = scrape(server, model)
    received = sum(len(s.generated) for s in seqs)
    assert received == 3 * length
    # Prompts of one chunk: every request the client sent answered characters it kept, so the counts agree.
    assert delta(after, before) == {STARTED: 3, EVICTED: 0, CHARS: received}
    assert after[LIVE] == 0


def test_abandoned_sequences_are_counted_as_evicted_after_the_idle_timeout(short_idle):
    from client.generate import complete

    before = {model: scrape(short_idle, model) for model in SHARED_PYTHON_MODELS}
    conn = connect(short_idle)
    try:
        opened = {
            model: open_sequences(conn, model, conn.vocabulary(model), n)
            for model, n in zip(SHARED_PYTHON_MODELS, (3, 2))
        }
        # A sequence run to its END meanwhile is not evicted.
        seqs = complete(
            conn,
            GEN_PYTHON,
            conn.vocabulary(GEN_PYTHON),
            ["ROMEO:"],
            12,
            SamplingParams(greedy=True),
            chunk=4,
        )
    finally:
        conn.close()  # the opened sequences are abandoned: no END
    assert len(seqs[0].generated) == 12
    for model in SHARED_PYTHON_MODELS:
        now = scrape(short_idle, model)
        n = len(opened[model])
        assert now[LIVE] == n and delta(now, before[model])[EVICTED] == 0, model

    # Triton frees the slots after SHORT_IDLE_S, the model one second later (its reaper looks every 0.75 s).
    def evicted() -> bool:
        return all(
            scrape(short_idle, m)[EVICTED] - before[m][EVICTED] >= len(opened[m]) for m in opened
        )

    t0 = time.monotonic()
    wait_for(evicted, 60, "the abandoned sequences to be counted as evicted", period=0.2)
    assert time.monotonic() - t0 < 60
    for model in SHARED_PYTHON_MODELS:
        after = scrape(short_idle, model)
        n = len(opened[model])
        extra = 1 if model == GEN_PYTHON else 0  # the generated sequence
        assert after[LIVE] == 0, model
        assert delta(after, before[model]) == {
            STARTED: n + extra,
            EVICTED: n,
            CHARS: n + 12 * extra,
        }, model
    log = short_idle.log_path.read_text()
    assert sum(int(k) for k in re.findall(r"evicted (\d+) idle sequence\(s\)", log)) == 5

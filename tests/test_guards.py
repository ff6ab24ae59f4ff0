"""export/guards.py for real: the exported step and generation graphs of the shipped model refuse bad input at
run time in ONNX Runtime (what Triton's ONNX Runtime backend runs, with no Python in front), with the guard's
message (charrnn.contract.GUARD_MESSAGES) in the error; valid input gives exactly what the unguarded graph gives.

The guarded graphs are conftest's `python -m export` of the shipped model; the unguarded ones are exported here
with guard=False. The python models check requests first (check_ids / check_gen_request): every case a guard
refuses, they refuse too, so they never reach a guard.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from charrnn.contract import (
    GUARD_PREFIX,
    INPUT_IDS,
    LOGITS,
    MAX_K,
    MAX_T,
    MIN_TEMPERATURE,
    NOISE,
    OUTPUT_IDS,
    STATE_IN,
    STATE_OUT,
    TEMPERATURE,
    TOP_K,
)
from charrnn.onnx_runtime import ort_session
from export.guards import CHECKED, guard_messages, guard_nodes
from export.trt_check import _nodes, check_model
from serve.runtime.gen_serving import check_gen_request
from serve.runtime.sequence_state import check_ids

V = 65  # the shipped vocabulary
MESSAGES = guard_messages(V)
STATE_DIMS = (2, 2, 512)
F32 = np.float32


@pytest.fixture(scope="module")
def unguarded(shipped, tmp_path_factory):
    """{"step": session, "gen": session} of the shipped model exported WITHOUT the guards."""
    from export.gen_export import export_gen_onnx
    from export.onnx_export import export_onnx

    model, _ = shipped
    out = tmp_path_factory.mktemp("unguarded")
    export_onnx(model, out / "step.onnx", guard=False)
    export_gen_onnx(model, out / "gen.onnx", guard=False)
    return {kind: ort_session(out / f"{kind}.onnx") for kind in ("step", "gen")}


@pytest.fixture(scope="module")
def guarded(shipped_onnx, gen_onnx):
    return {"step": ort_session(shipped_onnx), "gen": ort_session(gen_onnx, threads=2)}


def state(batch: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((batch, *STATE_DIMS))).astype(F32)


def step_feeds(ids) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int32)
    return {INPUT_IDS: ids, STATE_IN: state(ids.shape[0])}


def gen_feeds(ids=((20, 30, 40),), k=3, noise=None, temperature=1.0, top_k=0) -> dict:
    """A batch of len(ids) rows; temperature / top_k: one value for every row, or one per row."""
    ids = np.asarray(ids, np.int32)
    b = ids.shape[0]
    if noise is None:
        noise = np.random.default_rng(1).uniform(0.01, 0.99, (b, k, V)).astype(F32)
    return {
        INPUT_IDS: ids,
        STATE_IN: state(b),
        NOISE: np.asarray(noise, F32),
        TEMPERATURE: np.broadcast_to(np.asarray(temperature, F32).reshape(-1, 1), (b, 1)).copy(),
        TOP_K: np.broadcast_to(np.asarray(top_k, np.int32).reshape(-1, 1), (b, 1)).copy(),
    }


def refused(session, feeds: dict, name: str) -> str:
    """Run and expect the guard of input `name` to refuse: returns ONNX Runtime's error text."""
    with pytest.raises(InvalidArgument) as e:
        session.run(None, feeds)
    text = str(e.value)
    # the node name arrives whole, quoted, as the message
    assert f"Name:'{MESSAGES[name]}'" in text, text
    return text


# --- the graphs -------------------------------------------------------------------------------------------
def test_messages_are_the_contracts_with_the_models_limits():
    assert MESSAGES[INPUT_IDS] == (
        "refused: INPUT_IDS: every id must be in 0..64 and 1 <= T <= 256 (send ids of the model vocabulary; "
        "split longer prompts into chunks; one bad request fails its whole batch)"
    )
    assert f"1..{MAX_K}" in MESSAGES[NOISE] and "(0, 1)" in MESSAGES[NOISE]
    assert f">= {MIN_TEMPERATURE}" in MESSAGES[TEMPERATURE]
    assert f"0..{V}" in MESSAGES[TOP_K]
    for message in MESSAGES.values():
        # ORT quotes the name in '...'
        assert message.startswith(GUARD_PREFIX) and "'" not in message
        assert message.isascii()


@pytest.mark.parametrize("kind", ["step", "gen"])
def test_guards_are_named_by_their_messages_come_first_and_are_tensorrt_ready(
    kind, shipped_proto, gen_proto
):
    proto = shipped_proto if kind == "step" else gen_proto
    inputs = [INPUT_IDS] if kind == "step" else [INPUT_IDS, NOISE, TEMPERATURE, TOP_K]
    assert guard_nodes(proto.graph) == {MESSAGES[name]: name for name in inputs}
    # Every node outside the guards (Loop bodies included) reads the checked value, never the raw input:
    # nothing of the model can run before its guard.
    for node in _nodes(proto.graph):
        if node.name.startswith(("guard/", GUARD_PREFIX)):
            continue
        raw = set(node.input) & set(inputs)
        assert not raw, f"{node.op_type} {node.name} reads {raw} unchecked"
    readers = {name for node in proto.graph.node for name in node.input}
    assert {CHECKED.format(name) for name in inputs} <= readers
    assert STATE_IN in readers  # unguarded, like the python models
    report = check_model(proto)
    assert report.ready, report.text()
    onnx.checker.check_model(proto)


# --- INPUT_IDS: both graphs ---------------------------------------------------------------------------------
BAD_IDS = {
    "-1": [[5, -1, 7]],
    "65": [[5, 65]],
    "2^31-1": [[2**31 - 1]],
    "-2^31": [[-(2**31)]],
    "T=0": np.zeros((1, 0), np.int32),
    "T=257": np.zeros((1, MAX_T + 1), np.int32),
}


@pytest.mark.parametrize("kind", ["step", "gen"])
@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_input_ids_are_refused(guarded, kind, case):
    ids = np.asarray(BAD_IDS[case], np.int32)
    assert check_ids(ids, V, MAX_T) is not None  # the python models refuse it first
    feeds = step_feeds(ids) if kind == "step" else gen_feeds(ids)
    refused(guarded[kind], feeds, INPUT_IDS)


@pytest.mark.parametrize("kind", ["step", "gen"])
def test_edge_ids_and_lengths_are_accepted(guarded, kind):
    for ids in ([[0, V - 1]], np.full((1, MAX_T), V - 1)):
        feeds = step_feeds(ids) if kind == "step" else gen_feeds(ids)
        guarded[kind].run(None, feeds)


# Run in a fresh process so its peak RSS measures this call alone: the unguarded step graph's embedding would
# allocate 2e6 x 512 floats (4 GB; measured: 11.9 GB RSS after 20 s, still running).
HUGE_T = """
import json, resource, sys, time
import numpy as np, onnxruntime as ort
from charrnn.contract import INPUT_IDS, NOISE, STATE_IN, TEMPERATURE, TOP_K
step, gen = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in sys.argv[1:3])
state = np.zeros((1, 2, 2, 512), np.float32)
sampling = {NOISE: np.full((1, 1, 65), 0.5, np.float32), TEMPERATURE: np.zeros((1, 1), np.float32),
            TOP_K: np.zeros((1, 1), np.int32)}
ids = np.zeros((1, 3), np.int32)
step.run(None, {INPUT_IDS: ids, STATE_IN: state})  # warm: arenas, thread pools
gen.run(None, {INPUT_IDS: ids, STATE_IN: state, **sampling})
huge = np.zeros((1, 2_000_000), np.int32)
out = []
for session, extra in ((step, {}), (gen, sampling)):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        session.run(None, {INPUT_IDS: huge, STATE_IN: state, **extra})
        error = None
    except Exception as e:
        error = str(e)
    seconds = time.perf_counter() - t
    out.append({"error": error, "seconds": seconds,
                "growth": 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)})
print(json.dumps(out))
"""


def test_two_million_ids_fail_in_the_guard_fast_and_without_allocating(shipped_onnx, gen_onnx):
    huge = np.zeros((1, 2_000_000), np.int32)
    assert check_ids(huge, V, MAX_T) is not None
    done = subprocess.run(
        [sys.executable, "-c", HUGE_T, str(shipped_onnx), str(gen_onnx)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for kind, result in zip(("step", "gen"), json.loads(done.stdout.splitlines()[-1])):
        assert result["error"] and f"Name:'{MESSAGES[INPUT_IDS]}'" in result["error"], result
        assert result["seconds"] < 1.0, f"{kind}: {result}"
        # the embedding would need 2e6 * 512 * 4 bytes = 4 GB; the guard reads the 8 MB of ids
        assert result["growth"] < 64 * 2**20, f"{kind}: {result}"


# --- NOISE, TEMPERATURE, TOP_K: the generation graph ---------------------------------------------------------
def noise_with(value) -> np.ndarray:
    """Valid uniforms (1, 3, V) with one bad value in the middle."""
    noise = np.random.default_rng(2).uniform(0.01, 0.99, (1, 3, V)).astype(F32)
    noise[0, 1, 30] = value
    return noise


BAD_SAMPLING = {
    "K=0": (NOISE, {"noise": np.zeros((1, 0, V), F32)}),
    "K=257": (NOISE, {"k": MAX_K + 1}),
    "noise NaN": (NOISE, {"noise": noise_with(np.nan)}),
    "noise inf": (NOISE, {"noise": noise_with(np.inf)}),
    "noise -inf": (NOISE, {"noise": noise_with(-np.inf)}),
    "noise 0": (NOISE, {"noise": noise_with(0.0)}),
    "noise 1": (NOISE, {"noise": noise_with(1.0)}),
    "noise -0.5": (NOISE, {"noise": noise_with(-0.5)}),
    "temperature NaN": (TEMPERATURE, {"temperature": np.nan}),
    "temperature inf": (TEMPERATURE, {"temperature": np.inf}),
    "temperature -1": (TEMPERATURE, {"temperature": -1.0}),
    "temperature 1e-4": (TEMPERATURE, {"temperature": 1e-4}),
    "temperature just below the floor": (
        TEMPERATURE,
        {"temperature": np.nextafter(F32(MIN_TEMPERATURE), F32(0))},
    ),
    "temperature subnormal": (TEMPERATURE, {"temperature": 1e-45}),
    "top_k -1": (TOP_K, {"top_k": -1}),
    "top_k V+1": (TOP_K, {"top_k": V + 1}),
    "top_k 2^31-1": (TOP_K, {"top_k": 2**31 - 1}),
}


def python_check(feeds: dict) -> str | None:
    """What the python generation models answer for the same (batch-1) request."""
    return check_gen_request(feeds, V, MAX_T, MAX_K)


@pytest.mark.parametrize("case", list(BAD_SAMPLING))
def test_bad_sampling_inputs_are_refused(guarded, case):
    name, kw = BAD_SAMPLING[case]
    feeds = gen_feeds(**kw)
    assert python_check(feeds) is not None, "the python models refuse it first"
    refused(guarded["gen"], feeds, name)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.0},  # greedy
        {"temperature": -0.0},  # == 0: greedy too
        {"temperature": MIN_TEMPERATURE},  # the floor itself (fp32 0.001 >= the fp32 floor)
        {"temperature": 1e30},
        {"top_k": 0},
        {"top_k": V},
        {"k": 1},
        {"k": MAX_K},
        {"noise": np.full((1, 3, V), np.nextafter(F32(0), F32(1)))},  # smallest positive
        {"noise": np.full((1, 3, V), np.nextafter(F32(1), F32(0)))},  # largest below 1
    ],
    ids=lambda kw: ",".join(f"{k}={np.ravel(v)[0]!r}" for k, v in kw.items()),
)
def test_valid_edge_values_are_accepted_like_the_python_models_do(guarded, unguarded, kw):
    feeds = gen_feeds(**kw)
    assert python_check(feeds) is None
    got = guarded["gen"].run([OUTPUT_IDS, STATE_OUT], feeds)
    want = unguarded["gen"].run([OUTPUT_IDS, STATE_OUT], feeds)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)


# --- valid input: exactly the unguarded graph's results -----------------------------------------------------
@pytest.mark.parametrize("batch, T", [(1, 1), (3, 17), (64, 1), (5, MAX_T)])
def test_step_results_are_bit_identical_to_the_unguarded_graph(guarded, unguarded, batch, T):
    rng = np.random.default_rng(batch * 1000 + T)
    feeds = {
        INPUT_IDS: rng.integers(0, V, (batch, T), dtype=np.int32),
        STATE_IN: state(batch, seed=T),
    }
    got = guarded["step"].run([LOGITS, STATE_OUT], feeds)
    want = unguarded["step"].run([LOGITS, STATE_OUT], feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)


@pytest.mark.parametrize("k", [1, 24])
def test_generation_results_are_bit_identical_to_the_unguarded_graph(guarded, unguarded, k):
    """Greedy, at the floor, sampled, top-k 1 / 5 / V rows in one batch."""
    rng = np.random.default_rng(k)
    temperature = [0.0, MIN_TEMPERATURE, 0.8, 1.5, 1.0, 2.0]
    top_k = [0, 0, 5, 1, V, 0]
    ids = rng.integers(0, V, (len(temperature), 9), dtype=np.int32)
    noise = rng.random((len(temperature), k, V), dtype=F32) + F32(1e-7)
    feeds = gen_feeds(ids, k, noise, temperature, top_k)
    got = guarded["gen"].run([OUTPUT_IDS, STATE_OUT], feeds)
    want = unguarded["gen"].run([OUTPUT_IDS, STATE_OUT], feeds)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)


# --- per batch ----------------------------------------------------------------------------------------------
def test_one_bad_row_fails_the_whole_batch(guarded):
    """Documented behaviour (docs/model.md): the checks are per execution, not per row. Triton batches several
    sequences' requests into one execution, so every request of that batch gets the error."""
    good = [[10, 20]]
    guarded["step"].run(None, step_feeds(good + good))
    refused(guarded["step"], step_feeds(good + [[10, -1]]), INPUT_IDS)
    guarded["gen"].run(None, gen_feeds(good + good, temperature=[1.0, 0.0]))
    refused(guarded["gen"], gen_feeds(good + good, temperature=[1.0, -1.0]), TEMPERATURE)
    refused(guarded["gen"], gen_feeds(good + good, top_k=[V + 1, 0]), TOP_K)

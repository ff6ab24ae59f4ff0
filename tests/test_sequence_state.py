"""serve.runtime.sequence_state without Triton: config/model loading, request checks, the state store and idle eviction."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from charrnn.contract import (
    INPUT_IDS,
    LIVE_ID_MESSAGE,
    LOGITS,
    MAX_BATCH_SIZE,
    MAX_SEQUENCE_IDLE_US,
    MAX_SEQUENCES,
    MAX_T,
    NOISE,
    STATE_IN,
    STATE_OUT,
    ErrorCode,
)
from charrnn.repository import GEN_PYTHON, PYTHON, load_config, vocab_of
from serve.runtime import sequence_state
from serve.runtime.sequence_state import END, START, SequenceStates, check_ids, load_stateful_model
from tests.helpers import SHIPPED_MODEL

# what charrnn_python's initialize() asks for
STEP_TENSORS = {
    INPUT_IDS: "tensor(int32)",
    STATE_IN: "tensor(float)",
    LOGITS: "tensor(float)",
    STATE_OUT: "tensor(float)",
}
V = 65  # the shipped vocabulary


def config_json(model_dir) -> dict:
    """The model's config.pbtxt as the JSON Triton passes to initialize() (field names kept, int64 as strings)."""
    return json_format.MessageToDict(load_config(model_dir), preserving_proto_field_name=True)


def triton_args(model_dir, config: dict | None = None) -> dict:
    """initialize(args) as Triton's python backend fills it for <model_dir>/1/model.py."""
    return {
        "model_config": json.dumps(config_json(model_dir) if config is None else config),
        "model_name": model_dir.name,
        "model_repository": str(model_dir),
        "model_version": "1",
    }


def unknown(idle: str) -> tuple[ErrorCode, str]:
    return ErrorCode.UNKNOWN_SEQUENCE, (
        f"unknown sequence (never started, ended, or idle longer than {idle} s) "
        "(start it again with sequence_start=True)"
    )


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def python_dir(shipped_repo):
    return shipped_repo / PYTHON


@pytest.fixture(scope="module")
def step(python_dir):
    """The StatefulModel of charrnn_python: its exported config and the step graph model.onnx in ONNX Runtime."""
    return load_stateful_model(triton_args(python_dir), STEP_TENSORS)


@pytest.fixture(scope="module")
def vocab(python_dir):
    return vocab_of(load_config(python_dir))


@pytest.fixture
def states(step):
    s = SequenceStates(
        tuple(step.io[STATE_IN].shape[1:]), step.idle_seconds, log=lambda message: None
    )
    yield s
    s.close()


def execute(step, states, members, ids):
    """What charrnn_python's execute() does with one group of equal T: check, gather, ONE ORT call, scatter.
    members [(corr, flags)], ids (B, T) -> logits (B, V)."""
    with states.lock:
        assert [states.check(corr, flags) for corr, flags in members] == [None] * len(members)
        logits, new_state = step.session.run(
            [LOGITS, STATE_OUT],
            {INPUT_IDS: np.asarray(ids, np.int32), STATE_IN: states.gather(members)},
        )
        states.scatter(members, new_state)
    return logits


def direct(step, ids, state=None):
    """The independent computation: ONNX Runtime with the state carried by the caller. ids (T,) -> (V,), (S, L, H)."""
    state = (
        np.zeros((1, *step.io[STATE_IN].shape[1:]), np.float32) if state is None else state[None]
    )
    logits, new_state = step.session.run(
        [LOGITS, STATE_OUT], {INPUT_IDS: np.asarray(ids, np.int32)[None], STATE_IN: state}
    )
    return logits[0], new_state[0]


# --- load_stateful_model ----------------------------------------------------------------------------------
def test_the_exported_step_model_loads_with_its_config_values(step, python_dir):
    model_config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert step.config["name"] == PYTHON
    assert step.idle_seconds == MAX_SEQUENCE_IDLE_US / 1e6 == 60.0
    assert step.threads == int(load_config(python_dir).parameters["intra_op_threads"].string_value)
    slots = 2 if model_config["cell"] == "lstm" else 1
    # (S, L, H)
    assert tuple(step.io[STATE_IN].shape[1:]) == (
        slots,
        model_config["layers"],
        model_config["hidden"],
    )
    assert step.io[LOGITS].shape[1] == model_config["vocab_size"] == V
    assert {n: step.io[n].type for n in STEP_TENSORS} == STEP_TENSORS


def test_defaults_one_second_idle_and_one_thread(step, python_dir):
    config = config_json(python_dir)
    del config["sequence_batching"]["max_sequence_idle_microseconds"]  # Triton's default then: 1 s
    del config["parameters"]["intra_op_threads"]
    model = load_stateful_model(triton_args(python_dir, config), STEP_TENSORS)
    assert (model.idle_seconds, model.threads) == (1.0, 1)


def _no_batching(c):
    c.pop("max_batch_size")


def _zero_batch(c):
    c["max_batch_size"] = 0


def _no_sequence_batching(c):
    c.pop("sequence_batching")


def _direct(c):
    c["sequence_batching"].pop("oldest")
    c["sequence_batching"]["direct"] = {}


def _threads(value):
    def mutate(c):
        c["parameters"]["intra_op_threads"] = {"string_value": value}

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_no_batching, f"{PYTHON} requires max_batch_size >= 1, got 0"),
        (_zero_batch, f"{PYTHON} requires max_batch_size >= 1, got 0"),
        (_no_sequence_batching, f"{PYTHON} requires sequence_batching, got none"),
        (
            _direct,
            f"{PYTHON} requires the oldest strategy, got direct (direct pads batches with null requests)",
        ),
        (
            _threads("0"),
            f"{PYTHON} requires parameter intra_op_threads to be an integer >= 1, got '0'",
        ),
        (
            _threads("-2"),
            f"{PYTHON} requires parameter intra_op_threads to be an integer >= 1, got '-2'",
        ),
        (
            _threads("two"),
            f"{PYTHON} requires parameter intra_op_threads to be an integer >= 1, got 'two'",
        ),
        (
            _threads("\u00b2"),
            f"{PYTHON} requires parameter intra_op_threads to be an integer >= 1, got '\u00b2'",
        ),
        (
            _threads(""),
            f"{PYTHON} requires parameter intra_op_threads to be an integer >= 1, got ''",
        ),
    ],
    ids=[
        "no-max_batch_size",
        "max_batch_size-0",
        "no-sequence_batching",
        "direct",
        "threads-0",
        "threads-neg",
        "threads-word",
        "threads-superscript",
        "threads-empty",
    ],
)
def test_a_config_the_model_cannot_serve_is_refused(python_dir, mutate, message):
    config = config_json(python_dir)
    mutate(config)
    with pytest.raises(ValueError) as e:
        load_stateful_model(triton_args(python_dir, config), STEP_TENSORS)
    assert str(e.value) == message


def test_a_missing_model_onnx_is_refused_with_its_path(python_dir, tmp_path):
    folder = tmp_path / PYTHON
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(python_dir / "config.pbtxt", folder / "config.pbtxt")
    with pytest.raises(ValueError) as e:
        load_stateful_model(triton_args(folder), STEP_TENSORS)
    assert str(e.value) == (
        f"{PYTHON} requires {folder / '1' / 'model.onnx'}, got no such file " "(run `make export`)"
    )


def test_a_broken_model_onnx_is_a_value_error(python_dir, tmp_path):
    folder = tmp_path / PYTHON
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(python_dir / "config.pbtxt", folder / "config.pbtxt")
    (folder / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match=rf"^cannot load .*/{PYTHON}/1/model\.onnx \("):
        load_stateful_model(triton_args(folder), STEP_TENSORS)


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {**STEP_TENSORS, NOISE: "tensor(float)"},
            f"{PYTHON} requires ONNX NOISE tensor(float), got no such tensor",
        ),
        (
            {INPUT_IDS: "tensor(int64)"},
            f"{PYTHON} requires ONNX INPUT_IDS tensor(int64), got tensor(int32)",
        ),
        (
            {STATE_OUT: "tensor(float16)"},
            f"{PYTHON} requires ONNX STATE_OUT tensor(float16), got tensor(float)",
        ),
    ],
    ids=["missing-tensor", "input-dtype", "output-dtype"],
)
def test_a_graph_without_the_needed_tensors_is_refused(python_dir, tensors, message):
    with pytest.raises(ValueError) as e:
        load_stateful_model(triton_args(python_dir), tensors)
    assert str(e.value) == message


def initialize_args(model_dir: Path, config) -> dict:
    """What Triton passes to TritonPythonModel.initialize: the config as JSON, the model's folder and version."""
    from google.protobuf.json_format import MessageToJson

    return {
        "model_config": MessageToJson(config, preserving_proto_field_name=True),
        "model_name": config.name,
        "model_repository": str(model_dir),
        "model_version": "1",
    }


def test_load_stateful_model_reads_the_config_and_opens_the_graph(shipped_repo):
    from charrnn.repository import load_config
    from serve.runtime.sequence_state import load_stateful_model

    config = load_config(shipped_repo / PYTHON / "config.pbtxt")
    model = load_stateful_model(initialize_args(shipped_repo / PYTHON, config), STEP_TENSORS)
    assert (
        model.idle_seconds == config.sequence_batching.max_sequence_idle_microseconds / 1e6 == 60.0
    )
    assert model.threads == int(config.parameters["intra_op_threads"].string_value)
    assert model.io["LOGITS"].shape[1] == 65 and model.io["STATE_IN"].shape[1:] == [2, 2, 512]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c, d: setattr(c, "max_batch_size", 0),
            f"{PYTHON} requires max_batch_size >= 1, got 0",
        ),
        (
            lambda c, d: c.ClearField("sequence_batching"),
            f"{PYTHON} requires sequence_batching, got none",
        ),
        (
            lambda c, d: c.sequence_batching.direct.SetInParent(),
            f"{PYTHON} requires the oldest strategy, got direct",
        ),
        (
            lambda c, d: c.parameters["intra_op_threads"].__setattr__("string_value", "two"),
            f"{PYTHON} requires parameter intra_op_threads to be an integer >= 1, got 'two'",
        ),
        (
            lambda c, d: (d / "1" / "model.onnx").unlink(),
            "/1/model.onnx, got no such file (run `make export`)",
        ),
        (
            lambda c, d: shutil.copy(
                d.parent / GEN_PYTHON / "1" / "model.onnx", d / "1" / "model.onnx"
            ),
            f"{PYTHON} requires ONNX LOGITS tensor(float), got no such tensor",
        ),
    ],
)
def test_load_stateful_model_refuses_what_the_model_cannot_serve(
    shipped_repo, tmp_path, change, message
):
    from charrnn.repository import load_config
    from serve.runtime.sequence_state import load_stateful_model

    repo = tmp_path / "repo"  # a copy: the change must not reach the session's repository
    for name in (PYTHON, GEN_PYTHON):
        shutil.copytree(shipped_repo / name, repo / name)
    config = load_config(repo / PYTHON / "config.pbtxt")
    change(config, repo / PYTHON)
    with pytest.raises(ValueError) as e:
        load_stateful_model(initialize_args(repo / PYTHON, config), STEP_TENSORS)
    assert message in str(e.value)


# --- check_ids --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, message",
    [
        (np.zeros((1, 3), np.int64), "INPUT_IDS: dtype must be INT32, got int64"),
        (np.zeros((1, 3), np.float32), "INPUT_IDS: dtype must be INT32, got float32"),
        (
            np.zeros((2, 3), np.int32),
            "INPUT_IDS: shape must be [1, T] with 1 <= T <= 256, got [2, 3] (send long prompts in chunks)",
        ),
        (
            np.zeros((1, 0), np.int32),
            "INPUT_IDS: shape must be [1, T] with 1 <= T <= 256, got [1, 0] (send long prompts in chunks)",
        ),
        (
            np.zeros((1, MAX_T + 1), np.int32),
            "INPUT_IDS: shape must be [1, T] with 1 <= T <= 256, got [1, 257] (send long prompts in chunks)",
        ),
        (
            np.zeros((3,), np.int32),
            "INPUT_IDS: shape must be [1, T] with 1 <= T <= 256, got [3] (send long prompts in chunks)",
        ),
        (np.array([[3, 65, 7]], np.int32), "INPUT_IDS: ids must be in 0..64, got 3..65"),
        (
            np.array([[3, -1, 7]], np.int32),
            "INPUT_IDS: ids must be in 0..64, got -1..7 (an HTTP JSON value outside the INT32 range arrives wrapped)",
        ),
    ],
    ids=["int64", "float32", "batch-2", "T-0", "T-257", "1-D", "id-65", "id-negative"],
)
def test_check_ids_names_what_is_wrong(ids, message):
    assert check_ids(ids, V, MAX_T) == message


def test_check_ids_accepts_the_edges_and_names_the_tensor():
    assert check_ids(np.array([[0, V - 1]], np.int32), V, MAX_T) is None
    assert check_ids(np.full((1, MAX_T), V - 1, np.int32), V, MAX_T) is None
    assert (
        check_ids(np.array([[V]], np.int32), V, MAX_T, name="X")
        == "X: ids must be in 0..64, got 65..65"
    )


# --- the state store on the real step graph -----------------------------------------------------------------
@pytest.mark.parametrize("corr", [7, "chat-7"], ids=["uint64-id", "string-id"])
def test_start_continue_end_match_onnx_runtime_with_explicit_state(step, states, vocab, corr):
    prompt, more = vocab.encode("ROMEO:\n"), vocab.encode("O")
    want1, s1 = direct(step, prompt)
    want2, s2 = direct(step, more, s1)
    want3, _ = direct(step, more, s2)

    got1 = execute(step, states, [(corr, START)], prompt[None])
    np.testing.assert_allclose(got1[0], want1, atol=1e-5)
    # (S, L, H) stored for the next request
    np.testing.assert_allclose(states.states[corr], s1, atol=1e-5)
    got2 = execute(step, states, [(corr, 0)], more[None])
    np.testing.assert_allclose(got2[0], want2, atol=1e-5)
    # it did use the state: not a fresh start
    assert not np.allclose(got2[0], direct(step, more)[0], atol=1e-3)
    got3 = execute(step, states, [(corr, END)], more[None])
    np.testing.assert_allclose(got3[0], want3, atol=1e-5)
    assert len(states) == 0 and corr not in states.last_used  # END freed it
    assert states.check(corr, 0) == unknown("60")


def test_sequences_in_one_batch_keep_their_own_state(step, states, vocab):
    prompts = {1: "ROMEO:\n", 2: "JULIET:\n", 3: "First Citizen:\n"}
    carried = {}
    for corr, text in prompts.items():  # primed alone, prompts of different T
        execute(step, states, [(corr, START)], vocab.encode(text)[None])
        carried[corr] = direct(step, vocab.encode(text))[1]
    # one batch: three continuing sequences (one of them ends) and a new one, all T = 2
    members = [(1, 0), (2, END), (3, 0), (4, START)]
    ids = np.array([vocab.encode(t) for t in ("Th", "Th", "Wh", "Th")], np.int32)  # (B=4, T=2)
    logits = execute(step, states, members, ids)  # (4, V)
    for row, (corr, _) in enumerate(members):
        want, new_state = direct(step, ids[row], carried.get(corr))
        np.testing.assert_allclose(logits[row], want, atol=1e-5)
        if corr != 2:
            np.testing.assert_allclose(states.states[corr], new_state, atol=1e-5)
    assert not np.allclose(logits[0], logits[1], atol=1e-3)  # same input "Th", different states
    assert not np.allclose(logits[0], logits[3], atol=1e-3)
    assert sorted(states.states) == [1, 3, 4]


def test_a_reused_id_after_end_starts_from_zeros(step, states, vocab):
    first, second = vocab.encode("HAMLET:\n"), vocab.encode("KING")
    execute(step, states, [(5, START)], first[None])
    execute(step, states, [(5, END)], vocab.encode("\n")[None])
    assert states.check(5, 0) == unknown("60")
    got = execute(step, states, [(5, START)], second[None])
    fresh, fresh_state = direct(step, second)
    np.testing.assert_allclose(got[0], fresh, atol=1e-5)
    np.testing.assert_allclose(states.states[5], fresh_state, atol=1e-5)
    stale = direct(step, second, direct(step, vocab.encode("\n"), direct(step, first)[1])[1])[0]
    # had the old state leaked in, the logits would be these
    assert not np.allclose(got[0], stale, atol=1e-3)


def test_a_start_on_a_live_id_is_refused_and_its_state_kept(step, states, vocab):
    """Ids are the only identity: another client's START under a live id must not reset it (issue: the owner's
    text diverged silently). Once idle past Triton's timeout (Triton freed the slot), the id may start again.
    """
    execute(step, states, [(9, START)], vocab.encode("ROMEO:\n")[None])
    held = states.states[9].copy()
    code, message = states.check(9, START)
    assert code == ErrorCode.SEQUENCE_ID_IN_USE and LIVE_ID_MESSAGE in message
    assert states.check(9, 0) is None  # the owner continues
    np.testing.assert_array_equal(states.states[9], held)
    states.last_used[9] -= states.idle_s - 1.0  # idle as long as Triton's timeout
    assert states.check(9, START) is None
    got = execute(step, states, [(9, START)], vocab.encode("A")[None])
    np.testing.assert_allclose(got[0], direct(step, vocab.encode("A"))[0], atol=1e-5)


def test_a_one_request_sequence_leaves_no_state(step, states, vocab):
    got = execute(step, states, [(11, START | END)], vocab.encode("ROMEO:")[None])
    np.testing.assert_allclose(got[0], direct(step, vocab.encode("ROMEO:"))[0], atol=1e-5)
    assert len(states) == 0 and not states.last_used


@pytest.mark.parametrize(
    "history", [[], [START | END], [START, END]], ids=["never-started", "one-request", "ended"]
)
def test_an_unknown_sequence_without_start_gets_the_documented_error(states, history):
    for flags in history:
        states.scatter([(21, flags)], np.ones((1, *states.zero.shape), np.float32))
    assert states.check(21, 0) == unknown("60")
    assert states.check(21, END) == unknown("60")
    assert states.check(21, START) is None


def test_the_unknown_sequence_error_states_the_configured_timeout():
    s = SequenceStates((1, 1, 4), 1.0, log=lambda m: None)
    try:
        assert s.check(3, 0) == unknown("1")
    finally:
        s.close()


@pytest.mark.parametrize("corr", [0, ""], ids=["uint64-0", "empty-string"])
@pytest.mark.parametrize("flags", [0, START, START | END])
def test_a_request_without_a_sequence_id_is_refused(states, corr, flags):
    assert states.check(corr, flags) == (
        ErrorCode.SEQUENCE_ID_MISSING,
        "sequence id: missing (this model is stateful: send sequence_id, "
        "sequence_start, sequence_end)",
    )


def test_a_stored_state_is_its_own_8_kib_copy_not_a_view_of_the_batch(states):
    # (B, S, L, H)
    batch = np.random.default_rng(0).standard_normal((3, *states.zero.shape)).astype(np.float32)
    want = batch.copy()
    states.scatter([(1, START), (2, 0), (3, START)], batch)
    batch[:] = 0  # the next ORT call's buffer, reused
    for row, corr in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(states.states[corr], want[row])
        assert states.states[corr].base is None  # nothing pins the (B, S, L, H) batch
        # one (S, L, H): 8 KiB for 2x512 (contract.py)
        assert states.states[corr].nbytes == states.zero.size * 4
    np.testing.assert_array_equal(
        states.gather([(3, 0), (1, 0), (2, START)]),
        np.stack([want[2], want[0], np.zeros_like(want[0])]),
    )


def test_the_store_holds_as_many_sequences_as_triton_has_slots(states, python_dir):
    assert load_config(python_dir).sequence_batching.oldest.max_candidate_sequences == MAX_SEQUENCES
    shape = states.zero.shape
    # MAX_SEQUENCES sequences, MAX_BATCH_SIZE per call
    for first in range(0, MAX_SEQUENCES, MAX_BATCH_SIZE):
        members = [(corr, START) for corr in range(first + 1, first + MAX_BATCH_SIZE + 1)]
        batch = np.stack([np.full(shape, corr, np.float32) for corr, _ in members])
        states.scatter(members, batch)
    assert len(states) == MAX_SEQUENCES
    picked = [1, 64, 65, 512, MAX_SEQUENCES]
    got = states.gather([(corr, 0) for corr in picked])  # (5, S, L, H)
    assert got[:, 0, 0, 0].tolist() == picked and all(
        (got[i] == c).all() for i, c in enumerate(picked)
    )
    states.scatter(
        [(corr, END) for corr in range(1, MAX_SEQUENCES + 1)], np.zeros((MAX_SEQUENCES, *shape))
    )
    assert len(states) == 0 and not states.last_used


# --- idle eviction, driven by a fake clock -------------------------------------------------------------------
IDLE = (
    0.2  # the batcher's timeout in this test (200 ms): the reaper checks every 0.3 s of real time
)


class FakeClock:
    """Stands in for serve.runtime.sequence_state's time.monotonic; counts the reaper thread's reads (one per pass)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.reads = 0  # by any thread but the test's: the reaper
        self.test_thread = threading.get_ident()
        self.cond = threading.Condition()

    def monotonic(self) -> float:
        with self.cond:
            if threading.get_ident() != self.test_thread:
                self.reads += 1
                self.cond.notify_all()
            return self.now

    def set(self, now: float) -> None:
        with self.cond:
            self.now = now

    def full_pass(self, timeout: float = 10.0) -> None:
        """Return once the reaper has completed a pass that read the current time (two reads: the second read
        comes after the first pass ended). Event driven: no fixed sleep."""
        with self.cond:
            target = self.reads + 2
            assert self.cond.wait_for(
                lambda: self.reads >= target, timeout
            ), "the reaper made no pass"


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(sequence_state, "time", fake)  # only this module's clock: fake.monotonic
    return fake


@pytest.fixture
def idle_states(clock):
    log: list[str] = []
    s = SequenceStates((2, 2, 8), IDLE, log=log.append)
    s.messages = log  # what the reaper logged
    yield s
    s.close()


def one(value: float) -> np.ndarray:
    return np.full((1, 2, 2, 8), value, np.float32)  # (B=1, S, L, H)


def test_an_idle_sequence_is_evicted_after_the_timeout_plus_a_second(clock, idle_states):
    idle_states.scatter([(1, START)], one(1.0))  # at t = 1000
    idle_states.scatter([(2, START)], one(2.0))
    # Triton has freed the slot, but the store keeps it a second longer
    clock.set(1000 + IDLE + 0.5)
    clock.full_pass()
    assert sorted(idle_states.states) == [1, 2] and idle_states.messages == []
    clock.set(1000 + IDLE + 1.0 + 0.01)
    clock.full_pass()
    assert len(idle_states) == 0 and not idle_states.last_used
    assert idle_states.messages == ["evicted 2 idle sequence(s); 0 live"]
    assert idle_states.check(1, 0)[1].startswith(
        "unknown sequence (never started, ended, or idle longer than"
    )


def test_a_sequence_in_use_survives_while_an_idle_one_is_evicted(clock, idle_states):
    # at t = 1000
    idle_states.scatter([(1, START), (2, START)], np.concatenate([one(1.0), one(2.0)]))
    clock.set(1000 + IDLE + 0.9)
    idle_states.scatter([(1, 0)], one(1.5))  # sequence 1 continues: its idle time starts again
    clock.set(1000 + IDLE + 1.1)
    clock.full_pass()
    assert list(idle_states.states) == [1] and idle_states.messages == [
        "evicted 1 idle sequence(s); 1 live"
    ]
    np.testing.assert_array_equal(idle_states.gather([(1, 0)]), one(1.5))
    assert idle_states.check(2, 0)[1].startswith(
        "unknown sequence (never started, ended, or idle longer than"
    )
    clock.set(1000 + 2 * (IDLE + 1.0))
    clock.full_pass()
    assert (
        len(idle_states) == 0 and idle_states.messages[-1] == "evicted 1 idle sequence(s); 0 live"
    )


def test_an_evicted_id_can_start_again_from_zeros(clock, idle_states):
    idle_states.scatter([(4, START)], one(4.0))
    clock.set(1000 + IDLE + 2.0)
    clock.full_pass()
    assert idle_states.check(4, START) is None and len(idle_states) == 0
    np.testing.assert_array_equal(
        idle_states.gather([(4, START)]), np.zeros((1, 2, 2, 8), np.float32)
    )


def test_close_stops_the_reaper_and_frees_every_state(clock):
    s = SequenceStates((2, 2, 8), IDLE, log=lambda m: None)
    s.scatter([(1, START), (2, START)], np.concatenate([one(1.0), one(2.0)]))
    assert s._reaper.is_alive()
    s.close()
    assert not s._reaper.is_alive() and len(s) == 0 and not s.last_used

"""charrnn.contract's table drives its consumers: the configs, the TensorRT profile, the python models' checks,
perf_analyzer's input data and the client's requests; and the server errors' codes round-trip to the client.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from charrnn import contract as c
from charrnn.contract import (
    GEN,
    GRAPHS,
    INPUTS,
    OUTPUTS,
    STEP,
    TENSORS,
    Contract,
    ErrorCode,
    Tensor,
    error_code,
    error_sequence,
    request_inputs,
    response_outputs,
    server_error,
    tensors,
)
from charrnn.repository import BY_NAME, SERVED_MODELS, load_config
from charrnn.sampling import SamplingParams
from tests.helpers import ROOT

LSTM = Contract("lstm", 2, 512, 65)
SYMBOLS = {"B", "T", "K", "V", "S", "L", "H"}


# --- the table --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", GRAPHS)
def test_every_row_is_batch_first_with_known_symbols_and_a_known_dtype(graph):
    for kind in (INPUTS, OUTPUTS):
        rows = tensors(graph, kind)
        assert len({t.name for t in rows}) == len(rows)
        for t in rows:
            assert t.dims[0] == "B", t
            assert all(d in SYMBOLS or isinstance(d, int) for d in t.dims), t
            assert t.dtype in c.TRITON_DTYPE and t.dtype in c.ORT_TYPE, t
            assert t.meaning, t
    # the state is the one input and output a client never sends or receives
    assert [t.name for t in tensors(graph, INPUTS) if t.state] == [c.STATE_IN]
    assert [t.name for t in tensors(graph, OUTPUTS) if t.state] == [c.STATE_OUT]


def test_contract_resolves_the_symbols():
    assert LSTM.gen_inputs() == {
        c.INPUT_IDS: (np.dtype(np.int32), (-1, -1)),
        c.STATE_IN: (np.dtype(np.float32), (-1, 2, 2, 512)),
        c.NOISE: (np.dtype(np.float32), (-1, -1, 65)),
        c.TEMPERATURE: (np.dtype(np.float32), (-1, 1)),
        c.TOP_K: (np.dtype(np.int32), (-1, 1)),
    }
    assert LSTM.outputs() == {
        c.LOGITS: (np.dtype(np.float32), (-1, 65)),
        c.STATE_OUT: (np.dtype(np.float32), (-1, 2, 2, 512)),
    }
    assert Contract("gru", 3, 8, 5).inputs()[c.STATE_IN] == (np.dtype(np.float32), (-1, 1, 3, 8))
    assert LSTM.tensors(GEN, OUTPUTS) == LSTM.gen_outputs()
    with pytest.raises(ValueError):
        tensors("nope")


def test_describe_lists_every_row_once_per_graph():
    text = c.describe()
    for graph in GRAPHS:
        assert f"{graph} graph:" in text
        for kind in (INPUTS, OUTPUTS):
            for t in tensors(graph, kind):
                assert t.name in c.describe(graph)
    assert text.count(c.NOISE) == 1 and text.count(c.INPUT_IDS) >= 2


# --- the configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SERVED_MODELS)
def test_committed_config_inputs_and_outputs_are_the_table_rows(name, shipped_contract_vocab):
    contract, _ = shipped_contract_vocab
    config = load_config(ROOT / "model_repository" / name)
    graph = BY_NAME[name].graph

    def rows(ts):
        return [(t.name, f"TYPE_{t.triton_dtype}", list(contract.shape(t)[1:])) for t in ts]

    def declared(ts):
        from tritonclient.grpc import model_config_pb2

        return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in ts]

    assert declared(config.input) == rows(request_inputs(graph))
    assert declared(config.output) == rows(response_outputs(graph))
    for line in (f"#   {t.name}" for t in request_inputs(graph) + response_outputs(graph)):
        assert line in (ROOT / "model_repository" / name / "config.pbtxt").read_text()


# --- one more row reaches every consumer that reads the table -----------------------------------------------
PENALTY = Tensor("REPETITION_PENALTY", np.dtype(np.float32), ("B", 1), ">= 1", "a test row")


@pytest.fixture
def with_penalty(monkeypatch):
    rows = TENSORS[GEN][INPUTS] + (PENALTY,)
    monkeypatch.setitem(TENSORS[GEN], INPUTS, rows)
    return PENALTY


def test_an_added_row_reaches_the_config_and_the_trt_profile(with_penalty):
    from charrnn.repository import GEN_PYTHON, parse_config
    from charrnn.vocab import Vocab
    from export.build_plan import profile_shapes
    from export.configs import render_config

    text = render_config(GEN_PYTHON, LSTM, Vocab([chr(i) for i in range(32, 97)]))
    names = [t.name for t in parse_config(text).input]
    assert names[-1] == PENALTY.name and "#   REPETITION_PENALTY FP32 (1, 1)" in text
    assert profile_shapes((2, 2, 512), 64, 256, gen_vocab=65)[PENALTY.name] == (
        (1, 1),
        (64, 1),
        (64, 1),
    )
    # the step graph has no such row
    assert PENALTY.name not in profile_shapes((2, 2, 512), 64, 256)


# --- the TensorRT profile, the python models, perf_analyzer, the client -------------------------------------
@pytest.mark.parametrize("graph", GRAPHS)
def test_the_trt_profile_has_exactly_the_graph_inputs(graph):
    from export.build_plan import profile_shapes

    shapes = profile_shapes((2, 2, 512), 64, 256, gen_vocab=65 if graph == GEN else None)
    assert list(shapes) == [t.name for t in tensors(graph, INPUTS)]
    for t in tensors(graph, INPUTS):
        lo, _, hi = shapes[t.name]
        assert len(lo) == len(hi) == len(t.dims)


def test_the_python_generation_model_checks_and_batches_the_table_inputs():
    from serve.runtime.gen_serving import GEN_REQUEST_INPUTS, check_gen_request
    from serve.runtime.sequence_state import graph_types

    assert GEN_REQUEST_INPUTS == request_inputs(GEN)
    assert graph_types(GEN) == {
        t.name: t.ort_type for kind in (INPUTS, OUTPUTS) for t in tensors(GEN, kind)
    }
    good = {
        c.INPUT_IDS: np.array([[1, 2]], np.int32),
        c.NOISE: np.full((1, 3, 65), 0.5, np.float32),
        c.TEMPERATURE: np.array([[1.0]], np.float32),
        c.TOP_K: np.array([[0]], np.int32),
    }
    assert check_gen_request(good, 65) is None
    for t in GEN_REQUEST_INPUTS:
        assert check_gen_request({**good, t.name: None}, 65) == f"{t.name}: missing"
        wrong = np.int64 if t.dtype == np.float32 else np.float32
        assert check_gen_request({**good, t.name: good[t.name].astype(wrong)}, 65) == (
            f"{t.name}: dtype must be {t.triton_dtype}, got {np.dtype(wrong)}"
        )


def test_perf_input_steps_have_exactly_the_table_inputs():
    from bench.perf_input import build_gen_input_data, build_input_data

    ids = np.arange(200) % 65
    step = build_input_data(ids, [0, 50], prompt_length=8, steps=4)
    gen = build_gen_input_data(ids, [0], prompt_length=8, steps=8, k=4, vocab_size=65, seed=0)
    for data, graph in ((step, STEP), (gen, GEN)):
        for stream in data["data"]:
            for request in stream:
                assert list(request) == [t.name for t in request_inputs(graph)]
                for t in request_inputs(graph):
                    assert len(request[t.name]["shape"]) == len(t.dims) - 1  # no batch dim
    assert gen["data"][0][0][c.NOISE]["shape"] == [4, 65]


@pytest.mark.parametrize("graph", GRAPHS)
def test_the_client_sends_exactly_the_table_inputs_in_their_dtypes(graph):
    from client.generate import Chunked, PerCharacter, new_sequences

    mode = PerCharacter() if graph == STEP else Chunked()
    params = [SamplingParams(temperature=0.8, top_k=5, seed=3)]
    (seq,) = new_sequences([np.array([1, 2, 3])], 8, 1 if graph == STEP else 4, params, 65)
    sent = mode.inputs(seq, seq.next_request())
    assert list(sent) == [t.name for t in request_inputs(graph)]
    for t in request_inputs(graph):
        assert sent[t.name].dtype == t.dtype
        assert sent[t.name].shape[0] == 1 and sent[t.name].ndim == len(t.dims)
        assert sent[t.name].flags.c_contiguous


# --- error codes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("sequence", [5, "key7:3", None])
def test_an_error_code_round_trips_through_the_text(code, sequence):
    text = server_error(code, "some detail: with colons (and a fix)", sequence)
    assert text.startswith(f"{code.value}: ")
    for wrapped in (text, f"[StatusCode.INVALID_ARGUMENT] {text}", f"[request id: 7] {text}"):
        assert error_code(wrapped) is code
        assert error_sequence(wrapped) == (None if sequence is None else str(sequence))


def test_texts_without_a_code_have_none():
    for text in (
        "unknown sequence",
        "CHARRNN_NOT_A_CODE: sequence 5: x",
        "sequence 5: INPUT_IDS: bad",
        "",
    ):
        assert error_code(text) is None


@pytest.mark.parametrize(
    "code, kind",
    [
        (ErrorCode.UNKNOWN_SEQUENCE, "lost"),
        (ErrorCode.SEQUENCE_ID_IN_USE, "fatal"),
        (ErrorCode.SEQUENCE_ID_MISSING, "fatal"),
        (ErrorCode.INVALID_INPUT, "fatal"),
    ],
)
def test_the_client_classifies_our_errors_by_code(code, kind):
    from tritonclient.utils import InferenceServerException

    from client.generate import classify

    assert classify(InferenceServerException(server_error(code, "x", 9))) == kind
    # the same code behind a detail that reads like an outage: the code decides
    detail = "connection refused; unknown sequence; stream removed"
    assert classify(InferenceServerException(server_error(code, detail, 9))) == kind


def test_the_sequence_states_answer_with_their_codes():
    from serve.runtime.sequence_state import START, SequenceStates

    states = SequenceStates((2, 2, 4), 60.0, log=lambda _: None)
    try:
        assert states.check(0, START)[0] is ErrorCode.SEQUENCE_ID_MISSING
        assert states.check(3, 0)[0] is ErrorCode.UNKNOWN_SEQUENCE
        states.scatter([(3, START)], np.zeros((1, 2, 2, 4), np.float32))
        code, message = states.check(3, START)
        assert code is ErrorCode.SEQUENCE_ID_IN_USE and c.LIVE_ID_MESSAGE in message
    finally:
        states.close()


def test_tensor_rows_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tensors(GEN)[0].name = "X"  # type: ignore[misc]

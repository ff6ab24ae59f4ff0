"""export/onnx_export.py for real: TF -> ONNX (tf2onnx), the graph contract, and ONNX Runtime vs TensorFlow
parity for every cell (random batches and states, state carried in chunks, dynamic batch and length).

Real TensorFlow, tf2onnx and ONNX Runtime; no mocks. Exports are shared per session (tests/conftest.py): the
shipped model (`python -m export` into a tmp repository, once), and tiny LSTM / GRU / SimpleRNN models trained
by the project's trainer and exported with export.onnx_export (once per cell).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from charrnn.contract import (
    CELLS,
    INPUT_IDS,
    LOGITS,
    MAX_BATCH_SIZE,
    MAX_T,
    STATE_IN,
    STATE_OUT,
    Contract,
)
from tests.helpers import SHIPPED_MODEL, Exported, op_counts

TOL = 1e-4  # max |Δ| allowed between ONNX Runtime and TensorFlow (logits and state)


# --- 1. ONNX Runtime vs TensorFlow parity ----------------------------------------------------------------
def both(e: Exported, ids: np.ndarray, state: np.ndarray):
    """(TF logits, TF state, ORT logits, ORT state) for one step call from the same inputs."""
    ids = np.ascontiguousarray(ids, np.int32)
    state = np.ascontiguousarray(state, np.float32)
    tf_logits, tf_state = e.tf_step(ids, state)
    ort_logits, ort_state = e.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE_IN: state})
    return tf_logits, tf_state, ort_logits, ort_state


def max_delta(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def random_state(rng, contract: Contract, batch: int) -> np.ndarray:
    return (0.5 * rng.standard_normal((batch, *contract.state_dims))).astype(np.float32)


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_matches_tf_on_random_batches_from_random_states(exported, cell):
    e = exported(cell)
    c = e.contract
    assert c.cell == cell
    rng = np.random.default_rng(1)
    for batch in (1, 3, 8):
        for T in (1, 17):
            ids = rng.integers(0, c.vocab_size, (batch, T), dtype=np.int32)
            # a random (non-zero) state: a swapped h/c or layer order in the packing would show here
            tf_l, tf_s, ort_l, ort_s = both(e, ids, random_state(rng, c, batch))
            assert ort_l.shape == (batch, c.vocab_size) and ort_s.shape == (batch, *c.state_dims)
            assert ort_l.dtype == ort_s.dtype == np.float32
            assert max_delta(tf_l, ort_l) <= TOL, f"B={batch} T={T}: logits"
            assert max_delta(tf_s, ort_s) <= TOL, f"B={batch} T={T}: state"
            assert np.abs(ort_s).max() > 1e-3, "the state must actually be produced"


@pytest.mark.parametrize("cell", CELLS)
def test_long_sequence_with_state_carried_in_chunks(exported, cell):
    """400 characters in chunks of 64 (the last one partial): TF and ORT each carry their own state; every
    chunk matches, and the chunked ORT run ends where one TF call over the whole text ends."""
    e = exported(cell)
    c = e.contract
    rng = np.random.default_rng(2)
    B, N, chunk = 3, 400, 64
    ids = rng.integers(0, c.vocab_size, (B, N), dtype=np.int32)
    tf_state = ort_state = c.zero_state(B)
    for s in range(0, N, chunk):
        x = ids[:, s : s + chunk]
        tf_l, tf_state = e.tf_step(x, tf_state)
        ort_l, ort_state = e.session.run([LOGITS, STATE_OUT], {INPUT_IDS: x, STATE_IN: ort_state})
        assert max_delta(tf_l, ort_l) <= TOL, f"chunk at {s}: logits"
        assert max_delta(tf_state, ort_state) <= TOL, f"chunk at {s}: state"
    whole_l, whole_s = e.tf_step(ids, c.zero_state(B))
    assert max_delta(whole_l, ort_l) <= TOL
    assert max_delta(whole_s, ort_state) <= TOL


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch, T", [(MAX_BATCH_SIZE, 1), (MAX_BATCH_SIZE, MAX_T), (5, MAX_T)])
def test_dynamic_batch_and_length(exported, cell, batch, T):
    e = exported(cell)
    rng = np.random.default_rng(batch * 1000 + T)
    ids = rng.integers(0, e.contract.vocab_size, (batch, T), dtype=np.int32)
    tf_l, tf_s, ort_l, ort_s = both(e, ids, random_state(rng, e.contract, batch))
    assert ort_l.shape == (batch, e.contract.vocab_size)
    assert max_delta(tf_l, ort_l) <= TOL
    assert max_delta(tf_s, ort_s) <= TOL


def test_batched_rows_are_independent(exported):
    """Row i of a batched ORT call equals the same row run alone (no mixing across the batch)."""
    e = exported("lstm")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, e.contract.vocab_size, (8, 20), dtype=np.int32)
    state = random_state(rng, e.contract, 8)
    logits, new_state = e.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE_IN: state})
    for i in (0, 5, 7):
        l1, s1 = e.session.run(
            [LOGITS, STATE_OUT], {INPUT_IDS: ids[i : i + 1], STATE_IN: state[i : i + 1]}
        )
        assert max_delta(l1[0], logits[i]) <= 1e-5 and max_delta(s1[0], new_state[i]) <= 1e-5


def test_shipped_model_onnx_state_matches_tf(shipped_onnx):
    """verify compares logits only; the 2x512 graph's STATE_OUT must match TF too (from a random state)."""
    from charrnn.model import load_model_dir
    from export.verify import ort_session

    net, vocab, _ = load_model_dir(SHIPPED_MODEL)
    e = Exported("lstm", SHIPPED_MODEL, net, vocab, shipped_onnx, None, ort_session(shipped_onnx))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, len(vocab), (3, 40), dtype=np.int32)
    tf_l, tf_s, ort_l, ort_s = both(e, ids, random_state(rng, e.contract, 3))
    assert max_delta(tf_l, ort_l) <= TOL
    assert max_delta(tf_s, ort_s) <= TOL


# --- 2. graph contract ------------------------------------------------------------------------------------
def io_table(values) -> list[tuple[str, int, list]]:
    """[(name, ONNX elem type, dims as dim_param or dim_value)] of graph inputs or outputs, in order."""
    return [
        (
            vi.name,
            vi.type.tensor_type.elem_type,
            [
                d.dim_param if not d.HasField("dim_value") else d.dim_value
                for d in vi.type.tensor_type.shape.dim
            ],
        )
        for vi in values
    ]


def assert_graph_contract(proto: onnx.ModelProto, contract: Contract):
    state = ["batch", *contract.state_dims]
    assert io_table(proto.graph.input) == [
        (INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
        (STATE_IN, TensorProto.FLOAT, state),
    ]
    assert sorted(io_table(proto.graph.output)) == sorted(
        [
            (LOGITS, TensorProto.FLOAT, ["batch", contract.vocab_size]),
            (STATE_OUT, TensorProto.FLOAT, state),
        ]
    )
    default_opset = [i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")]
    assert default_opset and default_opset[0] >= 17
    onnx.checker.check_model(proto)


def test_shipped_graph_contract(shipped_proto, shipped_contract_vocab):
    contract, vocab = shipped_contract_vocab
    assert_graph_contract(shipped_proto, contract)
    assert contract.vocab_size == len(vocab)


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_lstm_graph_has_one_onnx_lstm_per_layer_and_no_loop(
    which, shipped_proto, shipped_contract_vocab, exported
):
    if which == "shipped":
        proto, contract = shipped_proto, shipped_contract_vocab[0]
    else:
        e = exported("lstm")
        proto, contract = e.proto, e.contract
    ops = op_counts(proto)
    assert ops.get("LSTM") == contract.layers == 2, ops
    assert "Loop" not in ops and "Scan" not in ops, ops
    for node in proto.graph.node:
        if node.op_type == "LSTM":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["hidden_size"] == contract.hidden
            assert attrs.get("layout", 0) == 0 and attrs.get("input_forget", 0) == 0
            assert attrs.get("direction", b"forward") == b"forward"


@pytest.mark.parametrize("cell", CELLS)
def test_tiny_graph_contract_every_cell(exported, cell):
    e = exported(cell)
    assert_graph_contract(e.proto, e.contract)
    assert e.contract.state_dims == ((2 if cell == "lstm" else 1), 2, 16 if cell != "lstm" else 48)
    assert onnx.load(str(e.onnx_path)) == e.proto  # the file on disk is the returned proto
    ort_inputs = {i.name: (i.type, i.shape) for i in e.session.get_inputs()}
    assert ort_inputs == {
        INPUT_IDS: ("tensor(int32)", ["batch", "T"]),
        STATE_IN: ("tensor(float)", ["batch", *e.contract.state_dims]),
    }


def test_gru_export_is_one_onnx_loop_per_layer_as_documented(exported):
    ops = op_counts(exported("gru").proto)
    assert ops.get("Loop") == 2 and "GRU" not in ops, ops


@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_graph_refuses_bad_ids_with_the_guard_message(exported, cell):
    """The guard goes in front of the GRU / SimpleRNN graphs' Loops too (tests/test_guards.py: the shipped model)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from export.guards import guard_messages

    e = exported(cell)
    c = e.contract
    message = guard_messages(c.vocab_size)[INPUT_IDS]
    for ids in ([[0, -1]], [[c.vocab_size]], np.zeros((1, 0)), np.zeros((1, MAX_T + 1))):
        with pytest.raises(InvalidArgument, match="running Gather node") as err:
            e.session.run(None, {INPUT_IDS: np.asarray(ids, np.int32), STATE_IN: c.zero_state(1)})
        assert f"Name:'{message}'" in str(err.value)
    e.session.run(
        None, {INPUT_IDS: np.array([[0, c.vocab_size - 1]], np.int32), STATE_IN: c.zero_state(1)}
    )

"""The export pipeline for real: TF -> ONNX (tf2onnx) -> ONNX Runtime parity, Triton configs, TensorRT checks.

Real TensorFlow, tf2onnx and ONNX Runtime; no mocks. Exports are shared per session: the shipped model
(SHIPPED_MODEL, `python -m export` into a tmp repository, once), and tiny LSTM / GRU / SimpleRNN models
trained by the project's trainer and exported with export.onnx_export (once per cell).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from charrnn.contract import (CELLS, INPUT_IDS, LOGITS, MAX_BATCH_SIZE, MAX_SEQUENCE_IDLE_US, MAX_SEQUENCES, MAX_T,
                              STATE_IN, STATE_OUT, VOCAB_PARAMETER, Contract)
from charrnn.errors import CheckFailed
from charrnn.vocab import Vocab
from charrnn import repository
from export import configs
from export.build_plan import profile_shapes
from export.trt_check import OPS_FILE_CANDIDATES, check_model, supported_ops
from tests.conftest import ROOT, SHIPPED_MODEL, train_tiny

TOL = 1e-4  # max |Δ| allowed between ONNX Runtime and TensorFlow (logits and state)
COMMITTED_REPO = ROOT / "model_repository"
COMMITTED_CONFIGS = sorted(p.parent.name for p in COMMITTED_REPO.glob(f"*/{repository.CONFIG}"))
# The step models (INPUT_IDS -> LOGITS, the client samples); repository.SERVED_MODELS may list more models.
STEP = (repository.TRT, repository.ONNX, repository.PYTHON)
STEP_STATEFUL = (repository.TRT, repository.ONNX)  # implicit state (the python backend keeps state itself)
SHARED_OPS = ROOT.parent / "shared" / "tensorrt" / "onnx_ops_supported.txt"
REPO_OPS = ROOT / "export" / "onnx_ops_supported.txt"
# GRU / SimpleRNN models even smaller than conftest's tiny LSTM: only the export is under test here.
TINY_OTHER_CELL = ["--hidden-size", "16", "--embedding-size", "8", "--max-steps", "2", "--eval-every", "2",
                   "--checkpoint-every", "2"]


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# --- shared exports -----------------------------------------------------------------------------------


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

        spec = (tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, *self.contract.state_dims], tf.float32))
        step = tf.function(lambda ids, state: self.model.step(ids, state), input_signature=spec)
        return lambda ids, state: tuple(t.numpy() for t in step(ids, state))


def _export(model_dir: Path, onnx_path: Path) -> Exported:
    from charrnn.model import load_model_dir
    from export.onnx_export import export_onnx
    from export.verify import ort_session

    model, vocab, _ = load_model_dir(model_dir)
    proto = export_onnx(model, onnx_path)
    return Exported(model.config.cell, model_dir, model, vocab, onnx_path, proto, ort_session(onnx_path))


@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory):
    """exported(cell) -> Exported for a tiny model of that cell (trained and exported once per session)."""
    cache: dict[str, Exported] = {}
    root = tmp_path_factory.mktemp("tiny-exports")

    def get(cell: str) -> Exported:
        if cell not in cache:
            model_dir = tiny_model if cell == "lstm" else train_tiny(root / f"tiny-{cell}",
                                                                     ["--cell", cell, *TINY_OTHER_CELL])
            cache[cell] = _export(model_dir, root / f"{cell}.onnx")
        return cache[cell]

    return get


@pytest.fixture(scope="session")
def shipped_onnx(shipped_repo) -> Path:
    return shipped_repo / repository.ONNX / "1" / "model.onnx"


@pytest.fixture(scope="session")
def shipped_proto(shipped_onnx) -> onnx.ModelProto:
    return onnx.load(str(shipped_onnx))


@pytest.fixture(scope="session")
def shipped_contract_vocab() -> tuple[Contract, Vocab]:
    """The shipped model's contract and vocabulary, read from its model directory (no TensorFlow needed)."""
    from charrnn.model import ModelConfig

    config = ModelConfig.from_dict(json.loads((SHIPPED_MODEL / "config.json").read_text()))
    return config.contract, Vocab.load(SHIPPED_MODEL / "vocab.json")


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
        l1, s1 = e.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids[i : i + 1], STATE_IN: state[i : i + 1]})
        assert max_delta(l1[0], logits[i]) <= 1e-5 and max_delta(s1[0], new_state[i]) <= 1e-5


def test_shipped_model_onnx_state_matches_tf(shipped_onnx):
    """verify compares logits only; the 2x512 graph's STATE_OUT must match TF too (from a random state)."""
    from charrnn.model import load_model_dir
    from export.verify import ort_session

    model, vocab, _ = load_model_dir(SHIPPED_MODEL)
    e = Exported("lstm", SHIPPED_MODEL, model, vocab, shipped_onnx, None, ort_session(shipped_onnx))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, len(vocab), (3, 40), dtype=np.int32)
    tf_l, tf_s, ort_l, ort_s = both(e, ids, random_state(rng, e.contract, 3))
    assert max_delta(tf_l, ort_l) <= TOL
    assert max_delta(tf_s, ort_s) <= TOL


# --- 2. graph contract ------------------------------------------------------------------------------------


def io_table(values) -> list[tuple[str, int, list]]:
    """[(name, ONNX elem type, dims as dim_param or dim_value)] of graph inputs or outputs, in order."""
    return [(vi.name, vi.type.tensor_type.elem_type,
             [d.dim_param if not d.HasField("dim_value") else d.dim_value for d in vi.type.tensor_type.shape.dim])
            for vi in values]


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in proto.graph.node))


def assert_graph_contract(proto: onnx.ModelProto, contract: Contract):
    state = ["batch", *contract.state_dims]
    assert io_table(proto.graph.input) == [(INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
                                           (STATE_IN, TensorProto.FLOAT, state)]
    assert sorted(io_table(proto.graph.output)) == sorted([(LOGITS, TensorProto.FLOAT, ["batch", contract.vocab_size]),
                                                           (STATE_OUT, TensorProto.FLOAT, state)])
    default_opset = [i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")]
    assert default_opset and default_opset[0] >= 17
    onnx.checker.check_model(proto)


def test_shipped_graph_contract(shipped_proto, shipped_contract_vocab):
    contract, vocab = shipped_contract_vocab
    assert_graph_contract(shipped_proto, contract)
    assert contract.vocab_size == len(vocab)


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_lstm_graph_has_one_onnx_lstm_per_layer_and_no_loop(which, shipped_proto, shipped_contract_vocab, exported):
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
    assert ort_inputs == {INPUT_IDS: ("tensor(int32)", ["batch", "T"]),
                          STATE_IN: ("tensor(float)", ["batch", *e.contract.state_dims])}


# --- 3. greedy identity: `make verify` -------------------------------------------------------------------


def test_verify_passes_on_the_shipped_export(shipped_onnx, capsys):
    """`make verify`: logits parity and >= 1,000 greedy characters per prompt, identical in TF and ONNX."""
    from export.verify import PROMPTS, main as verify_main

    rc = verify_main(["--model", str(SHIPPED_MODEL), "--onnx", str(shipped_onnx)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert re.search(r"^logits: .*max \|delta\| = \S+ \(tolerance 1e-04\) PASS$", out, re.M), out
    greedy = re.findall(r"^prompt (.*): greedy (\d+) chars (PASS|FAIL)$", out, re.M)
    assert len(greedy) == len(PROMPTS) >= 3, out
    assert all(int(n) >= 1000 and verdict == "PASS" for _, n, verdict in greedy), greedy
    expects = re.findall(r"^  Expect:   (.*)$", out, re.M)
    receiveds = re.findall(r"^  Received: (.*)$", out, re.M)
    assert len(expects) == len(receiveds) == len(PROMPTS)
    assert expects == receiveds
    assert len(set(expects)) > 1, "different prompts should give different texts"
    assert re.search(r"^PASS \(\d+\.\d s\)$", out, re.M)
    assert "FAIL" not in out and "error:" not in err


def test_verify_fails_on_a_tampered_onnx(exported, tmp_path, capsys):
    """One initializer (the first LSTM's input weights W) shifted by +1.0: verify must exit 1 with FAIL.
    (The tiny LSTM: verify's logit comparison runs TF eagerly, slow for 2x512.)"""
    from export.verify import main as verify_main

    e = exported("lstm")
    tampered = onnx.ModelProto()
    tampered.CopyFrom(e.proto)
    lstm = next(n for n in tampered.graph.node if n.op_type == "LSTM")
    init = next(i for i in tampered.graph.initializer if i.name == lstm.input[1])
    w = numpy_helper.to_array(init)
    assert w.dtype == np.float32 and w.shape == (1, 4 * 48, 16)
    init.CopyFrom(numpy_helper.from_array(w + np.float32(1.0), init.name))
    path = tmp_path / "tampered.onnx"
    onnx.save(tampered, str(path))

    rc = verify_main(["--model", str(e.model_dir), "--onnx", str(path), "--length", "30"])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert re.search(r"^logits: .* FAIL$", out, re.M), out
    assert re.search(r"^FAIL \(", out, re.M), out
    assert err.startswith("error: verify: max |delta logit|"), err


def test_verify_on_a_missing_onnx_is_a_usage_error(tmp_path, capsys):
    from export.verify import main as verify_main

    rc = verify_main(["--model", str(SHIPPED_MODEL), "--onnx", str(tmp_path / "none.onnx"), "--length", "5"])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none.onnx'}: cannot load ONNX model")


# --- 4. Triton configs: proto validation, no drift, documented requirements ----------------------------------


def committed_text(name: str) -> str:
    return (COMMITTED_REPO / name / repository.CONFIG).read_text()


def test_committed_model_repository_has_the_step_models():
    assert set(STEP) <= set(COMMITTED_CONFIGS)
    assert set(COMMITTED_CONFIGS) <= set(repository.SERVED_MODELS), "a config no generator knows about (stale or by hand)"


@pytest.mark.parametrize("name", COMMITTED_CONFIGS)
def test_committed_config_parses_and_equals_render_config(name, shipped_contract_vocab):
    contract, vocab = shipped_contract_vocab
    text = committed_text(name)
    config = repository.parse_config(text)  # Triton's own ModelConfig protobuf
    assert config.name == name
    assert text == configs.render_config(name, contract, vocab), \
        f"model_repository/{name}/config.pbtxt drifted from export/configs.py: run `make export`"


@pytest.mark.parametrize("name", repository.SERVED_MODELS)
def test_freshly_exported_config_parses_and_equals_committed(name, shipped_repo):
    text = (shipped_repo / name / repository.CONFIG).read_text()
    assert repository.load_config(shipped_repo / name / repository.CONFIG).name == name
    if name in COMMITTED_CONFIGS:
        assert text == committed_text(name)
    else:
        assert name not in STEP


@pytest.mark.parametrize("mutate, pattern", [
    (lambda t: t.replace("max_batch_size:", "max_batch_sise:"), "max_batch_sise"),  # typo in a field name
    (lambda t: t + "\nno_such_field: 1\n", "no_such_field"),  # unknown field
    (lambda t: t.replace("oldest {", "olders {"), "olders"),  # typo in a strategy
    (lambda t: t.replace("KIND_GPU", "KIND_GPUU").replace("KIND_AUTO", "KIND_GPUU"), "KIND_GPUU"),  # bad enum
    (lambda t: t.replace("TYPE_INT32", "TYPE_INT23"), "TYPE_INT23"),
    (lambda t: t.replace("zero_data: true", "zero_data: yes please"), ""),  # ill-typed value
    (lambda t: t.replace('name: "zeros" }', 'name: "zeros" '), ""),  # unbalanced braces
])
@pytest.mark.parametrize("name", STEP_STATEFUL)
def test_config_with_unknown_field_or_typo_fails_to_parse(name, mutate, pattern):
    text = committed_text(name)
    bad = mutate(text)
    assert bad != text
    with pytest.raises(CheckFailed) as info:
        repository.parse_config(bad)
    msg = info.value.message()
    assert msg.startswith("error: config.pbtxt: not a valid Triton ModelConfig") and pattern in msg, msg
    assert info.value.exit_code == 1


def test_parse_config_uses_tritons_model_config_proto():
    from tritonclient.grpc import model_config_pb2

    config = repository.parse_config(committed_text(repository.ONNX))
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.DESCRIPTOR.full_name == "inference.ModelConfig"


@pytest.mark.parametrize("source, name", [*(("committed", n) for n in COMMITTED_CONFIGS),
                                          *(("fresh", n) for n in repository.SERVED_MODELS)])
def test_config_meets_the_documented_requirements(name, source, shipped_repo, shipped_contract_vocab):
    """Every config: batching, the `oldest` sequence batcher, an explicit idle timeout, ONE packed implicit state
    (zero_data, named) exactly on the TensorRT / ONNX Runtime models, platform/backend, the vocabulary."""
    from tritonclient.grpc import model_config_pb2 as pb

    contract, vocab = shipped_contract_vocab
    path = (COMMITTED_REPO if source == "committed" else shipped_repo) / name / repository.CONFIG
    text = path.read_text()
    c = repository.parse_config(text)
    assert c.name == name
    assert c.max_batch_size == MAX_BATCH_SIZE > 0
    if name in STEP:  # client-facing interface: the same for the three step models
        assert [(t.name, t.data_type, list(t.dims)) for t in c.input] == [(INPUT_IDS, pb.TYPE_INT32, [-1])]
        assert [(t.name, t.data_type, list(t.dims)) for t in c.output] == \
            [(LOGITS, pb.TYPE_FP32, [contract.vocab_size])]
    # sequence batcher: oldest strategy, idle timeout set explicitly and well above Triton's 1 s default
    sb = c.sequence_batching
    assert c.HasField("sequence_batching")
    assert sb.WhichOneof("strategy_choice") == "oldest"
    # Sequence slots far above the batch: sequence 65 must not wait for a slot (and block its gRPC stream).
    assert sb.oldest.max_candidate_sequences == MAX_SEQUENCES >= 16 * MAX_BATCH_SIZE
    assert re.search(r"^\s*max_sequence_idle_microseconds:\s*\d+", text, re.M), "must be set explicitly"
    assert sb.max_sequence_idle_microseconds == MAX_SEQUENCE_IDLE_US > 1_000_000
    assert not c.HasField("dynamic_batching"), "the sequence batcher, not the dynamic batcher"
    assert list(sb.control_input) == [], "the graph has no START/READY inputs"
    # implicit state: only where the backend supports it (TensorRT, ONNX Runtime), exactly one packed state
    kind_of = "trt" if name.endswith("_trt") else "onnx" if name.endswith("_onnx") else "python"
    assert (kind_of != "python") == (name in repository.IMPLICIT_STATE_MODELS)
    if kind_of != "python":
        assert len(sb.state) == 1
        s = sb.state[0]
        assert (s.input_name, s.output_name, s.data_type) == (STATE_IN, STATE_OUT, pb.TYPE_FP32)
        assert tuple(s.dims) == contract.state_dims == (2, 2, 512)
        assert len(s.initial_state) == 1
        init = s.initial_state[0]
        assert init.WhichOneof("state_data") == "zero_data" and init.zero_data
        assert init.name
        assert init.data_type == s.data_type and tuple(init.dims) == contract.state_dims
        assert STATE_IN not in [t.name for t in c.input] and STATE_OUT not in [t.name for t in c.output]
    else:
        assert len(sb.state) == 0
    # platform / backend / instance kind
    kinds = [g.kind for g in c.instance_group]
    if kind_of == "trt":
        assert (c.platform, c.backend) == ("tensorrt_plan", "")
        assert kinds == [pb.ModelInstanceGroup.KIND_GPU]
    elif kind_of == "onnx":
        assert (c.platform, c.backend) == ("onnxruntime_onnx", "")
    else:
        assert (c.platform, c.backend) == ("", "python")
        assert kinds == [pb.ModelInstanceGroup.KIND_CPU]
    # the vocabulary travels with the model
    assert repository.vocab_of(c) == vocab == Vocab.load(SHIPPED_MODEL / "vocab.json")
    assert json.loads(c.parameters[VOCAB_PARAMETER].string_value) == \
        json.loads((SHIPPED_MODEL / "vocab.json").read_text())


def test_render_config_rejects_a_vocab_of_the_wrong_size(shipped_contract_vocab):
    from charrnn.errors import UserError

    contract, vocab = shipped_contract_vocab
    with pytest.raises(UserError, match="vocabulary: has 64 characters, the model 65"):
        configs.render_config(repository.ONNX, contract, Vocab(vocab.chars[:-1]))
    with pytest.raises(ValueError):
        configs.render_config("charrnn_tf", contract, vocab)


# --- 5. config <-> ONNX cross-check ---------------------------------------------------------------------


@pytest.mark.parametrize("name", STEP)
def test_generated_configs_agree_with_the_exported_graph(name, shipped_repo, shipped_proto):
    config = repository.load_config(shipped_repo / name / repository.CONFIG)
    assert configs.check_config_against_onnx(config, shipped_proto) == []


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_configs_for_one_slot_cells_agree_with_their_graph(cell, exported, tmp_path):
    e = exported(cell)
    for path in configs.write_repository(tmp_path, e.contract, e.vocab):
        config = repository.load_config(path)
        if config.name not in STEP:
            continue
        assert configs.check_config_against_onnx(config, e.proto) == []
        for s in config.sequence_batching.state:
            assert tuple(s.dims) == (1, 2, 16)


@pytest.mark.parametrize("old, new, tensor, words", [
    ("dims: [ 2, 2, 512 ]", "dims: [ 2, 2, 256 ]", "STATE_IN", "shape"),  # state and initial_state dims
    ('dims: [ 2, 2, 512 ]\n      initial', 'dims: [ 2, 512 ]\n      initial', "STATE_IN", "shape"),  # state only
    ("data_type: TYPE_FP32\n      dims", "data_type: TYPE_FP16\n      dims", "STATE_IN", "dtype"),
    ('input_name: "STATE_IN"', 'input_name: "STATE"', "STATE", "not in the ONNX graph"),
    ('output_name: "STATE_OUT"', 'output_name: "STATE_OUTPUT"', "STATE_OUTPUT", "not in the ONNX graph"),
    ('name: "INPUT_IDS"', 'name: "INPUT_ID"', "INPUT_ID", "not in the ONNX graph"),
    ("data_type: TYPE_INT32", "data_type: TYPE_INT64", "INPUT_IDS", "dtype"),
    ("dims: [ 65 ]", "dims: [ 64 ]", "LOGITS", "shape"),
])
@pytest.mark.parametrize("name", STEP_STATEFUL)
def test_config_that_differs_from_the_graph_is_reported(name, old, new, tensor, words, shipped_repo, shipped_proto):
    text = (shipped_repo / name / repository.CONFIG).read_text()
    assert old in text
    config = repository.parse_config(text.replace(old, new, 1))
    problems = configs.check_config_against_onnx(config, shipped_proto)
    assert problems, f"{old!r} -> {new!r} not detected"
    assert any(f"'{tensor}'" in p and words in p for p in problems), problems


def test_state_listed_as_a_plain_input_is_reported_for_onnxruntime(shipped_repo, shipped_proto):
    """ORT needs config inputs + states == graph inputs: dropping the state block leaves STATE_IN unfed."""
    text = (shipped_repo / repository.ONNX / repository.CONFIG).read_text()
    stateless = re.sub(r"\n  state \[.*?\n  \]", "", text, flags=re.S)
    assert "state [" not in stateless
    problems = configs.check_config_against_onnx(repository.parse_config(stateless), shipped_proto)
    assert any("STATE_IN" in p and "graph inputs" in p for p in problems), problems


# --- 6. TensorRT readiness (static) ----------------------------------------------------------------------


def test_shipped_graph_is_tensorrt_ready(shipped_proto):
    report = check_model(shipped_proto)
    assert report.ready, report.text()
    assert report.op_counts["LSTM"] == 2
    assert report.text().startswith("TensorRT readiness: READY (")


@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_export_passes_the_trt_check(exported, cell, record_property):
    """What each cell exports to (recorded): LSTM -> 2 ONNX LSTM ops; GRU / SimpleRNN -> 2 ONNX `Loop`s
    (tf2onnx's rewriter does not match Keras 3 GRU/SimpleRNN). All pass the static check."""
    e = exported(cell)
    report = check_model(e.proto)
    record_property(f"ops_{cell}", json.dumps(dict(report.op_counts), sort_keys=True))
    print(f"{cell}: {report.text()}")
    assert report.ready, report.text()
    ops = op_counts(e.proto)
    if cell == "lstm":
        assert ops.get("LSTM") == 2 and "Loop" not in ops
    else:
        assert "LSTM" not in ops
        assert ops.get({"gru": "GRU", "rnn": "RNN"}[cell], 0) == 2 or ops.get("Loop") == 2, ops


def test_gru_export_is_one_onnx_loop_per_layer_as_documented(exported):
    ops = op_counts(exported("gru").proto)
    assert ops.get("Loop") == 2 and "GRU" not in ops, ops


def make_model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   *(helper.make_opsetid(d, v) for d, v in extra_opsets)])


def good_io():
    ins = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
           helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, ["batch", 2, 1, 4])]
    outs = [helper.make_tensor_value_info(STATE_OUT, TensorProto.FLOAT, ["batch", 2, 1, 4])]
    return ins, outs


def good_graph() -> onnx.ModelProto:
    ins, outs = good_io()
    return make_model([helper.make_node("Identity", [STATE_IN], [STATE_OUT], name="id")], ins, outs)


def lstm_graph(**attrs) -> onnx.ModelProto:
    H, I = 4, 3
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R")]
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="lstm", hidden_size=H, **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 2, I])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    return make_model([node], [x], [y], inits)


def multinomial_graph() -> onnx.ModelProto:
    ins, outs = good_io()
    logits = helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", 65])
    sample = helper.make_tensor_value_info("SAMPLE", TensorProto.INT32, ["batch", 1])
    nodes = [helper.make_node("Identity", [STATE_IN], [STATE_OUT], name="id"),
             helper.make_node("Multinomial", [LOGITS], ["SAMPLE"], name="sample", dtype=TensorProto.INT32,
                              sample_size=1)]
    return make_model(nodes, [*ins, logits], [*outs, sample])


def custom_domain_graph() -> onnx.ModelProto:
    ins, outs = good_io()
    node = helper.make_node("PackState", [STATE_IN], [STATE_OUT], name="pack", domain="com.example")
    return make_model([node], ins, outs, extra_opsets=[("com.example", 1)])


def dynamic_state_graph() -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
           helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, ["batch", "S", 1, 4])]
    outs = [helper.make_tensor_value_info(STATE_OUT, TensorProto.FLOAT, ["batch", "S", 1, 4])]
    return make_model([helper.make_node("Identity", [STATE_IN], [STATE_OUT], name="id")], ins, outs)


def loop_with_unsupported_op_graph() -> onnx.ModelProto:
    """The unsupported op hides in a Loop body: the check must look inside subgraphs."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Multinomial", ["x_in"], ["s"], dtype=TensorProto.INT32, sample_size=1),
         helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 4])])
    inits = [numpy_helper.from_array(np.array(3, np.int64), "M"), numpy_helper.from_array(np.array(True), "c")]
    node = helper.make_node("Loop", ["M", "c", "X"], ["Y"], name="loop", body=body)
    return make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], inits)


def double_io_graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["batch", 4])
    y = helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["batch", 4])
    return make_model([helper.make_node("Identity", ["X"], ["Y"])], [x], [y])


@pytest.mark.parametrize("build, expected", [
    (multinomial_graph, r"op Multinomial \(sample\) is not supported by TensorRT's ONNX parser"),
    (custom_domain_graph, r"op PackState is in custom domain 'com\.example'"),
    (dynamic_state_graph, r"STATE_IN: dim 1 is dynamic \(S\); only batch may be"),
    (lambda: lstm_graph(layout=1), r"LSTM lstm: layout must be 0 for TensorRT"),
    (lambda: lstm_graph(input_forget=1), r"LSTM lstm: input_forget must be 0 for TensorRT"),
    (loop_with_unsupported_op_graph, r"op Multinomial \(\) is not supported"),
    (lambda: make_model(good_graph().graph.node, *good_io(), opset=8), r"opset 8 is outside TensorRT's parser range"),
    (double_io_graph, r"X: dtype DOUBLE not supported on I/O"),
])
def test_trt_check_reports_the_specific_problem(build, expected):
    report = check_model(build())
    assert not report.ready
    assert report.text().startswith("TensorRT readiness: NOT READY (")
    assert any(re.search(expected, p) for p in report.problems), report.problems
    assert re.search(r"^  - " + expected, report.text(), re.M)


def test_trt_check_accepts_the_hand_built_good_graphs():
    for model in (good_graph(), lstm_graph(), lstm_graph(layout=0, input_forget=0)):
        report = check_model(model)
        assert report.ready, report.text()


def test_trt_check_cli_exit_codes(tmp_path, shipped_onnx):
    bad = tmp_path / "bad.onnx"
    onnx.save(multinomial_graph(), str(bad))
    r = run("-m", "export.trt_check", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("TensorRT readiness: NOT READY") and "Multinomial" in r.stdout
    assert r.stderr.startswith(f"error: {bad}: 1 TensorRT problem(s)")
    ok = run("-m", "export.trt_check", str(shipped_onnx))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("TensorRT readiness: READY") and "LSTMx2" in ok.stdout
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a model")
    r = run("-m", "export.trt_check", str(garbage))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {garbage}: cannot load ONNX model"), r.stderr


def test_op_list_used_marks_what_the_export_needs():
    used = next(p for p in OPS_FILE_CANDIDATES if p.is_file())
    ops = supported_ops()
    assert ops == supported_ops(used)
    for op in ("LSTM", "GRU", "RNN", "Loop", "MatMul", "Gather", "Add", "Concat", "Slice", "Squeeze", "Unsqueeze",
               "Transpose", "Reshape", "Cast", "Shape", "Sigmoid", "Tanh"):
        assert op in ops, op
        assert ops[op].startswith("Y")
    assert "LSTM" in ops and "layout attribute must be 0" in ops["LSTM"]
    assert "Multinomial" not in ops  # listed as N


def test_repo_op_list_is_a_copy_of_the_shared_one():
    assert REPO_OPS.is_file()
    if not SHARED_OPS.is_file():
        pytest.skip(f"{SHARED_OPS} not present on this machine")
    assert REPO_OPS.read_bytes() == SHARED_OPS.read_bytes()


# --- 7. plan builder without TensorRT ----------------------------------------------------------------------


def tensorrt_builder_available() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


@pytest.mark.skipif(tensorrt_builder_available(), reason="TensorRT is installed here: the plan can be built")
def test_build_plan_without_tensorrt_exits_3_and_writes_nothing(tmp_path, shipped_onnx):
    out = tmp_path / "plan" / "model.plan"
    r = run("-m", "export.build_plan", "--onnx", str(shipped_onnx), "--out", str(out))
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("error: tensorrt:"), r.stderr
    assert "TensorRT container" in r.stderr and "`make plan`" in r.stderr
    assert not out.exists() and not out.parent.exists()


def test_build_plan_with_a_missing_onnx_exits_2(tmp_path):
    out = tmp_path / "model.plan"
    r = run("-m", "export.build_plan", "--onnx", str(tmp_path / "none.onnx"), "--out", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'none.onnx'}: ONNX model not found"), r.stderr
    assert not out.exists()


def test_profile_shapes_cover_the_serving_limits(shipped_contract_vocab):
    contract, _ = shipped_contract_vocab
    shapes = profile_shapes(contract.state_dims, MAX_BATCH_SIZE, MAX_T)
    assert set(shapes) == {INPUT_IDS, STATE_IN}  # every input, STATE_IN included, has a profile entry
    assert shapes[INPUT_IDS] == ((1, 1), (64, 1), (64, 256))  # batch 1..64, T 1..256, opt T=1
    assert shapes[STATE_IN] == ((1, 2, 2, 512), (64, 2, 2, 512), (64, 2, 2, 512))  # state dims exact
    # Triton: config max_batch_size must be <= the profile's max batch
    config = repository.parse_config(committed_text(repository.TRT))
    assert shapes[INPUT_IDS][2][0] >= config.max_batch_size
    assert shapes[STATE_IN][2][1:] == tuple(config.sequence_batching.state[0].dims)
    gru = profile_shapes((1, 3, 8), 4, 9)
    assert gru[STATE_IN] == ((1, 1, 3, 8), (4, 1, 3, 8), (4, 1, 3, 8)) and gru[INPUT_IDS] == ((1, 1), (4, 1), (4, 9))


# --- 8. `python -m export` on bad model directories ----------------------------------------------------------


def _copy(tiny_model, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model, d, ignore=shutil.ignore_patterns("checkpoints"))
    return d


def _set_json(path: Path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


BAD_MODEL_DIRS = {
    "missing": (lambda d: shutil.rmtree(d), r"model directory not found"),
    "a file": (lambda d: (shutil.rmtree(d), d.write_text("x")), r"model directory not found"),
    "no weights": (lambda d: (d / "model.weights.h5").unlink(), r"missing model\.weights\.h5"),
    "no vocab": (lambda d: (d / "vocab.json").unlink(), r"missing vocab\.json"),
    "truncated weights": (lambda d: (d / "model.weights.h5").write_bytes((d / "model.weights.h5").read_bytes()[:4000]),
                          r"model\.weights\.h5: cannot load weights"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{vocab_size: 65"), r"config\.json: not valid JSON"),
    "config unknown key": (lambda d: _set_json(d / "config.json", hiden=48), r"config\.json: unknown keys \['hiden'\]"),
    "weights of another size": (lambda d: _set_json(d / "config.json", hidden=32), r"cannot load weights"),
    "pickled vocab": (lambda d: (d / "vocab.json").write_bytes(b"\x80\x04\x95\x10\x00\x00"), r"not a UTF-8"),
    "vocab size differs": (lambda d: (d / "vocab.json").write_text(json.dumps(
        {"chars": json.loads((d / "vocab.json").read_text())["chars"][:-1]})),
        r"vocabulary mismatch: vocab\.json has 64 characters, the model 65"),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_DIRS))
def test_export_cli_rejects_a_bad_model_dir_and_writes_nothing(case, tiny_model, tmp_path, capsys):
    from export.__main__ import main as export_main

    d = _copy(tiny_model, tmp_path)
    damage, pattern = BAD_MODEL_DIRS[case]
    damage(d)
    repo = tmp_path / "repo"
    rc = export_main(["--model", str(d), "--repo", str(repo)])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err  # one clear message ...
    assert "Traceback" not in err  # ... and no traceback
    assert not repo.exists(), "nothing may be written for a bad model directory"


@pytest.mark.parametrize("content", ["null", "65", "\"x\"", "[]"])
def test_export_cli_rejects_a_config_json_that_is_not_an_object(content, tiny_model, tmp_path, capsys):
    from export.__main__ import main as export_main

    d = _copy(tiny_model, tmp_path)
    (d / "config.json").write_text(content)
    repo = tmp_path / "repo"
    rc = export_main(["--model", str(d), "--repo", str(repo)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "config.json" in err, err
    assert not repo.exists()


def test_export_writes_the_whole_repository(shipped_repo, shipped_proto):
    """`python -m export` output: both ONNX copies identical, the python model source, every config."""
    onnx_copy = shipped_repo / repository.PYTHON / "1" / "model.onnx"
    assert onnx_copy.read_bytes() == (shipped_repo / repository.ONNX / "1" / "model.onnx").read_bytes()
    assert (shipped_repo / repository.PYTHON / "1" / "model.py").read_text() == \
        (COMMITTED_REPO / repository.PYTHON / "1" / "model.py").read_text()
    assert (shipped_repo / repository.TRT / "1").is_dir()
    assert not (shipped_repo / repository.TRT / "1" / "model.plan").exists()  # needs the TensorRT container
    assert sorted(p.parent.name for p in shipped_repo.glob("*/config.pbtxt")) == sorted(repository.SERVED_MODELS)
    assert set(STEP) <= set(repository.SERVED_MODELS)


def test_export_idle_timeout_flag_sets_every_model_and_refuses_nonsense(tiny_model, tmp_path, capsys):
    from export.__main__ import main as export_main

    assert export_main(["--model", str(tiny_model), "--repo", str(tmp_path / "bad"), "--idle-timeout", "0"]) == 2
    assert "error: --idle-timeout: must be in 1..86400 seconds, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    repo = tmp_path / "repo"
    assert export_main(["--model", str(tiny_model), "--repo", str(repo), "--idle-timeout", "7.5"]) == 0
    for name in repository.SERVED_MODELS:
        c = repository.load_config(repo / name / "config.pbtxt")
        assert c.sequence_batching.max_sequence_idle_microseconds == 7_500_000, name

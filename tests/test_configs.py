"""export/configs.py: the Triton configs it renders (parsed with Triton's own ModelConfig proto), with no drift
between the committed model_repository/, a fresh export and render_config, the documented requirements of
every config, and the cross-check of a config against its ONNX graph (step and generation graphs).
"""

from __future__ import annotations

import json
import re

import pytest

from charrnn import repository
from charrnn.contract import (
    INPUT_IDS,
    LOGITS,
    MAX_BATCH_SIZE,
    MAX_SEQUENCE_IDLE_US,
    MAX_SEQUENCES,
    NOISE,
    OUTPUT_IDS,
    STATE_IN,
    STATE_OUT,
    TEMPERATURE,
    TOP_K,
    VOCAB_PARAMETER,
)
from charrnn.repository import STEP_MODELS as STEP
from charrnn.vocab import Vocab
from export import configs
from tests.helpers import COMMITTED_REPO, ROOT, SHIPPED_MODEL, committed_text

COMMITTED_CONFIGS = sorted(p.parent.name for p in COMMITTED_REPO.glob(f"*/{repository.CONFIG}"))
# implicit state (the python backend keeps state itself)
STEP_STATEFUL = (
    repository.TRT,
    repository.ONNX,
)


# --- the committed, rendered and freshly exported configs ---------------------------------------------------
def test_committed_model_repository_has_the_step_models():
    assert set(STEP) <= set(COMMITTED_CONFIGS)
    assert set(COMMITTED_CONFIGS) <= set(
        repository.SERVED_MODELS
    ), "a config no generator knows about (stale or by hand)"


@pytest.mark.parametrize("name", COMMITTED_CONFIGS)
def test_committed_config_parses_and_equals_render_config(name, shipped_contract_vocab):
    contract, vocab = shipped_contract_vocab
    text = committed_text(name)
    config = repository.parse_config(text)  # Triton's own ModelConfig protobuf
    assert config.name == name
    assert text == configs.render_config(
        name, contract, vocab
    ), f"model_repository/{name}/config.pbtxt drifted from export/configs.py: run `make export`"


@pytest.mark.parametrize("name", repository.SERVED_MODELS)
def test_freshly_exported_config_parses_and_equals_committed(name, shipped_repo):
    text = (shipped_repo / name / repository.CONFIG).read_text()
    assert repository.load_config(shipped_repo / name / repository.CONFIG).name == name
    if name in COMMITTED_CONFIGS:
        assert text == committed_text(name)
    else:
        assert name not in STEP


@pytest.mark.parametrize(
    "source, name",
    [
        *(("committed", n) for n in COMMITTED_CONFIGS),
        *(("fresh", n) for n in repository.SERVED_MODELS),
    ],
)
def test_config_meets_the_documented_requirements(
    name, source, shipped_repo, shipped_contract_vocab
):
    """Every config: batching, the `oldest` sequence batcher, an explicit idle timeout, ONE packed implicit state
    (zero_data, named) exactly on the TensorRT / ONNX Runtime models, platform/backend, the vocabulary.
    """
    from tritonclient.grpc import model_config_pb2 as pb

    contract, vocab = shipped_contract_vocab
    path = (COMMITTED_REPO if source == "committed" else shipped_repo) / name / repository.CONFIG
    text = path.read_text()
    c = repository.parse_config(text)
    assert c.name == name
    assert c.max_batch_size == MAX_BATCH_SIZE > 0
    if name in STEP:  # client-facing interface: the same for the three step models
        assert [(t.name, t.data_type, list(t.dims)) for t in c.input] == [
            (INPUT_IDS, pb.TYPE_INT32, [-1])
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in c.output] == [
            (LOGITS, pb.TYPE_FP32, [contract.vocab_size])
        ]
    # sequence batcher: oldest strategy, idle timeout set explicitly and well above Triton's 1 s default
    sb = c.sequence_batching
    assert c.HasField("sequence_batching")
    assert sb.WhichOneof("strategy_choice") == "oldest"
    # Sequence slots far above the batch: sequence 65 must not wait for a slot (and block its gRPC stream).
    assert sb.oldest.max_candidate_sequences == MAX_SEQUENCES >= 16 * MAX_BATCH_SIZE
    assert re.search(
        r"^\s*max_sequence_idle_microseconds:\s*\d+", text, re.M
    ), "must be set explicitly"
    assert sb.max_sequence_idle_microseconds == MAX_SEQUENCE_IDLE_US > 1_000_000
    assert not c.HasField("dynamic_batching"), "the sequence batcher, not the dynamic batcher"
    assert list(sb.control_input) == [], "the graph has no START/READY inputs"
    # implicit state: only where the backend supports it (TensorRT, ONNX Runtime), exactly one packed state
    backend = repository.BY_NAME[name].backend
    assert (backend != repository.PYTHON_BACKEND) == (name in repository.IMPLICIT_STATE_MODELS)
    if backend != repository.PYTHON_BACKEND:
        assert len(sb.state) == 1
        s = sb.state[0]
        assert (s.input_name, s.output_name, s.data_type) == (STATE_IN, STATE_OUT, pb.TYPE_FP32)
        assert tuple(s.dims) == contract.state_dims == (2, 2, 512)
        assert len(s.initial_state) == 1
        init = s.initial_state[0]
        assert init.WhichOneof("state_data") == "zero_data" and init.zero_data
        assert init.name
        assert init.data_type == s.data_type and tuple(init.dims) == contract.state_dims
        assert STATE_IN not in [t.name for t in c.input] and STATE_OUT not in [
            t.name for t in c.output
        ]
    else:
        assert len(sb.state) == 0
    # platform / backend / instance kind
    kinds = [g.kind for g in c.instance_group]
    if backend == repository.TENSORRT:
        assert (c.platform, c.backend) == ("tensorrt_plan", "")
        assert kinds == [pb.ModelInstanceGroup.KIND_GPU]
    elif backend == repository.ONNXRUNTIME:
        assert (c.platform, c.backend) == ("onnxruntime_onnx", "")
        assert kinds == [pb.ModelInstanceGroup.KIND_AUTO]  # NVIDIA's images: GPU if present
    else:
        assert (c.platform, c.backend) == ("", "python")
        assert kinds == [pb.ModelInstanceGroup.KIND_CPU]
    # the vocabulary travels with the model
    assert repository.vocab_of(c) == vocab == Vocab.load(SHIPPED_MODEL / "vocab.json")
    assert json.loads(c.parameters[VOCAB_PARAMETER].string_value) == json.loads(
        (SHIPPED_MODEL / "vocab.json").read_text()
    )


def test_render_config_rejects_a_vocab_of_the_wrong_size(shipped_contract_vocab):
    from charrnn.errors import UserError

    contract, vocab = shipped_contract_vocab
    with pytest.raises(UserError, match="vocabulary: has 64 characters, the model 65"):
        configs.render_config(repository.ONNX, contract, Vocab(vocab.chars[:-1]))
    with pytest.raises(ValueError):
        configs.render_config("charrnn_tf", contract, vocab)


@pytest.mark.parametrize("name", repository.GEN_MODELS)
def test_gen_configs_parse_are_committed_and_agree_with_the_graph(name, shipped_repo, gen_proto):
    from tritonclient.grpc import model_config_pb2 as pb

    fresh = (shipped_repo / name / repository.CONFIG).read_text()
    committed = ROOT / "model_repository" / name / repository.CONFIG
    assert (
        committed.is_file() and committed.read_text() == fresh
    ), f"{committed} is stale: run `make export`"
    c = repository.parse_config(fresh)
    assert c.name == name
    assert configs.check_config_against_onnx(c, gen_proto) == []
    assert [(t.name, t.data_type, list(t.dims)) for t in c.input] == [
        (INPUT_IDS, pb.TYPE_INT32, [-1]),
        (NOISE, pb.TYPE_FP32, [-1, 65]),
        (TEMPERATURE, pb.TYPE_FP32, [1]),
        (TOP_K, pb.TYPE_INT32, [1]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in c.output] == [
        (OUTPUT_IDS, pb.TYPE_INT32, [-1])
    ]
    assert c.model_transaction_policy.decoupled == (name == repository.GEN_STREAM)
    assert (len(c.sequence_batching.state) == 1) == (name in repository.IMPLICIT_STATE_MODELS)
    # a config that disagrees with the graph is reported
    bad = repository.parse_config(fresh.replace("dims: [ -1, 65 ]", "dims: [ -1, 64 ]"))
    assert any("'NOISE'" in p for p in configs.check_config_against_onnx(bad, gen_proto))


@pytest.mark.parametrize("name", repository.ORT_MODELS)
def test_cpu_config_is_config_pbtxt_with_kind_cpu_and_its_thread_count(
    name, shipped_repo, shipped_contract_vocab
):
    """configs/cpu.pbtxt, which our CPU servers load (--model-config-name=cpu): committed and fresh equal the
    render, and it differs from config.pbtxt only in the comment, KIND_CPU and the backend's thread count.
    """
    from tritonclient.grpc import model_config_pb2 as pb

    contract, vocab = shipped_contract_vocab
    relative = repository.BY_NAME[name].cpu_config
    assert relative == f"configs/{repository.CPU_CONFIG_NAME}.pbtxt"
    text = (COMMITTED_REPO / name / relative).read_text()
    assert text == (shipped_repo / name / relative).read_text()
    assert text == configs.render_config(name, contract, vocab, cpu=True)
    cpu = repository.parse_config(text)
    default = repository.load_config(shipped_repo / name)
    assert [g.kind for g in cpu.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    assert cpu.parameters["intra_op_thread_count"].string_value == str(
        repository.BY_NAME[name].threads
    )
    del cpu.instance_group[:], default.instance_group[:]
    del cpu.parameters["intra_op_thread_count"]
    assert cpu == default


def test_only_the_onnxruntime_models_have_a_cpu_config():
    have = sorted(p.parent.parent.name for p in COMMITTED_REPO.glob("*/configs/*.pbtxt"))
    assert have == sorted(repository.ORT_MODELS)
    with pytest.raises(ValueError, match="no CPU config"):
        configs.render_config(repository.PYTHON, None, Vocab(["a"]), cpu=True)


# --- config <-> ONNX cross-check ---------------------------------------------------------------------
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


@pytest.mark.parametrize(
    "old, new, tensor, words",
    [
        # state and initial_state dims
        (
            "dims: [ 2, 2, 512 ]",
            "dims: [ 2, 2, 256 ]",
            "STATE_IN",
            "shape",
        ),
        # state only
        (
            "dims: [ 2, 2, 512 ]\n      initial",
            "dims: [ 2, 512 ]\n      initial",
            "STATE_IN",
            "shape",
        ),
        (
            "data_type: TYPE_FP32\n      dims",
            "data_type: TYPE_FP16\n      dims",
            "STATE_IN",
            "dtype",
        ),
        ('input_name: "STATE_IN"', 'input_name: "STATE"', "STATE", "not in the ONNX graph"),
        (
            'output_name: "STATE_OUT"',
            'output_name: "STATE_OUTPUT"',
            "STATE_OUTPUT",
            "not in the ONNX graph",
        ),
        ('name: "INPUT_IDS"', 'name: "INPUT_ID"', "INPUT_ID", "not in the ONNX graph"),
        ("data_type: TYPE_INT32", "data_type: TYPE_INT64", "INPUT_IDS", "dtype"),
        ("dims: [ 65 ]", "dims: [ 64 ]", "LOGITS", "shape"),
    ],
)
@pytest.mark.parametrize("name", STEP_STATEFUL)
def test_config_that_differs_from_the_graph_is_reported(
    name, old, new, tensor, words, shipped_repo, shipped_proto
):
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

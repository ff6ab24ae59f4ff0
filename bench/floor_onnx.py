"""The round-trip floor on Triton's ONNX Runtime backend for `make bench`: charrnn_onnx's interface, implicit
state and CPU config, and no network to run (the ONNX twin of bench/floor_model.py).

    from bench.floor_onnx import write_floor_model
    write_floor_model(Path("model_repository"), Path(tmp) / "repository")   # -> charrnn_floor_onnx/

The graph takes INPUT_IDS (B, T) and STATE_IN (B, S, L, H) like the exported step graph and returns LOGITS =
zeros (B, V) (its batch dim read from INPUT_IDS) and STATE_OUT = STATE_IN. Its config is
export.configs.render_config(charrnn_onnx, ..., cpu=True), renamed: the same sequence batcher, implicit state,
KIND_CPU and thread count as the served model. What one request costs on it is what every charrnn_onnx request
pays before inference: gRPC, the sequence batcher, the implicit-state copies, the backend's ONNX Runtime call.
"""

from __future__ import annotations

from pathlib import Path

from charrnn.contract import INPUT_IDS, LOGITS, STATE_IN, STATE_OUT, Contract
from charrnn.repository import CONFIG, CPU_CONFIG_NAME, ONNX, load_config, vocab_of

FLOOR_ONNX_MODEL = "charrnn_floor_onnx"
OPSET = 13  # Shape, Slice, Concat, ConstantOfShape, Identity: nothing newer needed
IR_VERSION = 8  # read by every ONNX Runtime release since 1.10


def served_contract(repo: Path) -> tuple[Contract, object]:
    """(Contract, Vocab) of the repository's charrnn_onnx: state dims and vocabulary size from its config."""
    config = load_config(repo / ONNX)
    (state,) = config.sequence_batching.state
    slots, layers, hidden = (int(d) for d in state.dims)
    (logits,) = [o for o in config.output if o.name == LOGITS]
    vocab = vocab_of(config)
    # The cell only decides S (2 for an LSTM, 1 otherwise); the dims are what the graph needs.
    return Contract("lstm" if slots == 2 else "gru", layers, hidden, int(logits.dims[0])), vocab


def floor_graph(contract: Contract):
    """The empty step graph: INPUT_IDS, STATE_IN -> LOGITS zeros (B, V), STATE_OUT = STATE_IN."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    state_shape = ["batch", *contract.state_dims]
    nodes = [
        helper.make_node("Shape", [INPUT_IDS], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "vocab"], ["logits_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["logits_shape"],
            [LOGITS],
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        ),
        helper.make_node("Identity", [STATE_IN], [STATE_OUT]),
    ]
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([contract.vocab_size], np.int64), "vocab"),
    ]
    graph = helper.make_graph(
        nodes,
        FLOOR_ONNX_MODEL,
        [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
            helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, state_shape),
        ],
        [
            helper.make_tensor_value_info(
                LOGITS, TensorProto.FLOAT, ["batch", contract.vocab_size]
            ),
            helper.make_tensor_value_info(STATE_OUT, TensorProto.FLOAT, state_shape),
        ],
        initializer=consts,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write_floor_model(repo: Path, dest: Path) -> Path:
    """<dest>/charrnn_floor_onnx: 1/model.onnx (the empty graph) and its config, charrnn_onnx's CPU config
    (configs/cpu.pbtxt, also as config.pbtxt) renamed. Returns the served model's folder."""
    import onnx
    from google.protobuf import text_format

    from charrnn.errors import CheckFailed
    from export.configs import check_config_against_onnx, parse_config, render_config

    contract, vocab = served_contract(repo)
    config = parse_config(render_config(ONNX, contract, vocab, cpu=True))
    config.name = FLOOR_ONNX_MODEL
    proto = floor_graph(contract)
    problems = check_config_against_onnx(config, proto)
    if problems:  # the twin must be what charrnn_onnx is, to the tensor
        raise CheckFailed(FLOOR_ONNX_MODEL, "; ".join(problems), "fix bench/floor_onnx.py")
    folder = dest / FLOOR_ONNX_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "configs").mkdir(exist_ok=True)
    onnx.save(proto, folder / "1" / "model.onnx")
    text = text_format.MessageToString(config)
    (folder / CONFIG).write_text(text)
    (folder / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").write_text(text)
    return folder

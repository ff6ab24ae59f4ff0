"""TF model directory -> ONNX step model with explicit, packed state (tf2onnx).

    python -m export.onnx_export --model models/shakespeare-lstm-2x512 --out /tmp/model.onnx

The graph is the model's `step`:  INPUT_IDS int32 (B, T), STATE_IN fp32 (B, S, L, H)
-> LOGITS fp32 (B, V) (after the last input position), STATE_OUT fp32 (B, S, L, H); batch and T dynamic.
tf2onnx rewrites each Keras LSTM layer into one ONNX LSTM op; Keras 3 GRU and SimpleRNN layers come out as an
ONNX Loop per layer (both are in TensorRT's ONNX op list; export.trt_check checks every op).
The graph refuses bad INPUT_IDS itself (ids outside 0..V-1, T outside 1..MAX_T): export/guards.py.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from charrnn.contract import INPUT_IDS, LOGITS, STATE_IN, STATE_OUT

from .guards import guard_step_inputs

OPSET = 17
DIM_NAMES = {0: "batch"}  # dynamic dims get readable names in the graph; INPUT_IDS dim 1 is "T"


def rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a graph input/output and every reference to it (including inside subgraphs)."""
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                rename_value(attr.g, old, new)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def name_dims(vi: onnx.ValueInfoProto, names: dict[int, str]) -> None:
    for i, dim in enumerate(vi.type.tensor_type.shape.dim):
        if i in names:
            dim.ClearField("dim_value")
            dim.dim_param = names[i]


def export_onnx(model, out: str | Path, opset: int = OPSET, guard: bool = True) -> onnx.ModelProto:
    """Convert a charrnn.model.CharRNN to ONNX at `out` with the contract's names; returns the proto.

    guard: add the run-time input guards (export.guards; False only to measure or compare them).
    """
    import tensorflow as tf
    import tf2onnx

    contract = model.config.contract
    spec = (
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, *contract.state_dims], tf.float32, name="state_in"),
    )

    @tf.function(input_signature=spec)
    def step(input_ids, state_in):
        logits, state_out = model.step(input_ids, state_in)
        return {LOGITS: logits, STATE_OUT: state_out}  # dict keys become the ONNX output names

    proto, _ = tf2onnx.convert.from_function(step, input_signature=spec, opset=opset)
    graph = proto.graph
    # TF lower-cases function argument names; give the inputs the contract's names.
    for vi in list(graph.input):
        new = {"input_ids": INPUT_IDS, "state_in": STATE_IN}.get(vi.name.split(":")[0], vi.name)
        rename_value(graph, vi.name, new)
    for vi in graph.input:
        name_dims(vi, {0: "batch", 1: "T"} if vi.name == INPUT_IDS else DIM_NAMES)
    for vi in graph.output:
        name_dims(vi, DIM_NAMES)
    if guard:
        guard_step_inputs(graph, contract)  # refuses bad INPUT_IDS at run time (export/guards.py)
    proto.doc_string = (
        f"charrnn step: {INPUT_IDS} (batch, T) int32 + {STATE_IN} {('batch', *contract.state_dims)} "
        f"-> {LOGITS} (batch, {contract.vocab_size}) + {STATE_OUT}; cell {contract.cell}"
    )
    onnx.checker.check_model(proto)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return proto

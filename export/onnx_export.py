"""TF network -> ONNX step model with explicit, packed state (tf2onnx).

    net, _, _ = charrnn.model.load_model_dir("models/shakespeare-lstm-2x512")
    export_onnx(net, "/tmp/model.onnx")      # `python -m export` does this into the model repository

The graph is the network's `step`:  INPUT_IDS int32 (B, T), STATE_IN fp32 (B, S, L, H)
-> LOGITS fp32 (B, V) (after the last input position), STATE_OUT fp32 (B, S, L, H); batch and T dynamic.
tf2onnx rewrites each Keras LSTM layer into one ONNX LSTM op; Keras 3 GRU and SimpleRNN layers come out as an
ONNX Loop per layer (both are in TensorRT's ONNX op list; export.trt_check checks every op).
The graph refuses bad INPUT_IDS itself (ids outside 0..V-1, T outside 1..MAX_T): export/guards.py.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from charrnn.contract import (
    DYNAMIC_DIMS,
    INPUTS,
    LOGITS,
    OUTPUTS,
    STATE_OUT,
    STEP,
    Contract,
    Tensor,
    describe,
    tensors,
)

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


def onnx_dim_names(t: Tensor) -> dict[int, str]:
    """The names of a table row's dynamic dims in the ONNX graph ("batch", "T", "K")."""
    return {i: "batch" if d == "B" else d for i, d in enumerate(t.dims) if d in DYNAMIC_DIMS}


def table_spec(graph: str, contract: Contract):
    """The tf.function input signature of a graph: its inputs in charrnn.contract's table, in order, each named
    after the row in lower case (TF lower-cases argument names; export renames the ONNX inputs back).
    """
    import tensorflow as tf

    return tuple(
        tf.TensorSpec(
            [None if d == -1 else d for d in contract.shape(t)],
            tf.as_dtype(t.dtype),
            name=t.name.lower(),
        )
        for t in tensors(graph, INPUTS)
    )


def name_table_io(graph: onnx.GraphProto, which: str) -> None:
    """Give a converted graph's inputs the table's names, and every input's and output's dynamic dims theirs."""
    for vi in list(graph.input):
        new = {t.name.lower(): t.name for t in tensors(which, INPUTS)}
        rename_value(graph, vi.name, new.get(vi.name.split(":")[0], vi.name))
    dims = {t.name: onnx_dim_names(t) for kind in (INPUTS, OUTPUTS) for t in tensors(which, kind)}
    for vi in list(graph.input) + list(graph.output):
        name_dims(vi, dims.get(vi.name, DIM_NAMES))


def export_onnx(net, out: str | Path, opset: int = OPSET, guard: bool = True) -> onnx.ModelProto:
    """Convert the network `net` (a charrnn.model.CharRNN) to ONNX at `out` with the contract's names; returns the proto.

    guard: add the run-time input guards (export.guards; False only to measure or compare them).
    """
    import tensorflow as tf
    import tf2onnx

    contract = net.config.contract
    spec = table_spec(STEP, contract)

    @tf.function(input_signature=spec)
    def step(input_ids, state_in):
        logits, state_out = net.step(input_ids, state_in)
        return {LOGITS: logits, STATE_OUT: state_out}  # dict keys become the ONNX output names

    proto, _ = tf2onnx.convert.from_function(step, input_signature=spec, opset=opset)
    graph = proto.graph
    name_table_io(graph, STEP)  # TF lower-cases function argument names: the table's names back
    if guard:
        guard_step_inputs(graph, contract)  # refuses bad INPUT_IDS at run time (export/guards.py)
    proto.doc_string = (
        f"charrnn step (V = {contract.vocab_size}, S, L, H = {contract.state_dims}, cell {contract.cell}):\n"
        + describe(STEP)
    )
    onnx.checker.check_model(proto)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return proto

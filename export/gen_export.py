"""TF model directory -> ONNX *generation* graph: K characters sampled per call, inside the graph (tf2onnx).

    python -m export.gen_export --model-dir models/shakespeare-lstm-2x512 --out /tmp/gen.onnx

Inputs and outputs: the GEN rows of charrnn.contract's table (`python -m charrnn.contract`), in order: the
tf.function's signature is built from them (INPUT_IDS, STATE_IN, NOISE, TEMPERATURE, TOP_K -> OUTPUT_IDS,
STATE_OUT), and check_gen_io checks the exported graph against them.

Semantics (= the per-character client with charrnn.sampling): consume INPUT_IDS -> logits ->
id_1 = argmax(topk_filter(logits / T) + gumbel(NOISE[:, 0])) -> feed id_1 -> ... -> id_K, which is NOT fed:
STATE_OUT is the state after INPUT_IDS and id_1..id_{K-1}, and the next call sends id_K as its INPUT_IDS.

Graph: the prompt goes through the network's own `step` (tf2onnx turns each Keras RNN layer into one ONNX
LSTM/GRU/RNN op, like the step export); the K-1 further characters run in a tf.while_loop -> ONNX `Loop`
(-> TensorRT ILoop) whose body calls the network's layers with T=1 through each RNN layer's `.cell` (MatMul,
Add, Sigmoid, Tanh, Mul: the cell's own code, no re-implemented LSTM math). TensorRT-friendly by construction:
  - no Multinomial / RandomUniform: the Gumbel noise comes from the NOISE input (-log(-log(u)));
  - top-k per row: TopK(k = V) sorts each row once, GatherElements picks the row's k-th value (threshold);
  - temperature 0 -> greedy: Where(T > 0, sampled, ArgMax(raw logits));
  - the Loop has a trip count (K - 1) and no scan outputs (TensorRT: "scan output length cannot be dynamic");
    the ids go into a fixed-shape (B, K) loop-carried buffer, written with Where(Range(K) == i, id, buffer);
  - TF's while_loop carries every captured tensor (the weights, NOISE, ...) as a loop variable; those are
    rewritten to be read from the outer scope (hoist_loop_invariants), so only ids, state and buffer recur.
The graph refuses bad input itself, before the prompt's embedding and the Loop run (export/guards.py): ids
outside 0..V-1, T outside 1..MAX_T, K outside 1..MAX_K, NOISE not in (0, 1), TEMPERATURE neither 0 nor finite
and >= MIN_TEMPERATURE, TOP_K outside 0..V. A positive temperature is used as sent (no clamp in the graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from charrnn.cli import add_model_dir, parser
from charrnn.contract import (
    GEN,
    OUTPUT_IDS,
    STATE_OUT,
    Contract,
    describe,
    state_slots,
)
from charrnn.errors import CheckFailed, cli

from .guards import guard_gen_inputs
from .onnx_export import OPSET, name_table_io, rename_value, table_spec


def generation_function(net):
    """The tf.function exported as the generation graph of the network `net` (also runnable in TF, for
    tests)."""
    import tensorflow as tf

    config = net.config
    contract = config.contract
    slots, vocab = state_slots(config.cell), config.vocab_size
    spec = table_spec(GEN, contract)

    def choose(logits, u, temperature, kth_index):
        """One character per row: logits (B, V), u (B, V) -> ids (B,) int32 (= charrnn.sampling.choose)."""
        greedy = tf.cast(tf.argmax(logits, axis=-1, output_type=tf.int64), tf.int32)
        sample = temperature > 0.0  # (B, 1)
        # No clamp: the graph's guard (export/guards.py) refuses a temperature that is neither 0 nor >=
        # MIN_TEMPERATURE, below which logits / T would overflow.
        z = logits / tf.where(sample, temperature, tf.ones_like(temperature))  # (B, V)
        ordered = tf.math.top_k(z, k=vocab, sorted=True).values  # (B, V) descending: ONNX TopK
        kth = tf.gather(ordered, kth_index, axis=1, batch_dims=1)  # (B, 1): ONNX GatherElements
        z = tf.where(z < kth, tf.constant(-np.inf, tf.float32), z)
        g = -tf.math.log(-tf.math.log(u))
        sampled = tf.cast(tf.argmax(z + g, axis=-1, output_type=tf.int64), tf.int32)
        return tf.where(sample[:, 0], sampled, greedy)

    def cell_step(ids, state):
        """One character through the network's own layers (T = 1): ids (B,) -> logits (B, V), state."""
        x = net.embed(ids)  # (B, E)
        new_layers = []
        for layer_index, rnn in enumerate(net.rnns):
            previous = [state[:, s, layer_index, :] for s in range(slots)]
            x, final = rnn.cell(x, previous, training=False)  # dropout: identity at inference
            final = final if isinstance(final, (list, tuple)) else [final]
            new_layers.append(tf.stack(list(final), axis=1))  # (B, S, H)
        return net.head(x), tf.stack(new_layers, axis=2)

    @tf.function(input_signature=spec)
    def sample_k(input_ids, state_in, noise, temperature, top_k):
        batch, k_total = tf.shape(noise)[0], tf.shape(noise)[1]
        # k-th largest index per row; 0 keeps every character. Anything outside 0..V is refused by the guard
        # under ONNX Runtime, so the `> vocab` / `< 0` part only matters on a TensorRT plan, where the guard does
        # not refuse (docs/model.md): it keeps the GatherElements below in bounds there.
        k = tf.where((top_k <= 0) | (top_k > vocab), tf.fill(tf.shape(top_k), vocab), top_k)
        kth_index = k - 1  # (B, 1)
        logits, state = net.step(input_ids, state_in)  # the prompt: ONNX LSTM ops
        first = choose(logits, noise[:, 0, :], temperature, kth_index)
        positions = tf.range(k_total)[None, :]  # (1, K)
        out = tf.where(tf.equal(positions, 0), first[:, None], tf.zeros([batch, k_total], tf.int32))

        def body(i, previous, state, out):
            logits, state = cell_step(previous, state)
            chosen = choose(logits, tf.gather(noise, i, axis=1), temperature, kth_index)
            out = tf.where(tf.equal(positions, i), chosen[:, None], out)
            return i + 1, chosen, state, out

        _, _, state, out = tf.while_loop(
            lambda i, *_: i < k_total,
            body,
            (tf.constant(1), first, state, out),
            maximum_iterations=k_total - 1,
        )
        return {OUTPUT_IDS: out, STATE_OUT: state}

    return sample_k, spec


def hoist_loop_invariants(graph: onnx.GraphProto) -> int:
    """Drop the Loop-carried values a body only passes through (TF's while_loop carries every captured tensor:
    the weights, NOISE, ...); the body then reads them from the outer scope. Returns how many were dropped.

    Without this, every iteration copies all the weights from one loop variable to the next (ONNX Runtime),
    and TensorRT would make each weight an IRecurrenceLayer.
    """
    consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dropped = 0
    for node in graph.node:
        if node.op_type != "Loop":
            continue
        body = next(a.g for a in node.attribute if a.name == "body")
        n_carried = len(body.input) - 2  # body inputs: iteration, cond, carried...
        keep = []
        for j in range(n_carried):
            inner, outer, final = body.input[2 + j].name, node.input[2 + j], node.output[j]
            if body.output[1 + j].name == inner and final not in consumed and outer:
                rename_value(body, inner, outer)  # the body reads the outer value directly
                dropped += 1
            else:
                keep.append(j)
        scan = list(node.output[n_carried:])
        body_inputs = [body.input[0], body.input[1]] + [body.input[2 + j] for j in keep]
        body_outputs = (
            [body.output[0]]
            + [body.output[1 + j] for j in keep]
            + list(body.output[1 + n_carried :])
        )
        node_inputs = list(node.input[:2]) + [node.input[2 + j] for j in keep]
        node_outputs = [node.output[j] for j in keep] + scan
        del body.input[:], body.output[:], node.input[:], node.output[:]
        body.input.extend(body_inputs)
        body.output.extend(body_outputs)
        node.input.extend(node_inputs)
        node.output.extend(node_outputs)
    return dropped


def export_gen_onnx(
    net, out: str | Path, opset: int = OPSET, guard: bool = True
) -> onnx.ModelProto:
    """Convert the network's (a charrnn.model.CharRNN) generation function to ONNX at `out`; returns the proto.

    guard: add the run-time input guards (export.guards; False only to measure or compare them).
    """
    import tf2onnx

    contract = net.config.contract
    sample_k, spec = generation_function(net)
    proto, _ = tf2onnx.convert.from_function(sample_k, input_signature=spec, opset=opset)
    graph = proto.graph
    hoist_loop_invariants(graph)
    name_table_io(graph, GEN)  # the table's names for the inputs, and for every dynamic dim
    if guard:  # refuses bad INPUT_IDS, NOISE, TEMPERATURE, TOP_K at run time (export/guards.py)
        guard_gen_inputs(graph, contract)
    proto.doc_string = (
        f"charrnn generation (V = {contract.vocab_size}, cell {contract.cell}):\n" + describe(GEN)
    )
    onnx.checker.check_model(proto)
    problems = check_gen_io(proto, contract)
    if problems:
        raise CheckFailed(str(out), "; ".join(problems), "fix export/gen_export.py")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return proto


def check_gen_io(proto: onnx.ModelProto, contract: Contract) -> list[str]:
    """The graph's inputs/outputs against Contract.gen_inputs/gen_outputs; returns problems (empty = ok)."""
    want = {**contract.gen_inputs(), **contract.gen_outputs()}
    got = {}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = vi.type.tensor_type
        got[vi.name] = (
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
            tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim),
        )
    problems = [
        f"{name}: want {w}, graph has {got.get(name, 'nothing')}"
        for name, w in want.items()
        if got.get(name) != w
    ]
    extra = sorted(set(got) - set(want))
    if extra:
        problems.append(f"unexpected graph inputs/outputs {extra}")
    return problems


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m export.gen_export", __doc__)
    add_model_dir(p)
    p.add_argument("--out", required=True, help="ONNX file to write")
    args = p.parse_args(argv)
    from charrnn.model import load_model_dir, use_cpu_only

    from .trt_check import check_model

    use_cpu_only()  # a visible GPU makes Keras emit CudnnRNNV3, which tf2onnx cannot convert
    net, _, _ = load_model_dir(args.model_dir)
    proto = export_gen_onnx(net, args.out)
    report = check_model(proto)
    print(report.text())
    return 0 if report.ready else 1


if __name__ == "__main__":
    raise SystemExit(main())

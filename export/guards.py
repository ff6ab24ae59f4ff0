"""Guards inside the exported ONNX graphs: the graph itself refuses bad input at run time.

Triton's ONNX Runtime backend runs model.onnx with no Python in front, so whatever the graph accepts a client
gets as a success: without guards INPUT_IDS [[-1]] returns the logits of id 64 (the embedding wraps negative
ids), a huge T allocates (B, T, 512) floats before anything fails, and the generation Loop runs for any K. These
guards enforce, in the graph, the limits the python models check first (serve.runtime.sequence_state.check_ids,
serve.runtime.gen_serving.check_gen_request), so those models never reach a guard.

ONNX has no assert op. A guard is built from an op that fails at run time on a bad value: for an input X,

    bad        = Or(<checks of X's shape>, <checks of X's values>)                () bool
    flag       = Cast(bad, INT32)                                                 () 0 valid, 1 bad
    neutral    = Gather(data=[n], indices=flag)   node NAME = the message         () n, or out of bounds
    X_checked  = Add(X, neutral) for int32 (n = 0), Mul(X, neutral) for fp32 (n = 1.0; x * 1.0 == x bit for
                 bit, also for -0.0, which x + 0.0 would turn into +0.0)

(values: ReduceMin / ReduceMax for int32 inputs; for fp32, all() of an elementwise "inside" mask, because NaN
compares false but ReduceMin / ReduceMax skip it) and every node of the original graph (Loop bodies included)
then reads X_checked instead of X. The whole model
thus data-depends on the guard: ONNX Runtime must run it first, so a request with millions of ids fails before
the embedding's T x 512 allocation and the generation Loop never starts with K > MAX_K. When flag is 1 the
Gather fails and ONNX Runtime's error quotes the node's name, which is the message
(charrnn.contract.GUARD_MESSAGES):

    Non-zero status code returned while running Gather node. Name:'refused: INPUT_IDS: every id must be in
    0..64 and 1 <= T <= 256 (...)' Status Message: indices element out of data bounds, idx=1 ...

The checks reduce over the whole input, batch included: one bad row fails the whole execution (Triton batches
several sequences' requests into one; the other clients retry). The value checks pass an empty tensor
(ReduceMin of nothing is INT32_MAX, ReduceMax INT32_MIN), which is right: T = 0 or K = 0 fails the shape check.

Ops used (all in TensorRT's ONNX-parser list, export.trt_check checks it): Shape, Gather, Less, Greater,
GreaterOrEqual, Equal, And, Or, Cast, ReduceMin / ReduceMax (opset 17: axes is an attribute), Add, Mul.
TensorRT's Gather is not known to report an out-of-bounds index (and TensorRT cannot run here): on a TensorRT
plan, count on the guards to cost a little and refuse nothing (docs/model.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from charrnn.contract import (
    GUARD_MESSAGES,
    GUARD_PREFIX,
    INPUT_IDS,
    MAX_K,
    MAX_T,
    MIN_TEMPERATURE,
    NOISE,
    TEMPERATURE,
    TOP_K,
    Contract,
)

CHECKED = "guard/{}/checked"  # the value every original node reads instead of the graph input


def guard_messages(vocab_size: int) -> dict[str, str]:
    """input name -> the guard's message (= its Gather node's name) for a model of this vocabulary size."""
    return {
        name: template.format(vocab_size=vocab_size, last_id=vocab_size - 1)
        for name, template in GUARD_MESSAGES.items()
    }


def guard_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    """The guards already in a graph: their Gather nodes' names (the messages) -> the input they check."""
    return {
        node.name: node.output[0].split("/")[1]
        for node in graph.node
        if node.op_type == "Gather" and node.name.startswith(GUARD_PREFIX)
    }


class _Guards:
    """Builds the guard nodes of one graph; install() puts them first and rewires the inputs' readers."""

    def __init__(self, graph: onnx.GraphProto, contract: Contract) -> None:
        self.graph = graph
        self.messages = guard_messages(contract.vocab_size)
        self.inputs = {vi.name: vi.type.tensor_type for vi in graph.input}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.checked: dict[str, str] = {}  # graph input -> the value the original nodes now read
        self.scope = ""

    # --- building blocks: every value is named guard/<input>/<label> --------------------------------------
    def name(self, label: str) -> str:
        return f"guard/{self.scope}/{label}"

    def const(self, label: str, value, dtype) -> str:
        """A scalar (or 1-element) initializer."""
        tensor = numpy_helper.from_array(np.array(value, dtype), self.name(label))
        assert tensor.name not in {t.name for t in self.initializers}, tensor.name
        self.initializers.append(tensor)
        return tensor.name

    def op(
        self, op_type: str, inputs: list[str], label: str, node_name: str | None = None, **attrs
    ):
        out = self.name(label)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name or out, **attrs))
        return out

    def dim(self, x: str, axis: int) -> str:
        """x's size along `axis`: () int64."""
        shape = self.op("Shape", [x], "shape")  # (rank,) int64
        return self.op("Gather", [shape, self.const(f"axis{axis}", axis, np.int64)], f"dim{axis}")

    def outside(self, x: str, lo, hi, dtype, label: str) -> str:
        """Or(x < lo, x > hi), elementwise: x's shape, bool."""
        below = self.op("Less", [x, self.const(f"{label}_min", lo, dtype)], f"{label}_below")
        above = self.op("Greater", [x, self.const(f"{label}_max", hi, dtype)], f"{label}_above")
        return self.op("Or", [below, above], f"{label}_outside")

    def int_outside(self, x: str, lo: int, hi: int, rank: int, label: str) -> str:
        """Some element of the int32 tensor x is outside lo..hi: () bool. False for an empty x (ReduceMin of
        nothing is INT32_MAX, ReduceMax INT32_MIN)."""
        axes = list(range(rank))
        smallest = self.op("ReduceMin", [x], f"{label}_smallest", axes=axes, keepdims=0)  # ()
        largest = self.op("ReduceMax", [x], f"{label}_largest", axes=axes, keepdims=0)  # ()
        below = self.op(
            "Less", [smallest, self.const(f"{label}_min", lo, np.int32)], f"{label}_below"
        )
        above = self.op(
            "Greater", [largest, self.const(f"{label}_max", hi, np.int32)], f"{label}_above"
        )
        return self.op("Or", [below, above], f"{label}_outside")

    def not_all(self, mask: str, rank: int) -> str:
        """Not(all(mask)) over every axis: () bool. all() of an empty mask is true (ReduceMin -> INT32_MAX)."""
        ints = self.op("Cast", [mask], "ok_int", to=TensorProto.INT32)  # mask's shape, 0 / 1
        lowest = self.op("ReduceMin", [ints], "ok_min", axes=list(range(rank)), keepdims=0)  # ()
        return self.op("Less", [lowest, self.const("one", 1, np.int32)], "some_bad")

    def refuse_if(self, bad: str) -> None:
        """Make the current input's readers depend on a Gather that is out of bounds when `bad` is true."""
        x = self.scope
        is_float = self.inputs[x].elem_type == TensorProto.FLOAT
        flag = self.op("Cast", [bad], "flag", to=TensorProto.INT32)  # () 0 valid, 1 bad
        neutral = self.const(
            "neutral", [1.0 if is_float else 0], np.float32 if is_float else np.int32
        )
        # () the neutral value; index 1 is out of bounds: ONNX Runtime fails, quoting this node's name
        passed = self.op("Gather", [neutral, flag], "passed", node_name=self.messages[x])
        self.checked[x] = self.op("Mul" if is_float else "Add", [x, passed], "checked")

    # --- the rules ----------------------------------------------------------------------------------------
    def input_ids(self, vocab_size: int) -> None:
        """INPUT_IDS (B, T) int32: 1 <= T <= MAX_T, every id in 0..V-1."""
        self.scope = INPUT_IDS
        bad_t = self.outside(self.dim(INPUT_IDS, 1), 1, MAX_T, np.int64, "T")  # () bool
        bad_ids = self.int_outside(INPUT_IDS, 0, vocab_size - 1, 2, "ids")  # () bool
        self.refuse_if(self.op("Or", [bad_t, bad_ids], "bad"))

    def noise(self) -> None:
        """NOISE (B, K, V) fp32: 1 <= K <= MAX_K, every value in the open interval (0, 1) (NaN compares false)."""
        self.scope = NOISE
        bad_k = self.outside(self.dim(NOISE, 1), 1, MAX_K, np.int64, "K")  # () bool
        positive = self.op("Greater", [NOISE, self.const("zero", 0.0, np.float32)], "above_0")
        below_one = self.op("Less", [NOISE, self.const("one_f", 1.0, np.float32)], "below_1")
        ok = self.op("And", [positive, below_one], "values_ok")  # (B, K, V) bool
        self.refuse_if(self.op("Or", [bad_k, self.not_all(ok, 3)], "bad"))

    def temperature(self) -> None:
        """TEMPERATURE (B, 1) fp32: 0 (greedy) or finite and >= MIN_TEMPERATURE (NaN compares false)."""
        self.scope = TEMPERATURE
        t = TEMPERATURE
        greedy = self.op("Equal", [t, self.const("zero", 0.0, np.float32)], "greedy")  # (B, 1)
        at_floor = self.op(
            "GreaterOrEqual", [t, self.const("floor", MIN_TEMPERATURE, np.float32)], "at_floor"
        )
        finite = self.op("Less", [t, self.const("inf", np.inf, np.float32)], "finite")
        sampled = self.op("And", [at_floor, finite], "sampled")  # (B, 1)
        ok = self.op("Or", [greedy, sampled], "ok")  # (B, 1) bool
        self.refuse_if(self.not_all(ok, 2))

    def top_k(self, vocab_size: int) -> None:
        """TOP_K (B, 1) int32: 0..V (0 = every character)."""
        self.scope = TOP_K
        self.refuse_if(self.int_outside(TOP_K, 0, vocab_size, 2, "k"))

    # --- into the graph -----------------------------------------------------------------------------------
    def install(self) -> dict[str, str]:
        """Rewire every original reader of a guarded input, then put the guard nodes first (topological order).
        Returns input name -> message."""
        if guard_nodes(self.graph):
            raise ValueError("the graph is already guarded")
        original = list(self.graph.node)
        for node in original:
            _rewire(node, self.checked)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes + original)
        self.graph.initializer.extend(self.initializers)
        return {x: self.messages[x] for x in self.checked}


def _defines(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph defines itself (which would shadow an outer value of the same name)."""
    return (
        {vi.name for vi in graph.input}
        | {t.name for t in graph.initializer}
        | {out for node in graph.node for out in node.output}
    )


def _rewire(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """node (and the nodes of its Loop/If/Scan bodies, which read outer values by name) reads renames[x] for x."""
    node.input[:] = [renames.get(name, name) for name in node.input]
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {k: v for k, v in renames.items() if k not in _defines(body)}
            for inner_node in body.node:
                _rewire(inner_node, inner)


def guard_step_inputs(graph: onnx.GraphProto, contract: Contract) -> dict[str, str]:
    """Guard the step graph (export.onnx_export): INPUT_IDS. Returns input name -> message."""
    guards = _Guards(graph, contract)
    guards.input_ids(contract.vocab_size)
    return guards.install()


def guard_gen_inputs(graph: onnx.GraphProto, contract: Contract) -> dict[str, str]:
    """Guard the generation graph (export.gen_export): INPUT_IDS, NOISE, TEMPERATURE, TOP_K (STATE_IN is
    unchecked, as in the python models). Returns input name -> message."""
    guards = _Guards(graph, contract)
    guards.input_ids(contract.vocab_size)
    guards.noise()
    guards.temperature()
    guards.top_k(contract.vocab_size)
    return guards.install()

"""Static TensorRT readiness check of an ONNX graph (runs anywhere; TensorRT itself is not needed).

    python -m export.trt_check model_repository/charrnn_onnx/1/model.onnx

Checks against TensorRT's ONNX-parser support list (../shared/tensorrt/onnx_ops_supported.txt, or the
copy in export/): every op (including Loop/If subgraphs) is supported, op-specific restrictions we rely
on (LSTM/GRU layout 0, input_forget 0), opset in the parser's range, no unsupported dtypes on graph I/O,
and dynamic dims only on batch (dim 0), T (INPUT_IDS dim 1) and K (NOISE / OUTPUT_IDS dim 1 of the
generation graph, export.gen_export).
Exit codes: 0 ready, 1 not ready, 2 bad input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from charrnn.cli import parser
from charrnn.contract import INPUT_IDS, NOISE, OUTPUT_IDS
from charrnn.errors import CheckFailed, UserError, cli

ROOT = Path(__file__).resolve().parent.parent
OPS_FILE_CANDIDATES = (
    ROOT.parent / "shared" / "tensorrt" / "onnx_ops_supported.txt",
    ROOT / "export" / "onnx_ops_supported.txt",
)
# "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"
OPSET_RANGE = (
    9,
    24,
)
# Graph I/O that may have a dynamic dim 1 (besides batch): T of INPUT_IDS, K of the generation graph.
DYNAMIC_DIM1 = {INPUT_IDS: "T", NOISE: "K", OUTPUT_IDS: "K"}
IO_DTYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.UINT8,
}


def supported_ops(path: str | Path | None = None) -> dict[str, str]:
    """op name -> the list's note, for the ops marked Y in TensorRT's ONNX-parser support list."""
    candidates = [Path(path)] if path else [p for p in OPS_FILE_CANDIDATES if p.is_file()]
    if not candidates or not candidates[0].is_file():
        raise UserError(
            "TensorRT op list",
            f"not found at {[str(p) for p in OPS_FILE_CANDIDATES]}",
            "pass --ops FILE",
        )
    ops = {}
    for line in candidates[0].read_text().splitlines():
        if not line or line.startswith("#") or "\t" not in line:
            continue
        op, rest = line.split("\t", 1)
        if rest.startswith("Y"):
            ops[op.strip()] = rest
    return ops


def _nodes(graph: onnx.GraphProto):
    """All nodes, including those inside Loop/If/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


@dataclass
class Report:
    op_counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def text(self) -> str:
        ops = ", ".join(f"{op}x{n}" for op, n in sorted(self.op_counts.items()))
        head = f"TensorRT readiness: {'READY' if self.ready else 'NOT READY'} ({ops})"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def check_model(proto: onnx.ModelProto, ops_file: str | Path | None = None) -> Report:
    ops = supported_ops(ops_file)
    rep = Report()
    for node in _nodes(proto.graph):
        rep.op_counts[node.op_type] += 1
        if node.domain not in ("", "ai.onnx"):
            rep.problems.append(f"op {node.op_type} is in custom domain {node.domain!r}")
        elif node.op_type not in ops:
            rep.problems.append(
                f"op {node.op_type} ({node.name}) is not supported by TensorRT's ONNX parser"
            )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("LSTM", "GRU", "RNN") and attrs.get("layout", 0) != 0:
            rep.problems.append(f"{node.op_type} {node.name}: layout must be 0 for TensorRT")
        if node.op_type == "LSTM" and attrs.get("input_forget", 0) != 0:
            rep.problems.append(f"LSTM {node.name}: input_forget must be 0 for TensorRT")
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]:
            rep.problems.append(
                f"opset {imp.version} is outside TensorRT's parser range {OPSET_RANGE}"
            )
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = vi.type.tensor_type
        if t.elem_type not in IO_DTYPES:
            rep.problems.append(
                f"{vi.name}: dtype {onnx.TensorProto.DataType.Name(t.elem_type)} not supported on I/O"
            )
        allowed_dynamic = {0, 1} if vi.name in DYNAMIC_DIM1 else {0}
        for i, d in enumerate(t.shape.dim):
            if not d.HasField("dim_value") and i not in allowed_dynamic:
                rep.problems.append(
                    f"{vi.name}: dim {i} is dynamic ({d.dim_param or '?'}); only batch"
                    f"{' and ' + DYNAMIC_DIM1[vi.name] if vi.name in DYNAMIC_DIM1 else ''} may be"
                )
    return rep


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m export.trt_check", __doc__)
    p.add_argument("onnx", help="ONNX model file")
    p.add_argument(
        "--ops", default=None, help="TensorRT ONNX op support list (default: ../shared/tensorrt/)"
    )
    args = p.parse_args(argv)
    try:
        proto = onnx.load(args.onnx)
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, Exception) as e:
        raise UserError(
            args.onnx, f"cannot load ONNX model ({type(e).__name__}: {e})", "run `make export`"
        ) from e
    rep = check_model(proto, args.ops)
    print(rep.text())
    if not rep.ready:
        raise CheckFailed(
            args.onnx, f"{len(rep.problems)} TensorRT problem(s)", "see the list above"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

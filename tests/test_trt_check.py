"""export/trt_check.py: the static TensorRT readiness check (ops against TensorRT's ONNX parser list, custom
domains, dynamic dims, LSTM attributes, opsets, I/O dtypes, inside subgraphs too) on the exports of every cell
and on hand-built bad graphs, its CLI's exit codes, and the op list it reads."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from charrnn.contract import CELLS, INPUT_IDS, LOGITS, STATE_IN, STATE_OUT
from export.trt_check import OPS_FILE_CANDIDATES, check_model, supported_ops
from tests.helpers import ROOT, op_counts, run

SHARED_OPS = ROOT.parent / "shared" / "tensorrt" / "onnx_ops_supported.txt"
REPO_OPS = ROOT / "export" / "onnx_ops_supported.txt"


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


# --- hand-built graphs ------------------------------------------------------------------------------------
def make_model(
    nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", opset),
            *(helper.make_opsetid(d, v) for d, v in extra_opsets),
        ],
    )


def good_io():
    ins = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
        helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, ["batch", 2, 1, 4]),
    ]
    outs = [helper.make_tensor_value_info(STATE_OUT, TensorProto.FLOAT, ["batch", 2, 1, 4])]
    return ins, outs


def good_graph() -> onnx.ModelProto:
    ins, outs = good_io()
    return make_model([helper.make_node("Identity", [STATE_IN], [STATE_OUT], name="id")], ins, outs)


def lstm_graph(**attrs) -> onnx.ModelProto:
    H, D = 4, 3
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, 4 * H, D)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R"),
    ]
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="lstm", hidden_size=H, **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 2, D])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    return make_model([node], [x], [y], inits)


def multinomial_graph() -> onnx.ModelProto:
    ins, outs = good_io()
    logits = helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", 65])
    sample = helper.make_tensor_value_info("SAMPLE", TensorProto.INT32, ["batch", 1])
    nodes = [
        helper.make_node("Identity", [STATE_IN], [STATE_OUT], name="id"),
        helper.make_node(
            "Multinomial",
            [LOGITS],
            ["SAMPLE"],
            name="sample",
            dtype=TensorProto.INT32,
            sample_size=1,
        ),
    ]
    return make_model(nodes, [*ins, logits], [*outs, sample])


def custom_domain_graph() -> onnx.ModelProto:
    ins, outs = good_io()
    node = helper.make_node("PackState", [STATE_IN], [STATE_OUT], name="pack", domain="com.example")
    return make_model([node], ins, outs, extra_opsets=[("com.example", 1)])


def dynamic_state_graph() -> onnx.ModelProto:
    ins = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT32, ["batch", "T"]),
        helper.make_tensor_value_info(STATE_IN, TensorProto.FLOAT, ["batch", "S", 1, 4]),
    ]
    outs = [helper.make_tensor_value_info(STATE_OUT, TensorProto.FLOAT, ["batch", "S", 1, 4])]
    return make_model([helper.make_node("Identity", [STATE_IN], [STATE_OUT], name="id")], ins, outs)


def loop_with_unsupported_op_graph() -> onnx.ModelProto:
    """The unsupported op hides in a Loop body: the check must look inside subgraphs."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node(
                "Multinomial", ["x_in"], ["s"], dtype=TensorProto.INT32, sample_size=1
            ),
            helper.make_node("Identity", ["x_in"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 4]),
        ],
    )
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "M"),
        numpy_helper.from_array(np.array(True), "c"),
    ]
    node = helper.make_node("Loop", ["M", "c", "X"], ["Y"], name="loop", body=body)
    return make_model(
        [node],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        inits,
    )


def double_io_graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["batch", 4])
    y = helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["batch", 4])
    return make_model([helper.make_node("Identity", ["X"], ["Y"])], [x], [y])


@pytest.mark.parametrize(
    "build, expected",
    [
        (
            multinomial_graph,
            r"op Multinomial \(sample\) is not supported by TensorRT's ONNX parser",
        ),
        (custom_domain_graph, r"op PackState is in custom domain 'com\.example'"),
        (dynamic_state_graph, r"STATE_IN: dim 1 is dynamic \(S\); only batch may be"),
        (lambda: lstm_graph(layout=1), r"LSTM lstm: layout must be 0 for TensorRT"),
        (lambda: lstm_graph(input_forget=1), r"LSTM lstm: input_forget must be 0 for TensorRT"),
        (loop_with_unsupported_op_graph, r"op Multinomial \(\) is not supported"),
        (
            lambda: make_model(good_graph().graph.node, *good_io(), opset=8),
            r"opset 8 is outside TensorRT's parser range",
        ),
        (double_io_graph, r"X: dtype DOUBLE not supported on I/O"),
    ],
)
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


# --- the CLI and the op list ---------------------------------------------------------------------------------
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
    assert r.returncode == 2 and r.stderr.startswith(
        f"error: {garbage}: cannot load ONNX model"
    ), r.stderr


def test_op_list_used_marks_what_the_export_needs():
    used = next(p for p in OPS_FILE_CANDIDATES if p.is_file())
    ops = supported_ops()
    assert ops == supported_ops(used)
    for op in (
        "LSTM",
        "GRU",
        "RNN",
        "Loop",
        "MatMul",
        "Gather",
        "Add",
        "Concat",
        "Slice",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Reshape",
        "Cast",
        "Shape",
        "Sigmoid",
        "Tanh",
    ):
        assert op in ops, op
        assert ops[op].startswith("Y")
    assert "LSTM" in ops and "layout attribute must be 0" in ops["LSTM"]
    assert "Multinomial" not in ops  # listed as N


def test_repo_op_list_is_a_copy_of_the_shared_one():
    assert REPO_OPS.is_file()
    if not SHARED_OPS.is_file():
        pytest.skip(f"{SHARED_OPS} not present on this machine")
    assert REPO_OPS.read_bytes() == SHARED_OPS.read_bytes()

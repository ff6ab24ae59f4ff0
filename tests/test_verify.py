"""`make verify` (export/verify.py): Expect/Received parity of ONNX Runtime and TensorFlow (logits and 1,000
greedy characters per prompt) on the shipped export, a tampered ONNX that must FAIL, and a missing one.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from tests.helpers import SHIPPED_MODEL


def test_verify_passes_on_the_shipped_export(shipped_onnx, capsys):
    """`make verify`: logits parity and >= 1,000 greedy characters per prompt, identical in TF and ONNX."""
    from export.verify import PROMPTS
    from export.verify import main as verify_main

    rc = verify_main(["--model-dir", str(SHIPPED_MODEL), "--onnx", str(shipped_onnx)])
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

    rc = verify_main(["--model-dir", str(e.model_dir), "--onnx", str(path), "--length", "30"])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert re.search(r"^logits: .* FAIL$", out, re.M), out
    assert re.search(r"^FAIL \(", out, re.M), out
    assert err.startswith("error: verify: max |delta logit|"), err


def test_verify_on_a_missing_onnx_is_a_usage_error(tmp_path, capsys):
    from export.verify import main as verify_main

    rc = verify_main(
        ["--model-dir", str(SHIPPED_MODEL), "--onnx", str(tmp_path / "none.onnx"), "--length", "5"]
    )
    assert rc == 2
    assert capsys.readouterr().err.startswith(
        f"error: {tmp_path / 'none.onnx'}: cannot load ONNX model"
    )

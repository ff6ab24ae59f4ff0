"""`python -m export` (export/__main__.py): the whole model repository it writes, its --idle-timeout, and bad
model directories refused with one clear message and nothing written. The pieces it runs have files of their
own: test_onnx_export.py, test_gen_export.py, test_configs.py, test_trt_check.py, test_verify.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from charrnn import repository
from charrnn.repository import STEP_MODELS as STEP
from tests.helpers import COMMITTED_REPO


def test_export_writes_the_whole_repository(shipped_repo, shipped_proto):
    """`python -m export` output: both ONNX copies identical, the python model source, every config."""
    onnx_copy = shipped_repo / repository.PYTHON / "1" / "model.onnx"
    assert (
        onnx_copy.read_bytes() == (shipped_repo / repository.ONNX / "1" / "model.onnx").read_bytes()
    )
    assert (shipped_repo / repository.PYTHON / "1" / "model.py").read_text() == (
        COMMITTED_REPO / repository.PYTHON / "1" / "model.py"
    ).read_text()
    assert (shipped_repo / repository.TRT / "1").is_dir()
    assert not (
        shipped_repo / repository.TRT / "1" / "model.plan"
    ).exists()  # needs the TensorRT container
    assert sorted(p.parent.name for p in shipped_repo.glob("*/config.pbtxt")) == sorted(
        repository.SERVED_MODELS
    )
    assert set(STEP) <= set(repository.SERVED_MODELS)


def test_export_idle_timeout_flag_sets_every_model_and_refuses_nonsense(
    tiny_model, tmp_path, capsys
):
    from export.__main__ import main as export_main

    assert (
        export_main(
            ["--model-dir", str(tiny_model), "--repo", str(tmp_path / "bad"), "--idle-timeout", "0"]
        )
        == 2
    )
    assert "error: --idle-timeout: must be in 1..86400 seconds, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    repo = tmp_path / "repo"
    assert (
        export_main(["--model-dir", str(tiny_model), "--repo", str(repo), "--idle-timeout", "7.5"])
        == 0
    )
    for name in repository.SERVED_MODELS:
        c = repository.load_config(repo / name / "config.pbtxt")
        assert c.sequence_batching.max_sequence_idle_microseconds == 7_500_000, name


# --- bad model directories ------------------------------------------------------------------------------
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
    "truncated weights": (
        lambda d: (d / "model.weights.h5").write_bytes(
            (d / "model.weights.h5").read_bytes()[:4000]
        ),
        r"model\.weights\.h5: cannot load weights",
    ),
    "config not JSON": (
        lambda d: (d / "config.json").write_text("{vocab_size: 65"),
        r"config\.json: not valid JSON",
    ),
    "config unknown key": (
        lambda d: _set_json(d / "config.json", hiden=48),
        r"config\.json: unknown keys \['hiden'\]",
    ),
    "weights of another size": (
        lambda d: _set_json(d / "config.json", hidden=32),
        r"cannot load weights",
    ),
    "pickled vocab": (
        lambda d: (d / "vocab.json").write_bytes(b"\x80\x04\x95\x10\x00\x00"),
        r"not a UTF-8",
    ),
    "vocab size differs": (
        lambda d: (d / "vocab.json").write_text(
            json.dumps({"chars": json.loads((d / "vocab.json").read_text())["chars"][:-1]})
        ),
        r"vocabulary mismatch: vocab\.json has 64 characters, the model 65",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_DIRS))
def test_export_cli_rejects_a_bad_model_dir_and_writes_nothing(case, tiny_model, tmp_path, capsys):
    from export.__main__ import main as export_main

    d = _copy(tiny_model, tmp_path)
    damage, pattern = BAD_MODEL_DIRS[case]
    damage(d)
    repo = tmp_path / "repo"
    rc = export_main(["--model-dir", str(d), "--repo", str(repo)])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err  # one clear message ...
    assert "Traceback" not in err  # ... and no traceback
    assert not repo.exists(), "nothing may be written for a bad model directory"


@pytest.mark.parametrize("content", ["null", "65", '"x"', "[]"])
def test_export_cli_rejects_a_config_json_that_is_not_an_object(
    content, tiny_model, tmp_path, capsys
):
    from export.__main__ import main as export_main

    d = _copy(tiny_model, tmp_path)
    (d / "config.json").write_text(content)
    repo = tmp_path / "repo"
    rc = export_main(["--model-dir", str(d), "--repo", str(repo)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "config.json" in err, err
    assert not repo.exists()

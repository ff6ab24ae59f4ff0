"""export/build_plan.py without TensorRT (it needs NVIDIA's TensorRT container): the optimization profile
covers the serving limits and the generation inputs, and without TensorRT or an ONNX file the builder exits
with a clear error and writes nothing."""

from __future__ import annotations

import pytest

from charrnn import repository
from charrnn.contract import (
    INPUT_IDS,
    MAX_BATCH_SIZE,
    MAX_K,
    MAX_T,
    NOISE,
    STATE_IN,
    TEMPERATURE,
    TOP_K,
)
from export.build_plan import profile_shapes
from tests.helpers import committed_text, run


def tensorrt_builder_available() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


@pytest.mark.skipif(
    tensorrt_builder_available(), reason="TensorRT is installed here: the plan can be built"
)
def test_build_plan_without_tensorrt_exits_3_and_writes_nothing(tmp_path, shipped_onnx):
    out = tmp_path / "plan" / "model.plan"
    r = run("-m", "export.build_plan", "--onnx", str(shipped_onnx), "--out", str(out))
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("error: tensorrt:"), r.stderr
    assert "TensorRT container" in r.stderr and "`make plan`" in r.stderr
    assert not out.exists() and not out.parent.exists()


def test_build_plan_with_a_missing_onnx_exits_2(tmp_path):
    out = tmp_path / "model.plan"
    r = run("-m", "export.build_plan", "--onnx", str(tmp_path / "none.onnx"), "--out", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'none.onnx'}: ONNX model not found"), r.stderr
    assert not out.exists()


def test_profile_shapes_cover_the_serving_limits(shipped_contract_vocab):
    contract, _ = shipped_contract_vocab
    shapes = profile_shapes(contract.state_dims, MAX_BATCH_SIZE, MAX_T)
    # every input, STATE_IN included, has a profile entry
    assert set(shapes) == {
        INPUT_IDS,
        STATE_IN,
    }
    assert shapes[INPUT_IDS] == ((1, 1), (64, 1), (64, 256))  # batch 1..64, T 1..256, opt T=1
    # state dims exact
    assert shapes[STATE_IN] == (
        (1, 2, 2, 512),
        (64, 2, 2, 512),
        (64, 2, 2, 512),
    )
    # Triton: config max_batch_size must be <= the profile's max batch
    config = repository.parse_config(committed_text(repository.TRT))
    assert shapes[INPUT_IDS][2][0] >= config.max_batch_size
    assert shapes[STATE_IN][2][1:] == tuple(config.sequence_batching.state[0].dims)
    gru = profile_shapes((1, 3, 8), 4, 9)
    assert gru[STATE_IN] == ((1, 1, 3, 8), (4, 1, 3, 8), (4, 1, 3, 8)) and gru[INPUT_IDS] == (
        (1, 1),
        (4, 1),
        (4, 9),
    )


def test_plan_profile_covers_the_generation_inputs():
    from export.build_plan import profile_shapes

    shapes = profile_shapes((2, 2, 512), 64, MAX_T, gen_vocab=65)
    assert shapes[NOISE] == ((1, 1, 65), (64, 32, 65), (64, MAX_K, 65))
    assert shapes[TEMPERATURE] == shapes[TOP_K] == ((1, 1), (64, 1), (64, 1))
    # the step graph: unchanged
    assert set(profile_shapes((2, 2, 512), 64, MAX_T)) == {
        INPUT_IDS,
        STATE_IN,
    }

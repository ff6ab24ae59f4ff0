"""charrnn/repository.py: the table of served models and the config reader (parse_config: Triton's own
ModelConfig protobuf, unknown fields and typos an error). tests/test_compose.py checks docker-compose.yml
against the same table."""

from __future__ import annotations

import pytest

from charrnn import repository
from charrnn.errors import CheckFailed
from tests.helpers import committed_text

# implicit state (the python backend keeps state itself)
STEP_STATEFUL = (
    repository.TRT,
    repository.ONNX,
)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        # typo in a field name
        (
            lambda t: t.replace("max_batch_size:", "max_batch_sise:"),
            "max_batch_sise",
        ),
        (lambda t: t + "\nno_such_field: 1\n", "no_such_field"),  # unknown field
        (lambda t: t.replace("oldest {", "olders {"), "olders"),  # typo in a strategy
        # bad enum
        (
            lambda t: t.replace("KIND_GPU", "KIND_GPUU").replace("KIND_AUTO", "KIND_GPUU"),
            "KIND_GPUU",
        ),
        (lambda t: t.replace("TYPE_INT32", "TYPE_INT23"), "TYPE_INT23"),
        (lambda t: t.replace("zero_data: true", "zero_data: yes please"), ""),  # ill-typed value
        (lambda t: t.replace('name: "zeros" }', 'name: "zeros" '), ""),  # unbalanced braces
    ],
)
@pytest.mark.parametrize("name", STEP_STATEFUL)
def test_config_with_unknown_field_or_typo_fails_to_parse(name, mutate, pattern):
    text = committed_text(name)
    bad = mutate(text)
    assert bad != text
    with pytest.raises(CheckFailed) as info:
        repository.parse_config(bad)
    msg = info.value.message()
    assert (
        msg.startswith("error: config.pbtxt: not a valid Triton ModelConfig") and pattern in msg
    ), msg
    assert info.value.exit_code == 1


def test_parse_config_uses_tritons_model_config_proto():
    from tritonclient.grpc import model_config_pb2

    config = repository.parse_config(committed_text(repository.ONNX))
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.DESCRIPTOR.full_name == "inference.ModelConfig"


def test_gen_models_are_served_locally_and_by_compose():
    from charrnn.repository import CPU_MODELS, GPU_ONLY_MODELS, LOCAL_MODELS, SERVED_MODELS

    assert {repository.GEN_PYTHON, repository.GEN_STREAM, repository.ONNX} <= set(LOCAL_MODELS)
    assert {repository.GEN_ONNX} <= set(LOCAL_MODELS)
    assert set(repository.GEN_MODELS) <= set(SERVED_MODELS)
    assert repository.GEN_TRT in GPU_ONLY_MODELS and repository.GEN_ONNX in CPU_MODELS

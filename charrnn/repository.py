"""The served models of model_repository/ (one table: every model name is written here and nowhere else), and
the reader of their config.pbtxt and vocabulary.

Export writes one folder per row (export/configs.py); the local launcher, the client's model choice, the
benchmarks and perf.sh read the table; tests/test_compose.py checks docker-compose.yml against it.

    graph  "step": INPUT_IDS -> LOGITS, the client samples (one character per request, or a prompt chunk)
           "gen":  INPUT_IDS, NOISE, TEMPERATURE, TOP_K -> OUTPUT_IDS, the server samples K characters
    backend        tensorrt: a plan, GPU only; onnxruntime: Triton's ONNX Runtime backend, CPU or GPU, with
                   implicit state (Triton keeps each sequence's state); python: ONNX Runtime inside the python
                   backend (no implicit state: model.py keeps each sequence's state)
    decoupled      one response per generated character (gRPC streaming only); such a model gets a server of
                   its own (see DECOUPLED_MODELS)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charrnn.contract import VOCAB_PARAMETER
from charrnn.errors import CheckFailed
from charrnn.vocab import Vocab

STEP, GEN = "step", "gen"
TENSORRT, ONNXRUNTIME, PYTHON_BACKEND = "tensorrt", "onnxruntime", "python"
CONFIG = "config.pbtxt"
# Triton's custom model configuration (`--model-config-name=cpu` loads <model>/configs/cpu.pbtxt where it exists,
# else config.pbtxt): our CPU servers (the local launcher, the slim and scale images) pass it, so the ONNX Runtime
# models say KIND_CPU there, while config.pbtxt keeps KIND_AUTO for NVIDIA's images (a GPU build of the backend).
CPU_CONFIG_NAME = "cpu"


@dataclass(frozen=True)
class ServedModel:
    name: str
    graph: str  # STEP or GEN
    backend: str  # TENSORRT, ONNXRUNTIME or PYTHON_BACKEND
    decoupled: bool = False

    @property
    def artifact(self) -> str:
        """The file in <name>/1/ that the backend runs."""
        return "model.plan" if self.backend == TENSORRT else "model.onnx"

    @property
    def gpu_only(self) -> bool:
        return self.backend == TENSORRT  # a plan runs only on the GPU it was built for

    @property
    def cpu_config(self) -> str | None:
        """configs/cpu.pbtxt for the models whose config.pbtxt says KIND_AUTO (a GPU host would pick the GPU)."""
        return f"configs/{CPU_CONFIG_NAME}.pbtxt" if self.backend == ONNXRUNTIME else None

    @property
    def implicit_state(self) -> bool:
        """Triton's sequence batcher carries STATE_IN/STATE_OUT (the python backend cannot)."""
        return self.backend != PYTHON_BACKEND


# In order of preference: the client picks the first one that is ready.
MODELS = (
    ServedModel("charrnn_trt", STEP, TENSORRT),
    ServedModel("charrnn_onnx", STEP, ONNXRUNTIME),
    ServedModel("charrnn_python", STEP, PYTHON_BACKEND),
    ServedModel("charrnn_gen_trt", GEN, TENSORRT),
    ServedModel("charrnn_gen_onnx", GEN, ONNXRUNTIME),
    ServedModel("charrnn_gen_python", GEN, PYTHON_BACKEND),
    ServedModel("charrnn_gen_stream", GEN, PYTHON_BACKEND, decoupled=True),
)
BY_NAME = {m.name: m for m in MODELS}
TRT, ONNX, PYTHON, GEN_TRT, GEN_ONNX, GEN_PYTHON, GEN_STREAM = (m.name for m in MODELS)


def names(
    *,
    graph: str | None = None,
    backend: str | None = None,
    gpu_only: bool | None = None,
    decoupled: bool | None = None,
) -> tuple[str, ...]:
    """The model names (in preference order) that match every filter given."""
    return tuple(
        m.name
        for m in MODELS
        if (graph is None or m.graph == graph)
        and (backend is None or m.backend == backend)
        and (gpu_only is None or m.gpu_only == gpu_only)
        and (decoupled is None or m.decoupled == decoupled)
    )


SERVED_MODELS = names()
STEP_MODELS, GEN_MODELS = names(graph=STEP), names(graph=GEN)
GPU_ONLY_MODELS, CPU_MODELS = names(gpu_only=True), names(gpu_only=False)
# The python-backend models (each keeps its sequences' state in model.py).
PYTHON_MODELS = names(backend=PYTHON_BACKEND)
# Triton's ONNX Runtime backend (built from source: make backend)
ORT_MODELS = names(backend=ONNXRUNTIME)
# Decoupled models get a tritonserver process of their own: Triton 2.51 crashes when decoupled and
# non-decoupled models stream on one server (docs/failures.md, "Decoupled and non-decoupled models never share
# a server"; `make soak-mixed` runs the split servers).
DECOUPLED_MODELS = names(decoupled=True)
SHARED_PYTHON_MODELS = names(backend=PYTHON_BACKEND, decoupled=False)
# What our CPU servers run (the wheel's tritonserver 2.51 with the python backend and the ONNX Runtime backend
# built from source; no TensorRT): the local server (serve/local.py) and the slim and scale compose services.
# SHARED_CPU_MODELS on one server, DECOUPLED_MODELS on another.
LOCAL_MODELS = CPU_MODELS
SHARED_CPU_MODELS = names(gpu_only=False, decoupled=False)
IMPLICIT_STATE_MODELS = tuple(m.name for m in MODELS if m.implicit_state)


def mixed_decoupled(models: tuple[str, ...]) -> bool:
    """True if `models` puts a decoupled model on one server with a non-decoupled one (which crashes 2.51)."""
    return bool(set(models) & set(DECOUPLED_MODELS)) and bool(set(models) - set(DECOUPLED_MODELS))


# --- reading a config -------------------------------------------------------------------------------------------
def parse_config(text: str):
    """Parse config.pbtxt with Triton's own ModelConfig protobuf; unknown fields are an error."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise CheckFailed(
            CONFIG, f"not a valid Triton ModelConfig ({e})", "regenerate it with `make export`"
        ) from e
    return config


def load_config(path: str | Path):
    """A model's config.pbtxt (the path of the file, or of the model folder that holds it)."""
    path = Path(path)
    return parse_config((path / CONFIG if path.is_dir() else path).read_text())


def vocab_of(config) -> Vocab:
    """The vocabulary a config carries: a parsed ModelConfig, or the JSON dict Triton's API returns."""
    if isinstance(config, dict):
        config = config.get("config", config)
        return Vocab.from_json(config["parameters"][VOCAB_PARAMETER]["string_value"])
    return Vocab.from_json(config.parameters[VOCAB_PARAMETER].string_value)

"""The served models of model_repository/ (one table: every model name is written here and nowhere else), and
the reader of their config.pbtxt and vocabulary.

Export writes one folder per row (export/configs.py: its config.pbtxt from the row and the graph's tensors); the
deployment spec (charrnn/deployment.py: which server loads which models, `make generate`), the local launcher, the
client's model choice and the benchmarks read the table.

    graph  "step": the client samples (one character per request, or a prompt chunk); "gen": the server samples
           K characters per request. Each graph's tensors: charrnn.contract's table (python -m charrnn.contract)
    backend        tensorrt: a plan, GPU only; onnxruntime: Triton's ONNX Runtime backend, CPU or GPU, with
                   implicit state (Triton keeps each sequence's state); python: ONNX Runtime inside the python
                   backend (no implicit state: model.py keeps each sequence's state)
    decoupled      one response per generated character (gRPC streaming only); such a model gets a server of
                   its own (see DECOUPLED_MODELS)
    threads        ONNX Runtime's intra-op threads per instance
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charrnn.contract import GEN, STEP, VOCAB_PARAMETER
from charrnn.errors import CheckFailed
from charrnn.vocab import Vocab

# STEP, GEN: the two graphs of charrnn.contract's table (re-exported here).
TENSORRT, ONNXRUNTIME, PYTHON_BACKEND = "tensorrt", "onnxruntime", "python"
CONFIG = "config.pbtxt"
# Triton's custom model configuration (`--model-config-name=cpu` loads <model>/configs/cpu.pbtxt where it exists,
# else config.pbtxt): our CPU servers (the local launcher, the slim and scale images) pass it, so the ONNX Runtime
# models say KIND_CPU there, while config.pbtxt keeps KIND_AUTO for NVIDIA's images (a GPU build of the backend).
CPU_CONFIG_NAME = "cpu"


# What each backend's config.pbtxt says: the platform (or backend) line and the instance kind.
PLATFORM = {
    TENSORRT: (
        'platform: "tensorrt_plan"',
        "KIND_GPU",
    ),  # a plan runs only on the GPU it was built for
    ONNXRUNTIME: ('platform: "onnxruntime_onnx"', "KIND_AUTO"),  # GPU if present, else CPU
    PYTHON_BACKEND: ('backend: "python"', "KIND_CPU"),
}


@dataclass(frozen=True)
class ServedModel:
    """One row of the table: a folder of model_repository/ and how Triton serves it. Which server runs it
    follows from `decoupled` (charrnn/deployment.py); its tensors from `graph` (charrnn/contract.py).
    """

    name: str
    graph: str  # STEP or GEN
    backend: str  # TENSORRT, ONNXRUNTIME or PYTHON_BACKEND
    about: str  # the config's first comment line
    decoupled: bool = False
    # ONNX Runtime intra-op threads per instance (0: not ONNX Runtime), measured side by side on our 2-core
    # machine (docs/benchmarks.md, bench/notes/ab.md): the per-character model shares the cores with the gRPC
    # front end and the client, and 2 threads cost 10-15% at 64 sequences; a generation request keeps ORT busy
    # for K steps while the client waits, and 2 threads made K = 128 1.6x faster. On a bigger host, give them
    # the instance's cores. The ONNX Runtime backend's models get the count in their CPU config.
    threads: int = 0

    @property
    def platform(self) -> str:
        return PLATFORM[self.backend][0]

    @property
    def kind(self) -> str:
        return PLATFORM[self.backend][1]

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


# The names the code refers to (a row needs no constant of its own).
TRT, ONNX, PYTHON = "charrnn_trt", "charrnn_onnx", "charrnn_python"
GEN_TRT, GEN_ONNX, GEN_PYTHON = "charrnn_gen_trt", "charrnn_gen_onnx", "charrnn_gen_python"
GEN_STREAM = "charrnn_gen_stream"
# In order of preference: the client picks the first one that is ready.
MODELS = (
    ServedModel(
        TRT,
        STEP,
        TENSORRT,
        "TensorRT engine built from model.onnx by export.build_plan (NVIDIA's TensorRT container, same "
        "release as the server)",
    ),
    ServedModel(
        ONNX,
        STEP,
        ONNXRUNTIME,
        "ONNX Runtime; KIND_AUTO = GPU if present, else CPU",
        threads=1,
    ),
    ServedModel(
        PYTHON,
        STEP,
        PYTHON_BACKEND,
        "python backend running model.onnx with ONNX Runtime; state kept per correlation id in model.py",
        threads=1,
    ),
    ServedModel(
        GEN_TRT,
        GEN,
        TENSORRT,
        "server-side generation, TensorRT engine built from the generation graph "
        "(charrnn_gen_onnx/1/model.onnx) by export.build_plan",
    ),
    ServedModel(
        GEN_ONNX,
        GEN,
        ONNXRUNTIME,
        "server-side generation, ONNX Runtime running the generation graph (export/gen_export.py); "
        "KIND_AUTO = GPU if present, else CPU",
        threads=2,
    ),
    ServedModel(
        GEN_PYTHON,
        GEN,
        PYTHON_BACKEND,
        "server-side generation, python backend running the generation graph with ONNX Runtime; state "
        "kept per correlation id in model.py",
        threads=2,
    ),
    ServedModel(
        GEN_STREAM,
        GEN,
        PYTHON_BACKEND,
        "server-side generation streamed: decoupled python backend, one response per character as it is "
        "generated (gRPC streaming only); state kept in model.py",
        decoupled=True,
        threads=2,
    ),
)
BY_NAME = {m.name: m for m in MODELS}


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

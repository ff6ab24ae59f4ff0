"""The models of model_repository/ that the Triton services serve: named once, here.

docker-compose.yml serves all of them on a GPU host (`triton`), the ones in CPU_MODELS on a CPU-only host
(`triton-cpu`, which mounts those model folders one by one so Triton never sees the GPU-only TensorRT model) and
the PYTHON_MODELS in the slim image (`triton-slim`, no NGC registry needed).
tests/test_compose.py imports this module and checks that every model folder the compose file names is listed
here, so a rename shows up as a failing test instead of a container that silently serves nothing.

The folders themselves (config.pbtxt, model.onnx, model.plan) are produced by `make export` and
`python -m export.build_plan`; they need not exist for the compose file to be checked.
"""

SERVED_MODELS = ("charrnn_trt", "charrnn_onnx", "charrnn_python",
                 # server-side generation, K characters per request (export/gen_export.py)
                 "charrnn_gen_trt", "charrnn_gen_onnx", "charrnn_gen_python", "charrnn_gen_stream")

# TensorRT plans run only on the GPU they were built for; the others run on CPU (or GPU, for ONNX Runtime).
GPU_ONLY_MODELS = ("charrnn_trt", "charrnn_gen_trt")
CPU_MODELS = tuple(m for m in SERVED_MODELS if m not in GPU_ONLY_MODELS)
# The python-backend models: all that Triton 2.51 from the nvidia-pytriton wheel can serve (it has no TensorRT or
# ONNX Runtime backend), i.e. the local server (serve/local.py) and the slim compose services.
PYTHON_MODELS = ("charrnn_python", "charrnn_gen_python", "charrnn_gen_stream")
# Decoupled models (one request, many responses) get a tritonserver process of their own. Triton 2.51's gRPC
# frontend segfaults (in TRITONBACKEND_ResponseSend) when a decoupled and a non-decoupled model stream responses
# on one server: the stream handlers share one pool of request states, and a non-decoupled stream marks its
# state complete after handing its write to gRPC, so the state can be released and reused by a decoupled
# request, which then counts its first response as its last (server src/grpc/stream_infer_handler.cc, r24.10;
# no upstream fix as of 2026-08). README, "Failure behaviour"; `make soak-mixed` runs the split servers.
DECOUPLED_MODELS = ("charrnn_gen_stream",)
SHARED_PYTHON_MODELS = tuple(m for m in PYTHON_MODELS if m not in DECOUPLED_MODELS)  # one server; the rest: another


def mixed_decoupled(models: tuple[str, ...]) -> bool:
    """True if `models` puts a decoupled model on one server with a non-decoupled one (which crashes 2.51)."""
    return bool(set(models) & set(DECOUPLED_MODELS)) and bool(set(models) - set(DECOUPLED_MODELS))

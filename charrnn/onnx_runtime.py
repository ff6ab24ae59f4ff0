"""The one way this project opens an ONNX model with ONNX Runtime (CPU): verify, the python-backend models, bench."""

from __future__ import annotations

from pathlib import Path


def ort_session(path: str | Path, threads: int = 1):
    """An onnxruntime.InferenceSession on the CPU with `threads` intra-op threads, one inter-op thread, sequential
    execution. Raises ValueError "cannot load ONNX model <path> (<why>)" for a missing or broken file.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(
            f"cannot load ONNX model {path} ({type(e).__name__}: {str(e).strip()[:200]})"
        ) from e

"""charrnn_python: a stateful char-RNN on Triton's python backend, running the exported ONNX step model.

Clients see the same interface as charrnn_trt / charrnn_onnx: INPUT_IDS int32 (1, T) per request in,
LOGITS fp32 (1, V) out, with sequence_id / sequence_start / sequence_end. Those two models get their state
from Triton's implicit state; the python backend has no implicit state (the state input never arrives),
so this model keeps each sequence's packed state (S, L, H) itself, keyed by request.correlation_id():

  - sequence_start: the state starts from zeros;   sequence_end: the state is freed after the request;
  - a sequence idle longer than max_sequence_idle_microseconds is evicted by a reaper thread (Triton frees
    its slot at that timeout but does not tell the model);
  - all requests of one execute() with equal T run as ONE batched ONNX Runtime call;
  - a bad request gets an error response of its own; the other requests of the batch and every sequence's
    state are unaffected.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from charrnn.contract import INPUT_IDS, LOGITS, MAX_T, STATE_IN, STATE_OUT

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        name = args["model_name"]
        if config.get("max_batch_size", 0) < 1:
            raise pb_utils.TritonModelException(f"{name} requires max_batch_size >= 1, got "
                                                f"{config.get('max_batch_size')}")
        seq = config.get("sequence_batching")
        if not seq:
            raise pb_utils.TritonModelException(f"{name} requires sequence_batching, got none")
        if "direct" in seq:
            raise pb_utils.TritonModelException(f"{name} requires the oldest strategy, got direct "
                                                "(direct pads batches with null requests)")
        idle_us = int(seq.get("max_sequence_idle_microseconds") or 1_000_000)
        # Evict a little after Triton frees the slot, never before (a request Triton accepts must find its state).
        self.idle_s = idle_us / 1e6 + 1.0
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "1"))

        onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not onnx_path.is_file():
            raise pb_utils.TritonModelException(f"{name} requires {onnx_path}, got no such file (run `make export`)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

        io = {t.name: t for t in self.session.get_inputs() + self.session.get_outputs()}
        for tensor, dtype in ((INPUT_IDS, "tensor(int32)"), (STATE_IN, "tensor(float)"), (LOGITS, "tensor(float)"),
                              (STATE_OUT, "tensor(float)")):
            if tensor not in io or io[tensor].type != dtype:
                got = io[tensor].type if tensor in io else "no such tensor"
                raise pb_utils.TritonModelException(f"{name} requires ONNX {tensor} {dtype}, got {got}")
        self.state_dims = tuple(io[STATE_IN].shape[1:])  # (S, L, H)
        self.vocab_size = int(io[LOGITS].shape[1])
        out_cfg = {o["name"]: o for o in config.get("output", [])}
        cfg_dims = [int(d) for d in out_cfg.get(LOGITS, {}).get("dims", [])]
        if cfg_dims != [self.vocab_size]:
            raise pb_utils.TritonModelException(f"{name} requires output {LOGITS} dims [{self.vocab_size}] "
                                                f"(from model.onnx), got {cfg_dims}")
        self.zero = np.zeros(self.state_dims, np.float32)
        self.states: dict[object, np.ndarray] = {}  # correlation id -> (S, L, H)
        self.last_used: dict[object, float] = {}  # correlation id -> time.monotonic()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.logger = pb_utils.Logger
        self.reaper = threading.Thread(target=self._reap, name="charrnn-reaper", daemon=True)
        self.reaper.start()
        self.logger.log_info(f"{name}: state {self.state_dims}, vocab {self.vocab_size}, idle eviction after "
                             f"{self.idle_s:.1f} s, ORT threads {threads}")

    # --- state lifecycle ------------------------------------------------------------------------
    def _reap(self) -> None:
        period = min(max(self.idle_s / 4, 0.05), 5.0)
        while not self.stopping.wait(period):
            cutoff = time.monotonic() - self.idle_s
            with self.lock:
                idle = [c for c, t in self.last_used.items() if t < cutoff]
                for c in idle:
                    self.states.pop(c, None)
                    self.last_used.pop(c, None)
                live = len(self.states)
            if idle:
                self.logger.log_info(f"evicted {len(idle)} idle sequence(s); {live} live")

    # --- inference ------------------------------------------------------------------------------
    def _check(self, request, corr, flags) -> tuple[np.ndarray | None, str | None]:
        """(ids (1, T), None) for a good request, (None, error message) for a bad one."""
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT_IDS)
        if tensor is None:
            return None, f"{INPUT_IDS}: missing (send int32 ids of shape [1, T])"
        ids = tensor.as_numpy()
        if ids.dtype != np.int32:
            return None, f"{INPUT_IDS}: dtype must be INT32, got {ids.dtype}"
        if ids.ndim != 2 or ids.shape[0] != 1 or not 1 <= ids.shape[1] <= MAX_T:
            return None, (f"{INPUT_IDS}: shape must be [1, T] with 1 <= T <= {MAX_T}, got {list(ids.shape)} "
                          "(send long prompts in chunks)")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            return None, f"{INPUT_IDS}: ids must be in 0..{self.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}"
        if corr in (0, ""):
            return None, "sequence id: missing (this model is stateful: send sequence_id, sequence_start, sequence_end)"
        if not flags & START and corr not in self.states:
            return None, (f"unknown sequence (never started, ended, or idle longer than "
                          f"{self.idle_s - 1.0:.0f} s) (start it again with sequence_start=True)")
        return ids, None

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[int, list] = {}  # T -> [(request index, correlation id, flags, ids (1, T))]
        with self.lock:
            for i, request in enumerate(requests):
                corr, flags = request.correlation_id(), request.flags()
                ids, error = self._check(request, corr, flags)
                if error:  # named by sequence: gRPC stream errors reach clients without a request id
                    message = f"sequence {corr}: {error}"
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                else:
                    groups.setdefault(ids.shape[1], []).append((i, corr, flags, ids))
            for members in groups.values():
                ids = members[0][3] if len(members) == 1 else np.concatenate([m[3] for m in members])  # (B, T)
                state = np.stack([self.zero if flags & START else self.states[corr]
                                  for _, corr, flags, _ in members])  # (B, S, L, H)
                logits, new_state = self.session.run([LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE_IN: state})
                now = time.monotonic()
                for row, (i, corr, flags, _) in enumerate(members):
                    if flags & END:
                        self.states.pop(corr, None)
                        self.last_used.pop(corr, None)
                    else:
                        self.states[corr] = new_state[row].copy()  # own memory: no view pins the batch
                        self.last_used[corr] = now
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(LOGITS, logits[row : row + 1])])
        return responses

    def finalize(self) -> None:
        self.stopping.set()
        self.reaper.join(timeout=5)
        self.states.clear()

"""charrnn_gen_python / charrnn_gen_stream: server-side generation of K characters per request, python backend.

Runs the generation ONNX graph (export/gen_export.py) with ONNX Runtime. Per request (batch dim 1):
INPUT_IDS int32 (1, T), NOISE fp32 (1, K, V) uniforms in (0, 1), TEMPERATURE fp32 (1, 1) (0 = greedy),
TOP_K int32 (1, 1) (0 = all) in; OUTPUT_IDS int32 (1, K) out, with sequence_id / sequence_start / sequence_end.
id_K is not fed: the next request sends it as INPUT_IDS (see charrnn.contract).

The python backend has no implicit state, so this model keeps each sequence's packed state itself
(charrnn.sequence_state: zeros on START, freed on END, idle sequences evicted). All requests of one
execute() with equal (T, K) run as ONE batched ONNX Runtime call (charrnn.gen_serving); a bad request gets
an error response of its own and leaves the others and every sequence's state alone.

charrnn_gen_stream runs THIS file too (`make export` copies it there): its config is decoupled
(model_transaction_policy { decoupled: true }), and then each request gets K responses, one OUTPUT_IDS (1, 1)
per character as soon as it is generated (the graph with K = 1, K times), the last one flagged FINAL.
Same ids, same state as the one-response mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from charrnn.contract import INPUT_IDS, NOISE, OUTPUT_IDS, STATE_IN, TEMPERATURE, TOP_K
from charrnn.gen_serving import GenRequest, GenRunner, check_gen_request, group_by_shape
from charrnn.sequence_state import SequenceStates


def load(args: dict) -> tuple[dict, GenRunner, int]:
    """Shared by charrnn_gen_python and charrnn_gen_stream: checks, ONNX Runtime session, state store."""
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
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    threads = int(params.get("intra_op_threads", "1"))
    onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
    if not onnx_path.is_file():
        raise pb_utils.TritonModelException(f"{name} requires {onnx_path}, got no such file (run `make export`)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    io = {t.name: t for t in session.get_inputs() + session.get_outputs()}
    for tensor, dtype in ((INPUT_IDS, "tensor(int32)"), (STATE_IN, "tensor(float)"), (NOISE, "tensor(float)"),
                          (TEMPERATURE, "tensor(float)"), (TOP_K, "tensor(int32)"), (OUTPUT_IDS, "tensor(int32)")):
        if tensor not in io or io[tensor].type != dtype:
            got = io[tensor].type if tensor in io else "no such tensor"
            raise pb_utils.TritonModelException(f"{name} requires ONNX {tensor} {dtype} (the generation graph), "
                                                f"got {got}")
    vocab_size = int(io[NOISE].shape[2])
    cfg_dims = [int(d) for i in config.get("input", []) if i["name"] == NOISE for d in i["dims"]]
    if cfg_dims != [-1, vocab_size]:
        raise pb_utils.TritonModelException(f"{name} requires input {NOISE} dims [-1, {vocab_size}] "
                                            f"(from model.onnx), got {cfg_dims}")
    states = SequenceStates(tuple(io[STATE_IN].shape[1:]), idle_us / 1e6, pb_utils.Logger.log_info)
    pb_utils.Logger.log_info(f"{name}: state {states.zero.shape}, vocab {vocab_size}, idle eviction after "
                             f"{states.idle_s:.1f} s, ORT threads {threads}")
    return config, GenRunner(session, states), vocab_size


def parse(requests, vocab_size: int, states: SequenceStates) -> tuple[list[GenRequest], dict[int, str]]:
    """(valid requests, {request index: error message}); caller holds states.lock."""
    valid, errors = [], {}
    for i, request in enumerate(requests):
        corr, flags = request.correlation_id(), request.flags()
        arrays = []
        for name in (INPUT_IDS, NOISE, TEMPERATURE, TOP_K):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            arrays.append(tensor.as_numpy() if tensor is not None else None)
        error = check_gen_request(*arrays, vocab_size) or states.check(corr, flags)
        if error:  # named by sequence: gRPC stream errors reach clients without a request id
            errors[i] = f"sequence {corr}: {error}"
        else:
            valid.append(GenRequest(i, corr, flags, *arrays))
    return valid, errors


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config, self.runner, self.vocab_size = load(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        if self.decoupled:
            return self.execute_streaming(requests)
        responses = [None] * len(requests)
        with self.runner.states.lock:
            valid, errors = parse(requests, self.vocab_size, self.runner.states)
            for i, message in errors.items():
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
            for group in group_by_shape(valid):
                ids = self.runner.run(group)  # (B, K)
                for row, r in enumerate(group):
                    responses[r.index] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(OUTPUT_IDS, np.ascontiguousarray(ids[row : row + 1]))])
        return responses

    def execute_streaming(self, requests) -> None:
        """Decoupled: one response per character as it is generated; FINAL with the K-th."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [request.get_response_sender() for request in requests]
        with self.runner.states.lock:
            valid, errors = parse(requests, self.vocab_size, self.runner.states)
            for i, message in errors.items():
                senders[i].send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                                flags=final)
            for group in group_by_shape(valid):
                k = group[0].noise.shape[1]
                for j, ids in self.runner.steps(group):  # ids (B, 1); states stored before the last one
                    for row, r in enumerate(group):
                        senders[r.index].send(pb_utils.InferenceResponse(output_tensors=[
                            pb_utils.Tensor(OUTPUT_IDS, np.ascontiguousarray(ids[row : row + 1]))]),
                            flags=final if j == k - 1 else 0)
        return None

    def finalize(self) -> None:
        self.runner.states.close()

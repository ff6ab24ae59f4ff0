"""The python-backend generation model (charrnn_gen_python, charrnn_gen_stream): K characters per request.

Each of the two model folders holds a model.py of two lines that imports TritonPythonModel from here, so the
code exists once; this module is imported only inside Triton's python backend stub (triton_python_backend_utils).

Runs the generation ONNX graph (export/gen_export.py) with ONNX Runtime. Per request (batch dim 1):
INPUT_IDS int32 (1, T), NOISE fp32 (1, K, V) uniforms in (0, 1), TEMPERATURE fp32 (1, 1) (0 = greedy),
TOP_K int32 (1, 1) (0 = all) in; OUTPUT_IDS int32 (1, K) out, with sequence_id / sequence_start / sequence_end.
id_K is not fed: the next request sends it as INPUT_IDS (see charrnn.contract).

The python backend has no implicit state, so this model keeps each sequence's packed state itself
(charrnn.sequence_state: zeros on START, freed on END, idle sequences evicted). All requests of one
execute() with equal (T, K) run as ONE batched ONNX Runtime call (charrnn.gen_serving); a bad request gets
an error response of its own and leaves the others and every sequence's state alone.

charrnn_gen_stream's config is decoupled (model_transaction_policy { decoupled: true }): then each request gets
K responses, one OUTPUT_IDS (1, 1) per character as soon as it is generated (the graph with K = 1, K times), the
last one flagged FINAL. Same ids, same state as the one-response mode.

Custom metrics, labelled model="<model name>" (docs/production.md, "Metrics"): charrnn_live_sequences,
charrnn_sequences_started_total, charrnn_sequences_evicted_total and charrnn_characters_generated_total, which
counts the ids the model returned: K per successful request (also the one id of a prompt chunk before the last,
which the client discards); the decoupled model counts a request's K ids before sending the last one.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from charrnn.contract import INPUT_IDS, NOISE, OUTPUT_IDS, STATE_IN, TEMPERATURE, TOP_K
from charrnn.gen_serving import GenRequest, GenRunner, check_gen_request, group_by_shape
from charrnn.sequence_state import SequenceStates, create_metrics, load_stateful_model


def load(args: dict, on_change=None) -> tuple[dict, GenRunner, int]:
    """Shared by charrnn_gen_python and charrnn_gen_stream: checks, ONNX Runtime session, state store
    (on_change: SequenceStates' hook, the model's MetricsSink)."""
    name = args["model_name"]
    try:  # the generation graph (export/gen_export.py)
        model = load_stateful_model(
            args,
            {
                INPUT_IDS: "tensor(int32)",
                STATE_IN: "tensor(float)",
                NOISE: "tensor(float)",
                TEMPERATURE: "tensor(float)",
                TOP_K: "tensor(int32)",
                OUTPUT_IDS: "tensor(int32)",
            },
        )
    except ValueError as e:
        raise pb_utils.TritonModelException(str(e)) from e
    vocab_size = int(model.io[NOISE].shape[2])
    cfg_dims = [
        int(d) for i in model.config.get("input", []) if i["name"] == NOISE for d in i["dims"]
    ]
    if cfg_dims != [-1, vocab_size]:
        raise pb_utils.TritonModelException(
            f"{name} requires input {NOISE} dims [-1, {vocab_size}] "
            f"(from model.onnx), got {cfg_dims}"
        )
    states = SequenceStates(
        tuple(model.io[STATE_IN].shape[1:]),
        model.idle_seconds,
        pb_utils.Logger.log_info,
        on_change=on_change,
    )
    pb_utils.Logger.log_info(
        f"{name}: state {states.zero.shape}, vocab {vocab_size}, idle eviction after "
        f"{states.idle_s:.1f} s, ORT threads {model.threads}"
    )
    return model.config, GenRunner(model.session, states), vocab_size


def parse(
    requests, vocab_size: int, states: SequenceStates
) -> tuple[list[GenRequest], dict[int, str]]:
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


def invalid(message: str):
    """The caller's error: gRPC INVALID_ARGUMENT / HTTP 400 (not INTERNAL / 500)."""
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.metric_families, self.metrics = create_metrics(pb_utils, args["model_name"])
        config, self.runner, self.vocab_size = load(args, on_change=self.metrics)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        if self.decoupled:
            return self.execute_streaming(requests)
        responses = [None] * len(requests)
        with self.runner.states.lock:
            valid, errors = parse(requests, self.vocab_size, self.runner.states)
            for i, message in errors.items():
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=invalid(message))
            for group in group_by_shape(valid):
                ids = self.runner.run(group)  # (B, K)
                for row, r in enumerate(group):
                    responses[r.index] = pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor(OUTPUT_IDS, np.ascontiguousarray(ids[row : row + 1]))
                        ]
                    )
                self.metrics({"characters": ids.size})  # before the responses leave
        return responses

    def execute_streaming(self, requests) -> None:
        """Decoupled: one response per character as it is generated; FINAL with the K-th."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [request.get_response_sender() for request in requests]
        with self.runner.states.lock:
            valid, errors = parse(requests, self.vocab_size, self.runner.states)
            for i, message in errors.items():
                senders[i].send(
                    pb_utils.InferenceResponse(output_tensors=[], error=invalid(message)),
                    flags=final,
                )
            for group in group_by_shape(valid):
                k = group[0].noise.shape[1]
                # ids (B, 1); states stored before the last one
                for j, ids in self.runner.steps(group):
                    if j == k - 1:  # counted before the FINAL responses leave
                        self.metrics({"characters": len(group) * k})
                    for row, r in enumerate(group):
                        senders[r.index].send(
                            pb_utils.InferenceResponse(
                                output_tensors=[
                                    pb_utils.Tensor(
                                        OUTPUT_IDS, np.ascontiguousarray(ids[row : row + 1])
                                    )
                                ]
                            ),
                            flags=final if j == k - 1 else 0,
                        )
        return None

    def finalize(self) -> None:
        self.runner.states.close()  # reports its live sequences gone
        self.metrics.close()  # the Metric objects go before their families
        self.metric_families.clear()

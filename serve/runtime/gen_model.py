"""What the two generation models (charrnn_gen_python, charrnn_gen_stream) share: load, parse, respond, close.

Each model folder spells out Triton's TritonPythonModel (initialize / execute / finalize) in its model.py over a
`GenModel`; the two differ only in how execute() answers. charrnn_gen_python: one response of K ids per request.
charrnn_gen_stream, decoupled by its config (model_transaction_policy { decoupled: true }): K responses per request,
one OUTPUT_IDS (1, 1) per character as soon as it is generated (the graph with K = 1, K times), the last one flagged
FINAL. Same ids, same state in both modes; each model refuses a config of the other mode.

Runs the generation ONNX graph (export/gen_export.py) with ONNX Runtime. Per request (batch dim 1): the GEN
graph's inputs of charrnn.contract's table without the state (INPUT_IDS, NOISE, TEMPERATURE, TOP_K) in, OUTPUT_IDS
(1, K) out, with sequence_id / sequence_start / sequence_end. id_K is not fed: the next request sends it as
INPUT_IDS. A refused request gets charrnn.contract.server_error's text: "<CODE>: sequence <id>: <detail>".

The python backend has no implicit state, so the model keeps each sequence's packed state itself
(serve.runtime.sequence_state: zeros on START, freed on END, idle sequences evicted). All requests of one
execute() with equal (T, K) run as ONE batched ONNX Runtime call (serve.runtime.gen_serving); a bad request gets
an error response of its own and leaves the others and every sequence's state alone.

Custom metrics, labelled model="<model name>" (docs/production.md, "Metrics"): charrnn_live_sequences,
charrnn_sequences_started_total, charrnn_sequences_evicted_total and charrnn_characters_generated_total, which
counts the ids the model returned: K per successful request (also the one id of a prompt chunk before the last,
which the client discards); the decoupled model counts a request's K ids before sending the last one.

Free of Triton: `pb_utils` is the triton_python_backend_utils module the model.py imported.
"""

from __future__ import annotations

import numpy as np

from charrnn.contract import GEN, NOISE, OUTPUT_IDS, STATE_IN, ErrorCode, server_error

from .gen_serving import (
    GEN_REQUEST_INPUTS,
    GenRequest,
    GenRunner,
    check_gen_request,
    group_by_shape,
)
from .sequence_state import SequenceStates, create_metrics, graph_types, load_stateful_model


def load(pb_utils, args: dict, decoupled: bool, on_change=None) -> tuple[GenRunner, int]:
    """(runner, vocabulary size): checks, ONNX Runtime session, state store (on_change: SequenceStates' hook, the
    model's MetricsSink). TritonModelException on a config or graph the model cannot serve."""
    name = args["model_name"]
    try:  # the generation graph (export/gen_export.py)
        model = load_stateful_model(args, graph_types(GEN))
    except ValueError as e:
        raise pb_utils.TritonModelException(str(e)) from e
    if pb_utils.using_decoupled_model_transaction_policy(model.config) != decoupled:
        raise pb_utils.TritonModelException(
            f"{name} requires model_transaction_policy decoupled: {str(decoupled).lower()}, "
            f"got {str(not decoupled).lower()} (its model.py answers "
            f"{'one response per character' if decoupled else 'one response per request'})"
        )
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
    return GenRunner(model.session, states), vocab_size


def parse(
    pb_utils, requests, vocab_size: int, states: SequenceStates
) -> tuple[list[GenRequest], dict[int, str]]:
    """(valid requests, {request index: error message}); caller holds states.lock."""
    valid, errors = [], {}
    for i, request in enumerate(requests):
        corr, flags = request.correlation_id(), request.flags()
        arrays = {}
        for t in GEN_REQUEST_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            arrays[t.name] = tensor.as_numpy() if tensor is not None else None
        bad = check_gen_request(arrays, vocab_size)
        problem = (ErrorCode.INVALID_INPUT, bad) if bad else states.check(corr, flags)
        if problem:  # named by sequence: gRPC stream errors reach clients without a request id
            errors[i] = server_error(*problem, sequence=corr)
        else:
            valid.append(GenRequest(i, corr, flags, arrays))
    return valid, errors


class GenModel:
    """A generation model's parts, made by its initialize(): `runner` (the ONNX Runtime session and `states`, the
    sequence states it advances), `metrics` (the MetricsSink; `metrics({"characters": n})` counts ids returned).
    """

    def __init__(self, pb_utils, args: dict, decoupled: bool) -> None:
        self.pb_utils = pb_utils
        self.metric_families, self.metrics = create_metrics(pb_utils, args["model_name"])
        self.runner, self.vocab_size = load(pb_utils, args, decoupled, on_change=self.metrics)
        self.states = self.runner.states

    def parse(self, requests) -> tuple[list[list[GenRequest]], dict[int, str]]:
        """(the valid requests in groups of equal (T, K), each one batched call; {request index: error message}).
        Caller holds states.lock."""
        valid, errors = parse(self.pb_utils, requests, self.vocab_size, self.states)
        return group_by_shape(valid), errors

    def error_response(self, message: str):
        """The caller's error: gRPC INVALID_ARGUMENT / HTTP 400 (not INTERNAL / 500)."""
        pb_utils = self.pb_utils
        error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def ids_response(self, ids: np.ndarray, row: int):
        """OUTPUT_IDS of one request: row `row` of a group's ids (B, K), or (B, 1) streamed."""
        tensor = self.pb_utils.Tensor(OUTPUT_IDS, np.ascontiguousarray(ids[row : row + 1]))
        return self.pb_utils.InferenceResponse(output_tensors=[tensor])

    def close(self) -> None:
        """finalize(): the live sequences reported gone, then the Metric objects before their families."""
        self.states.close()
        self.metrics.close()
        self.metric_families.clear()

"""charrnn_python: a stateful char-RNN on Triton's python backend, running the exported ONNX step model.

Clients see the same interface as charrnn_trt / charrnn_onnx: INPUT_IDS int32 (1, T) per request in,
LOGITS fp32 (1, V) out, with sequence_id / sequence_start / sequence_end. Those two models get their state
from Triton's implicit state; the python backend has no implicit state (the state input never arrives),
so this model keeps each sequence's packed state (S, L, H) itself (serve/runtime/sequence_state.py):

  - sequence_start: the state starts from zeros;   sequence_end: the state is freed after the request;
  - a sequence idle longer than max_sequence_idle_microseconds is evicted by a reaper thread (Triton frees
    its slot at that timeout but does not tell the model);
  - all requests of one execute() with equal T run as ONE batched ONNX Runtime call;
  - a bad request gets an error response of its own; the other requests of the batch and every sequence's
    state are unaffected;
  - custom metrics, labelled model="charrnn_python" (docs/production.md, "Metrics"): charrnn_live_sequences,
    charrnn_sequences_started_total, charrnn_sequences_evicted_total and charrnn_characters_generated_total,
    which counts the requests answered with LOGITS (one character each; the client discards the answers to
    prompt chunks before the last one, the server cannot tell them apart).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from charrnn.contract import (
    INPUT_IDS,
    LOGITS,
    MAX_T,
    STATE_IN,
    STATE_OUT,
    STEP,
    ErrorCode,
    server_error,
)
from charrnn_serve.runtime.sequence_state import (
    SequenceStates,
    check_ids,
    create_metrics,
    graph_types,
    load_stateful_model,
)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        name = args["model_name"]
        try:
            model = load_stateful_model(args, graph_types(STEP))
        except ValueError as e:
            raise pb_utils.TritonModelException(str(e)) from e
        self.session = model.session
        self.vocab_size = int(model.io[LOGITS].shape[1])
        cfg_dims = [
            int(d) for o in model.config.get("output", []) if o["name"] == LOGITS for d in o["dims"]
        ]
        if cfg_dims != [self.vocab_size]:
            raise pb_utils.TritonModelException(
                f"{name} requires output {LOGITS} dims [{self.vocab_size}] "
                f"(from model.onnx), got {cfg_dims}"
            )
        self.metric_families, self.metrics = create_metrics(pb_utils, name)
        self.states = SequenceStates(
            tuple(model.io[STATE_IN].shape[1:]),
            model.idle_seconds,
            pb_utils.Logger.log_info,
            on_change=self.metrics,
        )
        pb_utils.Logger.log_info(
            f"{name}: state {self.states.zero.shape}, vocab {self.vocab_size}, idle eviction "
            f"after {self.states.idle_s:.1f} s, ORT threads {model.threads}"
        )

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[int, list] = {}  # T -> [(request index, correlation id, flags, ids (1, T))]
        with self.states.lock:
            for i, request in enumerate(requests):
                corr, flags = request.correlation_id(), request.flags()
                tensor = pb_utils.get_input_tensor_by_name(request, INPUT_IDS)
                ids = tensor.as_numpy() if tensor is not None else None
                bad = (
                    f"{INPUT_IDS}: missing"
                    if ids is None
                    else check_ids(ids, self.vocab_size, MAX_T)
                )
                problem = (ErrorCode.INVALID_INPUT, bad) if bad else self.states.check(corr, flags)
                # named by sequence: gRPC stream errors reach clients without a request id
                if problem:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError(
                            server_error(*problem, sequence=corr), pb_utils.TritonError.INVALID_ARG
                        ),
                    )
                else:
                    groups.setdefault(ids.shape[1], []).append((i, corr, flags, ids))
            for members in groups.values():
                keys = [(corr, flags) for _, corr, flags, _ in members]
                # (B, T)
                ids = (
                    members[0][3] if len(members) == 1 else np.concatenate([m[3] for m in members])
                )
                # (B, V), (B, S, L, H)
                logits, new_state = self.session.run(
                    [LOGITS, STATE_OUT], {INPUT_IDS: ids, STATE_IN: self.states.gather(keys)}
                )
                self.states.scatter(keys, new_state)
                for row, (i, *_) in enumerate(members):
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(LOGITS, logits[row : row + 1])]
                    )
            # Before the responses leave: a client that has its answer finds it counted.
            self.metrics({"characters": sum(len(members) for members in groups.values())})
        return responses

    def finalize(self) -> None:
        self.states.close()  # reports its live sequences gone
        self.metrics.close()  # the Metric objects go before their families
        self.metric_families.clear()

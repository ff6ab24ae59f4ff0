"""charrnn_gen_stream: server-side generation, decoupled by its config.pbtxt: one response per character as it is generated.

Triton's python backend runs this TritonPythonModel; what it shares with charrnn_gen_python (loading, request
checks, state, metrics, responses) is serve/runtime/gen_model.py's GenModel, which says what the model serves.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from charrnn_serve.runtime.gen_model import GenModel


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.gen = GenModel(pb_utils, args, decoupled=True)

    def execute(self, requests) -> None:
        """Decoupled: K responses per request, OUTPUT_IDS (1, 1) each as it is generated; FINAL with the K-th."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [request.get_response_sender() for request in requests]
        with self.gen.states.lock:
            groups, errors = self.gen.parse(requests)
            for i, message in errors.items():
                senders[i].send(self.gen.error_response(message), flags=final)
            for group in groups:
                k = group[0].k
                # ids (B, 1); states stored before the last one
                for j, ids in self.gen.runner.steps(group):
                    if j == k - 1:  # counted before the FINAL responses leave
                        self.gen.metrics({"characters": len(group) * k})
                    for row, r in enumerate(group):
                        flags = final if j == k - 1 else 0
                        senders[r.index].send(self.gen.ids_response(ids, row), flags=flags)
        return None

    def finalize(self) -> None:
        self.gen.close()

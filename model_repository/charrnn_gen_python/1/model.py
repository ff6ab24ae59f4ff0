"""charrnn_gen_python: server-side generation, K characters per request, in one response.

Triton's python backend runs this TritonPythonModel; what it shares with charrnn_gen_stream (loading, request
checks, state, metrics, responses) is serve/runtime/gen_model.py's GenModel, which says what the model serves.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from charrnn_serve.runtime.gen_model import GenModel


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.gen = GenModel(pb_utils, args, decoupled=False)

    def execute(self, requests):
        """One response per request: OUTPUT_IDS (1, K), all K characters from one batched call per group."""
        responses = [None] * len(requests)
        with self.gen.states.lock:
            groups, errors = self.gen.parse(requests)
            for i, message in errors.items():
                responses[i] = self.gen.error_response(message)
            for group in groups:
                ids = self.gen.runner.run(group)  # (B, K)
                for row, r in enumerate(group):
                    responses[r.index] = self.gen.ids_response(ids, row)
                self.gen.metrics({"characters": ids.size})  # before the responses leave
        return responses

    def finalize(self) -> None:
        self.gen.close()

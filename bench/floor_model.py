"""The round-trip floor for `make bench`: charrnn_python's interface and config, and no network to run.

`make bench` serves this file as `charrnn_floor/1/model.py` (config.pbtxt = charrnn_python's, renamed) in a
temporary repository and drives it with the same client as the real python model. It reads each request's
INPUT_IDS and answers zero LOGITS, so what it measures is what one request per character costs before any
inference: gRPC, Triton's sequence batcher, the python backend's hand-off to its stub process, the client.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from charrnn.contract import INPUT_IDS, LOGITS


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        dims = [int(d) for o in config["output"] if o["name"] == LOGITS for d in o["dims"]]
        if len(dims) != 1:
            raise pb_utils.TritonModelException(
                f"{args['model_name']} requires output {LOGITS} dims [V], " f"got {dims}"
            )
        self.logits = np.zeros((1, dims[0]), np.float32)  # (1, V)

    def execute(self, requests):
        responses = []
        for request in requests:
            pb_utils.get_input_tensor_by_name(
                request, INPUT_IDS
            ).as_numpy()  # (1, T), read like the real python model
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(LOGITS, self.logits)])
            )
        return responses

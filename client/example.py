"""The raw protocol in one page: a stateful sequence on charrnn_onnx (Triton keeps its state) with tritonclient alone.

    python -m client.example [--url 127.0.0.1:8001]      # against `make serve`; prints PASS or exits 1
                                                         # (exit 3: server unreachable or model not ready)

A sequence is a correlation id: the first request carries sequence_start, the last sequence_end, and the server
keeps the recurrent state in between. Each request sends INPUT_IDS (1, T) and gets LOGITS (1, V) for the next
character. The check: the prompt sent in ONE request and the prompt sent one character per request (a second
sequence) must give the same logits and the same greedy text, which holds only if the server carries each
sequence's state.
"""

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from charrnn.repository import (
    ONNX as MODEL,  # the one thing taken from the project: the model's name
)


def infer(client, ids, sequence_id, start=False, end=False):
    inp = grpcclient.InferInput("INPUT_IDS", [1, len(ids)], "INT32")
    inp.set_data_from_numpy(np.array([ids], np.int32))  # (1, T)
    result = client.infer(
        MODEL, [inp], sequence_id=sequence_id, sequence_start=start, sequence_end=end
    )
    return result.as_numpy("LOGITS")[0]  # (V,)


def greedy(client, logits, sequence_id, length):
    text = []
    for i in range(length):
        text.append(int(np.argmax(logits)))
        logits = infer(client, [text[-1]], sequence_id, end=i == length - 1)
    return text


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m client.example", description=__doc__.splitlines()[0]
    )
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="Triton's gRPC address")
    args = p.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    try:
        return check(client)
    # server down, model not loaded, ...: a message, not a traceback
    except InferenceServerException as e:
        print(
            f"error: server {args.url}: {e.message()} (start it with `make serve`)", file=sys.stderr
        )
        return 3


def check(client) -> int:
    config = client.get_model_config(MODEL, as_json=True)["config"]
    # the model's vocabulary
    chars = json.loads(config["parameters"]["vocab_json"]["string_value"])["chars"]
    prompt = [chars.index(c) for c in "ROMEO:\n"]

    whole = infer(client, prompt, 1001, start=True)  # sequence 1001: the prompt in one request
    step = infer(client, prompt[:1], 1002, start=True)  # sequence 1002: one character per request
    for i in prompt[1:]:
        step = infer(client, [i], 1002)
    text = greedy(client, whole, 1001, 40)
    same = np.allclose(whole, step, atol=1e-4) and greedy(client, step, 1002, 40) == text
    print("ROMEO:\n" + "".join(chars[i] for i in text))
    print("PASS" if same else "FAIL: the two sequences disagree (is the state kept per sequence?)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

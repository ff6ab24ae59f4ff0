"""The tensor contract between the exported model, the Triton configs and the client: defined once, here.

Every served model (TensorRT, ONNX Runtime, python backend) shows clients the same interface:

    INPUT_IDS  int32 (B, T)          T >= 1: a prompt chunk, or the one last sampled character
    LOGITS     fp32  (B, V)          next-character logits after the last input position

The exported ONNX graph / TensorRT plan also carries the recurrent state explicitly, as ONE packed tensor
(Triton pairs several implicit states by sorted position, not by name: server issue #8586):

    STATE_IN   fp32  (B, S, L, H)    S = 2 for LSTM (h, c), 1 for GRU / SimpleRNN; L layers; H hidden
    STATE_OUT  fp32  (B, S, L, H)

Batch is first everywhere so Triton's implicit state (dims exclude batch) and batching work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_IDS = "INPUT_IDS"
LOGITS = "LOGITS"
STATE_IN = "STATE_IN"
STATE_OUT = "STATE_OUT"

# Triton / ONNX / NumPy spellings of the two dtypes the contract uses.
IDS_DTYPE = np.int32
FLOAT_DTYPE = np.float32
TRITON_DTYPE = {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}

# Serving limits (also the TensorRT optimization profile).
MAX_BATCH_SIZE = 64  # sequences per execution
MAX_T = 256  # characters per request (longer prompts are sent in chunks)

# Sequence batcher: an idle sequence is freed after this (Triton's default of 1 s is far too short); the default
# of `python -m export --idle-timeout`.
MAX_SEQUENCE_IDLE_US = 60_000_000
# Sequence slots per model instance (the `oldest` strategy's max_candidate_sequences), far above the batch: with
# slots == batch (64), a 65th sequence waited in Triton's backlog for a free slot, and because Triton answers a
# gRPC stream's requests in order, every later response on that stream waited behind it (a hang until the idle
# timeout). Each slot costs the python models one state (2 x 2 x 512 floats = 8 KiB) only while it is in use.
MAX_SEQUENCES = 1024
# Admission (docs/failures.md, "Capacity"). A slot is held from a sequence's START until its END or the idle
# timeout, so sequences started and abandoned hold slots too. A START that finds all MAX_SEQUENCES taken waits in
# Triton's backlog, which has no bound and no default deadline, and on a gRPC stream every later answer waits
# behind it. So the client sends every START with this Triton request timeout ("timeout" parameter, microseconds):
# Triton answers a START still in the backlog then with UNAVAILABLE and CAPACITY_MESSAGE (2.51's text,
# sequence_batch_scheduler.cc), which the client reports as "at capacity". The timeout applies only in the backlog:
# the oldest strategy's queue ignores request timeouts (its default queue policy does not allow the override).
ADMISSION_TIMEOUT_US = 1_000_000
CAPACITY_MESSAGE = "timeout of the corresponding sequence has been expired"
# Sequence ids are the only identity a sequence has, and gRPC inference needs no key: a START under an id that is
# in use would reset its owner's state. The python models refuse it with this message (serve.runtime.sequence_state);
# Triton's implicit state (charrnn_onnx) resets it, so clients draw every id at random (client.generate).
LIVE_ID_MESSAGE = "is in use: a START under a live sequence id is refused"
# A server that restricts an API to a header (tritonserver --grpc-restricted-protocol=inference:<name>=<key>,
# --http-restricted-api) refuses a request without it, or with a wrong value. Triton 2.51's texts: gRPC
# "This protocol is restricted, expecting header 'triton-grpc-protocol-<name>'" (status UNAVAILABLE, which reads
# as "server down"), HTTP 403 "This API is restricted, expecting header '<name>'". Clients match this part
# (lower-cased) and report a caller mistake naming the header (exit 2), never an outage to retry.
RESTRICTED_MESSAGE = "is restricted, expecting header"

# HTTP inference needs this header with the server's inference key (Triton's restricted-API check, which runs
# before the request body is read). Triton 2.51 sizes a JSON input's buffer from its declared "shape" before
# checking the data, so ONE unauthenticated request with "shape": [1, 2**40] aborted the server (std::bad_alloc);
# 2.59 adds --http-max-input-size, 2.51 has no setting. gRPC checks sizes first and stays open.
INFER_KEY_HEADER = "infer-key"
INFER_KEY_ENV = (
    "TRITON_INFER_KEY"  # where the client, the local launcher and compose's .env read the key
)
# Behind several replicas (compose profile `scale`, serve/haproxy.cfg) the proxy hashes this header to pick the
# replica that holds a sequence's state: the client sets it per gRPC stream (one per shard) or per HTTP request.
ROUTING_HEADER = "x-sequence-key"

# Model config parameter that carries the vocabulary to clients (JSON of charrnn.vocab.Vocab).
VOCAB_PARAMETER = "vocab_json"

CELLS = ("lstm", "gru", "rnn")


def state_slots(cell: str) -> int:
    """S: how many per-layer vectors a cell carries (LSTM: h and c)."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    return 2 if cell == "lstm" else 1


@dataclass(frozen=True)
class Contract:
    """Shapes of the four tensors for one model; -1 marks a dynamic dim (batch, T)."""

    cell: str
    layers: int
    hidden: int
    vocab_size: int

    @property
    def state_dims(self) -> tuple[int, int, int]:
        """State dims without the batch dim (what Triton's `state { dims }` wants)."""
        return (state_slots(self.cell), self.layers, self.hidden)

    def inputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, full shape with batch) of the exported graph's inputs."""
        return {
            INPUT_IDS: (np.dtype(IDS_DTYPE), (-1, -1)),
            STATE_IN: (np.dtype(FLOAT_DTYPE), (-1, *self.state_dims)),
        }

    def outputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {
            LOGITS: (np.dtype(FLOAT_DTYPE), (-1, self.vocab_size)),
            STATE_OUT: (np.dtype(FLOAT_DTYPE), (-1, *self.state_dims)),
        }

    def gen_inputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, full shape, -1 = dynamic) of the generation graph's inputs (see below)."""
        return {
            **self.inputs(),
            NOISE: (np.dtype(FLOAT_DTYPE), (-1, -1, self.vocab_size)),  # (B, K, V)
            TEMPERATURE: (np.dtype(FLOAT_DTYPE), (-1, 1)),
            TOP_K: (np.dtype(IDS_DTYPE), (-1, 1)),
        }

    def gen_outputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {
            OUTPUT_IDS: (np.dtype(IDS_DTYPE), (-1, -1)),  # (B, K)
            STATE_OUT: (np.dtype(FLOAT_DTYPE), (-1, *self.state_dims)),
        }

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, *self.state_dims), dtype=FLOAT_DTYPE)


# --- Server-side generation: K characters per request, sampled inside the graph -----------------
#
# The generation graph (export/gen_export.py; models charrnn_gen_*) takes the step contract's INPUT_IDS and
# STATE_IN plus the sampling inputs, and returns K sampled ids instead of LOGITS:
#
#     NOISE        fp32  (B, K, V)   uniforms in (0, 1), one row per generated character (K = NOISE dim 1)
#     TEMPERATURE  fp32  (B, 1)      > 0 samples; 0 = greedy (argmax of the raw logits)
#     TOP_K        int32 (B, 1)      keep the k most likely characters (0 = all)
#     OUTPUT_IDS   int32 (B, K)      id_1..id_K; id_1 follows the last INPUT_IDS; id_K is NOT fed back
#                                    (the next request sends it as its INPUT_IDS, like the per-character client)
#     STATE_OUT    fp32  (B, S, L, H) state after INPUT_IDS and id_1..id_{K-1}
NOISE = "NOISE"
TEMPERATURE = "TEMPERATURE"
TOP_K = "TOP_K"
OUTPUT_IDS = "OUTPUT_IDS"
MAX_K = 256  # characters generated per request (also the TensorRT optimization profile)
# Sampling temperature: 0 means greedy (argmax); otherwise at least this. Below it logits / T can overflow fp32
# (1e-45 gave inf - inf = NaN and degenerate text) and sampling is greedy in all but name anyway.
MIN_TEMPERATURE = 1e-3

# --- Guards inside the exported graphs (export/guards.py) --------------------------------------------------
#
# Triton's ONNX Runtime backend runs the step and generation graphs with no Python in front, so the graphs refuse
# bad input themselves: each guarded input's checks end in a Gather that reads out of bounds when the input is
# bad, and that Gather node's NAME is the input's message below. ONNX Runtime's error text quotes it whole:
#
#   [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Gather node.
#   Name:'refused: INPUT_IDS: every id must be in 0..64 and ...' Status Message: indices element out of data bounds
#
# The limits are the python models' (serve.runtime.sequence_state.check_ids, serve.runtime.gen_serving.check_gen_request).
# The checks are per execution: Triton batches several sequences' requests into one, and one bad request fails
# every request of that batch. Clients recognise a refusal by GUARD_PREFIX (+ the input's name). The messages are
# str.format templates, filled with .format(vocab_size=V, last_id=V - 1) (export.guards.guard_messages); they
# contain no apostrophe, since ONNX Runtime quotes the name in '...'.
GUARD_PREFIX = "refused: "
GUARD_BATCH_NOTE = "one bad request fails its whole batch"
GUARD_MESSAGES = {
    INPUT_IDS: (
        f"{GUARD_PREFIX}{INPUT_IDS}: every id must be in 0..{{last_id}} and 1 <= T <= {MAX_T} "
        f"(send ids of the model vocabulary; split longer prompts into chunks; {GUARD_BATCH_NOTE})"
    ),
    NOISE: (
        f"{GUARD_PREFIX}{NOISE}: K = dim 1 must be in 1..{MAX_K} and every value a uniform in the open "
        f"interval (0, 1), never 0, 1, NaN or inf (one row of noise per character to generate; "
        f"{GUARD_BATCH_NOTE})"
    ),
    TEMPERATURE: (
        f"{GUARD_PREFIX}{TEMPERATURE}: must be 0 (greedy) or finite and >= {MIN_TEMPERATURE} (smaller values "
        f"overflow; negative, NaN and inf are refused; {GUARD_BATCH_NOTE})"
    ),
    TOP_K: (
        f"{GUARD_PREFIX}{TOP_K}: must be in 0..{{vocab_size}} (0 keeps every character; "
        f"{GUARD_BATCH_NOTE})"
    ),
}

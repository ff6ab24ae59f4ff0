"""The tensor contract between the exported model, the Triton configs and the client: defined once, here.

`TENSORS` is the table: for each graph (STEP: the per-character model; GEN: server-side generation, K characters
per request), its inputs and outputs in order, each a `Tensor` row with dtype, symbolic dims, the values it may
hold and its meaning. `python -m charrnn.contract` prints it (`describe()`). The dims' symbols:

    B  batch (first everywhere, so Triton's implicit state, whose dims exclude the batch, and batching work)
    T  characters per request, 1..MAX_T (a prompt chunk, or the one last sampled character)
    K  characters generated per request, 1..MAX_K
    V  vocabulary size;  S, L, H  the packed state: S = 2 for LSTM (h, c), 1 for GRU / SimpleRNN; L layers;
       H hidden

The recurrent state is ONE packed tensor (STATE_IN / STATE_OUT): Triton pairs several implicit states by sorted
position, not by name (server issue #8586). Clients never send it (Triton's implicit state or the python models
keep it): `request_inputs(graph)` are the rows a client sends. `Contract` resolves the symbols for one model.

The export (ONNX graphs, Triton configs, TensorRT profile), the python models' input checks and batching,
perf_analyzer's input data, the benchmarks and the client read the table for names, dtypes and shapes. Adding an
input is one row here, plus what only that input knows: its value (client.generate's Chunked.values,
bench.perf_input, export.build_plan's parity feeds), its value check (serve.runtime.gen_serving.VALUE_CHECKS, a
guard in export/guards.py) and the graph that uses it (export/gen_export.py).

The project's own server errors (serve/runtime/) carry a stable code (`ErrorCode`): `server_error` writes
"<CODE>: sequence <id>: <detail>", `error_code` / `error_sequence` read them back; clients classify by code.
Triton's own texts (CAPACITY_MESSAGE, NOT_STARTED_MESSAGE, RESTRICTED_MESSAGE) stay constants: Triton writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

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
# in use would reset its owner's state. The python models refuse it with this message and the code
# ErrorCode.SEQUENCE_ID_IN_USE (serve.runtime.sequence_state);
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


# --- The table -------------------------------------------------------------------------------------------------
STEP, GEN = "step", "gen"  # the two graphs (charrnn.repository's served models each run one)
GRAPHS = (STEP, GEN)
INPUTS, OUTPUTS = "inputs", "outputs"

# The generation graph (export/gen_export.py; models charrnn_gen_*) takes the step graph's INPUT_IDS and STATE_IN
# plus the sampling inputs and returns K sampled ids instead of LOGITS: id_1 follows the last INPUT_IDS; id_K is
# NOT fed back (the next request sends it as its INPUT_IDS, like the per-character client).
NOISE = "NOISE"
TEMPERATURE = "TEMPERATURE"
TOP_K = "TOP_K"
OUTPUT_IDS = "OUTPUT_IDS"
MAX_K = 256  # characters generated per request (also the TensorRT optimization profile)
# Sampling temperature: 0 means greedy (argmax); otherwise at least this. Below it logits / T can overflow fp32
# (1e-45 gave inf - inf = NaN and degenerate text) and sampling is greedy in all but name anyway.
MIN_TEMPERATURE = 1e-3

# The dynamic dims (-1 in a graph or config): symbol -> (min, max). Every other symbol is fixed per model.
DYNAMIC_DIMS = {"B": (1, MAX_BATCH_SIZE), "T": (1, MAX_T), "K": (1, MAX_K)}
# ONNX Runtime's spelling of the dtypes (the python models check their model.onnx with it).
ORT_TYPE = {np.dtype(np.int32): "tensor(int32)", np.dtype(np.float32): "tensor(float)"}


@dataclass(frozen=True)
class Tensor:
    """One row of the contract: a graph input or output."""

    name: str
    dtype: np.dtype
    # symbolic, batch first: "B", "T", "K", "V", "S", "L", "H", or a fixed int
    dims: tuple[str | int, ...]
    values: str  # what a valid value is (the python models and the graph guards refuse the rest)
    meaning: str
    # the recurrent state: kept by the server (implicit state or model.py), never sent
    state: bool = False

    @property
    def triton_dtype(self) -> str:
        """Triton's spelling ("INT32", "FP32"); a config says TYPE_<this>."""
        return TRITON_DTYPE[self.dtype]

    @property
    def ort_type(self) -> str:
        return ORT_TYPE[self.dtype]


_IDS, _FLOAT = np.dtype(IDS_DTYPE), np.dtype(FLOAT_DTYPE)
_STATE_IN = Tensor(
    STATE_IN,
    _FLOAT,
    ("B", "S", "L", "H"),
    "any",
    "the packed recurrent state before this request (zeros at a sequence start)",
    state=True,
)
_STATE_OUT = Tensor(
    STATE_OUT, _FLOAT, ("B", "S", "L", "H"), "", "the state after this request", state=True
)
_INPUT_IDS = Tensor(
    INPUT_IDS,
    _IDS,
    ("B", "T"),
    "0..V-1",
    "a prompt chunk, or the one last sampled character (never fed yet)",
)
TENSORS: dict[str, dict[str, tuple[Tensor, ...]]] = {
    STEP: {
        INPUTS: (_INPUT_IDS, _STATE_IN),
        OUTPUTS: (
            Tensor(LOGITS, _FLOAT, ("B", "V"), "", "next-character logits after the last input"),
            _STATE_OUT,
        ),
    },
    GEN: {
        INPUTS: (
            _INPUT_IDS,
            _STATE_IN,
            Tensor(
                NOISE,
                _FLOAT,
                ("B", "K", "V"),
                "uniforms in the open interval (0, 1)",
                "one row per character to generate (Gumbel-max sampling); K = its dim 1",
            ),
            Tensor(
                TEMPERATURE,
                _FLOAT,
                ("B", 1),
                f"0, or finite and >= {MIN_TEMPERATURE}",
                "> 0 samples; 0 = greedy (argmax of the raw logits)",
            ),
            Tensor(TOP_K, _IDS, ("B", 1), "0..V", "keep the k most likely characters (0 = all)"),
        ),
        OUTPUTS: (
            Tensor(
                OUTPUT_IDS,
                _IDS,
                ("B", "K"),
                "0..V-1",
                "id_1..id_K; id_1 follows the last INPUT_IDS; id_K is NOT fed back",
            ),
            Tensor(
                STATE_OUT,
                _FLOAT,
                ("B", "S", "L", "H"),
                "",
                "the state after INPUT_IDS and id_1..id_{K-1}",
                state=True,
            ),
        ),
    },
}


def tensors(graph: str, kind: str = INPUTS) -> tuple[Tensor, ...]:
    """The rows of one graph's inputs or outputs, in order."""
    if graph not in TENSORS or kind not in (INPUTS, OUTPUTS):
        raise ValueError(
            f"no tensors {graph!r}/{kind!r}: graphs {GRAPHS}, kinds {INPUTS!r}, {OUTPUTS!r}"
        )
    return TENSORS[graph][kind]


def request_inputs(graph: str) -> tuple[Tensor, ...]:
    """What a client sends to a model of `graph`: its inputs without the state (the server keeps it)."""
    return tuple(t for t in tensors(graph, INPUTS) if not t.state)


def response_outputs(graph: str) -> tuple[Tensor, ...]:
    """What a model of `graph` answers: its outputs without the state."""
    return tuple(t for t in tensors(graph, OUTPUTS) if not t.state)


def row(graph: str, name: str) -> Tensor:
    """The row of one input or output of `graph`."""
    for t in tensors(graph, INPUTS) + tensors(graph, OUTPUTS):
        if t.name == name:
            return t
    raise KeyError(f"{graph} graph has no tensor {name!r}")


def describe(graph: str | None = None) -> str:
    """The table as text (one block per graph): what `python -m charrnn.contract` prints."""
    lines = []
    for g in (graph,) if graph else GRAPHS:
        lines.append(f"{g} graph:")
        for kind in (INPUTS, OUTPUTS):
            for t in tensors(g, kind):
                dims = "(" + ", ".join(str(d) for d in t.dims) + ")"
                where = "in " if kind == INPUTS else "out"
                values = f" [{t.values}]" if t.values else ""
                state = " (state: kept by the server)" if t.state else ""
                lines.append(
                    f"  {where} {t.name:<12} {t.triton_dtype:<5} {dims:<14} {t.meaning}{values}{state}"
                )
    return "\n".join(lines)


@dataclass(frozen=True)
class Contract:
    """The table resolved for one model: full shapes with batch, -1 marking a dynamic dim (B, T, K)."""

    cell: str
    layers: int
    hidden: int
    vocab_size: int

    @property
    def state_dims(self) -> tuple[int, int, int]:
        """State dims without the batch dim (what Triton's `state { dims }` wants)."""
        return (state_slots(self.cell), self.layers, self.hidden)

    def dim(self, symbol: str | int) -> int:
        """One symbolic dim's size for this model; -1 for a dynamic one (B, T, K)."""
        if isinstance(symbol, int):
            return symbol
        if symbol in DYNAMIC_DIMS:
            return -1
        fixed = {"V": self.vocab_size, **dict(zip("SLH", self.state_dims))}
        if symbol not in fixed:
            raise ValueError(f"unknown dim symbol {symbol!r}")
        return fixed[symbol]

    def shape(self, t: Tensor) -> tuple[int, ...]:
        """A row's full shape, batch first, -1 for the dynamic dims."""
        return tuple(self.dim(d) for d in t.dims)

    def tensors(
        self, graph: str, kind: str = INPUTS
    ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, full shape with batch, -1 = dynamic) of one graph's inputs or outputs, in order."""
        return {t.name: (t.dtype, self.shape(t)) for t in tensors(graph, kind)}

    def inputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The step graph's inputs."""
        return self.tensors(STEP, INPUTS)

    def outputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return self.tensors(STEP, OUTPUTS)

    def gen_inputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The generation graph's inputs."""
        return self.tensors(GEN, INPUTS)

    def gen_outputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return self.tensors(GEN, OUTPUTS)

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, *self.state_dims), dtype=FLOAT_DTYPE)


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


# --- Error codes of the project's own server errors (serve/runtime/) ---------------------------------------------
#
# The python models answer a refused request with "<CODE>: sequence <id>: <detail>" (server_error): the code is
# stable, for programs (the client classifies by it: error_code); the detail is for people and may change. The
# sequence is named because gRPC stream errors reach clients without a request id (error_sequence reads it back).
# Triton's own texts have no code and are matched as constants: CAPACITY_MESSAGE (at capacity),
# NOT_STARTED_MESSAGE (an implicit-state model does not know the sequence), RESTRICTED_MESSAGE (a header needed).
class ErrorCode(str, Enum):
    # never started, ended, or evicted idle: re-prime it
    UNKNOWN_SEQUENCE = "CHARRNN_UNKNOWN_SEQUENCE"
    # a START under a live id (LIVE_ID_MESSAGE)
    SEQUENCE_ID_IN_USE = "CHARRNN_SEQUENCE_ID_IN_USE"
    # no sequence id: the model is stateful
    SEQUENCE_ID_MISSING = "CHARRNN_SEQUENCE_ID_MISSING"
    # a tensor outside the contract (its name, dtype, shape or values)
    INVALID_INPUT = "CHARRNN_INVALID_INPUT"

    def __str__(self) -> str:
        return self.value


# Triton 2.51's answer (its sequence batcher, for every model) to a request without START of a sequence it does
# not hold.
NOT_STARTED_MESSAGE = "must specify the START flag"
_ERROR_RE = re.compile(r"\b(CHARRNN_[A-Z_]+): (?:sequence (\S+?): )?")


def server_error(code: ErrorCode, detail: str, sequence=None) -> str:
    """The text of one of our server errors: "<CODE>: sequence <id>: <detail>" (without a sequence:
    "<CODE>: <detail>")."""
    named = f"sequence {sequence}: " if sequence is not None else ""
    return f"{ErrorCode(code).value}: {named}{detail}"


def error_code(text: str) -> ErrorCode | None:
    """The code of one of our server errors anywhere in `text` (a client library may wrap it); None if none."""
    m = _ERROR_RE.search(text)
    if m is None:
        return None
    try:
        return ErrorCode(m.group(1))
    except ValueError:  # a code of a newer server: treat it as none
        return None


def error_sequence(text: str) -> str | None:
    """The sequence id one of our server errors names (as text), or None."""
    m = _ERROR_RE.search(text)
    return m.group(2) if m else None


if __name__ == "__main__":
    print(describe())

"""Triton model configs, generated from charrnn.contract and charrnn.repository's table of served models (never
hand-synced), and checked against the ONNX graph.

Each model's inputs and outputs are its graph's rows of charrnn.contract's table (charrnn.contract.request_inputs /
response_outputs: the step models' and the generation models' tensors, without the state); all take sequence
id/start/end.
TensorRT and ONNX Runtime models get Triton's implicit state; the python-backend models keep each sequence's
state in model.py (model_repository/charrnn_python/1/model.py, serve/runtime/gen_model.py).

    python -m export.configs charrnn_onnx     # print one config for a quick look
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.text_encoding import CEscape

from charrnn.cli import parser
from charrnn.contract import (
    DYNAMIC_DIMS,
    GEN,
    INPUTS,
    MAX_BATCH_SIZE,
    MAX_SEQUENCE_IDLE_US,
    MAX_SEQUENCES,
    OUTPUTS,
    TRITON_DTYPE,
    VOCAB_PARAMETER,
    Contract,
    Tensor,
    request_inputs,
    response_outputs,
    tensors,
)
from charrnn.errors import UserError, cli
from charrnn.repository import (
    BY_NAME,
    CONFIG,
    CPU_CONFIG_NAME,
    GEN_MODELS,
    ONNX,
    ORT_MODELS,
    PYTHON_MODELS,
    SERVED_MODELS,
    parse_config,
)
from charrnn.vocab import Vocab

# Batcher settings shared by every model (docs/model.md): `oldest` batches across sequences,
# one request per sequence per batch, only requests of equal T together.
MAX_QUEUE_DELAY_US = 100  # wait at most this long to grow a batch
PYTHON_INSTANCES = 1


def _request_shape(t: Tensor, contract: Contract) -> str:
    """A row's shape in one request (batch 1), dynamic dims by symbol with their range: "(1, K, 65), 1 <= K <= 256"."""
    dims = [
        "1" if d == "B" else str(d) if d in DYNAMIC_DIMS else str(contract.dim(d)) for d in t.dims
    ]
    ranges = [
        f"{DYNAMIC_DIMS[d][0]} <= {d} <= {DYNAMIC_DIMS[d][1]}"
        for d in t.dims[1:]
        if d in DYNAMIC_DIMS
    ]
    return f"({', '.join(dims)})" + "".join(f", {r}" for r in ranges)


def _tensor_list(key: str, rows: tuple[Tensor, ...], contract: Contract) -> str:
    """`input [ ... ]` / `output [ ... ]` of a config: the table's rows, dims without the batch dim."""
    items = [
        f'{{ name: "{t.name}"  data_type: TYPE_{t.triton_dtype}  '
        f"dims: [ {', '.join(str(d) for d in contract.shape(t)[1:])} ] }}"
        for t in rows
    ]
    if len(items) == 1:
        return f"{key} [ {items[0]} ]"
    return f"{key} [\n" + ",\n".join(f"  {i}" for i in items) + "\n]"


def _io_text(name: str, contract: Contract) -> str:
    """The input/output section (and its comment) of a config: charrnn.contract's table for the model's graph,
    without the state (Triton's implicit state, or model.py, keeps it)."""
    graph = BY_NAME[name].graph
    ins, outs = request_inputs(graph), response_outputs(graph)
    lines = [
        f"#   {t.name:<11} {t.triton_dtype} {_request_shape(t, contract)}: {t.meaning}"
        + (f"; {t.values}" if t.values else "")
        for t in ins + outs
    ]
    if graph == GEN:
        head = "# Server-side generation: clients send characters and the sampling inputs, the server samples K characters"
    else:
        head = "# Clients send only characters, one request per character or prompt chunk"
    head += f" (V = {contract.vocab_size}; charrnn/contract.py's table):"
    if BY_NAME[name].decoupled:
        lines.append(
            "# Decoupled: K responses per request, each OUTPUT_IDS (1, 1) = the next character, sent as soon as\n"
            "# it is generated; the K-th is flagged final. Needs gRPC streaming (HTTP takes one response)."
        )
    elif graph == GEN:
        lines.append("# OUTPUT_IDS (1, K): the K sampled ids, in one response.")
    return "\n".join(
        [head, *lines, _tensor_list("input", ins, contract), _tensor_list("output", outs, contract)]
    )


def render_config(
    name: str,
    contract: Contract,
    vocab: Vocab,
    idle_us: int = MAX_SEQUENCE_IDLE_US,
    cpu: bool = False,
) -> str:
    """config.pbtxt text for one of the served models, spelled out with comments; with `cpu`, its
    configs/cpu.pbtxt (an ONNX Runtime model on our CPU servers: KIND_CPU and the thread count)."""
    if name not in BY_NAME:
        raise ValueError(f"unknown model {name!r}")
    if cpu and name not in ORT_MODELS:
        raise ValueError(f"{name!r} has no CPU config (only {', '.join(ORT_MODELS)})")
    if len(vocab) != contract.vocab_size:
        raise UserError(
            "vocabulary",
            f"has {len(vocab)} characters, the model {contract.vocab_size}",
            "export with the model's own vocab.json",
        )
    served = BY_NAME[name]
    platform, kind, what = served.platform, served.kind, served.about
    if cpu:
        kind = "KIND_CPU"
        what = what.split(";")[0] + (
            f"; its CPU config (configs/{CPU_CONFIG_NAME}.pbtxt), which servers started with\n"
            f"# --model-config-name={CPU_CONFIG_NAME} load instead of config.pbtxt: our CPU servers (the local "
            "launcher, the slim\n# and scale images). KIND_CPU: a CPU-only build of the backend refuses "
            "KIND_GPU, which KIND_AUTO becomes on a GPU host"
        )
    graph = BY_NAME[name].graph
    (state_in,) = (t for t in tensors(graph, INPUTS) if t.state)  # the table's state rows
    (state_out,) = (t for t in tensors(graph, OUTPUTS) if t.state)
    state_t = state_in.triton_dtype
    dims = ", ".join(str(d) for d in contract.shape(state_in)[1:])
    state = ""
    if BY_NAME[name].implicit_state:
        state = f"""
  # Implicit state: Triton keeps each sequence's packed state (S={contract.state_dims[0]}, layers, hidden;
  # dims exclude the batch dim) and feeds STATE_OUT of one request back as STATE_IN of the next.
  # zero_data re-initializes it on every sequence_start. ONE packed tensor, not separate h/c:
  # Triton pairs several states by sorted position, not name (server issue #8586).
  state [
    {{
      input_name: "{state_in.name}"
      output_name: "{state_out.name}"
      data_type: TYPE_{state_t}
      dims: [ {dims} ]
      initial_state: {{ data_type: TYPE_{state_t}  dims: [ {dims} ]  zero_data: true  name: "zeros" }}
    }}
  ]"""
    params = {VOCAB_PARAMETER: vocab.to_json()}
    if name in PYTHON_MODELS:
        params["intra_op_threads"] = str(served.threads)  # ONNX Runtime threads per instance
    if cpu:  # the ONNX Runtime backend's own parameter
        params["intra_op_thread_count"] = str(served.threads)
    param_text = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{CEscape(v, as_utf8=True)}" }} }}'
        for k, v in params.items()
    )
    equal = "T and K" if name in GEN_MODELS else "T"
    policy = "\nmodel_transaction_policy { decoupled: true }\n" if BY_NAME[name].decoupled else ""
    return f"""# Generated by `make export` (export/configs.py) from charrnn/contract.py -- do not edit by hand.
# {name}: {what}.
name: "{name}"
{platform}
max_batch_size: {MAX_BATCH_SIZE}
{policy}
{_io_text(name, contract)}

sequence_batching {{
  # A sequence idle this long is freed (Triton's default, 1 s, is far too short for interactive use).
  max_sequence_idle_microseconds: {idle_us}
  # oldest: batch the oldest requests of up to max_batch_size sequences per execution;
  # never two requests of one sequence in a batch; only requests with equal {equal} are batched together.
  oldest {{
    # Sequence slots, far more than the batch: a new sequence never waits behind busy ones (contract.py).
    max_candidate_sequences: {MAX_SEQUENCES}
    preferred_batch_size: [ {MAX_BATCH_SIZE} ]
    max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
  }}{state}
}}

instance_group [ {{ count: {PYTHON_INSTANCES if name in PYTHON_MODELS else 1}  kind: {kind} }} ]

# The vocabulary travels with the model: clients read it with get_model_config.
{param_text}
"""


def onnx_io(model_proto) -> dict[str, tuple[str, tuple]]:
    """name -> (Triton dtype, shape with -1 for dynamic dims) of an ONNX graph's inputs and outputs."""
    import onnx

    out = {}
    for vi in list(model_proto.graph.input) + list(model_proto.graph.output):
        t = vi.type.tensor_type
        dtype = TRITON_DTYPE.get(
            onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), f"ONNX:{t.elem_type}"
        )
        out[vi.name] = (
            dtype,
            tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim),
        )
    return out


def check_config_against_onnx(config, model_proto) -> list[str]:
    """Cross-check a parsed config's inputs/outputs/state with the ONNX graph; returns problems (empty = ok)."""
    from tritonclient.grpc import model_config_pb2

    io = onnx_io(model_proto)
    problems = []
    batch = (-1,) if config.max_batch_size > 0 else ()

    def expect(name, dtype_enum, dims, where):
        want_dtype = model_config_pb2.DataType.Name(dtype_enum).removeprefix("TYPE_")
        want_shape = batch + tuple(dims)
        if name not in io:
            problems.append(f"{where} {name!r} is not in the ONNX graph (graph has {sorted(io)})")
            return
        got_dtype, got_shape = io[name]
        if got_dtype != want_dtype:
            problems.append(f"{where} {name!r}: config dtype {want_dtype}, ONNX {got_dtype}")
        if got_shape != want_shape:
            problems.append(f"{where} {name!r}: config shape {want_shape}, ONNX {got_shape}")

    for t in config.input:
        expect(t.name, t.data_type, t.dims, "input")
    for t in config.output:
        expect(t.name, t.data_type, t.dims, "output")
    for s in config.sequence_batching.state:
        expect(s.input_name, s.data_type, s.dims, "state input")
        expect(s.output_name, s.data_type, s.dims, "state output")
        for init in s.initial_state:
            if tuple(init.dims) != tuple(s.dims) or init.data_type != s.data_type:
                problems.append(
                    f"initial_state of {s.input_name!r} does not match the state's dtype/dims"
                )
    declared = {t.name for t in config.input} | {
        s.input_name for s in config.sequence_batching.state
    }
    graph_inputs = {vi.name for vi in model_proto.graph.input}
    if config.platform == "onnxruntime_onnx" and declared != graph_inputs:
        problems.append(
            f"ONNX Runtime needs config inputs + states == graph inputs: {sorted(declared)} vs "
            f"{sorted(graph_inputs)}"
        )
    return problems


def write_repository(
    repo: str | Path, contract: Contract, vocab: Vocab, idle_us: int = MAX_SEQUENCE_IDLE_US
) -> list[Path]:
    """Write config.pbtxt for every model under `repo`, and configs/cpu.pbtxt for those that have one (sequences
    idle `idle_us` are freed); returns the paths."""
    repo = Path(repo)
    written = []
    for name in SERVED_MODELS:
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        files = {CONFIG: False}
        if BY_NAME[name].cpu_config:
            files[BY_NAME[name].cpu_config] = True
        for relative, cpu in files.items():
            path = repo / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            text = render_config(name, contract, vocab, idle_us, cpu=cpu)
            parse_config(text)  # never write a config Triton would reject
            path.write_text(text)
            written.append(path)
    return written


def describe(config) -> str:
    """One line per tensor, for reports."""
    rows = [
        f"{t.name} {t.data_type} {list(t.dims)}" for t in list(config.input) + list(config.output)
    ]
    return "; ".join(rows) + "".join(
        f"; state {s.input_name}->{s.output_name} {list(s.dims)}"
        for s in config.sequence_batching.state
    )


@cli
def main(argv: list[str] | None = None) -> int:
    """Print one model's config for a quick look (a 2 x 512 LSTM over 65 characters)."""
    p = parser("python -m export.configs", __doc__)
    p.add_argument(
        "--cpu",
        action="store_true",
        help=f"print its CPU config (configs/{CPU_CONFIG_NAME}.pbtxt; ONNX Runtime models only)",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=ONNX,
        choices=SERVED_MODELS,
        metavar="MODEL",
        help=f"served model whose config to print: {', '.join(SERVED_MODELS)}",
    )
    args = p.parse_args(argv)
    c = Contract("lstm", 2, 512, 65)
    print(render_config(args.model, c, Vocab([chr(i) for i in range(32, 97)]), cpu=args.cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

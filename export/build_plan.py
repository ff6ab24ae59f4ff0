"""`make plan`: ONNX -> TensorRT plan for charrnn_trt, with the TensorRT Python API.

Run it where TensorRT is installed, i.e. NVIDIA's TensorRT container of the SAME release as the Triton
image (a plan only loads in the TensorRT version that built it):

    docker compose --profile export run --rm export-trt        # what `make plan` does
    python -m export.build_plan --onnx model_repository/charrnn_onnx/1/model.onnx \
        --out model_repository/charrnn_trt/1/model.plan [--fp16] [--max-batch 64] [--max-t 256]

Equivalent trtexec line (batch 1..64, T 1..256 with opt T=1: generation is one character per request):

    trtexec --onnx=model.onnx --saveEngine=model.plan --memPoolSize=workspace:2048M \
      --minShapes=INPUT_IDS:1x1,STATE_IN:1x2x2x512 \
      --optShapes=INPUT_IDS:64x1,STATE_IN:64x2x2x512 \
      --maxShapes=INPUT_IDS:64x256,STATE_IN:64x2x2x512   [--fp16]

The generation graph (charrnn_gen_trt; export/gen_export.py) is built the same way; every input of the graph's
rows in charrnn.contract's table gets a profile entry (its dims' symbols: B 1..64, T 1..256 opt 1, K 1..MAX_K opt
32; so NOISE 1..64 x 1..MAX_K x V, TEMPERATURE and TOP_K 1..64 x 1):

    python -m export.build_plan --onnx model_repository/charrnn_gen_onnx/1/model.onnx \
        --out model_repository/charrnn_gen_trt/1/model.plan

Every input, including STATE_IN, gets a profile entry: Triton validates [max_batch_size] + state dims
against the engine's profile. When onnxruntime is importable the plan is also checked against ONNX
Runtime on random batches. Exit codes: 0 ok, 1 parity failed, 2 bad input, 3 TensorRT not available.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from charrnn.cli import parser
from charrnn.contract import (
    GEN,
    INPUT_IDS,
    INPUTS,
    LOGITS,
    MAX_BATCH_SIZE,
    MAX_K,
    MAX_T,
    NOISE,
    OUTPUT_IDS,
    STATE_IN,
    STATE_OUT,
    STEP,
    TEMPERATURE,
    TOP_K,
    tensors,
)
from charrnn.errors import CheckFailed, UnavailableError, UserError, cli

NO_TENSORRT = (
    "build the plan in NVIDIA's TensorRT container of the same release as the Triton image: "
    "`make plan` (= docker compose --profile export run --rm export-trt) on a GPU host; "
    "TensorRT cannot be pip-installed on CPU machines"
)


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise UnavailableError(
            "tensorrt", f"the TensorRT Python API is not importable ({e})", NO_TENSORRT
        ) from e
    # the registry's tensorrt stubs install a package without the builder
    if not hasattr(trt, "Builder"):
        raise UnavailableError(
            "tensorrt", "this 'tensorrt' package is a stub without the builder", NO_TENSORRT
        )
    return trt


def profile_shapes(
    state_dims: tuple[int, ...],
    max_batch: int,
    max_t: int,
    gen_vocab: int | None = None,
    max_k: int = MAX_K,
) -> dict[str, tuple[tuple, tuple, tuple]]:
    """name -> (min, opt, max) shapes of the optimization profile: every input of the graph's rows in
    charrnn.contract's table (gen_vocab: the generation graph's V; None: the step graph). The dynamic dims run
    B 1..max_batch (opt max_batch), T 1..max_t (opt 1: one character per request), K 1..max_k (opt 32).
    """
    graph = STEP if gen_vocab is None else GEN
    fixed = {"V": gen_vocab, **dict(zip("SLH", state_dims))}
    bounds = {"B": (1, max_batch, max_batch), "T": (1, 1, max_t), "K": (1, min(32, max_k), max_k)}

    def size(d, which: int) -> int:
        return bounds[d][which] if d in bounds else fixed[d] if isinstance(d, str) else d

    return {
        t.name: tuple(tuple(size(d, which) for d in t.dims) for which in range(3))
        for t in tensors(graph, INPUTS)
    }


def build_plan(
    onnx_path: Path, out: Path, max_batch: int, max_t: int, fp16: bool, workspace_mib: int
) -> bytes:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TRT 8.x; implicit in TRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(
            str(onnx_path), f"TensorRT's ONNX parser failed: {errors}", "check `make export` output"
        )
    inputs = {
        network.get_input(i).name: tuple(network.get_input(i).shape)
        for i in range(network.num_inputs)
    }
    state_dims = inputs[STATE_IN][1:]
    gen_vocab = inputs[NOISE][2] if NOISE in inputs else None  # the generation graph
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise UserError(
                "--fp16", "this TensorRT has no FP16 builder flag (TensorRT 11 wants an FP16 ONNX)"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(
        tuple(state_dims), max_batch, max_t, gen_vocab
    ).items():
        profile.set_shape(name, lo, opt, hi)
        print(f"  profile {name}: min {lo} opt {opt} max {hi}")
    config.add_optimization_profile(profile)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CheckFailed(
            str(out), "TensorRT failed to build the engine", "see the TensorRT log above"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(plan))
    print(
        f"  built {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s with TensorRT "
        f"{trt.__version__}"
    )
    return bytes(plan)


def trt_run(trt, engine, context, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference with device buffers from cuda-python (`cuda.cudart`, shipped in the TensorRT container)."""
    from cuda import cudart

    def ok(ret):
        err, *rest = ret if isinstance(ret, tuple) else (ret,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if rest else None

    for name, arr in feeds.items():
        context.set_input_shape(name, arr.shape)
    buffers, outputs = [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name in feeds:
            host = np.ascontiguousarray(feeds[name])
        else:
            host = np.empty(
                tuple(context.get_tensor_shape(name)), trt.nptype(engine.get_tensor_dtype(name))
            )
            outputs[name] = host
        dev = ok(cudart.cudaMalloc(host.nbytes))
        buffers.append(dev)
        if name in feeds:
            ok(
                cudart.cudaMemcpy(
                    dev, host.ctypes.data, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                )
            )
        context.set_tensor_address(name, dev)
        if name in outputs:
            outputs[name] = (host, dev)
    stream = ok(cudart.cudaStreamCreate())
    context.execute_async_v3(stream)
    ok(cudart.cudaStreamSynchronize(stream))
    result = {}
    for name, (host, dev) in outputs.items():
        ok(
            cudart.cudaMemcpy(
                host.ctypes.data, dev, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            )
        )
        result[name] = host
    for dev in buffers:
        cudart.cudaFree(dev)
    cudart.cudaStreamDestroy(stream)
    return result


def check_parity(
    plan: bytes, onnx_path: Path, batches=(1, 8, MAX_BATCH_SIZE), lengths=(1, 17)
) -> float:
    """TensorRT vs ONNX Runtime on random ids and states; returns max |delta| over LOGITS and STATE_OUT."""
    from charrnn.onnx_runtime import ort_session

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    session = ort_session(onnx_path)
    shapes = {i.name: i.shape for i in session.get_inputs() + session.get_outputs()}
    state_dims = shapes[STATE_IN][1:]
    rng = np.random.default_rng(0)
    if NOISE in shapes:
        return _check_gen_parity(
            trt, engine, context, session, state_dims, shapes[NOISE][2], rng, batches
        )
    vocab = shapes[LOGITS][1]
    worst = 0.0
    for b in batches:
        for t in lengths:
            feeds = {
                INPUT_IDS: rng.integers(0, vocab, (b, t), dtype=np.int32),
                STATE_IN: (0.5 * rng.standard_normal((b, *state_dims))).astype(np.float32),
            }
            want = dict(zip((LOGITS, STATE_OUT), session.run([LOGITS, STATE_OUT], feeds)))
            got = trt_run(trt, engine, context, feeds)
            worst = max(worst, *(float(np.abs(want[k] - got[k]).max()) for k in want))
    return worst


def _check_gen_parity(
    trt, engine, context, session, state_dims, vocab, rng, batches, ks=(1, 16)
) -> float:
    """Generation graph: OUTPUT_IDS must match ONNX Runtime (a near-tie may flip one id: at most 1% of rows
    may differ); returns max |delta| of STATE_OUT over the rows whose ids match."""
    worst, rows, differing = 0.0, 0, 0
    for b in batches:
        for k in ks:
            feeds = {
                INPUT_IDS: rng.integers(0, vocab, (b, 5), dtype=np.int32),
                STATE_IN: (0.5 * rng.standard_normal((b, *state_dims))).astype(np.float32),
                NOISE: np.maximum(rng.random((b, k, vocab), dtype=np.float32), np.float32(1e-7)),
                TEMPERATURE: rng.choice(np.float32([0.0, 0.8, 1.0]), (b, 1)).astype(np.float32),
                TOP_K: rng.choice(np.int32([0, 1, 5, vocab]), (b, 1)).astype(np.int32),
            }
            want = dict(zip((OUTPUT_IDS, STATE_OUT), session.run([OUTPUT_IDS, STATE_OUT], feeds)))
            got = trt_run(trt, engine, context, feeds)
            same = (want[OUTPUT_IDS] == got[OUTPUT_IDS]).all(axis=1)
            rows, differing = rows + b, differing + int((~same).sum())
            if same.any():
                worst = max(
                    worst, float(np.abs(want[STATE_OUT][same] - got[STATE_OUT][same]).max())
                )
    if differing > 0.01 * rows:
        raise CheckFailed(
            "generation plan",
            f"OUTPUT_IDS differ from ONNX Runtime in {differing} of {rows} rows",
            "rebuild without --fp16 or report it",
        )
    return worst


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m export.build_plan", __doc__)
    p.add_argument(
        "--onnx", default="model_repository/charrnn_onnx/1/model.onnx", help="exported ONNX model"
    )
    p.add_argument(
        "--out", default="model_repository/charrnn_trt/1/model.plan", help="plan to write"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH_SIZE,
        help="profile max batch (>= config max_batch_size)",
    )
    p.add_argument("--max-t", type=int, default=MAX_T, help="profile max characters per request")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="allow FP16 kernels (check parity with a looser tolerance)",
    )
    p.add_argument("--workspace-mib", type=int, default=2048, help="builder workspace limit")
    p.add_argument(
        "--tolerance", type=float, default=None, help="parity tolerance (1e-3, or 5e-2 with --fp16)"
    )
    args = p.parse_args(argv)
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise UserError(str(onnx_path), "ONNX model not found", "run `make export` first")
    if args.max_batch < 1 or args.max_t < 1:
        raise UserError("--max-batch/--max-t", "must be >= 1")
    import_tensorrt()  # fail fast, before any work, with the container instructions
    print(f"building TensorRT plan from {onnx_path}")
    plan = build_plan(
        onnx_path, Path(args.out), args.max_batch, args.max_t, args.fp16, args.workspace_mib
    )
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("  onnxruntime not importable: skipped the TensorRT-vs-ONNX parity check")
        return 0
    tolerance = args.tolerance or (5e-2 if args.fp16 else 1e-3)
    delta = check_parity(plan, onnx_path)
    print(
        f"  parity TensorRT vs ONNX Runtime: max |delta| = {delta:.2e} (tolerance {tolerance:.0e})"
    )
    if delta > tolerance:
        raise CheckFailed(
            str(args.out),
            f"TensorRT output differs from ONNX Runtime by {delta:.2e}",
            "rebuild without --fp16 or report it",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make export`: model directory -> ONNX -> TensorRT readiness check -> Triton model repository.

    python -m export --model-dir models/shakespeare-lstm-2x512 --repo model_repository

Writes <repo>/charrnn_onnx/1/model.onnx (copied into every other step model ONNX Runtime runs), the generation graph
<repo>/charrnn_gen_onnx/1/model.onnx (copied likewise into the other generation models; see
export/gen_export.py) and every config.pbtxt. The TensorRT plans (<repo>/charrnn_trt/1/model.plan,
<repo>/charrnn_gen_trt/1/model.plan) need NVIDIA's TensorRT container: `make plan`.
Exit codes: 0 ok, 1 the TensorRT readiness check failed, 2 bad model directory.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from charrnn.cli import add_model_dir, parser
from charrnn.contract import MAX_SEQUENCE_IDLE_US
from charrnn.errors import CheckFailed, UserError, cli
from charrnn.repository import (
    BY_NAME,
    GEN,
    GEN_MODELS,
    GEN_ONNX,
    GEN_TRT,
    MODELS,
    ONNX,
    PYTHON,
    PYTHON_BACKEND,
    STEP,
    TENSORRT,
    TRT,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
# holds the python models' model.py files (exports elsewhere copy them)
COMMITTED_REPO = ROOT / "model_repository"


def place(onnx_path: Path, repo: Path, graph: str) -> None:
    """Copy a graph into every other served model that runs it with ONNX Runtime (the ONNX Runtime backend's
    and the python backend's rows of its graph), the python models with their committed model.py."""
    for served in MODELS:
        folder = repo / served.name / "1"
        if served.graph != graph or served.backend == TENSORRT:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / served.artifact).resolve() != onnx_path.resolve():
            shutil.copyfile(onnx_path, folder / served.artifact)
        source = COMMITTED_REPO / served.name / "1" / "model.py"
        if served.backend == PYTHON_BACKEND and (folder / "model.py").resolve() != source.resolve():
            shutil.copyfile(source, folder / "model.py")  # exporting to another repository


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m export", __doc__)
    add_model_dir(p, help="model directory (make train)")
    p.add_argument("--repo", default="model_repository", help="Triton model repository to write")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=MAX_SEQUENCE_IDLE_US / 1e6,
        metavar="SECONDS",
        help="free a sequence idle this long (the sequence batcher's max_sequence_idle_microseconds)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.idle_timeout <= 86_400:
        raise UserError(
            "--idle-timeout",
            f"must be in 1..86400 seconds, got {args.idle_timeout}",
            "a person at a keyboard needs tens of seconds; Triton's own default is 1 s",
        )

    from charrnn.model import load_model_dir, use_cpu_only

    from . import configs
    from .gen_export import export_gen_onnx
    from .onnx_export import export_onnx
    from .trt_check import check_model

    t0 = time.time()
    use_cpu_only()  # a visible GPU makes Keras emit CudnnRNNV3, which tf2onnx cannot convert
    print(f"[1/4] loading {args.model_dir}")
    net, vocab, _ = load_model_dir(args.model_dir)
    repo = Path(args.repo)
    onnx_path = repo / ONNX / "1" / BY_NAME[ONNX].artifact
    print(f"[2/4] TF -> ONNX (tf2onnx): {onnx_path}")
    proto = export_onnx(net, onnx_path)
    place(onnx_path, repo, STEP)
    gen_onnx = repo / GEN_ONNX / "1" / BY_NAME[GEN_ONNX].artifact
    print(f"      generation graph (K characters per call): {gen_onnx}")
    gen_proto = export_gen_onnx(net, gen_onnx)
    place(gen_onnx, repo, GEN)

    print("[3/4] TensorRT readiness (static)")
    report = check_model(proto)
    print("      " + report.text().replace("\n", "\n      "))
    if not report.ready:
        raise CheckFailed(
            str(onnx_path), "the graph is not TensorRT-ready", "see the problems above"
        )
    gen_report = check_model(gen_proto)
    print("      generation graph: " + gen_report.text().replace("\n", "\n      "))
    if not gen_report.ready:
        raise CheckFailed(
            str(repo / GEN_ONNX),
            "the generation graph is not TensorRT-ready",
            "see the problems above",
        )

    print(f"[4/4] Triton configs in {repo}/")
    contract = net.config.contract
    for path in configs.write_repository(repo, contract, vocab, int(args.idle_timeout * 1e6)):
        config = load_config(path)
        if config.name != PYTHON:
            graph = gen_proto if config.name in GEN_MODELS else proto
            problems = configs.check_config_against_onnx(config, graph)
            if problems:
                raise CheckFailed(str(path), "; ".join(problems), "fix export/configs.py")
        print(f"      {path}  ({configs.describe(config)})")
    print(
        f"done in {time.time() - t0:.1f} s. Next: `make verify` (ONNX vs TF parity); "
        f"`make plan` builds {repo}/{TRT}/1/model.plan and {repo}/{GEN_TRT}/1/model.plan in "
        "NVIDIA's TensorRT container."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

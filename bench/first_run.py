"""What `make demo` costs on first run: time per step and disk, from a fresh clone with a cold pip cache.

    python -m bench.first_run                 # -> bench/results/first_run.json and first_run.md
    python -m bench.first_run --keep DIR      # clone into DIR and leave it there (default: a temporary dir)

Clones the committed state of this checkout (`git clone`, so nothing uncommitted or ignored comes along), puts
../shared beside the clone when this checkout has one (as CI does), and runs the steps `make demo` runs, each
timed: `make setup` (the venv; pip downloads everything, its cache disabled), `make export`, `make backend`
(Triton's ONNX Runtime backend from source), then `make demo` itself (start the server, generate, stop). Then
it measures the clone's disk use by folder. Every step's output goes to <clone>/first_run.log; a line per step
is printed as it ends. README.md quotes the results.
Exit codes: 0 ok, 1 a step failed (its log tail is printed), 2 bad input, 3 git or make is missing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from charrnn.cli import parser
from charrnn.errors import CheckFailed, UnavailableError, cli

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STEPS = ("setup", "export", "backend", "demo")  # make targets, in the order `make demo` needs them


def du(path: Path) -> int:
    """Bytes under path (files only, symlinks not followed)."""
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    os_release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": os_release.get("PRETTY_NAME", "").strip('"'),
        "python": platform.python_version(),
    }


def run_step(clone: Path, target: str, log) -> float:
    t0 = time.monotonic()
    log.write(f"\n===== make {target} =====\n")
    log.flush()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PIP_NO_CACHE_DIR"] = "1"  # a first run downloads everything
    p = subprocess.run(["make", target], cwd=clone, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        log.flush()
        tail = "\n".join(Path(log.name).read_text().splitlines()[-30:])
        raise CheckFailed(
            f"make {target}", f"exited with {p.returncode} after {seconds:.0f} s", tail
        )
    return seconds


def report(result: dict) -> str:
    m, s, d = result["machine"], result["seconds"], result["disk_mib"]
    lines = [
        "# `make demo` on first run",
        "",
        f"Measured by `python -m bench.first_run` on {result['date']}: {m['cpu']}, {m['cores']} cores, "
        f"{m['os']}, Python {m['python']}; a fresh clone, pip's cache disabled (every package downloaded).",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| `make {k}` | {v:.0f} |" for k, v in s.items()],
        f"| **total** | **{sum(s.values()):.0f}** |",
        "",
        "| disk of the clone | MiB |",
        "|---|---:|",
        *[f"| `{k}` | {v:.0f} |" for k, v in d.items()],
        "",
    ]
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.first_run", __doc__)
    p.add_argument("--keep", metavar="DIR", help="clone into DIR (must not exist) and keep it")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    for tool in ("git", "make"):
        if shutil.which(tool) is None:
            raise UnavailableError(tool, "not found", f"install {tool}")
    parent = Path(args.keep).absolute().parent if args.keep else Path(tempfile.mkdtemp())
    clone = Path(args.keep).absolute() if args.keep else parent / ROOT.name
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shared = ROOT.parent / "shared"
    if shared.is_dir() and not (parent / "shared").exists():
        (parent / "shared").symlink_to(shared)
    seconds = {}
    try:
        with open(clone / "first_run.log", "w") as log:
            for target in STEPS:
                seconds[target] = run_step(clone, target, log)
                print(f"make {target}: {seconds[target]:.0f} s", flush=True)
        folders = [".venv", "build", "model_repository", "data", "models", "logs"]
        disk = {f: du(clone / f) / 2**20 for f in folders}
        disk["total"] = du(clone) / 2**20
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "seconds": seconds,
            "disk_mib": disk,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "first_run.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "first_run.md").write_text(report(result))
        print(report(result))
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make soak`: many concurrent sequences through the local Triton for a while: no errors, no memory growth.

    python -m bench.soak                                   # 64 sequences x 2,000 characters, one gRPC stream
    python -m bench.soak --sequences 8 --length 500        # a quick one

Starts the local Triton server (charrnn_python, free loopback ports), runs a warm-up round with the same
concurrency, then measures the server's resident memory (RSS summed over tritonserver and its python
backend stubs: every process in its process group, from /proc), runs the soak through the client library
(client.generate: one gRPC stream, one request per character per sequence, every sequence ended with END),
and measures it again. Passes when there were 0 errors (client and server statistics) and the RSS after is
within --rss-bound-mib of the RSS before. Prints chars/s, duration, latency and the RSS figures, and writes
them as a markdown table to bench/results/soak.md (--out; by default only for the project's own repository, so
runs against another export, like the test's, write nothing there).
Exit codes: 0 ok, 1 errors or memory growth beyond the bound, 2 bad input, 3 the server did not start.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import psutil

from charrnn.cli import parser
from charrnn.errors import CheckFailed, UserError, cli
from charrnn.repository import PYTHON

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = PYTHON
PROMPTS = (
    "ROMEO:\n",
    "JULIET:\n",
    "First Citizen:\n",
    "KING HENRY VI:\n",
    "HAMLET:\n",
    "MENENIUS:\n",
    "LADY MACBETH:\n",
    "GLOUCESTER:\n",
)


def group_rss(pgid: int) -> dict[int, int]:
    """pid -> resident bytes (RSS, VmRSS) of every process in process group `pgid`."""
    out = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                out[proc.pid] = proc.memory_info().rss
        except (OSError, psutil.Error):
            continue  # the process went away meanwhile (a zombie has no memory to read)
    return out


def failure_count(server) -> int:
    """Failed inference requests the server counted for the model."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("inference_stats", {}).get("fail", {}).get("count", 0))


def run_round(server, sequences: int, length: int, seed: int) -> dict:
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import complete

    conn = Connection(server.grpc_url, "grpc")
    try:
        vocab = conn.vocabulary(conn.pick_model(MODEL))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sequences)]
        params = [SamplingParams(temperature=1.0, seed=seed + i) for i in range(sequences)]
        t0 = time.perf_counter()
        seqs = complete(conn, MODEL, vocab, prompts, length, params)
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    latencies = sorted(x for s in seqs for x in s.latencies)
    chars = sum(len(s.generated) for s in seqs)
    if chars != sequences * length:
        raise CheckFailed("soak", f"generated {chars} characters, expected {sequences * length}")
    return {
        "seconds": seconds,
        "chars": chars,
        "requests": len(latencies),
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def crashed(server) -> str:
    """' (the server crashed: ...)' when its process is gone, else ''."""
    if server.process is None or server.process.poll() is None:
        return ""
    code = server.process.returncode
    signal_line = next(
        (line for line in server.log_tail(60).splitlines() if line.startswith("Signal (")), ""
    )
    return f"; the server died ({signal_line.rstrip('.') or f'exit code {code}'})"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary_md(
    args, soak: dict | None, errors: int, rss0: int, rss1: int, processes: int, problems: list[str]
) -> str:
    """The run as markdown: what bench/results/soak.md holds."""
    from bench.bench import machine

    m = machine()
    if soak:
        cells = [
            f"{soak['chars']:,}",
            f"{soak['seconds']:.1f}",
            f"{soak['chars'] / soak['seconds']:,.0f}",
            f"{soak['requests'] / soak['seconds']:,.0f}",
            f"{soak['p50_ms']:.1f} / {soak['p99_ms']:.1f}",
        ]
    else:
        cells = ["-"] * 5
    result = "ok" if not problems else "FAILED: " + "; ".join(problems)
    return "\n".join(
        [
            f"Measured by `python -m bench.soak --sequences {args.sequences} --length {args.length}` on {m['cores']} cores "
            f"({m['cpu']}), {m['memory']}, no GPU, Python {m['python']}, {time.strftime('%Y-%m-%d')}; {MODEL} on the "
            f"local Triton, one gRPC stream, client and server on the same machine. Server RSS: {processes} processes "
            f"(tritonserver + python stubs), bound +-{args.rss_bound_mib:g} MiB.",
            "",
            "| sequences | characters | seconds | chars/s | requests/s | request p50 / p99 (ms) | errors "
            "| server RSS before / after (MiB) | result |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {args.sequences} | {' | '.join(cells)} | {errors} | {rss0 / 2**20:.1f} / {rss1 / 2**20:.1f} "
            f"({(rss1 - rss0) / 2**20:+.1f}) | {result} |",
            "",
        ]
    )


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.soak", __doc__)
    p.add_argument(
        "--sequences", type=int, default=64, help="concurrent sequences (one gRPC stream)"
    )
    p.add_argument("--length", type=int, default=2000, help="characters generated per sequence")
    p.add_argument(
        "--warmup-length",
        type=int,
        default=200,
        help="characters per sequence of the warm-up round",
    )
    p.add_argument(
        "--rss-bound-mib",
        type=float,
        default=32.0,
        help="fail if the server's RSS after the soak differs from before by more than this",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="sequence i samples with seed + i (temperature 1.0)"
    )
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="model repository")
    p.add_argument(
        "--run-dir", default=str(ROOT / "logs" / "soak"), help="server run directory (its log)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="markdown summary to write (default: bench/results/soak.md when --repo is the project's "
        "model_repository, else none)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra tritonserver argument (repeatable), e.g. --server-arg=--grpc-infer-allocation-pool-size=1024",
    )
    args = p.parse_args(argv)
    for flag, value in (
        ("--sequences", args.sequences),
        ("--length", args.length),
        ("--warmup-length", args.warmup_length),
    ):
        if value < 1:
            raise UserError(flag, f"must be >= 1, got {value}")
    if args.sequences > 1024:
        raise UserError("--sequences", f"must be <= 1024 (one stream), got {args.sequences}")
    if not args.rss_bound_mib > 0:
        raise UserError("--rss-bound-mib", f"must be > 0, got {args.rss_bound_mib}")

    from serve.local_triton import LocalTriton

    server = LocalTriton.on_free_ports(
        repo=args.repo, run_dir=args.run_dir, models=(MODEL,), extra_args=tuple(args.server_arg)
    )
    print(
        f"soak: {args.sequences} sequences x {args.length} characters on one gRPC stream "
        f"(server log {server.log_path}, {os.cpu_count()} cores)",
        flush=True,
    )
    with server:
        pgid = server.process.pid
        try:
            warm = run_round(server, args.sequences, args.warmup_length, args.seed + 100_000)
        except UserError as e:
            raise CheckFailed(
                "soak",
                f"the warm-up round failed ({e.why}){crashed(server)}",
                f"see the server log {server.log_path}",
            ) from e
        print(f"  warm-up: {warm['chars']:,} characters in {warm['seconds']:.1f} s", flush=True)
        before = group_rss(pgid)
        failed_before = failure_count(server)
        try:
            soak = run_round(server, args.sequences, args.length, args.seed)
            errors = 0
        except UserError as e:  # the client's error for the first failed request
            print(f"  soak failed: {e.message()}{crashed(server)}", file=sys.stderr)
            soak, errors = None, 1
        alive = server.process.poll() is None and server.is_ready()
        if alive:
            errors += failure_count(server) - failed_before
        after = group_rss(pgid)
    rss0, rss1 = sum(before.values()), sum(after.values())
    delta = rss1 - rss0
    if soak:
        print(
            f"  soak: {soak['chars']:,} characters in {soak['seconds']:.1f} s = {soak['chars'] / soak['seconds']:,.0f} "
            f"chars/s ({soak['requests'] / soak['seconds']:,.0f} requests/s); request latency p50 "
            f"{soak['p50_ms']:.1f} ms, p99 {soak['p99_ms']:.1f} ms"
        )
    print(f"  errors: {errors}")
    print(
        f"  server RSS ({len(before)} processes: tritonserver + python stubs) before {mib(rss0)}, after "
        f"{mib(rss1)}: {'+' if delta >= 0 else '-'}{mib(abs(delta))} (bound +-{args.rss_bound_mib:g} MiB)"
    )
    problems = []
    if errors:
        problems.append(f"{errors} error(s)")
    if not alive:
        problems.append("the server stopped being ready")
    if abs(delta) > args.rss_bound_mib * 2**20:
        problems.append(
            f"server RSS changed by {delta / 2**20:+.1f} MiB (bound +-{args.rss_bound_mib:g} MiB)"
        )
    out = args.out or (
        RESULTS / "soak.md"
        if Path(args.repo).resolve() == (ROOT / "model_repository").resolve()
        else None
    )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(summary_md(args, soak, errors, rss0, rss1, len(before), problems))
        print(f"  wrote {out}")
    if problems:
        raise CheckFailed("soak", "; ".join(problems), f"see the server log {server.log_path}")
    print("soak ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench`: served generation through the local Triton vs in-process baselines, measured in ONE run.

    python -m bench.bench                          # full sweep (a few minutes)
    python -m bench.bench --quick                  # smaller counts, for a smoke test

Measures, on this machine:
  in-process  TF reference step (batch 1); ONNX Runtime step at batch 1, 8, 64 (--threads, 1 like
              charrnn_python) and at batch 1 on every core; ORT prime of a 256-character prompt
  served      concurrent sequences 1, 4, 16, 64 on one gRPC stream, each primed with a 64-character
              test-split prompt then generating 256 characters one request per character: characters/s,
              per-request latency p50/p90/p95/p99; time to first character after a 256-character prompt
  floor       the same single-stream run against an empty python-backend model (bench/floor_model.py,
              charrnn_python's config): the round trip every request pays before inference
  ratios      served 1-stream chars/s / ORT batch-1 chars/s; served 64-sequence chars/s / ORT batch-64;
              the single-stream bound 1 / (round-trip floor + ORT batch-1 step)
  server-side generation (charrnn_gen_python, client --chunk K): K = 1, 8, 32, 128 characters per request,
              one sequence and 16 sequences, vs the in-process ORT generation graph at K = 128 (bench/chunked.py)
Writes bench.csv (perf_analyzer column names, microseconds), bench.png, bench.md and bench.json to --out
(default bench/results/) and nothing else; docs/benchmarks.md links the committed ones.
Exit codes: 0 ok, 2 bad input, 3 the server did not start.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from charrnn.cli import parser
from charrnn.errors import UserError, cli
from charrnn.repository import GEN_ONNX, GEN_PYTHON, ONNX, PYTHON

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "gpu": "none",
    }


def timed(fn, repeat: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def percentiles(values_s: list[float]) -> dict[str, float]:
    us = np.asarray(values_s) * 1e6
    return {f"p{q} latency": float(np.percentile(us, q)) for q in (50, 90, 95, 99)}


# --- in-process baselines -------------------------------------------------------------------------
def baselines(
    model_dir: Path, onnx_path: Path, prompt_ids: np.ndarray, repeat: int, threads: int
) -> dict:
    from charrnn.contract import INPUT_IDS, LOGITS, STATE_IN, STATE_OUT
    from charrnn.onnx_runtime import ort_session

    out = {}
    session = ort_session(str(onnx_path), threads=threads)
    dims = session.get_inputs()[1].shape[1:]
    for b in (1, 8, 64):
        feeds = {INPUT_IDS: np.zeros((b, 1), np.int32), STATE_IN: np.zeros((b, *dims), np.float32)}
        s = timed(lambda: session.run([LOGITS, STATE_OUT], feeds), repeat)
        out[f"ort_b{b}"] = {"step_us": s * 1e6, "chars_per_s": b / s}
        print(
            f"  ONNX Runtime step batch {b:>2}: {s * 1e6:8.0f} us  -> {b / s:8.0f} chars/s",
            flush=True,
        )
    cores = os.cpu_count() or 1
    if cores > threads:  # the fastest batch-1 step this machine has: every core on one sequence
        wide = ort_session(str(onnx_path), threads=cores)
        feeds = {INPUT_IDS: np.zeros((1, 1), np.int32), STATE_IN: np.zeros((1, *dims), np.float32)}
        s = timed(lambda: wide.run([LOGITS, STATE_OUT], feeds), repeat)
        out["ort_b1_cores"] = {"step_us": s * 1e6, "chars_per_s": 1 / s, "threads": cores}
        print(
            f"  ONNX Runtime step batch  1, {cores} threads: {s * 1e6:8.0f} us  -> {1 / s:8.0f} chars/s",
            flush=True,
        )
    feeds = {
        INPUT_IDS: prompt_ids[None, :].astype(np.int32),
        STATE_IN: np.zeros((1, *dims), np.float32),
    }
    s = timed(lambda: session.run([LOGITS, STATE_OUT], feeds), max(5, repeat // 20))
    out["ort_prime_256"] = {"seconds": s}
    print(f"  ONNX Runtime prime of {len(prompt_ids)} chars: {s * 1e3:.1f} ms", flush=True)

    import tensorflow as tf

    from charrnn.model import load_model_dir, use_cpu_only

    use_cpu_only()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    model, _, _ = load_model_dir(model_dir)
    step = tf.function(model.step, reduce_retracing=True)
    ids, state = tf.zeros([1, 1], tf.int32), model.zero_state(1)
    s = timed(lambda: [t.numpy() for t in step(ids, state)], max(20, repeat // 4))
    out["tf_b1"] = {"step_us": s * 1e6, "chars_per_s": 1 / s}
    print(
        f"  TensorFlow reference step batch 1: {s * 1e6:.0f} us -> {1 / s:.0f} chars/s", flush=True
    )
    return out


# --- served ---------------------------------------------------------------------------------------
def served_run(
    server, prompts: list[str], length: int, seed: int, model: str | None = None
) -> dict:
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import generate

    conn = Connection(server.grpc_url, "grpc")
    try:
        model = conn.pick_model(model)
        vocab = conn.vocabulary(model)
        params = [SamplingParams(temperature=1.0, seed=seed + i) for i in range(len(prompts))]
        cpu0, t0 = time.process_time(), time.perf_counter()
        seqs = generate(conn, model, vocab, prompts, length, params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        conn.close()
    latencies = [x for s in seqs for x in s.latencies]
    chars = sum(len(s.generated) for s in seqs)
    return {
        "Concurrency": len(prompts),
        "Inferences/Second": len(latencies) / wall,
        "Chars/Second": chars / wall,
        **percentiles(latencies),
        "Requests": len(latencies),
        "Seconds": wall,
        "Client CPU %": 100 * cpu / wall,
    }


def sweep_prompts(vocab, test: np.ndarray, sequences: int, prompt_length: int) -> list[str]:
    """`sequences` prompts of `prompt_length` test-split characters, spread over the split."""
    starts = np.linspace(1000, len(test) - prompt_length - 1, sequences).astype(int)
    return [vocab.decode(test[s : s + prompt_length]) for s in starts]


FLOOR_MODEL = "charrnn_floor"


def floor_run(repo: Path, prompt: str, length: int) -> dict:
    """One sequence, one request per character, against bench/floor_model.py (no inference) served with
    charrnn_python's config by its own local server: the round trip that bounds per-character serving.
    """
    from google.protobuf import text_format

    from charrnn.local_triton import LocalTriton
    from charrnn.repository import load_config

    config = load_config(repo / PYTHON)  # Triton's ModelConfig proto
    config.name = FLOOR_MODEL
    with tempfile.TemporaryDirectory(prefix="charrnn-floor-") as tmp:
        model_dir = Path(tmp) / "repository" / FLOOR_MODEL
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.copy(Path(__file__).with_name("floor_model.py"), model_dir / "1" / "model.py")
        server = LocalTriton.on_free_ports(
            repo=model_dir.parent, run_dir=Path(tmp) / "run", models=(FLOOR_MODEL,)
        )
        with server:
            served_run(server, [prompt], 16, 0, FLOOR_MODEL)  # warm-up
            return served_run(server, [prompt], length, 1, FLOOR_MODEL)


def time_to_first_char(server, prompt: str, repeat: int) -> float:
    """Median seconds from sending a prompt (one request) to having the first generated character."""
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import generate

    conn = Connection(server.grpc_url, "grpc")
    try:
        model = conn.pick_model(None)
        vocab = conn.vocabulary(model)
        times = []
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            generate(conn, model, vocab, [prompt], 1, [SamplingParams(greedy=True)])
            if i >= 2:  # 2 warm-up runs
                times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return statistics.median(times)


def write_outputs(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["served"]
    cols = [
        "Concurrency",
        "Inferences/Second",
        "Chars/Second",
        "p50 latency",
        "p90 latency",
        "p95 latency",
        "p99 latency",
        "Requests",
        "Seconds",
        "Client CPU %",
    ]
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.1f}" if isinstance(r[k], float) else r[k]) for k in cols})
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / "bench.png")
    md = markdown(result)
    (out_dir / "bench.md").write_text(md)


def markdown(result: dict) -> str:
    m, b, r = result["machine"], result["baselines"], result["ratios"]
    lines = [
        f"Measured by `make bench` on {m['cores']} cores ({m['cpu']}), {m['memory']}, no GPU, "
        f"Python {m['python']}, {result['date']}; {result['model']}; client and server on the same machine.",
        "",
        "| Concurrency | Inferences/Second | chars/s | p50 latency (us) | p90 (us) | p95 (us) | p99 (us) | client CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["served"]:
        lines.append(
            f"| {row['Concurrency']} | {row['Inferences/Second']:.0f} | {row['Chars/Second']:.0f} | "
            f"{row['p50 latency']:.0f} | {row['p90 latency']:.0f} | {row['p95 latency']:.0f} | "
            f"{row['p99 latency']:.0f} | {row['Client CPU %']:.0f} |"
        )
    lines += [
        "",
        "| in-process baseline | step | chars/s |",
        "|---|---:|---:|",
        f"| TensorFlow reference, batch 1 | {b['tf_b1']['step_us']:.0f} us | {b['tf_b1']['chars_per_s']:.0f} |",
    ]
    for k in (1, 8, 64):
        x = b[f"ort_b{k}"]
        lines.append(
            f"| ONNX Runtime, batch {k} | {x['step_us']:.0f} us | {x['chars_per_s']:.0f} |"
        )
        if k == 1 and "ort_b1_cores" in b:
            x = b["ort_b1_cores"]
            lines.append(
                f"| ONNX Runtime, batch 1, {x['threads']} threads | {x['step_us']:.0f} us | "
                f"{x['chars_per_s']:.0f} |"
            )
    lines.append(
        f"| ONNX Runtime prime, 256 chars | {b['ort_prime_256']['seconds'] * 1e3:.1f} ms | |"
    )
    lines += [
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        f"| served 1-stream chars/s | {r['served_1']:.0f} | >= 1,200 |",
        f"| served 64-seq / served 1-stream | {r['s64_over_s1']:.2f}x | >= 5x |",
        f"| served 1-stream / ORT batch-1 (1 thread, as served) | {r['s1_over_ort1']:.2f} | |",
        f"| served 64-seq / ORT batch-64 | {r['s64_over_ort64']:.2f} | |",
        f"| round-trip floor: empty python-backend model, 1 stream | {r['floor_1']:.0f} chars/s "
        f"(p50 {result['floor']['p50 latency']:.0f} us) | |",
        f"| 1-stream bound: 1 / (floor round trip + ORT batch-1 step) | {r['bound_1']:.0f} chars/s | |",
        f"| served 1-stream / that bound | {r['served_1'] / r['bound_1']:.2f} | |",
        f"| time to first char, 256-char prompt / ORT prime | {r['ttfc_over_prime']:.2f} "
        f"({result['ttfc_256_s'] * 1e3:.1f} ms) | <= 1.5 |",
        "",
    ]
    ch = result.get("chunked")
    if ch:
        ort1 = best_ort_b1(b)
        lines += [
            "Server-side generation (`python -m client --chunk K`, charrnn_gen_python with "
            f"{ch['threads']} ORT threads; seeded sampling, temperature 1; 1 and 16 sequences):",
            "",
            "| K (chars/request) | sequences | chars/s | requests/s | p50 request (ms) | p50 first char (ms) "
            "| / fastest ORT batch-1 step |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ch["rows"]:
            lines.append(
                f"| {r['K']} | {r['sequences']} | {r['chars_per_s']:.0f} | {r['requests_per_s']:.0f} | "
                f"{r['p50_request_ms']:.1f} | {r['p50_first_char_ms']:.1f} | {r['chars_per_s'] / ort1:.2f} |"
            )
        single = [r for r in ch["rows"] if r["K"] == ch["ort_gen_k"] and r["sequences"] == 1]
        lines += [
            "",
            f"In-process ORT generation graph, batch 1, K = {ch['ort_gen_k']}, {ch['threads']} threads: "
            f"{ch['ort_gen_chars_per_s']:.0f} chars/s.",
        ]
        if single:
            lines += [
                f"Target: served single-stream at K = {ch['ort_gen_k']} >= 50% of in-process ORT "
                f"batch-1 chars/s (the fastest step above, {ort1:.0f} chars/s): "
                f"**{100 * single[0]['chars_per_s'] / ort1:.0f}%**."
            ]
        lines.append("")
    return "\n".join(lines)


def best_ort_b1(baselines: dict) -> float:
    """chars/s of the fastest in-process ORT batch-1 step measured (1 thread, or every core)."""
    return max(baselines[k]["chars_per_s"] for k in ("ort_b1", "ort_b1_cores") if k in baselines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["served"]
    c = [r["Concurrency"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(c, [r["Chars/Second"] for r in rows], "o-", label="served, one request per character")
    if result.get("floor"):
        a1.plot(
            [1],
            [result["floor"]["Chars/Second"]],
            "kx",
            markersize=9,
            label="empty python model, 1 sequence (round-trip floor)",
        )
    ch = result.get("chunked") or {"rows": []}
    for k in sorted({r["K"] for r in ch["rows"] if r["K"] > 1}):
        pts = sorted((r["sequences"], r["chars_per_s"]) for r in ch["rows"] if r["K"] == k)
        a1.plot(*zip(*pts), "s--", alpha=0.8, label=f"served, {k} chars per request (--chunk {k})")
    b = result["baselines"]
    for k, style in ((1, ":"), (8, "-."), (64, "--")):
        a1.axhline(
            b[f"ort_b{k}"]["chars_per_s"],
            linestyle=style,
            color="gray",
            label=f"in-process ORT batch {k}",
        )
    if "ort_b1_cores" in b:
        a1.axhline(
            b["ort_b1_cores"]["chars_per_s"],
            linestyle=":",
            color="black",
            label=f"in-process ORT batch 1, {b['ort_b1_cores']['threads']} threads",
        )
    a1.axhline(
        b["tf_b1"]["chars_per_s"], linestyle=":", color="orange", label="in-process TF batch 1"
    )
    a1.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sequences",
        ylabel="characters / s",
        title="Throughput",
    )
    a1.set_xticks(c, [str(x) for x in c])
    a1.legend(fontsize=6.5, loc="lower right", framealpha=0.85)
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        a2.plot(c, [r[f"{q} latency"] / 1000 for r in rows], style, label=q)
    a2.set(
        xscale="log",
        xlabel="concurrent sequences",
        ylabel="per-request latency (ms)",
        title="Latency per character request",
    )
    a2.set_xticks(c, [str(x) for x in c])
    a2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"charrnn on Triton: {m['cores']} cores, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chunked_section(server, vocab, test: np.ndarray, args, ks: list[int]) -> dict:
    """[4/5] server-side generation: chars/s for each K, 1 and 16 sequences, and the in-process reference."""
    from bench.chunked import bench_chunked, ort_gen_chars_per_s
    from charrnn.repository import load_config

    threads = int(
        load_config(Path(args.repo) / GEN_PYTHON / "config.pbtxt")
        .parameters["intra_op_threads"]
        .string_value
    )
    print(
        f"[4/5] server-side generation ({GEN_PYTHON}, {threads} ORT threads), K = {ks}", flush=True
    )
    gen_onnx = Path(args.repo) / GEN_ONNX / "1" / "model.onnx"
    ort_k = max(ks)
    ort = ort_gen_chars_per_s(
        gen_onnx, K=ort_k, threads=threads
    )  # the same session options as served
    print(
        f"  in-process ORT generation graph, batch 1, K={ort_k}, {threads} threads: {ort:.0f} chars/s",
        flush=True,
    )
    prompts = sweep_prompts(vocab, test, 16, args.prompt_length)
    rows = bench_chunked(
        server,
        vocab,
        prompts,
        ks,
        args.length,
        on_row=lambda r: print(
            f"  K={r['K']:>3} x{r['sequences']:>2} sequences: {r['chars_per_s']:7.0f} chars/s, "
            f"{r['requests_per_s']:6.1f} requests/s, p50 request {r['p50_request_ms']:.1f} ms, "
            f"first char {r['p50_first_char_ms']:.1f} ms",
            flush=True,
        ),
    )
    return {"rows": rows, "ort_gen_k": ort_k, "ort_gen_chars_per_s": ort, "threads": threads}


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.bench", __doc__)
    p.add_argument(
        "--model",
        default=str(ROOT / "models" / "shakespeare-lstm-2x512"),
        help="model directory (the TensorFlow baseline, the vocabulary)",
    )
    p.add_argument(
        "--repo", default=str(ROOT / "model_repository"), help="exported repository (make export)"
    )
    p.add_argument(
        "--data",
        default=str(ROOT / "data" / "tinyshakespeare.txt"),
        help="prompts come from its test split",
    )
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated sequence counts")
    p.add_argument(
        "--prompt-length", type=int, default=64, help="characters each sequence is primed with"
    )
    p.add_argument("--length", type=int, default=256, help="characters generated per sequence")
    p.add_argument(
        "--chunks",
        default="1,8,32,128",
        help="server-side generation: comma-separated K (characters per request); empty: skip",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="ORT/TF threads for the in-process baselines"
    )
    p.add_argument(
        "--quick", action="store_true", help="small counts (smoke test; figures not meaningful)"
    )
    p.add_argument(
        "--out",
        default=str(RESULTS),
        help="directory for bench.csv, bench.png, bench.md, bench.json",
    )
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x]
    if not levels or min(levels) < 1:
        raise UserError("--concurrency", f"needs positive integers, got {args.concurrency!r}")
    ks = [int(x) for x in args.chunks.split(",") if x]
    if any(k < 1 for k in ks):
        raise UserError("--chunks", f"needs positive integers, got {args.chunks!r}")
    if args.quick:
        args.length, levels, ks = 32, [1, 4], ks[:2]
    repeat = 20 if args.quick else 300

    from charrnn.data import load_splits
    from charrnn.local_triton import LocalTriton
    from charrnn.model import load_model_dir  # noqa: F401  (fail early on a bad model dir)
    from charrnn.vocab import Vocab

    vocab = Vocab.load(Path(args.model) / "vocab.json")
    _, _, _, test = load_splits(args.data, vocab)
    onnx_path = Path(args.repo) / ONNX / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise UserError(str(onnx_path), "not found", "run `make export`")
    prompt256 = test[:256]
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(args.model).name,
    }
    print(f"machine: {result['machine']}")
    print("[1/5] in-process baselines", flush=True)
    result["baselines"] = baselines(Path(args.model), onnx_path, prompt256, repeat, args.threads)

    print("[2/5] served generation through the local Triton server", flush=True)
    models = (PYTHON, GEN_PYTHON) if ks else (PYTHON,)
    server = LocalTriton.on_free_ports(repo=args.repo, models=models)
    rows = []
    with server:
        served_run(server, [vocab.decode(test[: args.prompt_length])], 16, 0)  # warm-up
        for c in levels:
            row = served_run(
                server, sweep_prompts(vocab, test, c, args.prompt_length), args.length, seed=c
            )
            rows.append(row)
            print(
                f"  {c:>3} sequences: {row['Chars/Second']:7.0f} chars/s  p50 {row['p50 latency']:6.0f} us  "
                f"p99 {row['p99 latency']:6.0f} us  client CPU {row['Client CPU %']:.0f}%",
                flush=True,
            )
        print("[3/5] time to first character after a 256-character prompt", flush=True)
        ttfc = time_to_first_char(server, vocab.decode(prompt256), 5 if args.quick else 20)
        print(
            f"  time to first char: {ttfc * 1e3:.1f} ms "
            f"({ttfc / result['baselines']['ort_prime_256']['seconds']:.2f}x ORT prime)",
            flush=True,
        )
        result["chunked"] = chunked_section(server, vocab, test, args, ks) if ks else None
    print(
        "[5/5] round-trip floor: the same single stream against an empty python-backend model",
        flush=True,
    )
    floor = floor_run(Path(args.repo), vocab.decode(test[: args.prompt_length]), args.length)
    print(
        f"  empty python model, 1 sequence: {floor['Chars/Second']:7.0f} chars/s  "
        f"p50 {floor['p50 latency']:6.0f} us",
        flush=True,
    )
    result["served"], result["ttfc_256_s"], result["floor"] = rows, ttfc, floor
    by_c = {r["Concurrency"]: r for r in rows}
    b = result["baselines"]
    s1 = by_c.get(1, rows[0])["Chars/Second"]
    s64 = by_c.get(64, rows[-1])["Chars/Second"]
    result["ratios"] = {
        "served_1": s1,
        "s64_over_s1": s64 / s1,
        "s1_over_ort1": s1 / b["ort_b1"]["chars_per_s"],
        "s64_over_ort64": s64 / b["ort_b64"]["chars_per_s"],
        "ttfc_over_prime": ttfc / b["ort_prime_256"]["seconds"],
        # seconds per request = 1 / requests/s; one stream cannot beat floor + step
        "floor_1": floor["Chars/Second"],
        "bound_1": 1 / (1 / floor["Inferences/Second"] + b["ort_b1"]["step_us"] / 1e6),
    }
    write_outputs(result, Path(args.out))
    print(f"\n{markdown(result)}\nwrote {args.out}/bench.csv, bench.png, bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

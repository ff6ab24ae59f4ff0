"""`make bench`: served generation through the local Triton vs in-process baselines, measured in ONE run.

    python -m bench.bench                          # full sweep (several minutes)
    python -m bench.bench --quick                  # smaller counts, for a smoke test

Measures, on this machine:
  in-process  TF reference step (batch 1); ONNX Runtime step at batch 1, 8, 64 (--threads, 1 like
              charrnn_python and charrnn_onnx), with the process's CPU time per character, and at batch 1 on
              every core; ORT prime of a 256-character prompt
  served      two servers, one after the other: the python backend (charrnn_python, charrnn_gen_python) and
              Triton's ONNX Runtime backend (charrnn_onnx, charrnn_gen_onnx; `make backend`). For each
              per-character model: concurrent sequences 1, 4, 16, 64 on one gRPC stream, each primed with a
              64-character test-split prompt then generating 256 characters one request per character (the
              median of 3 runs by chars/s): characters/s, per-request latency p50/p90/p95/p99, the CPU time of
              the server (tritonserver and every descendant, e.g. python stubs, from psutil) and of
              the client per character; time to first character after a 256-character prompt
  floors      the same single-stream run against an empty model on each backend: bench/floor_model.py
              (charrnn_python's config) and bench/floor_onnx.py (charrnn_onnx's graph I/O, implicit state and
              CPU config): the round trip every request pays before inference
  ratios      served 1-stream chars/s / ORT batch-1 chars/s; served 64-sequence chars/s / ORT batch-64;
              the single-stream bound 1 / (round-trip floor + ORT batch-1 step) per backend; server CPU per
              character at 64 sequences / in-process ORT's at batch 64
  server-side generation (client --chunk K): charrnn_gen_python at K = 1, 8, 32, 128 with one sequence and 16;
              charrnn_gen_onnx at K = 32 and 128 with the --concurrency sequence counts; vs the in-process ORT
              generation graph at K = 128 (bench/chunked.py)
Writes bench.csv (one row per model and concurrency; perf_analyzer column names, microseconds), bench.png,
bench.md and bench.json to --out (default bench/results/) and nothing else; docs/benchmarks.md links the
committed ones.
Exit codes: 0 ok, 2 bad input, 3 the server did not start (or the ONNX Runtime backend is not built).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from charrnn.cli import DEFAULT_MODEL_DIR, add_model_dir, parser
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
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,  # psutil does not name the CPU: /proc/cpuinfo's "model name"
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",  # MemTotal
        "python": platform.python_version(),
        "gpu": "none",
    }


PAUSE_S = (
    1e-3  # about one served round trip (the empty model's), before each "paused" baseline step
)


def timed(fn, repeat: int, warmup: int = 3, pause: float = 0.0) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup` (each after `pause` seconds of sleep)."""
    return timed_cpu(fn, repeat, warmup, pause)[0]


def timed_cpu(fn, repeat: int, warmup: int = 3, pause: float = 0.0) -> tuple[float, float]:
    """(median seconds of fn() over `repeat` runs after `warmup`, this process's CPU seconds per run over
    those runs: user + system of every thread, nanosecond clock). With `pause`, each run is timed after
    sleeping that long (the CPU figure then counts the runs only, the sleep costs none)."""
    for _ in range(warmup):
        fn()
    times = []
    cpu0 = time.process_time()
    for _ in range(repeat):
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (time.process_time() - cpu0) / repeat


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) that process `root` and all its descendants have used so far, from
    psutil's cpu_times (every thread of a process; clock ticks of 10 ms, so measure over seconds of work).
    A descendant that exited in between is no longer counted: the python stubs live as long as the server.
    """
    try:
        proc = psutil.Process(root)
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in tree:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue  # gone meanwhile
        total += times.user + times.system
    return total


class MachineLoad:
    """How busy the machine was with OTHER work while this benchmark ran: the machine's busy CPU time
    (psutil.cpu_times, /proc/stat) minus this process's and its waited-for descendants' (getrusage: the servers it started and
    stopped, their python stubs), in cores on average. Our own servers still running at the end would count as
    "other": read it after they stopped."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self.machine_busy(), self.own()

    @staticmethod
    def machine_busy() -> float:
        """Seconds of CPU the machine spent busy so far (every core; idle and iowait excluded)."""
        t = psutil.cpu_times()  # guest and guest_nice are counted in user and nice already
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    @staticmethod
    def own() -> float:
        import resource

        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            total += r.ru_utime + r.ru_stime
        return total

    def summary(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy = self.machine_busy() - self.busy0
        own = self.own() - self.own0
        return {
            "seconds": wall,
            "machine_busy_cores": busy / wall,
            "benchmark_cores": own / wall,
            "other_cores": max(0.0, busy - own) / wall,
        }


def server_pid(server) -> int | None:
    """The tritonserver pid of a LocalTriton (None for a server we did not start, e.g. a host:port)."""
    process = getattr(server, "process", None)
    return process.pid if process is not None else None


def median_run(rows: list[dict], key: str = "Chars/Second") -> dict:
    """The run with the median `key` (the lower middle one of an even count)."""
    return sorted(rows, key=lambda r: r[key])[(len(rows) - 1) // 2]


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
        s, cpu = timed_cpu(lambda: session.run([LOGITS, STATE_OUT], feeds), repeat)
        out[f"ort_b{b}"] = {
            "step_us": s * 1e6,
            "chars_per_s": b / s,
            "threads": threads,
            "cpu_us_per_char": cpu * 1e6 / b,  # the process's CPU over the timed loop / characters
        }
        print(
            f"  ONNX Runtime step batch {b:>2}: {s * 1e6:8.0f} us  -> {b / s:8.0f} chars/s, "
            f"CPU {cpu * 1e6 / b:6.0f} us/char",
            flush=True,
        )
    # The same batch-1 step after a pause of about one served round trip: what a served step finds. Between
    # two requests of a stream the client and the server's front end run, and the 16 MB of LSTM weights leave
    # the cache; the hot loop above keeps them there (docs/benchmarks.md).
    feeds = {INPUT_IDS: np.zeros((1, 1), np.int32), STATE_IN: np.zeros((1, *dims), np.float32)}
    s = timed(lambda: session.run([LOGITS, STATE_OUT], feeds), repeat, pause=PAUSE_S)
    out["ort_b1_paused"] = {
        "step_us": s * 1e6,
        "chars_per_s": 1 / s,
        "pause_s": PAUSE_S,
        "threads": threads,
    }
    print(
        f"  ONNX Runtime step batch  1 after a {PAUSE_S * 1e3:g} ms pause: {s * 1e6:8.0f} us",
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
    net, _, _ = load_model_dir(model_dir)
    step = tf.function(net.step, reduce_retracing=True)
    ids, state = tf.zeros([1, 1], tf.int32), net.zero_state(1)
    s = timed(lambda: [t.numpy() for t in step(ids, state)], max(20, repeat // 4))
    out["tf_b1"] = {"step_us": s * 1e6, "chars_per_s": 1 / s}
    print(
        f"  TensorFlow reference step batch 1: {s * 1e6:.0f} us -> {1 / s:.0f} chars/s", flush=True
    )
    return out


# --- served ---------------------------------------------------------------------------------------
def served_run(
    server, prompts: list[str], length: int, seed: int, model_name: str | None = None
) -> dict:
    """One timed run of len(prompts) sequences, one request per character. With a server we started (a
    LocalTriton), also the server's CPU time (tritonserver and its descendants) over the run."""
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import complete

    pid = server_pid(server)
    conn = Connection(server.grpc_url, "grpc")
    try:
        model_name = conn.pick_model(model_name)
        vocab = conn.vocabulary(model_name)
        params = [SamplingParams(temperature=1.0, seed=seed + i) for i in range(len(prompts))]
        server0 = tree_cpu_seconds(pid) if pid else 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        seqs = complete(conn, model_name, vocab, prompts, length, params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        server_cpu = tree_cpu_seconds(pid) - server0 if pid else None
    finally:
        conn.close()
    latencies = [x for s in seqs for x in s.latencies]
    chars = sum(len(s.generated) for s in seqs)
    row = {
        "Model": model_name,
        "Concurrency": len(prompts),
        "Inferences/Second": len(latencies) / wall,
        "Chars/Second": chars / wall,
        **percentiles(latencies),
        "Requests": len(latencies),
        "Seconds": wall,
        "Client CPU %": 100 * cpu / wall,
        "Client CPU us/char": 1e6 * cpu / chars,
    }
    if server_cpu is not None:
        row["Server CPU %"] = 100 * server_cpu / wall
        row["Server CPU us/char"] = 1e6 * server_cpu / chars
    return row


def sweep_prompts(vocab, test: np.ndarray, sequences: int, prompt_length: int) -> list[str]:
    """`sequences` prompts of `prompt_length` test-split characters, spread over the split."""
    starts = np.linspace(1000, len(test) - prompt_length - 1, sequences).astype(int)
    return [vocab.decode(test[s : s + prompt_length]) for s in starts]


def served_sweep(
    server, model_name: str, vocab, test: np.ndarray, levels: list[int], args, runs: int
) -> list[dict]:
    """One row per concurrency level: the median of `runs` runs (by chars/s), each level seeded alike."""
    served_run(server, [vocab.decode(test[: args.prompt_length])], 16, 0, model_name)  # warm-up
    rows = []
    for c in levels:
        prompts = sweep_prompts(vocab, test, c, args.prompt_length)
        row = median_run(
            [served_run(server, prompts, args.length, c, model_name) for _ in range(runs)]
        )
        row["Runs"] = runs
        rows.append(row)
        print(
            f"  {model_name} x{c:>3} sequences: {row['Chars/Second']:7.0f} chars/s  "
            f"p50 {row['p50 latency']:6.0f} us  p99 {row['p99 latency']:6.0f} us  "
            f"client CPU {row['Client CPU %']:.0f}%  server CPU {row['Server CPU %']:.0f}% "
            f"({row['Server CPU us/char']:.0f} us/char)",
            flush=True,
        )
    return rows


FLOOR_MODEL = "charrnn_floor"


def floor_run(repo: Path, prompt: str, length: int, runs: int = 1) -> dict:
    """One sequence, one request per character, against bench/floor_model.py (no inference) served with
    charrnn_python's config by its own local server: the round trip that bounds per-character serving.
    """
    from google.protobuf import text_format

    from charrnn.repository import load_config
    from serve.local_triton import LocalTriton

    config = load_config(repo / PYTHON)  # Triton's ModelConfig proto
    config.name = FLOOR_MODEL
    with tempfile.TemporaryDirectory(prefix="charrnn-floor-") as tmp:
        folder = Path(tmp) / "repository" / FLOOR_MODEL  # the served model's folder
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.copy(Path(__file__).with_name("floor_model.py"), folder / "1" / "model.py")
        server = LocalTriton.on_free_ports(
            repo=folder.parent, run_dir=Path(tmp) / "run", models=(FLOOR_MODEL,)
        )
        with server:
            served_run(server, [prompt], 16, 0, FLOOR_MODEL)  # warm-up
            return median_run(
                [served_run(server, [prompt], length, 1, FLOOR_MODEL) for _ in range(runs)]
            )


def floor_onnx_run(repo: Path, prompt: str, length: int, runs: int = 1) -> dict:
    """The same single stream against bench/floor_onnx.py's empty graph on Triton's ONNX Runtime backend
    (charrnn_onnx's I/O, implicit state and CPU config), served by its own local server."""
    from bench.floor_onnx import FLOOR_ONNX_MODEL, write_floor_model
    from charrnn.repository import ORT_MODELS
    from serve.local_triton import LocalTriton, prepare_backends

    with tempfile.TemporaryDirectory(prefix="charrnn-floor-onnx-") as tmp:
        write_floor_model(repo, Path(tmp) / "repository")
        # The launcher links the ONNX Runtime backend for the models it knows (charrnn.repository ORT_MODELS);
        # this one is not in the table, so link it here, in the server's run directory.
        prepare_backends(Path(tmp) / "run", ORT_MODELS)
        server = LocalTriton.on_free_ports(
            repo=Path(tmp) / "repository", run_dir=Path(tmp) / "run", models=(FLOOR_ONNX_MODEL,)
        )
        with server:
            served_run(server, [prompt], 16, 0, FLOOR_ONNX_MODEL)  # warm-up
            return median_run(
                [served_run(server, [prompt], length, 1, FLOOR_ONNX_MODEL) for _ in range(runs)]
            )


def time_to_first_char(server, prompt: str, repeat: int, model_name: str | None = None) -> float:
    """Median seconds from sending a prompt (one request) to having the first generated character."""
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import complete

    conn = Connection(server.grpc_url, "grpc")
    try:
        model_name = conn.pick_model(model_name)
        vocab = conn.vocabulary(model_name)
        times = []
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            complete(conn, model_name, vocab, [prompt], 1, [SamplingParams(greedy=True)])
            if i >= 2:  # 2 warm-up runs
                times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return statistics.median(times)


CSV_COLUMNS = [
    "Model",
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
    "Server CPU %",
    "Client CPU us/char",
    "Server CPU us/char",
]
PER_CHAR_MODELS = (PYTHON, ONNX)  # the served sweep, in this order
GEN_ONNX_KS = (32, 128)  # charrnn_gen_onnx's K at every --concurrency level


def write_outputs(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for model_name in result["served"]:
            for r in result["served"][model_name]:
                w.writerow(
                    {k: (f"{r[k]:.1f}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS}
                )
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / "bench.png")
    md = markdown(result)
    (out_dir / "bench.md").write_text(md)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def markdown(result: dict) -> str:
    m, b, r = result["machine"], result["baselines"], result["ratios"]
    load = result.get("load_average", {})
    other = result.get("machine_load")
    runs = next(iter(result["served"].values()))[0].get("Runs", 1)
    lines = [
        f"Measured by `make bench` on {m['cores']} cores ({m['cpu']}), {m['memory']}, no GPU, "
        f"Python {m['python']}, {result['date']}; {result['model']}; client and server on the same machine; "
        f"load average (1 min) {load.get('start', float('nan')):.2f} at the start, "
        f"{load.get('end', float('nan')):.2f} at the end"
        + (
            f"; other processes used {other['other_cores']:.2f} cores on average during the run (the "
            f"machine was busy {other['machine_busy_cores']:.2f} cores, this benchmark "
            f"{other['benchmark_cores']:.2f})."
            if other
            else "."
        ),
        "",
        f"One request per character (median of {runs} run(s) by chars/s; CPU: the server = tritonserver and "
        "its descendants from /proc, the client = this process, per generated character):",
        "",
        "| model | sequences | Inferences/Second | chars/s | p50 latency (us) | p90 (us) | p95 (us) | p99 (us) "
        "| client CPU % | server CPU % | server CPU us/char | client CPU us/char |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, rows in result["served"].items():
        for row in rows:
            lines.append(
                f"| {model_name} | {row['Concurrency']} | {row['Inferences/Second']:.0f} | "
                f"{row['Chars/Second']:.0f} | {row['p50 latency']:.0f} | {row['p90 latency']:.0f} | "
                f"{row['p95 latency']:.0f} | {row['p99 latency']:.0f} | {row['Client CPU %']:.0f} | "
                f"{row['Server CPU %']:.0f} | {row['Server CPU us/char']:.0f} | "
                f"{row['Client CPU us/char']:.0f} |"
            )
    lines += [
        "",
        "| in-process baseline | step | chars/s | CPU us/char |",
        "|---|---:|---:|---:|",
        f"| TensorFlow reference, batch 1 | {b['tf_b1']['step_us']:.0f} us | "
        f"{b['tf_b1']['chars_per_s']:.0f} | |",
    ]
    for k in (1, 8, 64):
        x = b[f"ort_b{k}"]
        lines.append(
            f"| ONNX Runtime, batch {k}, {x.get('threads', 1)} thread(s) | {x['step_us']:.0f} us | "
            f"{x['chars_per_s']:.0f} | {x['cpu_us_per_char']:.0f} |"
        )
        if k == 1 and "ort_b1_paused" in b:
            x = b["ort_b1_paused"]
            lines.append(
                f"| ONNX Runtime, batch 1, {x['threads']} thread(s), after a {x['pause_s'] * 1e3:g} ms "
                "pause before each step | "
                f"{x['step_us']:.0f} us | {x['chars_per_s']:.0f} | |"
            )
        if k == 1 and "ort_b1_cores" in b:
            x = b["ort_b1_cores"]
            lines.append(
                f"| ONNX Runtime, batch 1, {x['threads']} threads | {x['step_us']:.0f} us | "
                f"{x['chars_per_s']:.0f} | |"
            )
    lines.append(
        f"| ONNX Runtime prime, 256 chars | {b['ort_prime_256']['seconds'] * 1e3:.1f} ms | | |"
    )
    p, o = r[PYTHON], r.get(ONNX)
    cpu = result["cpu"]

    def both(fn, fmt="{:.2f}") -> str:
        return " | ".join(fmt.format(fn(x)) if x else "" for x in (p, o))

    floor = result["floor"]
    ort = cpu["ort_b64_us_per_char"]
    lines += [
        "",
        f"| ratio | {PYTHON} | {ONNX} | target |",
        "|---|---:|---:|---|",
        f"| served 1-stream chars/s | {both(lambda x: x['served_1'], '{:.0f}')} | >= 1,200 |",
        f"| served 64-seq / served 1-stream | {both(lambda x: x['s64_over_s1'], '{:.2f}x')} | >= 5x |",
        f"| served 1-stream / ORT batch-1 (1 thread, as served) | {both(lambda x: x['s1_over_ort1'])} | |",
        f"| served 64-seq / ORT batch-64 | {both(lambda x: x['s64_over_ort64'])} | |",
        "| round-trip floor: empty model on the same backend, 1 stream (chars/s; p50 us) | "
        + " | ".join(
            (
                f"{floor[k]['Chars/Second']:.0f}; p50 {floor[k]['p50 latency']:.0f}"
                if k in floor
                else ""
            )
            for k in (PYTHON, ONNX)
        )
        + " | |",
        "| 1-stream bound: 1 / (floor round trip + ORT batch-1 step), chars/s | "
        f"{both(lambda x: x['bound_1'], '{:.0f}')} | |",
    ]
    goal_bound = f">= {ONNX_BOUND_GOAL:.2f} ({ONNX})"
    if o:
        goal_bound += f": {verdict(o['s1_over_bound'] >= ONNX_BOUND_GOAL)}"
    lines += [
        f"| served 1-stream / that bound | {both(lambda x: x['s1_over_bound'])} | {goal_bound} |",
    ]
    if "ort_b1_paused" in b:
        pause_ms = b["ort_b1_paused"]["pause_s"] * 1e3
        lines += [
            f"| the same bound with the ORT step after a {pause_ms:g} ms pause "
            f"({b['ort_b1_paused']['step_us']:.0f} us), chars/s | "
            f"{both(lambda x: x['bound_1_paused'], '{:.0f}')} | |",
            f"| served 1-stream / that bound | {both(lambda x: x['s1_over_bound_paused'])} | |",
        ]
    lines += [
        f"| server CPU per character at {cpu['sequences']} sequences (us) | "
        f"{both(lambda x: x['server_cpu_us_per_char'], '{:.0f}')} | |",
        f"| client CPU per character at {cpu['sequences']} sequences (us) | "
        f"{both(lambda x: x['client_cpu_us_per_char'], '{:.0f}')} | |",
    ]
    goal_cpu = f"<= {ONNX_CPU_GOAL:.0f}x ({ONNX})"
    if o:
        goal_cpu += f": {verdict(o['server_cpu_over_ort64'] <= ONNX_CPU_GOAL)}"
    lines += [
        f"| server CPU per character / in-process ORT batch 64 ({ort:.0f} us, "
        f"{cpu['ort_threads']} thread) | {both(lambda x: x['server_cpu_over_ort64'], '{:.2f}x')} | "
        f"{goal_cpu} |",
        "| time to first char, 256-char prompt / ORT prime | "
        + " | ".join(
            f"{x['ttfc_over_prime']:.2f} ({x['ttfc_256_s'] * 1e3:.1f} ms)" if x else ""
            for x in (p, o)
        )
        + " | <= 1.5 |",
        "",
    ]
    ort1 = best_ort_b1(b)
    for section in ("chunked", "gen_onnx"):
        ch = result.get(section)
        if not ch:
            continue
        model_name = ch["model"]
        lines += [
            f"Server-side generation (`python -m client --chunk K`, {model_name} with {ch['threads']} ORT "
            f"threads; seeded sampling, temperature 1; {', '.join(map(str, ch['sequences']))} sequences):",
            "",
            "| K (chars/request) | sequences | chars/s | requests/s | p50 request (ms) | p50 first char (ms) "
            "| server CPU us/char | / fastest ORT batch-1 step |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in ch["rows"]:
            server_cpu = x.get("server_cpu_us_per_char")
            lines.append(
                f"| {x['K']} | {x['sequences']} | {x['chars_per_s']:.0f} | {x['requests_per_s']:.0f} | "
                f"{x['p50_request_ms']:.1f} | {x['p50_first_char_ms']:.1f} | "
                f"{'' if server_cpu is None else f'{server_cpu:.0f}'} | {x['chars_per_s'] / ort1:.2f} |"
            )
        single = [x for x in ch["rows"] if x["K"] == ch["ort_gen_k"] and x["sequences"] == 1]
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

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 6.2))
    levels = sorted({r["Concurrency"] for rows in result["served"].values() for r in rows})
    colors = {PYTHON: "tab:blue", ONNX: "tab:green"}
    for model_name, rows in result["served"].items():
        c = [r["Concurrency"] for r in rows]
        a1.plot(
            c,
            [r["Chars/Second"] for r in rows],
            "o-",
            color=colors.get(model_name),
            label=f"{model_name}, one request per character",
        )
        for q, style in (("p50", "o-"), ("p95", "s--")):
            a2.plot(
                c,
                [r[f"{q} latency"] / 1000 for r in rows],
                style,
                color=colors.get(model_name),
                label=f"{model_name} {q}",
            )
    for model_name, row in (result.get("floor") or {}).items():
        a1.plot(
            [1],
            [row["Chars/Second"]],
            "x",
            color=colors.get(model_name),
            markersize=9,
            label=f"empty model on {model_name}'s backend, 1 sequence (round-trip floor)",
        )
    for section, style in (("chunked", "s--"), ("gen_onnx", "d:")):
        ch = result.get(section) or {"rows": []}
        for k in sorted({x["K"] for x in ch["rows"] if x["K"] > 1}):
            pts = sorted((x["sequences"], x["chars_per_s"]) for x in ch["rows"] if x["K"] == k)
            a1.plot(*zip(*pts), style, alpha=0.8, label=f"{ch['model']}, {k} chars per request")
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
    a1.set_xticks(levels, [str(x) for x in levels])
    a1.minorticks_off()
    a1.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    a2.set(
        xscale="log",
        xlabel="concurrent sequences",
        ylabel="per-request latency (ms)",
        title="Latency per character request",
    )
    a2.set_xticks(levels, [str(x) for x in levels])
    a2.minorticks_off()
    a2.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"charrnn on Triton: {m['cores']} cores, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_threads(repo: Path, model_name: str) -> int:
    """ONNX Runtime intra-op threads a served model runs with: the python models' intra_op_threads, the ONNX
    Runtime backend's intra_op_thread_count in its CPU config (what our servers load)."""
    from charrnn.repository import BY_NAME, load_config

    cpu_config = BY_NAME[model_name].cpu_config
    config = load_config(repo / model_name / cpu_config if cpu_config else repo / model_name)
    for key in ("intra_op_threads", "intra_op_thread_count"):
        if key in config.parameters:
            return int(config.parameters[key].string_value)
    raise UserError(
        str(repo / model_name), "no ONNX Runtime thread count in its config", "run make export"
    )


def chunked_section(
    server,
    vocab,
    test: np.ndarray,
    args,
    ks: list[int],
    model_name: str = GEN_PYTHON,
    sequences: tuple[int, ...] = (1, 16),
    ort: tuple[int, float] | None = None,
) -> dict:
    """Server-side generation: chars/s for each K and sequence count, and the in-process reference (the
    generation graph at the largest K, batch 1, the served model's thread count; `ort` reuses one).
    """
    from bench.chunked import bench_chunked, ort_gen_chars_per_s

    threads = config_threads(Path(args.repo), model_name)
    print(
        f"  {model_name} ({threads} ORT threads), K = {ks}, sequences {list(sequences)}", flush=True
    )
    if ort is None or ort[0] != max(ks):
        gen_onnx = Path(args.repo) / GEN_ONNX / "1" / "model.onnx"
        ort = (max(ks), ort_gen_chars_per_s(gen_onnx, K=max(ks), threads=threads))
        print(
            f"  in-process ORT generation graph, batch 1, K={ort[0]}, {threads} threads: "
            f"{ort[1]:.0f} chars/s",
            flush=True,
        )
    prompts = sweep_prompts(vocab, test, max(sequences), args.prompt_length)
    rows = bench_chunked(
        server,
        vocab,
        prompts,
        ks,
        args.length,
        model_name,
        sequences=sequences,
        on_row=lambda r: print(
            f"  {model_name} K={r['K']:>3} x{r['sequences']:>2} sequences: {r['chars_per_s']:7.0f} chars/s, "
            f"{r['requests_per_s']:6.1f} requests/s, p50 request {r['p50_request_ms']:.1f} ms, "
            f"first char {r['p50_first_char_ms']:.1f} ms, server CPU "
            f"{r.get('server_cpu_us_per_char', float('nan')):.0f} us/char",
            flush=True,
        ),
    )
    return {
        "model": model_name,
        "rows": rows,
        "sequences": list(sequences),
        "ort_gen_k": ort[0],
        "ort_gen_chars_per_s": ort[1],
        "threads": threads,
    }


# Goals of the issue "Benchmarks, not timed tests" for the ONNX Runtime backend's per-character model.
ONNX_BOUND_GOAL = (
    0.90  # its 1-stream chars/s >= this fraction of 1 / (empty-model round trip + ORT step)
)
ONNX_CPU_GOAL = (
    2.0  # its server CPU per character at 64 sequences <= this x in-process ORT's at batch 64
)


def ratios(result: dict, model_name: str) -> dict:
    """The ratios of one per-character model against the baselines, its floor and the CPU reference."""
    rows, b = result["served"][model_name], result["baselines"]
    by_c = {x["Concurrency"]: x for x in rows}
    one, top = by_c.get(1, rows[0]), by_c.get(64, rows[-1])
    floor = result["floor"][model_name]
    s1, s64 = one["Chars/Second"], top["Chars/Second"]
    # seconds per request = 1 / requests/s; one stream cannot beat floor + step
    bound = 1 / (1 / floor["Inferences/Second"] + b["ort_b1"]["step_us"] / 1e6)
    paused = b.get("ort_b1_paused")
    bound_paused = (
        1 / (1 / floor["Inferences/Second"] + paused["step_us"] / 1e6) if paused else None
    )
    return {
        "served_1": s1,
        "s64_over_s1": s64 / s1,
        "s1_over_ort1": s1 / b["ort_b1"]["chars_per_s"],
        "s64_over_ort64": s64 / b["ort_b64"]["chars_per_s"],
        "ttfc_256_s": result["ttfc_256_s"][model_name],
        "ttfc_over_prime": result["ttfc_256_s"][model_name] / b["ort_prime_256"]["seconds"],
        "floor_1": floor["Chars/Second"],
        "bound_1": bound,
        "s1_over_bound": s1 / bound,
        "bound_1_paused": bound_paused,
        "s1_over_bound_paused": s1 / bound_paused if bound_paused else None,
        "server_cpu_us_per_char": top["Server CPU us/char"],
        "client_cpu_us_per_char": top["Client CPU us/char"],
        "server_cpu_over_ort64": top["Server CPU us/char"] / result["cpu"]["ort_b64_us_per_char"],
    }


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.bench", __doc__)
    add_model_dir(
        p,
        help="model directory (the TensorFlow baseline, the vocabulary)",
        default=str(ROOT / DEFAULT_MODEL_DIR),
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
    gen_onnx_ks = list(GEN_ONNX_KS) if ks else []
    if args.quick:
        args.length, levels, ks, gen_onnx_ks = 32, [1, 4], ks[:2], gen_onnx_ks[:1]
    repeat = 20 if args.quick else 300
    runs = 1 if args.quick else 3  # served runs per level (the median is kept) and floor runs

    from charrnn.data import load_splits
    from charrnn.model import load_model_dir  # noqa: F401  (fail early on a bad model directory)
    from charrnn.vocab import Vocab
    from serve.local_triton import LocalTriton

    vocab = Vocab.load(Path(args.model_dir) / "vocab.json")
    _, _, _, test = load_splits(args.data, vocab)
    repo = Path(args.repo)
    onnx_path = repo / ONNX / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise UserError(str(onnx_path), "not found", "run `make export`")
    prompt256 = test[:256]
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(args.model_dir).name,  # the model directory's name
        "load_average": {"start": os.getloadavg()[0]},
    }
    load = MachineLoad()
    print(f"machine: {result['machine']}, load average {os.getloadavg()}")
    print("[1/5] in-process baselines", flush=True)
    b = result["baselines"] = baselines(
        Path(args.model_dir), onnx_path, prompt256, repeat, args.threads
    )
    ort_threads = config_threads(repo, ONNX)
    ort64 = b["ort_b64"]["cpu_us_per_char"]
    if ort_threads != args.threads:  # the CPU reference runs with the served model's thread count
        from charrnn.contract import INPUT_IDS, LOGITS, STATE_IN, STATE_OUT
        from charrnn.onnx_runtime import ort_session

        session = ort_session(str(onnx_path), threads=ort_threads)
        dims = session.get_inputs()[1].shape[1:]
        feeds = {
            INPUT_IDS: np.zeros((64, 1), np.int32),
            STATE_IN: np.zeros((64, *dims), np.float32),
        }
        ort64 = timed_cpu(lambda: session.run([LOGITS, STATE_OUT], feeds), repeat)[1] * 1e6 / 64
    result["cpu"] = {
        "sequences": max(levels),
        "ort_b64_us_per_char": ort64,
        "ort_threads": ort_threads,
    }

    served, ttfc = {}, {}
    prime = b["ort_prime_256"]["seconds"]
    print("[2/5] the python backend: charrnn_python, charrnn_gen_python", flush=True)
    models = (PYTHON, GEN_PYTHON) if ks else (PYTHON,)

    def per_character(server, model_name: str) -> None:
        """One model's per-character sweep and its time to first character, into served and ttfc."""
        served[model_name] = served_sweep(server, model_name, vocab, test, levels, args, runs)
        ttfc[model_name] = time_to_first_char(
            server, vocab.decode(prompt256), 5 if args.quick else 20, model_name
        )
        print(
            f"  time to first char: {ttfc[model_name] * 1e3:.1f} ms ({ttfc[model_name] / prime:.2f}x ORT prime)"
        )

    with LocalTriton.on_free_ports(repo=repo, models=models) as server:
        per_character(server, PYTHON)
        result["chunked"] = chunked_section(server, vocab, test, args, ks) if ks else None
    print("[3/5] Triton's ONNX Runtime backend: charrnn_onnx, charrnn_gen_onnx", flush=True)
    models = (ONNX, GEN_ONNX) if gen_onnx_ks else (ONNX,)
    with LocalTriton.on_free_ports(repo=repo, models=models) as server:
        per_character(server, ONNX)
        chunked = result["chunked"]
        result["gen_onnx"] = (
            chunked_section(
                server,
                vocab,
                test,
                args,
                gen_onnx_ks,
                GEN_ONNX,
                tuple(levels),
                (chunked["ort_gen_k"], chunked["ort_gen_chars_per_s"]) if chunked else None,
            )
            if gen_onnx_ks
            else None
        )
    print("[4/5] round-trip floors: the same single stream against an empty model", flush=True)
    prompt = vocab.decode(test[: args.prompt_length])
    floor = {
        PYTHON: floor_run(repo, prompt, args.length, runs),
        ONNX: floor_onnx_run(repo, prompt, args.length, runs),
    }
    for model_name, row in floor.items():
        print(
            f"  empty model on {model_name}'s backend, 1 sequence: {row['Chars/Second']:7.0f} chars/s  "
            f"p50 {row['p50 latency']:6.0f} us",
            flush=True,
        )
    result["served"], result["ttfc_256_s"], result["floor"] = served, ttfc, floor
    print("[5/5] ratios and CPU per character", flush=True)
    result["ratios"] = {model_name: ratios(result, model_name) for model_name in PER_CHAR_MODELS}
    result["load_average"]["end"] = os.getloadavg()[0]
    result["machine_load"] = load.summary()  # every server has stopped: the rest is other work
    write_outputs(result, Path(args.out))
    print(f"\n{markdown(result)}\nwrote {args.out}/bench.csv, bench.png, bench.md, bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

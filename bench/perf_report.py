"""perf_analyzer's sweep next to our own client's, against the same server in one run (`make perf-slim`).

    python -m bench.perf_report --url 127.0.0.1:8001            # after bench/perf.sh wrote perf_<model>.csv
    python -m bench.perf_report --no-client                      # only perf_analyzer's tables and plot

Reads bench/results/perf_<model>.csv (perf_analyzer's -f columns, microseconds) and its per-run logs
perf_<model>_c<N>.log (the server's inference and execution counts, perf_analyzer's own CPU). Then, unless
--no-client, drives the same server with the project's client (bench.bench's served sweep: sequences primed with
64 test-split characters, 256 characters one request per character, seeded sampling) at the concurrencies
perf_analyzer ran on each per-character model it measured (charrnn_onnx on Triton's ONNX Runtime backend,
charrnn_python on the python backend), reading the server's statistics around each run for the average batch.
Writes bench/results/perf.md (the tables docs/benchmarks.md links), perf.json and perf.png.
Exit codes: 0 ok, 2 bad input (no perf_analyzer results), 3 the server is unreachable.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

from charrnn.cli import parser
from charrnn.deployment import MAIN
from charrnn.errors import UserError, cli
from charrnn.repository import PYTHON, STEP_MODELS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# the first per-character model of the report (our client's sweep)
PER_CHAR_MODEL = PYTHON
# One request per character (LOGITS back, the client samples): a table each, with our client next to it.
PER_CHAR_MODELS = STEP_MODELS
SERVER_TIMES = (
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
)


def read_perf(results: Path) -> dict[str, list[dict]]:
    """model -> rows of perf_<model>.csv, each with the average batch and perf_analyzer's CPU from its log."""
    out = {}
    for path in sorted(results.glob("perf_*.csv")):
        model = path.stem[len("perf_") :]
        if re.search(r"_c\d+$", model):
            continue  # a single run's file; the merged table is perf_<model>.csv
        rows = []
        with open(path) as f:
            for raw in csv.DictReader(f):
                row = {k: float(v) for k, v in raw.items() if k and v not in (None, "")}
                row.update(parse_log(results / f"perf_{model}_c{int(row['Concurrency'])}.log"))
                rows.append(row)
        out[model] = sorted(rows, key=lambda r: r["Concurrency"])
    return out


def parse_log(path: Path) -> dict:
    """Average batch (the server's inference count / execution count of the last, reported window) and
    perf_analyzer's CPU, from one run's log; missing pieces are left out."""
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    out = {}
    counts = re.findall(r"Inference count: (\d+)\s+Execution count: (\d+)", text)
    if counts:
        inferences, executions = map(int, counts[-1])
        out["Avg Batch"] = inferences / executions if executions else float("nan")
    cpu = re.search(r"perf_analyzer CPU: ([\d.]+) s over ([\d.]+) s wall", text)
    if cpu:
        out["Client CPU %"] = 100 * float(cpu.group(1)) / float(cpu.group(2))
    return out


def server_counts(url: str, model: str) -> tuple[int, int]:
    """(inference count, execution count) of a model since the server started."""
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(url)
    try:
        s = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        c.close()
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def client_sweep(
    url: str,
    levels: list[int],
    data: str,
    prompt_length: int,
    length: int,
    model: str = PER_CHAR_MODEL,
) -> list[dict]:
    """bench.bench's served sweep (our client) on `model` at `levels` against the server at `url`; each row
    names its model ("Model")."""
    from bench.bench import served_run, sweep_prompts
    from charrnn.data import load_splits
    from client.connection import Connection

    conn = Connection(url, "grpc")
    try:
        vocab = conn.vocabulary(conn.pick_model(model))
    finally:
        conn.close()
    _, _, _, test = load_splits(data, vocab)
    server = SimpleNamespace(grpc_url=url)
    served_run(server, [vocab.decode(test[:prompt_length])], 16, 0, model_name=model)  # warm-up
    rows = []
    for c in levels:
        inf0, exe0 = server_counts(url, model)
        row = served_run(
            server,
            sweep_prompts(vocab, test, c, prompt_length),
            length,
            seed=c,
            model_name=model,
        )
        inf1, exe1 = server_counts(url, model)
        row["Avg Batch"] = (inf1 - inf0) / max(1, exe1 - exe0)
        rows.append(row)
        print(
            f"  our client, {model}, {c:>3} sequences: {row['Inferences/Second']:7.0f} infer/s  "
            f"p50 {row['p50 latency']:6.0f} us  avg batch {row['Avg Batch']:.1f}  "
            f"client CPU {row['Client CPU %']:.0f}%",
            flush=True,
        )
    return rows


def fmt(value: float | None, digits: int = 0) -> str:
    return "" if value is None or value != value else f"{value:,.{digits}f}"


def markdown(
    perf: dict[str, list[dict]], ours: list[dict], chunk: int | None, machine: dict, date: str
) -> str:
    lines = [
        f"Measured by `make perf-slim` on {machine['cores']} cores ({machine['cpu']}), {machine['memory']}, "
        f"no GPU, {date}: perf_analyzer 2.60 in the `perf-slim` container and the project's client on the "
        "host, one after the other against the same `triton-slim` container; everything on one machine. "
        "Latencies in ms, server times in µs per request (perf_analyzer's server-side averages); average "
        "batch = the server's inferences / executions.",
        "",
    ]
    for model in [m for m in PER_CHAR_MODELS if m in perf]:
        by_c = {int(r["Concurrency"]): r for r in ours if r.get("Model", PER_CHAR_MODEL) == model}
        lines += [
            f"**{model}, one request per character.** perf_analyzer (teacher-forced streams) | our "
            "client (`python -m client`, sampling):",
            "",
            "| concurrency | perf_analyzer infer/s | p50 / p95 / p99 ms | avg batch | queue / input / infer "
            "/ output µs | perf_analyzer CPU | our client infer/s | p50 / p95 / p99 ms | avg batch | "
            "our client CPU |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in perf[model]:
            c = int(r["Concurrency"])
            o = by_c.get(c, {})
            lines.append(
                f"| {c} | {fmt(r['Inferences/Second'])} | "
                f"{fmt(r['p50 latency'] / 1e3, 2)} / {fmt(r['p95 latency'] / 1e3, 2)} / "
                f"{fmt(r['p99 latency'] / 1e3, 2)} | {fmt(r.get('Avg Batch'), 1)} | "
                f"{' / '.join(fmt(r[k]) for k in SERVER_TIMES)} | {fmt(r.get('Client CPU %'))}% | "
                + (
                    f"{fmt(o['Inferences/Second'])} | {fmt(o['p50 latency'] / 1e3, 2)} / "
                    f"{fmt(o['p95 latency'] / 1e3, 2)} / {fmt(o['p99 latency'] / 1e3, 2)} | "
                    f"{fmt(o['Avg Batch'], 1)} | {fmt(o['Client CPU %'])}% |"
                    if o
                    else "| | | |"
                )
            )
        lines.append("")
    for model, rows in perf.items():
        if model in PER_CHAR_MODELS:
            continue
        k = f"K = {chunk}" if chunk else "K characters"
        lines += [
            f"**{model}, {k} per request** (perf_analyzer; characters/s = infer/s × K):",
            "",
            "| concurrency | infer/s | chars/s | p50 / p95 / p99 ms | avg batch | queue / input / infer / "
            "output µs | perf_analyzer CPU |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            chars = r["Inferences/Second"] * chunk if chunk else None
            lines.append(
                f"| {int(r['Concurrency'])} | {fmt(r['Inferences/Second'], 1)} | {fmt(chars)} | "
                f"{fmt(r['p50 latency'] / 1e3, 1)} / {fmt(r['p95 latency'] / 1e3, 1)} / "
                f"{fmt(r['p99 latency'] / 1e3, 1)} | {fmt(r.get('Avg Batch'), 1)} | "
                f"{' / '.join(fmt(r[k]) for k in SERVER_TIMES)} | {fmt(r.get('Client CPU %'))}% |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(
    perf: dict[str, list[dict]], ours: list[dict], chunk: int | None, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = []
    for model, rows in perf.items():
        scale = chunk if model not in PER_CHAR_MODELS and chunk else 1
        series.append(
            (
                f"perf_analyzer, {model}" + (f" (K = {chunk})" if scale > 1 else ""),
                rows,
                scale,
                "o-",
            )
        )
    for model in PER_CHAR_MODELS:
        rows = [r for r in ours if r.get("Model", PER_CHAR_MODEL) == model]
        if rows:
            series.append((f"our client, {model}", rows, 1, "s--"))
    for label, rows, scale, style in series:
        c = [r["Concurrency"] for r in rows]
        a1.plot(c, [r["Inferences/Second"] * scale for r in rows], style, label=label)
        a2.plot(c, [r["p95 latency"] / 1e3 for r in rows], style, label=label)
    for ax, ylabel, name in (
        (a1, "characters / s", "Throughput"),
        (a2, "p95 latency per request (ms)", "p95 latency"),
    ):
        ax.set(xscale="log", yscale="log", xlabel="concurrent sequences", ylabel=ylabel, title=name)
        levels = sorted({int(r["Concurrency"]) for _, rows, _, _ in series for r in rows})
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chunk_of(results: Path) -> int | None:
    """K of the generation model's input data (NOISE rows per request)."""
    path = results / "perf_input_gen.json"
    try:
        step = json.loads(path.read_text())["data"][0][0]
        return int(step["NOISE"]["shape"][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.perf_report", __doc__)
    p.add_argument(
        "--results", type=Path, default=RESULTS, help="where perf.sh wrote perf_<model>.csv"
    )
    p.add_argument(
        "--url",
        default=f"127.0.0.1:{MAIN.ports.grpc}",
        help="gRPC host:port of the server perf_analyzer measured",
    )
    p.add_argument("--no-client", action="store_true", help="skip our client's sweep")
    p.add_argument(
        "--data",
        default=str(ROOT / "data" / "tinyshakespeare.txt"),
        help="our client's prompts come from its test split",
    )
    p.add_argument(
        "--prompt-length",
        type=int,
        default=64,
        help="characters each of our sequences is primed with",
    )
    p.add_argument(
        "--length", type=int, default=256, help="characters per sequence in our client's sweep"
    )
    args = p.parse_args(argv)

    from bench.bench import machine

    perf = read_perf(args.results)
    if not perf:
        raise UserError(
            str(args.results), "no perf_<model>.csv from perf_analyzer", "run `make perf-slim`"
        )
    ours = []  # our client's rows, every per-character model perf_analyzer measured (row["Model"])
    for model in [m for m in PER_CHAR_MODELS if m in perf and not args.no_client]:
        levels = [int(r["Concurrency"]) for r in perf[model]]
        print(f"our client on {model} against {args.url} at concurrency {levels}", flush=True)
        ours += client_sweep(args.url, levels, args.data, args.prompt_length, args.length, model)
    m, date, chunk = machine(), time.strftime("%Y-%m-%d"), chunk_of(args.results)
    md = markdown(perf, ours, chunk, m, date)
    (args.results / "perf.md").write_text(md + "\n")
    (args.results / "perf.json").write_text(
        json.dumps(
            {"machine": m, "date": date, "chunk": chunk, "perf_analyzer": perf, "client": ours},
            indent=2,
        )
        + "\n"
    )
    plot(
        perf,
        ours,
        chunk,
        args.results / "perf.png",
        f"perf_analyzer and our client vs triton-slim: {m['cores']} cores, {m['cpu']}",
    )
    print(f"\n{md}\nwrote {args.results}/perf.md, perf.json, perf.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

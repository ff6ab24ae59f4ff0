"""A/B of one python-model config parameter, side by side on ONE local Triton server, rounds interleaved.

    python -m bench.ab --model charrnn_gen_python --param intra_op_threads --values 1,2 --k 1,32,128
    python -m bench.ab --model charrnn_python --param intra_op_threads --values 1,2 --sequences 1,16,64

Copies `--model` once per value into a scratch repository (`<model>_<value>`, only that parameter
changed), serves all copies from one server and runs the same load on each copy in turn, `--rounds`
times, so every variant sees the same machine state. Step models (charrnn_python) generate one request
per character (client.generate); generation models (charrnn_gen_*) take K characters per request
(bench.chunked). Prints chars/s per round and the median. This is how the rows of bench/notes/ab.md
(docs/benchmarks.md, "Performance work") were measured; the machine is noisy, so claim only what holds in every
round.
Exit codes: 0 ok, 2 bad input, 3 the server did not start.
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from charrnn.cli import parser
from charrnn.errors import UserError, cli
from charrnn.repository import GEN_PYTHON

ROOT = Path(__file__).resolve().parent.parent


def make_variants(repo: Path, model: str, param: str, values: list[str], out: Path) -> list[str]:
    """Copies of repo/model into out/, one per value of config parameter `param`; returns their names."""
    src = repo / model / "config.pbtxt"
    if not src.is_file():
        raise UserError(str(src), "not found", "run `make export` (or pass --repo)")
    text = src.read_text()
    pattern = re.compile(
        r'(parameters \{ key: "%s" value: \{ string_value: ")[^"]*(" \} \})' % re.escape(param)
    )
    if not pattern.search(text):
        raise UserError(
            "--param", f"{model} has no config parameter {param!r}", "see its config.pbtxt"
        )
    names = []
    for value in values:
        name = f"{model}_{re.sub(r'[^A-Za-z0-9]', '_', value)}"
        (out / name / "1").mkdir(parents=True)
        for f in (repo / model / "1").iterdir():
            if f.is_file():
                shutil.copy(f, out / name / "1" / f.name)
        variant = pattern.sub(lambda m: m.group(1) + value + m.group(2), text)
        (out / name / "config.pbtxt").write_text(
            variant.replace(f'name: "{model}"', f'name: "{name}"', 1)
        )
        names.append(name)
    return names


def per_char_rate(url: str, model: str, vocab, prompts: list[str], length: int) -> float:
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import complete

    conn = Connection(url, "grpc")
    try:
        params = [SamplingParams(temperature=1.0, seed=i) for i in range(len(prompts))]
        t0 = time.perf_counter()
        seqs = complete(conn, model, vocab, prompts, length, params)
        return sum(len(s.generated) for s in seqs) / (time.perf_counter() - t0)
    finally:
        conn.close()


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.ab", __doc__)
    p.add_argument(
        "--repo", default=str(ROOT / "model_repository"), help="exported repository (make export)"
    )
    p.add_argument(
        "--data",
        default=str(ROOT / "data" / "tinyshakespeare.txt"),
        help="prompts come from its end",
    )
    p.add_argument("--model", default=GEN_PYTHON, help="a python-backend model of the repository")
    p.add_argument("--param", default="intra_op_threads", help="config parameter to vary")
    p.add_argument("--values", default="1,2", help="comma-separated values of --param")
    p.add_argument("--sequences", default="1,16", help="comma-separated concurrent sequence counts")
    p.add_argument(
        "--k", default="1,32,128", help="generation models: comma-separated characters per request"
    )
    p.add_argument("--length", type=int, default=256, help="characters generated per sequence")
    p.add_argument(
        "--rounds", type=int, default=2, help="times every variant runs the load, interleaved"
    )
    args = p.parse_args(argv)
    values = [v for v in args.values.split(",") if v]
    if len(values) < 2:
        raise UserError("--values", f"needs at least two values, got {args.values!r}")
    counts = [int(x) for x in args.sequences.split(",") if x]
    ks = [int(x) for x in args.k.split(",") if x]
    if min(counts, default=0) < 1 or min(ks, default=0) < 1 or args.rounds < 1 or args.length < 1:
        raise UserError("--sequences/--k/--rounds/--length", "need positive integers")

    from bench.chunked import bench_chunked
    from charrnn.repository import GEN_MODELS, PYTHON_MODELS, load_config, vocab_of
    from serve.local_triton import LocalTriton

    if args.model not in PYTHON_MODELS:
        raise UserError(
            "--model",
            f"{args.model!r} does not run on the local server",
            f"pick one of {', '.join(PYTHON_MODELS)}",
        )
    repo = Path(args.repo)
    scratch = Path(tempfile.mkdtemp(prefix="charrnn-ab-"))
    names = make_variants(repo, args.model, args.param, values, scratch / "repository")
    vocab = vocab_of(load_config(repo / args.model / "config.pbtxt"))
    text = Path(args.data).read_text()
    starts = np.linspace(len(text) - 20000, len(text) - 100, max(counts)).astype(int)
    prompts = [text[s : s + 64] for s in starts]
    gen = args.model in GEN_MODELS
    results: dict[tuple, list[float]] = {}
    server = LocalTriton.on_free_ports(
        repo=scratch / "repository", run_dir=scratch / "run", models=tuple(names)
    )
    print(
        f"A/B {args.model}: {args.param} = {values}; one server, {args.rounds} rounds; log {server.log_path}"
    )
    with server:
        for rnd in range(1, args.rounds + 1):
            for n in counts:
                for name in names:
                    if gen:
                        rows = bench_chunked(
                            server, vocab, prompts[:n], ks, args.length, name, sequences=(n,)
                        )
                        rates = [(r["K"], r["chars_per_s"]) for r in rows]
                    else:
                        per_char_rate(server.grpc_url, name, vocab, prompts[:1], 8)  # warm-up
                        rates = [
                            (
                                1,
                                per_char_rate(
                                    server.grpc_url, name, vocab, prompts[:n], args.length
                                ),
                            )
                        ]
                    for k, rate in rates:
                        results.setdefault((name, n, k), []).append(rate)
                        print(
                            f"  round {rnd}  {name:<28} {n:>3} sequences  K={k:<4} {rate:8.0f} chars/s",
                            flush=True,
                        )
    shutil.rmtree(scratch, ignore_errors=True)
    print("\n| sequences | K | " + " | ".join(f"{args.param}={v}" for v in values) + " |")
    print("|---:|---:|" + "---:|" * len(values))
    for n in counts:
        for k in (ks if gen else [1]):
            cells = [
                " / ".join(f"{x:.0f}" for x in results[(name, n, k)])
                + f" (median {statistics.median(results[(name, n, k)]):.0f})"
                for name in names
            ]
            print(f"| {n} | {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

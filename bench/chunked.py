"""Benchmark of server-side generation (client --chunk K on charrnn_gen_*); bench/bench.py runs it too.

    from bench.chunked import bench_chunked, ort_gen_chars_per_s
    rows = bench_chunked(server, vocab, prompts, K=(1, 8, 32, 128), length=256)
    ort = ort_gen_chars_per_s("model_repository/charrnn_gen_onnx/1/model.onnx", K=128)

    python -m bench.chunked [--repo model_repository] [--length 256]   # standalone: starts its own local server

For every K: one sequence alone, then 16 sequences on one gRPC stream (batched by the sequence batcher),
each primed with its prompt and generating `length` characters at K characters per request, seeded sampling
(temperature 1). K = 1 is one request per character, i.e. the per-character protocol on the gen model.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from charrnn.cli import parser
from charrnn.errors import cli
from charrnn.repository import GEN_ONNX, GEN_PYTHON

ROOT = Path(__file__).resolve().parent.parent
KS = (1, 8, 32, 128)
SEQUENCES = (1, 16)


def _url(server) -> str:
    return server if isinstance(server, str) else server.grpc_url


def chunked_run(
    server, vocab, prompts: list[str], k: int, length: int, model: str = GEN_PYTHON, seed: int = 0
) -> dict:
    """One timed run of K characters per request: chars/s, requests/s, per-request and first-character latency;
    with a server we started (a LocalTriton), its CPU time per character too (bench.bench.tree_cpu_seconds).
    """
    from bench.bench import server_pid, tree_cpu_seconds
    from charrnn.sampling import SamplingParams
    from client.connection import Connection
    from client.generate import complete

    pid = server_pid(server)
    conn = Connection(_url(server))
    try:
        params = [SamplingParams(temperature=1.0, seed=seed + i) for i in range(len(prompts))]
        server0 = tree_cpu_seconds(pid) if pid else 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        seqs = complete(conn, model, vocab, prompts, length, params, chunk=k)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        server_cpu = tree_cpu_seconds(pid) - server0 if pid else None
    finally:
        conn.close()
    latencies = [x for s in seqs for x in s.latencies]
    firsts = [x for s in seqs for x in s.first_char]
    chars = sum(len(s.generated) for s in seqs)
    extra = {} if server_cpu is None else {"server_cpu_us_per_char": 1e6 * server_cpu / chars}
    return {
        "model": model,
        "K": k,
        "sequences": len(prompts),
        "chars_per_s": chars / wall,
        "requests_per_s": len(latencies) / wall,
        "seconds": wall,
        "requests": len(latencies),
        "p50_request_ms": 1e3 * statistics.median(latencies),
        "p50_first_char_ms": 1e3 * statistics.median(firsts),
        "client_cpu_pct": 100 * cpu / wall,
        **extra,
    }


def bench_chunked(
    server,
    vocab,
    prompts: list[str],
    K: Iterable[int] | int = KS,
    length: int = 256,
    model: str = GEN_PYTHON,
    sequences: Iterable[int] = SEQUENCES,
    on_row=None,
) -> list[dict]:
    """chars/s of server-side generation for each K in `K`, single-stream and 16 sequences.

    server: a serve.local_triton.LocalTriton (or a gRPC host:port) serving `model`; prompts: at least one prompt
    (cycled to 16). Returns one dict per (K, sequences) with chars_per_s (plus requests/s, latencies, ...).
    """
    ks = [K] if isinstance(K, int) else list(K)
    chunked_run(server, vocab, prompts[:1], 8, 16, model)  # warm-up (ORT session, gRPC channel)
    rows = []
    for k in ks:
        for n in sequences:
            batch = [prompts[i % len(prompts)] for i in range(n)]
            row = chunked_run(server, vocab, batch, k, length, model, seed=100 * k + n)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def ort_gen_chars_per_s(
    onnx_path: str | Path, K: int = 128, batch: int = 1, repeat: int = 5, threads: int = 1
) -> float:
    """In-process ONNX Runtime: characters/s of the generation graph, `batch` rows x K characters per call."""
    from charrnn.contract import (
        GEN,
        INPUT_IDS,
        INPUTS,
        NOISE,
        STATE_IN,
        TEMPERATURE,
        TOP_K,
        tensors,
    )
    from charrnn.onnx_runtime import ort_session

    session = ort_session(onnx_path, threads)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    vocab = shapes[NOISE][2]
    rng = np.random.default_rng(0)
    values = {
        INPUT_IDS: rng.integers(0, vocab, (batch, 1)),
        STATE_IN: np.zeros((batch, *shapes[STATE_IN][1:])),
        NOISE: np.maximum(rng.random((batch, K, vocab), dtype=np.float32), np.float32(1e-7)),
        TEMPERATURE: np.ones((batch, 1)),
        TOP_K: np.zeros((batch, 1)),
    }
    # every input of the generation graph (charrnn.contract's table), in its dtype
    feeds = {t.name: np.asarray(values[t.name], t.dtype) for t in tensors(GEN, INPUTS)}
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return batch * K / statistics.median(times)


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.chunked", __doc__)
    p.add_argument(
        "--repo", default=str(ROOT / "model_repository"), help="exported repository (make export)"
    )
    p.add_argument(
        "--data",
        default=str(ROOT / "data" / "tinyshakespeare.txt"),
        help="prompts come from its end",
    )
    p.add_argument("--length", type=int, default=256, help="characters generated per sequence")
    p.add_argument(
        "--k", default=",".join(map(str, KS)), help="comma-separated characters per request"
    )
    p.add_argument("--model", default=GEN_PYTHON, help="generation model of the repository")
    args = p.parse_args(argv)
    import tempfile

    from charrnn.repository import DECOUPLED_MODELS, SHARED_PYTHON_MODELS, load_config, vocab_of
    from serve.local_triton import LocalTriton

    repo = Path(args.repo)
    vocab = vocab_of(load_config(repo / args.model / "config.pbtxt"))
    text = Path(args.data).read_text()
    prompts = [
        text[s : s + 64] for s in np.linspace(len(text) - 20000, len(text) - 100, 16).astype(int)
    ]
    ks = [int(x) for x in args.k.split(",") if x]
    print(
        f"in-process ORT, generation graph, batch 1, K=128: "
        f"{ort_gen_chars_per_s(repo / GEN_ONNX / '1' / 'model.onnx'):.0f} chars/s",
        flush=True,
    )
    server = LocalTriton.on_free_ports(
        repo=repo,
        run_dir=tempfile.mkdtemp(prefix="charrnn-bench-chunked-"),
        models=(args.model,) if args.model in DECOUPLED_MODELS else SHARED_PYTHON_MODELS,
    )
    with server:
        bench_chunked(
            server,
            vocab,
            prompts,
            ks,
            args.length,
            args.model,
            on_row=lambda r: print(
                f"  {r['model']} K={r['K']:>3} x{r['sequences']:>2}: {r['chars_per_s']:7.0f} chars/s, "
                f"{r['requests_per_s']:6.1f} req/s, p50 request {r['p50_request_ms']:.1f} ms, "
                f"first char {r['p50_first_char_ms']:.1f} ms",
                flush=True,
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make soak-mixed`: every python model at once, the way real and careless clients mix them, for a while.

    python -m bench.mixed_soak                     # 10 minutes
    python -m bench.mixed_soak --minutes 1         # a quick one

Starts the two local servers `make serve` starts (charrnn_python + charrnn_gen_python; charrnn_gen_stream on a
server of its own, charrnn/repository.py), runs every workload below once alone (its reference text), then in rounds,
all at once, until the time is up:
  per character over gRPC (4 seeded sequences on one stream), per character over HTTP (1 sequence),
  chunked over gRPC (charrnn_gen_python, K = 8, 4 sequences), streamed (charrnn_gen_stream, K = 8, 2 sequences),
  and bad requests: ids out of range over HTTP JSON and gRPC, a subnormal TEMPERATURE to the generation model,
  a request for a sequence never started.
Passes when no server crashed, every workload's text equals its reference every round, every bad request got
its error (HTTP 400 / INVALID_ARGUMENT, or the START error), and the servers' RSS (every process of each
server's group) after the last round is within --rss-bound-mib of the RSS after the first.
Exit codes: 0 ok, 1 a crash, a wrong text, a missing error or memory growth, 2 bad input, 3 a server did not start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.soak import group_rss, mib
from charrnn.cli import parser
from charrnn.contract import (
    GEN,
    INFER_KEY_ENV,
    INFER_KEY_HEADER,
    INPUT_IDS,
    NOISE,
    NOT_STARTED_MESSAGE,
    TEMPERATURE,
    TOP_K,
    request_inputs,
)
from charrnn.errors import CheckFailed, UserError, cli
from charrnn.repository import (
    DECOUPLED_MODELS,
    GEN_PYTHON,
    GEN_STREAM,
    PYTHON,
    SHARED_PYTHON_MODELS,
)

ROOT = Path(__file__).resolve().parent.parent


def workloads(main_url: str, main_http: str, stream_url: str, length: int) -> dict[str, list[str]]:
    """name -> `python -m client` arguments; seeded, so each always gives the same text."""
    common = ["--length", str(length), "--quiet", "--retries", "0"]
    return {
        "per-char gRPC x4": [
            "--url",
            main_url,
            "--model",
            PYTHON,
            "--num-sequences",
            "4",
            "--seed",
            "1",
            *common,
        ],
        "per-char HTTP": [
            "--url",
            main_http,
            "--protocol",
            "http",
            "--model",
            PYTHON,
            "--seed",
            "7",
            *common,
        ],
        "chunked K=8 x4": [
            "--url",
            main_url,
            "--model",
            GEN_PYTHON,
            "--chunk",
            "8",
            "--num-sequences",
            "4",
            "--seed",
            "11",
            *common,
        ],
        "streamed K=8 x2": [
            "--url",
            stream_url,
            "--model",
            GEN_STREAM,
            "--chunk",
            "8",
            "--num-sequences",
            "2",
            "--seed",
            "21",
            *common,
        ],
    }


def run_client(args: list[str], infer_key: str) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, INFER_KEY_ENV: infer_key},
    )
    return p.returncode, p.stdout, p.stderr


def bad_requests(
    main_url: str, main_http: str, infer_key: str, rng: np.random.Generator
) -> list[str]:
    """Send the bad requests; returns what did NOT get the error it should (empty: all refused correctly)."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    problems = []
    seq = int(rng.integers(9_000_000_000, 9_900_000_000))
    body = {
        "parameters": {"sequence_id": seq, "sequence_start": True, "sequence_end": True},
        "inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, 2], "data": [3, 99]}],
    }
    request = urllib.request.Request(
        f"http://{main_http}/v2/models/charrnn_python/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", INFER_KEY_HEADER: infer_key},
    )
    try:
        urllib.request.urlopen(request, timeout=60)
        problems.append("HTTP ids out of range: answered 200")
    except urllib.error.HTTPError as e:
        if e.code != 400:
            problems.append(f"HTTP ids out of range: status {e.code}")
    client = tg.InferenceServerClient(main_url)
    try:

        def refused(inputs, model, code, **kw) -> None:
            try:
                client.infer(model, inputs, sequence_id=seq + 1, **kw)
                problems.append(f"{model}: a bad request was answered")
            except InferenceServerException as e:
                if code not in str(e.status()) + e.message():
                    problems.append(f"{model}: {e.status()} {e.message()[:120]}")

        ids = tg.InferInput(INPUT_IDS, [1, 1], "INT32")
        ids.set_data_from_numpy(np.array([[-5]], np.int32))
        refused([ids], PYTHON, "INVALID_ARGUMENT", sequence_start=True, sequence_end=True)
        ids.set_data_from_numpy(np.array([[3]], np.int32))
        refused([ids], PYTHON, NOT_STARTED_MESSAGE, sequence_start=False)
        # A valid request but for a subnormal TEMPERATURE; every input of the table's GEN rows, in its dtype.
        values = {
            INPUT_IDS: [[3]],
            NOISE: np.full((1, 4, 65), 0.5),
            TEMPERATURE: [[1e-45]],
            TOP_K: [[0]],
        }
        gen = []
        for row in request_inputs(GEN):
            value = np.asarray(values[row.name], row.dtype)
            t = tg.InferInput(row.name, list(value.shape), row.triton_dtype)
            t.set_data_from_numpy(value)
            gen.append(t)
        refused(gen, GEN_PYTHON, "INVALID_ARGUMENT", sequence_start=True, sequence_end=True)
    finally:
        client.close()
    return problems


def server_rss(servers) -> int:
    return sum(sum(group_rss(s.process.pid).values()) for s in servers)


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.mixed_soak", __doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to keep the mixed load on")
    p.add_argument(
        "--length", type=int, default=300, help="characters per sequence of each workload"
    )
    p.add_argument(
        "--repo", default=str(ROOT / "model_repository"), help="exported repository (make export)"
    )
    p.add_argument(
        "--rss-bound-mib",
        type=float,
        default=64.0,
        help="fail if a server's RSS after the last round differs from after the first by more than this",
    )
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.length < 1:
        raise UserError(
            "--minutes/--length", f"must be positive, got {args.minutes} / {args.length}"
        )

    from serve.local_triton import LocalTriton

    run = Path(tempfile.mkdtemp(prefix="charrnn-mixed-soak-"))
    main_server = LocalTriton.on_free_ports(
        repo=args.repo, run_dir=run / "main", models=SHARED_PYTHON_MODELS
    )
    stream_server = LocalTriton.on_free_ports(
        repo=args.repo, run_dir=run / "stream", models=DECOUPLED_MODELS
    )
    servers = (main_server, stream_server)
    rng = np.random.default_rng(0)
    with main_server, stream_server:
        work = workloads(
            main_server.grpc_url, main_server.http_url, stream_server.grpc_url, args.length
        )
        sequences = sum(
            int(cmd[cmd.index("--num-sequences") + 1]) if "--num-sequences" in cmd else 1
            for cmd in work.values()
        )
        reference = {}
        for name, cmd in work.items():  # alone: the texts every round must reproduce
            code, out, err = run_client(cmd, main_server.infer_key)
            if code:
                raise CheckFailed(name, f"failed alone (exit {code}): {err.strip()[-300:]}")
            reference[name] = out
        print(f"references: {len(reference)} workloads alone; logs in {run}", flush=True)
        t_end, rounds, rss_first, chars = time.monotonic() + 60 * args.minutes, 0, None, 0
        with ThreadPoolExecutor(len(work) + 1) as pool:
            while time.monotonic() < t_end:
                t0 = time.monotonic()
                futures = {
                    name: pool.submit(run_client, cmd, main_server.infer_key)
                    for name, cmd in work.items()
                }
                bad = pool.submit(
                    bad_requests,
                    main_server.grpc_url,
                    main_server.http_url,
                    main_server.infer_key,
                    rng,
                )
                rounds += 1
                for name, future in futures.items():
                    code, out, err = future.result()
                    if code or out != reference[name]:
                        died = [s.log_path for s in servers if s.process.poll() is not None]
                        raise CheckFailed(
                            f"round {rounds}, {name}",
                            (
                                f"exit {code}: {err.strip()[-300:]}"
                                if code
                                else "the text differs from its run alone"
                            )
                            + (f"; a server died, see {', '.join(map(str, died))}" if died else ""),
                        )
                if problems := bad.result():
                    raise CheckFailed(f"round {rounds}, bad requests", "; ".join(problems))
                if not all(s.is_ready() for s in servers):
                    raise CheckFailed(f"round {rounds}", "a server is not ready after the round")
                chars += args.length * sequences
                if rss_first is None:
                    rss_first = server_rss(servers)
                print(
                    f"round {rounds}: {time.monotonic() - t0:.1f} s, every text equal to its run alone, bad "
                    f"requests refused; servers' RSS {mib(server_rss(servers))}",
                    flush=True,
                )
        rss_last = server_rss(servers)
    growth = rss_last - rss_first
    print(
        f"mixed soak: {rounds} rounds in {args.minutes:g} min, {chars:,} characters, 0 crashes, 0 wrong texts; "
        f"servers' RSS {mib(rss_first)} after round 1, {mib(rss_last)} at the end ({growth / 2**20:+.1f} MiB, "
        f"bound ±{args.rss_bound_mib:g} MiB)"
    )
    if abs(growth) > args.rss_bound_mib * 2**20:
        raise CheckFailed(
            "memory", f"the servers' RSS grew by {mib(growth)} (bound {args.rss_bound_mib:g} MiB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

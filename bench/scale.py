"""Scale-out benchmark: characters/s of 64 sequences through HAProxy with 1, 2 and 3 replicas, against one
replica direct, side by side in one run (compose profiles `slim` and `scale`; docs/scaling.md).

    python -m bench.scale                               # `make bench-scale`; writes bench/results/scale.md, .json
    python -m bench.scale --replicas 1 2 --length 100   # a shorter run
    python -m bench.scale --cpus 0                      # replicas without a CPU cap (they share every core)

Every replica gets a fixed CPU share, --cpus cores (default 0.4; compose's `cpus`, from TRITON_REPLICA_CPUS, which
this sets), and so does the baseline, one replica direct (triton-slim, capped the same way with `docker update`;
both checked with `docker inspect`): on a 2-core machine one uncapped replica already takes every core, so N
uncapped replicas only share them, and the run measures the proxy and the client instead of scale-out.
Each configuration runs the same seeded sequences (each of --models, one request per character, temperature 1)
with our client: direct on triton-slim's gRPC port; through the proxy with --shards 2N streams (N replicas;
--streams-per-replica S gives S x N). Besides chars/s it reports where the time and CPU went during the run: each
container's CPU time (the replicas, the proxy) and the client's own, in cores and as a share of the machine's
cores, and per server Triton's statistics (its share of the requests, its average batch), and the speed-up
against one capped replica direct (goals: >= 1.8x with 2 replicas, >= 2.5x with 3).
Exit codes: 0 ok, 2 bad input, 3 Docker or the images missing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import psutil

from charrnn.cli import parser
from charrnn.deployment import CONTAINER_PORTS
from charrnn.errors import UnavailableError, UserError, cli
from charrnn.repository import ONNX, PYTHON, STEP_MODELS
from charrnn.sampling import SamplingParams
from serve.local_triton import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING HENRY VI:\nO", "First Citizen:\n"]
# measured in every configuration; the first one's figures are the row's own
MODELS = (
    ONNX,
    PYTHON,
)
CPUS_ENV = "TRITON_REPLICA_CPUS"  # docker-compose.yml: triton-replica's `cpus`
GOALS = {2: 1.8, 3: 2.5}  # replicas -> speed-up over one capped replica direct


class Compose:
    """One compose project of the slim and scale profiles on free loopback ports, serving `repo`, each
    replica capped at `cpus` cores (0: no cap)."""

    def __init__(self, repo: Path, cpus: float = 0.0) -> None:
        self.project = f"charrnn-bench-scale-{secrets.token_hex(3)}"
        self.cpus = cpus
        self.ports = {
            n: free_port() for n in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "HAPROXY_STATS_PORT")
        }
        self.env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "TRITON_ADMIN_KEY": secrets.token_hex(16),
            "TRITON_INFER_KEY": secrets.token_hex(16),
            "MODEL_REPOSITORY": str(repo.resolve()),
            CPUS_ENV: f"{cpus:g}",
        }

    def run(self, *args: str) -> str:
        cmd = [
            "docker",
            "compose",
            "-p",
            self.project,
            "--profile",
            "slim",
            "--profile",
            "scale",
            *args,
        ]
        r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0 and ("pull access denied" in r.stderr or "No such image" in r.stderr):
            raise UnavailableError(
                "the slim and proxy images",
                "not built",
                "run `make images` (make bench-scale does)",
            )
        if r.returncode != 0:
            raise UserError(
                "docker compose " + " ".join(args),
                r.stderr.strip()[-400:],
                "see `docker compose logs`",
            )
        return r.stdout

    def containers(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).split()

    def cap(self, service: str) -> None:
        """Give `service`'s containers this run's CPU cap (`docker update --cpus`, the same CFS quota compose's
        `cpus` sets) and check every container of it has it (NanoCpus); used for the direct baseline.
        """
        for container in self.containers(service):
            if self.cpus > 0:
                subprocess.run(
                    ["docker", "update", "--cpus", f"{self.cpus:g}", container],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
        self.check_cap(service)

    def check_cap(self, service: str) -> None:
        want = round(self.cpus * 1e9)
        for container in self.containers(service):
            got = int(
                subprocess.run(
                    ["docker", "inspect", "--format", "{{.HostConfig.NanoCpus}}", container],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout.strip()
            )
            if got != want:
                raise UserError(
                    f"{service} {container[:12]}",
                    f"NanoCpus {got}, expected {want} (--cpus {self.cpus:g})",
                    f"check docker-compose.yml's `cpus: ${{{CPUS_ENV}:-0}}`",
                )

    def cpu_seconds(self) -> dict[str, float]:
        """{service or container id: CPU seconds its processes used so far}: user + system time of every process
        `docker top` lists (host pids, psutil's cpu_times), so it reads the same under cgroup v1 and v2. Per
        service ("triton-slim", "triton-replica", "proxy") and per replica container ("replica:<id>").
        """
        out: dict[str, float] = {}
        for service in ("triton-slim", "triton-replica", "proxy"):
            for container in self.containers(service):
                top = subprocess.run(
                    ["docker", "top", container, "-eo", "pid"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.split()[1:]
                for pid in top:
                    try:
                        times = psutil.Process(int(pid)).cpu_times()
                    except (ValueError, psutil.Error):
                        continue  # gone meanwhile
                    seconds = times.user + times.system
                    out[service] = out.get(service, 0.0) + seconds
                    if service != "proxy":
                        key = f"replica:{container[:12]}"
                        out[key] = out.get(key, 0.0) + seconds
        return out

    def model_stats(self, service: str, model: str) -> dict[str, dict]:
        """{container id: Triton's statistics of `model` there} for each container of `service`, read inside
        the container (replicas publish no port; statistics is not a restricted API)."""
        code = (
            "import urllib.request as u; print(u.urlopen("
            f"'http://127.0.0.1:{CONTAINER_PORTS.http}/v2/models/"
            f"{model}/stats', timeout=10).read().decode())"
        )
        out = {}
        for container in self.containers(service):
            r = subprocess.run(
                ["docker", "exec", container, "python3", "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.returncode == 0:
                out[container[:12]] = json.loads(r.stdout)["model_stats"][0]
        return out


def stats_delta(before: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """Per server container, what the timed run added to Triton's statistics: requests, executions (their
    ratio is the average batch), queue and compute_infer time per request."""
    rows = []
    for container, a in sorted(after.items()):
        b = before.get(container, {})

        def count(stats: dict, key: str) -> int:
            return int(stats.get(key, 0))

        def ns(stats: dict, key: str) -> int:
            return int(stats.get("inference_stats", {}).get(key, {}).get("ns", 0))

        requests = count(a, "inference_count") - count(b, "inference_count")
        executions = count(a, "execution_count") - count(b, "execution_count")
        rows.append(
            {
                "container": container,
                "requests": requests,
                "executions": executions,
                "avg_batch": round(requests / executions, 1) if executions else 0.0,
                **{
                    f"{k}_us_per_request": round((ns(a, k) - ns(b, k)) / 1e3 / max(1, requests))
                    for k in ("queue", "compute_input", "compute_infer", "compute_output")
                },
            }
        )
    return rows


def measure(c: Compose, url: str, shards: int, sequences: int, length: int, model: str) -> dict:
    from client.connection import Connection
    from client.generate import complete

    conn = Connection(url, "grpc", shards=shards)
    try:
        vocab = conn.vocabulary(model)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sequences)]
        # warm-up
        complete(conn, model, vocab, prompts[:shards], 20, [SamplingParams(greedy=True)] * shards)
        params = [SamplingParams(temperature=1.0, seed=i) for i in range(sequences)]
        service = "triton-replica" if shards > 1 else "triton-slim"
        stats0 = c.model_stats(service, model)  # outside the CPU window: docker exec runs in there
        cpu0, own0, t0 = c.cpu_seconds(), time.process_time(), time.perf_counter()
        seqs = complete(conn, model, vocab, prompts, length, params)
        wall, own = time.perf_counter() - t0, time.process_time() - own0
        cpu1 = c.cpu_seconds()
        stats1 = c.model_stats(service, model)
    finally:
        conn.close()
    cores = os.cpu_count() or 1
    used = {k: (cpu1[k] - cpu0.get(k, 0.0)) / wall for k in cpu1}  # cores busy on average
    share = {k: 100 * v / cores for k, v in used.items() if not k.startswith("replica:")}
    per_replica = [v for k, v in sorted(used.items()) if k.startswith("replica:")]  # by container
    return {
        "model": model,
        "chars_per_s": sum(len(s.generated) for s in seqs) / wall,
        "seconds": wall,
        "cpu_pct_of_machine": {
            **{k: round(v, 1) for k, v in share.items()},
            "client": round(100 * own / wall / cores, 1),
        },
        # cores each server container used on average (capped ones cannot exceed --cpus), in the order of
        # their container ids, like "servers"
        "replica_cores": [round(v, 3) for v in per_replica],
        "client_cores": round(own / wall, 3),
        # Triton's statistics per server: how the sequences spread, the batches, queue and inference times
        "servers": stats_delta(stats0, stats1),
    }


def markdown(rows: list[dict], info: dict) -> str:
    cap = info.get("cpus", 0)
    cap_text = f"capped at {cap:g} cores each (compose `cpus`)" if cap else "uncapped"
    lines = [
        f"# Scale-out: {info['sequences']} sequences x {info['length']} characters",
        "",
        f"{info['date']}, {info['machine']}; load average (1 min) {info.get('load_start', 0):.2f} at the "
        f"start, {info.get('load_end', 0):.2f} at the end. One run, configurations side by side. Every "
        f"server {cap_text}, the direct baseline too; through the proxy the client opens "
        f"{info.get('streams_per_replica', 2)} gRPC streams per replica (each stream's sequences go to one "
        "replica). Replica CPU: cores each server container used on average during the timed run; "
        "requests and average batch per replica: Triton's statistics; proxy and client CPU: % of the "
        "machine's cores.",
        "",
    ]
    for model in info.get("models", [PYTHON]):
        found = [(r, r["models"][model]) for r in rows if model in r.get("models", {})]
        if not found:
            continue
        direct = next((m for r, m in found if r["config"] == "direct"), found[0][1])["chars_per_s"]
        lines += [
            f"**{model}**, one request per character:",
            "",
            "| configuration | chars/s | vs one replica direct | goal | replica CPU (cores each) | "
            "requests per replica (%) | avg batch per replica | proxy CPU | client CPU |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r, m in found:
            cpu = m["cpu_pct_of_machine"]
            speedup = m["chars_per_s"] / direct
            goal = GOALS.get(r.get("replicas")) if r["config"] != "direct" else None
            goal_text = (
                f">= {goal}x: {'**met**' if speedup >= goal else '**missed**'}" if goal else ""
            )
            replicas = " / ".join(f"{x:.2f}" for x in m.get("replica_cores", []))
            servers = m.get("servers", [])
            total = sum(x["requests"] for x in servers) or 1
            share = " / ".join(f"{100 * x['requests'] / total:.0f}" for x in servers)
            batch = " / ".join(f"{x['avg_batch']:.1f}" for x in servers)
            lines.append(
                f"| {r['config']} | {m['chars_per_s']:,.0f} | {speedup:.2f}x | {goal_text} | "
                f"{replicas} | {share} | {batch} | {cpu.get('proxy', 0.0):.0f}% | "
                f"{cpu['client']:.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.scale", __doc__)
    p.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts behind the proxy"
    )
    p.add_argument("--sequences", type=int, default=64, help="concurrent sequences")
    p.add_argument("--length", type=int, default=200, help="characters per sequence")
    p.add_argument(
        "--cpus",
        type=float,
        default=0.4,
        help=f"CPU cap of every server, in cores (sets {CPUS_ENV}; 0: no cap)",
    )
    p.add_argument(
        "--streams-per-replica",
        type=int,
        default=2,
        help="gRPC streams (client --shards) per replica behind the proxy (the docs' K >= 2N)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help="per-character models measured in every configuration",
    )
    p.add_argument(
        "--repo", default=str(ROOT / "model_repository"), help="exported model repository"
    )
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results"), help="where scale.md and scale.json go"
    )
    args = p.parse_args(argv)
    if not all(1 <= n <= 8 for n in args.replicas):
        raise UserError(
            "--replicas", f"each must be in 1..8 (haproxy.cfg's server slots), got {args.replicas}"
        )
    if not 0 <= args.cpus <= (os.cpu_count() or 1):
        raise UserError("--cpus", f"must be in 0..{os.cpu_count()} cores, got {args.cpus:g}")
    if not 1 <= args.streams_per_replica * max(args.replicas) <= 64:
        raise UserError(
            "--streams-per-replica",
            f"{args.streams_per_replica} x {max(args.replicas)} replicas: the client opens 1..64 streams",
        )
    unknown = [m for m in args.models if m not in STEP_MODELS]
    if unknown:
        raise UserError(
            "--models",
            f"{', '.join(unknown)}: not a per-character model",
            f"choose from {', '.join(STEP_MODELS)}",
        )
    from bench.bench import machine
    from serve.scale import stats_url, wait_for_replicas

    c = Compose(Path(args.repo), args.cpus)
    grpc = f"127.0.0.1:{c.ports['TRITON_GRPC_PORT']}"
    load_start = os.getloadavg()[0]
    rows = []

    def measure_all(config: str, replicas: int, shards: int) -> None:
        found = {}
        for model in args.models:
            found[model] = measure(c, grpc, shards, args.sequences, args.length, model)
            print(f"  {model}: {found[model]['chars_per_s']:,.0f} chars/s", flush=True)
        first = found[args.models[0]]
        rows.append(
            {
                "config": config,
                "replicas": replicas,
                # the first model's figures, as before --models; every model's under "models"
                "chars_per_s": first["chars_per_s"],
                "seconds": first["seconds"],
                "cpu_pct_of_machine": first["cpu_pct_of_machine"],
                "models": found,
            }
        )

    try:
        c.run("up", "-d", "--wait", "triton-slim")
        c.cap("triton-slim")
        print(f"direct: one replica capped at {args.cpus:g} cores, no proxy ...", flush=True)
        measure_all("direct", 1, 1)
        c.run("rm", "-s", "-f", "triton-slim")
        for n in args.replicas:
            c.run("up", "-d", "--wait", "--scale", f"triton-replica={n}", "proxy", "triton-replica")
            c.check_cap("triton-replica")
            if wait_for_replicas(n, stats_url(c.ports["HAPROXY_STATS_PORT"]), timeout=90):
                raise UserError(
                    "proxy", f"fewer than {n} replicas UP", "see `docker compose logs proxy`"
                )
            shards = args.streams_per_replica * n
            print(f"proxy + {n} replica(s), {shards} streams ...", flush=True)
            measure_all(f"proxy, {n} replica(s)", n, shards)
    finally:
        c.run("down", "--remove-orphans", "--volumes")
    m = machine()
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory')}",
        "sequences": args.sequences,
        "length": args.length,
        "cpus": args.cpus,
        "streams_per_replica": args.streams_per_replica,
        "models": args.models,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

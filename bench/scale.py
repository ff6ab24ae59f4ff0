"""Scale-out benchmark: characters/s of 64 sequences through HAProxy with 1, 2 and 3 replicas, against one
replica direct, side by side in one run (compose profiles `slim` and `scale`; docs/scaling.md).

    python -m bench.scale                               # `make bench-scale`; writes bench/results/scale.md, .json
    python -m bench.scale --replicas 1 2 --length 100   # a shorter run

Each configuration runs the same seeded sequences (charrnn_python, one request per character, temperature 1)
with our client: direct on triton-slim's gRPC port; through the proxy with --shards 2N streams. Besides chars/s
it reports where the CPU went during the run: each container's cgroup CPU time (the replicas, the proxy) and
the client's own, as a share of the machine's cores.
Exit codes: 0 ok, 2 bad input, 3 Docker or the images missing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from charrnn.cli import parser
from charrnn.errors import UnavailableError, UserError, cli
from charrnn.local_triton import free_port
from charrnn.repository import PYTHON
from charrnn.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING HENRY VI:\nO", "First Citizen:\n"]


class Compose:
    """One compose project of the slim and scale profiles on free loopback ports, serving `repo`."""

    def __init__(self, repo: Path) -> None:
        self.project = f"charrnn-bench-scale-{secrets.token_hex(3)}"
        self.ports = {
            n: free_port() for n in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "HAPROXY_STATS_PORT")
        }
        self.env = {
            **os.environ,
            **{k: str(v) for k, v in self.ports.items()},
            "TRITON_ADMIN_KEY": secrets.token_hex(16),
            "TRITON_INFER_KEY": secrets.token_hex(16),
            "MODEL_REPOSITORY": str(repo.resolve()),
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

    def cpu_seconds(self) -> dict[str, float]:
        """{service: CPU seconds its containers' processes used so far}: user + system time of every process
        `docker top` lists (host pids, /proc/<pid>/stat), so it reads the same under cgroup v1 and v2.
        """
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for service in ("triton-slim", "triton-replica", "proxy"):
            for container in self.run("ps", "-q", service).split():
                top = subprocess.run(
                    ["docker", "top", container, "-eo", "pid"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                ).stdout.split()[1:]
                for pid in top:
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue  # gone meanwhile
                    out[service] = (
                        out.get(service, 0.0) + (int(fields[11]) + int(fields[12])) / tick
                    )
        return out


def measure(c: Compose, url: str, shards: int, sequences: int, length: int) -> dict:
    from client.connection import Connection
    from client.generate import generate

    conn = Connection(url, "grpc", shards=shards)
    try:
        vocab = conn.vocabulary(PYTHON)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sequences)]
        generate(
            conn, PYTHON, vocab, prompts[:shards], 20, [SamplingParams(greedy=True)] * shards
        )  # warm-up
        params = [SamplingParams(temperature=1.0, seed=i) for i in range(sequences)]
        cpu0, own0, t0 = c.cpu_seconds(), time.process_time(), time.perf_counter()
        seqs = generate(conn, PYTHON, vocab, prompts, length, params)
        wall, own = time.perf_counter() - t0, time.process_time() - own0
        cpu1 = c.cpu_seconds()
    finally:
        conn.close()
    cores = os.cpu_count() or 1
    share = {s: 100 * (cpu1[s] - cpu0.get(s, 0.0)) / wall / cores for s in cpu1}
    return {
        "chars_per_s": sum(len(s.generated) for s in seqs) / wall,
        "seconds": wall,
        "cpu_pct_of_machine": {
            **{k: round(v, 1) for k, v in share.items()},
            "client": round(100 * own / wall / cores, 1),
        },
    }


def markdown(rows: list[dict], info: dict) -> str:
    direct = next(r for r in rows if r["config"] == "direct")["chars_per_s"]
    lines = [
        f"# Scale-out: {info['sequences']} sequences x {info['length']} characters ({PYTHON})",
        "",
        f"{info['date']}, {info['machine']}. One run, configurations side by side; CPU is % of the "
        "machine's cores during the timed run.",
        "",
        "| configuration | chars/s | vs direct | replicas CPU | proxy CPU | client CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r["cpu_pct_of_machine"]
        replicas = cpu.get("triton-replica", cpu.get("triton-slim", 0.0))
        lines.append(
            f"| {r['config']} | {r['chars_per_s']:,.0f} | {r['chars_per_s'] / direct:.2f}x | "
            f"{replicas:.0f}% | {cpu.get('proxy', 0.0):.0f}% | {cpu['client']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m bench.scale", __doc__)
    p.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts behind the proxy"
    )
    p.add_argument("--sequences", type=int, default=64, help="concurrent sequences")
    p.add_argument("--length", type=int, default=200, help="characters per sequence")
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
    from bench.bench import machine
    from serve.scale import stats_url, wait_for_replicas

    c = Compose(Path(args.repo))
    grpc = f"127.0.0.1:{c.ports['TRITON_GRPC_PORT']}"
    rows = []
    try:
        c.run("up", "-d", "--wait", "triton-slim")
        print("direct: one replica, no proxy ...", flush=True)
        rows.append({"config": "direct", **measure(c, grpc, 1, args.sequences, args.length)})
        c.run("rm", "-s", "-f", "triton-slim")
        for n in args.replicas:
            c.run("up", "-d", "--wait", "--scale", f"triton-replica={n}", "proxy", "triton-replica")
            if wait_for_replicas(n, stats_url(c.ports["HAPROXY_STATS_PORT"]), timeout=90):
                raise UserError(
                    "proxy", f"fewer than {n} replicas UP", "see `docker compose logs proxy`"
                )
            print(f"proxy + {n} replica(s), {2 * n} streams ...", flush=True)
            rows.append(
                {
                    "config": f"proxy, {n} replica(s)",
                    **measure(c, grpc, 2 * n, args.sequences, args.length),
                }
            )
    finally:
        c.run("down", "--remove-orphans", "--volumes")
    m = machine()
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory')}",
        "sequences": args.sequences,
        "length": args.length,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make serve` / `make stop`: a real Triton server without Docker (serve/local_triton.py).

    python -m serve.local start [--grpc-port 8001 --http-port 8000 --metrics-port 8002]   # `make serve`
    python -m serve.local stop                                                           # `make stop`
    python -m serve.local status
    python -m serve.local run        # foreground; Ctrl-C or SIGTERM stops it, exit 3 if a server dies
    python -m serve.local start --run-dir /tmp/mine --http-port 9000 --grpc-port 9001 --metrics-port 9002 \\
        --stream-http-port 9010 --stream-grpc-port 9011 --stream-metrics-port 9012   # another set, its own files

The wheel's server (2.51.0) runs the python backend and Triton's ONNX Runtime backend, built from source by
`make backend` (serve/backend.py); every model that runs without a GPU is loaded: charrnn_onnx and
charrnn_gen_onnx (the exported graphs; Triton keeps each sequence's state), and the python models. `start`
starts two servers: the decoupled charrnn_gen_stream runs in a tritonserver of its own (--stream-*-port,
default 8010-8012), because 2.51 crashes when decoupled and non-decoupled models stream on one server
(docs/failures.md); `--models` asks for one server with those models (names of folders of --repo; the launcher
refuses a decoupled model next to a non-decoupled one, as their configs say, however the names are spelled).
With `--tritonserver PATH` (e.g. a real install's `tritonserver` on PATH) the same launcher runs that binary
with its own backends and every model of --repo: the decoupled ones on the second server.
Safe defaults: loopback addresses, model control mode none, restricted admin APIs, logs to a file, and HTTP
inference only with the inference key (header infer-key; $TRITON_INFER_KEY, else a random key that `start`
writes to <run-dir>/infer-key). gRPC inference is open.
Run directory (--run-dir, default logs/serve): the log triton.log, the PID file triton.pid (each server's pid and
ports, recorded as soon as the server is spawned), the lock serve.lock, the key file infer-key, the backend
directory and the repository view; the second server's own files are in <run-dir>-stream (logs/serve-stream).
Both are private (0700, files 0600), and no key is written to a log.
One launcher at a time per run directory: start, run, stop and status take the lock (flock on serve.lock). A
start or run while a server of the run directory is starting or running is refused (exit 2) with its pid and
ports; stop waits for a start in progress, then stops every recorded server. A server that died (killed,
crashed, or a zombie its parent has not reaped) is "not running" for status, and the next start removes what
it left (python stubs, shared memory) without a stop. `run` exits 3 when a server dies, so a supervisor
restarts it (systemd Restart=on-failure: docs/production.md).
Exit codes: 0 ok, 2 bad input or a server of the run directory already running, 3 a server did not become
ready or died (its log is printed).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from charrnn.cli import parser
from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.deployment import MAIN, SERVERS, Server
from charrnn.errors import UnavailableError, UserError, cli
from charrnn.repository import DECOUPLED_MODELS, SHARED_CPU_MODELS

from .local_triton import (
    DEFAULT_RUN_DIR,
    PRIVATE_UMASK,
    ROOT,
    LocalTriton,
    group_members,
    kill_group,
    private_run_dir,
    proc_stat,
    process_state,
    repository_models,
    resolve_models,
    stop_group,
)

# --- CLI: make serve / make stop --------------------------------------------------------------------
PID_NAME, LOCK_NAME, KEY_NAME = "triton.pid", "serve.lock", "infer-key"
PID_FILE = DEFAULT_RUN_DIR / PID_NAME
# Seconds a launcher waits for another one's stop or status (a stop: for a start too) to finish.
LOCK_WAIT = 300.0
ACTIONS = {
    "start": "start the servers in the background and return once they are ready (`make serve`)",
    "stop": "stop the servers `start` recorded (`make stop`)",
    "run": "start the servers in the foreground; Ctrl-C stops them",
    "status": "say whether the servers `start` recorded are running",
}
STARTING = ("start", "run")


def stream_run_dir(run_dir: Path) -> Path:
    """The second server's run directory: logs/serve -> logs/serve-stream."""
    return run_dir.with_name(run_dir.name + "-stream")


def stop_command(run_dir: Path) -> str:
    flag = "" if run_dir == DEFAULT_RUN_DIR else f" --run-dir {run_dir}"
    return f"python -m serve.local stop{flag}"


# --- the PID file: one line per server, written as soon as the server is spawned ---------------------------
@dataclass
class Record:
    """One server of the PID file: `<pid> start_time=<ticks> http=<port> grpc=<port> metrics=<port>
    mode=<start|run> launcher=<pid> run_dir=<path>` (an older file's bare `<pid>` lines read too).
    """

    pid: int
    # /proc/<pid>/stat field 22: tells the server from a later process that got its pid
    start_time: int | None = None
    http: int | None = None
    grpc: int | None = None
    metrics: int | None = None
    mode: str = "start"
    launcher: int | None = None
    run_dir: Path | None = None

    @classmethod
    def of(cls, server: LocalTriton, mode: str) -> "Record":
        pid = server.process.pid
        stat = proc_stat(pid)  # our child, not yet reaped: there even if it died already
        return cls(
            pid,
            stat[3] if stat else None,
            server.http_port,
            server.grpc_port,
            server.metrics_port,
            mode,
            os.getpid(),
            server.run_dir,
        )

    def line(self) -> str:
        return (
            f"{self.pid} start_time={self.start_time} http={self.http} grpc={self.grpc} "
            f"metrics={self.metrics} mode={self.mode} launcher={self.launcher} run_dir={self.run_dir}\n"
        )

    @classmethod
    def parse(cls, line: str) -> "Record | None":
        head, _, run_dir = line.strip().partition(" run_dir=")
        tokens = head.split()
        if not tokens or not tokens[0].isdigit():
            return None
        fields = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)

        def number(key: str) -> int | None:
            value = fields.get(key, "")
            return int(value) if value.isdigit() else None

        return cls(
            int(tokens[0]),
            number("start_time"),
            number("http"),
            number("grpc"),
            number("metrics"),
            fields.get("mode", "start"),
            number("launcher"),
            Path(run_dir) if run_dir else None,
        )

    def where(self) -> str:
        ports = ", ".join(
            f"{name} 127.0.0.1:{port}"
            for name, port in (("grpc", self.grpc), ("http", self.http), ("metrics", self.metrics))
            if port is not None
        )
        by = f", run in the foreground by pid {self.launcher}" if self.mode == "run" else ""
        return f"pid {self.pid}" + (f" ({ports}{by})" if ports else "")

    def state(self) -> str:
        """process_state of the server: running, zombie, exited or reused."""
        state = process_state(self.pid, self.start_time)
        # an older PID file: no start time to compare
        if state == "running" and self.start_time is None:
            try:
                if Path(f"/proc/{self.pid}/comm").read_text().strip() != "tritonserver":
                    return "reused"
            except OSError:
                return "exited"
        return state

    def describe(self) -> str:
        state = self.state()
        if state == "running":
            return "running"
        if state == "reused":
            return "not running (its pid is another process now)"
        if state == "zombie":
            parent = (proc_stat(self.pid) or ("", 0))[1]
            text = f"not running (dead: a zombie that its parent, pid {parent}, has not reaped)"
        else:
            text = "not running (exited)"
        left = group_members(self.pid)
        if left:
            text += (
                f"; what it left still runs (pids {', '.join(map(str, left))}: its python stubs), "
                "`start` or `stop` removes it"
            )
        return text


def read_records(run_dir: Path) -> list[Record]:
    try:
        lines = (run_dir / PID_NAME).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [r for r in map(Record.parse, lines) if r is not None]


def write_records(run_dir: Path, records: list[Record]) -> None:
    """Replace the PID file atomically (a reader sees the old or the new one, whole), mode 0600."""
    path = run_dir / PID_NAME
    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(PID_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write("".join(r.line() for r in records))
    os.replace(tmp, path)


def write_key(run_dir: Path, key: str) -> Path:
    path = run_dir / KEY_NAME
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as f:
        f.write(key + "\n")
    return path


def remove_leftovers(records: list[Record]) -> list[str]:
    """What servers that are no longer running left: their python stubs (the rest of their process group) and
    the stubs and /dev/shm regions of their run directories (LocalTriton.clean_stale)."""
    removed = []
    for r in records:
        if r.state() in ("exited", "zombie"):  # a pid still naming a process group is never reused
            removed += [f"pid {pid} (of server pid {r.pid})" for pid in kill_group(r.pid)]
    for run_dir in dict.fromkeys(r.run_dir for r in records if r.run_dir is not None):
        removed += LocalTriton(run_dir=run_dir).clean_stale()
    return removed


# --- the lock: one launcher at a time per run directory ------------------------------------------------------
class RunLock:
    """flock on <run-dir>/serve.lock. While it holds the lock, the launcher keeps `<pid> <action> <plan>` in the
    file, so another one can say who holds it and where that one's servers run."""

    def __init__(self, run_dir: Path, action: str, plan: str = "") -> None:
        self.path, self.action, self.plan = run_dir / LOCK_NAME, action, plan
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the servers

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {self.action} {self.plan}\n".encode(), 0)
        return True

    def holder(self) -> tuple[int, str, str] | None:
        """(pid, action, plan) of the launcher holding the lock; None while it has not written them yet."""
        pid, action, plan = (os.pread(self.fd, 4096, 0).decode(errors="replace") + "  ").split(
            " ", 2
        )
        return (int(pid), action, plan.strip()) if pid.isdigit() else None

    def acquire(self, refuse_while_starting: bool) -> None:
        """Wait for the lock; `refuse_while_starting`: refuse at once (exit 2) if another start or run holds it."""
        deadline, told = time.monotonic() + LOCK_WAIT, False
        while not self.try_acquire():
            holder = self.holder()
            if holder and holder[1] in STARTING and refuse_while_starting:
                recorded = read_records(self.path.parent)
                spawned = (
                    f"; spawned so far: {'; '.join(r.where() for r in recorded)}"
                    if recorded
                    else ""
                )
                self.release()
                raise UserError(
                    self.action,
                    f"a local server of {self.path.parent} is starting: `serve.local {holder[1]}` "
                    f"(pid {holder[0]}) holds {self.path} and starts {holder[2]}{spawned}",
                    "use it once it is ready (`python -m serve.local status`), or start another with "
                    "its own --run-dir and ports",
                )
            if time.monotonic() > deadline:
                self.release()
                who = f"pid {holder[0]} ({holder[1]})" if holder else "another launcher"
                raise UnavailableError(
                    str(self.path),
                    f"held by {who} for {LOCK_WAIT:.0f} s",
                    "see `python -m serve.local status`",
                )
            if holder and not told:
                print(
                    f"waiting for `serve.local {holder[1]}` (pid {holder[0]}) to finish ...",
                    file=sys.stderr,
                )
                told = True
            time.sleep(0.1)  # polling the lock under a deadline

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # only the holder writes: a waiter reads "" until the next one holds it
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None


# --- the actions ----------------------------------------------------------------------------------------
def status(run_dir: Path) -> int:
    if not (run_dir / LOCK_NAME).exists() and not (run_dir / PID_NAME).exists():
        print(f"no local server recorded in {run_dir} (make serve starts one)")
        return 0
    lock = RunLock(run_dir, "status")
    try:
        if not lock.try_acquire():
            holder = lock.holder()
            if holder:
                print(f"`serve.local {holder[1]}` (pid {holder[0]}) is in progress: {holder[2]}")
        records = read_records(run_dir)
        if not records:
            print(f"no local server recorded in {run_dir} (make serve starts one)")
        for r in records:
            print(f"local server {r.where()}: {r.describe()}")
    finally:
        lock.release()
    return 0


def stop(run_dir: Path) -> int:
    if not (run_dir / PID_NAME).exists() and not (run_dir / LOCK_NAME).exists():
        print(f"no local server recorded in {run_dir} (make serve starts one)")
        return 0
    lock = RunLock(run_dir, "stop")
    # A start in progress: stop what it started once it is done.
    lock.acquire(refuse_while_starting=False)
    try:
        records = read_records(run_dir)
        if not records:
            print(f"no local server recorded in {run_dir} (make serve starts one)")
            return 0
        for r in records:
            state = r.state()
            if state == "running":
                stop_group(r.pid, lambda: None, timeout=20)
                print(f"stopped local server {r.where()}")
            else:
                print(f"local server {r.where()}: {r.describe()}")
        removed = remove_leftovers(records)
        if removed:
            print(f"removed what the servers left: {', '.join(removed)}")
        write_records(run_dir, [])
    finally:
        lock.release()
    return 0


def model_groups(args) -> list[tuple[str, ...]]:
    """The models of each server: [first server's] or [first's, second's (decoupled)]."""
    if args.models is not None:  # every name is checked (LocalTriton.check): "" is refused too
        return [tuple(args.models.split(","))]
    if args.tritonserver is not None:  # a real install: every model of --repo, by kind (configs)
        models = resolve_models(args.repo, repository_models(args.repo))
        if not models:
            raise UserError("--repo", f"no model folders in {args.repo}", "run `make export`")
        return [
            tuple(m for m, decoupled in models.items() if not decoupled),
            tuple(m for m, decoupled in models.items() if decoupled),
        ]
    return [SHARED_CPU_MODELS, DECOUPLED_MODELS]


PORT_LABELS = {
    "http": "HTTP port (inference needs the key)",
    "grpc": "gRPC port",
    "metrics": "Prometheus metrics port",
}


def port_dest(server: Server, what: str) -> str:
    """The argparse dest of one of a server's ports: grpc_port for the main server, stream_grpc_port for the
    other (flag --grpc-port, --stream-grpc-port)."""
    return f"{'' if server is MAIN else server.name + '_'}{what}_port"


def build_servers(args, run_dir: Path, infer_key: str) -> list[LocalTriton]:
    common = {"repo": args.repo, "tritonserver": args.tritonserver, "infer_key": infer_key}
    servers = []
    run_dirs = (run_dir, stream_run_dir(run_dir))
    for server, models, server_dir in zip(SERVERS, model_groups(args), run_dirs):
        if models:
            ports = {f"{what}_port": getattr(args, port_dest(server, what)) for what in PORT_LABELS}
            servers.append(LocalTriton(**ports, run_dir=server_dir, models=models, **common))
    for server in servers:  # every name and the kinds of each server checked before anything starts
        server.check()
    return servers


def start(args, run_dir: Path) -> int:
    # One HTTP inference key for both servers: the user's $TRITON_INFER_KEY, else a random one saved for clients.
    infer_key = os.environ.get(INFER_KEY_ENV) or secrets.token_hex(16)
    servers = build_servers(args, run_dir, infer_key)
    plan = "; ".join(
        f"grpc {s.grpc_url}, http {s.http_url}, metrics port {s.metrics_port}" for s in servers
    )
    private_run_dir(run_dir)
    lock = RunLock(run_dir, args.action, plan)
    lock.acquire(refuse_while_starting=True)
    try:
        records = read_records(run_dir)
        running = [r for r in records if r.state() == "running"]
        if running:
            raise UserError(
                args.action,
                f"a local server of {run_dir} is already running: "
                f"{'; '.join(r.where() for r in running)}",
                f"use it, `{stop_command(run_dir)}` first, or start another with its own --run-dir "
                "and ports",
            )
        removed = remove_leftovers(records)
        if removed:
            print(f"removed what a server that died left: {', '.join(removed)}")
        write_records(run_dir, [])
        spawned: list[LocalTriton] = []
        try:
            for server in servers:
                t0 = time.time()
                server.spawn()
                spawned.append(server)
                write_records(run_dir, [Record.of(s, args.action) for s in spawned])
                server.wait_ready()
                print(
                    f"Triton ready in {time.time() - t0:.1f} s: grpc {server.grpc_url}, http "
                    f"{server.http_url}, models {', '.join(server.models)}; log {server.log_path}"
                )
        except BaseException:
            for server in spawned:
                server.stop()
            write_records(run_dir, [])
            raise
        key_file = write_key(run_dir, infer_key)
        print(
            f"HTTP inference needs the header {INFER_KEY_HEADER}: export {INFER_KEY_ENV}=$(cat {key_file}) "
            "for the client (gRPC needs no key)"
        )
        if args.action == "start":
            for server in servers:
                server.process = None  # leave it running; `make stop` stops it
            return 0
    finally:
        lock.release()  # `run` holds it only while starting: status and stop need it meanwhile
    return run(servers, run_dir)


def run(servers: list[LocalTriton], run_dir: Path) -> int:
    """Foreground until Ctrl-C / SIGTERM (exit 0), `serve.local stop` (exit 0) or a server's death (exit 3)."""
    try:
        while all(s.process.poll() is None for s in servers):  # poll() reaps a server that died
            time.sleep(0.5)  # waiting on either server process to exit
    except KeyboardInterrupt:
        pids = {s.process.pid for s in servers}
        for server in servers:
            server.stop()
        clear_records(run_dir, pids)
        return 0
    dead = [s for s in servers if s.process.poll() is not None]
    lock = RunLock(run_dir, "run")
    lock.acquire(refuse_while_starting=False)  # a `stop` stopping us: let it finish first
    try:
        ours = {s.process.pid for s in servers}
        if not ours & {r.pid for r in read_records(run_dir)}:
            print(f"stopped by `{stop_command(run_dir)}`")
            for server in servers:
                server.stop()
            return 0
        what = "; ".join(
            f"tritonserver pid {s.process.pid} (grpc {s.grpc_url}) "
            + (
                f"was killed by {signal.Signals(-s.process.returncode).name}"
                if s.process.returncode < 0
                else f"exited with code {s.process.returncode}"
            )
            for s in dead
        )
        tails = "\n".join(f"log {s.log_path}:\n{s.log_tail()}" for s in dead)
        for server in servers:  # the others, and what the dead one left in its process group
            server.stop()
        write_records(run_dir, [])
    finally:
        lock.release()
    raise UnavailableError(
        "tritonserver",
        f"{what}; the other servers were stopped\n{tails}",
        "under a supervisor (systemd Restart=on-failure, docs/production.md) `run` is restarted",
    )


def clear_records(run_dir: Path, pids: set[int]) -> None:
    """Take the servers `pids` out of the PID file (a `run` that stopped its servers)."""
    lock = RunLock(run_dir, "run")
    lock.acquire(refuse_while_starting=False)
    try:
        write_records(run_dir, [r for r in read_records(run_dir) if r.pid not in pids])
    finally:
        lock.release()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a supervisor's stop) cleans up like Ctrl-C


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m serve.local", __doc__)
    p.add_argument(
        "action", choices=list(ACTIONS), help="\n".join(f"{k}: {v}" for k, v in ACTIONS.items())
    )
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="model repository")
    for server in SERVERS:
        which = "" if server is MAIN else "the second server's (the decoupled model) "
        for what, label in PORT_LABELS.items():
            p.add_argument(
                "--" + port_dest(server, what).replace("_", "-"),
                type=int,
                default=getattr(server.ports, what),
                help=which + label,
            )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated models (folders of --repo) for ONE server (default: every local "
        "model, the decoupled one on a second server)",
    )
    p.add_argument(
        "--tritonserver",
        default=None,
        metavar="PATH",
        help="use this tritonserver binary (a real install, with all its backends) instead of the "
        "wheel's; a bare name is looked up on PATH (--tritonserver tritonserver)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="run directory: log, PID file, lock, inference key, backend and repository view "
        "(default: logs/serve of the checkout; the second server uses DIR-stream); "
        "stop and status act on the servers recorded there",
    )
    args = p.parse_args(argv)
    if args.tritonserver is not None:
        found = shutil.which(args.tritonserver)
        if found is None:
            raise UserError(
                "--tritonserver",
                f"{args.tritonserver!r} is not an executable file or a command on " "PATH",
                "pass the path of a real Triton install's bin/tritonserver, or leave the "
                "flag out to run the nvidia-pytriton wheel's server",
            )
        args.tritonserver = found
    run_dir = Path(args.run_dir).absolute() if args.run_dir else DEFAULT_RUN_DIR
    # Everything this launcher creates: 0600 files, 0700 directories.
    umask = os.umask(PRIVATE_UMASK)
    sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.action == "status":
            return status(run_dir)
        if args.action == "stop":
            return stop(run_dir)
        return start(args, run_dir)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        os.umask(umask)


if __name__ == "__main__":
    raise SystemExit(main())

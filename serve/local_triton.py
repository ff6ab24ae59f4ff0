"""Start and stop a real tritonserver without Docker: the binary shipped in the nvidia-pytriton wheel (2.51, the
python backend only), or a real install's with --tritonserver. Used by `python -m serve.local` (make serve), the
demo, the benchmarks and the tests.

    with LocalTriton.on_free_ports(models=SHARED_PYTHON_MODELS) as server:   # three free loopback ports
        ...  server.grpc_url, server.http_url, server.infer_key

Safe defaults: loopback addresses, model control mode none, restricted admin APIs (admin_key), HTTP inference
only with the inference key (infer_key; charrnn.contract INFER_KEY_HEADER), logs to a file in the run directory.
A decoupled model never shares a server with a non-decoupled one: the guard (LocalTriton.check) reads the configs of
the model folders the server will load (model_transaction_policy.decoupled), whatever the names' spelling.
The run directory and everything the launcher and the server write in it are private (0700 / 0600), and the keys
never reach the log. Triton 2.51 takes the restricted-API keys only on its command line (no config file, no
environment variable), so they are in /proc/<pid>/cmdline: docs/production.md says what protects them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import psutil

from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.deployment import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    ENTRYPOINT_SOURCE,
    LOCAL_EXIT_TIMEOUT_S,
    LOOPBACK,
    MAIN,
    LoopbackUrls,
)
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import CONFIG, CPU_CONFIG_NAME, ONNX, ORT_MODELS, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = ROOT / "logs" / "serve"
# Triton's ONNX Runtime backend, built from source by `make backend` (serve/backend.py): libtriton_onnxruntime.so
# and the libonnxruntime.so.1 it runs, copied from the onnxruntime wheel. Absent until built.
ORT_BACKEND_DIR = ROOT / "build" / "backends" / "onnxruntime"
# What LocalTriton loads unless told: the exported graph on Triton's ONNX Runtime backend, the project's main path
# (`make serve` loads every LOCAL_MODELS).
DEFAULT_MODELS = (ONNX,)
# `<header>=<key>` in a restricted-API flag, as logs written before the keys moved to the environment hold it.
SECRET_BYTES = re.compile(rf"(?:^|[,:=\s])({ADMIN_HEADER}|{INFER_KEY_HEADER})=([^,\s]+)".encode())
# What the launcher and the server create in the run directory: 0600 files, 0700 directories.
PRIVATE_UMASK = 0o077


def shown_env(env: dict[str, str]) -> str:
    """The entrypoint's settings as the log shows them before its command line: every TRITON* variable but
    the keys."""
    return "".join(
        f"{k}={v} "
        for k, v in sorted(env.items())
        if k.startswith("TRITON") and k not in (ADMIN_KEY_ENV, INFER_KEY_ENV)
    )


# What LocalTriton writes in a run directory (serve.local adds its PID file, lock and key file, created 0600).
RUN_DIR_ENTRIES = ("triton.log", "backends", "repository")


def private_run_dir(run_dir: Path) -> Path:
    """Create `run_dir` (0700) or make an existing one 0700. Refuses a directory that is not the user's own or
    that others share (world-writable, like /tmp): the run directory holds keys and gets chmod 0700.
    """
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = run_dir.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o1002:
        raise UserError(
            f"run directory {run_dir}",
            "belongs to another user or is shared (world-writable); it would hold the server's keys "
            "and be made private (0700)",
            "pass a directory of your own, e.g. a new one under it",
        )
    if st.st_mode & 0o077:
        run_dir.chmod(st.st_mode & 0o7700)
    return run_dir


def make_private(run_dir: Path, entries: tuple[str, ...] = RUN_DIR_ENTRIES) -> None:
    """The run directory 0700, and the group and other bits off `entries` in it and everything under them;
    nothing else of the directory is touched, and symlinks are skipped, never followed (the repository view's
    links point at the model folders)."""
    private_run_dir(run_dir)
    for entry in entries:
        top = run_dir / entry
        if top.is_symlink() or not top.exists():
            continue
        paths = [top]
        # never descends into a symlinked directory
        for dirpath, dirnames, filenames in os.walk(top):
            paths += [Path(dirpath, n) for n in dirnames + filenames]
        for path in paths:
            try:
                st = path.lstat()
                if not path.is_symlink() and st.st_mode & 0o077:
                    path.chmod(st.st_mode & 0o7700)
            except FileNotFoundError:  # removed meanwhile (a stub's __pycache__ being rewritten)
                continue


def scrub_log(log: Path) -> list[str]:
    """Mask the keys in a log written before they were redacted (such a log is readable by others: mode 0644),
    in place and at the same length, so a server still appending to it loses nothing. Returns what was masked
    (header=***), for the caller to report."""
    try:
        if not log.stat().st_mode & 0o077:
            return []  # written by this launcher: private, and no key ever went in
    except FileNotFoundError:
        return []
    masked = []
    with open(log, "r+b") as f:
        offset = 0
        for line in f.readlines():
            for m in SECRET_BYTES.finditer(line):
                key = m.group(2)
                if key.strip(b"*") and key != b"<redacted>":
                    f.seek(offset + m.start(2))
                    f.write(b"*" * len(key))
                    masked.append(f"{m.group(1).decode()}***")
            offset += len(line)
    return masked


# --- which models a server loads ----------------------------------------------------------------------
def model_name(spelled: str) -> str:
    """The model folder a name means ("charrnn_python", "charrnn_python/", "./charrnn_python" are one model).
    A name is a folder directly inside the repository, never a path: anything else is refused."""
    parts = PurePosixPath(spelled.strip()).parts
    if not spelled.strip():
        raise UserError(
            "models",
            "an empty model name",
            "separate model names by single commas, e.g. charrnn_python",
        )
    if spelled.strip().startswith("/") or len(parts) != 1 or parts[0] in (".", ".."):
        raise UserError(
            f"model {spelled!r}",
            "not a model name: a model is named by its folder in the model repository, not by a path",
            "name a folder of the repository (--repo), e.g. charrnn_python",
        )
    return parts[0]


def repository_models(repo: str | Path) -> tuple[str, ...]:
    """Every model folder of `repo` (a folder with a config.pbtxt): what a server given the whole repository
    would load."""
    repo = Path(repo)
    if not repo.is_dir():
        return ()
    return tuple(sorted(d.name for d in repo.iterdir() if (d / CONFIG).is_file()))


def served_config(folder: Path, config_name: str | None) -> Path:
    """The config file Triton reads for a model folder: configs/<name>.pbtxt under --model-config-name=<name>
    where it exists, else config.pbtxt."""
    if config_name:
        custom = folder / "configs" / f"{config_name}.pbtxt"
        if custom.is_file():
            return custom
    return folder / CONFIG


def is_decoupled(folder: Path, config_name: str | None = None) -> bool:
    """model_transaction_policy.decoupled of the config the server reads for `folder`."""
    return bool(load_config(served_config(folder, config_name)).model_transaction_policy.decoupled)


def resolve_models(
    repo: str | Path, models: tuple[str, ...], config_name: str | None = None
) -> dict[str, bool]:
    """name -> decoupled for the models a server of `repo` is asked to load: each name as its folder (however
    spelled; duplicates once), checked to be a model of the repository, decoupled as its config says.
    """
    repo = Path(repo)
    resolved: dict[str, bool] = {}
    names = [(spelled, model_name(spelled)) for spelled in models]  # every name well-formed first
    for spelled, name in names:
        folder = repo / name
        if not (folder / CONFIG).is_file():
            known = ", ".join(repository_models(repo)) or "none"
            raise UserError(
                f"model {spelled!r}",
                f"no such model in {repo} (its models: {known})",
                "name one of them, or run `make export`",
            )
        if name not in resolved:
            resolved[name] = is_decoupled(folder, config_name)
    return resolved


def pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver dist dir, its shared-library dir) inside the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as e:
        raise UnavailableError("nvidia-pytriton", "not installed", "run `make setup`") from e
    pkg = Path(pytriton.__file__).resolve().parent
    dist, libs = pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file():
        raise UnavailableError(
            str(dist), "no tritonserver binary in the nvidia-pytriton wheel", "reinstall it"
        )
    return dist, libs


def prepare_backends(run_dir: Path, models: tuple[str, ...] = ()) -> Path:
    """backends/python with libtriton_python.so, its utils and the stub for this Python version; and
    backends/onnxruntime, a link to ORT_BACKEND_DIR (`make backend`), when `models` include an ONNX Runtime model.
    """
    dist, _ = pytriton_dist()
    needs_ort = sorted(set(models) & set(ORT_MODELS))
    if needs_ort:
        if not (ORT_BACKEND_DIR / "libtriton_onnxruntime.so").is_file():
            raise UnavailableError(
                "Triton's ONNX Runtime backend",
                f"not built ({ORT_BACKEND_DIR} has no libtriton_onnxruntime.so); {', '.join(needs_ort)} "
                "needs it",
                "run `make backend` (about a minute; needs a C++ compiler: apt-get install "
                "build-essential)",
            )
        ort = run_dir / "backends" / "onnxruntime"
        ort.parent.mkdir(parents=True, exist_ok=True)
        if not ort.is_symlink() or ort.resolve() != ORT_BACKEND_DIR.resolve():
            ort.unlink(missing_ok=True)
            ort.symlink_to(ORT_BACKEND_DIR.resolve(), target_is_directory=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UnavailableError(
            "python backend stub", f"none for Python {version} in the wheel", "use Python 3.8-3.13"
        )
    backend = run_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for src in (
        dist / "backends" / "python" / "libtriton_python.so",
        dist / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        dst = backend / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return run_dir / "backends"


def prepare_repository(repo: Path, run_dir: Path, models: tuple[str, ...]) -> Path:
    """A repository view with only `models` (symlinks), so the server loads nothing it cannot run."""
    view = run_dir / "repository"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for spelled in models:
        name = model_name(spelled)  # a folder of the repository, never a path out of it
        src = (repo / name).resolve()
        if not (src / "config.pbtxt").is_file():
            raise UserError(str(src), "model not found in the repository", "run `make export`")
        if not any((src / "1").glob("model.*")):
            raise UserError(str(src / "1"), "no model file", "run `make export`")
        (view / name).symlink_to(src, target_is_directory=True)
    return view


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTriton(LoopbackUrls):
    """Start/stop one tritonserver process; a context manager for tests, the demo and the benchmark."""

    def __init__(
        self,
        repo: str | Path = ROOT / "model_repository",
        run_dir: str | Path = DEFAULT_RUN_DIR,
        http_port: int = MAIN.ports.http,
        grpc_port: int = MAIN.ports.grpc,
        metrics_port: int = MAIN.ports.metrics,
        models: tuple[str, ...] = DEFAULT_MODELS,
        tritonserver: str | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 120.0,
        infer_key: str | None = None,
    ) -> None:
        self.repo, self.run_dir = Path(repo), Path(run_dir)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.models, self.tritonserver, self.extra_args = models, tritonserver, tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.log_path = self.run_dir / "triton.log"
        self.admin_key = secrets.token_hex(16)
        # HTTP inference (charrnn/contract.py INFER_KEY_HEADER)
        self.infer_key = infer_key or secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @classmethod
    def on_free_ports(cls, **kwargs) -> "LocalTriton":
        """A server on three free loopback ports: the demo, the benchmarks and the tests never collide with
        `make serve` or with each other."""
        return cls(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **kwargs)

    @property
    def shm_prefix(self) -> str:
        """Prefix of this launcher's python-backend shared-memory regions in /dev/shm: one per run directory, so
        stale regions of an earlier server of this run directory can be told from everyone else's.
        """
        return f"charrnn_{hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:12]}_"

    def clean_stale(self) -> list[str]:
        """Remove what an earlier server of this run directory left after a crash, and only that: python stubs
        still running from our backend directory without their server (tritonserver cannot unlink or stop
        them when it is SIGKILLed), then our /dev/shm regions that no live process maps. Returns what went.
        """
        stub = (self.run_dir / "backends" / "python" / "triton_python_backend_stub").resolve()
        removed = []
        for proc in psutil.process_iter(["cmdline", "ppid"]):
            # None if it could not be read (gone meanwhile, or not ours)
            argv = proc.info["cmdline"]
            if argv and Path(argv[0]).resolve() == stub and not _is_tritonserver(proc.info["ppid"]):
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                    removed.append(f"stub pid {proc.pid}")
                except ProcessLookupError:
                    pass
        regions = list(Path("/dev/shm").glob(self.shm_prefix + "*"))
        if regions:
            # /proc/<pid>/maps by hand: psutil's memory_maps() parses smaps (every mapping's sizes), about 20
            # times slower over all processes, for the paths alone.
            mapped = set()
            for maps in Path("/proc").glob("[0-9]*/maps"):
                try:
                    mapped |= {
                        line.split()[-1]
                        for line in maps.read_text().splitlines()
                        if "/dev/shm/" in line
                    }
                except (OSError, IndexError):
                    continue
            for region in regions:
                if str(region) not in mapped:
                    region.unlink(missing_ok=True)
                    removed.append(str(region))
        return removed

    @property
    def config_name(self) -> str | None:
        """The --model-config-name the server runs with (the last one given wins, as in Triton)."""
        name = None if self.tritonserver else CPU_CONFIG_NAME
        for arg in self.extra_args:
            if arg.startswith("--model-config-name="):
                name = arg.split("=", 1)[1] or None
        return name

    def check(self) -> dict[str, bool]:
        """What this server will load, name -> decoupled, read from the configs it will read; refuses a
        decoupled model next to a non-decoupled one. Sets `models` to the folder names. Starts nothing.
        """
        resolved = resolve_models(self.repo, tuple(self.models), self.config_name)
        decoupled = [m for m, d in resolved.items() if d]
        others = [m for m, d in resolved.items() if not d]
        if decoupled and others:
            raise UserError(
                "models",
                f"{', '.join(decoupled)} (decoupled) cannot share a server with "
                f"{', '.join(others)}: Triton 2.51 crashes when both kinds stream on one server "
                "(charrnn/repository.py)",
                "serve the decoupled model from a server of its own",
            )
        self.models = tuple(resolved)
        return resolved

    def command(self) -> tuple[list[str], dict[str, str]]:
        self.check()
        scrub_log(self.log_path)
        make_private(self.run_dir)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # ONNX Runtime 1.32 (the backend's library and the python models') otherwise sends telemetry and writes a
        # device id under ~/.cache/Microsoft; the slim image sets the same.
        env.setdefault("ORT_DISABLE_TELEMETRY", "1")
        # A repository view with the checked models only, for the wheel's server and a real install alike: the
        # server loads what check() read, and nothing else of --repo.
        repo_arg = str(prepare_repository(self.repo, self.run_dir, self.models))
        if self.tritonserver:  # a real Triton install: its own backends
            binary, backend_args = self.tritonserver, []
            env.pop("TRITON_MODEL_CONFIG_NAME", None)
        else:
            dist, libs = pytriton_dist()
            binary = str(dist / "bin" / "tritonserver")
            backend_args = [
                f"--backend-directory={prepare_backends(self.run_dir, self.models)}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            ]
            # the ONNX Runtime models' configs/cpu.pbtxt (KIND_CPU; charrnn/repository.py)
            env["TRITON_MODEL_CONFIG_NAME"] = CPU_CONFIG_NAME
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)])
            )
            # The stub embeds this Python: put its environment first so it finds numpy/onnxruntime/charrnn.
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # The project's entrypoint (every flag of every server, charrnn/deployment.py) with what differs here:
        # loopback, this launcher's ports, its repository view and keys, a short exit timeout.
        env.update(
            {
                "TRITONSERVER": binary,
                "TRITON_MODEL_REPOSITORY": repo_arg,
                "TRITON_ADDRESS": LOOPBACK,
                "TRITON_EXIT_TIMEOUT_S": str(LOCAL_EXIT_TIMEOUT_S),
                ADMIN_KEY_ENV: self.admin_key,
                INFER_KEY_ENV: self.infer_key,
            }
        )
        args = [
            "/bin/sh",
            str(ROOT / ENTRYPOINT_SOURCE),
            *backend_args,
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            *self.extra_args,
        ]
        make_private(self.run_dir)  # again: the copied backend files and the new repository view
        return args, env

    def spawn(self) -> subprocess.Popen:
        """Start the server process and return at once (start() waits until it is ready)."""
        args, env = self.command()
        stale = self.clean_stale()
        # 0600 whether the log is new or an earlier one (which may hold keys from before they were redacted).
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with open(fd, "ab") as log:
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {started} {shown_env(env)}{' '.join(args)}\n".encode())
            if stale:
                log.write(
                    f"removed what a crashed server of {self.run_dir} left: "
                    f"{', '.join(stale)}\n".encode()
                )
            log.flush()
            # Own process group: stop() takes the python backend stubs (children) down with the server. The
            # umask makes what the server and its stubs create private (the stubs' __pycache__ in the run
            # directory); their /dev/shm regions get 0600 once the server is ready (private_shm).
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=self.run_dir,
                umask=PRIVATE_UMASK,
            )
        return self.process

    def start(self) -> "LocalTriton":
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.02
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise UnavailableError(
                    "tritonserver",
                    f"exited with code {self.process.returncode} before it "
                    f"was ready; log {self.log_path}:\n{self.log_tail()}",
                    "see the log",
                )
            if self.is_ready():
                self.private_shm()
                return
            time.sleep(delay)  # polling backoff while waiting on readiness
            delay = min(delay * 1.5, 0.5)
        raise UnavailableError(
            "tritonserver",
            f"not ready after {self.ready_timeout:.0f} s; log "
            f"{self.log_path}:\n{self.log_tail()}",
            "see the log",
        )

    def private_shm(self) -> None:
        """Mode 0600 for this server's python-backend regions in /dev/shm, which carry the requests' tensors: the
        backend creates them 0644 (it sets the mode itself, past the umask) when each model's stub starts.
        """
        if self.tritonserver:
            return  # a real install's regions have the backend's default prefix, shared with everyone's
        for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
            try:
                region.chmod(0o600)
            except OSError:
                continue

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL after `timeout`; returns the server's exit code. Then removes the
        /dev/shm regions its python stubs could not (a server that crashed, stubs that had to be killed).
        """
        p, self.process = self.process, None
        if p is None:
            return None
        code = stop_group(p.pid, lambda: p.poll(), timeout, wait=lambda t: p.wait(t))
        self.clean_stale()
        return code

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- processes (psutil; the start time in clock ticks from /proc/<pid>/stat) -------------------------------
def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, process group, start time in clock ticks) of `pid` from /proc/<pid>/stat; None if there is
    no such process. State Z: a zombie, dead but not yet reaped by its parent. Read by hand because the start
    time in ticks since boot is the exact identity the PID file records (`serve.local`); psutil offers it only
    as seconds since the epoch (create_time: ticks plus a boot time that moves with the clock)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_state(pid: int, start_time: int | None = None) -> str:
    """What became of `pid`: running; zombie (dead, its parent has not reaped it); exited (gone); or reused
    (the pid is another process now: its start time is not `start_time`)."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "exited"
    if start_time is not None:
        stat = proc_stat(pid)
        if stat is None:
            return "exited"
        if stat[3] != start_time:
            return "reused"
    return "zombie" if status == psutil.STATUS_ZOMBIE else "running"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except OSError:
            continue  # gone meanwhile
    return members


def _is_tritonserver(pid: int) -> bool:
    """A live tritonserver (a zombie one is dead: its stubs must not count it as their server)."""
    try:
        proc = psutil.Process(pid)
        return proc.name() == "tritonserver" and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone (or not ours to read)
        return False


def group_alive(pgid: int) -> bool:
    """Whether a live process is left in process group `pgid`: zombies do not count (a killed server that its
    parent has not reaped stays in its group as one)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pgid))


def stop_group(pgid: int, poll, timeout: float, wait=None) -> int | None:
    """Stop a server started in its own session (pgid == pid) and everything in its group."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return poll()
    deadline = time.monotonic() + timeout
    code = None
    if wait is not None:
        try:
            code = wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    return code if code is not None else poll()


def kill_group(pgid: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL what is left of a dead server's process group (its python stubs) and wait until it is gone.
    Only for a group whose leader is verified dead (process_state "exited" or "zombie"): a pid that still
    names a process group cannot be given to another process. Returns the pids killed."""
    left = group_members(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return []
        deadline = time.monotonic() + timeout
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILL is delivered asynchronously
    return left

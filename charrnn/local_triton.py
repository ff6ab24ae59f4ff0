"""Start and stop a real tritonserver without Docker: the binary shipped in the nvidia-pytriton wheel (2.51, the
python backend only), or a real install's with --tritonserver. Used by `python -m serve.local` (make serve), the
demo, the benchmarks and the tests.

    with LocalTriton.on_free_ports(models=SHARED_PYTHON_MODELS) as server:   # three free loopback ports
        ...  server.grpc_url, server.http_url, server.infer_key

Safe defaults: loopback addresses, model control mode none, restricted admin APIs (admin_key), HTTP inference
only with the inference key (infer_key; charrnn.contract INFER_KEY_HEADER), logs to a file in the run directory.
A decoupled model never shares a server with a non-decoupled one (charrnn.repository DECOUPLED_MODELS).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from charrnn.contract import INFER_KEY_HEADER
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import (
    CPU_CONFIG_NAME,
    DECOUPLED_MODELS,
    ONNX,
    ORT_MODELS,
    mixed_decoupled,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = ROOT / "logs" / "serve"
# Triton's ONNX Runtime backend, built from source by `make backend` (serve/backend.py): libtriton_onnxruntime.so
# and the libonnxruntime.so.1 it runs, copied from the onnxruntime wheel. Absent until built.
ORT_BACKEND_DIR = ROOT / "build" / "backends" / "onnxruntime"
# What LocalTriton loads unless told: the exported graph on Triton's ONNX Runtime backend, the project's main path
# (`make serve` loads every LOCAL_MODELS).
DEFAULT_MODELS = (ONNX,)
RESTRICTED = "model-repository,shared-memory,logging,trace"  # admin APIs: need the admin key header
ADMIN_HEADER = "admin-key"


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
    for name in models:
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


GRPC_ALLOCATION_POOL = 1024  # >= the requests in flight at once (see LocalTriton.command)


class LocalTriton:
    """Start/stop one tritonserver process; a context manager for tests, the demo and the benchmark."""

    def __init__(
        self,
        repo: str | Path = ROOT / "model_repository",
        run_dir: str | Path = DEFAULT_RUN_DIR,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
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
        self.infer_key = infer_key or secrets.token_hex(
            16
        )  # HTTP inference (charrnn/contract.py INFER_KEY_HEADER)
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
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if argv0 and Path(argv0).resolve() == stub and not _is_tritonserver(ppid):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                    removed.append(f"stub pid {proc.name}")
                except ProcessLookupError:
                    pass
        regions = list(Path("/dev/shm").glob(self.shm_prefix + "*"))
        if regions:
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
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        if not self.tritonserver and mixed_decoupled(self.models):
            decoupled = [m for m in self.models if m in DECOUPLED_MODELS]
            others = [m for m in self.models if m not in DECOUPLED_MODELS]
            raise UserError(
                "models",
                f"{', '.join(decoupled)} (decoupled) cannot share a server with "
                f"{', '.join(others)}: Triton 2.51 crashes when both kinds stream on one server "
                "(charrnn/repository.py)",
                "serve the decoupled model from a server of its own",
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # ONNX Runtime 1.32 (the backend's library and the python models') otherwise sends telemetry and writes a
        # device id under ~/.cache/Microsoft; the slim image sets the same.
        env.setdefault("ORT_DISABLE_TELEMETRY", "1")
        if self.tritonserver:  # a real Triton install: its own backends, the whole repository
            binary, repo_arg, backend_args = self.tritonserver, str(self.repo.resolve()), []
        else:
            dist, libs = pytriton_dist()
            binary = str(dist / "bin" / "tritonserver")
            repo_arg = str(prepare_repository(self.repo, self.run_dir, self.models))
            backend_args = [
                f"--backend-directory={prepare_backends(self.run_dir, self.models)}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                # the ONNX Runtime models' configs/cpu.pbtxt (KIND_CPU; charrnn/repository.py)
                f"--model-config-name={CPU_CONFIG_NAME}",
            ]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)])
            )
            # The stub embeds this Python: put its environment first so it finds numpy/onnxruntime/charrnn.
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        restricted = f"{RESTRICTED}:{ADMIN_HEADER}={self.admin_key}"
        args = [
            binary,
            f"--model-repository={repo_arg}",
            *backend_args,
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api=inference:{INFER_KEY_HEADER}={self.infer_key}",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            # With the default pool (8) tritonserver 2.51 segfaults (TRITONBACKEND_RequestInput, in the
            # python backend's execute) once more than ~32 sequences stream requests at once; measured:
            # crashes at 40/48/63/64 concurrent sequences within seconds, none with this setting.
            f"--grpc-infer-allocation-pool-size={GRPC_ALLOCATION_POOL}",
            *self.extra_args,
        ]
        return args, env

    def start(self) -> "LocalTriton":
        args, env = self.command()
        stale = self.clean_stale()
        log = open(self.log_path, "ab")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        if stale:
            log.write(
                f"removed what a crashed server of {self.run_dir} left: {', '.join(stale)}\n".encode()
            )
        log.flush()
        # Own process group: stop() takes the python backend stubs (children) down with the server.
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=self.run_dir,
        )
        log.close()
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
                return
            time.sleep(delay)  # polling backoff while waiting on readiness
            delay = min(delay * 1.5, 0.5)
        raise UnavailableError(
            "tritonserver",
            f"not ready after {self.ready_timeout:.0f} s; log "
            f"{self.log_path}:\n{self.log_tail()}",
            "see the log",
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL after `timeout`; returns the server's exit code."""
        p, self.process = self.process, None
        if p is None:
            return None
        return stop_group(p.pid, lambda: p.poll(), timeout, wait=lambda t: p.wait(t))

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_tritonserver(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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

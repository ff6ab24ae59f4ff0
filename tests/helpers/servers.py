"""Local Triton servers (the python backend, serve.local_triton): starting, killing and restarting them, and
reading what they log and count."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path

import psutil

from charrnn.repository import PYTHON
from tests.helpers.waiting import wait_for

SHORT_IDLE_US = 2_000_000  # short_idle_server's max_sequence_idle_microseconds


def start_server(repo: Path, run_dir: Path, models: tuple[str, ...] = (PYTHON,), **kw):
    from serve.local_triton import LocalTriton

    return LocalTriton.on_free_ports(repo=repo, run_dir=run_dir, models=models, **kw).start()


def with_idle_timeout(src: Path, dest: Path, names: tuple[str, ...], idle_us: int) -> Path:
    """A copy of `names` from repository `src` in `dest` whose configs free idle sequences after `idle_us`."""
    for name in names:
        shutil.copytree(src / name, dest / name)
        for config in (dest / name).rglob("*.pbtxt"):
            new, n = re.subn(
                r"max_sequence_idle_microseconds: \d+",
                f"max_sequence_idle_microseconds: {idle_us}",
                config.read_text(),
            )
            assert n == 1, f"{config} should set max_sequence_idle_microseconds once"
            config.write_text(new)
    return dest


def group_pids(pgid: int) -> list[int]:
    pids = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                pids.append(pid)
        except OSError:
            pass  # gone meanwhile
    return pids


def kill_server(server) -> None:
    """SIGKILL the server's process group (server + python stubs), as a crash would; clean /dev/shm after it."""
    pgid = server.process.pid
    regions = []
    for pid in group_pids(pgid):
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        regions += [a for a in args if a.startswith("triton_python_backend_shm_region_")]
    os.killpg(pgid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.process = None
    wait_for(lambda: not group_pids(pgid), 30, "the killed server's process group to be gone")
    for name in regions:  # a killed stub cannot unlink its shared memory region
        Path("/dev/shm", name).unlink(missing_ok=True)


def restart_later(server) -> threading.Thread:
    """Start the server again on the SAME ports, in a thread (the client retries meanwhile)."""
    errors = []

    def run():
        try:
            server.start()
        except BaseException as e:  # reported by the test through thread.errors
            errors.append(e)

    thread = threading.Thread(target=run, name="restart-server", daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def ensure_up(server) -> None:
    if server.process is None or server.process.poll() is not None:
        server.start()


def log_text(server, offset: int = 0) -> str:
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(server) -> int:
    return server.log_path.stat().st_size


def inference_count(server) -> int:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(PYTHON, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0].get("inference_count", 0))


# --- the sequence lifecycle, as the python models log it ----------------------------------------------------
EVICTED = re.compile(r"evicted (\d+) idle sequence\(s\); (\d+) live")


def evictions(server, offset: int) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in EVICTED.findall(log_text(server, offset))]

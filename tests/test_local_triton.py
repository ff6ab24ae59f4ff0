"""The local launcher (serve.local_triton, `python -m serve.local`) with the real tritonserver of the
nvidia-pytriton wheel: starting and stopping, what a crashed server leaves behind, the security defaults
(loopback only, model control mode none, the restricted admin APIs, the HTTP inference key), and the server
configuration that keeps it up (gRPC allocation pool, decoupled models on a server of their own).
No fixed sleeps: every wait polls a condition under a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from charrnn import repository
from charrnn.contract import INFER_KEY_ENV, INFER_KEY_HEADER
from charrnn.repository import PYTHON
from charrnn.sampling import SamplingParams
from tests.helpers import ROOT, RawStream, group_pids, served, start_server, tf_text, wait_for


# --- starting and stopping ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "binary", ["/nonexistent/bin/tritonserver", "no-such-tritonserver-command"]
)
def test_launcher_names_a_missing_tritonserver_binary(binary):
    r = subprocess.run(
        [sys.executable, "-m", "serve.local", "run", "--tritonserver", binary],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(
        f"error: --tritonserver: {binary!r} is not an executable file"
    ), r.stderr


def test_launcher_stops_the_server_and_leaves_no_process(tmp_path, shipped_repo):
    s = start_server(shipped_repo, tmp_path / "serve")
    pid = s.process.pid
    children = subprocess.run(
        ["pgrep", "-g", str(pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) >= 2, "server + python backend stub expected in the process group"
    s.stop()
    left = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    assert left == []
    assert not s.is_ready()


def test_launcher_removes_its_own_leftovers_of_a_crash_and_only_its_own(shipped_repo, tmp_path):
    """After tritonserver is SIGKILLed its python stubs can outlive it (seen: one 136 MB orphan) and its
    /dev/shm regions stay. The next start of the same run directory removes them; other regions stay.
    """
    run_dir = tmp_path / "serve"
    s = start_server(shipped_repo, run_dir)
    stubs = [p for p in group_pids(s.process.pid) if p != s.process.pid]
    regions = list(Path("/dev/shm").glob(s.shm_prefix + "*"))
    assert stubs and regions, (stubs, regions)
    foreign = [
        Path("/dev/shm", "triton_python_backend_shm_region_not-ours-" + os.urandom(4).hex()),
        Path("/dev/shm", "charrnn_000000000000_not-ours-" + os.urandom(4).hex()),
    ]
    for f in foreign:
        f.write_bytes(b"x")
    try:
        for pid in stubs:  # a hung stub: it cannot notice that its server is gone
            os.kill(pid, signal.SIGSTOP)
        os.kill(s.process.pid, signal.SIGKILL)  # the server alone, as a segfault would
        s.process.wait(timeout=30)
        s.process = None
        assert all(psutil.pid_exists(pid) for pid in stubs) and all(r.exists() for r in regions)
        s2 = start_server(shipped_repo, run_dir)
        try:
            assert not any(
                alive(pid) for pid in stubs
            ), "the crashed server's stubs are still running"
            assert not any(
                r.exists() for r in regions
            ), "the crashed server's shared memory is still there"
            assert all(f.exists() for f in foreign), "removed a region that was not ours"
            assert "removed what a crashed server" in s2.log_path.read_text()
            assert served(s2, ["ROMEO:\n"], 20, [SamplingParams(greedy=True)])[0]
        finally:
            s2.stop()
    finally:
        for f in foreign:
            f.unlink(missing_ok=True)
        for pid in stubs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_decoupled_model_never_shares_a_local_server(shipped_repo, tmp_path):
    """Triton 2.51 segfaulted under mixed traffic (5 of 5 runs within 8 rounds) when charrnn_gen_stream and a
    non-decoupled model streamed on one server: the launcher refuses that mix."""
    from charrnn.errors import UserError
    from serve.local_triton import LocalTriton

    with pytest.raises(
        UserError,
        match=f"{repository.GEN_STREAM} \\(decoupled\\) cannot share a server with {PYTHON}",
    ):
        LocalTriton.on_free_ports(
            repo=shipped_repo, run_dir=tmp_path, models=(PYTHON, repository.GEN_STREAM)
        ).start()


# --- serve.local: the guard, private files, one launcher per run directory, dead servers ---------------------
def serve_local(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m serve.local <args>` in the checkout."""
    return subprocess.run(
        [sys.executable, "-m", "serve.local", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def port_flags() -> list[str]:
    """Free ports for one server (the tests pass --models: no second server)."""
    from serve.local_triton import free_port

    return [f"--{name}-port={free_port()}" for name in ("http", "grpc", "metrics")]


def flag(flags: list[str], name: str) -> int:
    return int(next(f for f in flags if f.startswith(f"--{name}-port=")).split("=", 1)[1])


def alive(pid: int) -> bool:
    """Whether `pid` is a live process: there, and not a zombie (dead, not yet reaped by its parent)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_processes_of(run_dir: Path) -> list[int]:
    """Processes (zombies aside) whose command line names `run_dir`: its servers and their python stubs."""
    inside = f"{run_dir}/"
    return [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if any(inside in arg for arg in proc.info["cmdline"] or ()) and alive(proc.pid)
    ]


def recorded_pid(run_dir: Path) -> int:
    return int((run_dir / "triton.pid").read_text().split()[0])


@pytest.mark.parametrize(
    "models, tritonserver",
    [
        (f"{PYTHON},{repository.GEN_STREAM}/", False),
        (f"{PYTHON},./{repository.GEN_STREAM}", False),
        (f"{PYTHON},{repository.GEN_STREAM}/./", False),
        # --tritonserver (the wheel's binary standing in for a real install's): no guard before
        (f"{PYTHON},{repository.GEN_STREAM}", True),
    ],
)
def test_the_one_kind_per_server_guard_reads_the_model_folders_not_the_spelling(
    shipped_repo, tmp_path, models, tritonserver
):
    """Before: a trailing slash or ./ got past the name comparison, and --tritonserver skipped it, so both kinds
    loaded on one server (which mixed streaming crashes). The guard now reads each folder's config.
    """
    from serve.local_triton import pytriton_dist

    run_dir = tmp_path / "serve"
    extra = ["--tritonserver", pytriton_dist()[0] / "bin" / "tritonserver"] if tritonserver else []
    r = serve_local(
        "start",
        "--repo",
        shipped_repo,
        "--run-dir",
        run_dir,
        "--models",
        models,
        *port_flags(),
        *extra,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        f"error: models: {repository.GEN_STREAM} (decoupled) cannot share a server with {PYTHON}"
        in r.stderr
    ), r.stderr
    assert not (run_dir / "triton.log").exists(), "a server was started"
    assert live_processes_of(run_dir) == []


def test_the_guard_goes_by_the_config_whatever_the_folder_is_called(shipped_repo, tmp_path):
    """A decoupled model is one whose config says so (model_transaction_policy), not one of a list of names."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / PYTHON).symlink_to(shipped_repo / PYTHON)
    (repo / "renamed").symlink_to(shipped_repo / repository.GEN_STREAM)  # decoupled, by its config
    r = serve_local(
        "start", "--repo", repo, "--run-dir", tmp_path / "serve", "--models", f"{PYTHON},renamed"
    )
    assert (
        r.returncode == 2 and "renamed (decoupled) cannot share a server with" in r.stderr
    ), r.stderr
    assert not (tmp_path / "serve" / "triton.log").exists()


@pytest.mark.parametrize(
    "models, why",
    [
        ("../x", "not a model name"),
        (f"../{PYTHON}", "not a model name"),
        ("ABSOLUTE", "not a model name"),
        ("", "an empty model name"),
        (f"{PYTHON},", "an empty model name"),
        ("no_such_model", "no such model in"),
    ],
)
def test_a_model_is_a_folder_of_the_repository_never_a_path(shipped_repo, tmp_path, models, why):
    models = models.replace("ABSOLUTE", str(shipped_repo / PYTHON))
    repo = tmp_path / "repo"  # ../charrnn_python would be a real model next to it
    repo.mkdir()
    (tmp_path / PYTHON).symlink_to(shipped_repo / PYTHON)
    r = serve_local(
        "start", "--repo", repo, "--run-dir", tmp_path / "serve", "--models", models, *port_flags()
    )
    assert r.returncode == 2 and why in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "serve" / "triton.log").exists()


def test_no_key_in_the_run_directory_and_every_file_private(shipped_repo, tmp_path):
    """Before: triton.log (0644) held both keys (the logged command line) and the run directory was 0755. Now
    the keys reach the server through the entrypoint's environment (the logged command has none), an earlier
    log's keys are masked, and nothing under the run directory (nor the server's /dev/shm regions) is readable
    by group or others; the inference key is in infer-key, 0600.
    """
    from serve.local_triton import LocalTriton

    run_dir = tmp_path / "serve"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    old_key = "0123456789abcdef" * 2
    earlier = run_dir / "triton.log"
    earlier.write_text(f"=== earlier --http-restricted-api=inference:infer-key={old_key}\n")
    earlier.chmod(0o644)
    flags = port_flags()
    r = serve_local(
        "start", "--repo", shipped_repo, "--run-dir", run_dir, "--models", PYTHON, *flags
    )
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        pid = recorded_pid(run_dir)
        args = psutil.Process(pid).cmdline()
        keys = {
            a.rsplit("=", 1)[1].encode() for a in args if "admin-key=" in a or "infer-key=" in a
        }
        key_file = run_dir / "infer-key"
        assert len(keys) == 2 and key_file.read_bytes().strip() in keys, keys
        checked = 0
        for dirpath, dirnames, filenames in os.walk(run_dir):  # symlinks are not followed
            for path in [Path(dirpath)] + [Path(dirpath, n) for n in dirnames + filenames]:
                st = path.lstat()
                if path.is_symlink():
                    continue
                assert st.st_mode & 0o077 == 0, f"{path}: mode {oct(st.st_mode & 0o777)}"
                if path.is_file() and path != key_file:
                    data = path.read_bytes()
                    assert not any(k in data for k in keys), f"a key is in {path}"
                checked += 1
        assert checked >= 8 and key_file.stat().st_mode & 0o777 == 0o600
        log = earlier.read_bytes()
        # the logged command is the entrypoint's, with the keys in its environment only
        assert old_key.encode() not in log and b"serve/tritonserver.sh" in log
        regions = list(Path("/dev/shm").glob(LocalTriton(run_dir=run_dir).shm_prefix + "*"))
        assert regions and all(r.stat().st_mode & 0o077 == 0 for r in regions), regions
    finally:
        assert serve_local("stop", "--run-dir", run_dir).returncode == 0


def test_one_start_per_run_directory_and_stop_leaves_no_server(shipped_repo, tmp_path):
    """Before: no lock, and the PID file written only once every server was ready: two starts with different
    ports both succeeded and `stop` left the first one's servers running. Now one start wins, the other is
    refused naming where the winner runs, and stop finds every server the PID file recorded at spawn.
    """
    run_dir = tmp_path / "serve"
    flags = [port_flags(), port_flags()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "serve.local", "start", "--repo", str(shipped_repo)]
            + ["--run-dir", str(run_dir), "--models", PYTHON, *f],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in flags
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    try:
        assert sorted(codes) == [0, 2], (codes, outs)
        won = codes.index(0)
        error = outs[1 - won][1]
        assert error.startswith("error: start: a local server of"), error
        assert f"grpc 127.0.0.1:{flag(flags[won], 'grpc')}" in error, error
        pid = recorded_pid(run_dir)
        assert f"pid {pid}" in error or "is starting" in error, error
        assert live_processes_of(run_dir) and all(
            p == pid or os.getpgid(p) == pid for p in live_processes_of(run_dir)
        ), "only the winner's server (and its stubs) runs"
        status = serve_local("status", "--run-dir", run_dir)
        assert f"local server pid {pid} (grpc 127.0.0.1:{flag(flags[won], 'grpc')}" in status.stdout
        assert status.stdout.rstrip().endswith(": running"), status.stdout
    finally:
        stopped = serve_local("stop", "--run-dir", run_dir)
    assert stopped.returncode == 0 and "stopped local server pid" in stopped.stdout, stopped
    assert live_processes_of(run_dir) == []
    assert not (run_dir / "triton.pid").exists()


# A parent that never reaps, as in a container whose PID 1 does not: `serve.local start`'s server is
# reparented to it (PR_SET_CHILD_SUBREAPER) and, once killed, stays a zombie until this process's stdin closes.
NON_REAPING_PARENT = """
import ctypes, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
print(subprocess.run(sys.argv[1:], stdout=sys.stderr).returncode, flush=True)
sys.stdin.read()
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
"""


def test_a_killed_server_is_dead_for_status_and_the_next_start_cleans_up(shipped_repo, tmp_path):
    """Before: after a SIGKILL of tritonserver whose parent does not reap it, the zombie passed the python
    stub's parent check, so the stub lived on; `status` (the process group: zombie + stub) said running and
    `start` refused until a `stop`. Now status reads the server's own state and start removes the leftovers.
    """
    from serve.local_triton import LocalTriton, process_state

    run_dir = tmp_path / "serve"
    common = ["--repo", str(shipped_repo), "--run-dir", str(run_dir), "--models", PYTHON]
    with open(tmp_path / "parent.err", "w") as err:
        parent = subprocess.Popen(
            [sys.executable, "-c", NON_REAPING_PARENT, sys.executable, "-m", "serve.local", "start"]
            + common
            + port_flags(),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    stubs: list[int] = []
    try:
        assert parent.stdout.readline().strip() == "0", (tmp_path / "parent.err").read_text()
        pid = recorded_pid(run_dir)
        stubs = [p for p in group_pids(pid) if p != pid]
        regions = list(Path("/dev/shm").glob(LocalTriton(run_dir=run_dir).shm_prefix + "*"))
        assert stubs and regions, "server + python stub (and its shared memory) expected"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_state(pid) == "zombie", 60, "the killed server to be a zombie")
        assert any(process_state(s) == "running" for s in stubs), "the stub outlives its server"
        status = serve_local("status", "--run-dir", run_dir)
        assert status.returncode == 0 and f"local server pid {pid} " in status.stdout, status
        assert "not running (dead: a zombie" in status.stdout, status.stdout
        restarted = serve_local("start", *common, *port_flags())
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert "removed what a server that died left" in restarted.stdout
        assert not [s for s in stubs if process_state(s) == "running"], "the old stub survived"
        assert not [
            r for r in regions if r.exists()
        ], "the old server's shared memory is still there"
        new = recorded_pid(run_dir)
        assert new != pid and process_state(new) == "running"
        assert serve_local("status", "--run-dir", run_dir).stdout.rstrip().endswith(": running")
    finally:
        serve_local("stop", "--run-dir", run_dir)
        parent.stdin.close()
        parent.wait(timeout=60)
        for s in stubs:
            if process_state(s) == "running":
                os.kill(s, signal.SIGKILL)
    assert live_processes_of(run_dir) == []


def test_run_exits_non_zero_when_a_server_dies(shipped_repo, tmp_path):
    """`run` under a supervisor: it reaps its server, and when one dies it stops the rest and exits 3, so
    systemd's Restart=on-failure restarts it (before: it returned 0)."""
    from serve.local_triton import LocalTriton

    run_dir = tmp_path / "serve"
    run = subprocess.Popen(
        [sys.executable, "-m", "serve.local", "run", "--repo", str(shipped_repo)]
        + ["--run-dir", str(run_dir), "--models", PYTHON, *port_flags()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (run_dir / "infer-key").exists() or run.poll() is not None, 180, "ready")
        (pid,) = [p for p in live_processes_of(run_dir) if os.getpgid(p) == p]  # the server
        os.kill(pid, signal.SIGKILL)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 3, out + err
    assert f"tritonserver pid {pid} (grpc" in err and "killed by SIGKILL" in err, err
    assert not psutil.pid_exists(pid), "run reaps its server"
    assert live_processes_of(run_dir) == [] and not (run_dir / "triton.pid").exists()
    assert not list(Path("/dev/shm").glob(LocalTriton(run_dir=run_dir).shm_prefix + "*"))


def test_the_huge_shape_abort_with_the_key_ends_run_and_its_supervisor_brings_it_back(
    shipped_repo, tmp_path, shipped
):
    """Triton 2.51 sizes an HTTP JSON input from its declared shape before reading the data, so a client that
    HAS the inference key can still abort it with "shape": [1, 2**40] (std::bad_alloc; no setting in 2.51). What
    the bare local server can do is come back: `run` exits 3, and what a supervisor does next (systemd's
    Restart=on-failure runs the same command again, docs/production.md) serves again from the same run
    directory, without a manual `stop`. (The scale profile's proxy refuses such a request: tests/test_scale.py.)
    """
    import json
    import urllib.request

    run_dir = tmp_path / "serve"
    cmd = [sys.executable, "-m", "serve.local", "run", "--repo", str(shipped_repo)]
    cmd += ["--run-dir", str(run_dir), "--models", PYTHON, *port_flags()]
    http_port = flag(cmd, "http")

    def supervised_run() -> subprocess.Popen:
        key_file = run_dir / "infer-key"
        # A crashed run's key stays behind: wait for this run's own.
        stale = key_file.read_text() if key_file.exists() else None
        run = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # Ready once this run wrote its own key (after both readiness and the PID file): it then serves.
        wait_for(
            lambda: ready()
            and key_file.exists()
            and key_file.read_text() != stale
            or run.poll() is not None,
            180,
            "ready",
        )
        assert run.poll() is None, run.communicate()
        return run

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5):
                return True
        except OSError:
            return False

    run = supervised_run()
    try:
        body = {
            "parameters": {"sequence_id": 9_100_000_001, "sequence_start": True},
            "inputs": [
                {"name": "INPUT_IDS", "datatype": "INT32", "shape": [1, 2**40], "data": [1]}
            ],
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v2/models/{PYTHON}/infer",
            data=json.dumps(body).encode(),
            headers={INFER_KEY_HEADER: (run_dir / "infer-key").read_text().strip()},
        )
        with pytest.raises(OSError):  # the connection dies with the server (no HTTP answer)
            urllib.request.urlopen(request, timeout=60)
        out, err = run.communicate(timeout=120)
        assert run.returncode == 3, out + err
        assert "killed by SIGABRT" in err, err
        run = supervised_run()  # the supervisor's restart
        server = SimpleNamespace(
            grpc_url=f"127.0.0.1:{flag(cmd, 'grpc')}", http_url=None, infer_key=None
        )
        text = served(server, ["ROMEO:\n"], 60, SamplingParams(greedy=True), model=PYTHON)
        assert text == [tf_text(shipped, "ROMEO:\n", 60, SamplingParams(greedy=True))]
        run.send_signal(signal.SIGTERM)  # a supervisor's stop: exit 0, so no restart
        assert run.wait(60) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


# --- what keeps the server up ---------------------------------------------------------------------------
def test_64_concurrent_sequences_keep_the_server_up(server):
    """Regression: with gRPC's default allocation pool (8) tritonserver 2.51 segfaulted within seconds once
    more than ~32 sequences streamed at once (measured at 40, 48, 63, 64); serve.local sets a larger pool.
    """
    n, length = 64, 120
    prompts = [("ROMEO:\n", "JULIET:\n", "First Citizen:\n", "HAMLET:\n")[i % 4] for i in range(n)]
    texts = served(
        server, prompts, length, [SamplingParams(temperature=1.0, seed=i) for i in range(n)]
    )
    assert [len(t) for t in texts] == [length] * n
    assert len(set(texts)) > n // 2  # different seeds: different texts
    assert server.process.poll() is None and "Signal (11)" not in server.log_path.read_text()


def test_mixed_streaming_traffic_on_split_servers_keeps_both_up(gen_server, stream_server):
    """The issue's mixed load (per-character, chunked and streamed clients at once, each on gRPC streams) for
    a few rounds: every client finishes and both servers stay up."""
    import subprocess
    import sys

    py = [sys.executable, "-m", "client"]
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [
                    *py,
                    "--url",
                    gen_server.grpc_url,
                    "--model",
                    PYTHON,
                    "--greedy",
                    "--length",
                    "600",
                    "--retries",
                    "0",
                    "--quiet",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                [
                    *py,
                    "--url",
                    gen_server.grpc_url,
                    "--model",
                    repository.GEN_PYTHON,
                    "--chunk",
                    "4",
                    "--seed",
                    "3",
                    "--length",
                    "600",
                    "--quiet",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                [
                    *py,
                    "--url",
                    stream_server.grpc_url,
                    "--model",
                    repository.GEN_STREAM,
                    "--chunk",
                    "4",
                    "--seed",
                    "9",
                    "--length",
                    "600",
                    "--quiet",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            ),
        ]
        assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
        assert gen_server.is_ready() and stream_server.is_ready()


# --- security defaults ---------------------------------------------------------------------------------
def listening(port: int) -> list[tuple[str, int | None]]:
    """(local address, pid) of every LISTEN socket on `port`, IPv4 and IPv6, whoever holds it (pid None:
    a process we may not inspect)."""
    return [
        (c.laddr.ip, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


# 127.0.0.1, and on IPv6 sockets ::ffff:127.0.0.1 (gRPC's socket) or ::1.
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def test_server_listens_on_loopback_only(server):
    mine = set(group_pids(server.process.pid))
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        sockets = listening(port)
        assert sockets, f"nothing listens on port {port}"
        assert all(
            address in LOOPBACK for address, _ in sockets
        ), f"port {port} not loopback-only: {sockets}"
        assert all(pid in mine for _, pid in sockets), f"port {port} is not the server's"


def admin_clients(server):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from serve.local_triton import ADMIN_HEADER

    return (
        tg.InferenceServerClient(server.grpc_url),
        {f"triton-grpc-protocol-{ADMIN_HEADER}": server.admin_key},
        th.InferenceServerClient(server.http_url),
        {ADMIN_HEADER: server.admin_key},
    )


def refused(call) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value)


def test_model_repository_api_needs_the_admin_key_and_control_mode_is_none(server):
    g, gkey, h, hkey = admin_clients(server)
    try:
        for call in (
            lambda kw: g.get_model_repository_index(**kw),
            lambda kw: g.load_model(PYTHON, **kw),
            lambda kw: g.unload_model(PYTHON, **kw),
        ):
            assert "restricted, expecting header 'triton-grpc-protocol-admin-key'" in refused(
                lambda: call({})
            )
            assert "restricted" in refused(
                lambda: call({"headers": {"triton-grpc-protocol-admin-key": "guess"}})
            )
        for call in (
            lambda kw: h.get_model_repository_index(**kw),
            lambda kw: h.load_model(PYTHON, **kw),
            lambda kw: h.unload_model(PYTHON, **kw),
        ):
            assert "restricted, expecting header 'admin-key'" in refused(lambda: call({}))
            assert "restricted" in refused(lambda: call({"headers": {"admin-key": "guess"}}))
        index = g.get_model_repository_index(headers=gkey, as_json=True)["models"]
        assert [(m["name"], m["state"]) for m in index] == [(PYTHON, "READY")]
        assert [(m["name"], m["state"]) for m in h.get_model_repository_index(headers=hkey)] == [
            (PYTHON, "READY")
        ]
        # Even with the key the repository cannot be changed: model control mode none.
        for call in (
            lambda: g.load_model(PYTHON, headers=gkey),
            lambda: g.unload_model(PYTHON, headers=gkey),
            lambda: h.load_model(PYTHON, headers=hkey),
            lambda: h.unload_model(PYTHON, headers=hkey),
        ):
            assert "explicit model load / unload is not allowed" in refused(call)
        assert g.is_model_ready(PYTHON), "the model must still be loaded"
    finally:
        g.close()
        h.close()
    assert "--model-control-mode=none" in psutil.Process(server.process.pid).cmdline()


def test_logging_api_needs_the_admin_key(server):
    g, gkey, h, hkey = admin_clients(server)
    try:
        assert "restricted" in refused(lambda: g.get_log_settings())
        assert "restricted" in refused(lambda: g.update_log_settings({"log_verbose_level": 1}))
        assert "restricted" in refused(lambda: h.get_log_settings())
        assert "restricted" in refused(lambda: h.update_log_settings({"log_verbose_level": 1}))
        assert (
            g.get_log_settings(headers=gkey, as_json=True)["settings"]["log_verbose_level"][
                "uint32_param"
            ]
            == 0
        )
        assert h.get_log_settings(headers=hkey)["log_verbose_level"] == 0
    finally:
        g.close()
        h.close()


def test_http_inference_needs_the_key_so_a_huge_declared_shape_cannot_abort_the_server(server):
    """Triton 2.51 allocates a JSON input's declared shape before it reads the data: ONE request with
    "shape": [1, 2**40] aborted tritonserver (std::bad_alloc) in 1.3 s. The restricted-API check runs before the
    body is parsed, so without the inference key that request, and any HTTP inference, is refused; the server
    and a gRPC sequence running alongside carry on. The key works over HTTP, and the CLI explains a missing key.
    """
    import json
    import urllib.error
    import urllib.request

    def post(body: dict, headers: dict) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/{PYTHON}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def body(shape: list[int], seq: int) -> dict:
        return {
            "parameters": {"sequence_id": seq, "sequence_start": True, "sequence_end": True},
            "inputs": [{"name": "INPUT_IDS", "datatype": "INT32", "shape": shape, "data": [1]}],
        }

    canary = RawStream(server.grpc_url)
    try:
        canary.send("c/0", [[1]], 8_500_000_001, start=True)
        canary.logits("c")
        for headers in ({}, {INFER_KEY_HEADER: "guess"}):
            code, text = post(body([1, 2**40], 8_500_000_002), headers)
            assert code == 403 and f"expecting header '{INFER_KEY_HEADER}'" in text, (code, text)
        assert server.is_ready()
        assert post(body([1, 1], 8_500_000_003), {INFER_KEY_HEADER: server.infer_key})[0] == 200
        # the sequence kept its state through all of it
        canary.send("c/1", [[2]], 8_500_000_001, end=True)
        canary.logits("c")
    finally:
        canary.close()
    env = {k: v for k, v in os.environ.items() if k != INFER_KEY_ENV}
    cmd = [sys.executable, "-m", "client", "--url", server.http_url, "--protocol", "http"]
    cmd += ["--model", PYTHON, "--length", "5", "--greedy"]
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.startswith(
        "error: --protocol http: the server refused HTTP inference " "with no key"
    ), p.stderr
    assert INFER_KEY_ENV in p.stderr
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, INFER_KEY_ENV: server.infer_key},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr

"""The slim compose stack for real: images built (Triton's ONNX Runtime backend compiled in the image's builder
stage), `docker compose --profile slim up --wait` healthy, generation through the container equal to TensorFlow
on the ONNX Runtime backend (charrnn_onnx, charrnn_gen_onnx: Triton keeps the state) and on the python backend,
a server crash and a `docker compose kill` mid-generation, perf_analyzer, security from outside, and
`docker compose down` leaving nothing behind.

Needs a Docker engine and Compose v2 (and root for the crash test, which kills the server process from the
host). Without them the tests skip and say why; CHARRNN_REQUIRE_DOCKER=1 (set by .ci/run) turns the skip into a
failure, so CI cannot go green without them. Each run is its own compose project on free loopback ports, serving
a fresh export of the shipped model (MODEL_REPOSITORY), so it never touches a user's `make compose-up-slim`.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from charrnn.contract import INFER_KEY_ENV, STATE_IN, STATE_OUT
from charrnn.deployment import ADMIN_KEY_ENV, ENTRYPOINT
from charrnn.repository import (
    CPU_CONFIG_NAME,
    DECOUPLED_MODELS,
    GEN_ONNX,
    GEN_PYTHON,
    GEN_STREAM,
    LOCAL_MODELS,
    ONNX,
    ORT_MODELS,
    PYTHON,
    SHARED_PYTHON_MODELS,
)
from charrnn.repository import SHARED_CPU_MODELS as SHARED_MODELS
from charrnn.sampling import SamplingParams
from serve.local_triton import free_port
from tests.helpers import (
    ROOT,
    ComposeStack,
    client_cmd,
    docker_or_skip,
    run_client_on,
    served,
    tf_text,
    wait_for,
)

SERVICE, STREAM_SERVICE = "triton-slim", "triton-slim-stream"
PROMPTS = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "KING HENRY VI:\nO"]


@dataclass
class Stack(ComposeStack):
    """One compose project of the slim profile on free loopback ports."""

    PROFILES: ClassVar[tuple[str, ...]] = ("slim", "perf-slim")
    metrics_port: int = 0
    stream_grpc_port: int = 0

    @property
    def stream_url(self) -> str:
        return f"127.0.0.1:{self.stream_grpc_port}"

    def container(self, service: str = SERVICE) -> str:
        out = self.compose("ps", "-a", "-q", service).stdout.split()  # -a: a stopped one too
        assert len(out) == 1, f"expected one {service} container, got {out}"
        return out[0]

    def inspect(self, service: str = SERVICE) -> dict:
        return json.loads(
            subprocess.run(
                ["docker", "inspect", self.container(service)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )[0]

    def server_pid(self, service: str = SERVICE) -> int:
        """Host pid of the tritonserver process (docker top lists host pids)."""
        top = subprocess.run(
            ["docker", "top", self.container(service), "-eo", "pid,comm"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[1:]
        pids = [int(line.split()[0]) for line in top if line.split()[1] == "tritonserver"]
        assert len(pids) == 1, top
        return pids[0]


@pytest.fixture(scope="module")
def bases() -> dict:
    """Build both images (wheelhouse, base, docker compose build) as `make images` does."""
    docker_or_skip()
    from serve.images import IMAGES, build

    return build(list(IMAGES))


@pytest.fixture(scope="module")
def stack(bases, shipped_repo, tmp_path_factory):
    project = f"charrnn-test-{secrets.token_hex(4)}"
    ports = {
        name: free_port()
        for name in (
            "TRITON_HTTP_PORT",
            "TRITON_GRPC_PORT",
            "TRITON_METRICS_PORT",
            "TRITON_STREAM_HTTP_PORT",
            "TRITON_STREAM_GRPC_PORT",
            "TRITON_STREAM_METRICS_PORT",
        )
    }
    env = {
        **os.environ,
        **bases,
        **{k: str(v) for k, v in ports.items()},
        "TRITON_ADMIN_KEY": secrets.token_hex(16),
        "TRITON_INFER_KEY": secrets.token_hex(16),
        "TRITON_MEM_LIMIT": "3g",
        "MODEL_REPOSITORY": str(shipped_repo),
        "HOST_UID": str(os.getuid()),
        "HOST_GID": str(os.getgid()),
        "PERF_RESULTS": str(tmp_path_factory.mktemp("perf-results")),
    }
    s = Stack(
        project,
        env,
        ports["TRITON_HTTP_PORT"],
        ports["TRITON_GRPC_PORT"],
        ports["TRITON_METRICS_PORT"],
        ports["TRITON_STREAM_GRPC_PORT"],
    )
    t0 = time.monotonic()
    up = s.compose("up", "-d", "--wait", SERVICE, STREAM_SERVICE)
    if up.returncode != 0:
        logs = s.compose("logs", "--no-color", "--tail", "40").stdout
        s.compose("down", "--remove-orphans", "--volumes")
        pytest.fail(f"docker compose up --wait failed ({up.returncode}):\n{up.stderr}\n{logs}")
    print(f"slim stack healthy in {time.monotonic() - t0:.1f} s")
    yield s
    s.compose("down", "--remove-orphans", "--volumes")


def inference_count(stack: Stack, model: str = PYTHON) -> int:
    import tritonclient.grpc as tc

    c = tc.InferenceServerClient(stack.grpc_url)
    try:
        return int(
            c.get_inference_statistics(model, as_json=True)["model_stats"][0].get(
                "inference_count", 0
            )
        )
    except Exception:  # noqa: BLE001  (the server is restarting: no count yet)
        return -1
    finally:
        c.close()


# --- the builder stage's sources (no Docker needed) ----------------------------------------------------------
def test_backend_sources_are_staged_as_serve_backend_verifies_them(tmp_path, monkeypatch):
    """`python -m serve.images` stages exactly serve.backend's sources, checked by serve.backend's own checksums:
    a stale file goes, and a vendored file that differs from its recorded sha256 stops the build (exit 1).
    """
    from charrnn.errors import CheckFailed
    from serve import backend, images

    if not backend.DEFAULT_SOURCES.is_dir():
        pytest.skip(f"no vendored sources in {backend.DEFAULT_SOURCES}")
    vendored = tmp_path / "third_party"
    vendored.mkdir()
    for src in backend.SOURCES:
        (vendored / src.file).write_bytes((backend.DEFAULT_SOURCES / src.file).read_bytes())
    staged = tmp_path / "backend-sources"
    (staged / "downloads").mkdir(parents=True)
    (staged / "downloads" / "stale.tar.gz").write_bytes(b"old")
    monkeypatch.setattr(images, "BACKEND_SOURCES", staged)
    monkeypatch.setattr(images, "ROOT", tmp_path)
    monkeypatch.setenv(backend.SOURCES_ENV, str(vendored))
    assert images.stage_backend_sources(images.IMAGES[SERVICE]) == staged
    assert sorted(p.name for p in staged.rglob("*")) == sorted(s.file for s in backend.SOURCES)
    for src in backend.SOURCES:
        assert backend.file_sha256(staged / src.file) == src.sha256
    assert images.IMAGES[SERVICE].backend_sources and images.IMAGES[SERVICE].builder
    (vendored / backend.SOURCES[0].file).write_bytes(b"not the upstream archive")
    with pytest.raises(CheckFailed, match="do not match the recorded checksum"):
        images.stage_backend_sources(images.IMAGES[SERVICE])


# --- it builds, comes up and serves ------------------------------------------------------------------------
def test_compose_itself_accepts_every_service_of_every_profile(stack):
    """Docker Compose's own validation of the whole file, the NGC services included (they cannot run here)."""
    r = stack.compose(
        "--profile", "cpu", "--profile", "export", "--profile", "perf", "config", "-q"
    )
    assert r.returncode == 0, r.stderr
    r = stack.compose(
        "--profile", "cpu", "--profile", "export", "--profile", "perf", "config", "--services"
    )
    assert set(r.stdout.split()) == {
        "triton",
        "triton-cpu",
        "triton-stream",
        "export-trt",
        "perf",
        "triton-slim",
        "triton-slim-stream",
        "perf-slim",
    }


def test_stack_is_healthy_and_serves_exactly_the_local_models(stack):
    """triton-slim serves the non-decoupled models that need no GPU (ONNX Runtime and python backends);
    triton-slim-stream the decoupled one (mixing them on one server crashes Triton 2.51, charrnn/repository.py).
    """
    state = stack.inspect()["State"]
    assert state["Status"] == "running" and state["Health"]["Status"] == "healthy", state
    import tritonclient.http as th

    c = th.InferenceServerClient(stack.http_url)
    try:
        index = c.get_model_repository_index(headers={"admin-key": stack.env["TRITON_ADMIN_KEY"]})
        version = c.get_server_metadata()["version"]
    finally:
        c.close()
    assert sorted((m["name"], m["state"]) for m in index) == sorted(
        (m, "READY") for m in SHARED_MODELS
    )
    import tritonclient.grpc as tg

    g = tg.InferenceServerClient(stack.stream_url)
    try:
        assert [m for m in LOCAL_MODELS if g.is_model_ready(m)] == list(DECOUPLED_MODELS)
    finally:
        g.close()
    # The image's tag says which Triton it holds (the NGC 24.10 release's server).
    assert (
        stack.inspect()["Config"]["Image"]
        == f"charrnn-tritonserver-slim:{version}"
        == "charrnn-tritonserver-slim:2.51.0"
    )


@pytest.mark.parametrize("model", ORT_MODELS)
def test_onnx_models_run_on_the_onnxruntime_backend_with_their_cpu_config(stack, model):
    """Triton's own ONNX Runtime backend (built in the image) with implicit state, loaded from configs/cpu.pbtxt
    (KIND_CPU): the image's TRITON_MODEL_CONFIG_NAME makes the entrypoint add --model-config-name=cpu; compose's
    command does not say it.
    """
    import tritonclient.grpc as tg

    c = tg.InferenceServerClient(stack.grpc_url)
    try:
        assert c.is_model_ready(model)
        config = c.get_model_config(model, as_json=True)["config"]
    finally:
        c.close()
    assert config["backend"] == "onnxruntime" and config["platform"] == "onnxruntime_onnx"
    (state,) = config["sequence_batching"]["state"]
    assert (state["input_name"], state["output_name"]) == (STATE_IN, STATE_OUT)
    assert [int(d) for d in state["dims"]] == [2, 2, 512]
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]
    log = stack.compose("logs", "--no-color", SERVICE).stdout
    assert "TRITONBACKEND_Initialize: onnxruntime" in log
    assert "/opt/tritonserver/backends/onnxruntime/libtriton_onnxruntime.so" in log
    assert f"successfully loaded '{model}'" in log
    assert f"--model-config-name={CPU_CONFIG_NAME}" not in stack.inspect()["Config"]["Cmd"]


@pytest.mark.parametrize("model", [ONNX, PYTHON])
def test_greedy_through_the_container_equals_tensorflow(stack, shipped, model):
    greedy = SamplingParams(greedy=True)
    want = [tf_text(shipped, p, 300, greedy) for p in PROMPTS]
    assert served(stack, PROMPTS, 300, [greedy] * len(PROMPTS), model=model) == want


@pytest.mark.parametrize("model, flags", [(ONNX, []), (GEN_ONNX, ["--chunk", "32"])])
def test_the_client_picks_the_onnx_runtime_models_first(stack, model, flags):
    """The model table's preference order: without --model the client takes the ONNX Runtime models."""
    r = subprocess.run(
        [sys.executable, "-m", "client", "--url", stack.grpc_url, "--length", "5", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"[{model} via grpc://{stack.grpc_url}: 1 x 5 characters" in r.stderr


@pytest.mark.parametrize("model", [ONNX, PYTHON])
def test_8_concurrent_seeded_sequences_equal_their_solo_runs(stack, model):
    params = [SamplingParams(temperature=0.9, top_k=20, seed=100 + i) for i in range(8)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    together = served(stack, prompts, 200, params, model=model)
    solo = [served(stack, [p], 200, [q], model=model)[0] for p, q in zip(prompts, params)]
    assert together == solo
    assert len(set(together)) == 8, "different seeds should give different texts"


@pytest.mark.parametrize("model, chunk", [(GEN_ONNX, 32), (GEN_PYTHON, 16), (GEN_STREAM, 16)])
def test_generation_models_answer_through_the_container(stack, shipped, model, chunk):
    want = tf_text(shipped, "ROMEO:", 120, SamplingParams(greedy=True))
    url = stack.stream_url if model in DECOUPLED_MODELS else stack.grpc_url
    r = run_client_on(
        stack,
        "--url",
        url,
        "--model",
        model,
        "--chunk",
        str(chunk),
        "--greedy",
        "--prompt",
        "ROMEO:",
        "--length",
        "120",
        "--expect",
        want,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert f"[{model} via grpc://{url}: 1 x 120 characters, {chunk} per request" in r.stderr


# --- a real fault ---------------------------------------------------------------------------------------------
def test_server_crash_mid_generation_is_restarted_and_the_client_loses_nothing(stack):
    """SIGKILL of tritonserver in the middle of 4 sequences (what a segfault or the OOM killer does): Docker's
    restart policy brings the container back, and the client reconnects and re-primes to the same text.
    (`docker compose kill` would not do: Docker counts it as a manual stop and never restarts after it.)
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to kill the server process from the host")
    flags = [
        "--num-sequences",
        "4",
        "--seed",
        "5",
        "--temperature",
        "0.9",
        "--length",
        "600",
        "--quiet",
        "--retries",
        "10",
        "--retry-delay",
        "0.5",
    ]
    want = run_client_on(stack, *flags, timeout=300)
    assert want.returncode == 0, want.stderr
    restarts = stack.inspect()["RestartCount"]
    before = inference_count(stack)
    proc = subprocess.Popen(
        client_cmd(stack, *flags),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: inference_count(stack) >= before + 4 * 150 or proc.poll() is not None,
            120,
            "the client to be mid-generation",
        )
        assert proc.poll() is None, "the client finished before the crash"
        os.kill(stack.server_pid(), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == want.stdout, "the text after the crash differs from the uninterrupted run"
    assert "reconnected" in err, err
    info = wait_for(
        lambda: (lambda i: i if i["State"].get("Health", {}).get("Status") == "healthy" else None)(
            stack.inspect()
        ),
        120,
        "the restarted container to be healthy",
    )
    assert info["RestartCount"] == restarts + 1


def test_compose_kill_mid_generation_then_start_and_the_client_loses_nothing(stack):
    """`docker compose kill` of triton-slim in the middle of 4 sequences through charrnn_onnx (Triton keeps their
    state: it dies with the server): Docker does not restart a killed container (a manual stop), so
    `docker compose start` brings it back, and the client reconnects and re-primes to an uninterrupted run's text.
    Needs no root (the crash test above does)."""
    flags = [
        "--model",
        ONNX,
        "--num-sequences",
        "4",
        "--seed",
        "7",
        "--temperature",
        "0.9",
        "--length",
        "1500",
        "--quiet",
        "--retries",
        "10",
        "--retry-delay",
        "0.5",
    ]
    want = run_client_on(stack, *flags, timeout=300)
    assert want.returncode == 0, want.stderr
    restarts = stack.inspect()["RestartCount"]
    before = inference_count(stack, ONNX)
    proc = subprocess.Popen(
        client_cmd(stack, *flags),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: inference_count(stack, ONNX) >= before + 4 * 300 or proc.poll() is not None,
            120,
            "the client to be mid-generation",
        )
        assert proc.poll() is None, "the client finished before the kill"
        killed = stack.compose("kill", SERVICE)
        assert killed.returncode == 0, killed.stderr
        info = stack.inspect()  # a manual stop: no restart (`docker start` resets RestartCount)
        assert info["State"]["Status"] == "exited" and info["RestartCount"] == restarts, info[
            "State"
        ]
        started = stack.compose("start", SERVICE)
        assert started.returncode == 0, started.stderr
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == want.stdout, "the text after the kill differs from the uninterrupted run"
    assert "reconnected" in err, err
    wait_for(
        lambda: stack.inspect()["State"].get("Health", {}).get("Status") == "healthy",
        120,
        "the started container to be healthy",
    )


# --- perf_analyzer in its container -------------------------------------------------------------------------
def test_perf_slim_runs_perf_analyzer_and_writes_its_csv(stack, corpus):
    from bench.perf_input import main as perf_input

    results = Path(stack.env["PERF_RESULTS"])
    common = ["--data", str(corpus), "--streams", "8", "--prompt-length", "32", "--steps", "64"]
    assert perf_input(["--out", str(results / "perf_input.json"), *common]) == 0
    assert (
        perf_input(["--out", str(results / "perf_input_gen.json"), "--chunk", "16", *common]) == 0
    )
    models = (
        SHARED_PYTHON_MODELS  # two of perf-slim's default models (PERF_MODELS), to keep it short
    )
    r = stack.compose(
        "run",
        "--rm",
        "perf-slim",
        timeout=900,
        env={
            "PERF_MODELS": " ".join(models),
            "PERF_CONCURRENCY": "1 4",
            "PERF_INTERVAL_MS": "2000",
            "PERF_MAX_TRIALS": "6",
            "PERF_STABILITY": "50",
        },
    )
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    for model in models:
        with open(results / f"perf_{model}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(row["Concurrency"]) for row in rows] == [1, 4], rows
        for row in rows:
            assert float(row["Inferences/Second"]) > 0, row
            for column in (
                "p50 latency",
                "p95 latency",
                "p99 latency",
                "Server Queue",
                "Server Compute Input",
                "Server Compute Infer",
                "Server Compute Output",
            ):
                assert float(row[column]) >= 0, (column, row)
        log = (results / f"perf_{model}_c4.log").read_text()
        assert "Execution count" in log and "perf_analyzer CPU:" in log, log[-2000:]
    # make perf-slim's last step: our client at the same concurrencies, the tables and the plot.
    from bench.perf_report import main as perf_report
    from bench.perf_report import read_perf

    assert (
        perf_report(
            [
                "--results",
                str(results),
                "--url",
                stack.grpc_url,
                "--data",
                str(corpus),
                "--prompt-length",
                "32",
                "--length",
                "32",
            ]
        )
        == 0
    )
    perf = read_perf(results)
    assert all(r["Avg Batch"] >= 1 and r["Client CPU %"] > 0 for m in models for r in perf[m]), perf
    report = json.loads((results / "perf.json").read_text())
    assert [r["Concurrency"] for r in report["client"]] == [1, 4] and report["chunk"] == 16
    assert all(r["Inferences/Second"] > 0 and r["Avg Batch"] >= 1 for r in report["client"])
    table = (results / "perf.md").read_text()
    assert "| 4 |" in table and f"{GEN_PYTHON}, K = 16" in table, table
    assert (results / "perf.png").stat().st_size > 10_000
    # No stable measurement: perf_analyzer itself exits 0 and writes no row; perf.sh must call that a failure.
    r = stack.compose(
        "run",
        "--rm",
        "perf-slim",
        timeout=300,
        env={
            "PERF_MODELS": PYTHON,
            "PERF_CONCURRENCY": "1",
            "PERF_INTERVAL_MS": "500",
            "PERF_MAX_TRIALS": "3",
            "PERF_STABILITY": "0",
        },
    )
    assert r.returncode == 1 and f"perf: FAILED runs: {PYTHON}@1" in r.stderr, r.stderr[-2000:]
    assert not (results / f"perf_{PYTHON}_c1.csv").exists()
    assert not (
        results / f"perf_{PYTHON}.csv"
    ).exists(), "a failed run must not leave an old table behind"


# --- security, seen from outside (both servers) -------------------------------------------------------------
SERVERS = {SERVICE: SHARED_MODELS, STREAM_SERVICE: DECOUPLED_MODELS}


@pytest.mark.parametrize("service", SERVERS)
def test_the_entrypoint_adds_the_cpu_config_name_and_onnx_runtime_writes_nothing(stack, service):
    """Compose's command is the entrypoint alone (serve/tritonserver.sh, the NGC services' command too); in this
    image it execs the wheel's binary ($TRITONSERVER) with every flag and, from the image's
    TRITON_MODEL_CONFIG_NAME, --model-config-name=cpu, for both servers. The keys are on the server's command
    line only, not in its environment (the python stubs inherit it). ONNX Runtime, loaded by the backend and the
    python models' stubs, persists nothing (ORT_DISABLE_TELEMETRY: no device id or event cache under ~/.cache)
    and the user's HOME does not exist."""
    config = stack.inspect(service)["Config"]
    assert config["Cmd"] == [ENTRYPOINT], config["Cmd"]
    assert f"TRITON_MODEL_CONFIG_NAME={CPU_CONFIG_NAME}" in config["Env"]
    server = psutil.Process(stack.server_pid(service))
    argv = server.cmdline()
    assert argv[0].endswith("/pytriton/tritonserver/bin/tritonserver"), argv
    assert f"--model-config-name={CPU_CONFIG_NAME}" in argv, argv
    assert {
        "--model-repository=/models",
        "--model-control-mode=none",
        "--strict-readiness=true",
    } <= set(argv)
    for key in (ADMIN_KEY_ENV, INFER_KEY_ENV):
        assert any(a.endswith("=" + stack.env[key]) for a in argv), key
    try:
        environ = server.environ()
    except psutil.AccessDenied:  # not root: another uid's environment is not readable
        environ = None
    if environ is not None:
        assert not {ADMIN_KEY_ENV, INFER_KEY_ENV} & set(environ), sorted(environ)
    r = subprocess.run(
        [
            "docker",
            "exec",
            stack.container(service),
            "sh",
            "-c",
            'echo "$HOME $ORT_DISABLE_TELEMETRY"; '
            "find / -xdev \\( -name .onnxruntime -o -name deviceid \\) -print 2>/dev/null; true",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.split("\n", 1) == ["/nonexistent 1", ""], r.stdout


@pytest.mark.parametrize("service", SERVERS)
def test_server_runs_unprivileged_with_no_capabilities(stack, service):
    pid = stack.server_pid(service)
    uids = psutil.Process(pid).uids()  # real, effective, saved
    assert all(u == 1000 for u in uids), uids
    # psutil does not read capabilities or no_new_privs: /proc/<pid>/status
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, (
        fields["CapEff"],
        fields["CapBnd"],
    )
    assert fields["NoNewPrivs"].strip() == "1"
    info = stack.inspect(service)
    assert info["HostConfig"]["Memory"] == 3 * 2**30  # TRITON_MEM_LIMIT reaches the container
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    mounts = info["Mounts"]
    assert sorted(m["Destination"] for m in mounts) == sorted(
        f"/models/{m}" for m in SERVERS[service]
    )
    assert not any(m["RW"] for m in mounts), mounts


@pytest.mark.parametrize("service", SERVERS)
def test_ports_are_published_on_loopback_only(stack, service):
    ports = stack.inspect(service)["NetworkSettings"]["Ports"]
    bindings = [b for spec in ports.values() for b in (spec or [])]
    want = {
        SERVICE: [stack.http_port, stack.grpc_port, stack.metrics_port],
        STREAM_SERVICE: [
            int(stack.env[f"TRITON_STREAM_{kind}_PORT"]) for kind in ("HTTP", "GRPC", "METRICS")
        ],
    }[service]
    assert sorted(int(b["HostPort"]) for b in bindings) == sorted(want)
    assert all(b["HostIp"] == "127.0.0.1" for b in bindings), bindings


def test_admin_api_needs_the_key_from_outside(stack):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    key = stack.env["TRITON_ADMIN_KEY"]
    h, g = th.InferenceServerClient(stack.http_url), tg.InferenceServerClient(stack.grpc_url)
    try:
        for call in (
            lambda: h.get_model_repository_index(),
            lambda: h.get_log_settings(),
            lambda: g.get_model_repository_index(),
            lambda: g.get_log_settings(),
            lambda: h.get_model_repository_index(headers={"admin-key": "guess"}),
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        assert h.get_log_settings(headers={"admin-key": key})["log_verbose_level"] == 0
        names = [
            m["name"]
            for m in g.get_model_repository_index(
                headers={"triton-grpc-protocol-admin-key": key}, as_json=True
            )["models"]
        ]
        assert sorted(names) == sorted(SHARED_MODELS)
        # Even with the key, model control mode none: nothing can be loaded or unloaded.
        with pytest.raises(
            InferenceServerException, match="explicit model load / unload is not allowed"
        ):
            h.unload_model(PYTHON, headers={"admin-key": key})
        assert h.is_model_ready(PYTHON)
    finally:
        h.close()
        g.close()


# --- down leaves nothing (last: it stops the module's stack) ------------------------------------------------
def test_compose_down_leaves_no_container_network_or_volume(stack):
    r = stack.compose("down", "--remove-orphans", "--volumes")
    assert r.returncode == 0, r.stderr
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        left = subprocess.run(
            ["docker", *kind, "-q", "--filter", label], capture_output=True, text=True, check=True
        ).stdout.split()
        assert left == [], f"docker {' '.join(kind)} still lists {left} of project {stack.project}"

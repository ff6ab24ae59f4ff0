"""End to end through the real local Triton server (python backend): the client vs the TF reference."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from charrnn.sampling import SamplingParams
from tests.conftest import ROOT, free_port, served, tf_text

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING HENRY VI:\nO"]


def start_server(repo: Path, run_dir: Path, **kw):
    from charrnn.local_triton import LocalTriton

    return LocalTriton.on_free_ports(repo=repo, run_dir=run_dir, **kw).start()


@pytest.fixture(scope="session")
def server(shipped_repo, tmp_path_factory):
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


def run_client(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_greedy_through_triton_equals_tf_reference(shipped, server):
    greedy = SamplingParams(greedy=True)
    want = [tf_text(shipped, p, 500, greedy) for p in PROMPTS]
    got = served(server, PROMPTS, 500, [greedy] * len(PROMPTS))
    for prompt, w, g in zip(PROMPTS, want, got):
        assert g == w, f"prompt {prompt!r}: first difference at {next(i for i, (a, b) in enumerate(zip(w, g)) if a != b)}"
    assert len(set(got)) == len(got), "different prompts should give different greedy texts"


def test_seeded_sampling_through_triton_equals_tf_reference(shipped, server):
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    assert served(server, [PROMPTS[0]], 200, [params]) == [tf_text(shipped, PROMPTS[0], 200, params)]


def test_long_prompt_is_chunked_and_matches(shipped, server):
    from charrnn.contract import MAX_T

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[-3000:]
    prompt = text[: 2 * MAX_T + 37]  # three chunks
    greedy = SamplingParams(greedy=True)
    assert served(server, [prompt], 100, [greedy]) == [tf_text(shipped, prompt, 100, greedy)]


def test_concurrent_sequences_do_not_leak_state(server):
    """8 sequences interleaved on one stream (batched by the server) each equal their solo run."""
    prompts = [f"{name}:\n" for name in ("ROMEO", "JULIET", "HAMLET", "LEAR", "MACBETH", "OTHELLO", "PUCK", "IAGO")]
    params = [SamplingParams(temperature=1.0, seed=100 + i) for i in range(len(prompts))]
    together = served(server, prompts, 150, params)
    solo = [served(server, [p], 150, [q])[0] for p, q in zip(prompts, params)]
    assert together == solo
    assert len(set(together)) == len(together)


def test_same_seed_same_text_different_seed_differs(server):
    a = run_client("--url", server.grpc_url, "--seed", "5", "--length", "120", "--quiet")
    b = run_client("--url", server.grpc_url, "--seed", "5", "--length", "120", "--quiet")
    c = run_client("--url", server.grpc_url, "--seed", "6", "--length", "120", "--quiet")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + c.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_http_protocol_gives_the_same_text(server):
    greedy = SamplingParams(greedy=True)
    assert served(server, PROMPTS[:2], 100, [greedy] * 2, protocol="http") == \
        served(server, PROMPTS[:2], 100, [greedy] * 2)


def test_client_cli_streams_and_checks_expect(shipped, server):
    want = tf_text(shipped, "ROMEO:", 80, SamplingParams(greedy=True))
    ok = run_client("--url", server.grpc_url, "--prompt", "ROMEO:", "--length", "80", "--greedy", "--expect", want)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "ROMEO:" + want + "\n"
    bad = run_client("--url", server.grpc_url, "--prompt", "ROMEO:", "--length", "80", "--greedy", "--expect", "x")
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1].startswith("error: --expect: the generated text differs")


def inference_count(server) -> int:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.grpc_url)
    stats = client.get_inference_statistics("charrnn_python", as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


def test_example_client_passes_and_prints_the_reference_text(shipped, server):
    """client/example.py, the raw protocol on one page, checks itself: PASS, exit 0, TF's greedy text."""
    r = subprocess.run([sys.executable, "-m", "client.example", "--url", server.grpc_url], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text, verdict = r.stdout.rstrip("\n").rsplit("\n", 1)
    assert verdict == "PASS"
    assert text == "ROMEO:\n" + tf_text(shipped, "ROMEO:\n", 40, SamplingParams(greedy=True))


def test_unknown_character_is_a_client_error_before_anything_is_sent(server):
    before = inference_count(server)
    r = run_client("--url", server.grpc_url, "--prompt", "Héllo wörld", "--length", "10")
    assert r.returncode == 2
    assert r.stderr.startswith("error: prompt:") and "'é'" in r.stderr and "'ö'" in r.stderr
    assert inference_count(server) == before


@pytest.mark.parametrize("args, code, pattern", [
    (["--length", "0"], 2, r"^error: --length: must be >= 1"),
    (["--prompt", ""], 2, r"^error: --prompt: is empty"),
    (["--temperature", "-1"], 2, r"^error: temperature: must be >= 0\.001"),
    # a subnormal temperature overflowed logits / T into degenerate text, returned as success
    (["--temperature", "1e-45"], 2, r"^error: temperature: must be >= 0\.001 \(smaller values overflow"),
    (["--temperature", "1e-45", "--chunk", "4"], 2, r"^error: temperature: must be >= 0\.001"),
    (["--top-k", "1000"], 2, r"^error: top-k: must be in 1\.\.65"),
    (["--top-p", "0"], 2, r"^error: top-p: must be in \(0, 1\]"),
    (["--model", "no_such_model"], 3, r"^error: model no_such_model: not ready"),
    (["--num-sequences", "0"], 2, r"^error: --num-sequences: must be in 1\.\.1024"),
    (["--num-sequences", "1025"], 2, r"^error: --num-sequences: must be in 1\.\.1024 \(the sequence slots"),
    (["--seed", "-1"], 2, r"^error: seed: must be in 0\.\.2\^63-1"),
    (["--retries", "-1"], 2, r"^error: --retries: must be >= 0"),
    (["--chunk", "0"], 2, r"^error: --chunk: must be in 1\.\.256"),
    (["--chunk", "4", "--protocol", "http"], 2, r"^error: --chunk: needs gRPC"),
    (["--chunk", "4", "--model", "charrnn_python"], 2, r"^error: --model: charrnn_python is not a server-side"),
])
def test_bad_client_input_gives_clear_errors(server, args, code, pattern):
    r = run_client("--url", server.grpc_url, *args)
    assert r.returncode == code, r.stderr
    assert re.search(pattern, r.stderr), r.stderr


@pytest.mark.parametrize("url", ["127.0.0.1:{port}", "not a url"])
def test_unreachable_server_is_a_clear_error(url):
    r = run_client("--url", url.format(port=free_port()), "--length", "5")
    assert r.returncode in (2, 3)
    assert r.stderr.startswith("error: ")
    if r.returncode == 3:
        assert "unreachable" in r.stderr and "make serve" in r.stderr


def test_sequences_stay_on_their_instance_with_two_instances(tmp_path, shipped_repo):
    """With 2 model instances (each holds its own states), concurrent sequences still match solo runs."""
    import shutil

    two = tmp_path / "repo2"
    shutil.copytree(shipped_repo / "charrnn_python", two / "charrnn_python")
    config = two / "charrnn_python" / "config.pbtxt"
    text = config.read_text()
    assert "count: 1 " in text
    config.write_text(text.replace("count: 1 ", "count: 2 "))
    s = start_server(two, tmp_path / "serve")
    try:
        prompts = [f"{c}:" for c in "ABCDEFGHIJKL"]
        params = [SamplingParams(temperature=1.0, seed=7 + i) for i in range(len(prompts))]
        together = served(s, prompts, 100, params)
        solo = [served(s, [p], 100, [q])[0] for p, q in zip(prompts, params)]
        log = s.log_path.read_text()
    finally:
        s.stop()
    assert together == solo
    assert "charrnn_python_0_1" in log, "the second instance should have been created"


@pytest.mark.parametrize("binary", ["/nonexistent/bin/tritonserver", "no-such-tritonserver-command"])
def test_launcher_names_a_missing_tritonserver_binary(binary):
    r = subprocess.run([sys.executable, "-m", "serve.local", "run", "--tritonserver", binary], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: --tritonserver: {binary!r} is not an executable file"), r.stderr


def test_launcher_stops_the_server_and_leaves_no_process(tmp_path, shipped_repo):
    s = start_server(shipped_repo, tmp_path / "serve")
    pid = s.process.pid
    children = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2, "server + python backend stub expected in the process group"
    s.stop()
    left = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    assert left == []
    assert not s.is_ready()


def test_bench_quick_writes_perf_analyzer_csv_plot_and_table(tmp_path, shipped_repo):
    """`make bench`'s code path end to end (--quick: counts too small for figures); only --out is written."""
    import csv

    from bench.bench import RESULTS, ROOT

    kept = {f: f.read_bytes() for f in [ROOT / "README.md", *sorted(RESULTS.glob("bench.*"))]}
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "bench.bench", "--quick", "--repo", str(shipped_repo),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[5/5]" in r.stdout, "progress is shown while it runs"
    assert {f: f.read_bytes() for f in kept} == kept, "--out elsewhere: README and bench/results untouched"
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["Concurrency"]) for r in rows] == [1, 4]
    for r in rows:  # perf_analyzer's column names, microseconds
        assert float(r["Inferences/Second"]) > 0 and float(r["Chars/Second"]) > 0
        assert 0 < float(r["p50 latency"]) <= float(r["p90 latency"]) <= float(r["p99 latency"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "cores" in md and "| ONNX Runtime, batch 64 |" in md and "time to first char" in md
    assert "| 8 | 16 |" in md, "server-side generation rows (K = 8, 16 sequences) expected"
    floor = json.loads((out / "bench.json").read_text())["floor"]  # the empty python model was served and driven
    assert floor["Concurrency"] == 1 and floor["Requests"] > 0 and floor["Chars/Second"] > 0
    assert "| round-trip floor: empty python-backend model, 1 stream |" in md


@pytest.mark.parametrize("flags, what", [
    (["--values", "1"], "error: --values: needs at least two values"),
    (["--param", "no_such_parameter"], "error: --param: charrnn_gen_python has no config parameter"),
    (["--model", "charrnn_onnx"], "error: --model: 'charrnn_onnx' does not run on the local server"),
    (["--k", "0"], "error: --sequences/--k/--rounds/--length: need positive integers"),
])
def test_bench_ab_bad_flags_are_clear_errors(shipped_repo, flags, what):
    r = subprocess.run([sys.executable, "-m", "bench.ab", "--repo", str(shipped_repo), *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert what in r.stderr


# --- initialize(): the checks every python-backend model runs on its config and model.onnx ---------------
STEP_TENSORS = {"INPUT_IDS": "tensor(int32)", "STATE_IN": "tensor(float)", "LOGITS": "tensor(float)",
                "STATE_OUT": "tensor(float)"}


def initialize_args(model_dir: Path, config) -> dict:
    """What Triton passes to TritonPythonModel.initialize: the config as JSON, the model's folder and version."""
    from google.protobuf.json_format import MessageToJson

    return {"model_config": MessageToJson(config, preserving_proto_field_name=True), "model_name": config.name,
            "model_repository": str(model_dir), "model_version": "1"}


def test_load_stateful_model_reads_the_config_and_opens_the_graph(shipped_repo):
    from charrnn.sequence_state import load_stateful_model
    from charrnn.repository import load_config

    config = load_config(shipped_repo / "charrnn_python" / "config.pbtxt")
    model = load_stateful_model(initialize_args(shipped_repo / "charrnn_python", config), STEP_TENSORS)
    assert model.idle_seconds == config.sequence_batching.max_sequence_idle_microseconds / 1e6 == 60.0
    assert model.threads == int(config.parameters["intra_op_threads"].string_value)
    assert model.io["LOGITS"].shape[1] == 65 and model.io["STATE_IN"].shape[1:] == [2, 2, 512]


@pytest.mark.parametrize("change, message", [
    (lambda c, d: setattr(c, "max_batch_size", 0), "charrnn_python requires max_batch_size >= 1, got 0"),
    (lambda c, d: c.ClearField("sequence_batching"), "charrnn_python requires sequence_batching, got none"),
    (lambda c, d: c.sequence_batching.direct.SetInParent(), "charrnn_python requires the oldest strategy, got direct"),
    (lambda c, d: c.parameters["intra_op_threads"].__setattr__("string_value", "two"),
     "charrnn_python requires parameter intra_op_threads to be an integer >= 1, got 'two'"),
    (lambda c, d: (d / "1" / "model.onnx").unlink(), "/1/model.onnx, got no such file (run `make export`)"),
    (lambda c, d: shutil.copy(d.parent / "charrnn_gen_python" / "1" / "model.onnx", d / "1" / "model.onnx"),
     "charrnn_python requires ONNX LOGITS tensor(float), got no such tensor"),
])
def test_load_stateful_model_refuses_what_the_model_cannot_serve(shipped_repo, tmp_path, change, message):
    from charrnn.sequence_state import load_stateful_model
    from charrnn.repository import load_config

    repo = tmp_path / "repo"  # a copy: the change must not reach the session's repository
    for name in ("charrnn_python", "charrnn_gen_python"):
        shutil.copytree(shipped_repo / name, repo / name)
    config = load_config(repo / "charrnn_python" / "config.pbtxt")
    change(config, repo / "charrnn_python")
    with pytest.raises(ValueError) as e:
        load_stateful_model(initialize_args(repo / "charrnn_python", config), STEP_TENSORS)
    assert message in str(e.value)

"""The benchmarks (bench/): `make bench` end to end (--quick), bench.ab's flag checks, bench.perf_input
(perf_analyzer --input-data built from the real test split: format, continuity, bad flags), and the soaks
(bench.soak, bench.mixed_soak; slow). bench.perf_report runs in tests/test_compose_slim.py, against the slim
stack's perf_analyzer results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.perf_input import main
from charrnn import repository
from charrnn.contract import INPUT_IDS, MAX_T
from charrnn.data import read_text, split
from charrnn.errors import EXIT_USAGE
from charrnn.vocab import Vocab
from tests.helpers import ROOT

STREAMS, PROMPT, STEPS = 64, 64, 256  # the defaults `make perf` uses


# --- bench.bench and bench.ab ------------------------------------------------------------------------------
def test_bench_quick_writes_perf_analyzer_csv_plot_and_table(tmp_path, shipped_repo):
    """`make bench`'s code path end to end (--quick: counts too small for figures); only --out is written.
    Both backends are served: charrnn_python and charrnn_onnx per character, server-side generation on each,
    an empty model on each for the round-trip floor, and the CPU per character. Structure and sanity only: the
    figures of a quick run on a shared machine mean nothing, so no timing is asserted."""
    import csv
    import math

    from bench.bench import RESULTS, ROOT

    kept = {f: f.read_bytes() for f in [ROOT / "README.md", *sorted(RESULTS.glob("bench.*"))]}
    out = tmp_path / "results"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench",
            "--quick",
            "--repo",
            str(shipped_repo),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[5/5]" in r.stdout, "progress is shown while it runs"
    assert {
        f: f.read_bytes() for f in kept
    } == kept, "--out elsewhere: README and bench/results untouched"
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    per_char = (repository.PYTHON, repository.ONNX)
    assert [(r["Model"], int(r["Concurrency"])) for r in rows] == [
        (m, c) for m in per_char for c in (1, 4)
    ]
    for r in rows:  # perf_analyzer's column names, microseconds
        assert float(r["Inferences/Second"]) > 0 and float(r["Chars/Second"]) > 0
        assert 0 < float(r["p50 latency"]) <= float(r["p90 latency"]) <= float(r["p99 latency"])
        # CPU from /proc (10 ms ticks: a quick run may see none on the server) and the client's own clock
        assert float(r["Server CPU %"]) >= 0 and float(r["Server CPU us/char"]) >= 0
        assert float(r["Client CPU %"]) > 0 and float(r["Client CPU us/char"]) > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "cores" in md and "| ONNX Runtime, batch 64, 1 thread(s) |" in md
    assert "time to first char" in md and "load average" in md
    for m in per_char:
        assert f"| {m} | 1 |" in md and f"| {m} | 4 |" in md, m
    assert f"| ratio | {repository.PYTHON} | {repository.ONNX} | target |" in md
    assert "| served 1-stream / that bound |" in md
    assert "| server CPU per character / in-process ORT batch 64" in md
    result = json.loads((out / "bench.json").read_text())
    # the empty models were served and driven, one per backend
    assert set(result["floor"]) == set(per_char)
    for floor in result["floor"].values():
        assert floor["Concurrency"] == 1 and floor["Requests"] > 0 and floor["Chars/Second"] > 0
    assert result["floor"][repository.ONNX]["Model"] == "charrnn_floor_onnx"
    assert "| round-trip floor: empty model on the same backend, 1 stream" in md
    assert result["cpu"]["ort_b64_us_per_char"] > 0 and result["cpu"]["ort_threads"] == 1
    for m in per_char:
        x = result["ratios"][m]
        assert x["bound_1"] > 0 and x["s1_over_bound"] > 0 and x["ttfc_over_prime"] > 0, x
        assert x["server_cpu_over_ort64"] >= 0 and x["client_cpu_us_per_char"] > 0, x
        assert math.isclose(x["s1_over_bound"] * x["bound_1"], x["served_1"]), x
        assert x["bound_1_paused"] > 0 and x["s1_over_bound_paused"] > 0, x
    assert result["baselines"]["ort_b1_paused"]["step_us"] > 0
    load = result["machine_load"]  # what else ran meanwhile, from /proc/stat and getrusage
    assert load["benchmark_cores"] > 0 and load["other_cores"] >= 0, load
    assert "other processes used" in md
    # server-side generation on both backends: charrnn_gen_python K = 1, 8 at 1 and 16 sequences;
    # charrnn_gen_onnx K = 32 at the --concurrency levels (1, 4 in --quick)
    gen_python, gen_onnx = result["chunked"], result["gen_onnx"]
    assert gen_python["model"] == repository.GEN_PYTHON and gen_onnx["model"] == repository.GEN_ONNX
    assert [(x["K"], x["sequences"]) for x in gen_python["rows"]] == [
        (1, 1),
        (1, 16),
        (8, 1),
        (8, 16),
    ]
    assert [(x["K"], x["sequences"]) for x in gen_onnx["rows"]] == [(32, 1), (32, 4)]
    for x in gen_python["rows"] + gen_onnx["rows"]:
        assert x["chars_per_s"] > 0 and x["requests"] > 0 and x["server_cpu_us_per_char"] >= 0
    assert "| 8 | 16 |" in md, "server-side generation rows (K = 8, 16 sequences) expected"
    assert f"{repository.GEN_ONNX} with 2 ORT threads" in md and "| 32 | 4 |" in md


def test_floor_onnx_is_charrnn_onnx_without_the_work(tmp_path, shipped_repo):
    """bench/floor_onnx.py: charrnn_onnx's CPU config renamed (the same batcher, implicit state, KIND_CPU,
    threads), and a graph with the same I/O that returns zero logits and passes the state through.
    """
    import numpy as np
    import onnx

    from bench.floor_onnx import FLOOR_ONNX_MODEL, write_floor_model
    from charrnn.contract import INPUT_IDS, LOGITS, STATE_IN, STATE_OUT
    from charrnn.onnx_runtime import ort_session
    from charrnn.repository import load_config
    from export.configs import check_config_against_onnx

    folder = write_floor_model(shipped_repo, tmp_path)
    assert folder == tmp_path / FLOOR_ONNX_MODEL
    config = load_config(folder / "configs" / "cpu.pbtxt")
    assert load_config(folder) == config
    served = load_config(shipped_repo / repository.ONNX / "configs" / "cpu.pbtxt")
    assert config.name == FLOOR_ONNX_MODEL
    config.name = served.name
    assert config == served, "everything but the name is charrnn_onnx's CPU config"
    model = onnx.load(folder / "1" / "model.onnx")
    assert check_config_against_onnx(served, model) == []
    session = ort_session(folder / "1" / "model.onnx")
    dims = tuple(served.sequence_batching.state[0].dims)
    state = np.random.default_rng(0).standard_normal((3, *dims)).astype(np.float32)
    logits, state_out = session.run(
        [LOGITS, STATE_OUT], {INPUT_IDS: np.zeros((3, 5), np.int32), STATE_IN: state}
    )
    assert logits.shape == (3, served.output[0].dims[0]) and not logits.any()
    assert np.array_equal(state_out, state)


@pytest.mark.parametrize(
    "flags, what",
    [
        (["--values", "1"], "error: --values: needs at least two values"),
        (
            ["--param", "no_such_parameter"],
            f"error: --param: {repository.GEN_PYTHON} has no config parameter",
        ),
        (
            ["--model", repository.ONNX],
            f"error: --model: '{repository.ONNX}' does not run on the local server",
        ),
        (["--k", "0"], "error: --sequences/--k/--rounds/--length: need positive integers"),
    ],
)
def test_bench_ab_bad_flags_are_clear_errors(shipped_repo, flags, what):
    r = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--repo", str(shipped_repo), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert what in r.stderr


# --- bench.perf_input ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_text(corpus) -> str:
    """The test split as text (the same 90/5/5 cut charrnn.data.split makes on ids)."""
    text = read_text(corpus)
    return "".join(split(list(text))[2])


@pytest.fixture(scope="module")
def generated(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("perf") / "perf_input.json"
    rc = main(
        [
            "--out",
            str(out),
            "--data",
            str(corpus),
            "--streams",
            str(STREAMS),
            "--prompt-length",
            str(PROMPT),
            "--steps",
            str(STEPS),
            "--seed",
            "0",
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def stream_text(stream: list[dict], vocab: Vocab) -> str:
    return "".join(vocab.decode(step[INPUT_IDS]["content"]) for step in stream)


def test_top_level_is_a_list_of_streams(generated):
    assert list(generated) == ["data"]
    assert isinstance(generated["data"], list) and len(generated["data"]) == STREAMS
    assert all(isinstance(s, list) and len(s) == STEPS + 1 for s in generated["data"])


def test_every_step_is_exactly_input_ids_with_content_and_shape(generated, corpus_vocab):
    for stream in generated["data"]:
        for k, step in enumerate(stream):
            assert list(step) == [INPUT_IDS]
            tensor = step[INPUT_IDS]
            assert sorted(tensor) == ["content", "shape"]
            content, shape = tensor["content"], tensor["shape"]
            assert all(type(i) is int and 0 <= i < len(corpus_vocab) for i in content)
            assert shape == [len(content)]  # no batch dim: perf_analyzer adds it
            assert shape == ([PROMPT] if k == 0 else [1])


def test_streams_are_teacher_forced_windows_of_the_test_split(generated, corpus_vocab, test_text):
    for stream in generated["data"]:
        text = stream_text(stream, corpus_vocab)
        assert len(text) == PROMPT + STEPS
        offset = test_text.find(text)
        assert offset >= 0, "stream is not contiguous text of the test split"
        assert text == test_text[offset : offset + PROMPT + STEPS]


def test_streams_differ(generated, corpus_vocab):
    texts = [stream_text(s, corpus_vocab) for s in generated["data"]]
    assert len(set(texts)) == len(texts)


def test_seed_makes_it_reproducible(corpus, tmp_path, generated):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    flags = [
        "--data",
        str(corpus),
        "--streams",
        str(STREAMS),
        "--prompt-length",
        str(PROMPT),
        "--steps",
        str(STEPS),
    ]
    assert main(["--out", str(a), *flags, "--seed", "0"]) == 0
    assert main(["--out", str(b), *flags, "--seed", "1"]) == 0
    assert json.loads(a.read_text()) == generated
    assert json.loads(b.read_text()) != generated


@pytest.fixture
def small_corpus(corpus, tmp_path) -> Path:
    """The first 2,000 characters of the real corpus: a 100-character test split."""
    path = tmp_path / "small.txt"
    path.write_text(read_text(corpus)[:2000], encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "flags",
    [
        ["--streams", "0"],
        ["--streams", "-3"],
        ["--prompt-length", "0"],
        ["--prompt-length", str(MAX_T + 1)],  # one request may carry at most MAX_T characters
        ["--steps", "0"],
        ["--seed", "-1"],
        ["--data", "no/such/corpus.txt"],
    ],
)
def test_bad_flags_exit_2(corpus, tmp_path, flags, capsys):
    out = tmp_path / "x.json"
    assert main(["--out", str(out), "--data", str(corpus), *flags]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()


def test_stream_longer_than_the_test_split_exits_2(small_corpus, tmp_path, capsys):
    # 150-character prompt > the 100-character test split.
    rc = main(
        [
            "--out",
            str(tmp_path / "x.json"),
            "--data",
            str(small_corpus),
            "--prompt-length",
            "150",
            "--steps",
            "1",
            "--streams",
            "1",
        ]
    )
    assert rc == EXIT_USAGE
    assert "test split has only 100" in capsys.readouterr().err


def test_more_streams_than_offsets_exits_2(small_corpus, tmp_path, capsys):
    # 100 - (50 + 10) + 1 = 41 possible offsets.
    rc = main(
        [
            "--out",
            str(tmp_path / "x.json"),
            "--data",
            str(small_corpus),
            "--prompt-length",
            "50",
            "--steps",
            "10",
            "--streams",
            "42",
        ]
    )
    assert rc == EXIT_USAGE
    assert "41 possible offsets" in capsys.readouterr().err
    assert (
        main(
            [
                "--out",
                str(tmp_path / "y.json"),
                "--data",
                str(small_corpus),
                "--prompt-length",
                "50",
                "--steps",
                "10",
                "--streams",
                "41",
            ]
        )
        == 0
    )


def test_module_cli_exit_code(corpus, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.perf_input",
            "--streams",
            "0",
            "--out",
            str(tmp_path / "x.json"),
            "--data",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == EXIT_USAGE
    assert r.stderr.strip() == "error: --streams: must be >= 1, got 0"


def test_generation_model_streams_carry_noise_temperature_and_top_k(
    corpus, tmp_path, corpus_vocab, test_text
):
    """--chunk K: steps / K requests per stream, each with NOISE (K, V) uniforms in (0, 1) as base64 float32,
    TEMPERATURE [1.0] and TOP_K [0]; the first carries the prompt, each later one the next real character.
    """
    import base64

    import numpy as np

    from charrnn.contract import NOISE, TEMPERATURE, TOP_K

    out = tmp_path / "gen.json"
    k, steps, prompt = 16, 64, 32
    assert (
        main(
            [
                "--out",
                str(out),
                "--data",
                str(corpus),
                "--streams",
                "4",
                "--prompt-length",
                str(prompt),
                "--steps",
                str(steps),
                "--chunk",
                str(k),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())["data"]
    assert len(data) == 4 and all(len(stream) == steps // k for stream in data)
    for stream in data:
        first = corpus_vocab.decode(stream[0][INPUT_IDS]["content"])
        assert len(first) == prompt and first in test_text
        window = test_text[test_text.index(first) :][: prompt + steps]
        for r, step in enumerate(stream):
            assert sorted(step) == sorted([INPUT_IDS, NOISE, TEMPERATURE, TOP_K])
            if r:  # the character the previous request's K-th output stands for, teacher-forced
                assert corpus_vocab.decode(step[INPUT_IDS]["content"]) == window[prompt + r * k - 1]
            noise = np.frombuffer(base64.b64decode(step[NOISE]["b64"]), "<f4")
            assert step[NOISE]["shape"] == [k, len(corpus_vocab)] and noise.size == k * len(
                corpus_vocab
            )
            assert (noise > 0).all() and (noise < 1).all()
            assert step[TEMPERATURE] == {"content": [1.0], "shape": [1]} and step[TOP_K] == {
                "content": [0],
                "shape": [1],
            }


@pytest.mark.parametrize("chunk", ["0", "257", "48"])  # 48 does not divide --steps 256
def test_bad_chunk_exits_2(corpus, tmp_path, chunk, capsys):
    assert (
        main(["--out", str(tmp_path / "x.json"), "--data", str(corpus), "--chunk", chunk])
        == EXIT_USAGE
    )
    assert "error: --chunk: must be in 1..256 and divide --steps (256)" in capsys.readouterr().err


# --- soaks (slow) ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_64_sequences_no_errors_and_flat_server_memory(shipped_repo, tmp_path):
    from bench.soak import main as soak_main

    assert (
        soak_main(
            [
                "--repo",
                str(shipped_repo),
                "--run-dir",
                str(tmp_path / "serve"),
                "--sequences",
                "64",
                "--length",
                "2000",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_mixed_soak_10_minutes_no_crash_no_wrong_text_flat_memory():
    """`make soak-mixed`: every python model at once, over gRPC and HTTP, per character, chunked and streamed,
    with bad requests mixed in, for 10 minutes (bench/mixed_soak.py checks texts, errors and memory).
    """
    r = subprocess.run(
        [sys.executable, "-m", "bench.mixed_soak", "--minutes", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 crashes, 0 wrong texts" in r.stdout

"""bench.perf_input: perf_analyzer --input-data built from the real test split (format, continuity, bad flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.perf_input import main
from charrnn.contract import INPUT_IDS, MAX_T
from charrnn.data import read_text, split
from charrnn.errors import EXIT_USAGE
from charrnn.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent
STREAMS, PROMPT, STEPS = 64, 64, 256  # the defaults `make perf` uses


@pytest.fixture(scope="module")
def test_text(corpus) -> str:
    """The test split as text (the same 90/5/5 cut charrnn.data.split makes on ids)."""
    text = read_text(corpus)
    return "".join(split(list(text))[2])


@pytest.fixture(scope="module")
def vocab(corpus) -> Vocab:
    return Vocab.from_text(read_text(corpus))


@pytest.fixture(scope="module")
def generated(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("perf") / "perf_input.json"
    rc = main(["--out", str(out), "--data", str(corpus), "--streams", str(STREAMS),
               "--prompt-length", str(PROMPT), "--steps", str(STEPS), "--seed", "0"])
    assert rc == 0
    return json.loads(out.read_text())


def stream_text(stream: list[dict], vocab: Vocab) -> str:
    return "".join(vocab.decode(step[INPUT_IDS]["content"]) for step in stream)


def test_top_level_is_a_list_of_streams(generated):
    assert list(generated) == ["data"]
    assert isinstance(generated["data"], list) and len(generated["data"]) == STREAMS
    assert all(isinstance(s, list) and len(s) == STEPS + 1 for s in generated["data"])


def test_every_step_is_exactly_input_ids_with_content_and_shape(generated, vocab):
    for stream in generated["data"]:
        for k, step in enumerate(stream):
            assert list(step) == [INPUT_IDS]
            tensor = step[INPUT_IDS]
            assert sorted(tensor) == ["content", "shape"]
            content, shape = tensor["content"], tensor["shape"]
            assert all(type(i) is int and 0 <= i < len(vocab) for i in content)
            assert shape == [len(content)]  # no batch dim: perf_analyzer adds it
            assert shape == ([PROMPT] if k == 0 else [1])


def test_streams_are_teacher_forced_windows_of_the_test_split(generated, vocab, test_text):
    for stream in generated["data"]:
        text = stream_text(stream, vocab)
        assert len(text) == PROMPT + STEPS
        offset = test_text.find(text)
        assert offset >= 0, "stream is not contiguous text of the test split"
        assert text == test_text[offset: offset + PROMPT + STEPS]


def test_streams_differ(generated, vocab):
    texts = [stream_text(s, vocab) for s in generated["data"]]
    assert len(set(texts)) == len(texts)


def test_seed_makes_it_reproducible(corpus, tmp_path, generated):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    flags = ["--data", str(corpus), "--streams", str(STREAMS), "--prompt-length", str(PROMPT), "--steps", str(STEPS)]
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


@pytest.mark.parametrize("flags", [
    ["--streams", "0"],
    ["--streams", "-3"],
    ["--prompt-length", "0"],
    ["--prompt-length", str(MAX_T + 1)],  # one request may carry at most MAX_T characters
    ["--steps", "0"],
    ["--seed", "-1"],
    ["--data", "no/such/corpus.txt"],
])
def test_bad_flags_exit_2(corpus, tmp_path, flags, capsys):
    out = tmp_path / "x.json"
    assert main(["--out", str(out), "--data", str(corpus), *flags]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()


def test_stream_longer_than_the_test_split_exits_2(small_corpus, tmp_path, capsys):
    # 150-character prompt > the 100-character test split.
    rc = main(["--out", str(tmp_path / "x.json"), "--data", str(small_corpus), "--prompt-length", "150",
               "--steps", "1", "--streams", "1"])
    assert rc == EXIT_USAGE
    assert "test split has only 100" in capsys.readouterr().err


def test_more_streams_than_offsets_exits_2(small_corpus, tmp_path, capsys):
    # 100 - (50 + 10) + 1 = 41 possible offsets.
    rc = main(["--out", str(tmp_path / "x.json"), "--data", str(small_corpus), "--prompt-length", "50",
               "--steps", "10", "--streams", "42"])
    assert rc == EXIT_USAGE
    assert "41 possible offsets" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "y.json"), "--data", str(small_corpus), "--prompt-length", "50",
                 "--steps", "10", "--streams", "41"]) == 0


def test_module_cli_exit_code(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.perf_input", "--streams", "0", "--out", str(tmp_path / "x.json"),
                        "--data", str(corpus)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE
    assert r.stderr.strip() == "error: --streams: must be >= 1, got 0"


def test_generation_model_streams_carry_noise_temperature_and_top_k(corpus, tmp_path, vocab, test_text):
    """--chunk K: steps / K requests per stream, each with NOISE (K, V) uniforms in (0, 1) as base64 float32,
    TEMPERATURE [1.0] and TOP_K [0]; the first carries the prompt, each later one the next real character."""
    import base64

    import numpy as np

    from charrnn.contract import NOISE, TEMPERATURE, TOP_K

    out = tmp_path / "gen.json"
    k, steps, prompt = 16, 64, 32
    assert main(["--out", str(out), "--data", str(corpus), "--streams", "4", "--prompt-length", str(prompt),
                 "--steps", str(steps), "--chunk", str(k)]) == 0
    data = json.loads(out.read_text())["data"]
    assert len(data) == 4 and all(len(stream) == steps // k for stream in data)
    for stream in data:
        first = vocab.decode(stream[0][INPUT_IDS]["content"])
        assert len(first) == prompt and first in test_text
        window = test_text[test_text.index(first):][: prompt + steps]
        for r, step in enumerate(stream):
            assert sorted(step) == sorted([INPUT_IDS, NOISE, TEMPERATURE, TOP_K])
            if r:  # the character the previous request's K-th output stands for, teacher-forced
                assert vocab.decode(step[INPUT_IDS]["content"]) == window[prompt + r * k - 1]
            noise = np.frombuffer(base64.b64decode(step[NOISE]["b64"]), "<f4")
            assert step[NOISE]["shape"] == [k, len(vocab)] and noise.size == k * len(vocab)
            assert (noise > 0).all() and (noise < 1).all()
            assert step[TEMPERATURE] == {"content": [1.0], "shape": [1]} and step[TOP_K] == {"content": [0], "shape": [1]}


@pytest.mark.parametrize("chunk", ["0", "257", "48"])  # 48 does not divide --steps 256
def test_bad_chunk_exits_2(corpus, tmp_path, chunk, capsys):
    assert main(["--out", str(tmp_path / "x.json"), "--data", str(corpus), "--chunk", chunk]) == EXIT_USAGE
    assert "error: --chunk: must be in 1..256 and divide --steps (256)" in capsys.readouterr().err

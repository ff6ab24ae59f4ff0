"""`python -m train.sample` (train/sample.py), the reference sampler CLI, on a really trained tiny model: it
prints the prompt and the text, is reproducible, equals charrnn.sampling in-process, and refuses bad input.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import PY, ROOT, tiny_text

CLI_SEEDED = [
    "--prompt",
    "ROMEO:",
    "--length",
    "60",
    "--seed",
    "7",
    "--temperature",
    "0.8",
    "--top-k",
    "20",
]
CLI_RUNS = {
    "seeded-1": CLI_SEEDED,
    "seeded-2": CLI_SEEDED,
    "unknown-char": ["--prompt", "Roméo:", "--length", "10", "--seed", "1"],
}


@pytest.fixture(scope="module")
def cli_runs(tiny_model):
    """`python -m train.sample` subprocesses, one after the other (concurrent TensorFlow imports thrash)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return {
        name: subprocess.run(
            [PY, "-m", "train.sample", "--model-dir", str(tiny_model), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=300,
        )
        for name, args in CLI_RUNS.items()
    }


def test_cli_prints_prompt_and_is_reproducible(cli_runs, tiny):
    first, second = cli_runs["seeded-1"], cli_runs["seeded-2"]
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ROMEO:")
    assert first.stdout.endswith("\n") and len(first.stdout) == len("ROMEO:") + 60 + 1
    assert first.stderr.strip() == ""
    assert second.returncode == 0 and second.stdout == first.stdout
    # The CLI is the library: the same parameters in-process give the same text.
    assert (
        first.stdout
        == "ROMEO:" + tiny_text(tiny, length=60, seed=7, temperature=0.8, top_k=20) + "\n"
    )


def test_cli_unknown_prompt_character(cli_runs):
    r = cli_runs["unknown-char"]
    assert r.returncode == 2
    assert r.stderr.startswith("error: prompt:")
    assert "'é'" in r.stderr
    assert r.stdout == ""  # nothing generated, the prompt not echoed


@pytest.mark.parametrize(
    "args,message",
    [
        (["--length", "0"], "error: length: must be >= 1, got 0"),
        (["--length", "-5"], "error: length: must be >= 1, got -5"),
        (["--prompt", ""], "error: prompt: is empty"),
        (["--top-k", "66"], "error: top-k: must be in 1..65"),
        (["--temperature", "0"], "error: temperature: must be >= 0.001"),
        (
            ["--temperature", "1e-45"],
            "error: temperature: must be >= 0.001 (smaller values overflow",
        ),
    ],
)
def test_cli_bad_input_exits_2(tiny_model, capsys, args, message):
    """The CLI's main in-process (a subprocess per case would cost a TensorFlow import each)."""
    from train.sample import main

    capsys.readouterr()
    assert main(["--model-dir", str(tiny_model), *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(message)
    assert out == ""

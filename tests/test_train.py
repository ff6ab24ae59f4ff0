"""The trainer (train.train), run for real with tiny models: what a run leaves behind, resuming, bad input.
The evaluator (train.evaluate): tests/test_evaluate.py."""

from __future__ import annotations

import math
import shutil

import pytest

from charrnn.data import CORPUS_CHARS, CORPUS_MD5, md5_of
from charrnn.model import load_model_dir
from charrnn.vocab import Vocab
from tests.helpers import TINY_FLAGS, read_json
from train.train import main as train_main

LN65 = math.log(65)
# conftest's tiny model, flag -> value (it is trained with exactly TINY_FLAGS)
TINY = {f: v for f, v in zip(TINY_FLAGS, TINY_FLAGS[1:] + [""]) if f.startswith("--")}

# Smaller than conftest's tiny model: a few seconds per run, on a 60k-character slice of the corpus.
SMALL_FLAGS = [
    "--hidden-size",
    "16",
    "--embedding-size",
    "8",
    "--num-layers",
    "1",
    "--dropout",
    "0",
    "--batch-size",
    "8",
    "--seq-length",
    "16",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "3",
    "--learning-rate",
    "0.01",
    "--quiet",
]


@pytest.fixture(scope="module")
def small_corpus(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(corpus.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def run_small(data, out, *extra) -> int:
    return train_main(["--data", str(data), "--out", str(out), *SMALL_FLAGS, *extra])


@pytest.fixture(scope="module")
def six_step_run(small_corpus, tmp_path_factory):
    """A finished 6-step run (checkpoints at 3 and 6). Read-only: tests copy it before resuming."""
    out = tmp_path_factory.mktemp("run") / "small"
    assert run_small(small_corpus, out, "--max-steps", "6") == 0
    return out


# --- what a training run leaves behind ---------------------------------------------------------------


def test_tiny_model_directory_is_complete(tiny_model, corpus):
    for name in (
        "config.json",
        "vocab.json",
        "model.weights.h5",
        "model_card.json",
        "checkpoints/train_state.json",
        "checkpoints/checkpoint",
    ):
        assert (tiny_model / name).is_file(), name
    assert read_json(tiny_model / "config.json") == {
        "vocab_size": 65,
        "cell": TINY.get("--cell", "lstm"),
        "layers": int(TINY["--num-layers"]),
        "hidden": int(TINY["--hidden-size"]),
        "embedding": int(TINY["--embedding-size"]),
        "dropout": float(TINY["--dropout"]),
    }
    assert Vocab.load(tiny_model / "vocab.json") == Vocab.from_text(
        corpus.read_text(encoding="utf-8")
    )
    state = read_json(tiny_model / "checkpoints" / "train_state.json")
    assert state["step"] == int(TINY["--max-steps"])
    assert state["config"] == read_json(tiny_model / "config.json")
    net, vocab, card = load_model_dir(tiny_model)  # the directory loads as a network
    assert len(vocab) == 65 and card["name"] == tiny_model.name


def test_tiny_model_card(tiny_model):
    card = read_json(tiny_model / "model_card.json")
    steps, every = int(TINY["--max-steps"]), int(TINY["--eval-every"])
    assert card["steps"] == steps
    assert 1 <= card["best_step"] <= steps and (
        card["best_step"] % every == 0 or card["best_step"] == steps
    )
    assert card["training_seconds"] > 0
    assert card["corpus"]["md5"] == CORPUS_MD5
    assert card["corpus"]["characters"] == CORPUS_CHARS
    assert card["vocab_size"] == 65
    assert card["architecture"] == read_json(tiny_model / "config.json")
    assert card["training"]["batch_size"] == int(TINY["--batch-size"])
    assert card["training"]["seq_length"] == int(TINY["--seq-length"])
    assert card["training"]["max_steps"] == steps
    if TINY.get("--cell", "lstm") == "lstm":  # embedding + stacked LSTMs + dense head
        h, e, layers = (
            int(TINY["--hidden-size"]),
            int(TINY["--embedding-size"]),
            int(TINY["--num-layers"]),
        )
        lstm = lambda inputs: 4 * (h * (inputs + h) + h)  # noqa: E731
        assert card["parameters"] == 65 * e + lstm(e) + (layers - 1) * lstm(h) + h * 65 + 65
    m = card["metrics"]
    for split in ("train", "val", "test"):
        loss, ppl = m[f"{split}_loss"], m[f"{split}_perplexity"]
        assert 0 < loss < 10
        assert ppl == pytest.approx(math.exp(loss), rel=1e-3)


def test_tiny_model_loss_went_down(tiny_model):
    """An untrained model predicts ~uniformly (ln 65 = 4.17 nats); 60 steps must beat that by a margin."""
    m = read_json(tiny_model / "model_card.json")["metrics"]
    assert m["val_loss"] < LN65 - 0.5
    assert m["train_loss"] < LN65 - 0.5
    assert m["test_loss"] < LN65 - 0.5
    assert m["val_perplexity"] < 65 * 0.6


def test_small_run_outputs_and_card(six_step_run, small_corpus):
    card = read_json(six_step_run / "model_card.json")
    assert card["steps"] == 6 and card["training"]["max_steps"] == 6
    assert card["corpus"]["md5"] == md5_of(small_corpus) != CORPUS_MD5
    assert card["corpus"]["file"] == "small.txt" and card["corpus"]["characters"] == 60_000
    assert set(card["metrics"]) == {
        f"{s}_{k}" for s in ("train", "val", "test") for k in ("loss", "perplexity")
    }
    state = read_json(six_step_run / "checkpoints" / "train_state.json")
    assert state["step"] == 6
    assert state["best_step"] == card["best_step"] in (3, 6)
    assert (six_step_run / "checkpoints" / "ckpt-6.index").is_file()


# --- resume ------------------------------------------------------------------------------------------


def test_resume_continues_from_the_saved_step(six_step_run, small_corpus, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(six_step_run, out)
    before = read_json(out / "checkpoints" / "train_state.json")
    assert before["step"] == 6
    capsys.readouterr()
    assert run_small(small_corpus, out, "--max-steps", "10", "--resume") == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "at step 6" in stdout
    assert "ckpt-6" in stdout
    # Only steps 7..10 ran: the first evaluation printed is at step 9 (eval every 3), then the final one at 10.
    evals = [line.split()[1] for line in stdout.splitlines() if line.startswith("step ")]
    assert evals == ["9/10", "10/10"]
    after = read_json(out / "checkpoints" / "train_state.json")
    assert after["step"] == 10
    assert after["training_seconds"] >= before["training_seconds"]
    card = read_json(out / "model_card.json")
    assert card["steps"] == 10 and card["training"]["max_steps"] == 10
    assert (out / "checkpoints" / "ckpt-10.index").is_file()


def test_resume_with_different_model_flags_is_a_user_error(
    six_step_run, small_corpus, tmp_path, capsys
):
    out = tmp_path / "other"
    shutil.copytree(six_step_run, out)
    capsys.readouterr()
    assert run_small(small_corpus, out, "--max-steps", "10", "--resume", "--hidden-size", "17") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: checkpoint was trained with")
    assert "'hidden': 16" in err
    # nothing was overwritten
    assert read_json(out / "checkpoints" / "train_state.json")["step"] == 6


def test_resume_without_checkpoint_is_a_user_error(small_corpus, tmp_path, capsys):
    assert run_small(small_corpus, tmp_path / "fresh", "--max-steps", "3", "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


# --- bad data / flags: exit code 2 with an error: message ------------------------------------------


def test_corpus_smaller_than_one_batch(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be, that is the question.\n" * 10)  # 440 chars < 16 x 50 + 1
    out = tmp_path / "o"
    assert (
        train_main(
            [
                "--data",
                str(tiny),
                "--out",
                str(out),
                *SMALL_FLAGS,
                "--batch-size",
                "16",
                "--seq-length",
                "50",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tiny}: ")
    assert "smaller than one batch (16 x 50 + 1)" in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "not-utf8", "directory"])
def test_unreadable_corpus(tmp_path, capsys, kind):
    data = tmp_path / "corpus.txt"
    if kind == "not-utf8":
        data.write_bytes(b"\xff\xfe" + "hello world ".encode("utf-16-le") * 500)
    elif kind == "directory":
        data.mkdir()
    assert train_main(["--data", str(data), "--out", str(tmp_path / "o"), *SMALL_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}: ")
    if kind == "missing":
        assert "corpus file not found" in err


@pytest.mark.parametrize(
    "flags,what",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-length", "-1"], "--seq-length"),
        (["--learning-rate", "0"], "--learning-rate"),
    ],
)
def test_bad_flags(tmp_path, capsys, corpus, flags, what):
    assert train_main(["--data", str(corpus), "--out", str(tmp_path / "o"), "--quiet", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {what}")

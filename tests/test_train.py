"""The trainer (train.train) and the evaluator (train.evaluate), run for real with tiny models."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import TINY_FLAGS
from charrnn.data import CORPUS_CHARS, CORPUS_MD5, load_splits, md5_of
from charrnn.model import ModelConfig, build_model, load_model_dir
from charrnn.vocab import Vocab
from train.evaluate import evaluate_loss
from train.train import main as train_main
from train import evaluate as evaluate_cli

import keras  # noqa: E402  (after charrnn.model, which sets TensorFlow's environment)

LN65 = math.log(65)
# conftest's tiny model, flag -> value (it is trained with exactly TINY_FLAGS)
TINY = {f: v for f, v in zip(TINY_FLAGS, TINY_FLAGS[1:] + [""]) if f.startswith("--")}

# Smaller than conftest's tiny model: a few seconds per run, on a 60k-character slice of the corpus.
SMALL_FLAGS = ["--hidden-size", "16", "--embedding-size", "8", "--num-layers", "1", "--dropout", "0",
               "--batch-size", "8", "--seq-length", "16", "--eval-every", "3", "--checkpoint-every", "3",
               "--learning-rate", "0.01", "--quiet"]


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


def read_json(path):
    return json.loads(path.read_text())


# --- what a training run leaves behind ---------------------------------------------------------------


def test_tiny_model_directory_is_complete(tiny_model, corpus):
    for name in ("config.json", "vocab.json", "model.weights.h5", "model_card.json",
                 "checkpoints/train_state.json", "checkpoints/checkpoint"):
        assert (tiny_model / name).is_file(), name
    assert read_json(tiny_model / "config.json") == {
        "vocab_size": 65, "cell": TINY.get("--cell", "lstm"), "layers": int(TINY["--num-layers"]),
        "hidden": int(TINY["--hidden-size"]), "embedding": int(TINY["--embedding-size"]),
        "dropout": float(TINY["--dropout"])}
    assert Vocab.load(tiny_model / "vocab.json") == Vocab.from_text(corpus.read_text(encoding="utf-8"))
    state = read_json(tiny_model / "checkpoints" / "train_state.json")
    assert state["step"] == int(TINY["--max-steps"])
    assert state["config"] == read_json(tiny_model / "config.json")
    model, vocab, card = load_model_dir(tiny_model)  # the directory loads as a model
    assert len(vocab) == 65 and card["name"] == tiny_model.name


def test_tiny_model_card(tiny_model):
    card = read_json(tiny_model / "model_card.json")
    steps, every = int(TINY["--max-steps"]), int(TINY["--eval-every"])
    assert card["steps"] == steps
    assert 1 <= card["best_step"] <= steps and (card["best_step"] % every == 0 or card["best_step"] == steps)
    assert card["training_seconds"] > 0
    assert card["corpus"]["md5"] == CORPUS_MD5
    assert card["corpus"]["characters"] == CORPUS_CHARS
    assert card["vocab_size"] == 65
    assert card["architecture"] == read_json(tiny_model / "config.json")
    assert card["training"]["batch_size"] == int(TINY["--batch-size"])
    assert card["training"]["seq_length"] == int(TINY["--seq-length"])
    assert card["training"]["max_steps"] == steps
    if TINY.get("--cell", "lstm") == "lstm":  # embedding + stacked LSTMs + dense head
        h, e, layers = int(TINY["--hidden-size"]), int(TINY["--embedding-size"]), int(TINY["--num-layers"])
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
    assert set(card["metrics"]) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("loss", "perplexity")}
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


def test_resume_with_different_model_flags_is_a_user_error(six_step_run, small_corpus, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(six_step_run, out)
    capsys.readouterr()
    assert run_small(small_corpus, out, "--max-steps", "10", "--resume", "--hidden-size", "17") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: checkpoint was trained with")
    assert "'hidden': 16" in err
    assert read_json(out / "checkpoints" / "train_state.json")["step"] == 6  # nothing was overwritten


def test_resume_without_checkpoint_is_a_user_error(small_corpus, tmp_path, capsys):
    assert run_small(small_corpus, tmp_path / "fresh", "--max-steps", "3", "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


# --- bad data / flags: exit code 2 with an error: message ------------------------------------------


def test_corpus_smaller_than_one_batch(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be, that is the question.\n" * 10)  # 440 chars < 16 x 50 + 1
    out = tmp_path / "o"
    assert train_main(["--data", str(tiny), "--out", str(out), *SMALL_FLAGS, "--batch-size", "16",
                       "--seq-length", "50"]) == 2
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


@pytest.mark.parametrize("flags,what", [(["--batch-size", "0"], "--batch-size"),
                                        (["--seq-length", "-1"], "--seq-length"),
                                        (["--learning-rate", "0"], "--learning-rate")])
def test_bad_flags(tmp_path, capsys, corpus, flags, what):
    assert train_main(["--data", str(corpus), "--out", str(tmp_path / "o"), "--quiet", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {what}")


# --- evaluator ---------------------------------------------------------------------------------------


def test_evaluate_loss_of_zero_weights_is_ln_v():
    model = build_model(ModelConfig(vocab_size=3, hidden=2, embedding=2, layers=1))
    for w in model.weights:
        w.assign(np.zeros(w.shape, np.float32))
    ids = np.random.default_rng(0).integers(0, 3, size=50, dtype=np.int32)
    loss, count = evaluate_loss(model, ids, batch_size=4, seq_len=7)
    assert count == 4 * ((50 - 1) // 4) == 48
    assert loss == pytest.approx(math.log(3), abs=1e-6)


def _numpy_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None].astype(np.int64), axis=-1)[..., 0]


@pytest.fixture(scope="module")
def random_model():
    keras.utils.set_random_seed(7)
    model = build_model(ModelConfig(vocab_size=5, hidden=6, embedding=4, layers=2))
    # Larger weights than the default init so the logits (and losses) are far from uniform.
    for w in model.weights:
        w.assign(w.numpy() * 3)
    return model


def test_evaluate_loss_matches_numpy_cross_entropy_single_stream(random_model):
    ids = np.random.default_rng(1).integers(0, 5, size=40, dtype=np.int32)
    loss, count = evaluate_loss(random_model, ids, batch_size=1, seq_len=7)  # 6 chunks, state carried
    assert count == 39
    logits, _ = random_model(ids[None, :-1])
    want = _numpy_ce(logits.numpy()[0], ids[1:]).mean()
    assert abs(want - math.log(5)) > 0.05  # a case where a wrong loss would show
    assert loss == pytest.approx(want, abs=1e-5)


def test_evaluate_loss_streams(random_model):
    """batch_size=3: three contiguous streams, each from a zero state; the leftover character is dropped."""
    ids = np.random.default_rng(2).integers(0, 5, size=32, dtype=np.int32)
    loss, count = evaluate_loss(random_model, ids, batch_size=3, seq_len=4)
    per = (32 - 1) // 3  # 10
    assert count == 3 * per == 30
    x = ids[: 3 * per].reshape(3, per)
    y = ids[1 : 3 * per + 1].reshape(3, per)
    logits, _ = random_model(x)
    assert loss == pytest.approx(_numpy_ce(logits.numpy(), y).mean(), abs=1e-5)


def test_evaluate_cli_json_matches_card(tiny_model, corpus, capsys):
    """`python -m train.evaluate --json` (its main, in-process: TensorFlow is already loaded here)."""
    capsys.readouterr()
    assert evaluate_cli.main(["--model", str(tiny_model), "--data", str(corpus), "--split", "val", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert result["split"] == "val"
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    _, _, val, _ = load_splits(corpus)
    assert result["characters"] == 32 * ((len(val) - 1) // 32)
    card = read_json(tiny_model / "model_card.json")
    assert result["loss"] == pytest.approx(card["metrics"]["val_loss"], abs=1e-4)


def test_evaluate_cli_bad_model_dir(tmp_path, capsys):
    assert evaluate_cli.main(["--model", str(tmp_path / "nope"), "--json"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope'}: model directory not found")


def test_shipped_model_beats_samplecharrnn_on_the_test_split(corpus, capsys):
    """`make evaluate` on the shipped model: test perplexity below sampleCharRNN's published 4.940, and the
    figure its model card (and the README) states; the card names the flags `make train` runs."""
    import re

    from conftest import ROOT, SHIPPED_MODEL

    capsys.readouterr()
    assert evaluate_cli.main(["--model", str(SHIPPED_MODEL), "--data", str(corpus), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and result["perplexity"] < 4.940
    card = read_json(SHIPPED_MODEL / "model_card.json")
    assert result["perplexity"] == pytest.approx(card["metrics"]["test_perplexity"], abs=1e-3)
    if SHIPPED_MODEL == ROOT / "models" / "shakespeare-lstm-2x512":
        flags = re.search(r"^TRAIN_FLAGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()
        assert card["training"]["command"].endswith(flags), (card["training"]["command"], flags)

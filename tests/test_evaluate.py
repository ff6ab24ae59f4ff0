"""The evaluator (train.evaluate): evaluate_loss against a NumPy cross-entropy, its CLI (`make evaluate`) on the
tiny model and on the shipped one (test perplexity below sampleCharRNN's published 4.940, as its card states).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from charrnn.data import load_splits
from charrnn.model import (
    ModelConfig,
    build_net,
    keras,  # TensorFlow's, with its environment set first
)
from tests.helpers import read_json
from train import evaluate as evaluate_cli
from train.evaluate import evaluate_loss


def test_evaluate_loss_of_zero_weights_is_ln_v():
    net = build_net(ModelConfig(vocab_size=3, hidden=2, embedding=2, layers=1))
    for w in net.weights:
        w.assign(np.zeros(w.shape, np.float32))
    ids = np.random.default_rng(0).integers(0, 3, size=50, dtype=np.int32)
    loss, count = evaluate_loss(net, ids, batch_size=4, seq_len=7)
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
    net = build_net(ModelConfig(vocab_size=5, hidden=6, embedding=4, layers=2))
    # Larger weights than the default init so the logits (and losses) are far from uniform.
    for w in net.weights:
        w.assign(w.numpy() * 3)
    return net


def test_evaluate_loss_matches_numpy_cross_entropy_single_stream(random_model):
    ids = np.random.default_rng(1).integers(0, 5, size=40, dtype=np.int32)
    # 6 chunks, state carried
    loss, count = evaluate_loss(random_model, ids, batch_size=1, seq_len=7)
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
    assert (
        evaluate_cli.main(
            ["--model-dir", str(tiny_model), "--data", str(corpus), "--split", "val", "--json"]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert result["split"] == "val"
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    _, _, val, _ = load_splits(corpus)
    assert result["characters"] == 32 * ((len(val) - 1) // 32)
    card = read_json(tiny_model / "model_card.json")
    assert result["loss"] == pytest.approx(card["metrics"]["val_loss"], abs=1e-4)


# --model: its first spelling, still accepted
@pytest.mark.parametrize("flag", ["--model-dir", "--model"])
def test_evaluate_cli_bad_model_dir(flag, tmp_path, capsys):
    assert evaluate_cli.main([flag, str(tmp_path / "nope"), "--json"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {tmp_path / 'nope'}: model directory not found"
    )


def test_shipped_model_beats_samplecharrnn_on_the_test_split(corpus, capsys):
    """`make evaluate` on the shipped model: test perplexity below sampleCharRNN's published 4.940, and the
    figure its model card (and the README) states; the card names the flags `make train` runs."""
    import re

    from tests.helpers import ROOT, SHIPPED_MODEL

    capsys.readouterr()
    assert (
        evaluate_cli.main(["--model-dir", str(SHIPPED_MODEL), "--data", str(corpus), "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and result["perplexity"] < 4.940
    card = read_json(SHIPPED_MODEL / "model_card.json")
    assert result["perplexity"] == pytest.approx(card["metrics"]["test_perplexity"], abs=1e-3)
    if SHIPPED_MODEL == ROOT / "models" / "shakespeare-lstm-2x512":
        flags = (
            re.search(r"^TRAIN_FLAGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
            .group(1)
            .strip()
        )
        assert card["training"]["command"].endswith(flags), (card["training"]["command"], flags)

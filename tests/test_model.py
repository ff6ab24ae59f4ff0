"""The Keras char-RNN (charrnn.model): shapes, explicit state, model directory round trip and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from charrnn.errors import UserError
from charrnn.model import (  # imports TensorFlow and Keras, with their environment set first
    CARD_FILE,
    CONFIG_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    build_net,
    keras,
    load_model_dir,
    save_model_dir,
    tf,
)
from charrnn.vocab import Vocab

V, H, E, L = 7, 5, 3, 2
VOCAB = Vocab(list("\n abcde"))
CELLS = ["lstm", "gru", "rnn"]


def make(cell: str, seed: int = 0):
    keras.utils.set_random_seed(seed)
    return build_net(ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embedding=E))


def ids_batch(B: int, T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(B, T), dtype=np.int32)


@pytest.fixture(scope="module")
def lstm_dir(tmp_path_factory):
    """A saved random-weight LSTM model directory (module-scoped; tests copy it before breaking it)."""
    out = tmp_path_factory.mktemp("m") / "lstm"
    save_model_dir(out, make("lstm"), VOCAB, card={"name": "lstm", "steps": 0})
    return out


@pytest.mark.parametrize("cell,slots", [("lstm", 2), ("gru", 1), ("rnn", 1)])
def test_forward_shapes(cell, slots):
    net = make(cell)
    B, T = 3, 4
    logits, state = net(ids_batch(B, T))
    assert tuple(logits.shape) == (B, T, V)
    assert tuple(state.shape) == (B, slots, L, H)
    assert net.config.contract.state_dims == (slots, L, H)
    assert tuple(net.zero_state(B).shape) == (B, slots, L, H)
    assert logits.dtype == tf.float32 and state.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))
    assert np.any(state.numpy() != 0)  # the state is really produced by the RNN


@pytest.mark.parametrize("cell", CELLS)
def test_step_returns_last_position_logits(cell):
    net = make(cell)
    ids = ids_batch(2, 6)
    state0 = net.zero_state(2)
    logits, state = net(ids, state0)
    last, step_state = net.step(ids, state0)
    assert tuple(last.shape) == (2, V)
    np.testing.assert_allclose(last.numpy(), logits.numpy()[:, -1, :], rtol=0, atol=1e-6)
    np.testing.assert_allclose(step_state.numpy(), state.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(last.numpy(), logits.numpy()[:, 0, :])  # not just any position


@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_across_chunks_equals_one_pass(cell):
    net = make(cell)
    ids = ids_batch(2, 12)
    full, full_state = net(ids)
    a, state_a = net(ids[:, :5], net.zero_state(2))
    b, state_b = net(ids[:, 5:], state_a)
    np.testing.assert_allclose(
        np.concatenate([a.numpy(), b.numpy()], axis=1), full.numpy(), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(state_b.numpy(), full_state.numpy(), rtol=0, atol=1e-5)
    # One character at a time through `step` (what the sampler and the server do) gives the same logits.
    state = net.zero_state(2)
    for t in range(12):
        last, state = net.step(ids[:, t : t + 1], state)
        np.testing.assert_allclose(last.numpy(), full.numpy()[:, t, :], rtol=0, atol=1e-5)
    # The state matters: restarting the second chunk from zero changes the logits.
    fresh, _ = net(ids[:, 5:], net.zero_state(2))
    assert np.abs(fresh.numpy() - b.numpy()).max() > 1e-4


def test_batch_rows_are_independent():
    net = make("lstm")
    ids = ids_batch(3, 8)
    both, _ = net(ids)
    one, _ = net(ids[1:2])
    np.testing.assert_allclose(both.numpy()[1:2], one.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_save_load_round_trip_identical_outputs(tmp_path, cell):
    net = make(cell, seed=3)
    card = {"name": "x", "metrics": {"val_loss": 1.5}}
    save_model_dir(tmp_path / "m", net, VOCAB, card=card)
    for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, CARD_FILE):
        assert (tmp_path / "m" / name).is_file()
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text()) == {
        "vocab_size": V,
        "cell": cell,
        "layers": L,
        "hidden": H,
        "embedding": E,
        "dropout": 0.0,
    }
    loaded, vocab, loaded_card = load_model_dir(tmp_path / "m")
    assert loaded.config == net.config
    assert vocab == VOCAB
    assert loaded_card == card
    ids = ids_batch(2, 9, seed=5)
    want, want_state = net(ids)
    got, got_state = loaded(ids)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(got_state.numpy(), want_state.numpy())
    # A network built with another seed differs, so the equality above is due to the weights file.
    other, _ = make(cell, seed=4)(ids)
    assert not np.allclose(other.numpy(), want.numpy())


def test_load_without_card_gives_empty_card(tmp_path, lstm_dir):
    d = tmp_path / "nocard"
    shutil.copytree(lstm_dir, d)
    (d / CARD_FILE).unlink()
    _, _, card = load_model_dir(d)
    assert card == {}


def _broken(tmp_path, lstm_dir, name="broken"):
    d = tmp_path / name
    shutil.copytree(lstm_dir, d)
    return d


def test_load_missing_dir(tmp_path):
    with pytest.raises(UserError) as info:
        load_model_dir(tmp_path / "nope")
    assert str(info.value).startswith(f"error: {tmp_path / 'nope'}: model directory not found")


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE])
def test_load_missing_file(tmp_path, lstm_dir, name):
    d = _broken(tmp_path, lstm_dir)
    (d / name).unlink()
    with pytest.raises(UserError) as info:
        load_model_dir(d)
    assert str(info.value).startswith(f"error: {d}: missing {name}")


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_load_corrupt_weights(tmp_path, lstm_dir, how):
    d = _broken(tmp_path, lstm_dir)
    w = d / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(
        {"garbage": b"\x00not an h5 file" * 100, "truncated": data[: len(data) // 2], "empty": b""}[
            how
        ]
    )
    with pytest.raises(UserError) as info:
        load_model_dir(d)
    assert str(info.value).startswith(f"error: {w}: cannot load weights")


def test_load_weights_of_another_architecture(tmp_path, lstm_dir):
    d = _broken(tmp_path, lstm_dir)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "hidden": H + 3}))
    with pytest.raises(UserError, match="cannot load weights"):
        load_model_dir(d)
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "cell": "gru"}))
    with pytest.raises(UserError, match="cannot load weights"):
        load_model_dir(d)


def test_load_vocab_size_mismatch(tmp_path, lstm_dir):
    d = _broken(tmp_path, lstm_dir)
    Vocab(list("\n abcdef")).save(d / VOCAB_FILE)  # 8 characters, the model has 7
    with pytest.raises(UserError) as info:
        load_model_dir(d)
    msg = str(info.value)
    assert msg.startswith(f"error: {d}: vocabulary mismatch")
    assert "8 characters" in msg and "the model 7" in msg


def test_load_bad_config(tmp_path, lstm_dir):
    d = _broken(tmp_path, lstm_dir)
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_model_dir(d)
    cfg = json.loads((lstm_dir / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "attention": True}))
    with pytest.raises(UserError, match=r"unknown keys \['attention'\]"):
        load_model_dir(d)
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "cell": "transformer"}))
    with pytest.raises(UserError, match="^error: cell: must be one of lstm, gru, rnn"):
        load_model_dir(d)


def test_load_config_missing_key_is_user_error(tmp_path, lstm_dir):
    d = _broken(tmp_path, lstm_dir)
    cfg = json.loads((lstm_dir / CONFIG_FILE).read_text())
    del cfg["vocab_size"]
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="^error: "):
        load_model_dir(d)


@pytest.mark.parametrize(
    "kwargs,what",
    [
        ({"cell": "lstmx"}, "cell"),
        ({"cell": "LSTM"}, "cell"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"layers": 0}, "layers"),
        ({"hidden": 0}, "hidden size"),
        ({"embedding": 0}, "embedding size"),
        ({"vocab_size": 1}, "vocabulary"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, what):
    with pytest.raises(UserError) as info:
        ModelConfig(**{"vocab_size": V, **kwargs})
    assert str(info.value).startswith(f"error: {what}: ")


def test_model_config_accepts_edges():
    assert ModelConfig(vocab_size=2, dropout=0.0).dropout == 0.0
    assert ModelConfig(vocab_size=2, dropout=0.999).dropout == 0.999
    cfg = ModelConfig(vocab_size=65)
    # sampleCharRNN
    assert (cfg.cell, cfg.layers, cfg.hidden, cfg.embedding) == (
        "lstm",
        2,
        512,
        512,
    )
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg

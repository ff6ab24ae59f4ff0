"""The char-RNN in Keras: embedding -> N x (LSTM | GRU | SimpleRNN) -> Dense(vocab), and its model directory.

Default = NVIDIA sampleCharRNN: embedding 512 -> 2 x LSTM 512 -> Dense(65). The recurrent state is explicit
(`call(ids, state)` returns the new state) so the same weights run as a trainer, a reference sampler and an
exported step function (`INPUT_IDS`, `STATE_IN` -> `LOGITS`, `STATE_OUT`; see charrnn.contract).

A model directory describes itself (char-rnn style): config.json, vocab.json, model.weights.h5, model_card.json.

Words: a *model directory* is a trained model's folder under models/ (`model_dir`: save_model_dir, load_model_dir);
the *network* is the Keras CharRNN it holds (`net`); a *served model* is a folder of model_repository/ (Triton's
meaning, charrnn.repository); a *python model* is the python backend's model.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# TensorFlow's environment, set here once, before its import (every TF user imports this module first):
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's fused ops are on by default only on some Intel CPUs; they change results in the last bits and
# print an INFO line that TF_CPP_MIN_LOG_LEVEL does not silence. Off: the same numerics on every CPU.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from charrnn.contract import CELLS, Contract, state_slots  # noqa: E402
from charrnn.errors import UserError  # noqa: E402
from charrnn.sampling import Sampler, sample_steps  # noqa: E402
from charrnn.vocab import Vocab  # noqa: E402

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "model.weights.h5"
CARD_FILE = "model_card.json"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; everything needed to rebuild the network before loading weights."""

    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 512
    embedding: int = 512
    dropout: float = 0.0  # between layers, training only
    # GRU only: Keras' default (True, cuDNN-style) applies the reset gate after the recurrent matmul; TF1's
    # GRUCell applies it before (False), so models imported by train.import_tf1 need False.
    reset_after: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.cell in CELLS, "cell", f"must be one of {', '.join(CELLS)}, got {self.cell!r}"),
            (self.layers >= 1, "layers", f"must be >= 1, got {self.layers}"),
            (self.hidden >= 1, "hidden size", f"must be >= 1, got {self.hidden}"),
            (self.embedding >= 1, "embedding size", f"must be >= 1, got {self.embedding}"),
            (0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}"),
            (self.vocab_size >= 2, "vocabulary", f"needs >= 2 characters, got {self.vocab_size}"),
        ]
        for ok, what, why in checks:
            if not ok:
                raise UserError(what, why, "fix the flag or config.json")

    @property
    def contract(self) -> Contract:
        return Contract(self.cell, self.layers, self.hidden, self.vocab_size)

    def to_json(self) -> str:
        d = asdict(self)
        # written only when not the default (False: a GRU imported from TF1)
        if d["reset_after"]:
            del d["reset_after"]
        return json.dumps(d, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise UserError(
                CONFIG_FILE,
                f"must be a JSON object, got {type(d).__name__}",
                "check the model directory",
            )
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(
                CONFIG_FILE, f"unknown keys {sorted(unknown)}", "check the model directory"
            )
        if "vocab_size" not in d:
            raise UserError(CONFIG_FILE, "missing key 'vocab_size'", "check the model directory")
        types = {
            "vocab_size": int,
            "layers": int,
            "hidden": int,
            "embedding": int,
            "cell": str,
            "dropout": (int, float),
            "reset_after": bool,
        }
        for key, value in d.items():
            if not isinstance(value, types[key]) or (types[key] is int and isinstance(value, bool)):
                raise UserError(
                    CONFIG_FILE,
                    f"{key} has the wrong type ({value!r})",
                    "check the model directory",
                )
        return cls(**d)


_RNN_LAYER = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}


class CharRNN(keras.Model):
    """Embedding -> stacked RNN -> Dense. `call` takes and returns the packed state (B, S, L, H)."""

    def __init__(self, config: ModelConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = config
        c = config
        self.embed = keras.layers.Embedding(c.vocab_size, c.embedding, name="embedding")
        self.rnns = [
            _RNN_LAYER[c.cell](
                c.hidden,
                return_sequences=True,
                return_state=True,
                name=f"{c.cell}_{i}",
                **({"reset_after": c.reset_after} if c.cell == "gru" else {}),
            )
            for i in range(c.layers)
        ]
        self.drop = keras.layers.Dropout(c.dropout)
        self.head = keras.layers.Dense(c.vocab_size, name="head")

    def zero_state(self, batch) -> tf.Tensor:
        return tf.zeros([batch, *self.config.contract.state_dims], tf.float32)

    def call(self, ids, state=None, training=False):
        """ids (B, T) int32, state (B, S, L, H) or None -> logits (B, T, V), state (B, S, L, H)."""
        if state is None:
            state = self.zero_state(tf.shape(ids)[0])
        x = self.embed(ids)  # (B, T, E)
        new_layers = []
        for layer_index, rnn in enumerate(self.rnns):
            x = self.drop(x, training=training)
            # S x (B, H)
            initial = [state[:, s, layer_index, :] for s in range(state_slots(self.config.cell))]
            x, *final = rnn(x, initial_state=initial, training=training)  # x (B, T, H)
            new_layers.append(tf.stack(final, axis=1))  # (B, S, H)
        x = self.drop(x, training=training)
        logits = self.head(x)  # (B, T, V)
        return logits, tf.stack(new_layers, axis=2)  # (B, S, L, H)

    def step(self, ids, state):
        """The exported function: logits after the LAST position only. (B, T), (B,S,L,H) -> (B, V), (B,S,L,H)."""
        logits, new_state = self(ids, state, training=False)
        return logits[:, -1, :], new_state

    def step_fn(self):
        """`step` as a charrnn.sampling step function: NumPy ids (B, T) in, NumPy logits (B, V) out, the state
        passed through (None: zeros); compiled once per network (tf.function)."""
        if "_compiled_step" not in self.__dict__:
            compiled = tf.function(self.step, reduce_retracing=True)

            def run(ids, state):
                state = self.zero_state(ids.shape[0]) if state is None else state
                logits, state = compiled(tf.constant(ids), state)
                return logits.numpy(), state

            self.__dict__["_compiled_step"] = run
        return self.__dict__["_compiled_step"]

    def generate(self, prime_ids, length: int, sampler: Sampler, on_id=None) -> list[int]:
        """Prime with prime_ids (T,), then sample `length` ids, one step per character (the reference sampler:
        every served path must give the same text for the same sampler). on_id(id) is called as each is chosen.
        """
        return sample_steps(self.step_fn(), prime_ids, length, sampler, on_id=on_id)


def use_cpu_only() -> None:
    """Hide every GPU from TensorFlow; call it where TensorFlow starts, before the first op. A visible GPU makes
    Keras emit CudnnRNNV3, which tf2onnx cannot convert, and the reference would differ per host."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialized its devices: too late to change them
        if tf.config.get_visible_devices("GPU"):
            raise


def build_net(config: ModelConfig) -> CharRNN:
    """A network of this architecture with fresh weights."""
    net = CharRNN(config)
    net(tf.zeros([1, 1], tf.int32))  # create the weights
    return net


# --- model directory ----------------------------------------------------------------------------


def save_model_dir(out: str | Path, net: CharRNN, vocab: Vocab, card: dict | None = None) -> None:
    """Write the model directory `out`: the network's config and weights, the vocabulary, the model card."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(net.config.to_json() + "\n")
    vocab.save(out / VOCAB_FILE)
    net.save_weights(str(out / WEIGHTS_FILE))
    if card is not None:
        (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def load_model_dir(path: str | Path) -> tuple[CharRNN, Vocab, dict]:
    """Rebuild the network from a model directory; returns (net, vocab, model card or {})."""
    path = Path(path)
    fix = "pass a directory written by `make train` (config.json, vocab.json, model.weights.h5)"
    if not path.is_dir():
        raise UserError(str(path), "model directory not found", fix)
    for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise UserError(str(path), f"missing {name}", fix)
    try:
        config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except ValueError as e:
        raise UserError(str(path / CONFIG_FILE), f"not valid JSON ({e})", fix) from e
    vocab = Vocab.load(path / VOCAB_FILE)
    if len(vocab) != config.vocab_size:
        raise UserError(
            str(path),
            f"vocabulary mismatch: vocab.json has {len(vocab)} characters, the model {config.vocab_size}",
            "use the vocab.json the model was trained with",
        )
    net = build_net(config)
    try:
        net.load_weights(str(path / WEIGHTS_FILE))
    except Exception as e:  # h5py/keras raise many types for a corrupt or mismatched file
        raise UserError(
            str(path / WEIGHTS_FILE), f"cannot load weights ({type(e).__name__}: {e})", fix
        ) from e
    card_path = path / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    return net, vocab, card

"""The tiny model (trained for real by the project's trainer), tiny exports of every cell, the committed
repository's configs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from charrnn.contract import Contract
from charrnn.vocab import Vocab
from tests.helpers.common import COMMITTED_REPO, CORPUS

if TYPE_CHECKING:
    import onnx

# Small but real: trained by train.train on the real corpus (a few seconds on 2 cores).
TINY_FLAGS = [
    "--hidden-size",
    "48",
    "--embedding-size",
    "16",
    "--num-layers",
    "2",
    "--dropout",
    "0",
    "--batch-size",
    "16",
    "--seq-length",
    "50",
    "--max-steps",
    "60",
    "--eval-every",
    "30",
    "--checkpoint-every",
    "30",
    "--learning-rate",
    "0.01",
    "--quiet",
]
# The `exported` fixture's GRU / SimpleRNN models, even smaller than the tiny LSTM: only their export is tested.
TINY_OTHER_CELL = [
    "--hidden-size",
    "16",
    "--embedding-size",
    "8",
    "--max-steps",
    "2",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
]


def train_tiny(out: Path, extra: list[str] | None = None) -> Path:
    from train.train import main

    rc = main(["--data", str(CORPUS), "--out", str(out), *TINY_FLAGS, *(extra or [])])
    assert rc == 0, f"tiny training failed with exit code {rc}"
    return out


def committed_text(name: str) -> str:
    """The committed model_repository/<name>/config.pbtxt."""
    from charrnn import repository

    return (COMMITTED_REPO / name / repository.CONFIG).read_text()


# --- tiny exports of every cell -------------------------------------------------------------------------
@dataclass
class Exported:
    """A model directory, its Keras network and vocab, and its ONNX export (path, proto, ORT session)."""

    cell: str
    model_dir: Path
    net: object
    vocab: Vocab
    onnx_path: Path
    proto: onnx.ModelProto
    session: object

    @property
    def contract(self) -> Contract:
        return self.net.config.contract

    @functools.cached_property
    def tf_step(self):
        """The network's step as one tf.function traced once for any (B, T): eager Keras RNNs are far too slow here."""
        import tensorflow as tf

        spec = (
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None, *self.contract.state_dims], tf.float32),
        )
        step = tf.function(lambda ids, state: self.net.step(ids, state), input_signature=spec)
        return lambda ids, state: tuple(t.numpy() for t in step(ids, state))


def export_model(model_dir: Path, onnx_path: Path) -> Exported:
    """Load a model directory and export it to ONNX at `onnx_path` (the `exported` fixture's step)."""
    from charrnn.model import load_model_dir
    from export.onnx_export import export_onnx
    from export.verify import ort_session

    net, vocab, _ = load_model_dir(model_dir)
    proto = export_onnx(net, onnx_path)
    return Exported(
        net.config.cell, model_dir, net, vocab, onnx_path, proto, ort_session(onnx_path)
    )


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in proto.graph.node))

"""Shared fixtures: the corpus, a tiny model trained for real by the project's trainer, the shipped model and
its export, free ports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from charrnn.local_triton import free_port  # noqa: F401  (re-exported: the tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
# CHARRNN_TEST_MODEL: run the suite against another model directory (e.g. a snapshot while training).
SHIPPED_MODEL = Path(os.environ.get("CHARRNN_TEST_MODEL", ROOT / "models" / "shakespeare-lstm-2x512"))
PY = sys.executable

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Small but real: trained by train.train on the real corpus (a few seconds on 2 cores).
TINY_FLAGS = ["--hidden-size", "48", "--embedding-size", "16", "--num-layers", "2", "--dropout", "0",
              "--batch-size", "16", "--seq-length", "50", "--max-steps", "60", "--eval-every", "30",
              "--checkpoint-every", "30", "--learning-rate", "0.01", "--quiet"]


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"{CORPUS} missing: run `make data` (make test does it)")
    return CORPUS


def train_tiny(out: Path, extra: list[str] | None = None) -> Path:
    from train.train import main

    rc = main(["--data", str(CORPUS), "--out", str(out), *TINY_FLAGS, *(extra or [])])
    assert rc == 0, f"tiny training failed with exit code {rc}"
    return out


@pytest.fixture(scope="session")
def tiny_model(corpus, tmp_path_factory) -> Path:
    """A 2x48 LSTM model directory trained for 60 steps (shared by the whole session: don't modify)."""
    return train_tiny(tmp_path_factory.mktemp("tiny") / "tiny-lstm")


@pytest.fixture(scope="session")
def shipped_repo(tmp_path_factory) -> Path:
    """`python -m export` of the shipped model into a fresh repository (step and generation graphs, every
    config), once per session. Read-only: a test that changes a config copies the model folder first."""
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("shipped-repo")
    assert export_main(["--model", str(SHIPPED_MODEL), "--repo", str(out)]) == 0
    return out


def tf_text(shipped, prompt: str, length: int, params) -> str:
    """The TensorFlow reference: `length` characters after `prompt` with the project's sampler."""
    from charrnn.sampling import Sampler

    model, vocab = shipped
    return vocab.decode(model.generate(vocab.encode(prompt), length, Sampler(params, len(vocab))))


def served(server, prompts, length, params, protocol="grpc") -> list[str]:
    """Texts of the client library's generate() through `server` (anything with grpc_url / http_url)."""
    from client.generate import generate
    from client.connection import Connection

    conn = Connection(server.grpc_url if protocol == "grpc" else server.http_url, protocol,
                      infer_key=server.infer_key)
    try:
        model = conn.pick_model(None)
        vocab = conn.vocabulary(model)
        seqs = generate(conn, model, vocab, prompts, length, params)
    finally:
        conn.close()
    return [vocab.decode(s.generated) for s in seqs]


@pytest.fixture(scope="session")
def shipped():
    """(model, vocab) of the shipped model, loaded in TensorFlow (the reference)."""
    from charrnn.model import load_model_dir

    model, vocab, _ = load_model_dir(SHIPPED_MODEL)
    return model, vocab

"""Shared fixtures, defined here once; the helpers the test files import are in tests/helpers/ (imported as
`tests.helpers`). This file holds only fixtures and pytest hooks.

- the corpus, a tiny model trained for real by the project's trainer, the shipped model (TensorFlow) and its
  export (`python -m export`, once per session), tiny exports of every cell;
- local Triton servers (the python backend, serve.local_triton): `server` (charrnn_python), `gen_server`
  (the non-decoupled python models), `stream_server` (the decoupled one, on a server of its own) for the
  whole session; `short_idle_server` and `restartable` per test module (the second one is killed and
  restarted by its tests, so no other module shares it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charrnn.contract import Contract
from charrnn.repository import GEN_STREAM, ONNX, ORT_MODELS, PYTHON, SHARED_PYTHON_MODELS
from charrnn.sampling import SamplingParams
from charrnn.vocab import Vocab
from tests.helpers import (
    CORPUS,
    GEN_LENGTH,
    SHIPPED_MODEL,
    SHORT_IDLE_US,
    TINY_OTHER_CELL,
    Exported,
    export_model,
    start_server,
    train_tiny,
    with_idle_timeout,
)


# --- the corpus and the tiny model ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"{CORPUS} missing: run `make data` (make test does it)")
    return CORPUS


@pytest.fixture(scope="session")
def corpus_text(corpus) -> str:
    return corpus.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def corpus_vocab(corpus_text) -> Vocab:
    """The vocabulary of the whole corpus (65 characters)."""
    return Vocab.from_text(corpus_text)


@pytest.fixture(scope="session")
def tiny_model(corpus, tmp_path_factory) -> Path:
    """A 2x48 LSTM model directory trained for 60 steps (shared by the whole session: don't modify)."""
    return train_tiny(tmp_path_factory.mktemp("tiny") / "tiny-lstm")


@pytest.fixture(scope="session")
def tiny(tiny_model):
    """(model, vocab, step function) of the tiny model, loaded in TensorFlow."""
    from charrnn.model import load_model_dir

    model, vocab, _ = load_model_dir(tiny_model)
    return model, vocab, model.step_fn()


# --- the shipped model and its export -------------------------------------------------------------------
@pytest.fixture(scope="session")
def shipped():
    """(net, vocab) of the shipped model directory, loaded in TensorFlow (the reference)."""
    from charrnn.model import load_model_dir

    net, vocab, _ = load_model_dir(SHIPPED_MODEL)
    return net, vocab


@pytest.fixture(scope="session")
def shipped_repo(tmp_path_factory) -> Path:
    """`python -m export` of the shipped model into a fresh repository (step and generation graphs, every
    config), once per session. Read-only: a test that changes a config copies the model folder first.
    """
    from export.__main__ import main as export_main

    out = tmp_path_factory.mktemp("shipped-repo")
    assert export_main(["--model-dir", str(SHIPPED_MODEL), "--repo", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def shipped_onnx(shipped_repo) -> Path:
    return shipped_repo / ONNX / "1" / "model.onnx"


@pytest.fixture(scope="session")
def shipped_proto(shipped_onnx):
    import onnx

    return onnx.load(str(shipped_onnx))


@pytest.fixture(scope="session")
def shipped_contract_vocab() -> tuple[Contract, Vocab]:
    """The shipped model's contract and vocabulary, read from its model directory (no TensorFlow needed)."""
    from charrnn.model import ModelConfig

    config = ModelConfig.from_dict(json.loads((SHIPPED_MODEL / "config.json").read_text()))
    return config.contract, Vocab.load(SHIPPED_MODEL / "vocab.json")


# --- the generation graph (server-side sampling) --------------------------------------------------------
@pytest.fixture(scope="session")
def gen_onnx(shipped_repo):
    from charrnn import repository

    return shipped_repo / repository.GEN_ONNX / "1" / "model.onnx"


@pytest.fixture(scope="session")
def gen_proto(gen_onnx):
    import onnx

    return onnx.load(str(gen_onnx))


@pytest.fixture(scope="session")
def tf_texts(shipped):
    """(prompt, params) -> the TF reference ids, computed once."""
    from charrnn.sampling import Sampler

    model, vocab = shipped
    cache = {}

    def get(prompt: str, params: SamplingParams, length: int = GEN_LENGTH) -> list[int]:
        key = (prompt, params, length)
        if key not in cache:
            cache[key] = model.generate(vocab.encode(prompt), length, Sampler(params, len(vocab)))
        return cache[key]

    return get


# --- tiny exports of every cell -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory):
    """exported(cell) -> Exported for a tiny model of that cell (trained and exported once per session)."""
    cache: dict[str, Exported] = {}
    root = tmp_path_factory.mktemp("tiny-exports")

    def get(cell: str) -> Exported:
        if cell not in cache:
            model_dir = (
                tiny_model
                if cell == "lstm"
                else train_tiny(root / f"tiny-{cell}", ["--cell", cell, *TINY_OTHER_CELL])
            )
            cache[cell] = export_model(model_dir, root / f"{cell}.onnx")
        return cache[cell]

    return get


# --- local Triton servers (python backend) ----------------------------------------------------------------
@pytest.fixture(scope="session")
def server(shipped_repo, tmp_path_factory):
    """A local server of charrnn_python alone, for the whole session (tests leave it as they found it)."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gen_server(shipped_repo, tmp_path_factory):
    """The non-decoupled python models (charrnn_python, charrnn_gen_python) on one local server."""
    s = start_server(
        shipped_repo, tmp_path_factory.mktemp("gen-serve"), models=SHARED_PYTHON_MODELS
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def stream_server(shipped_repo, tmp_path_factory):
    """The decoupled model on a server of its own (charrnn/repository.py DECOUPLED_MODELS: mixing crashes 2.51)."""
    s = start_server(
        shipped_repo, tmp_path_factory.mktemp("gen-stream-serve"), models=(GEN_STREAM,)
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ort_backend() -> Path:
    """Triton's ONNX Runtime backend, built from source as `make backend` does (nothing to do when up to date)."""
    from serve.backend import build

    return build()


@pytest.fixture(scope="session")
def ort_server(shipped_repo, ort_backend, tmp_path_factory):
    """charrnn_onnx and charrnn_gen_onnx on Triton's ONNX Runtime backend (built from source), with Triton's
    implicit state, for the whole session."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("ort-serve"), models=ORT_MODELS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short_idle_server(shipped_repo, tmp_path_factory):
    """A server whose charrnn_python frees idle sequences after 2 s (the model evicts 1 s later); one per test
    module, so evictions logged by one module's sequences never reach another's counts."""
    short = tmp_path_factory.mktemp("repo-short-idle")
    with_idle_timeout(shipped_repo, short, (PYTHON,), SHORT_IDLE_US)
    s = start_server(short, tmp_path_factory.mktemp("serve-short-idle"))
    assert f"idle eviction after {SHORT_IDLE_US / 1e6 + 1:.1f} s" in s.log_path.read_text()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def restartable(shipped_repo, tmp_path_factory):
    """A server the tests kill and restart (on the same ports): one per test module, never shared."""
    s = start_server(shipped_repo, tmp_path_factory.mktemp("serve-restart"))
    yield s
    s.stop()

"""The vocabulary of an imported model: vocab.json, text, built-in maps, or a data-only pickle (--trust-pickle)."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

from charrnn.errors import UserError
from charrnn.vocab import Vocab

# sampleCharRNN's `SampleCharRNNMaps::idToChar` (NVIDIA/TensorRT samples/sampleCharRNN/sampleCharRNN.cpp),
# identical to crazydonkey200/tensorflow-char-rnn's pretrained_shakespeare/vocab.json. It is the Tiny
# Shakespeare character set, but NOT sorted: crazydonkey numbered `set(text)` in Python 2's set order, which
# swaps neighbours (' ' is 2, '!' is 1, 'B' is 15, 'C' is 14, ...). Id i is character SAMPLECHARRNN_CHARS[i].
SAMPLECHARRNN_CHARS = "\n! $'&-,.3;:?ACBEDGFIHKJMLONQPSRUTWVYXZacbedgfihkjmlonqpsrutwvyxz"
BUILTIN_VOCABS = {"samplecharrnn": SAMPLECHARRNN_CHARS}

_PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")


def _looks_pickled(path: Path) -> bool:
    """A pickle by its suffix, or by its first byte whatever the file is called (so a renamed one is refused too)."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return True
    with path.open("rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol >= 2


def _vocab_from_obj(obj, what: str) -> Vocab:
    """chars in id order from: {"chars": [...]}, {char: id}, [chars], "chars", or (chars, {char: id})."""
    # sherjilozair (chars, vocab)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], dict):
        chars, index = list(obj[0]), obj[1]
        if any(index.get(c) != i for i, c in enumerate(chars)):
            raise UserError(what, "the (chars, vocab) pair disagrees with itself", "check the file")
        obj = chars
    if isinstance(obj, dict) and "chars" in obj:
        obj = obj["chars"]
    if isinstance(obj, dict):  # crazydonkey's vocab.json: {char: id}
        ids = sorted(obj.values()) if all(isinstance(v, int) for v in obj.values()) else None
        if ids != list(range(len(obj))):
            raise UserError(
                what, "a {char: id} vocabulary must number its characters 0..V-1", "check the file"
            )
        obj = sorted(obj, key=obj.get)
    if isinstance(obj, (bytes, bytearray)):
        obj = obj.decode("latin-1")
    if isinstance(obj, (str, list, tuple)):
        chars = [c.decode("latin-1") if isinstance(c, bytes) else c for c in obj]
        if all(isinstance(c, str) for c in chars):
            try:
                return Vocab(chars)
            except UserError as e:
                raise UserError(what, e.why, "each id needs exactly one distinct character") from e
    raise UserError(
        what,
        f"unrecognised vocabulary ({type(obj).__name__})",
        'use {"chars": [...]}, {char: id}, a list of characters or a text file',
    )


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only (str, bytes, int, tuple, list, dict, ...): every global is refused, so a
    pickle cannot import or call anything. A char-rnn vocabulary pickle needs no globals."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: only plain data (str, list, dict, ...) is loaded"
        )


def load_vocab(path: str, trust_pickle: bool) -> Vocab:
    """The vocabulary in `path` (JSON, text, or a pickle: refused unless `trust_pickle`, then data only)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(path, "vocabulary file not found", "check --vocab")
    if _looks_pickled(p):
        if not trust_pickle:
            raise UserError(
                path,
                "this is a Python pickle, and loading a pickle can run arbitrary code",
                "pass --trust-pickle only if you trust where the file came from, or convert it "
                "to a vocab.json",
            )
        try:
            with p.open("rb") as f:
                # Python 2 pickles (str chars) load too
                obj = _DataOnlyUnpickler(f, encoding="latin1").load()
        except Exception as e:
            raise UserError(
                path, f"cannot unpickle ({type(e).__name__}: {e})", "check the file"
            ) from e
        return _vocab_from_obj(obj, path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            path, f"not UTF-8 text ({e})", "pass a vocab.json or a UTF-8 text file"
        ) from e
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            return _vocab_from_obj(json.loads(text), path)
        except ValueError as e:
            if p.suffix.lower() == ".json":
                raise UserError(path, f"not valid JSON ({e})", "fix the file") from e
            # not JSON after all: a text vocabulary that starts with '{' or '['
    dupes = sorted(c for c, n in Counter(text).items() if n > 1)
    if dupes:
        raise UserError(
            path,
            f"a text vocabulary lists each character once (id = position); "
            f"{len(dupes)} repeat, e.g. {dupes[:5]}",
            "this looks like a corpus: the ids of a TF1 model are its own, pass its vocab file",
        )
    return _vocab_from_obj(text, path)


def find_vocab(source: Path) -> Path | None:
    """A vocab.json next to the checkpoint (crazydonkey writes it one level above best_model/)."""
    base = source if source.is_dir() else source.parent
    for d in (base, base.parent):
        if (d / "vocab.json").is_file():
            return d / "vocab.json"
    return None

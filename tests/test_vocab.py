"""The vocabulary (charrnn.vocab), on the real Tiny Shakespeare corpus: sorted characters, encode/decode, the
JSON file (never a pickle) and its errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from charrnn.errors import UserError
from charrnn.vocab import Vocab


def test_vocab_is_sorted_set_of_corpus_chars(corpus_text, corpus_vocab):
    assert len(corpus_vocab) == 65
    assert corpus_vocab.chars == sorted(set(corpus_text))
    # sorted by code point, as char-rnn does
    assert corpus_vocab.chars[0] == "\n" and corpus_vocab.chars[1] == " "
    assert [corpus_vocab.index[c] for c in corpus_vocab.chars] == list(range(65))


def test_encode_decode_round_trip_whole_corpus(corpus_text, corpus_vocab):
    ids = corpus_vocab.encode(corpus_text)
    assert ids.dtype == np.int32 and ids.shape == (len(corpus_text),)
    assert ids.min() == 0 and ids.max() == 64
    assert corpus_vocab.decode(ids) == corpus_text
    assert corpus_vocab.encode("ROMEO:\n").tolist() == [
        corpus_vocab.chars.index(c) for c in "ROMEO:\n"
    ]


def test_json_save_load_round_trip(tmp_path, corpus_vocab):
    path = tmp_path / "vocab.json"
    corpus_vocab.save(path)
    raw = path.read_bytes()
    assert raw.startswith(b"{")  # JSON text, not a pickle
    assert raw.decode("ascii")  # ensure_ascii: plain ASCII on disk
    assert json.loads(raw) == {"chars": corpus_vocab.chars}
    loaded = Vocab.load(path)
    assert loaded == corpus_vocab and loaded.chars == corpus_vocab.chars
    assert (
        loaded.encode("To be, or not to be").tolist()
        == corpus_vocab.encode("To be, or not to be").tolist()
    )


def test_json_round_trip_of_awkward_characters(tmp_path):
    v = Vocab(sorted(set("é\n\t\"\\'{}[] ü€")))
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").chars == v.chars
    assert Vocab.from_json(v.to_json()) == v


def test_unknown_characters_raise_user_error_naming_them(corpus_vocab):
    with pytest.raises(UserError) as info:
        corpus_vocab.encode("héllo wörld é", what="prompt")
    msg = str(info.value)
    assert msg.startswith("error: prompt: ")
    assert "2 character(s)" in msg
    assert "'é'" in msg and "'ö'" in msg
    assert msg.index("'é'") < msg.index("'ö'")  # first-seen order
    assert corpus_vocab.unknown("héllo wörld é") == ["é", "ö"]
    assert corpus_vocab.unknown("hello") == []


def test_vocab_rejects_bad_entries():
    with pytest.raises(UserError, match="^error: vocabulary: "):
        Vocab(["a", "b", "a"])
    with pytest.raises(UserError, match="^error: vocabulary: "):
        Vocab(["a", "bc"])


def test_vocab_load_bad_json_or_missing_file(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text('{"letters": ["a"]}')
    with pytest.raises(UserError, match="^error: vocabulary: not a vocab JSON"):
        Vocab.load(bad)
    bad.write_text("not json")
    with pytest.raises(UserError, match="^error: vocabulary: "):
        Vocab.load(bad)
    with pytest.raises(UserError, match="^error: .*cannot read vocabulary"):
        Vocab.load(tmp_path / "missing.json")


def test_vocab_load_refuses_a_pickle_with_user_error(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(pickle.dumps({"chars": list("abc")}))
    with pytest.raises(UserError, match="^error: "):
        Vocab.load(path)

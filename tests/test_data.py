"""Corpus handling (charrnn.data), on the real Tiny Shakespeare corpus: its checksum, reading it, the 90/5/5
split and the training batches (contiguous streams)."""

from __future__ import annotations

import numpy as np
import pytest

from charrnn.data import (
    CORPUS_CHARS,
    CORPUS_MD5,
    load_splits,
    md5_of,
    num_streams_batches,
    read_text,
    split,
    stream_batches,
    verify_corpus,
)
from charrnn.errors import UserError
from charrnn.vocab import Vocab


# --- corpus and split ------------------------------------------------------------------------------
def test_corpus_verifies(corpus, corpus_text):
    assert len(corpus_text) == CORPUS_CHARS
    assert md5_of(corpus) == CORPUS_MD5
    verify_corpus(corpus)  # no exception


def test_verify_corpus_rejects_a_modified_file(tmp_path, corpus_text):
    changed = tmp_path / "changed.txt"
    i = 1000
    assert corpus_text[i] != "X"
    # same length, one char differs
    changed.write_text(corpus_text[:i] + "X" + corpus_text[i + 1 :], encoding="utf-8")
    with pytest.raises(UserError) as info:
        verify_corpus(changed)
    msg = str(info.value)
    assert msg.startswith(f"error: {changed}: not the expected corpus")
    assert CORPUS_MD5 in msg and md5_of(changed) in msg

    short = tmp_path / "short.txt"
    short.write_text(corpus_text[:-1], encoding="utf-8")
    with pytest.raises(UserError, match="not the expected corpus"):
        verify_corpus(short)


def test_read_text_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="corpus file not found"):
        read_text(tmp_path / "nope.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc\x80")
    with pytest.raises(UserError, match="cannot read the corpus as UTF-8"):
        read_text(binary)
    with pytest.raises(UserError, match="^error: "):
        read_text(tmp_path)  # a directory


def test_split_is_contiguous_90_5_5():
    ids = np.arange(1000, dtype=np.int32)
    train, val, test = split(ids)
    assert (len(train), len(val), len(test)) == (900, 50, 50)
    assert np.array_equal(np.concatenate([train, val, test]), ids)
    assert train[-1] + 1 == val[0] and val[-1] + 1 == test[0]


def test_corpus_split_concatenates_back_to_the_whole(corpus, corpus_text, corpus_vocab):
    v, train, val, test = load_splits(corpus)
    assert v == corpus_vocab
    n = len(corpus_text)
    assert len(train) == int(n * 0.9) == 1_003_854
    assert len(val) == int(n * 0.95) - int(n * 0.9)
    assert len(train) + len(val) + len(test) == n
    assert abs(len(val) - 0.05 * n) < 2 and abs(len(test) - 0.05 * n) < 2
    assert corpus_vocab.decode(np.concatenate([train, val, test])) == corpus_text
    # the same text is always in val
    assert corpus_vocab.decode(val[:40]) == corpus_text[len(train) : len(train) + 40]


def test_load_splits_with_a_foreign_vocab_names_the_missing_chars(corpus):
    with pytest.raises(UserError) as info:
        load_splits(corpus, Vocab(list("abcdefghijklmnopqrstuvwxyz \n")))
    assert str(info.value).startswith(f"error: corpus {corpus}: ")
    assert "'A'" in str(info.value)


# --- batches -------------------------------------------------------------------------------------
def test_stream_batches_positions_exact():
    """ids = positions: every x/y entry tells which text position it came from."""
    B, T = 4, 5
    ids = np.arange(4 * 25 + 3, dtype=np.int32)  # per stream: (103 - 1) // 4 = 25 -> 5 batches
    batches = list(stream_batches(ids, B, T))
    assert len(batches) == num_streams_batches(len(ids), B, T) == 5
    per = 25
    for i, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (B, T)
        for b in range(B):
            start = b * per + i * T
            assert x[b].tolist() == list(range(start, start + T))
            assert y[b].tolist() == list(range(start + 1, start + T + 1))


def test_stream_batches_shift_and_continuity_on_the_corpus(corpus):
    vocab, train, _, _ = load_splits(corpus)
    B, T = 8, 30
    batches = []
    for k, batch in enumerate(stream_batches(train, B, T)):
        batches.append(batch)
        if k == 20:
            break
    for x, y in batches:
        assert x.shape == y.shape == (B, T)
        assert x.dtype == np.int32
        assert np.array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one inside a batch
    for (_, y0), (x1, _) in zip(batches, batches[1:]):
        # last target of batch i is the first input of i+1
        assert np.array_equal(y0[:, -1], x1[:, 0])
    # Row b of consecutive batches is one contiguous piece of the text.
    per = (len(train) - 1) // B
    rows = np.concatenate([x for x, _ in batches], axis=1)  # (B, 21 * T)
    for b in range(B):
        assert np.array_equal(rows[b], train[b * per : b * per + rows.shape[1]])
    # And the rows are different streams (not the same text repeated).
    assert vocab.decode(rows[0, :50]) != vocab.decode(rows[1, :50])


def test_stream_batches_boundary_and_too_small_corpus():
    B, T = 3, 4
    exact = np.arange(B * T + 1, dtype=np.int32)  # exactly one batch plus the last target
    batches = list(stream_batches(exact, B, T))
    assert len(batches) == 1
    with pytest.raises(UserError) as info:
        next(stream_batches(exact[:-1], B, T, what="tiny.txt"))
    msg = str(info.value)
    assert msg.startswith("error: tiny.txt: 12 characters is smaller than one batch (3 x 4 + 1)")
    with pytest.raises(UserError, match="smaller than one batch"):
        list(stream_batches(np.arange(5, dtype=np.int32), 64, 100))

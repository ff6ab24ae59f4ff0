"""Corpus (Tiny Shakespeare by default): fetch + verify, fixed 90/5/5 split, char-rnn style batches."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

from charrnn.errors import UnavailableError, UserError
from charrnn.vocab import Vocab

CORPUS_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
CORPUS_CHARS = 1_115_394
CORPUS_MD5 = "6fb458f1232090904fb40fe944165e91"
SPLIT = (0.90, 0.05, 0.05)  # train / val / test, contiguous, in this order


def md5_of(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def verify_corpus(path: str | Path, md5: str = CORPUS_MD5, chars: int = CORPUS_CHARS) -> None:
    """Raise a UserError unless `path` is exactly the expected corpus."""
    text = read_text(path)
    got_md5 = md5_of(path)
    if len(text) != chars or got_md5 != md5:
        raise UserError(
            str(path),
            f"not the expected corpus: {len(text):,} chars md5 {got_md5}, expected {chars:,} chars md5 {md5}",
            "delete it and run `make data` again",
        )


def fetch_corpus(
    dest: str | Path,
    shared: str | Path | None = None,
    url: str = CORPUS_URL,
    md5: str = CORPUS_MD5,
    chars: int = CORPUS_CHARS,
    timeout: float = 60,
) -> str:
    """Put the corpus at `dest`: copy `shared` if it exists, else download `url`; verify. Returns the source used."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    if shared is not None and Path(shared).is_file():
        shutil.copyfile(shared, tmp)
        source = str(shared)
    else:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
                promised = r.headers.get("Content-Length")
            if promised is not None and tmp.stat().st_size < int(promised):
                raise OSError(f"connection closed after {tmp.stat().st_size} of {promised} bytes")
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise UnavailableError(
                url, f"download failed ({e})", "check the network or pass --corpus FILE"
            ) from e
        source = url
    try:
        verify_corpus(tmp, md5, chars)
    except UserError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            str(source),
            "downloaded/copied file does not match the expected corpus md5 and size",
            f"expected {chars:,} chars md5 {md5}; check the source",
        ) from e
    tmp.replace(dest)
    return source


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UserError(
            str(path), "corpus file not found", "run `make data` or pass --data FILE"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            str(path), f"cannot read the corpus as UTF-8 text ({e})", "pass a UTF-8 text file"
        ) from e


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous train/val/test split (90/5/5), fixed: the same text always lands in the same split."""
    n = len(ids)
    a, b = int(n * SPLIT[0]), int(n * (SPLIT[0] + SPLIT[1]))
    return ids[:a], ids[a:b], ids[b:]


def load_splits(path: str | Path, vocab: Vocab | None = None):
    """Read a corpus -> (vocab, train, val, test) as int32 id arrays."""
    text = read_text(path)
    if vocab is None:
        vocab = Vocab.from_text(text)
    ids = vocab.encode(text, what=f"corpus {path}")
    return (vocab, *split(ids))


def num_streams_batches(n_ids: int, batch_size: int, seq_len: int) -> int:
    """How many (x, y) batches one pass over n_ids yields."""
    return ((n_ids - 1) // batch_size) // seq_len


def stream_batches(
    ids: np.ndarray, batch_size: int, seq_len: int, what: str = "corpus"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """char-rnn batching: cut ids into `batch_size` contiguous streams and walk them `seq_len` at a time.

    Row b of consecutive batches continues the same text, so the trainer carries the RNN state across
    batches. Yields x (B, T) and y (B, T) with y[:, t] == x[:, t + 1] in the text (shifted by one).
    """
    per_stream = (len(ids) - 1) // batch_size
    n = per_stream // seq_len
    if n < 1:
        raise UserError(
            what,
            f"{len(ids):,} characters is smaller than one batch ({batch_size} x {seq_len} + 1)",
            "use a larger text, or a smaller --batch-size / --seq-length",
        )
    x_all = ids[: batch_size * per_stream].reshape(batch_size, per_stream)  # (B, N)
    y_all = ids[1 : batch_size * per_stream + 1].reshape(batch_size, per_stream)
    # Row b of y_all starts one later than row b of x_all and continues contiguously within the row.
    for i in range(n):
        s = slice(i * seq_len, (i + 1) * seq_len)
        yield x_all[:, s], y_all[:, s]

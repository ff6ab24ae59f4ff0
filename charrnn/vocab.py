"""Character vocabulary: the sorted set of the corpus characters, stored as JSON (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charrnn.errors import UserError


class Vocab:
    """Maps characters to ids 0..len-1 (sorted order, as char-rnn/torch-rnn do) and back."""

    def __init__(self, chars: list[str]) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise UserError(
                "vocabulary", "entries must be distinct single characters", "rebuild it"
            )
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, in first-seen order."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def encode(self, text: str, what: str = "prompt") -> np.ndarray:
        """Text -> int32 ids (T,); unknown characters are a UserError that names them."""
        bad = self.unknown(text)
        if bad:
            shown = ", ".join(repr(c) for c in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise UserError(
                what,
                f"{len(bad)} character(s) not in the model's vocabulary: {shown}",
                "remove or replace them; the vocabulary is the model's vocab.json",
            )
        return np.fromiter((self.index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    # --- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"chars": self.chars}, ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        try:
            chars = json.loads(text)["chars"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError("vocabulary", f"not a vocab JSON object with 'chars' ({e})") from e
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise UserError(
                "vocabulary", "'chars' must be a list of one-character strings", "rebuild it"
            )
        return cls(chars)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(
                str(path), f"cannot read vocabulary ({e.strerror})", "check the path"
            ) from e
        except UnicodeDecodeError as e:
            raise UserError(
                str(path),
                "not a UTF-8 JSON vocabulary (a pickle?)",
                "use vocab.json; pickled vocabularies only via `make import --trust-pickle`",
            ) from e

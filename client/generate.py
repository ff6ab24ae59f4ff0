"""Generate text through Triton: prime each sequence with its prompt, then one request per character.

Request plan of one sequence with a prompt of m chunks (<= MAX_T characters each) and `length` new
characters: the m prompt chunks, then generated characters 1..length-1 as inputs. The first request
carries sequence_start, the last one sequence_end (so the server frees the state as soon as the last
logits are out). Every sequence has exactly one request in flight; all sequences share one connection
(one gRPC stream), so the server's sequence batcher batches them together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from charrnn.contract import MAX_T
from charrnn.errors import UnavailableError, UserError
from charrnn.sampling import Sampler, SamplingParams
from charrnn.vocab import Vocab
from client.session import Connection

RESULT_TIMEOUT_S = 60.0


class ServerError(UnavailableError):
    """The server answered a request with an error."""


@dataclass
class Sequence:
    index: int
    sequence_id: int
    chunks: list[np.ndarray]  # prompt chunks (1..MAX_T ids each)
    length: int  # characters to generate
    sampler: Sampler
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # requests sent so far
    latencies: list[float] = field(default_factory=list)  # seconds per request (send -> result)

    @property
    def total_requests(self) -> int:
        return len(self.chunks) + self.length - 1

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.length

    def next_input(self) -> np.ndarray:
        if self.sent < len(self.chunks):
            return self.chunks[self.sent]
        return np.array([self.generated[-1]], np.int32)


def chunk_prompt(ids: np.ndarray, max_t: int = MAX_T) -> list[np.ndarray]:
    return [ids[i : i + max_t] for i in range(0, len(ids), max_t)]


def new_sequence_ids(n: int) -> list[int]:
    """Random, distinct correlation ids (63-bit, never 0) so several clients can share a server."""
    base = random.SystemRandom().randrange(1, 2**62)
    return [base + i for i in range(n)]


def generate(conn: Connection, model: str, vocab: Vocab, prompts: list[str], length: int,
             params: list[SamplingParams], on_char: Callable[[int, str], None] | None = None,
             sequence_ids: list[int] | None = None, max_t: int = MAX_T) -> list[Sequence]:
    """Run len(prompts) sequences concurrently to completion; returns them (text in .generated)."""
    if length < 1:
        raise UserError("length", f"must be >= 1, got {length}")
    if not prompts or any(not p for p in prompts):
        raise UserError("prompt", "is empty", "give at least one character")
    encoded = [vocab.encode(p) for p in prompts]  # unknown characters: an error before anything is sent
    ids = sequence_ids or new_sequence_ids(len(prompts))
    seqs = [Sequence(i, ids[i], chunk_prompt(e, max_t), length, Sampler(params[i], len(vocab)))
            for i, e in enumerate(encoded)]
    by_request: dict[str, Sequence] = {}

    def send_next(seq: Sequence) -> None:
        request_id = f"{seq.sequence_id}:{seq.sent}"
        by_request[request_id] = seq
        conn.send(request_id, seq.next_input(), model, seq.sequence_id,
                  start=seq.sent == 0, end=seq.sent == seq.total_requests - 1)
        seq.sent += 1

    active = len(seqs)
    try:
        for seq in seqs:
            send_next(seq)
        while active:
            try:
                request_id, logits, error, seconds = conn.results.get(timeout=RESULT_TIMEOUT_S)
            except Exception as e:
                raise UnavailableError(f"server {conn.url}", f"no answer for {RESULT_TIMEOUT_S:.0f} s",
                                       "check the server") from e
            seq = by_request.pop(request_id, None)
            if error is not None:
                where = f"sequence {seq.sequence_id}" if seq else "a sequence"
                raise ServerError(f"{model} ({where})", _message(error), "see the server log")
            seq.latencies.append(seconds)
            if seq.sent >= len(seq.chunks):  # prompt fully sent: these logits predict the next character
                next_id = seq.sampler.next(logits)
                seq.generated.append(next_id)
                if on_char is not None:
                    on_char(seq.index, vocab.chars[next_id])
            if seq.done:
                active -= 1
            else:
                send_next(seq)
    except BaseException:
        _end_open_sequences(conn, model, seqs)
        raise
    return seqs


def _end_open_sequences(conn: Connection, model: str, seqs: list[Sequence]) -> None:
    """Best effort on errors and Ctrl-C: tell the server to free the state of unfinished sequences."""
    for seq in seqs:
        if 0 < seq.sent < seq.total_requests:
            try:
                conn.send(f"{seq.sequence_id}:end", seq.next_input() if seq.generated else seq.chunks[0],
                          model, seq.sequence_id, start=False, end=True)
            except Exception:
                pass


def _message(error) -> str:
    text = getattr(error, "message", lambda: str(error))()
    return (text or str(error)).strip()

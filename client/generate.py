"""Generate text through Triton: prime each sequence with its prompt, then one request per character.

Request plan of one sequence with a prompt of m chunks (<= MAX_T characters each) and `length` new
characters: the m prompt chunks, then generated characters 1..length-1 as inputs. The first request
carries sequence_start, the last one sequence_end (so the server frees the state as soon as the last
logits are out). Every sequence has exactly one request in flight; all sequences share one connection
(one gRPC stream), so the server's sequence batcher batches them together.

Restart-safe (with `retry=RetryPolicy(retries=N)`): the text generated so far lives here, in the client.
If the server goes away (stream error, UNAVAILABLE, connection refused, no answer) the connection is
re-created with bounded exponential backoff and every unfinished sequence is re-primed under a NEW
sequence id with prompt + generated-so-far, then continues. If the server answers that a sequence is
unknown (idle timeout, restart: "must specify the START flag" / "unknown sequence"), that sequence alone is
re-primed. Each sequence keeps its Sampler (its noise stream position), so greedy and seeded runs give
the same text as an uninterrupted run. Giving up raises GenerationFailed, which carries the partial text.
"""

from __future__ import annotations

import queue
import random
import time
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


class GenerationFailed(ServerError):
    """Generation stopped on a server problem; `sequences` holds what was generated so far (nothing lost)."""

    def __init__(self, what: str, why: str, fix: str, sequences: list["Sequence"]) -> None:
        super().__init__(what, why, fix)
        self.sequences = sequences


@dataclass(frozen=True)
class RetryPolicy:
    """Reconnect on server loss: at most `retries` attempts per outage (the count restarts once characters
    flow again), waiting delay, 2*delay, 4*delay, ... (each at most max_delay, all together at most max_wait)."""

    retries: int = 0  # 0: fail at once (the text so far is kept in the exception)
    delay: float = 0.5
    max_delay: float = 8.0
    max_wait: float = 60.0

    def validate(self) -> "RetryPolicy":
        if self.retries < 0:
            raise UserError("--retries", f"must be >= 0, got {self.retries}")
        if not self.delay > 0:
            raise UserError("--retry-delay", f"must be > 0 seconds, got {self.delay}")
        if not self.max_wait >= 0:
            raise UserError("--retry-max-wait", f"must be >= 0 seconds, got {self.max_wait}")
        if not self.max_delay > 0:
            raise UserError("max_delay", f"must be > 0 seconds, got {self.max_delay}")
        return self

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt 1, 2, ..."""
        return min(self.delay * 2 ** (attempt - 1), self.max_delay)


@dataclass
class Sequence:
    index: int
    sequence_id: int
    chunks: list[np.ndarray]  # prompt chunks (1..MAX_T ids each) of the current priming
    length: int  # characters to generate
    sampler: Sampler
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # requests sent so far (under the current sequence id)
    latencies: list[float] = field(default_factory=list)  # seconds per request (send -> result)
    prompt: np.ndarray | None = None  # the prompt's ids (re-priming sends prompt + generated)
    primed: int = 0  # characters of `generated` that were part of the current priming
    restarts: int = 0  # times re-primed under a new sequence id
    restarts_without_progress: int = 0  # re-primings since this sequence last generated a character
    sequence_ids: list[int] = field(default_factory=list)  # earlier sequence ids

    @property
    def total_requests(self) -> int:
        return len(self.chunks) + self.length - self.primed - 1

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.length

    def next_input(self) -> np.ndarray:
        if self.sent < len(self.chunks):
            return self.chunks[self.sent]
        return np.array([self.generated[-1]], np.int32)

    def reprime(self, sequence_id: int, max_t: int = MAX_T) -> None:
        """Start over under a new sequence id, primed with prompt + everything generated so far."""
        if self.prompt is None:
            raise ValueError("cannot re-prime a sequence without its prompt ids (Sequence.prompt)")
        self.sequence_ids.append(self.sequence_id)
        self.sequence_id = sequence_id
        self.chunks = chunk_prompt(np.concatenate([self.prompt, np.asarray(self.generated, np.int32)]), max_t)
        self.primed, self.sent = len(self.generated), 0
        self.restarts += 1


def chunk_prompt(ids: np.ndarray, max_t: int = MAX_T) -> list[np.ndarray]:
    return [ids[i : i + max_t] for i in range(0, len(ids), max_t)]


def new_sequence_ids(n: int) -> list[int]:
    """Random, distinct correlation ids (63-bit, never 0) so several clients can share a server."""
    base = random.SystemRandom().randrange(1, 2**62)
    return [base + i for i in range(n)]


# What an error means for the generation: the server went away (reconnect), the server does not know the
# sequence any more (re-prime it), or anything else (give up: retrying would not help).
OUTAGE, LOST, FATAL = "outage", "lost", "fatal"
_OUTAGE_STATUS = ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED")
_OUTAGE_TEXT = ("stream is no longer in valid state", "socket closed", "connection refused", "failed to connect",
                "connection reset", "broken pipe", "server is stopping", "stream removed", "no answer for",
                "channel closed")  # gRPC's ValueError once our side of the connection is closed
_LOST_TEXT = ("must specify the start flag", "unknown sequence")


def classify(error) -> str:
    text = _message(error).lower()
    if any(s in text for s in _LOST_TEXT):
        return LOST
    status = str(getattr(error, "status", lambda: None)() or "")
    if isinstance(error, (OSError, TimeoutError)) or any(s in status for s in _OUTAGE_STATUS) or \
            any(s in text for s in _OUTAGE_TEXT):
        return OUTAGE
    return FATAL


class _Outage(Exception):
    """Internal: the connection is gone (or silent); recover by reconnecting."""

    def __init__(self, error) -> None:
        super().__init__(_message(error))
        self.error = error


def generate(conn: Connection, model: str, vocab: Vocab, prompts: list[str], length: int,
             params: list[SamplingParams], on_char: Callable[[int, str], None] | None = None,
             sequence_ids: list[int] | None = None, max_t: int = MAX_T, retry: RetryPolicy | None = None,
             on_retry: Callable[[str], None] | None = None) -> list[Sequence]:
    """Run len(prompts) sequences concurrently to completion; returns them (text in .generated).

    retry: reconnect/re-prime policy (default: no retries; any server error raises GenerationFailed, which
    carries the sequences with the text so far). on_retry(message): told about every retry and recovery."""
    if length < 1:
        raise UserError("length", f"must be >= 1, got {length}")
    if not prompts or any(not p for p in prompts):
        raise UserError("prompt", "is empty", "give at least one character")
    retry = (retry or RetryPolicy()).validate()
    encoded = [vocab.encode(p) for p in prompts]  # unknown characters: an error before anything is sent
    ids = sequence_ids or new_sequence_ids(len(prompts))
    seqs = [Sequence(i, ids[i], chunk_prompt(e, max_t), length, Sampler(params[i], len(vocab)), prompt=e)
            for i, e in enumerate(encoded)]
    by_request: dict[str, Sequence] = {}
    outage = {"attempts": 0, "waited": 0.0}  # of the current outage; reset when characters flow again
    dropped = []  # set when the connection was given up: no END requests to send then
    say = on_retry or (lambda message: None)

    def kept() -> str:
        return f"{sum(len(s.generated) for s in seqs)} of {len(seqs) * length} characters kept"

    def give_up(why: str, fix: str, drop: bool = True) -> GenerationFailed:
        if drop:  # the connection is dead or hung: close it without waiting
            conn.abort()
            dropped.append(True)
        return GenerationFailed(f"server {conn.url}", f"{why}; {kept()}", fix, seqs)

    def send_next(seq: Sequence) -> None:
        request_id = f"{seq.sequence_id}:{seq.sent}"
        by_request[request_id] = seq
        try:
            conn.send(request_id, seq.next_input(), model, seq.sequence_id,
                      start=seq.sent == 0, end=seq.sent == seq.total_requests - 1)
        except Exception as e:  # e.g. a dead gRPC stream refuses new requests
            if classify(e) == FATAL:
                raise
            raise _Outage(e) from e
        seq.sent += 1

    def recover(error) -> None:
        """Reconnect with backoff and re-prime every unfinished sequence under a new id; or give up."""
        why = f"connection lost ({_brief(_message(error))})"
        while True:
            outage["attempts"] += 1
            attempt, delay = outage["attempts"], retry.backoff(outage["attempts"])
            if attempt > retry.retries:
                fix = ("restart the server, then run again with --retries N to reconnect and continue" if
                       not retry.retries else "check the server (its log); raise --retries/--retry-max-wait")
                raise give_up(why + (f", gave up after {retry.retries} retries" if retry.retries else ""), fix)
            if outage["waited"] + delay > retry.max_wait:
                raise give_up(f"{why}, gave up after waiting {outage['waited']:.1f} s (--retry-max-wait "
                              f"{retry.max_wait:g})", "check the server (its log); raise --retry-max-wait")
            say(f"warning: server {conn.url}: {why}; retry {attempt}/{retry.retries} in {delay:.1f} s ({kept()})")
            time.sleep(delay)  # backoff between reconnection attempts
            outage["waited"] += delay
            try:
                conn.reopen()
                conn.pick_model(model)
                if conn.vocabulary(model) != vocab:
                    raise give_up(f"model {model} came back with another vocabulary", "run again from the start")
                by_request.clear()
                unfinished = [s for s in seqs if not s.done]
                # The server may still hold the old sequences (a stalled stream, not a restart): end them, or
                # they would hold their slots until the idle timeout. Their answers (or "unknown sequence"
                # errors, after a restart) match no pending request and are dropped below.
                _end_open_sequences(conn, model, unfinished)
                for seq, sid in zip(unfinished, new_sequence_ids(len(unfinished))):
                    seq.reprime(sid, max_t)
                    send_next(seq)
            except GenerationFailed:
                raise
            except _Outage as e:  # went down again while re-priming: next attempt
                why = f"connection lost again ({_brief(_message(e.error))})"
                continue
            except UserError as e:  # e.g. not reachable yet, model not ready yet: next attempt
                why = f"still unavailable ({_brief(e.why)})"
                continue
            except Exception as e:  # tritonclient/gRPC errors while the server comes and goes
                if classify(e) == FATAL:
                    raise
                why = f"still unavailable ({_brief(_message(e))})"
                continue
            say(f"reconnected to {conn.url}: re-primed {len(unfinished)} sequence(s) under new ids with "
                f"prompt + generated text ({kept()})")
            return

    def reprime_lost(seq: Sequence, error) -> None:
        """The server lost this one sequence (idle timeout, restart): re-prime it alone, same connection."""
        if seq.restarts_without_progress >= retry.retries:
            raise give_up(f"sequence {seq.sequence_id} unknown to the server ({_message(error)})" +
                          (f", gave up after {retry.retries} retries" if retry.retries else ""),
                          "check the server's max_sequence_idle_microseconds and log; pass --retries N to "
                          "re-prime lost sequences", drop=False)
        seq.restarts_without_progress += 1
        old = seq.sequence_id
        seq.reprime(new_sequence_ids(1)[0], max_t)
        say(f"warning: server {conn.url}: sequence {old} unknown to the server; re-primed it as {seq.sequence_id} "
            f"with prompt + {len(seq.generated)} generated characters")
        send_next(seq)

    active = len(seqs)
    try:
        try:
            for seq in seqs:
                send_next(seq)
        except _Outage as e:
            recover(e.error)
        while active:
            try:
                try:
                    request_id, logits, error, seconds = conn.results.get(timeout=RESULT_TIMEOUT_S)
                except queue.Empty:
                    if not retry.retries:
                        raise give_up(f"no answer for {RESULT_TIMEOUT_S:.0f} s", "check the server") from None
                    raise _Outage(TimeoutError(f"no answer for {RESULT_TIMEOUT_S:.0f} s")) from None
                seq = by_request.pop(request_id, None) if request_id is not None else None
                if error is not None:
                    kind = classify(error)
                    if seq is None and request_id is not None and kind != FATAL:
                        continue  # a late answer to a request abandoned by a recovery
                    if kind == LOST and seq is not None:
                        reprime_lost(seq, error)
                        continue
                    if kind in (OUTAGE, LOST):  # LOST here: cannot tell which sequence, so re-prime them all
                        raise _Outage(error)
                    where = f"sequence {seq.sequence_id}" if seq else "a sequence"
                    raise GenerationFailed(f"{model} ({where})", _message(error), "see the server log", seqs)
                if seq is None:
                    continue  # a late answer to a request abandoned by a recovery
                seq.latencies.append(seconds)
                if seq.sent >= len(seq.chunks):  # prompt fully sent: these logits predict the next character
                    next_id = seq.sampler.next(logits)
                    seq.generated.append(next_id)
                    seq.restarts_without_progress = 0
                    outage["attempts"], outage["waited"] = 0, 0.0
                    if on_char is not None:
                        on_char(seq.index, vocab.chars[next_id])
                if seq.done:
                    active -= 1
                else:
                    send_next(seq)
            except _Outage as e:
                recover(e.error)
    except BaseException:
        if not dropped:
            _end_open_sequences(conn, model, seqs)
        raise
    return seqs


def _end_open_sequences(conn: Connection, model: str, seqs: list[Sequence]) -> None:
    """Best effort on errors, Ctrl-C and re-primes: tell the server to free unfinished sequences' state."""
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


def _brief(text: str) -> str:
    """A connection error in a few words (gRPC's are long)."""
    lower = text.lower()
    for known in ("connection refused", "socket closed", "connection reset by peer", "stream is no longer in valid state"):
        if known in lower:
            return known
    return text if len(text) <= 160 else text[:157] + "..."

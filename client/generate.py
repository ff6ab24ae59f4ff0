"""Generate text through Triton: prime each sequence with its prompt, then K characters per request.

Two kinds of served model, one request plan (charrnn.repository: the model's graph):
  - step models (chunk=None, K = 1): the server returns LOGITS for the next character and the client samples it
    (charrnn.sampling, the TensorFlow reference's sampler);
  - generation models (chunk=K): the client sends K uniform noise rows from the same seeded stream and the
    server samples K characters; a decoupled model streams them one response per character.
Row j of a sequence's noise stream picks its generated character j either way, so for the same seed (and always
with greedy) both give the reference's text.

Request plan of one sequence with a prompt of m chunks (<= MAX_T characters each) and `length` new characters:
prompt chunks 1..m-1 (their answer is discarded), prompt chunk m (-> characters 1..K), then the last character
received (the server never fed it) -> the next K, ... The first request carries sequence_start, the last one
sequence_end (so the server frees the state as soon as the last characters are out). Every sequence has one
request in flight; all sequences share one connection (one gRPC stream), so the server's sequence batcher
batches them together.

Restart-safe (with `retry=RetryPolicy(retries=N)`): the text generated so far lives here, in the client.
If the server goes away (stream error, UNAVAILABLE, connection refused, no answer) the connection is
re-created with bounded exponential backoff and every unfinished sequence is re-primed under a NEW
sequence id with prompt + generated-so-far, then continues. If the server answers that a sequence is
unknown (idle timeout, restart, or a request that reached another replica: "must specify the START flag" /
"unknown sequence"), that sequence alone is re-primed. Behind a proxy (a Connection with shards > 1) a broken
stream re-primes only the sequences of its shard, and sequence ids are "<key>:<epoch>": the routing key stays
(so the proxy keeps the sequence on one replica) and the epoch grows with every re-prime, so a replica that
comes back still holding an old state can never continue it: it does not know the new id. A request refused
by the graph's input guards (charrnn.contract GUARD_PREFIX) is re-primed the same way: this client checks every
input before sending it, so a refusal means another client's bad request shared our batch on the ONNX Runtime
backend (one bad request fails its whole batch; the state of ours did not advance). A re-primed sequence
continues from its noise stream's position len(generated), so greedy and seeded runs give the same text as an
uninterrupted run. Giving up raises GenerationFailed, which carries the partial
text.

Capacity (docs/failures.md): every START carries Triton's request timeout (charrnn.contract ADMISSION_TIMEOUT_US).
A model with no free sequence slot answers it "at capacity" within that time; the client gives up at once
(GenerationFailed, exit 3) and ends the sequences it had started. Sequence ids are drawn at random, each one
(new_sequence_ids): an id is the only identity a sequence has.
"""

from __future__ import annotations

import math
import queue
import random
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from charrnn.contract import (
    ADMISSION_TIMEOUT_US,
    CAPACITY_MESSAGE,
    GUARD_PREFIX,
    INPUT_IDS,
    LOGITS,
    MAX_K,
    MAX_T,
    NOISE,
    OUTPUT_IDS,
    TEMPERATURE,
    TOP_K,
)
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import GEN, STEP
from charrnn.sampling import Sampler, SamplingParams
from charrnn.vocab import Vocab

from .connection import Connection

RESULT_TIMEOUT_S = 60.0


class GenerationFailed(UnavailableError):
    """The server failed the generation; `sequences` holds what was generated so far (nothing lost)."""

    def __init__(self, what: str, why: str, fix: str, sequences: list["Sequence"]) -> None:
        super().__init__(what, why, fix)
        self.sequences = sequences


@dataclass(frozen=True)
class RetryPolicy:
    """Reconnect on server loss: at most `retries` attempts per outage (the count restarts once characters
    flow again), waiting delay, 2*delay, 4*delay, ... (each at most max_delay, all together at most max_wait).
    """

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
class Request:
    ids: np.ndarray  # (T,) int32
    k: int  # characters asked for (1 for a step model)
    keep: bool  # False: a prompt chunk before the last one (its answer is discarded)
    start: bool
    end: bool


@dataclass
class Sequence:
    index: int
    sequence_id: int | str
    prompt: np.ndarray  # (P,) the prompt's ids (re-priming sends prompt + generated)
    length: int  # characters to generate
    chunk: int  # K: characters per request (1: a step model, the client samples)
    sampler: Sampler
    chunks: list[np.ndarray] = field(
        default_factory=list
    )  # prompt chunks (1..MAX_T ids) of the current priming
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # requests sent so far (under the current sequence id)
    received: int = 0  # characters received for the request in flight
    primed: int = 0  # characters of `generated` that were part of the current priming
    latencies: list[float] = field(
        default_factory=list
    )  # seconds per request (send -> last character)
    first_char: list[float] = field(
        default_factory=list
    )  # seconds per request (send -> first answer)
    restarts: int = 0  # times re-primed under a new sequence id
    restarts_without_progress: int = 0  # re-primings since this sequence last generated a character
    sequence_ids: list[int | str] = field(default_factory=list)  # earlier sequence ids
    key: str | None = None  # routing key behind a proxy (then sequence_id is "<key>:<epoch>")
    epoch: int = 0
    shard: int = 0  # the gRPC stream it is sent on

    @property
    def total_requests(self) -> int:
        return len(self.chunks) - 1 + math.ceil((self.length - self.primed) / self.chunk)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.length

    def next_request(self) -> Request:
        n, m = self.sent, len(self.chunks)
        start, end = n == 0, n == self.total_requests - 1
        if n < m - 1:
            return Request(self.chunks[n], 1, False, start, end)
        ids = self.chunks[-1] if n == m - 1 else np.array([self.generated[-1]], np.int32)
        return Request(ids, min(self.chunk, self.length - len(self.generated)), True, start, end)

    def reprime(self, sequence_id: int | None = None, max_t: int = MAX_T) -> None:
        """Start over under a new sequence id (routed: the next epoch of the same key), primed with prompt +
        everything generated so far; the noise stream continues at row len(generated) (rows drawn for
        characters that never arrived are drawn again)."""
        self.sequence_ids.append(self.sequence_id)
        if self.key is not None:
            self.epoch += 1
            sequence_id = f"{self.key}:{self.epoch}"
        self.sequence_id = sequence_id
        self.chunks = chunk_prompt(
            np.concatenate([self.prompt, np.asarray(self.generated, np.int32)]), max_t
        )
        self.primed, self.sent, self.received = len(self.generated), 0, 0
        self.sampler = Sampler(self.sampler.params, self.sampler.vocab_size)
        self.sampler.noise(len(self.generated))
        self.restarts += 1


def chunk_prompt(ids: np.ndarray, max_t: int = MAX_T) -> list[np.ndarray]:
    return [ids[i : i + max_t] for i in range(0, len(ids), max_t)]


def new_sequence_ids(n: int) -> list[int]:
    """n distinct correlation ids, each drawn at random from 1..2^63 - 1 (the OS's CSPRNG). An id is the only
    identity a sequence has and gRPC inference needs no key, so ids must be unguessable: numbered ids (a random
    base + 0, 1, 2, ...) let anyone who sees one reach the others."""
    rng, ids = random.SystemRandom(), set()
    while len(ids) < n:
        ids.add(rng.randrange(1, 2**63))
    return list(ids)


def check_chunk(chunk: int | None) -> int:
    """K: None (a step model) -> 1; else it must be in 1..MAX_K."""
    if chunk is None:
        return 1
    if not 1 <= chunk <= MAX_K:
        raise UserError("--chunk", f"must be in 1..{MAX_K} (characters per request), got {chunk}")
    return chunk


def check_plan(chunk: int | None, protocol: str, params: SamplingParams) -> None:
    """What --chunk allows, checked before connecting: K in 1..MAX_K, gRPC, and no top-p (the server samples
    with temperature and top-k only)."""
    check_chunk(chunk)
    if chunk is None:
        return
    if protocol != "grpc":
        raise UserError(
            "--chunk",
            "needs gRPC (one stream for every sequence; streaming responses)",
            "use --protocol grpc and the gRPC port (8001)",
        )
    if not params.greedy and params.top_p < 1.0:
        raise UserError(
            "--top-p",
            "is not available with --chunk (the server samples with temperature and top-k only)",
            "drop --top-p, or generate per character without --chunk",
        )


def inputs_of(seq: Sequence, req: Request, generation: bool) -> dict[str, np.ndarray]:
    """The request's tensors (batch dim 1). A generation model also gets K noise rows, the temperature and
    top-k; prompt chunks before the last one and greedy sequences use no row of the noise stream."""
    ids = np.asarray(req.ids, np.int32).reshape(1, -1)  # (1, T)
    if not generation:
        return {INPUT_IDS: ids}
    p, v = seq.sampler.params, seq.sampler.vocab_size
    if not req.keep or p.greedy:
        noise, temperature = np.full((req.k, v), 0.5, np.float32), 0.0
    else:
        noise, temperature = seq.sampler.noise(req.k), p.temperature
    return {
        INPUT_IDS: ids,
        NOISE: np.ascontiguousarray(noise, np.float32)[None],  # (1, K, V)
        TEMPERATURE: np.array([[temperature]], np.float32),
        TOP_K: np.array([[0 if p.greedy else p.top_k]], np.int32),
    }


# What an error means for the generation: the server went away (reconnect), the server does not know the
# sequence any more (re-prime it), the graph refused a request batched with ours (re-prime it: see the module
# docstring), or anything else (give up: retrying would not help).
# The server at capacity (no free sequence slot within ADMISSION_TIMEOUT_US) is none of these: give up at once
# and say so (retrying at once would only add load; the user decides when to come back).
OUTAGE, LOST, REFUSED, CAPACITY, FATAL = "outage", "lost", "refused", "capacity", "fatal"
# HTTP 502/503/504: a proxy in front of the replicas (serve/haproxy.cfg) lost, or has no, replica for the request.
_OUTAGE_STATUS = ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "502", "503", "504")
_OUTAGE_TEXT = (
    "stream is no longer in valid state",
    "socket closed",
    "connection refused",
    "failed to connect",
    "connection reset",
    "broken pipe",
    "server is stopping",
    "stream removed",
    "no answer for",
    "channel closed",  # gRPC's ValueError once our side of the connection is closed
    "connection closed",  # geventhttpclient (HTTP), when a proxy closes a kept-alive connection
)
_LOST_TEXT = ("must specify the start flag", "unknown sequence")


def classify(error) -> str:
    text = message(error).lower()
    if CAPACITY_MESSAGE in text:
        return CAPACITY
    if any(s in text for s in _LOST_TEXT):
        return LOST
    if GUARD_PREFIX in text:
        return REFUSED
    status = str(getattr(error, "status", lambda: None)() or "")
    if (
        isinstance(error, (OSError, TimeoutError))
        or any(status.endswith(s) for s in _OUTAGE_STATUS)
        or any(s in text for s in _OUTAGE_TEXT)
    ):
        return OUTAGE
    return FATAL


class _Outage(Exception):
    """Internal: the connection (or one shard's stream) is gone or silent; recover by reconnecting."""

    def __init__(self, error, shard: int | None = None) -> None:
        super().__init__(message(error))
        self.error, self.shard = error, shard


def generate(
    conn: Connection,
    model: str,
    vocab: Vocab,
    prompts: list[str],
    length: int,
    params: list[SamplingParams] | SamplingParams,
    chunk: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    sequence_ids: list[int] | None = None,
    max_t: int = MAX_T,
    retry: RetryPolicy | None = None,
    on_retry: Callable[[str], None] | None = None,
) -> list[Sequence]:
    """Run len(prompts) sequences concurrently to completion; returns them (ids in .generated).

    chunk: None for a step model (one character per request, sampled here); K for a generation model.
    on_text(index, text): called as characters arrive. retry: reconnect/re-prime policy (default: no retries;
    any server error raises GenerationFailed, which carries the sequences with the text so far).
    on_retry(message): told about every retry and recovery."""
    if length < 1:
        raise UserError("length", f"must be >= 1, got {length}")
    if not prompts or any(not p for p in prompts):
        raise UserError("prompt", "is empty", "give at least one character")
    generation, k = chunk is not None, check_chunk(chunk)
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else params
    for p in params:
        check_plan(chunk, conn.protocol, p)
        p.validate(len(vocab))
    retry = (retry or RetryPolicy()).validate()
    encoded = [
        vocab.encode(p) for p in prompts
    ]  # unknown characters: an error before anything is sent
    ids = sequence_ids or new_sequence_ids(len(prompts))
    seqs = [
        Sequence(i, ids[i], e, length, k, Sampler(params[i], len(vocab)), chunk_prompt(e, max_t))
        for i, e in enumerate(encoded)
    ]
    if conn.routed:  # "<key>:<epoch>" ids; sequence s on shard hash(key) mod K
        for seq in seqs:
            seq.key = secrets.token_hex(8)
            seq.sequence_id, seq.shard = f"{seq.key}:0", zlib.crc32(seq.key.encode()) % conn.shards
    by_request: dict[str, tuple[Sequence, Request, float]] = {}
    outage = {
        "attempts": 0,
        "waited": 0.0,
    }  # of the current outage; reset when characters flow again
    unfinished = [len(seqs)]  # sequences not done yet
    dropped = []  # set when the connection was given up: no END requests to send then
    say = on_retry or (lambda text: None)

    def kept() -> str:
        return f"{sum(len(s.generated) for s in seqs)} of {len(seqs) * length} characters kept"

    def give_up(why: str, fix: str, drop: bool = True) -> GenerationFailed:
        if drop:  # the connection is dead or hung: close it without waiting
            conn.abort()
            dropped.append(True)
        return GenerationFailed(f"server {conn.url}", f"{why}; {kept()}", fix, seqs)

    def send_next(seq: Sequence) -> None:
        req = seq.next_request()
        request_id = f"{seq.sequence_id}:{seq.sent}"
        by_request[request_id] = (seq, req, time.perf_counter())
        seq.received = 0
        try:
            conn.send(
                request_id,
                model,
                inputs_of(seq, req, generation),
                seq.sequence_id,
                req.start,
                req.end,
                shard=seq.shard,
                key=seq.key,
            )
        except UserError:
            raise
        except Exception as e:  # e.g. a dead gRPC stream refuses new requests
            if classify(e) == FATAL:
                raise
            raise _Outage(e, seq.shard if conn.shards > 1 else None) from e
        seq.sent += 1

    def sequence_of(request_id, error) -> Sequence | None:
        """The sequence an answer belongs to; gRPC stream errors carry no request id, but the models' errors
        name their sequence ("sequence <id>: ...") and one sequence in flight can only be that one.
        """
        if request_id is not None:
            entry = by_request.get(request_id)
            return entry[0] if entry else None
        in_flight = {id(s): s for s, _, _ in by_request.values()}
        named = [s for s in in_flight.values() if f"sequence {s.sequence_id}" in message(error)]
        if len(named) == 1:
            return named[0]
        return next(iter(in_flight.values())) if len(in_flight) == 1 else None

    def recover(error, shard: int | None = None) -> None:
        """Reconnect with backoff and re-prime every unfinished sequence (of `shard`'s stream, if one is named)
        under a new id; or give up. The other shards' sequences carry on untouched."""
        why = (
            f"connection lost ({brief(message(error))})"
            if shard is None
            else f"stream {shard} lost ({brief(message(error))})"
        )
        refused = classify(error) == REFUSED  # not an outage: re-prime at once, no backoff
        if refused:
            why = f"a request batched with ours was refused ({brief(message(error))})"
        while True:
            outage["attempts"] += 1
            attempt = outage["attempts"]
            delay = 0.0 if refused else retry.backoff(attempt)
            if attempt > retry.retries:
                fix = (
                    "restart the server, then run again with --retries N to reconnect and continue"
                    if not retry.retries
                    else "check the server (its log); raise --retries/--retry-max-wait"
                )
                raise give_up(
                    why + (f", gave up after {retry.retries} retries" if retry.retries else ""), fix
                )
            if outage["waited"] + delay > retry.max_wait:
                raise give_up(
                    f"{why}, gave up after waiting {outage['waited']:.1f} s (--retry-max-wait "
                    f"{retry.max_wait:g})",
                    "check the server (its log); raise --retry-max-wait",
                )
            say(
                f"warning: server {conn.url}: {why}; retry {attempt}/{retry.retries} in {delay:.1f} s ({kept()})"
            )
            time.sleep(delay)  # backoff between reconnection attempts
            outage["waited"] += delay
            try:
                conn.reopen(shard)
                conn.pick_model(model, GEN if generation else STEP)
                if conn.vocabulary(model) != vocab:
                    raise give_up(
                        f"model {model} came back with another vocabulary",
                        "run again from the start",
                    )
                again = [s for s in seqs if not s.done and shard in (None, s.shard)]
                for request_id in [r for r, (s, _, _) in by_request.items() if s in again]:
                    del by_request[request_id]
                # The server may still hold the old sequences (a stalled stream, not a restart): end them, or
                # they would hold their slots until the idle timeout. Their answers (or "unknown sequence"
                # errors, after a restart) match no pending request and are dropped below.
                end_open_sequences(conn, model, again, generation)
                for seq, sid in zip(again, new_sequence_ids(len(again))):
                    seq.reprime(sid, max_t)
                    send_next(seq)
            except GenerationFailed:
                raise
            except _Outage as e:  # went down again while re-priming: next attempt
                why = f"connection lost again ({brief(message(e.error))})"
                shard = (
                    shard if e.shard == shard else None
                )  # another stream broke too: recover them all
                continue
            except UserError as e:  # e.g. not reachable yet, model not ready yet: next attempt
                why = f"still unavailable ({brief(e.why)})"
                continue
            except Exception as e:  # tritonclient/gRPC errors while the server comes and goes
                if classify(e) == FATAL:
                    raise
                why = f"still unavailable ({brief(message(e))})"
                continue
            say(
                f"reconnected to {conn.url}{'' if shard is None else f' (stream {shard})'}: re-primed {len(again)} sequence(s) under new ids with "
                f"prompt + generated text ({kept()})"
            )
            return

    def reprime_lost(seq: Sequence, error) -> None:
        """The server lost this one sequence (idle timeout, restart): re-prime it alone, same connection."""
        if seq.restarts_without_progress >= retry.retries:
            raise give_up(
                f"sequence {seq.sequence_id} unknown to the server ({message(error)})"
                + (f", gave up after {retry.retries} retries" if retry.retries else ""),
                "check the server's max_sequence_idle_microseconds and log; pass --retries N to "
                "re-prime lost sequences",
                drop=False,
            )
        seq.restarts_without_progress += 1
        old = seq.sequence_id
        for request_id in [r for r, (s, _, _) in by_request.items() if s is seq]:
            del by_request[request_id]
        seq.reprime(new_sequence_ids(1)[0], max_t)
        why = (
            "refused in a batch with another client's bad request"
            if classify(error) == REFUSED
            else "unknown to the server"
        )
        say(
            f"warning: server {conn.url}: sequence {old} {why}; re-primed it as {seq.sequence_id} "
            f"with prompt + {len(seq.generated)} generated characters"
        )
        send_next(seq)

    def on_answer(
        seq: Sequence, req: Request, sent_at: float, request_id: str, result, arrived: float
    ) -> None:
        """One result for a request in flight: the characters it carries, then the next request when complete."""
        if generation:
            got = [int(i) for i in result.as_numpy(OUTPUT_IDS).reshape(-1)]
        else:  # LOGITS (1, V): sample the next character here, unless the answer is for an early prompt chunk
            got = [seq.sampler.next(result.as_numpy(LOGITS)[0])] if req.keep else [0]
        if not seq.received:
            seq.first_char.append(arrived - sent_at)
        seq.received += len(got)
        if seq.received > req.k:
            raise GenerationFailed(
                f"{model} (sequence {seq.sequence_id})",
                f"returned {seq.received} ids for " f"a request of {req.k}",
                "see the server log",
                seqs,
            )
        if req.keep:
            seq.generated.extend(got)
            seq.restarts_without_progress = 0
            outage["attempts"], outage["waited"] = 0, 0.0
            if on_text is not None:
                on_text(seq.index, vocab.decode(got))
        if seq.received < req.k:  # a decoupled model: more characters of this request to come
            return
        del by_request[request_id]
        seq.latencies.append(arrived - sent_at)
        if seq.done:
            unfinished[0] -= 1
        else:
            send_next(seq)

    try:
        try:
            for seq in seqs:
                send_next(seq)
        except _Outage as e:
            recover(e.error, e.shard)
        while unfinished[0]:
            try:
                try:
                    answer = conn.results.get(timeout=RESULT_TIMEOUT_S)
                except queue.Empty:
                    if not retry.retries:
                        raise give_up(
                            f"no answer for {RESULT_TIMEOUT_S:.0f} s", "check the server"
                        ) from None
                    raise _Outage(TimeoutError(f"no answer for {RESULT_TIMEOUT_S:.0f} s")) from None
                if conn.stale(answer):
                    continue  # from a connection a recovery replaced: its sequences were re-primed
                request_id, result, error, arrived, shard, _ = answer
                seq = sequence_of(request_id, error)
                if error is not None:
                    kind = classify(error)
                    if kind == CAPACITY:
                        raise give_up(
                            f"at capacity: model {model} had no free sequence slot within "
                            f"{ADMISSION_TIMEOUT_US / 1e6:g} s (every slot holds a live sequence, or an "
                            "abandoned one until the idle timeout frees it)",
                            "retry later, run fewer sequences at once, or serve more replicas "
                            "(docs/failures.md, Capacity)",
                            drop=False,
                        )
                    if seq is None and request_id is not None and kind != FATAL:
                        continue  # a late answer to a request abandoned by a recovery
                    if kind in (LOST, REFUSED) and seq is not None:
                        reprime_lost(seq, error)
                        continue
                    if kind in (OUTAGE, LOST, REFUSED):
                        # LOST / REFUSED here: cannot tell which sequence, so re-prime them all
                        raise _Outage(error, shard if conn.shards > 1 else None)
                    where = f"sequence {seq.sequence_id}" if seq else "a sequence"
                    raise GenerationFailed(
                        f"{model} ({where})", message(error), "see the server log", seqs
                    )
                if seq is None:
                    continue  # a late answer to a request abandoned by a recovery
                _, req, sent_at = by_request[request_id]
                on_answer(seq, req, sent_at, request_id, result, arrived)
            except _Outage as e:
                recover(e.error, e.shard)
    except BaseException:
        if not dropped:
            end_open_sequences(conn, model, seqs, generation)
        raise
    return seqs


def end_open_sequences(
    conn: Connection, model: str, seqs: list[Sequence], generation: bool
) -> None:
    """Best effort on errors, Ctrl-C and re-primes: tell the server to free unfinished sequences' state."""
    for seq in seqs:
        if 0 < seq.sent < seq.total_requests:
            ids = np.array([seq.generated[-1]], np.int32) if seq.generated else seq.chunks[0]
            end = Request(ids, 1, False, False, True)  # uses no row of the noise stream
            try:
                conn.send(
                    f"{seq.sequence_id}:end",
                    model,
                    inputs_of(seq, end, generation),
                    seq.sequence_id,
                    start=False,
                    end=True,
                    shard=seq.shard,
                    key=seq.key,
                )
            except Exception:
                pass


def message(error) -> str:
    text = getattr(error, "message", lambda: str(error))()
    return (text or str(error)).strip()


def brief(text: str) -> str:
    """A connection error in a few words (gRPC's are long)."""
    lower = text.lower()
    for known in (
        "connection refused",
        "socket closed",
        "connection reset by peer",
        "stream is no longer in valid state",
    ):
        if known in lower:
            return known
    return text if len(text) <= 160 else text[:157] + "..."

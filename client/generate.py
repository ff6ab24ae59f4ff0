"""Generate text through Triton: prime each sequence with its prompt, then K characters per request.

Two kinds of served model, one request plan (charrnn.repository: the model's graph):
  - step models (PerCharacter, K = 1): the server returns LOGITS for the next character and the client samples
    it (charrnn.sampling, the TensorFlow reference's sampler);
  - generation models (Chunked, K = chunk): the client sends K uniform noise rows from the same seeded stream and
    the server samples K characters; a decoupled model streams them one response per character.
Row j of a sequence's noise stream picks its generated character j either way, so for the same seed (and always
with greedy) both give the reference's text.

Request plan of one sequence (Sequence.next_request) with a prompt of m chunks (<= MAX_T characters each) and
`length` new characters: prompt chunks 1..m-1 (their answer is discarded), prompt chunk m (-> characters 1..K),
then the last character received (the server never fed it) -> the next K, ... The first request carries
sequence_start, the last one sequence_end (so the server frees the state as soon as the last characters are
out). Every sequence has one request in flight; all sequences share one connection (one gRPC stream), so the
server's sequence batcher batches them together.

A Run (one complete() call) sends the requests, reads the answers and recovers. The text generated so far lives
in the client, so with `retry=RetryPolicy(retries=N)` it is restart-safe:
  - the server went away (stream error, UNAVAILABLE, connection refused, no answer): reconnect with bounded
    exponential backoff (Backoff) and re-prime every unfinished sequence under a NEW sequence id with prompt +
    generated-so-far (behind a proxy, a Connection with shards > 1, only the sequences of the broken stream);
  - the server does not know a sequence (idle timeout, restart, or a request that reached another replica:
    Triton's "must specify the START flag", or our models' error code UNKNOWN_SEQUENCE): re-prime that sequence
    alone;
  - the graph's input guards refused a request (charrnn.contract GUARD_PREFIX): this client checks every input
    before sending it, so another client's bad request shared our batch on the ONNX Runtime backend (one bad
    request fails its whole batch; the state of ours did not advance): re-prime at once, no backoff.
Behind a proxy sequence ids are "<key>:<epoch>": the routing key stays (the proxy keeps the sequence on one
replica) and the epoch grows with every re-prime, so a replica that comes back still holding an old state can
never continue it. A re-primed sequence continues from its noise stream's position len(generated), so greedy
and seeded runs give the same text as an uninterrupted run. Giving up raises GenerationFailed, which carries the
partial text.

Capacity (docs/failures.md): every START carries Triton's request timeout (charrnn.contract ADMISSION_TIMEOUT_US).
A model with no free sequence slot answers it "at capacity" within that time; the client gives up at once
(GenerationFailed, exit 3) and ends the sequences it had started. A server that restricts inference to a header
the client does not send (or sends wrong) is a caller mistake: a UserError naming the header (exit 2), no retry.
Sequence ids are drawn at random, each one (new_sequence_ids): an id is the only identity a sequence has.

Every check of a plan lives in check_plan: `python -m client` runs it on its flags before connecting, and
complete() runs it again on its arguments (with the vocabulary).
"""

from __future__ import annotations

import math
import queue
import random
import secrets
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from charrnn.contract import (
    ADMISSION_TIMEOUT_US,
    CAPACITY_MESSAGE,
    GUARD_PREFIX,
    INPUT_IDS,
    LOGITS,
    MAX_K,
    MAX_SEQUENCES,
    MAX_T,
    NOISE,
    NOT_STARTED_MESSAGE,
    OUTPUT_IDS,
    TEMPERATURE,
    TOP_K,
    ErrorCode,
    error_code,
    error_sequence,
    request_inputs,
)
from charrnn.deployment import MAIN
from charrnn.errors import UnavailableError, UserError
from charrnn.repository import GEN, STEP
from charrnn.sampling import Sampler, SamplingParams
from charrnn.vocab import Vocab

from .connection import Connection, HeaderRefused, header_refused, is_restricted

RESULT_TIMEOUT_S = 60.0


class GenerationFailed(UnavailableError):
    """The server failed the generation; `sequences` holds what was generated so far (nothing lost)."""

    def __init__(self, what: str, why: str, fix: str, sequences: list["Sequence"]) -> None:
        super().__init__(what, why, fix)
        self.sequences = sequences


# --- every check of a plan, and the retry policy ---------------------------------------------------------------
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


def check_plan(
    prompts: list[str],
    length: int,
    params: list[SamplingParams] | SamplingParams,
    chunk: int | None = None,
    protocol: str = "grpc",
    retry: RetryPolicy | None = None,
    vocab_size: int | None = None,
    sequences: int | None = None,
) -> tuple[list[SamplingParams], RetryPolicy]:
    """Every check of a generation's plan (UserError, exit 2), before anything is sent: `python -m client` runs
    it on its flags before connecting, complete() on its arguments. vocab_size None (not connected yet): all but
    top-k's upper bound. sequences: --num-sequences, copies of the one prompt (at most MAX_SEQUENCES, the
    sequence slots of one model instance). chunk: K in 1..MAX_K, over gRPC, without top-p (the server samples
    with temperature and top-k only). Returns the sampling parameters per prompt and the retry policy.
    """
    if length < 1:
        raise UserError("--length", f"must be >= 1, got {length}")
    if not prompts or any(not p for p in prompts):
        raise UserError("--prompt", "is empty", "give at least one character")
    if sequences is not None and not 1 <= sequences <= MAX_SEQUENCES:
        raise UserError(
            "--num-sequences",
            f"must be in 1..{MAX_SEQUENCES} (the sequence slots of a model "
            f"instance), got {sequences}",
            "run several clients one after another",
        )
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    for p in params:
        if vocab_size is not None:
            p.validate(vocab_size)
            continue
        replace(p, top_k=0).validate(1)  # all but top-k's upper bound
        if p.top_k < 0:
            raise UserError("top-k", f"must be >= 0, got {p.top_k}", "0 disables it")
    if chunk is not None:
        if not 1 <= chunk <= MAX_K:
            raise UserError(
                "--chunk", f"must be in 1..{MAX_K} (characters per request), got {chunk}"
            )
        if protocol != "grpc":
            raise UserError(
                "--chunk",
                "needs gRPC (one stream for every sequence; streaming responses)",
                f"use --protocol grpc and the gRPC port ({MAIN.ports.grpc})",
            )
        if any(not p.greedy and p.top_p < 1.0 for p in params):
            raise UserError(
                "--top-p",
                "is not available with --chunk (the server samples with temperature and top-k only)",
                "drop --top-p, or generate per character without --chunk",
            )
    return params, (retry or RetryPolicy()).validate()


# --- sequences, their ids and epochs -------------------------------------------------------------------------
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
    # prompt chunks (1..MAX_T ids) of the current priming
    chunks: list[np.ndarray] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # requests sent so far (under the current sequence id)
    received: int = 0  # characters received for the request in flight
    primed: int = 0  # characters of `generated` that were part of the current priming
    # seconds per request: send -> last character, and send -> first answer
    latencies: list[float] = field(default_factory=list)
    first_char: list[float] = field(default_factory=list)
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

    @property
    def open(self) -> bool:
        """Started on the server and not ended yet: the server holds its state."""
        return 0 < self.sent < self.total_requests

    def next_request(self) -> Request:
        n, m = self.sent, len(self.chunks)
        start, end = n == 0, n == self.total_requests - 1
        if n < m - 1:
            return Request(self.chunks[n], 1, False, start, end)
        ids = self.chunks[-1] if n == m - 1 else np.array([self.generated[-1]], np.int32)
        return Request(ids, min(self.chunk, self.length - len(self.generated)), True, start, end)

    def end_request(self) -> Request:
        """A request that only ends the sequence on the server (it uses no row of the noise stream)."""
        ids = np.array([self.generated[-1]], np.int32) if self.generated else self.chunks[0]
        return Request(ids, 1, False, False, True)

    def route(self, shards: int) -> None:
        """Behind a proxy: a random routing key, the id "<key>:0" and the stream hash(key) mod `shards`."""
        self.key = secrets.token_hex(8)
        self.sequence_id, self.shard = f"{self.key}:0", zlib.crc32(self.key.encode()) % shards

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


def new_sequences(
    encoded: list[np.ndarray],
    length: int,
    k: int,
    params: list[SamplingParams],
    vocab_size: int,
    max_t: int = MAX_T,
    sequence_ids: list[int] | None = None,
    shards: int | None = None,
) -> list[Sequence]:
    """One Sequence per encoded prompt, under random ids (or `sequence_ids`); routed over `shards` streams
    behind a proxy ("<key>:<epoch>" ids)."""
    ids = sequence_ids or new_sequence_ids(len(encoded))
    seqs = [
        Sequence(i, ids[i], e, length, k, Sampler(params[i], vocab_size), chunk_prompt(e, max_t))
        for i, e in enumerate(encoded)
    ]
    if shards:
        for seq in seqs:
            seq.route(shards)
    return seqs


# --- what a request carries and what its answer gives, per kind of model --------------------------------------
def request_tensors(graph: str, values: dict) -> dict[str, np.ndarray]:
    """A request's tensors: one per row of charrnn.contract's table (the graph's inputs a client sends), in the
    table's dtype, from `values` {name: value without the batch dim}; the batch dim 1 is added."""
    return {
        t.name: np.ascontiguousarray(np.asarray(values[t.name], t.dtype)[None])
        for t in request_inputs(graph)
    }


class PerCharacter:
    """Step models (K = 1): a request carries INPUT_IDS; the client samples the next character from LOGITS."""

    graph = STEP

    def values(self, seq: Sequence, req: Request) -> dict:
        """What the request sends, by tensor name, without the batch dim."""
        return {INPUT_IDS: req.ids}  # (T,)

    def inputs(self, seq: Sequence, req: Request) -> dict[str, np.ndarray]:
        """The request's tensors (batch dim 1)."""
        return request_tensors(self.graph, self.values(seq, req))

    def characters(self, seq: Sequence, req: Request, result) -> list[int]:
        """LOGITS (1, V): sample the next character here, unless the answer is for an early prompt chunk."""
        return [seq.sampler.next(result.as_numpy(LOGITS)[0])] if req.keep else [0]


class Chunked(PerCharacter):
    """Generation models (K = chunk): a request also carries K noise rows, the temperature and top-k, and the
    server samples K characters: OUTPUT_IDS (1, K), or (a decoupled model) K responses of (1, 1), streamed.
    """

    graph = GEN

    def values(self, seq: Sequence, req: Request) -> dict:
        """Prompt chunks before the last one and greedy sequences use no row of the noise stream."""
        p, v = seq.sampler.params, seq.sampler.vocab_size
        if not req.keep or p.greedy:
            noise, temperature = np.full((req.k, v), 0.5, np.float32), 0.0
        else:
            noise, temperature = seq.sampler.noise(req.k), p.temperature
        return {
            **super().values(seq, req),
            NOISE: noise,  # (K, V)
            TEMPERATURE: [temperature],  # (1,)
            TOP_K: [0 if p.greedy else p.top_k],  # (1,)
        }

    def characters(self, seq: Sequence, req: Request, result) -> list[int]:
        return [int(i) for i in result.as_numpy(OUTPUT_IDS).reshape(-1)]


# --- errors and the retry policy -------------------------------------------------------------------------------
# What an error means for the generation: the server went away (reconnect), the server does not know the
# sequence any more (re-prime it), the graph refused a request batched with ours (re-prime it: see the module
# docstring), or anything else (give up: retrying would not help).
# The server at capacity (no free sequence slot within ADMISSION_TIMEOUT_US) is none of these: give up at once
# and say so (retrying at once would only add load; the user decides when to come back).
OUTAGE, LOST, REFUSED, CAPACITY, FATAL = "outage", "lost", "refused", "capacity", "fatal"
# Neither is a server that requires a header for inference the client lacks (2.51 answers gRPC with UNAVAILABLE):
# a caller mistake, reported naming the header (client.connection.header_refused).
RESTRICTED = "restricted"
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
# Our python models' errors carry a code (charrnn.contract.ErrorCode); Triton's own texts are matched as constants.
_CODE_KINDS = {ErrorCode.UNKNOWN_SEQUENCE: LOST}


def classify(error) -> str:
    code = error_code(message(error))
    # SEQUENCE_ID_IN_USE, SEQUENCE_ID_MISSING, INVALID_INPUT: a retry would not help
    if code is not None:
        return _CODE_KINDS.get(code, FATAL)
    text = message(error).lower()
    if is_restricted(text):
        return RESTRICTED
    if CAPACITY_MESSAGE in text:
        return CAPACITY
    if NOT_STARTED_MESSAGE.lower() in text:  # Triton's sequence batcher
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


@dataclass
class Backoff:
    """The outage being recovered from under a RetryPolicy: attempts and seconds waited so far (both reset once
    characters flow again)."""

    policy: RetryPolicy
    attempts: int = 0
    waited: float = 0.0

    def reset(self) -> None:
        self.attempts, self.waited = 0, 0.0

    def next_delay(self, refused: bool) -> float:
        """Count one more attempt; the seconds to wait before it (none after a refused batch: no outage)."""
        self.attempts += 1
        return 0.0 if refused else self.policy.backoff(self.attempts)

    def spent(self, why: str, delay: float) -> tuple[str, str] | None:
        """(why, fix) to give up with when the policy allows no more attempts, or no wait of `delay`; else None."""
        p = self.policy
        if self.attempts > p.retries:
            fix = (
                "restart the server, then run again with --retries N to reconnect and continue"
                if not p.retries
                else "check the server (its log); raise --retries/--retry-max-wait"
            )
            return why + (f", gave up after {p.retries} retries" if p.retries else ""), fix
        if self.waited + delay > p.max_wait:
            return (
                f"{why}, gave up after waiting {self.waited:.1f} s (--retry-max-wait {p.max_wait:g})",
                "check the server (its log); raise --retry-max-wait",
            )
        return None

    def wait(self, delay: float) -> None:
        time.sleep(delay)  # backoff between reconnection attempts
        self.waited += delay


class _Outage(Exception):
    """Internal: the connection (or one shard's stream) is gone or silent; recover by reconnecting."""

    def __init__(self, error, shard: int | None = None) -> None:
        super().__init__(message(error))
        self.error, self.shard = error, shard


# --- one generation: the loop over answers, and recovery -------------------------------------------------------
class Run:
    """One complete() call: sends its sequences' requests on `conn`, reads the answers (PerCharacter or Chunked
    says what they carry), and recovers from outages, lost sequences and refused batches under `retry`.
    """

    def __init__(
        self,
        conn: Connection,
        model: str,
        vocab: Vocab,
        seqs: list[Sequence],
        mode: PerCharacter,
        retry: RetryPolicy,
        max_t: int = MAX_T,
        on_text: Callable[[int, str], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.conn, self.model, self.vocab, self.seqs, self.mode = conn, model, vocab, seqs, mode
        self.retry, self.max_t, self.on_text = retry, max_t, on_text
        self.say = on_retry or (lambda text: None)
        # request id -> (sequence, request, time sent)
        self.in_flight: dict[str, tuple[Sequence, Request, float]] = {}
        self.unfinished = len(seqs)  # sequences not done yet
        self.backoff = Backoff(retry)  # of the current outage; reset when characters flow again
        self.dropped = False  # the connection was given up: no END requests to send then

    def run(self) -> list[Sequence]:
        try:
            try:
                for seq in self.seqs:
                    self.send(seq)
            except _Outage as e:
                self.recover(e.error, e.shard)
            while self.unfinished:
                try:
                    self.next_answer()
                except _Outage as e:
                    self.recover(e.error, e.shard)
        except BaseException:
            if not self.dropped:
                self.end_open(self.seqs)
            raise
        return self.seqs

    # --- requests and answers
    def send(self, seq: Sequence) -> None:
        """The sequence's next request."""
        req = seq.next_request()
        request_id = f"{seq.sequence_id}:{seq.sent}"
        self.in_flight[request_id] = (seq, req, time.perf_counter())
        seq.received = 0
        try:
            self.conn.send(
                request_id,
                self.model,
                self.mode.inputs(seq, req),
                seq.sequence_id,
                req.start,
                req.end,
                shard=seq.shard,
                key=seq.key,
            )
        except UserError:
            raise
        except Exception as e:  # e.g. a dead gRPC stream refuses new requests
            kind = classify(e)
            if kind == RESTRICTED:
                raise self.refused(e) from e
            if kind == FATAL:
                raise
            raise _Outage(e, self.shard_of(seq)) from e
        seq.sent += 1

    def next_answer(self) -> None:
        """Wait for one answer and act on it."""
        try:
            answer = self.conn.results.get(timeout=RESULT_TIMEOUT_S)
        except queue.Empty:
            if not self.retry.retries:
                raise self.give_up(
                    f"no answer for {RESULT_TIMEOUT_S:.0f} s", "check the server"
                ) from None
            raise _Outage(TimeoutError(f"no answer for {RESULT_TIMEOUT_S:.0f} s")) from None
        if self.conn.stale(answer):
            return  # from a connection a recovery replaced: its sequences were re-primed
        request_id, result, error, arrived, shard, _ = answer
        seq = self.sequence_of(request_id, error)
        if error is not None:
            self.on_error(seq, request_id, error, shard)
        elif seq is not None:  # else a late answer to a request abandoned by a recovery
            self.on_result(seq, request_id, result, arrived)

    def on_result(self, seq: Sequence, request_id: str, result, arrived: float) -> None:
        """One result for a request in flight: the characters it carries, then the next request when complete."""
        _, req, sent_at = self.in_flight[request_id]
        got = self.mode.characters(seq, req, result)
        if not seq.received:
            seq.first_char.append(arrived - sent_at)
        seq.received += len(got)
        if seq.received > req.k:
            raise GenerationFailed(
                f"{self.model} (sequence {seq.sequence_id})",
                f"returned {seq.received} ids for a request of {req.k}",
                "see the server log",
                self.seqs,
            )
        if req.keep:
            seq.generated.extend(got)
            seq.restarts_without_progress = 0
            self.backoff.reset()
            if self.on_text is not None:
                self.on_text(seq.index, self.vocab.decode(got))
        if seq.received < req.k:  # a decoupled model: more characters of this request to come
            return
        del self.in_flight[request_id]
        seq.latencies.append(arrived - sent_at)
        if seq.done:
            self.unfinished -= 1
        else:
            self.send(seq)

    def on_error(self, seq: Sequence | None, request_id: str | None, error, shard: int) -> None:
        """An error answer: give up, re-prime its sequence, or recover (raise _Outage), by what it means."""
        kind = classify(error)
        if kind == RESTRICTED:
            raise self.refused(error)
        if kind == CAPACITY:
            raise self.give_up(
                f"at capacity: model {self.model} had no free sequence slot within "
                f"{ADMISSION_TIMEOUT_US / 1e6:g} s (every slot holds a live sequence, or an "
                "abandoned one until the idle timeout frees it)",
                "retry later, run fewer sequences at once, or serve more replicas "
                "(docs/failures.md, Capacity)",
                drop=False,
            )
        if seq is None and request_id is not None and kind != FATAL:
            return  # a late answer to a request abandoned by a recovery
        if kind in (LOST, REFUSED) and seq is not None:
            self.reprime_lost(seq, error)
            return
        if kind in (OUTAGE, LOST, REFUSED):
            # LOST / REFUSED here: cannot tell which sequence, so re-prime them all
            raise _Outage(error, shard if self.conn.shards > 1 else None)
        where = f"sequence {seq.sequence_id}" if seq else "a sequence"
        raise GenerationFailed(
            f"{self.model} ({where})", message(error), "see the server log", self.seqs
        )

    def sequence_of(self, request_id: str | None, error) -> Sequence | None:
        """The sequence an answer belongs to; gRPC stream errors carry no request id, but the models' errors
        name their sequence (charrnn.contract.error_sequence; Triton's own errors "sequence <id> to model"), and
        one sequence in flight can only be that one.
        """
        if request_id is not None:
            entry = self.in_flight.get(request_id)
            return entry[0] if entry else None
        in_flight = {id(s): s for s, _, _ in self.in_flight.values()}
        text = message(error)
        named_id = error_sequence(text)
        if named_id is not None:  # our models' errors (charrnn.contract.server_error)
            named = [s for s in in_flight.values() if str(s.sequence_id) == named_id]
        else:  # Triton's own: "inference request for sequence <id> to model ..."
            named = [s for s in in_flight.values() if f"sequence {s.sequence_id} " in text]
        if len(named) == 1:
            return named[0]
        return next(iter(in_flight.values())) if len(in_flight) == 1 else None

    def shard_of(self, seq: Sequence) -> int | None:
        """The stream to recover when `seq`'s request fails: its own behind a proxy, else all (None)."""
        return seq.shard if self.conn.shards > 1 else None

    def forget(self, seqs: list[Sequence]) -> None:
        """Drop the requests in flight of `seqs`: their late answers are then ignored."""
        mine = {id(s) for s in seqs}
        for request_id in [r for r, (s, _, _) in self.in_flight.items() if id(s) in mine]:
            del self.in_flight[request_id]

    def end_open(self, seqs: list[Sequence]) -> None:
        """Best effort on errors, Ctrl-C and re-primes: tell the server to free unfinished sequences' state."""
        for seq in seqs:
            if not seq.open:
                continue
            end = seq.end_request()
            try:
                self.conn.send(
                    f"{seq.sequence_id}:end",
                    self.model,
                    self.mode.inputs(seq, end),
                    seq.sequence_id,
                    start=False,
                    end=True,
                    shard=seq.shard,
                    key=seq.key,
                )
            except Exception:
                pass

    # --- recovery and giving up
    def kept(self) -> str:
        total = sum(s.length for s in self.seqs)
        return f"{sum(len(s.generated) for s in self.seqs)} of {total} characters kept"

    def give_up(self, why: str, fix: str, drop: bool = True) -> GenerationFailed:
        if drop:
            self.drop()
        return GenerationFailed(f"server {self.conn.url}", f"{why}; {self.kept()}", fix, self.seqs)

    def drop(self) -> None:
        """The connection is dead, hung or refused: close it without waiting (and send no END requests)."""
        self.conn.abort()
        self.dropped = True

    def refused(self, error) -> HeaderRefused:
        """The server requires a header for inference that the client did not send (or sent wrong): it refuses
        every request, so no retry can help; a caller mistake (exit 2) that names the header."""
        self.drop()
        return header_refused(self.conn.url, error)

    def recover(self, error, shard: int | None = None) -> None:
        """Reconnect with backoff and re-prime every unfinished sequence (of `shard`'s stream, if one is named)
        under a new id; or give up. The other shards' sequences carry on untouched."""
        where = "connection" if shard is None else f"stream {shard}"
        why = f"{where} lost ({brief(message(error))})"
        refused = classify(error) == REFUSED  # not an outage: re-prime at once, no backoff
        if refused:
            why = f"a request batched with ours was refused ({brief(message(error))})"
        while True:
            delay = self.backoff.next_delay(refused)
            spent = self.backoff.spent(why, delay)
            if spent:
                raise self.give_up(*spent)
            self.say(
                f"warning: server {self.conn.url}: {why}; retry {self.backoff.attempts}/"
                f"{self.retry.retries} in {delay:.1f} s ({self.kept()})"
            )
            self.backoff.wait(delay)
            try:
                again = self.reprime_all(shard)
            except (GenerationFailed, HeaderRefused):
                raise
            except _Outage as e:  # went down again while re-priming: next attempt
                why = f"connection lost again ({brief(message(e.error))})"
                # another stream broke too: recover them all
                shard = shard if e.shard == shard else None
                continue
            except UserError as e:  # e.g. not reachable yet, model not ready yet: next attempt
                why = f"still unavailable ({brief(e.why)})"
                continue
            except Exception as e:  # tritonclient/gRPC errors while the server comes and goes
                kind = classify(e)
                if kind == RESTRICTED:
                    raise self.refused(e) from e
                if kind == FATAL:
                    raise
                why = f"still unavailable ({brief(message(e))})"
                continue
            stream = "" if shard is None else f" (stream {shard})"
            self.say(
                f"reconnected to {self.conn.url}{stream}: re-primed {again} sequence(s) under new ids "
                f"with prompt + generated text ({self.kept()})"
            )
            return

    def reprime_all(self, shard: int | None) -> int:
        """Connect again (one shard's stream, or all) and re-prime its unfinished sequences; how many."""
        conn = self.conn
        conn.reopen(shard)
        conn.pick_model(self.model, self.mode.graph)
        if conn.vocabulary(self.model) != self.vocab:
            raise self.give_up(
                f"model {self.model} came back with another vocabulary", "run again from the start"
            )
        again = [s for s in self.seqs if not s.done and shard in (None, s.shard)]
        self.forget(again)
        # The server may still hold the old sequences (a stalled stream, not a restart): end them, or they would
        # hold their slots until the idle timeout. Their answers (or "unknown sequence" errors, after a restart)
        # match no pending request and are dropped.
        self.end_open(again)
        for seq, sid in zip(again, new_sequence_ids(len(again))):
            seq.reprime(sid, self.max_t)
            self.send(seq)
        return len(again)

    def reprime_lost(self, seq: Sequence, error) -> None:
        """The server lost this one sequence (idle timeout, restart): re-prime it alone, same connection."""
        retries = self.retry.retries
        if seq.restarts_without_progress >= retries:
            raise self.give_up(
                f"sequence {seq.sequence_id} unknown to the server ({message(error)})"
                + (f", gave up after {retries} retries" if retries else ""),
                "check the server's max_sequence_idle_microseconds and log; pass --retries N to "
                "re-prime lost sequences",
                drop=False,
            )
        seq.restarts_without_progress += 1
        old = seq.sequence_id
        self.forget([seq])
        seq.reprime(new_sequence_ids(1)[0], self.max_t)
        why = (
            "refused in a batch with another client's bad request"
            if classify(error) == REFUSED
            else "unknown to the server"
        )
        self.say(
            f"warning: server {self.conn.url}: sequence {old} {why}; re-primed it as {seq.sequence_id} "
            f"with prompt + {len(seq.generated)} generated characters"
        )
        self.send(seq)


def complete(
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
    params, retry = check_plan(prompts, length, params, chunk, conn.protocol, retry, len(vocab))
    # unknown characters: an error before anything is sent
    encoded = [vocab.encode(p) for p in prompts]
    k = 1 if chunk is None else chunk
    shards = conn.shards if conn.routed else None
    seqs = new_sequences(encoded, length, k, params, len(vocab), max_t, sequence_ids, shards)
    mode = PerCharacter() if chunk is None else Chunked()
    return Run(conn, model, vocab, seqs, mode, retry, max_t, on_text, on_retry).run()


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

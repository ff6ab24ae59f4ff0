"""Server-side generation: K characters per request (`python -m client --chunk K`), on a charrnn_gen_* model.

The server samples inside the model (export/gen_export.py), so a sequence of `length` characters takes about
length / K requests instead of `length`. The client still owns the randomness: it sends the uniforms, one
(V,) row per character to generate, drawn from the same seeded stream (charrnn.sampling.Sampler.noise) the
per-character client uses one row at a time. Row j of the stream picks generated character j in both modes,
so for the same seed (and always with --greedy) chunked and per-character generation give the same text.

Request plan of one sequence, prompt of m chunks (<= MAX_T characters each), `length` characters:
  - prompt chunks 1..m-1: INPUT_IDS = the chunk, K = 1 with a dummy noise row, the returned id is discarded
    (and was never fed: the state is the state after the chunk; no row of the noise stream is used);
  - prompt chunk m: INPUT_IDS = the chunk, K = min(chunk, length) rows -> characters 1..K;
  - then INPUT_IDS = [the last character received] (the server never fed it), K = min(chunk, remaining) rows.
The first request carries sequence_start, the last sequence_end. Greedy sends TEMPERATURE 0 (the noise is
ignored; constant rows are sent). top-p is not available server-side (top-k is).

Works with both kinds of generation model: charrnn_gen_trt / _onnx / _python answer each request with one
response of K ids; charrnn_gen_stream (decoupled) with K responses of one id each, as they are generated.
Either way `on_text(index, text)` is called as soon as characters arrive. All sequences share one gRPC
bidirectional stream (tritonclient.grpc), so the server's sequence batcher batches them.
"""

from __future__ import annotations

import math
import queue
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from charrnn.contract import INPUT_IDS, MAX_K, MAX_T, NOISE, OUTPUT_IDS, TEMPERATURE, TOP_K, VOCAB_PARAMETER
from charrnn.errors import UnavailableError, UserError
from charrnn.sampling import Sampler, SamplingParams
from charrnn.vocab import Vocab

RESULT_TIMEOUT_S = 60.0
GEN_MODEL_PREFERENCE = ("charrnn_gen_trt", "charrnn_gen_onnx", "charrnn_gen_python", "charrnn_gen_stream")


class ServerError(UnavailableError):
    """The server answered a request with an error."""


@dataclass
class Request:
    ids: np.ndarray  # (T,) int32
    k: int  # characters asked for
    keep: bool  # False: a prompt chunk before the last one (its id is discarded)
    start: bool
    end: bool


@dataclass
class ChunkedSequence:
    index: int
    sequence_id: int
    chunks: list[np.ndarray]  # prompt chunks (1..MAX_T ids each)
    length: int
    chunk: int  # K: characters per request
    sampler: Sampler
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # requests sent
    pending: list[int] = field(default_factory=list)  # ids received for the request in flight
    latencies: list[float] = field(default_factory=list)  # seconds per request (send -> last character)
    first_char: list[float] = field(default_factory=list)  # seconds per request (send -> first character)

    @property
    def total_requests(self) -> int:
        return len(self.chunks) - 1 + math.ceil(self.length / self.chunk)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.length

    def next_request(self) -> Request:
        n = self.sent
        start, end = n == 0, n == self.total_requests - 1
        if n < len(self.chunks) - 1:
            return Request(self.chunks[n], 1, False, start, end)
        k = min(self.chunk, self.length - len(self.generated))
        ids = self.chunks[-1] if n == len(self.chunks) - 1 else np.array([self.generated[-1]], np.int32)
        return Request(ids, k, True, start, end)


def chunk_prompt(ids: np.ndarray, max_t: int = MAX_T) -> list[np.ndarray]:
    return [ids[i : i + max_t] for i in range(0, len(ids), max_t)]


def new_sequence_ids(n: int) -> list[int]:
    """Random, distinct correlation ids (63-bit, never 0) so several clients can share a server."""
    base = random.SystemRandom().randrange(1, 2**62)
    return [base + i for i in range(n)]


def check_chunk(chunk: int) -> int:
    if not 1 <= chunk <= MAX_K:
        raise UserError("--chunk", f"must be in 1..{MAX_K} (characters per request), got {chunk}")
    return chunk


def check_params(params: SamplingParams, vocab_size: int) -> SamplingParams:
    params.validate(vocab_size)
    if not params.greedy and params.top_p < 1.0:
        raise UserError("--top-p", "is not available with --chunk (the server samples with temperature and "
                        "top-k only)", "drop --top-p, or generate per character without --chunk")
    return params


class GenStream:
    """One tritonclient.grpc client and bidirectional stream for generation requests.

    Results arrive on `results`: (request_id or None, ids (n,) or None, error or None, arrival time).
    """

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc, self.url = grpcclient, url
        self.results: queue.Queue = queue.Queue()
        try:
            self.client = grpcclient.InferenceServerClient(url)
            live = self.client.is_server_live()
        except Exception as e:  # InferenceServerException, gRPC errors
            raise UnavailableError(f"server {url}", f"unreachable over grpc ({_short(e)})",
                                   "start it with `make serve`, or pass --url") from e
        if not live:
            raise UnavailableError(f"server {url}", "not live", "check the server log")
        self._streaming = False

    def config(self, model: str) -> dict:
        config = self.client.get_model_config(model, as_json=True)
        return config.get("config", config)

    def pick_model(self, requested: str | None) -> str:
        return pick_gen_model(self.client, requested, self.url)

    def vocabulary(self, model: str) -> Vocab:
        try:
            return Vocab.from_json(self.config(model)["parameters"][VOCAB_PARAMETER]["string_value"])
        except KeyError as e:
            raise UnavailableError(f"model {model}", f"its config has no {VOCAB_PARAMETER} parameter",
                                   "export it with `make export`") from e

    def _callback(self, result, error) -> None:
        now = time.perf_counter()
        if error is not None:
            self.results.put((None, None, error, now))
        else:
            self.results.put((result.get_response().id, result.as_numpy(OUTPUT_IDS).reshape(-1), None, now))

    def send(self, model: str, request_id: str, ids: np.ndarray, noise: np.ndarray, temperature: float,
             top_k: int, sequence_id: int, start: bool, end: bool) -> None:
        if not self._streaming:
            self.client.start_stream(callback=self._callback)
            self._streaming = True
        tensors = ((INPUT_IDS, np.asarray(ids, np.int32).reshape(1, -1), "INT32"),
                   (NOISE, np.ascontiguousarray(noise, np.float32)[None], "FP32"),
                   (TEMPERATURE, np.array([[temperature]], np.float32), "FP32"),
                   (TOP_K, np.array([[top_k]], np.int32), "INT32"))
        inputs = []
        for name, value, dtype in tensors:
            inp = self.grpc.InferInput(name, list(value.shape), dtype)
            inp.set_data_from_numpy(value)
            inputs.append(inp)
        self.client.async_stream_infer(model, inputs, request_id=request_id, sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end)

    def close(self) -> None:
        try:
            if self._streaming:
                self.client.stop_stream()
                self._streaming = False
            self.client.close()
        except Exception:
            pass


def pick_gen_model(client, requested: str | None, url: str = "the server") -> str:
    """The requested model if ready (it must be a generation model), else the first ready of the gen models.

    client: a tritonclient.grpc.InferenceServerClient (GenStream.client, or client.session.Connection.client).
    """
    for name in [requested] if requested else list(GEN_MODEL_PREFERENCE):
        try:
            ready = client.is_model_ready(name)
        except Exception:  # a model that does not exist answers with an error
            continue
        if ready:
            config = client.get_model_config(name, as_json=True)
            inputs = {i["name"] for i in config.get("config", config).get("input", [])}
            if NOISE not in inputs:
                raise UserError("--model", f"{name} is not a server-side generation model (no {NOISE} input)",
                                "use --chunk with charrnn_gen_* models, or drop --chunk")
            return name
    what = f"model {requested}" if requested else "models " + ", ".join(GEN_MODEL_PREFERENCE)
    raise UnavailableError(what, f"not ready on {url}", "check `make serve` / the server log, or --model")


def _url_of(conn) -> str:
    """conn: a client.session.Connection (its gRPC address) or a host:port string."""
    if isinstance(conn, str):
        return conn.split("://")[-1]
    if getattr(conn, "protocol", "grpc") != "grpc":
        raise UserError("--chunk", "needs gRPC (one stream for every sequence; streaming responses)",
                        "use --protocol grpc and the gRPC port (8001)")
    return conn.url


def generate_chunked(conn, model: str, vocab: Vocab, prompts: list[str], length: int,
                     params: list[SamplingParams] | SamplingParams, chunk: int,
                     on_text: Callable[[int, str], None] | None = None, sequence_ids: list[int] | None = None,
                     max_t: int = MAX_T, stream: GenStream | None = None) -> list[ChunkedSequence]:
    """Run len(prompts) sequences concurrently, `chunk` characters per request; returns them (.generated)."""
    if length < 1:
        raise UserError("length", f"must be >= 1, got {length}")
    if not prompts or any(not p for p in prompts):
        raise UserError("prompt", "is empty", "give at least one character")
    check_chunk(chunk)
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    params = [check_params(p, len(vocab)) for p in params]
    encoded = [vocab.encode(p) for p in prompts]  # unknown characters: an error before anything is sent
    ids = sequence_ids or new_sequence_ids(len(prompts))
    seqs = [ChunkedSequence(i, ids[i], chunk_prompt(e, max_t), length, chunk, Sampler(params[i], len(vocab)))
            for i, e in enumerate(encoded)]
    own_stream = stream is None
    stream = stream or GenStream(_url_of(conn))
    by_request: dict[str, tuple[ChunkedSequence, Request, float]] = {}
    dummy = np.full((1, len(vocab)), 0.5, np.float32)

    def send_next(seq: ChunkedSequence) -> None:
        req = seq.next_request()
        p = seq.sampler.params
        if not req.keep or p.greedy:  # no row of the noise stream is used
            noise, temperature = np.repeat(dummy, req.k, axis=0), 0.0
        else:
            noise, temperature = seq.sampler.noise(req.k), p.temperature
        request_id = f"{seq.sequence_id}:{seq.sent}"
        by_request[request_id] = (seq, req, time.perf_counter())
        seq.pending = []
        stream.send(model, request_id, req.ids, noise, temperature, 0 if p.greedy else p.top_k, seq.sequence_id,
                    req.start, req.end)
        seq.sent += 1

    active = len(seqs)
    try:
        for seq in seqs:
            send_next(seq)
        while active:
            try:
                request_id, got, error, arrived = stream.results.get(timeout=RESULT_TIMEOUT_S)
            except queue.Empty as e:
                raise UnavailableError(f"server {stream.url}", f"no answer for {RESULT_TIMEOUT_S:.0f} s",
                                       "check the server") from e
            if error is not None:
                seq = _sequence_of(error, by_request, request_id)
                where = f"sequence {seq.sequence_id}" if seq else "a sequence"
                raise ServerError(f"{model} ({where})", _message(error), "see the server log")
            seq, req, sent_at = by_request[request_id]
            if not seq.pending:
                seq.first_char.append(arrived - sent_at)
            seq.pending.extend(int(i) for i in got)
            if len(seq.pending) > req.k:
                raise ServerError(f"{model} (sequence {seq.sequence_id})",
                                  f"returned {len(seq.pending)} ids for a request of {req.k}", "see the server log")
            if req.keep:
                new = seq.pending[len(seq.pending) - len(got):]
                seq.generated.extend(new)
                if on_text is not None and new:
                    on_text(seq.index, vocab.decode(new))
            if len(seq.pending) < req.k:  # a streaming model: more characters of this request to come
                continue
            del by_request[request_id]
            seq.latencies.append(arrived - sent_at)
            if seq.done:
                active -= 1
            else:
                send_next(seq)
    except BaseException:
        _end_open_sequences(stream, model, seqs, dummy)
        raise
    finally:
        if own_stream:
            stream.close()
    return seqs


def _end_open_sequences(stream: GenStream, model: str, seqs: list[ChunkedSequence], dummy: np.ndarray) -> None:
    """Best effort on errors and Ctrl-C: tell the server to free the state of unfinished sequences."""
    for seq in seqs:
        if 0 < seq.sent < seq.total_requests:
            try:
                ids = np.array([seq.generated[-1]], np.int32) if seq.generated else seq.chunks[0]
                stream.send(model, f"{seq.sequence_id}:end", ids, dummy, 0.0, 0, seq.sequence_id, False, True)
            except Exception:
                pass


def _sequence_of(error, by_request: dict, request_id) -> ChunkedSequence | None:
    """gRPC stream errors carry no request id: model errors name their sequence ("sequence <id>: ...")."""
    if request_id in by_request:
        return by_request[request_id][0]
    text = str(error)
    matches = {id(s): s for s, _, _ in by_request.values() if f"sequence {s.sequence_id}" in text}
    if len(matches) == 1:
        return next(iter(matches.values()))
    seqs = {id(s): s for s, _, _ in by_request.values()}
    return next(iter(seqs.values())) if len(seqs) == 1 else None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def _message(error) -> str:
    text = getattr(error, "message", lambda: str(error))()
    return (text or str(error)).strip()

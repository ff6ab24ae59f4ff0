"""Next-character sampling shared by the TF reference sampler, the client and the benchmarks.

Sampling is Gumbel-max: id = argmax(logits / temperature + g) with g = -log(-log(u)) and u ~ U(0, 1)
drawn from a seeded NumPy stream, one (V,) vector per character. This is exact sampling from
softmax(logits / temperature) (restricted by top-k / top-p), and because the noise is explicit the
same stream can be fed to a model that samples inside its graph (TensorRT has no Multinomial), which
then produces the same text as sampling here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from charrnn.contract import MIN_TEMPERATURE
from charrnn.errors import UserError

_TINY = np.finfo(np.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # >= MIN_TEMPERATURE (1e-3); lower is more conservative
    top_k: int = 0  # keep the k most likely characters (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (1: all)
    greedy: bool = False  # argmax; ignores temperature / top-k / top-p / seed
    seed: int | None = None  # None: a fresh random seed

    def validate(self, vocab_size: int) -> "SamplingParams":
        """Raise a UserError naming the bad parameter; return self."""
        if not self.greedy and not (
            np.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE
        ):
            raise UserError(
                "temperature",
                f"must be >= {MIN_TEMPERATURE} (smaller values overflow "
                f"logits / temperature), got {self.temperature}",
                "use --greedy for argmax decoding",
            )
        if not 0 <= self.top_k <= vocab_size:
            raise UserError(
                "top-k",
                f"must be in 1..{vocab_size} (the vocabulary size), got {self.top_k}",
                "or 0 to disable",
            )
        if not 0 < self.top_p <= 1:
            raise UserError("top-p", f"must be in (0, 1], got {self.top_p}", "1 disables it")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError("seed", f"must be in 0..2^63-1, got {self.seed}")
        return self


def add_sampling_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The sampling flags, one spelling for the reference sampler and the Triton client; returns the group."""
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default="ROMEO:\n", help="text to prime the model with")
    g.add_argument("--length", type=int, default=500, help="characters to generate")
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help=f">= {MIN_TEMPERATURE}; lower is more conservative (--greedy for argmax)",
    )
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus: smallest set reaching p (1: all)"
    )
    g.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    return g


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags of add_sampling_flags (not yet validated: that needs the vocabulary size)."""
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
    )


def noise_stream(seed: int | None) -> np.random.Generator:
    """The uniform noise source for one sequence (PCG64: same seed, same stream everywhere)."""
    return np.random.Generator(np.random.PCG64(seed))


def uniform_noise(rng: np.random.Generator, steps: int, vocab_size: int) -> np.ndarray:
    """(steps, V) float32 uniforms in (0, 1): the noise for the next `steps` characters."""
    return np.maximum(rng.random((steps, vocab_size), dtype=np.float32), _TINY)


def filter_logits(
    logits: np.ndarray, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0
) -> np.ndarray:
    """Scale by temperature and set logits outside top-k / nucleus top-p to -inf. (..., V) -> (..., V)."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    if top_k and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[..., -top_k, None]  # (..., 1)
        z = np.where(z < kth, -np.inf, z)
    if top_p < 1.0:
        order = np.argsort(-z, axis=-1)  # most likely first
        zs = np.take_along_axis(z, order, axis=-1)
        p = np.exp(zs - zs[..., :1])
        p /= p.sum(axis=-1, keepdims=True)
        before = np.cumsum(p, axis=-1) - p  # probability mass strictly before each entry
        drop_sorted = before >= np.float32(top_p)  # never drops the first entry
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        z = np.where(drop, -np.inf, z)
    return z


def gumbel(noise: np.ndarray) -> np.ndarray:
    """Gumbel(0, 1) noise from uniforms in (0, 1): -log(-log(u)), float32."""
    return -np.log(-np.log(noise.astype(np.float32, copy=False)))


def choose(logits: np.ndarray, params: SamplingParams, noise: np.ndarray | None) -> np.ndarray:
    """Pick ids from logits (..., V) with Gumbel noise from uniforms `noise` (..., V). Returns int32 (...)."""
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int32)
    return _choose_gumbel(logits, params, gumbel(noise))


def _choose_gumbel(logits: np.ndarray, params: SamplingParams, g: np.ndarray) -> np.ndarray:
    if params.top_k == 0 and params.top_p >= 1.0:  # the common case: no filtering, no sort
        z = np.asarray(logits, dtype=np.float32) / np.float32(params.temperature)
    else:
        z = filter_logits(logits, params.top_k, params.top_p, params.temperature)
    return np.argmax(z + g, axis=-1).astype(np.int32)


class Sampler:
    """One sequence's sampler: holds its parameters and noise stream. `next(logits (V,)) -> id`.

    Uniforms are drawn from the stream in blocks (drawing k rows at once gives the same numbers as k
    single rows) and turned into Gumbel noise once per block: per character only an add and an argmax.
    """

    BLOCK = 64

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params.validate(vocab_size)
        self.vocab_size = vocab_size
        self.rng = noise_stream(params.seed)
        self._uniform = np.empty((0, vocab_size), np.float32)  # drawn, not yet used
        self._gumbel = self._uniform

    def noise(self, steps: int) -> np.ndarray:
        """Take the next (steps, V) uniforms from this sequence's stream."""
        if steps > len(self._uniform):
            fresh = uniform_noise(
                self.rng, max(steps - len(self._uniform), self.BLOCK), self.vocab_size
            )
            self._uniform = np.concatenate([self._uniform, fresh])
            self._gumbel = gumbel(self._uniform)
        taken = self._uniform[:steps]
        self._uniform, self._gumbel = self._uniform[steps:], self._gumbel[steps:]
        return taken

    def next(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits).reshape(-1)
        if self.params.greedy:
            return int(np.argmax(logits))
        if not len(self._gumbel):
            fresh = uniform_noise(self.rng, self.BLOCK, self.vocab_size)
            self._uniform, self._gumbel = fresh, gumbel(fresh)
        g = self._gumbel[0]
        self._uniform, self._gumbel = self._uniform[1:], self._gumbel[1:]
        return int(_choose_gumbel(logits, self.params, g))


def sample_steps(
    step, prime_ids: np.ndarray, length: int, sampler: Sampler, state=None, on_id=None
) -> list[int]:
    """Prime with `prime_ids` then generate `length` ids, one `step` call per character.

    step(ids (1, T) int32, state) -> (logits (1, V), state); state None means a fresh sequence.
    on_id(id) is called as each id is chosen (for streaming output).
    """
    if length < 1:
        raise UserError("length", f"must be >= 1, got {length}")
    if len(prime_ids) < 1:
        raise UserError("prompt", "is empty", "give at least one character")
    logits, state = step(np.asarray(prime_ids, np.int32)[None, :], state)
    out: list[int] = []
    for _ in range(length):
        next_id = sampler.next(np.asarray(logits)[0])
        out.append(next_id)
        if on_id is not None:
            on_id(next_id)
        if len(out) < length:
            logits, state = step(np.array([[next_id]], np.int32), state)
    return out

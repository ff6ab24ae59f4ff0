"""Server-side generation for python-backend models (charrnn_gen_python, charrnn_gen_stream): NumPy only.

Both models run the generation ONNX graph (export/gen_export.py, contract in charrnn.contract) with ONNX
Runtime and keep each sequence's state in serve.runtime.sequence_state.SequenceStates. This module holds what they
share, free of Triton's pb_utils so it can be tested directly:

  - `check_gen_request`: one request's INPUT_IDS / NOISE / TEMPERATURE / TOP_K, or the error message;
  - `GenRequest` + `group_by_shape`: requests with equal (T, K) run as ONE batched graph call;
  - `GenRunner.run(group)`: all K characters in one call (charrnn_gen_python);
  - `GenRunner.steps(group)`: the same ids one character at a time (the graph with K = 1, repeatedly),
    yielding after each so a decoupled model can send it at once (charrnn_gen_stream).
Both give the same ids and the same final state (id_K is not fed: the next request sends it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from charrnn.contract import (
    INPUT_IDS,
    MAX_K,
    MAX_T,
    MIN_TEMPERATURE,
    NOISE,
    OUTPUT_IDS,
    STATE_IN,
    STATE_OUT,
    TEMPERATURE,
    TOP_K,
)

from .sequence_state import SequenceStates, check_ids


def check_gen_request(
    ids, noise, temperature, top_k, vocab_size: int, max_t: int = MAX_T, max_k: int = MAX_K
) -> str | None:
    """None if the four request tensors are valid (batch dim 1), else the error message."""
    for name, value in (
        (INPUT_IDS, ids),
        (NOISE, noise),
        (TEMPERATURE, temperature),
        (TOP_K, top_k),
    ):
        if value is None:
            return f"{name}: missing"
    error = check_ids(ids, vocab_size, max_t)
    if error:
        return error
    if noise.dtype != np.float32:
        return f"{NOISE}: dtype must be FP32, got {noise.dtype}"
    if (
        noise.ndim != 3
        or noise.shape[0] != 1
        or not 1 <= noise.shape[1] <= max_k
        or noise.shape[2] != vocab_size
    ):
        return (
            f"{NOISE}: shape must be [1, K, {vocab_size}] with 1 <= K <= {max_k}, got {list(noise.shape)} "
            "(one row of uniforms per character to generate)"
        )
    if not ((noise > 0).all() and (noise < 1).all()):  # also rejects NaN
        return f"{NOISE}: values must be uniforms in the open interval (0, 1)"
    if temperature.dtype != np.float32 or temperature.shape != (1, 1):
        return (
            f"{TEMPERATURE}: must be FP32 [1, 1], got {temperature.dtype} {list(temperature.shape)}"
        )
    t = float(temperature[0, 0])
    if not (np.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)):
        return f"{TEMPERATURE}: must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller values overflow), got {t}"
    if top_k.dtype != np.int32 or top_k.shape != (1, 1):
        return f"{TOP_K}: must be INT32 [1, 1], got {top_k.dtype} {list(top_k.shape)}"
    if not 0 <= int(top_k[0, 0]) <= vocab_size:
        return f"{TOP_K}: must be in 0..{vocab_size} (0 = all), got {int(top_k[0, 0])}"
    return None


@dataclass
class GenRequest:
    index: int  # position in execute()'s request list
    corr: object  # correlation id
    flags: int
    ids: np.ndarray  # (1, T) int32
    noise: np.ndarray  # (1, K, V) fp32
    temperature: np.ndarray  # (1, 1) fp32
    top_k: np.ndarray  # (1, 1) int32

    @property
    def shape_key(self) -> tuple[int, int]:
        return self.ids.shape[1], self.noise.shape[1]


def group_by_shape(requests: list[GenRequest]) -> list[list[GenRequest]]:
    """Requests with equal (T, K), in order of first appearance: each group is one batched call."""
    groups: dict[tuple[int, int], list[GenRequest]] = {}
    for r in requests:
        groups.setdefault(r.shape_key, []).append(r)
    return list(groups.values())


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class GenRunner:
    """An ONNX Runtime session of the generation graph + the sequence states it advances."""

    def __init__(self, session, states: SequenceStates) -> None:
        self.session, self.states = session, states

    def _feeds(self, group: list[GenRequest]) -> dict[str, np.ndarray]:
        keys = [(r.corr, r.flags) for r in group]
        return {
            INPUT_IDS: _cat([r.ids for r in group]),
            STATE_IN: self.states.gather(keys),
            NOISE: _cat([r.noise for r in group]),
            TEMPERATURE: _cat([r.temperature for r in group]),
            TOP_K: _cat([r.top_k for r in group]),
        }

    def run(self, group: list[GenRequest]) -> np.ndarray:
        """All K characters of every request in one call; returns OUTPUT_IDS (B, K). Caller holds states.lock."""
        ids, new_state = self.session.run([OUTPUT_IDS, STATE_OUT], self._feeds(group))
        self.states.scatter([(r.corr, r.flags) for r in group], new_state)
        return ids

    def steps(self, group: list[GenRequest]) -> Iterator[tuple[int, np.ndarray]]:
        """One character per graph call (K = 1): yields (j, ids (B, 1)) for j = 0..K-1 as each is chosen.

        The states are stored (and ENDed sequences freed) BEFORE the last character is yielded, so a client
        that sends its next request as soon as it has the K-th character finds the state in place.
        Caller holds states.lock while iterating.
        """
        feeds = self._feeds(group)
        noise, k = feeds[NOISE], feeds[NOISE].shape[1]
        for j in range(k):
            feeds[NOISE] = noise[:, j : j + 1]
            ids, feeds[STATE_IN] = self.session.run([OUTPUT_IDS, STATE_OUT], feeds)
            feeds[INPUT_IDS] = ids  # (B, 1): fed next step (id_K never is)
            if j == k - 1:
                self.states.scatter([(r.corr, r.flags) for r in group], feeds[STATE_IN])
            yield j, ids

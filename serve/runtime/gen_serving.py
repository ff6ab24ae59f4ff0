"""Server-side generation for python-backend models (charrnn_gen_python, charrnn_gen_stream): NumPy only.

Both models run the generation ONNX graph (export/gen_export.py, contract in charrnn.contract) with ONNX
Runtime and keep each sequence's state in serve.runtime.sequence_state.SequenceStates. This module holds what they
share, free of Triton's pb_utils so it can be tested directly:

  - `check_gen_request`: one request's tensors (charrnn.contract's table: GEN_REQUEST_INPUTS), or the error message;
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
    GEN,
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
    Tensor,
    request_inputs,
)

from .sequence_state import SequenceStates, check_ids

# What a client sends to a generation model, in order: charrnn.contract's table (GEN inputs without the state).
GEN_REQUEST_INPUTS = request_inputs(GEN)


def check_request_shape(
    t: Tensor, value: np.ndarray, vocab_size: int, limits: dict[str, tuple[int, int]]
) -> str | None:
    """None if `value` has the row's dtype and its shape in one request (batch 1, V the vocabulary, each dynamic
    dim within `limits`), else the error message."""
    want, dynamic, ok = [], [], value.ndim == len(t.dims)
    for i, d in enumerate(t.dims):
        size = value.shape[i] if ok else None
        if d in limits:
            lo, hi = limits[d]
            want.append(d)
            dynamic.append(f"{lo} <= {d} <= {hi}")
            ok = ok and lo <= size <= hi
        else:
            n = 1 if d == "B" else vocab_size if d == "V" else int(d)
            want.append(str(n))
            ok = ok and size == n
    if value.dtype != t.dtype:
        return f"{t.name}: dtype must be {t.triton_dtype}, got {value.dtype}"
    if not ok:
        with_ = f" with {', '.join(dynamic)}" if dynamic else ""
        return f"{t.name}: shape must be [{', '.join(want)}]{with_}, got {list(value.shape)}"
    return None


def _noise_values(noise: np.ndarray, vocab_size: int) -> str | None:
    if not ((noise > 0).all() and (noise < 1).all()):  # also rejects NaN
        return "values must be uniforms in the open interval (0, 1)"
    return None


def _temperature_values(temperature: np.ndarray, vocab_size: int) -> str | None:
    t = float(temperature[0, 0])
    if not (np.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE)):
        return f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller values overflow), got {t}"
    return None


def _top_k_values(top_k: np.ndarray, vocab_size: int) -> str | None:
    if not 0 <= int(top_k[0, 0]) <= vocab_size:
        return f"must be in 0..{vocab_size} (0 = all), got {int(top_k[0, 0])}"
    return None


# The value checks of the sampling inputs (the table's `values`), after their dtype and shape are checked; an
# input without one takes any value. INPUT_IDS is checked by check_ids (shared with the step model).
VALUE_CHECKS = {NOISE: _noise_values, TEMPERATURE: _temperature_values, TOP_K: _top_k_values}


def check_gen_request(
    tensors: dict[str, np.ndarray | None], vocab_size: int, max_t: int = MAX_T, max_k: int = MAX_K
) -> str | None:
    """None if one request's tensors (name -> array, batch dim 1; every row of GEN_REQUEST_INPUTS) are valid,
    else the error message (charrnn.contract.ErrorCode.INVALID_INPUT)."""
    for t in GEN_REQUEST_INPUTS:
        if tensors.get(t.name) is None:
            return f"{t.name}: missing"
    limits = {"T": (1, max_t), "K": (1, max_k)}
    for t in GEN_REQUEST_INPUTS:
        value = tensors[t.name]
        if t.name == INPUT_IDS:
            error = check_ids(value, vocab_size, max_t)
        else:
            error = check_request_shape(t, value, vocab_size, limits)
            if error is None and t.name in VALUE_CHECKS:
                error = VALUE_CHECKS[t.name](value, vocab_size)
                error = f"{t.name}: {error}" if error else None
        if error:
            return error
    return None


@dataclass
class GenRequest:
    index: int  # position in execute()'s request list
    corr: object  # correlation id
    flags: int
    tensors: dict[str, np.ndarray]  # every row of GEN_REQUEST_INPUTS, batch dim 1

    @property
    def k(self) -> int:
        """K: the characters this request asks for (NOISE rows)."""
        return self.tensors[NOISE].shape[1]

    @property
    def shape_key(self) -> tuple[int, int]:
        """(T, K): requests batch together only when both are equal."""
        return self.tensors[INPUT_IDS].shape[1], self.k


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
        feeds = {t.name: _cat([r.tensors[t.name] for r in group]) for t in GEN_REQUEST_INPUTS}
        return {**feeds, STATE_IN: self.states.gather(keys)}

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

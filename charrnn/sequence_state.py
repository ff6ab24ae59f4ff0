"""Per-sequence recurrent state for python-backend models, which get no implicit state from Triton.

`SequenceStates` keeps each live sequence's packed state (S, L, H) keyed by correlation id, gathers a
batch of them for one model call, scatters the new states back, frees a sequence on END, and evicts
sequences idle longer than the sequence batcher's max_sequence_idle_microseconds (Triton frees the
slot then but does not tell the model). NumPy only; the python backend's model.py drives it.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

START, END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END


def check_ids(ids: np.ndarray, vocab_size: int, max_t: int, name: str = "INPUT_IDS") -> str | None:
    """None if `ids` is a valid (1, T) int32 request tensor, else the error message."""
    if ids.dtype != np.int32:
        return f"{name}: dtype must be INT32, got {ids.dtype}"
    if ids.ndim != 2 or ids.shape[0] != 1 or not 1 <= ids.shape[1] <= max_t:
        return f"{name}: shape must be [1, T] with 1 <= T <= {max_t}, got {list(ids.shape)} (send long prompts in chunks)"
    if ids.min() < 0 or ids.max() >= vocab_size:
        return f"{name}: ids must be in 0..{vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}"
    return None


class SequenceStates:
    def __init__(self, state_dims: tuple[int, ...], idle_seconds: float,
                 log: Callable[[str], None] = print) -> None:
        self.zero = np.zeros(state_dims, np.float32)
        # Evict a little after Triton frees the slot, never before (a request Triton accepts must find its state).
        self.idle_s = idle_seconds + 1.0
        self.states: dict[object, np.ndarray] = {}  # correlation id -> (S, L, H)
        self.last_used: dict[object, float] = {}  # correlation id -> time.monotonic()
        self.lock = threading.Lock()
        self._log = log
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="sequence-reaper", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        return len(self.states)

    def check(self, corr, flags: int) -> str | None:
        """None if a request with this correlation id and flags can run, else the error message."""
        if corr in (0, ""):
            return "sequence id: missing (this model is stateful: send sequence_id, sequence_start, sequence_end)"
        if not flags & START and corr not in self.states:
            return (f"unknown sequence (never started, ended, or idle longer than {self.idle_s - 1.0:.0f} s) "
                    "(start it again with sequence_start=True)")
        return None

    def gather(self, members: list[tuple[object, int]]) -> np.ndarray:
        """States of [(corr, flags), ...] as one (B, S, L, H) batch; zeros for sequence starts."""
        return np.stack([self.zero if flags & START else self.states[corr] for corr, flags in members])

    def scatter(self, members: list[tuple[object, int]], new_state: np.ndarray) -> None:
        """Keep row b of new_state (B, S, L, H) for member b; free the sequences that END."""
        now = time.monotonic()
        for row, (corr, flags) in enumerate(members):
            if flags & END:
                self.states.pop(corr, None)
                self.last_used.pop(corr, None)
            else:
                self.states[corr] = new_state[row].copy()  # own memory: no view pins the batch
                self.last_used[corr] = now

    def _reap(self) -> None:
        period = min(max(self.idle_s / 4, 0.05), 5.0)
        while not self._stopping.wait(period):
            cutoff = time.monotonic() - self.idle_s
            with self.lock:
                idle = [c for c, t in self.last_used.items() if t < cutoff]
                for c in idle:
                    self.states.pop(c, None)
                    self.last_used.pop(c, None)
                live = len(self.states)
            if idle:
                self._log(f"evicted {len(idle)} idle sequence(s); {live} live")

    def close(self) -> None:
        self._stopping.set()
        self._reaper.join(timeout=5)
        self.states.clear()
        self.last_used.clear()

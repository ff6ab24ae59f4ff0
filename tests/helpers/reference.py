"""Reference texts (TensorFlow with the project's sampler) and the generation graph's prompts and parameters."""

from __future__ import annotations

from charrnn.contract import MAX_T
from charrnn.sampling import SamplingParams


def tiny_text(tiny, prompt="ROMEO:", length=40, **kw) -> str:
    """`length` characters after `prompt` from the tiny model with charrnn.sampling.sample_steps (kw: SamplingParams)."""
    from charrnn.sampling import Sampler, sample_steps

    model, vocab, step = tiny
    seen = []
    ids = sample_steps(
        step,
        vocab.encode(prompt),
        length,
        Sampler(SamplingParams(**kw), len(vocab)),
        on_id=seen.append,
    )
    assert seen == ids and len(ids) == length
    return vocab.decode(ids)


def tf_text(shipped, prompt: str, length: int, params) -> str:
    """The TensorFlow reference: `length` characters after `prompt` with the project's sampler."""
    from charrnn.sampling import Sampler

    model, vocab = shipped
    return vocab.decode(model.generate(vocab.encode(prompt), length, Sampler(params, len(vocab))))


# --- the generation graph (server-side sampling) --------------------------------------------------------
GEN_LENGTH = 160
# The second prompt is longer than MAX_T: two prime requests (the first one's id is discarded).
LONG_PROMPT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 4
)[: MAX_T + 40]
GEN_PROMPTS = ["ROMEO:\n", LONG_PROMPT]
SEEDED = [
    SamplingParams(temperature=0.9, top_k=20, seed=11),
    SamplingParams(temperature=1.1, seed=12),
    SamplingParams(temperature=0.7, top_k=3, seed=13),
]
GREEDY = SamplingParams(greedy=True)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

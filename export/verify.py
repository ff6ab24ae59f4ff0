"""`make verify`: the sampleCharRNN "Expect/Received" check, ONNX Runtime vs the TensorFlow network.

    python -m export.verify --model-dir models/shakespeare-lstm-2x512 --onnx model_repository/charrnn_onnx/1/model.onnx

1. Random batches (B up to 8) and long sequences, state carried chunk to chunk through the explicit
   STATE_IN/STATE_OUT tensors: max |logit difference| must be <= --tolerance (1e-4).
2. Greedy generation from several prompts, one character per step through the explicit state:
   the ONNX text must equal the TF text character for character (--length, default 1000).
Exit codes: 0 pass, 1 mismatch, 2 bad input.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from charrnn import onnx_runtime
from charrnn.cli import add_model_dir, parser
from charrnn.contract import INPUT_IDS, LOGITS, STATE_IN, STATE_OUT
from charrnn.errors import CheckFailed, UserError, cli

PROMPTS = ("ROMEO:\n", "First Citizen:\nBefore we proceed", "KING HENRY", "O, ", "\n")


def ort_session(path: str | Path):
    """The exported ONNX model, or a UserError naming it."""
    try:
        return onnx_runtime.ort_session(path)
    except ValueError as e:
        raise UserError(
            str(path),
            f"cannot load ONNX model ({e.__cause__.__class__.__name__})",
            "run `make export`",
        ) from e


def ort_step(session):
    """A charrnn.sampling.sample_steps step function over the explicit-state ONNX model."""

    def step(ids, state):
        if state is None:
            shape = session.get_inputs()[1].shape
            state = np.zeros((ids.shape[0], *shape[1:]), np.float32)
        logits, new_state = session.run(
            [LOGITS, STATE_OUT], {INPUT_IDS: ids.astype(np.int32), STATE_IN: state}
        )
        return logits, new_state

    return step


def compare_logits(
    net, session, batches=(1, 3, 8), length: int = 300, chunk: int = 64, seed: int = 0
) -> float:
    """Max |Δ logit| between the TF network and the ONNX session over random text, state carried across
    chunks."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    tf_step, onnx_step = net.step, ort_step(session)
    V = net.config.vocab_size
    for b in batches:
        ids = rng.integers(0, V, (b, length), dtype=np.int32)
        tf_state = net.zero_state(b)
        onnx_state = None
        for s in range(0, length, chunk):
            x = ids[:, s : s + chunk]
            tf_logits, tf_state = tf_step(x, tf_state)
            onnx_logits, onnx_state = onnx_step(x, onnx_state)
            worst = max(worst, float(np.abs(tf_logits.numpy() - onnx_logits).max()))
    return worst


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m export.verify", __doc__)
    add_model_dir(p, help="model directory (the reference)")
    p.add_argument(
        "--onnx",
        default="model_repository/charrnn_onnx/1/model.onnx",
        help="exported ONNX model to check",
    )
    p.add_argument("--length", type=int, default=1000, help="greedy characters per prompt")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |Δ logit| allowed")
    args = p.parse_args(argv)

    from charrnn.model import load_model_dir, use_cpu_only
    from charrnn.sampling import Sampler, SamplingParams, sample_steps

    use_cpu_only()
    net, vocab, _ = load_model_dir(args.model_dir)
    session = ort_session(args.onnx)
    t0 = time.time()
    delta = compare_logits(net, session)
    ok_logits = delta <= args.tolerance
    print(
        f"logits: batches 1/3/8 x 300 chars, state carried in chunks of 64: max |delta| = {delta:.2e} "
        f"(tolerance {args.tolerance:.0e}) {'PASS' if ok_logits else 'FAIL'}"
    )
    failures = [] if ok_logits else [f"max |delta logit| {delta:.2e} > {args.tolerance:.0e}"]
    greedy = SamplingParams(greedy=True)
    for prompt in PROMPTS:
        prime = vocab.encode(prompt)
        expect = vocab.decode(net.generate(prime, args.length, Sampler(greedy, len(vocab))))
        received = vocab.decode(
            sample_steps(ort_step(session), prime, args.length, Sampler(greedy, len(vocab)))
        )
        same = expect == received
        first_diff = next((i for i, (a, b) in enumerate(zip(expect, received)) if a != b), None)
        print(f"\nprompt {prompt!r}: greedy {args.length} chars {'PASS' if same else 'FAIL'}")
        print(f"  Expect:   {expect[:70]!r}...")
        print(f"  Received: {received[:70]!r}...")
        if not same:
            print(f"  first difference at character {first_diff}")
            failures.append(f"greedy text differs for prompt {prompt!r} at character {first_diff}")
    print(f"\n{'PASS' if not failures else 'FAIL'} ({time.time() - t0:.1f} s)")
    if failures:
        raise CheckFailed(
            "verify", "; ".join(failures), "re-run `make export`; if it persists, report it"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

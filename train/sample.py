"""Reference sampler: generate text in-process with TensorFlow (`make sample`); the ground truth the
ONNX, TensorRT and Triton paths are compared with.

    python -m train.sample --model models/shakespeare-lstm-2x512 --prompt "ROMEO:" --length 500
    python -m train.sample --greedy --length 200
    python -m train.sample --temperature 0.8 --top-k 20 --seed 7

Characters stream to stdout as they are generated. Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from charrnn.contract import MIN_TEMPERATURE
from charrnn.errors import cli


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags, shared with the Triton client so both spell them the same way."""
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default="ROMEO:\n", help="text to prime the model with")
    g.add_argument("--length", type=int, default=500, help="characters to generate")
    g.add_argument("--temperature", type=float, default=1.0,
                   help=f">= {MIN_TEMPERATURE}; lower is more conservative (--greedy for argmax)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set reaching p (1: all)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_params(args: argparse.Namespace):
    from charrnn.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          greedy=args.greedy, seed=args.seed)


def tf_step(model):
    """A `charrnn.sampling.generate` step function running the Keras model eagerly-compiled."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def _step(ids, state):
        return model.step(ids, state)

    def step(ids, state):
        if state is None:
            state = model.zero_state(ids.shape[0])
        logits, state = _step(tf.constant(ids), state)
        return logits.numpy(), state

    return step


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/shakespeare-lstm-2x512", help="model directory")
    add_sampling_flags(p)
    args = p.parse_args(argv)
    from charrnn.model import load_model_dir
    from charrnn.sampling import Sampler, generate

    # Validate everything the user typed before the (slow) model load.
    from charrnn.errors import UserError

    if args.length < 1:
        raise UserError("length", f"must be >= 1, got {args.length}")
    if not args.prompt:
        raise UserError("prompt", "is empty", "give at least one character")
    model, vocab, _ = load_model_dir(args.model)
    sampler = Sampler(sampling_params(args), len(vocab))
    prime = vocab.encode(args.prompt)
    sys.stdout.write(args.prompt)
    generate(tf_step(model), prime, args.length, sampler,
             on_id=lambda i: (sys.stdout.write(vocab.chars[i]), sys.stdout.flush()))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

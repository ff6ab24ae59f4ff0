"""Reference sampler: generate text in-process with TensorFlow (`make sample`); the ground truth the
ONNX, TensorRT and Triton paths are compared with.

    python -m train.sample --model-dir models/shakespeare-lstm-2x512 --prompt "ROMEO:" --length 500
    python -m train.sample --greedy --length 200
    python -m train.sample --temperature 0.8 --top-k 20 --seed 7

Characters stream to stdout as they are generated. Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import sys

from charrnn.cli import add_model_dir, parser
from charrnn.errors import UserError, cli
from charrnn.sampling import Sampler, add_sampling_flags, sampling_params


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m train.sample", __doc__)
    add_model_dir(p)
    add_sampling_flags(p)
    args = p.parse_args(argv)
    # Validate everything the user typed before the (slow) load of the model directory.
    if args.length < 1:
        raise UserError("length", f"must be >= 1, got {args.length}")
    if not args.prompt:
        raise UserError("prompt", "is empty", "give at least one character")
    from charrnn.model import load_model_dir, use_cpu_only

    use_cpu_only()
    net, vocab, _ = load_model_dir(args.model_dir)
    sampler = Sampler(sampling_params(args), len(vocab))
    prime = vocab.encode(args.prompt)
    sys.stdout.write(args.prompt)
    net.generate(
        prime,
        args.length,
        sampler,
        on_id=lambda i: (sys.stdout.write(vocab.chars[i]), sys.stdout.flush()),
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

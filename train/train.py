"""Train the char-RNN on a text corpus and write an export-ready model directory (`make train`).

    python -m train.train                                   # sampleCharRNN's 2x512 LSTM on Tiny Shakespeare
    python -m train.train --max-steps 200 --hidden-size 128 --out /tmp/small
    python -m train.train --out models/x --resume           # continue from models/x/checkpoints

Batches follow char-rnn: the training split is cut into --batch-size contiguous streams, read
--seq-length characters at a time, the RNN state carried from one batch to the next (reset each
epoch). The network with the best validation loss is kept in --out (config.json, vocab.json,
model.weights.h5, model_card.json); checkpoints/ holds the latest step for --resume; logs/ is for TensorBoard.

Exit codes: 0 ok, 2 bad flags or data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from charrnn.cli import parser
from charrnn.errors import UserError, cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("python -m train.train", __doc__)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default="data/tinyshakespeare.txt", help="UTF-8 text corpus (any file works)"
    )
    g = p.add_argument_group("network (default: NVIDIA sampleCharRNN)")
    g.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"], help="recurrent cell")
    g.add_argument("--num-layers", type=int, default=2, help="stacked recurrent layers")
    g.add_argument("--hidden-size", type=int, default=512, help="units per recurrent layer")
    g.add_argument("--embedding-size", type=int, default=512, help="character embedding size")
    g.add_argument(
        "--dropout",
        type=float,
        default=0.25,
        help="dropout between layers; 0.2-0.5 for large models, 0 for tiny ones",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=64, help="parallel text streams per step")
    g.add_argument(
        "--seq-length", type=int, default=100, help="characters per stream per step (BPTT length)"
    )
    g.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate at step 0")
    g.add_argument(
        "--lr-final-ratio",
        type=float,
        default=0.1,
        help="cosine decay to learning-rate x this at the last step",
    )
    g.add_argument(
        "--grad-clip", type=float, default=5.0, help="clip the global gradient norm to this"
    )
    g.add_argument(
        "--max-steps", type=int, default=0, help="stop after this many steps (0: use --max-epochs)"
    )
    g.add_argument(
        "--max-epochs", type=float, default=10, help="stop after this many passes over the data"
    )
    g.add_argument("--seed", type=int, default=1234, help="seed for weights and dropout")
    g = p.add_argument_group("output")
    g.add_argument(
        "--out", default="models/shakespeare-lstm-2x512", help="model directory to write"
    )
    g.add_argument(
        "--eval-every", type=int, default=200, help="validate every N steps (and at the end)"
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=200, help="write checkpoints/ every N steps"
    )
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_length", "eval_every", "checkpoint_every", "num_layers"):
        if getattr(args, name) < 1:
            raise UserError(
                f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(args, name)}"
            )
    if args.learning_rate <= 0 or args.grad_clip <= 0:
        raise UserError("--learning-rate/--grad-clip", "must be > 0")
    if args.max_steps < 0 or args.max_epochs <= 0:
        raise UserError("--max-steps/--max-epochs", "must be >= 0 / > 0")
    return args


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from charrnn.data import load_splits, md5_of, num_streams_batches

    vocab, train_ids, val_ids, test_ids = load_splits(args.data)
    steps_per_epoch = num_streams_batches(len(train_ids), args.batch_size, args.seq_length)
    if steps_per_epoch < 1:
        raise UserError(
            args.data,
            f"the training split ({len(train_ids):,} chars) is smaller than one batch "
            f"({args.batch_size} x {args.seq_length} + 1)",
            "use a larger text, or a smaller --batch-size / --seq-length",
        )
    if len(val_ids) < 2:
        raise UserError(args.data, "the validation split is empty", "use a larger text")
    max_steps = args.max_steps or math.ceil(args.max_epochs * steps_per_epoch)

    import keras
    import numpy as np
    import tensorflow as tf

    from charrnn.model import (  # sets TF env first
        CARD_FILE,
        ModelConfig,
        build_net,
        load_model_dir,
        save_model_dir,
        use_cpu_only,
    )

    from .evaluate import evaluate_loss

    use_cpu_only()
    keras.utils.set_random_seed(args.seed)
    config = ModelConfig(
        vocab_size=len(vocab),
        cell=args.cell,
        layers=args.num_layers,
        hidden=args.hidden_size,
        embedding=args.embedding_size,
        dropout=args.dropout,
    )
    net = build_net(config)
    lr = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, max_steps, alpha=args.lr_final_ratio
    )
    optimizer = keras.optimizers.Adam(lr, global_clipnorm=args.grad_clip)
    optimizer.build(net.trainable_variables)

    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    step_var = tf.Variable(0, dtype=tf.int64)
    # The checkpoint key stays "model": checkpoints written before the rename keep loading.
    ckpt = tf.train.Checkpoint(model=net, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), max_to_keep=1)
    state_file = ckpt_dir / "train_state.json"
    best_val, best_step, elapsed_before = float("inf"), 0, 0.0
    if args.resume:
        if manager.latest_checkpoint is None or not state_file.is_file():
            raise UserError(
                str(ckpt_dir), "no checkpoint to resume from", "train without --resume first"
            )
        saved = json.loads(state_file.read_text())
        if saved["config"] != json.loads(config.to_json()):
            raise UserError(
                "--resume",
                f"checkpoint was trained with {saved['config']}",
                "pass the same network flags as the original run",
            )
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        best_val, best_step = saved["best_val_loss"], saved["best_step"]
        elapsed_before = saved["training_seconds"]
        print(f"resumed from {manager.latest_checkpoint} at step {int(step_var.numpy())}")
    out.mkdir(parents=True, exist_ok=True)
    writer = tf.summary.create_file_writer(str(out / "logs"))

    @tf.function
    def train_step(x, y, state):
        with tf.GradientTape() as tape:
            logits, new_state = net(x, state, training=True)  # (B, T, V)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            )
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss, tf.stop_gradient(new_state)

    def save_checkpoint():
        manager.save(checkpoint_number=int(step_var.numpy()))
        state_file.write_text(
            json.dumps(
                {
                    "step": int(step_var.numpy()),
                    "best_val_loss": best_val,
                    "best_step": best_step,
                    "training_seconds": elapsed_before + time.time() - t_start,
                    "config": json.loads(config.to_json()),
                },
                indent=2,
            )
        )

    def card(extra: dict) -> dict:
        return {
            "name": out.name,
            "architecture": json.loads(config.to_json()),
            "parameters": int(sum(np.prod(v.shape) for v in net.trainable_variables)),
            "vocab_size": len(vocab),
            "corpus": {
                "file": Path(args.data).name,
                "md5": md5_of(args.data),
                "characters": int(len(train_ids) + len(val_ids) + len(test_ids)),
                "split": "90/5/5 contiguous train/val/test",
            },
            "training": {
                "batch_size": args.batch_size,
                "seq_length": args.seq_length,
                "learning_rate": args.learning_rate,
                "lr_final_ratio": args.lr_final_ratio,
                "grad_clip": args.grad_clip,
                "max_steps": max_steps,
                "seed": args.seed,
                "steps_per_epoch": steps_per_epoch,
                "command": "python -m train.train "
                + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            "software": {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "python": platform.python_version(),
                "machine": f"{os.cpu_count()} CPU cores",
            },
            **extra,
        }

    from tqdm import tqdm

    step = int(step_var.numpy())
    # a log file gets a line a minute
    bar = tqdm(
        total=max_steps,
        initial=step,
        disable=args.quiet,
        unit="step",
        dynamic_ncols=True,
        file=sys.stdout,
        mininterval=2 if sys.stdout.isatty() else 60,
    )
    t_start = time.time()
    chars_per_step = args.batch_size * args.seq_length
    from charrnn.data import stream_batches

    while step < max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        # each epoch (and a resume) starts from a zero state
        state = net.zero_state(args.batch_size)
        batches = stream_batches(train_ids, args.batch_size, args.seq_length, what=args.data)
        for i, (x, y) in enumerate(batches):
            if i < offset:
                continue
            t0 = time.time()
            loss, state = train_step(x, y, state)
            loss = float(loss)
            step += 1
            step_var.assign(step)
            bar.update(1)
            bar.set_postfix(
                epoch=f"{step / steps_per_epoch:.2f}",
                loss=f"{loss:.3f}",
                chars_s=f"{chars_per_step / (time.time() - t0):.0f}",
                best_val=f"{best_val:.3f}",
            )
            with writer.as_default(step=step):
                tf.summary.scalar("loss/train", loss)
                tf.summary.scalar("learning_rate", float(lr(step)))
            if step % args.eval_every == 0 or step == max_steps:
                val_loss, _ = evaluate_loss(net, val_ids)
                with writer.as_default(step=step):
                    tf.summary.scalar("loss/val", val_loss)
                bar.write(
                    f"step {step}/{max_steps} epoch {step / steps_per_epoch:.2f}: train loss {loss:.4f} "
                    f"val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f})"
                )
                if val_loss < best_val:
                    best_val, best_step = val_loss, step
                    save_model_dir(out, net, vocab)
            if step % args.checkpoint_every == 0 or step == max_steps:
                save_checkpoint()
            if step >= max_steps:
                break
    bar.close()
    training_seconds = elapsed_before + time.time() - t_start

    # Final numbers come from the best-validation network, the one written to --out.
    best, _, _ = load_model_dir(out)
    sample_len = min(len(train_ids), len(val_ids) + len(test_ids))
    losses = {
        name: evaluate_loss(best, ids)[0]
        for name, ids in (("train", train_ids[:sample_len]), ("val", val_ids), ("test", test_ids))
    }
    metrics = {f"{k}_loss": round(v, 5) for k, v in losses.items()}
    metrics.update({f"{k}_perplexity": round(math.exp(v), 4) for k, v in losses.items()})
    info = {
        "steps": step,
        "best_step": best_step,
        "epochs": round(step / steps_per_epoch, 3),
        "training_seconds": round(training_seconds, 1),
        "trained_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "metrics": metrics,
        "metrics_note": f"train_* over the first {sample_len:,} chars of the training split; "
        "state carried through each split (train.evaluate.evaluate_loss)",
    }
    (out / CARD_FILE).write_text(json.dumps(card(info), indent=2) + "\n")
    print(
        f"done: {step} steps in {training_seconds / 60:.1f} min; best val loss {best_val:.4f} at step "
        f"{best_step}; test perplexity {metrics['test_perplexity']:.3f}; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

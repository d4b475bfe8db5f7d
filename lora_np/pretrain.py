"""``python -m lora_np.pretrain``: pretrain the character language model on Jane Austen.

Trains ``LanguageModel(vocab 81, d_model 96, 4 heads, 3 layers, d_hidden 384, context 64)``
in float32 on the train split of Austen's six novels (``lora_np.text.corpus``: the first 90 %
of the text) with ``lora_np.train.train``: next-character cross-entropy, Adam, a linear
warm-up then cosine decay, batches of 32 windows of 64 characters drawn at random positions
by the seeded rng. Then it prints

* the held-out loss on the test splits (the last 5 % of each text) of Austen — text of the
  same author the model never read — and of the King James Bible (the fine-tuning target),
  in nats and bits per character (a uniform guess is ln 81 = 4.39 nats);
* a 300-character sample from a fixed prompt and seed;

and writes the weights and the tokenizer (``lora_np.text.checkpoint``; float32, compressed).

Where the weights go. The committed ``lora_np/data/austen_lm.npz`` is the output of the
default run (``python -m lora_np.pretrain``), and only that run rewrites it — bit for bit, as
the run is reproducible from its seed with one BLAS thread. Any other run (``--quick``,
``--steps``, ``--lr``, ``--warmup``, ``--seed``) writes ``austen_lm.npz`` into
``figures/scratch/`` (ignored by git) unless ``--out`` names a folder, and says where.

Like ``python -m lora_np`` it runs NumPy's BLAS with one thread (it re-starts itself with
``OPENBLAS_NUM_THREADS=1`` etc. unless you set one of those variables yourself): its matrices
are small (at most 2048 × 384), a second thread made a step slower, not faster, where it was
measured (two shared cores), and one thread makes every run give the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import functional as F
from .machine import BLAS_THREAD_VARIABLES, restart_with_one_blas_thread
from .optim import Adam
from .text.checkpoint import save_lm
from .text.corpus import DATA_DIR, NATS_TO_BITS, corpus_tokenizer, lm_loss, load_splits, windows
from .text.model import LanguageModel, generate
from .train import train

#: the model pretrained here (``LanguageModel``'s arguments but vocab_size, rng, dtype)
MODEL_CONFIG = {"d_model": 96, "n_heads": 4, "n_layers": 3, "d_hidden": 384, "context": 64}
DTYPE = np.float32
BATCH_SIZE = 32
DEFAULT_STEPS = 1500
DEFAULT_LR = 6e-3
DEFAULT_WARMUP = 100
DEFAULT_SEED = 0
#: Adam's (β₁, β₂): β₂ = 0.99 (not 0.999) lets the second moment follow a loss that falls fast
ADAM_BETAS = (0.9, 0.99)
QUICK_STEPS = 100
#: the committed weights (written only by the default run) and where every other run writes
COMMITTED = DATA_DIR / "austen_lm.npz"
SCRATCH = Path("figures") / "scratch"
FILE_NAME = COMMITTED.name
#: rows of the fixed validation subset scored during training (spread evenly over the
#: validation split's disjoint windows; the full test splits are scored once at the end)
VAL_ROWS = 64
VAL_EVERY = 100
#: rows per forward when scoring held-out text
EVAL_BATCH = 256
#: --quick scores only the first QUICK_EVAL_ROWS windows of each test split
QUICK_EVAL_ROWS = 128
#: the printed sample
SAMPLE_PROMPT = "Elizabeth"
SAMPLE_CHARS = 300
SAMPLE_SEED = 0
SAMPLE_TEMPERATURE = 0.8
#: the held-out slice tests/test_pretrain.py scores (the first rows of Austen's test split)
CHECK_ROWS = 512


def build_model(tokenizer, seed: int = DEFAULT_SEED) -> LanguageModel:
    """The untrained float32 model for ``tokenizer``'s vocabulary, initialised from ``seed``."""
    return LanguageModel(tokenizer.vocab_size, **MODEL_CONFIG, rng=seed, dtype=DTYPE)


def pretrain(steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, warmup: int = DEFAULT_WARMUP,
             seed: int = DEFAULT_SEED, verbose: bool = False):
    """Train the model on Austen's train split; returns ``(model, tokenizer, history)``.

    The model is initialised from ``np.random.default_rng(seed)`` and the same generator then
    draws the batches, so ``seed`` fixes the whole run. Every ``VAL_EVERY`` steps the loss on a
    fixed subset of the validation split (``VAL_ROWS`` disjoint windows, evenly spread) is
    recorded; the test splits are not looked at.
    """
    tokenizer = corpus_tokenizer()
    austen = load_splits("austen", tokenizer)
    context = MODEL_CONFIG["context"]
    x, y = windows(austen.train, context, stride=1)           # a row at every position
    xv, yv = windows(austen.val, context, stride=context)
    every = len(xv) // VAL_ROWS
    xv, yv = xv[::every][:VAL_ROWS], yv[::every][:VAL_ROWS]
    rng = np.random.default_rng(seed)
    model = build_model(tokenizer, rng)
    history = train(model, x, y, steps=steps, lr=lr, optimizer=Adam(model, lr=lr, betas=ADAM_BETAS),
                    batch_size=BATCH_SIZE, schedule="cosine", warmup=warmup, x_val=xv, y_val=yv,
                    eval_every=VAL_EVERY, rng=rng, verbose=verbose, label="pretrain ",
                    loss_fn=F.cross_entropy_loss)
    return model, tokenizer, history


def heldout_losses(model, tokenizer, rows: int | None = None) -> dict:
    """``{"austen": nats/char, "kjv": nats/char}`` on each text's test split, read as disjoint
    windows of the model's context (every character once); ``rows`` limits it to the first
    ``rows`` windows."""
    out = {}
    for name in ("austen", "kjv"):
        x, y = windows(load_splits(name, tokenizer).test, model.context, stride=model.context)
        out[name] = lm_loss(model, x[:rows], y[:rows], batch_size=EVAL_BATCH)
    return out


def check_loss(model, tokenizer) -> float:
    """Loss (nats/char) on the first ``CHECK_ROWS`` disjoint windows of Austen's test split:
    the number tests/test_pretrain.py recomputes from the committed weights."""
    x, y = windows(load_splits("austen", tokenizer).test, model.context, stride=model.context)
    return lm_loss(model, x[:CHECK_ROWS], y[:CHECK_ROWS], batch_size=EVAL_BATCH)


def sample(model, tokenizer) -> str:
    """``SAMPLE_CHARS`` characters after ``SAMPLE_PROMPT`` (seed ``SAMPLE_SEED``, temperature
    ``SAMPLE_TEMPERATURE``), prompt included."""
    return generate(model, tokenizer, SAMPLE_PROMPT, SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE,
                    rng=SAMPLE_SEED)


def is_default_run(steps: int, lr: float, warmup: int, seed: int) -> bool:
    """Whether these settings are the default run's, the one that made the committed weights."""
    return (steps, lr, warmup, seed) == (DEFAULT_STEPS, DEFAULT_LR, DEFAULT_WARMUP, DEFAULT_SEED)


def output_path(out, default_run: bool) -> Path:
    """``--out``/austen_lm.npz if given, else the committed file for the default run and
    figures/scratch/austen_lm.npz for any other."""
    if out is not None:
        return Path(out) / FILE_NAME
    return COMMITTED if default_run else SCRATCH / FILE_NAME


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_np.pretrain",
        description="Pretrain the character language model (float32, d_model 96, 3 causal blocks, "
                    "4 heads, context 64, vocabulary 81) on the train split of Jane Austen's novels "
                    "with Adam and a cosine schedule, print the held-out loss on Austen and the King "
                    "James Bible (nats and bits per character) and a sample, and write the weights "
                    "and the tokenizer.")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; --quick: {QUICK_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"peak learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"steps of linear warm-up before the cosine decay (default {DEFAULT_WARMUP}, "
                        "at most a tenth of the steps)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the initial weights and of the batches (default {DEFAULT_SEED})")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test: {QUICK_STEPS} steps, and the held-out loss on only the first "
                        f"{QUICK_EVAL_ROWS} windows of each test split")
    p.add_argument("--out", default=None,
                   help=f"folder for {FILE_NAME} (default: {COMMITTED.parent}/ for the default run, "
                        f"whose weights are committed; {SCRATCH}/ for any other run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return p


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parser().parse_args(argv)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    warmup = min(DEFAULT_WARMUP, steps // 10) if args.warmup is None else args.warmup
    default_run = is_default_run(steps, args.lr, warmup, args.seed) and not args.quick
    path = output_path(args.out, default_run)
    threads = next((f"{v}={os.environ[v]}" for v in BLAS_THREAD_VARIABLES if v in os.environ),
                   "BLAS threads not set")
    print(f"pretraining LanguageModel({', '.join(f'{k} {v}' for k, v in MODEL_CONFIG.items())}, "
          f"float32) on Austen's train split: {steps} steps, batch {BATCH_SIZE} × "
          f"{MODEL_CONFIG['context']}, Adam lr {args.lr:g} betas {ADAM_BETAS}, warm-up {warmup}, "
          f"cosine; seed {args.seed}; {threads}", flush=True)
    try:
        model, tokenizer, history = pretrain(steps, args.lr, warmup, args.seed,
                                             verbose=not args.quiet)
    except (ValueError, TypeError) as e:
        print(f"python -m lora_np.pretrain: error: {e}", file=sys.stderr)
        return 2
    train_seconds = history.seconds_per_step * steps
    rows = QUICK_EVAL_ROWS if args.quick else None
    losses = heldout_losses(model, tokenizer, rows)
    check = check_loss(model, tokenizer)
    text = sample(model, tokenizer)
    scope = f"first {QUICK_EVAL_ROWS} windows of each test split" if args.quick else "test splits"
    print(f"\nsteps {steps}: training {train_seconds:.1f} s ({history.seconds_per_step * 1e3:.0f} "
          f"ms/step); validation subset after the last step {history.final_val_loss:.4f} nats/char")
    print(f"held-out loss ({scope}):   nats/char   bits/char")
    for name, label in (("austen", "Austen"), ("kjv", "King James Bible")):
        print(f"  {label:<18} {losses[name]:>22.4f} {losses[name] * NATS_TO_BITS:>11.4f}")
    print(f"  (Austen, the first {CHECK_ROWS} windows of its test split, as tests/test_pretrain.py "
          f"checks: {check:.4f})")
    print(f"\nsample (prompt {SAMPLE_PROMPT!r}, seed {SAMPLE_SEED}, temperature "
          f"{SAMPLE_TEMPERATURE}, {SAMPLE_CHARS} characters):\n{text}\n")
    meta = {"steps": steps, "lr": args.lr, "warmup": warmup, "seed": args.seed,
            "batch_size": BATCH_SIZE, "quick": args.quick, "blas_threads": threads,
            "train_seconds": train_seconds, "ms_per_step": history.seconds_per_step * 1e3,
            "heldout_loss": losses, "heldout_rows": rows, "check_loss": check,
            "check_rows": CHECK_ROWS, "val_history": history.val_history,
            "loss_history": history.loss_history, "sample": text}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lm(path, model, tokenizer, meta)
    where = "" if default_run or args.out is not None else (
        f" (not {COMMITTED}: only the default run `python -m lora_np.pretrain` rewrites the "
        "committed weights)")
    print(f"weights written to {path} ({path.stat().st_size / 1e6:.2f} MB){where}")
    print(f"total: {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    restart_with_one_blas_thread("lora_np.pretrain")
    sys.exit(main())

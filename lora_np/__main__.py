"""``python -m lora_np``: full fine-tuning vs LoRA at every rank, a table, the claims, the figures.

Runs the default rank sweep (``lora_np.experiments.rank_sweep``: an MLP whose fine-tuning
task changes fc1 by a rank-4 ΔW*), prints one table row per method, checks the claims the
task is designed to show, and writes the figures (``lora_np.plots.save_figures``) to
``figures/``. About 10–20 s on 2 cores; ``--quick`` takes a few seconds.

The command runs NumPy's BLAS with one thread (it re-starts itself with
``OPENBLAS_NUM_THREADS=1`` etc. unless you set one of those variables yourself): its matrices
are 64 wide, too small for threads to help, and when another process shares the cores,
threads that wait for each other made the sweep up to 7× slower in our measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import matplotlib

from .experiments import (DEFAULT_RANKS, QUICK_RANKS, SweepSettings, attention_sweep, check_claims,
                          format_claims, format_table, rank_sweep)

QUICK_STEPS = 300
#: environment variables that set the number of BLAS threads (OpenBLAS, OpenMP builds, MKL)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _restart_with_one_blas_thread() -> None:
    """Replace this process by the same command with one BLAS thread, unless the user has set
    a thread count (then theirs is used). BLAS reads these variables only when NumPy is
    imported, which has already happened here, hence the restart."""
    if any(v in os.environ for v in BLAS_THREAD_VARIABLES):
        return
    env = dict(os.environ, **{v: "1" for v in BLAS_THREAD_VARIABLES})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lora_np", *sys.argv[1:]], env)


def _ranks(text: str) -> tuple:
    try:
        ranks = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks takes comma-separated integers like 1,2,4,8; got {text!r}")
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"--ranks needs integers >= 1, got {text!r}")
    return ranks


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_np",
        description="Fine-tune a small pretrained model on a task whose true weight change ΔW* has "
                    "rank k, with full fine-tuning and with LoRA at every rank; print the results "
                    "table and the claims it shows, and write the figures.")
    p.add_argument("--ranks", type=_ranks, default=None,
                   help=f"comma-separated LoRA ranks (default {','.join(map(str, DEFAULT_RANKS))}; "
                        f"--quick: {','.join(map(str, QUICK_RANKS))}); at most 64")
    p.add_argument("--true-rank", type=int, default=4, help="rank k of the true change ΔW* (default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the task, the data and the training (default 0)")
    p.add_argument("--out", default="figures", help="folder for the PNG figures (default figures/)")
    p.add_argument("--no-figures", action="store_true", help="print the table only, write no figures")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer ranks and {QUICK_STEPS} instead of 600 steps per run (a few seconds)")
    p.add_argument("--model", choices=("mlp", "attention"), default="mlp",
                   help="mlp (default: ΔW* on fc1, LoRA on fc1) or attention (one multi-head attention "
                        "layer; ΔW* on q_proj and v_proj, LoRA on both); attention figures get the prefix "
                        "'attention_'")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    matplotlib.use("Agg")
    ranks = args.ranks or (QUICK_RANKS if args.quick else DEFAULT_RANKS)
    settings = SweepSettings(steps=QUICK_STEPS if args.quick else 600, seed=args.seed,
                             batch_size=64 if args.model == "attention" else 256)
    run = rank_sweep if args.model == "mlp" else attention_sweep
    t0 = time.perf_counter()
    try:
        result = run(ranks, true_rank=args.true_rank, seed=args.seed, settings=settings,
                     verbose=not args.quiet)
    except (ValueError, TypeError) as e:
        print(f"python -m lora_np: error: {e}", file=sys.stderr)
        return 2
    task = result.task
    print(task.describe())
    print(f"L₀ (pretrained model's validation loss on task B) = {result.initial_val_loss:.4e}; "
          f"noise floor = {task.noise_floor:.1e}; {settings.steps} Adam steps per run, "
          f"batch {settings.batch_size}, lr {settings.lr_full:g} (cosine)\n")
    print(format_table(result))
    print("\nClaims (each one asserted in tests/test_experiments.py):")
    print(format_claims(check_claims(result)))
    print(f"\nsweep: {result.seconds:.1f} s")
    if not args.no_figures:
        from .plots import save_figures
        prefix = "" if args.model == "mlp" else "attention_"
        paths = save_figures(result, args.out, prefix=prefix)
        print("figures: " + ", ".join(os.fspath(p) for p in paths.values()))
    print(f"total: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    _restart_with_one_blas_thread()
    sys.exit(main())

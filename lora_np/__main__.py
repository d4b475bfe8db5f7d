"""``python -m lora_np``: full fine-tuning vs LoRA at every rank, a table, the claims, the figures.

Runs the rank sweep (``lora_np.experiments.rank_sweep``: an MLP whose fine-tuning task changes
fc1 by a rank-4 ΔW*; ``--model attention``: ``attention_sweep``), prints one table row per
method, checks the claims the task is designed to show (``experiments.check_claims``) and
draws the figures (``lora_np.plots.save_figures``). Exit status: 0 if every claim holds, 1 if
one fails, 2 for a bad option or argument.

Where the figures go. The committed ``figures/sweep_*.png`` are the output of the default run
(``python -m lora_np``, with or without ``--quiet``), and only that run rewrites them — bit for
bit, since the sweep is reproducible. Any other run (``--quick``, ``--ranks``, ``--seed``,
``--true-rank``, ``--model attention``) writes to ``figures/scratch/`` (ignored by git) unless
``--out`` names a folder, and says where it wrote. ``--no-figures`` writes nothing and never
imports matplotlib.

The command runs NumPy's BLAS with one thread (it re-starts itself with
``OPENBLAS_NUM_THREADS=1`` etc. unless you set one of those variables yourself): its matrices
are 64 wide, too small for threads to help, and threads that spin waiting for each other slow
the sweep down badly when another process shares the cores.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from .experiments import (DEFAULT_RANKS, QUICK_RANKS, SweepSettings, attention_sweep, check_claims,
                          format_claims, format_table, rank_sweep)

DEFAULT_STEPS = SweepSettings().steps
QUICK_STEPS = 300
DEFAULT_TRUE_RANK = 4
DEFAULT_SEED = 0
#: the committed figures (written only by the default run) and where every other run writes
COMMITTED_FIGURES = pathlib.Path("figures")
SCRATCH_FIGURES = COMMITTED_FIGURES / "scratch"
#: environment variables that set the number of BLAS threads (OpenBLAS, OpenMP builds, MKL)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: exit status when a claim fails (argparse and bad arguments use 2)
EXIT_CLAIM_FAILED = 1
EXIT_BAD_ARGUMENT = 2


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
                    "table and the claims it shows (exit 1 if one fails), and write the figures.")
    p.add_argument("--ranks", type=_ranks, default=None,
                   help=f"comma-separated LoRA ranks (default {','.join(map(str, DEFAULT_RANKS))}; "
                        f"--quick: {','.join(map(str, QUICK_RANKS))}); at most 64")
    p.add_argument("--true-rank", type=int, default=DEFAULT_TRUE_RANK,
                   help=f"rank k of the true change ΔW* (default {DEFAULT_TRUE_RANK})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the task, the data and the training (default {DEFAULT_SEED})")
    p.add_argument("--out", default=None,
                   help=f"folder for the PNG figures (default: {COMMITTED_FIGURES}/ for the default "
                        f"run, whose figures are committed; {SCRATCH_FIGURES}/ for any other run)")
    p.add_argument("--no-figures", action="store_true", help="print the table only, write no figures")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer ranks and {QUICK_STEPS} instead of {DEFAULT_STEPS} steps per run")
    p.add_argument("--model", choices=("mlp", "attention"), default="mlp",
                   help="mlp (default: ΔW* on fc1, LoRA on fc1) or attention (one multi-head attention "
                        "layer; ΔW* on q_proj and v_proj, LoRA on both); attention figures get the prefix "
                        "'attention_'")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    return p


def is_default_run(model: str, ranks: tuple, true_rank: int, seed: int, steps: int) -> bool:
    """Whether these settings are the default run's, the one that made the committed figures."""
    return (model == "mlp" and tuple(sorted(ranks)) == DEFAULT_RANKS and true_rank == DEFAULT_TRUE_RANK
            and seed == DEFAULT_SEED and steps == DEFAULT_STEPS)


def figure_folder(out, default_run: bool) -> pathlib.Path:
    """``--out`` if given, else figures/ for the default run and figures/scratch/ for any other."""
    if out is not None:
        return pathlib.Path(out)
    return COMMITTED_FIGURES if default_run else SCRATCH_FIGURES


def _write_figures(result, folder: pathlib.Path, prefix: str) -> None:
    import matplotlib                    # here, not at the top: --no-figures never imports it
    matplotlib.use("Agg")
    from .plots import save_figures
    paths = save_figures(result, folder, prefix=prefix)
    if folder == SCRATCH_FIGURES:
        print(f"\nfigures written to {folder}/ (not to {COMMITTED_FIGURES}/: only the default run "
              f"`python -m lora_np` rewrites the committed figures):")
    else:
        print(f"\nfigures written to {folder}/:")
    print("  " + ", ".join(p.name for p in paths.values()))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    ranks = args.ranks or (QUICK_RANKS if args.quick else DEFAULT_RANKS)
    steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    settings = SweepSettings(steps=steps, seed=args.seed,
                             batch_size=64 if args.model == "attention" else 256)
    run = rank_sweep if args.model == "mlp" else attention_sweep
    t0 = time.perf_counter()
    try:
        result = run(ranks, true_rank=args.true_rank, seed=args.seed, settings=settings,
                     verbose=not args.quiet)
    except (ValueError, TypeError) as e:
        print(f"python -m lora_np: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    task = result.task
    print(task.describe())
    print(f"L₀ (pretrained model's validation loss on task B) = {result.initial_val_loss:.4e}; "
          f"noise floor = {task.noise_floor:.1e}; {settings.steps} Adam steps per run, "
          f"batch {settings.batch_size}, lr {settings.lr_full:g} (cosine)\n")
    print(format_table(result))
    claims = check_claims(result)
    print("\nClaims (each one asserted in tests/test_experiments.py):")
    print(format_claims(claims))
    print(f"\nsweep: {result.seconds:.1f} s")
    if not args.no_figures:
        default_run = is_default_run(args.model, ranks, args.true_rank, args.seed, steps)
        _write_figures(result, figure_folder(args.out, default_run),
                       prefix="" if args.model == "mlp" else "attention_")
    print(f"total: {time.perf_counter() - t0:.1f} s")
    failed = [c for c in claims if not c.holds]
    if failed:
        print(f"python -m lora_np: {len(failed)} of {len(claims)} claims failed (✗ above)", file=sys.stderr)
        return EXIT_CLAIM_FAILED
    return 0


if __name__ == "__main__":
    _restart_with_one_blas_thread()
    sys.exit(main())

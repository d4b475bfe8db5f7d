"""``python -m lora_np``: full fine-tuning vs LoRA at every rank, a table, the claims, the figures.

Two tasks. ``--task synthetic`` (the default) runs the rank sweep (``lora_np.experiments.rank_sweep``: an MLP whose fine-tuning task changes
fc1 by a rank-4 ΔW*; ``--model attention``: ``attention_sweep``), prints one table row per
method, checks the claims the task is designed to show (``experiments.check_claims``) and
draws the figures (``lora_np.plots.save_figures``). ``--task text`` fine-tunes the character model
pretrained on Jane Austen on the King James Bible (``lora_np.text_experiment``): full fine-tuning
vs LoRA at every rank and placement, each at its own learning rate chosen on validation data,
over several seeds; a table, the claims the measured results support, samples, and the
figures of ``lora_np.plots.text``. Exit status: 0 if every claim holds, 1 if one fails, 2 for a
bad option or argument.

Where the figures go. The committed ``figures/sweep_*.png`` are the output of the default run
(``python -m lora_np``, with or without ``--quiet``), and only that run rewrites them — bit for
bit, since the sweep is reproducible. Any other run (``--quick``, ``--ranks``, ``--seed``,
``--true-rank``, ``--model attention``) writes to ``figures/scratch/`` (ignored by git) unless
``--out`` names a folder, and says where it wrote. ``--no-figures`` writes nothing and never
imports matplotlib. The same holds for ``--task text``: only its default run (no ``--quick``,
``--ranks`` or ``--seed``) rewrites ``figures/text_*.png`` and ``figures/text_results.md``.

The command runs NumPy's BLAS with one thread (it re-starts itself with
``OPENBLAS_NUM_THREADS=1`` etc. unless you set one of those variables yourself): its matrices
are 64 wide, too small for threads to help, and threads that spin waiting for each other slow
the sweep down badly when another process shares the cores. ``--task text`` uses the cores by
running its fine-tuning runs in ``--workers`` processes instead (each with one BLAS thread; the
results do not depend on the number of workers).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from .machine import restart_with_one_blas_thread
from .experiments import (DEFAULT_RANKS, QUICK_RANKS, SweepSettings, attention_sweep, check_claims,
                          format_claims, format_table, rank_sweep)

TASKS = ("synthetic", "text")

DEFAULT_STEPS = SweepSettings().steps
QUICK_STEPS = 300
DEFAULT_TRUE_RANK = 4
DEFAULT_SEED = 0
#: the committed figures (written only by the default run) and where every other run writes
COMMITTED_FIGURES = pathlib.Path("figures")
SCRATCH_FIGURES = COMMITTED_FIGURES / "scratch"
#: exit status when a claim fails (argparse and bad arguments use 2)
EXIT_CLAIM_FAILED = 1
EXIT_BAD_ARGUMENT = 2


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
                    "rank r*, with full fine-tuning and with LoRA at every rank; print the results "
                    "table and the claims it shows (exit 1 if one fails), and write the figures. --task text "
                    "runs the same comparison on real text.")
    p.add_argument("--ranks", type=_ranks, default=None,
                   help=f"comma-separated LoRA ranks (default {','.join(map(str, DEFAULT_RANKS))}; "
                        f"--quick: {','.join(map(str, QUICK_RANKS))}); at most 64")
    p.add_argument("--true-rank", type=int, default=DEFAULT_TRUE_RANK,
                   help=f"rank r* of the true change ΔW* (default {DEFAULT_TRUE_RANK})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the task, the data and the training (default {DEFAULT_SEED})")
    p.add_argument("--out", default=None,
                   help=f"folder for the PNG figures (default: {COMMITTED_FIGURES}/ for the default "
                        f"run, whose figures are committed; {SCRATCH_FIGURES}/ for any other run)")
    p.add_argument("--no-figures", action="store_true", help="print the table only, write no figures")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer ranks and {QUICK_STEPS} instead of {DEFAULT_STEPS} steps per run (--task text: "
                        "40 steps, ranks 1 and 16, one placement, small evaluation slices)")
    p.add_argument("--model", choices=("mlp", "attention"), default="mlp",
                   help="mlp (default: ΔW* on fc1, LoRA on fc1) or attention (one multi-head attention "
                        "layer; ΔW* on q_proj and v_proj, LoRA on both); attention figures get the prefix "
                        "'attention_'")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.add_argument("--task", choices=TASKS, default="synthetic",
                   help="synthetic (default: the teacher-student task above) or text: the character "
                        "model pretrained on Jane Austen, fine-tuned on the King James Bible (full FT vs "
                        "LoRA at every rank and placement, lr chosen on validation, several seeds); writes figures/text_*.png and figures/text_results.md "
                        "(only the default text run; --ranks, --seed, --quick write to figures/scratch/)")
    p.add_argument("--workers", type=int, default=None,
                   help="--task text: processes the fine-tuning runs are spread over (default: 2, or 1 "
                        "on a one-core machine); the results do not depend on it")
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


# --------------------------------------------------------------------------- --task text

#: the results page the default text run writes beside its figures
TEXT_RESULTS = "text_results.md"


def _text_settings(args):
    """The TextSettings of these options: the defaults (or ``--quick``'s), with ``--ranks``
    (the headline, sample and similarity ranks kept to those in it), ``--seed`` (the seeds
    start there) and ``--workers``."""
    from dataclasses import replace

    from .text_experiment import QUICK_SETTINGS, TextSettings
    s = QUICK_SETTINGS if args.quick else TextSettings()
    if args.ranks is not None:
        ranks = tuple(sorted(set(args.ranks)))
        keep = lambda rs: tuple(r for r in rs if r in ranks)                      # noqa: E731
        similarity = keep(s.similarity_ranks) if len(keep(s.similarity_ranks)) == 2 else (ranks[0], ranks[-1])
        s = replace(s, ranks=ranks, headline_ranks=keep(s.headline_ranks), sample_ranks=keep(s.sample_ranks),
                    similarity_ranks=similarity)
    if args.seed != DEFAULT_SEED:
        s = replace(s, seeds=tuple(args.seed + i for i in range(len(s.seeds))))
    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    return replace(s, workers=workers)


def is_default_text_run(settings) -> bool:
    """Whether ``settings`` are the default text run's, the one that made the committed
    figures/text_*.png and figures/text_results.md (the number of workers does not matter)."""
    from dataclasses import replace

    from .text_experiment import TextSettings
    return replace(settings, workers=1) == replace(TextSettings(), workers=1)


def main_text(args, argv) -> int:
    """``--task text``: run the experiment, print its table, search, energy ranks, claims and
    samples, write its figures and results page; the exit status of ``main``."""
    if args.model != "mlp" or args.true_rank != DEFAULT_TRUE_RANK:
        print("python -m lora_np: error: --model and --true-rank belong to --task synthetic",
              file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    from . import text_experiment as te
    t0 = time.perf_counter()
    try:
        settings = _text_settings(args)
        result = te.run_text_experiment(settings, verbose=not args.quiet)
    except (ValueError, TypeError) as e:
        print(f"python -m lora_np: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    s, c = result.settings, result.config
    print(f"Character model pretrained on Austen ({result.base.num_parameters():,} parameters, "
          f"{c['n_layers']} blocks, d_model {c['d_model']}), fine-tuned on the King James Bible: "
          f"{s.steps} Adam steps of {s.batch_size} × {c['context']} characters per run, the same batches "
          f"for every method; lr per method chosen on KJV validation (seed {result.fair.selection_seed}); "
          f"held-out losses in nats/char, mean (min–max) over seeds\n")
    print(te.format_text_table(result))
    print()
    print(te.format_grid(result.fair))
    ranks = result.energy_ranks()
    print("\nfull FT's ΔW, 90 % energy rank per layer (a random matrix of the same shape and norm): "
          + ", ".join(f"{p.removeprefix('blocks.')} {k} ({kr})" for p, (_, k, _, kr) in ranks.items()))
    claims = te.check_text_claims(result)
    print("\nClaims (each one checked on the numbers above):")
    print(te.format_claims(claims))
    print("\nSamples, " + te.format_samples(result))
    print(f"\nexperiment: {result.seconds:.1f} s ({s.workers} worker processes)")
    if not args.no_figures:
        default_run = is_default_text_run(settings)      # the run asked for
        folder = figure_folder(args.out, default_run)
        import matplotlib                    # here, not at the top: --no-figures never imports it
        matplotlib.use("Agg")
        from .plots import save_text_figures
        paths = save_text_figures(result, folder)
        command = "python -m lora_np " + " ".join(sys.argv[1:] if argv is None else argv)
        md = folder / TEXT_RESULTS
        md.write_text(te.results_markdown(result, claims, command.strip()), encoding="utf-8")
        if folder == SCRATCH_FIGURES:
            print(f"\nfigures and results written to {folder}/ (not to {COMMITTED_FIGURES}/: only the "
                  f"default run `python -m lora_np --task text` rewrites the committed ones):")
        else:
            print(f"\nfigures and results written to {folder}/:")
        print("  " + ", ".join([p.name for p in paths.values()] + [md.name]))
    return _finish(claims, t0)


def _finish(claims, t0) -> int:
    """Print the total time; the exit status: 1 (and how many failed, on stderr) if any claim
    failed, else 0."""
    print(f"total: {time.perf_counter() - t0:.1f} s")
    failed = [c for c in claims if not c.holds]
    if failed:
        print(f"python -m lora_np: {len(failed)} of {len(claims)} claims failed (✗ above)", file=sys.stderr)
        return EXIT_CLAIM_FAILED
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.task == "text":
        return main_text(args, argv)
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
    return _finish(claims, t0)


if __name__ == "__main__":
    restart_with_one_blas_thread("lora_np")
    sys.exit(main())

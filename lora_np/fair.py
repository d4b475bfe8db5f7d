"""The fair comparison of fine-tuning methods: each method at its own best learning rate, chosen
on validation data only, then repeated over seeds, reported as mean and range on held-out data.

Comparing full fine-tuning with LoRA at one shared learning rate favours whichever method that
rate happens to suit (full FT wants a smaller step than LoRA, whose update is ``s·B A`` with
B starting at zero). The protocol here is the usual remedy:

1. **Learning rate on validation.** For every method, train once per learning rate of its grid
   with the *first* seed and keep the rate with the lowest *validation* metric. The held-out
   (test) metrics of those grid runs are recorded, so a table can show them, but never read
   while choosing.
2. **Seeds at the chosen rate.** Train every further seed at that rate (the first seed's run is
   the grid run itself: the same lr and seed give the same run bit for bit).
3. **Mean and range.** Report each held-out metric as its mean and (min, max) over the seeds.

What makes it a comparison of methods and not of luck: every method is called with the same
seeds, and a method function draws its mini-batch order from ``batch_rng(seed)`` and the random
part of its initialisation (LoRA's A) from ``init_rng(seed)`` — so for a given seed every
method sees the same batches in the same order, for the same number of steps. This module
cannot see inside a method function; the convention is what the functions of
``lora_np.text_experiment`` (and the tests) follow.

A method function is ``fn(lr, seed) -> Run``. A run whose training diverges
(``lora_np.train.TrainingDiverged``) is recorded as diverged with an infinite validation
metric, so a learning rate that is too large simply loses the selection; a method for which
every rate diverges is an error.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from .train import TrainingDiverged
from .validate import check_int, check_number

__all__ = ["Run", "Spread", "MethodOutcome", "FairResult", "compare", "batch_rng", "init_rng",
           "spread", "format_spread", "format_grid"]


def batch_rng(seed: int) -> np.random.Generator:
    """The mini-batch order of ``seed``: ``default_rng([seed, 1])``, the same for every method
    (and the same stream ``lora_np.experiments`` uses for its batches)."""
    return np.random.default_rng([check_int("seed", seed, minimum=0), 1])


def init_rng(seed: int, *key: int) -> np.random.Generator:
    """The random initialisation of ``seed`` (LoRA's A): ``default_rng([seed, 2, *key])``;
    ``key`` (e.g. the rank) gives two adapters of one run independent draws."""
    return np.random.default_rng([check_int("seed", seed, minimum=0), 2,
                                  *(check_int("key", k, minimum=0) for k in key)])


@dataclass
class Run:
    """What one training run of one method, at one learning rate and seed, measured.

    validation : float
        The metric the learning rate is chosen on (lower is better), measured on the
        validation split — never on the held-out test data.
    held_out : dict str -> float
        The metrics reported (held-out test splits, forgetting, …); lower or higher, the
        protocol only averages them.
    details : anything
        What else the method wants to keep (the trained adapter, curves, timings).
    diverged : bool
        Training stopped with a non-finite loss (then ``validation`` is inf).
    seconds : float
        Wall time of the call (filled in by ``compare``).
    """
    validation: float
    held_out: dict = field(default_factory=dict)
    details: Any = None
    diverged: bool = False
    seconds: float = 0.0


class Spread(NamedTuple):
    """Mean and range of one metric over seeds: ``mean``, ``low`` = min, ``high`` = max, ``n``
    = number of seeds (range 0 when n = 1)."""
    mean: float
    low: float
    high: float
    n: int


def spread(values) -> Spread:
    """``Spread`` of a non-empty sequence of numbers (inf stays inf: a diverged seed shows)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"spread needs a non-empty 1-D sequence of numbers, got shape {v.shape}")
    with np.errstate(invalid="ignore"):
        mean = float(v.mean())
    return Spread(mean, float(v.min()), float(v.max()), int(v.size))


def format_spread(s: Spread, fmt: str = ".3f") -> str:
    """``"1.423 (1.418–1.430)"`` — the mean and, over several seeds, the range."""
    if s.n == 1:
        return f"{s.mean:{fmt}}"
    return f"{s.mean:{fmt}} ({s.low:{fmt}}–{s.high:{fmt}})"


@dataclass
class MethodOutcome:
    """One method under the protocol.

    name : the method's name;  lr : the learning rate chosen on validation;
    grid : dict lr -> Run, the first seed at every rate of the grid (in grid order);
    runs : list of Run, one per seed at ``lr`` (``runs[0] is grid[lr]``);  seeds : tuple.
    """
    name: str
    lr: float
    grid: dict
    runs: list
    seeds: tuple

    @property
    def best(self) -> Run:
        """The first seed's run at the chosen rate."""
        return self.runs[0]

    def spread(self, key: str) -> Spread:
        """Mean and range of held-out metric ``key`` over the seeds (``"validation"`` for the
        validation metric)."""
        if key == "validation":
            return spread(r.validation for r in self.runs)
        missing = [s for s, r in zip(self.seeds, self.runs) if key not in r.held_out]
        if missing:
            raise KeyError(f"held-out metric {key!r} is not in the runs of seeds {missing} of "
                           f"{self.name!r}; it has {sorted(self.best.held_out)}")
        return spread(r.held_out[key] for r in self.runs)

    @property
    def summary(self) -> dict:
        """Every held-out metric of the first seed's run -> its ``Spread`` over the seeds."""
        return {key: self.spread(key) for key in self.best.held_out}


@dataclass
class FairResult:
    """Every method's ``MethodOutcome``, in the order given, and the seeds of the protocol
    (``selection_seed`` chose the learning rates)."""
    outcomes: dict
    selection_seed: int
    seconds: float = 0.0

    def __getitem__(self, name: str) -> MethodOutcome:
        return self.outcomes[name]

    def __iter__(self):
        return iter(self.outcomes.values())

    def __len__(self):
        return len(self.outcomes)

    @property
    def names(self) -> list:
        return list(self.outcomes)


# --------------------------------------------------------------------------- the protocol


def _per_method(what: str, value, names, check) -> dict:
    """``value`` for every method: a dict name -> sequence (every name present, no others), or
    one sequence shared by all; each sequence checked by ``check``."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value]
        if unknown or missing:
            raise ValueError(f"{what} must give every method (missing {missing}) and no other "
                             f"(unknown {unknown})")
        return {n: check(f"{what}[{n!r}]", value[n]) for n in names}
    shared = check(what, value)
    return {n: shared for n in names}


def _check_lrs(name: str, lrs) -> tuple:
    if isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__iter__"):
        raise TypeError(f"{name} must be a sequence of learning rates, got {lrs!r}")
    lrs = tuple(check_number(f"{name}[{i}]", lr, positive=True) for i, lr in enumerate(lrs))
    if not lrs:
        raise ValueError(f"{name} must hold at least one learning rate")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"{name} must hold distinct learning rates, got {lrs}")
    return lrs


def _check_seeds(name: str, seeds) -> tuple:
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"{name} must be a sequence of int seeds, got {seeds!r}")
    seeds = tuple(check_int(f"{name}[{i}]", s, minimum=0) for i, s in enumerate(seeds))
    if not seeds:
        raise ValueError(f"{name} must hold at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{name} must hold distinct seeds, got {seeds}")
    return seeds


def _call(name: str, fn: Callable, lr: float, seed: int) -> Run:
    """``fn(lr, seed)`` as a Run (a divergence becomes a diverged Run), timed."""
    t0 = time.perf_counter()
    try:
        run = fn(lr, seed)
    except TrainingDiverged as e:
        run = Run(validation=math.inf, diverged=True, details=str(e))
    if not isinstance(run, Run):
        raise TypeError(f"method {name!r} must return a lora_np.fair.Run, got {type(run).__name__}")
    run.seconds = time.perf_counter() - t0
    return run


#: the methods of the ``compare`` call in progress, for its worker processes: they are forked
#: from this process and find the functions here (closures cannot be sent to a process)
_WORKER_METHODS: dict = {}


def _call_in_worker(name: str, lr: float, seed: int) -> Run:
    return _call(name, _WORKER_METHODS[name], lr, seed)


class _Runner:
    """Runs a batch of independent calls (name, lr, seed), in this process or in ``workers``
    forked processes, and reports each finished run (with a count and a time estimate) on
    stderr when ``verbose``."""

    def __init__(self, methods: dict, workers: int, total: int, verbose: bool):
        self.methods, self.workers, self.total, self.verbose = methods, workers, total, verbose
        self.done, self.t0, self.pool = 0, time.perf_counter(), None

    def __enter__(self):
        if self.workers > 1:
            import concurrent.futures
            import multiprocessing
            _WORKER_METHODS.clear()
            _WORKER_METHODS.update(self.methods)
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("fork"))
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            _WORKER_METHODS.clear()

    def run(self, calls: list) -> list:
        """The Runs of ``calls`` [(name, lr, seed), …], in the order given."""
        if self.pool is None:
            return [self._report(c, _call(c[0], self.methods[c[0]], c[1], c[2])) for c in calls]
        import concurrent.futures
        futures = {self.pool.submit(_call_in_worker, *c): i for i, c in enumerate(calls)}
        out = [None] * len(calls)
        for f in concurrent.futures.as_completed(futures):
            i = futures[f]
            out[i] = self._report(calls[i], f.result())
        return out

    def _report(self, call, run: Run) -> Run:
        self.done += 1
        if self.verbose:
            name, lr, seed = call
            elapsed = time.perf_counter() - self.t0
            left = elapsed / self.done * (self.total - self.done)
            what = "diverged" if run.diverged else f"validation {run.validation:.4f}"
            print(f"fair [{self.done}/{self.total}, {_clock(elapsed)} elapsed, ~{_clock(left)} left]: "
                  f"{name}: lr {lr:.3g}, seed {seed}: {what} ({run.seconds:.1f} s)",
                  file=sys.stderr, flush=True)
        return run


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def compare(methods: dict, lrs, seeds, *, workers: int = 1, verbose: bool = False) -> FairResult:
    """Run the protocol (see the module docstring) on ``methods``.

    Parameters
    ----------
    methods : dict name -> fn(lr, seed) -> Run
        The methods, in the order they should be reported. Each function trains a fresh model
        (batches from ``batch_rng(seed)``, random init from ``init_rng(seed, …)``) and
        measures it.
    lrs : sequence of float, or dict name -> sequence of float
        The learning-rate grid, shared or per method (one rate: no search).
    seeds : sequence of int, or dict name -> sequence of int
        The seeds, shared or per method (e.g. three seeds for a headline table, one for the
        rest). Every method's first seed must be the same: it is the seed the learning rates
        are chosen with, so that every grid run of every method sees the same batches.
    workers : int
        Processes that run the calls: 1 runs them here, one after the other; more fork that
        many worker processes (Linux, macOS), which first run every grid call, then every
        further seed. Each run is the same as in this process (the same seed gives the same
        batches and init), so the results do not depend on ``workers``; their wall times do.
    verbose : bool
        One line per finished run on stderr (how many of how many, time elapsed and an
        estimate of the time left, the method, lr, seed, validation metric and seconds).

    Returns
    -------
    FairResult

    Raises
    ------
    TypeError, ValueError
        Bad arguments (checked before anything runs); a method for which every learning rate
        of its grid diverged.
    """
    if not isinstance(methods, dict) or not methods:
        raise TypeError(f"methods must be a non-empty dict name -> fn(lr, seed), got {methods!r}")
    for name, fn in methods.items():
        if not isinstance(name, str) or not callable(fn):
            raise TypeError(f"methods must map names (str) to functions fn(lr, seed) -> Run; got "
                            f"{name!r} -> {fn!r}")
    workers = check_int("workers", workers, minimum=1)
    names = list(methods)
    grids = _per_method("lrs", lrs, names, _check_lrs)
    seed_lists = _per_method("seeds", seeds, names, _check_seeds)
    firsts = {n: s[0] for n, s in seed_lists.items()}
    if len(set(firsts.values())) != 1:
        raise ValueError(f"every method's first seed must be the same (it chooses the learning "
                         f"rates on the same batches), got {firsts}")
    t0 = time.perf_counter()
    first = next(iter(firsts.values()))
    grid_calls = [(n, lr, first) for n in names for lr in grids[n]]
    total = len(grid_calls) + sum(len(s) - 1 for s in seed_lists.values())
    with _Runner(methods, workers, total, verbose) as runner:
        grid_runs = dict(zip(grid_calls, runner.run(grid_calls)))
        chosen = {}
        for name in names:
            finite = {lr: grid_runs[name, lr, first].validation for lr in grids[name]
                      if not grid_runs[name, lr, first].diverged
                      and math.isfinite(grid_runs[name, lr, first].validation)}
            if not finite:
                raise ValueError(f"method {name!r} diverged at every learning rate of its grid "
                                 f"{grids[name]}; try smaller rates")
            chosen[name] = min(finite, key=finite.get)        # first of equals: grid order
        seed_calls = [(n, chosen[n], s) for n in names for s in seed_lists[n][1:]]
        seed_runs = dict(zip(seed_calls, runner.run(seed_calls)))
    outcomes = {}
    for name in names:
        best = chosen[name]
        grid = {lr: grid_runs[name, lr, first] for lr in grids[name]}
        runs = [grid[best]] + [seed_runs[name, best, s] for s in seed_lists[name][1:]]
        keys = grid[best].held_out
        for r in runs:                                      # a diverged seed shows as inf
            if r.diverged and not r.held_out:
                r.held_out = {k: math.inf for k in keys}
        outcomes[name] = MethodOutcome(name, best, grid, runs, seed_lists[name])
    return FairResult(outcomes, first, time.perf_counter() - t0)


# --------------------------------------------------------------------------- reporting


def format_grid(result: FairResult, fmt: str = ".4f") -> str:
    """The learning-rate search as text: one line per method, the validation metric at every
    rate of its grid (first seed), the chosen one marked ``*``, a diverged one ``diverged``; a
    choice at the end of a grid of several rates is flagged, since a rate beyond it might have
    been better still."""
    if not isinstance(result, FairResult):
        raise TypeError(f"result must be a FairResult, got {type(result).__name__}")
    width = max(len(n) for n in result.names)
    lines = [f"{'method':<{width}}  validation metric at each lr (seed {result.selection_seed}; "
             f"* = chosen)"]
    for o in result:
        cells = []
        for lr, r in o.grid.items():
            value = "diverged" if r.diverged else f"{r.validation:{fmt}}"
            cells.append(f"{lr:.0e}: {value}{'*' if lr == o.lr else ' '}")
        edge = ""
        if len(o.grid) > 1 and o.lr in (min(o.grid), max(o.grid)):
            edge = f"  (the {'largest' if o.lr == max(o.grid) else 'smallest'} rate of the grid)"
        lines.append(f"{o.name:<{width}}  " + "  ".join(cells) + edge)
    return "\n".join(lines)

"""Experiments for the LoRA variants: rsLoRA, LoRA+, PiSSA and DoRA (notebook 07).

Each experiment trains small adapters with the library's own modules, optimizers and training
loop (``lora_np.train``) and returns a plain result object (a frozen dataclass of NumPy arrays
and numbers); ``lora_np.plots`` draws them. Everything is seeded, so every number is
reproducible bit for bit.

The task is a teacher–student linear regression with a known answer, small enough that a whole
notebook of sweeps stays quick:

    X (N, d_in) ~ N(0, I),   Y = X (W₀ + ΔW*)ᵀ,   student = W₀ frozen + a rank-r adapter

W₀ has a decaying spectrum σ_k = 2 k^(−decay) (as pretrained weights do), and the shift ΔW* is
random (``shift="random"``), lies along W₀'s top singular directions (``shift="principal"``) or
rescales W₀'s rows (``shift="rescale"``). Besides the training rows the task holds a validation
split (learning rates are chosen on it) and a test split (what is reported), drawn from the
same distribution. ``RegressionTask.loss_floor`` gives the best training loss any rank-r update
could reach, so a plateau can be told apart from slow learning.

Comparisons follow ``lora_np.fair``: every method gets its own learning rate, chosen from a
grid on the validation split with the first seed, then is rerun with further seeds; a seed
draws the whole task (W₀, ΔW*, the three splits) and LoRA's A (``fair.init_rng(seed, r)``), and
every method of a comparison sees the same task for a given seed. Training is full-batch Adam at
a constant learning rate, so "the same batches" holds trivially.

Experiments (papers cited where the claim comes from):

* ``first_update_size``   — rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): one SGD step from
  B = 0 changes the output by ``η s² ‖A x‖² ‖g‖`` = Θ(s² r): Θ(1/r) for s = α/r, Θ(1) for s = α/√r.
* ``rank_scaling_sweep``  — the learning-rate grid at every rank under both scalings: where each
  rank's best learning rate sits, and what keeping one rank's rate at another rank costs.
* ``loraplus_compare``    — LoRA+ (Hayou et al. 2024, arXiv 2402.12354): λ = lr_B / lr_A, each λ
  at its own best lr_A.
* ``pissa_compare``       — PiSSA (Meng et al. 2024, arXiv 2404.02948) vs the B = 0 init, each at
  its own best learning rate, on a principal and on a random shift.
* ``dora_compare``        — full fine-tuning, LoRA and DoRA (exact and detached-norm gradient),
  Liu et al. 2024, arXiv 2402.09353, each at its own best learning rate; ``weight_decomposition``
  is the paper's magnitude/direction analysis (§2.2) of the checkpoints of those runs, and
  ``dora_trace`` follows the exact and the detached gradient along one DoRA run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from . import functional as F
from .analysis import tail_energy
from .fair import FairResult, Run, compare, init_rng, spread
from .lora import INIT_SCHEMES, DoRALinear, LoRALinear, lora_scale
from .modules import Linear
from .optim import SGD, Adam, loraplus_multipliers
from .tasks import random_orthonormal
from .train import TrainingDiverged, evaluate, train, train_step
from .validate import check_bool, check_choice, check_int, check_number

__all__ = ["RegressionTask", "make_task", "fit_adapter", "AdapterSpec", "Fit", "fit", "KINDS",
           "fair_compare", "Comparison", "FirstUpdateResult", "first_update_size",
           "RankScalingResult", "rank_scaling_sweep", "loraplus_compare", "pissa_compare",
           "dora_compare", "weight_decomposition", "decomposition_slope", "DoRATrace",
           "dora_trace", "applied_weight", "SCALINGS",
           "LR_GRID", "RANK_LR_GRID"]

#: the two scalings compared by the rsLoRA experiments: label -> rslora flag
SCALINGS = {"α/r": False, "α/√r": True}

#: the default learning-rate grid of the comparisons: 1, 2, 5 per decade, from 1e-3 to 0.5
LR_GRID = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1)

#: the finer grid of the rsLoRA sweep, where the best rate itself is the result:
#: 0.01 · 2^(k/2), k = 0 … 10 (0.01 to 0.32, steps of √2)
RANK_LR_GRID = tuple(0.01 * 2.0 ** (k / 2) for k in range(11))

#: what a method of a comparison trains
KINDS = ("lora", "dora", "full")


# ------------------------------------------------------------------------------ task


@dataclass(frozen=True)
class RegressionTask:
    """Teacher–student regression ``Y = X (W₀ + ΔW*)ᵀ``.

    X : (N, d_in);  Y : (N, d_out);  W0 : (d_out, d_in) the frozen base;  dW : (d_out, d_in) ΔW*.
    X_val, Y_val : (N_val, ·) the validation split (learning rates are chosen on it);
    X_test, Y_test : (N_test, ·) the test split (what is reported). None for a task built
    without them. There is no label noise: a held-out loss differs from the training loss only
    because the rows are other draws of X.
    """
    X: np.ndarray
    Y: np.ndarray
    W0: np.ndarray
    dW: np.ndarray
    X_val: np.ndarray | None = None
    Y_val: np.ndarray | None = None
    X_test: np.ndarray | None = None
    Y_test: np.ndarray | None = None

    def split(self, name: str) -> tuple:
        """``(X, Y)`` of ``"train"``, ``"val"`` or ``"test"`` (ValueError if the task has none)."""
        check_choice("split", name, ("train", "val", "test"))
        x, y = {"train": (self.X, self.Y), "val": (self.X_val, self.Y_val),
                "test": (self.X_test, self.Y_test)}[name]
        if x is None or y is None:
            raise ValueError(f"this task has no {name!r} split; build it with make_task")
        return x, y

    def loss_floor(self, W_frozen: np.ndarray, r: int) -> float:
        """Smallest training MSE of ``X (W_frozen + D)ᵀ`` over all D of rank ≤ r.

        With ``M = W₀ + ΔW* − W_frozen`` and ``C = XᵀX / N``, the MSE of D is
        ``tr((M − D) C (M − D)ᵀ) / d_out``; substituting ``D = E C^(−1/2)`` makes it a plain
        Frobenius distance, so by Eckart–Young (``analysis.tail_energy``) the minimum is
        ``Σ_{k>r} σ_k(M C^(1/2))² / d_out``.
        """
        M = self.W0 + self.dW - W_frozen
        C = self.X.T @ self.X / self.X.shape[0]     # (d_in, d_in), positive definite for N ≥ d_in
        evals, Q = np.linalg.eigh(C)
        C_half = (Q * np.sqrt(np.clip(evals, 0.0, None))) @ Q.T
        sigma = np.linalg.svd(M @ C_half, compute_uv=False)
        return float(tail_energy(sigma)[r] / M.shape[0])


def make_task(d=32, n=128, shift_rank=None, shift="random", shift_scale=1.0, decay=0.5, seed=0,
              n_val=None, n_test=None):
    """A ``RegressionTask`` with d_in = d_out = d, n training rows and n_val validation and
    n_test test rows (None: n each).

    W₀ = U diag(σ) Vᵀ with σ_k = 2 k^(−decay).  ΔW* = shift_scale · P diag(k^(−1/2)) Qᵀ with
    (shift_rank = None means d: a full-rank shift)
    orthonormal P (d, shift_rank), Q (d, shift_rank): random for ``shift="random"``,
    P = W₀'s top ``shift_rank`` left singular vectors for ``shift="principal"`` (and then σ_k
    weights the shift too: the task re-weights what W₀ already does most).
    ``shift="rescale"``: ΔW* = diag(δ) W₀ with δ_i ~ N(0, shift_scale²) — every output row of
    W₀ rescaled, a full-rank change (shift_rank is ignored) that DoRA's magnitude m fits exactly.
    The held-out rows are drawn after the training rows, so W₀, ΔW*, X and Y do not depend on
    n_val and n_test.
    """
    check_choice("shift", shift, ("random", "principal", "rescale"))
    d = check_int("d", d, minimum=1)
    n = check_int("n", n, minimum=1)
    n_val = n if n_val is None else check_int("n_val", n_val, minimum=1)
    n_test = n if n_test is None else check_int("n_test", n_test, minimum=1)
    shift_rank = check_int("shift_rank", d if shift_rank is None else shift_rank, 1, d)
    shift_scale = check_number("shift_scale", shift_scale, nonnegative=True)
    decay = check_number("decay", decay, nonnegative=True)
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    U, V = random_orthonormal(rng, d, d), random_orthonormal(rng, d, d)
    sigma = 2.0 * np.arange(1, d + 1) ** -float(decay)
    W0 = (U * sigma) @ V.T                                  # (d, d)
    k = np.arange(1, shift_rank + 1)
    if shift == "rescale":
        dW = (shift_scale * rng.standard_normal(d))[:, None] * W0
    else:
        if shift == "principal":
            P, weights = U[:, :shift_rank], sigma[:shift_rank]
        else:
            P, weights = random_orthonormal(rng, d, shift_rank), k ** -0.5
        dW = shift_scale * (P * weights) @ random_orthonormal(rng, d, shift_rank).T
    W = W0 + dW
    X = rng.standard_normal((n, d))
    X_val, X_test = rng.standard_normal((n_val, d)), rng.standard_normal((n_test, d))
    return RegressionTask(X=X, Y=X @ W.T, W0=W0, dW=dW, X_val=X_val, Y_val=X_val @ W.T,
                          X_test=X_test, Y_test=X_test @ W.T)


# ------------------------------------------------------------------------- training


@dataclass(frozen=True)
class AdapterSpec:
    """What one method trains on a task's W₀.

    kind : ``"lora"`` (``LoRALinear``), ``"dora"`` (``DoRALinear``) or ``"full"`` (full
        fine-tuning: every entry of a copy of W₀ trains; r, alpha, rslora, init, detach_norm and
        lr_ratio do not apply and must stay at their defaults);
    r, alpha, rslora, init : the adapter's (``LoRALinear``);  detach_norm : DoRA's cheaper
        gradient;  lr_ratio : LoRA+'s λ (B's learning rate is λ times A's).
    """
    kind: str = "lora"
    r: int = 4
    alpha: float = 4.0
    rslora: bool = False
    init: str = "kaiming"
    detach_norm: bool = False
    lr_ratio: float = 1.0

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        check_int("r", self.r, minimum=1)
        check_number("alpha", self.alpha, positive=True)
        check_bool("rslora", self.rslora)
        check_choice("init", self.init, INIT_SCHEMES)
        check_bool("detach_norm", self.detach_norm)
        check_number("lr_ratio", self.lr_ratio, positive=True)
        if self.detach_norm and self.kind != "dora":
            raise ValueError(f"detach_norm applies to kind 'dora' only, got kind {self.kind!r}")
        if self.kind == "full":
            extra = {k: getattr(self, k) for k, v in _ADAPTER_DEFAULTS.items() if getattr(self, k) != v}
            if extra:
                raise ValueError(f"kind 'full' trains W itself; adapter settings do not apply, got {extra}")

    def build(self, W0: np.ndarray, rng=1):
        """A fresh layer on a copy-free frozen ``W0`` (d_out, d_in); ``rng`` draws LoRA's A."""
        d_out, d_in = W0.shape
        base = Linear(d_in, d_out, bias=False)
        base.W[...] = W0
        if self.kind == "full":
            return base                                     # W trains: full fine-tuning
        kw = dict(rslora=self.rslora, init=self.init, rng=rng)
        if self.kind == "dora":
            return DoRALinear(base, self.r, self.alpha, detach_norm=self.detach_norm, **kw)
        return LoRALinear(base, self.r, self.alpha, **kw)


#: every setting but ``kind`` at its default: what ``kind="full"`` must leave alone
_ADAPTER_DEFAULTS = {f.name: f.default for f in fields(AdapterSpec) if f.name != "kind"}


def applied_weight(layer) -> np.ndarray:
    """(d_out, d_in) the weight ``layer`` applies: W (full, or a merged adapter), W + s B A
    (LoRA, PiSSA's residual included) or DoRA's ``diag(m/n)(W + s B A)``."""
    if isinstance(layer, DoRALinear):
        return layer.effective_weight()
    if isinstance(layer, LoRALinear) and not layer.merged:
        return layer.W + layer.delta_weight()
    return layer.W.copy()


@dataclass(frozen=True)
class Fit:
    """One training run of ``fit``.

    train_loss : (steps + 1,) training MSE before each step and after the last one (NaN from the
        first non-finite one on, if the run diverged);
    steps : (K,) int, the checkpoints (0 first, the last step last);
    val, test : (K,) the validation and test MSE at each checkpoint (NaN after a divergence);
    weights : (K, d_out, d_in) the weight the layer applies at each checkpoint;
    diverged : bool;  layer : the trained layer.
    """
    train_loss: np.ndarray
    steps: np.ndarray
    val: np.ndarray
    test: np.ndarray
    weights: np.ndarray
    diverged: bool
    layer: object = field(default=None, repr=False, compare=False)

    def at(self, split: str, step: int) -> float:
        """The ``"train"``, ``"val"`` or ``"test"`` MSE after ``step`` steps (a checkpoint, or
        any step for ``"train"``)."""
        check_choice("split", split, ("train", "val", "test"))
        step = check_int("step", step, minimum=0, maximum=len(self.train_loss) - 1)
        if split == "train":
            return float(self.train_loss[step])
        where = np.flatnonzero(self.steps == step)
        if where.size == 0:
            raise ValueError(f"step {step} is not a checkpoint of this run; checkpoints "
                             f"{self.steps.tolist()}")
        return float(getattr(self, split)[where[0]])


def _checkpoints(steps: int, checkpoints) -> list:
    """The sorted checkpoints 0 < c ≤ steps, with ``steps`` always among them."""
    if isinstance(checkpoints, (str, bytes)) or not hasattr(checkpoints, "__iter__"):
        raise TypeError(f"checkpoints must be a sequence of steps, got {checkpoints!r}")
    marks = {check_int(f"checkpoints[{i}]", c, minimum=1, maximum=steps) for i, c in enumerate(checkpoints)}
    return sorted(marks | {steps})


def fit(task: RegressionTask, spec: AdapterSpec, steps: int, lr: float, *, rng=1,
        checkpoints=()) -> Fit:
    """Train ``spec`` on ``task`` with ``train`` (full batch, Adam at a constant ``lr``, B's rate
    λ·lr for LoRA+) and measure it at step 0, at every step of ``checkpoints`` and after the
    last step: validation and test MSE, and the weight the layer applies.

    ``rng`` (a Generator or an int seed) draws LoRA's A; runs that differ only in another
    setting start from the same A. Training runs in segments between the checkpoints with one
    optimizer, so the run is the same one ``train`` makes in a single call (full batch,
    constant rate). A run that diverges keeps what it reached and NaN from there on.
    """
    if not isinstance(task, RegressionTask):
        raise TypeError(f"task must be a RegressionTask (make_task), got {type(task).__name__}")
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec must be an AdapterSpec, got {type(spec).__name__}")
    steps = check_int("steps", steps, minimum=1)
    lr = check_number("lr", lr, positive=True)
    marks = _checkpoints(steps, checkpoints)
    splits = {name: task.split(name) for name in ("train", "val", "test")}
    layer = spec.build(task.W0, rng)
    multipliers = None if spec.kind == "full" else loraplus_multipliers(spec.lr_ratio)
    opt = Adam(layer, lr, lr_multipliers=multipliers)
    K = len(marks) + 1
    losses = np.full(steps + 1, np.nan)
    val, test = np.full(K, np.nan), np.full(K, np.nan)
    weights = np.full((K,) + task.W0.shape, np.nan)

    def measure(k):
        with np.errstate(over="ignore", invalid="ignore"):
            val[k] = evaluate(layer, *splits["val"])
            test[k] = evaluate(layer, *splits["test"])
            weights[k] = applied_weight(layer)

    measure(0)
    done, diverged = 0, False
    x, y = splits["train"]
    for k, mark in enumerate(marks, start=1):
        try:
            history = train(layer, x, y, steps=mark - done, optimizer=opt, batch_size=None,
                            schedule="constant")
        except TrainingDiverged as stop:
            recorded = stop.history.loss_history
            losses[done:done + len(recorded)] = recorded
            diverged = True
            break
        losses[done:mark] = history.loss_history
        done = mark
        measure(k)
    if not diverged:
        with np.errstate(over="ignore", invalid="ignore"):
            losses[steps] = evaluate(layer, x, y)
        diverged = not (np.all(np.isfinite(val)) and np.all(np.isfinite(test))
                        and math.isfinite(losses[steps]))
    return Fit(train_loss=losses, steps=np.array([0] + marks), val=val, test=test, weights=weights,
               diverged=bool(diverged), layer=layer)


def fit_adapter(task, r, alpha, steps, lr, *, rslora=False, init="kaiming", use_dora=False,
                detach_norm=False, lr_ratio=1.0):
    """Train one adapter on ``task`` with ``train`` (full batch, Adam at a constant ``lr``);
    return ``(losses, layer)``.

    losses : (steps + 1,) training MSE before each step and after the last one. ``lr_ratio``
    is LoRA+'s λ (B's learning rate is λ·lr). A is drawn from seed 1 in every run, so runs that
    differ in one setting start from the same A. A run that diverges keeps the losses it
    reached and NaN from the first non-finite one on. (``fit`` is the same run, with held-out
    losses and checkpoints.)
    """
    spec = AdapterSpec("dora" if use_dora else "lora", r, alpha, rslora, init, detach_norm, lr_ratio)
    result = fit(task, spec, steps, lr, rng=1)
    return result.train_loss, result.layer


# ------------------------------------------------------------------- fair comparisons


def _method(task_kwargs: dict, spec: AdapterSpec, steps: int, select_step: int, report_steps,
            checkpoints):
    """The ``fair`` method function of ``spec``: ``run(lr, seed)`` builds the task of ``seed``,
    fits ``spec`` with A from ``fair.init_rng(seed, r)`` and returns a ``fair.Run`` whose
    validation metric is the validation MSE after ``select_step`` steps and whose held-out
    metrics are ``"test@k"`` (test MSE) and ``"train@k"`` for every k of ``report_steps``."""
    marks = sorted(set(checkpoints) | {select_step, *report_steps})

    def run(lr, seed):
        task = make_task(**task_kwargs, seed=seed)
        result = fit(task, spec, steps, lr, rng=init_rng(seed, spec.r), checkpoints=marks)
        held_out = {}
        for k in report_steps:
            held_out[f"test@{k}"] = math.inf if result.diverged else result.at("test", k)
            held_out[f"train@{k}"] = math.inf if result.diverged else result.at("train", k)
        validation = math.inf if result.diverged else result.at("val", select_step)
        return Run(validation=validation, held_out=held_out, details=result, diverged=result.diverged)
    return run


def fair_compare(specs: dict, task_kwargs: dict, lrs, seeds=(0, 1, 2), *, steps: int,
                 select_step: int | None = None, report_steps=None, checkpoints=(),
                 workers: int = 1) -> FairResult:
    """``fair.compare`` of the adapters ``specs`` (name -> AdapterSpec) on ``make_task(**task_kwargs,
    seed=seed)``: each learning rate of ``lrs`` (shared, or name -> grid) with the first seed,
    the one with the lowest validation MSE after ``select_step`` steps (default ``steps``) kept,
    then every further seed at it. Held-out metrics ``"test@k"`` and ``"train@k"`` for every k of
    ``report_steps`` (default ``(select_step,)``); ``Run.details`` is the ``Fit``."""
    if not isinstance(specs, dict) or not specs:
        raise TypeError(f"specs must be a non-empty dict name -> AdapterSpec, got {specs!r}")
    for name, spec in specs.items():
        if not isinstance(spec, AdapterSpec):
            raise TypeError(f"specs[{name!r}] must be an AdapterSpec, got {type(spec).__name__}")
    if not isinstance(task_kwargs, dict) or "seed" in task_kwargs:
        raise TypeError(f"task_kwargs must be a dict of make_task arguments without 'seed' (the "
                        f"seeds come from the protocol), got {task_kwargs!r}")
    steps = check_int("steps", steps, minimum=1)
    select_step = steps if select_step is None else check_int("select_step", select_step, 1, steps)
    report_steps = (select_step,) if report_steps is None else tuple(report_steps)
    report_steps = tuple(check_int(f"report_steps[{i}]", k, 1, steps) for i, k in enumerate(report_steps))
    if not report_steps:
        raise ValueError("report_steps must hold at least one step")
    marks = _checkpoints(steps, checkpoints)
    make_task(**task_kwargs, seed=0)                 # bad task arguments fail here, before any run
    methods = {name: _method(task_kwargs, spec, steps, select_step, report_steps, marks)
               for name, spec in specs.items()}
    return compare(methods, lrs, seeds, workers=workers)


@dataclass(frozen=True)
class Comparison:
    """A fair comparison of adapters on one kind of task.

    fair : the ``fair.FairResult`` (``fair[name].lr``, ``.grid``, ``.runs``; every run's
    ``details`` is its ``Fit``);  specs : name -> AdapterSpec;  floors : name -> (S,) the rank-r
    floor of that method's adapter on each seed's task (``RegressionTask.loss_floor``; 0 for full
    fine-tuning);  config : the settings.
    """
    fair: FairResult
    specs: dict
    floors: dict
    config: dict = field(default_factory=dict)

    @property
    def names(self) -> list:
        return self.fair.names

    def lr(self, name: str) -> float:
        """The learning rate chosen for ``name`` on validation."""
        return self.fair[name].lr

    def spread(self, name: str, key: str):
        """``fair.Spread`` (mean, min, max, n) of held-out metric ``key`` over the seeds."""
        return self.fair[name].spread(key)

    def values(self, name: str, key: str) -> np.ndarray:
        """(S,) held-out metric ``key`` of ``name``, one per seed."""
        return np.array([run.held_out[key] for run in self.fair[name].runs])

    def ratio(self, numerator: str, denominator: str, key: str):
        """``fair.Spread`` over seeds of ``key`` of ``numerator`` ÷ ``key`` of ``denominator``,
        seed by seed (each method at its own learning rate)."""
        return spread(self.values(numerator, key) / self.values(denominator, key))

    def fits(self, name: str) -> list:
        """The ``Fit`` of every seed of ``name`` at its chosen learning rate."""
        return [run.details for run in self.fair[name].runs]


def _floors(specs: dict, task_kwargs: dict, seeds) -> dict:
    """name -> (S,) the rank-r training floor of each spec's adapter on each seed's task."""
    out = {name: [] for name in specs}
    for seed in seeds:
        task = make_task(**task_kwargs, seed=seed)
        for name, spec in specs.items():
            if spec.kind == "full":
                out[name].append(0.0)
            else:
                W_frozen = spec.build(task.W0, 0).W               # W₀, or PiSSA's residual
                out[name].append(task.loss_floor(W_frozen, spec.r))
    return {k: np.array(v) for k, v in out.items()}


def _comparison(specs, task_kwargs, lrs, seeds, config, **kw) -> Comparison:
    result = fair_compare(specs, task_kwargs, lrs, seeds, **kw)
    return Comparison(fair=result, specs=dict(specs), floors=_floors(specs, task_kwargs, tuple(seeds)),
                      config=dict(config, task=dict(task_kwargs), seeds=tuple(seeds),
                                  lrs=lrs, **{k: v for k, v in kw.items() if k != "workers"}))


# --------------------------------------------------------------- rsLoRA: first update


@dataclass(frozen=True)
class FirstUpdateResult:
    """Size of the first update's effect on the output, per example.

    ranks : (R,).  sizes[label] : (R, n_examples), ``‖Δy‖ / (η ‖∂L/∂y‖)`` for one SGD step from
    B = 0 on that example alone.  predicted[label] : (R,), ``s² r ‖x‖² / (3 d_in)`` averaged over
    the examples (A's entries are U(±1/√d_in), variance 1/(3 d_in)).
    """
    ranks: np.ndarray
    sizes: dict
    predicted: dict
    alpha: float
    d_in: int

    def mean(self, label: str) -> np.ndarray:
        """(R,) the size averaged over the examples."""
        return self.sizes[label].mean(axis=1)

    def slope(self, label: str) -> float:
        """Least-squares slope of log(mean size) against log(r): −1 for α/r, 0 for α/√r.
        (The mean, not the median: for small r, ‖Ax‖² is a skewed sum of few squares.)"""
        return float(np.polyfit(np.log(self.ranks), np.log(self.mean(label)), 1)[0])


def first_update_size(ranks=(1, 2, 4, 8, 16, 32, 64), alpha=8.0, d=64, n_examples=32, seed=0):
    """One SGD step from B = 0, measured per example, for each rank and both scalings.

    With B = 0 the gradient of A is zero, so the step moves only B:
    ``B₁ = −η s g (A x)ᵀ`` and the output on the same x moves by ``Δy = s B₁ A x = −η s² ‖A x‖² g``.
    ``‖A x‖²`` is a sum of r terms of fixed size, so ``‖Δy‖ / (η ‖g‖) = s² ‖Ax‖² = Θ(s² r)``
    (η cancels, up to rounding, so it is fixed here).
    """
    lr = 1e-2                                                # η
    rng = np.random.default_rng(seed)
    base = Linear(d, d, rng=rng)
    X = rng.standard_normal((n_examples, d))
    Y = rng.standard_normal((n_examples, d))                 # targets: any g = ∂L/∂y will do
    ranks = np.asarray(ranks)
    sizes, predicted = {}, {}
    for label, rslora in SCALINGS.items():
        out = np.empty((len(ranks), n_examples))
        for i, r in enumerate(ranks):
            layer = LoRALinear(base, int(r), alpha, rslora=rslora, rng=seed + int(r))
            opt = SGD(layer, lr)
            for j in range(n_examples):
                x, y = X[j:j + 1], Y[j:j + 1]                # (1, d) each: one example
                layer.B[...] = 0.0
                y0 = layer(x)
                g = F.mse_loss(y0, y)[1]                     # ∂L/∂y at B = 0
                train_step(layer, opt, x, y)                 # the one SGD step: only B moves
                out[i, j] = np.linalg.norm(layer(x) - y0) / (lr * np.linalg.norm(g))
        sizes[label] = out
        s = np.array([lora_scale(alpha, int(r), rslora) for r in ranks])
        predicted[label] = s**2 * ranks * (X * X).sum(axis=1).mean() / (3 * d)
    return FirstUpdateResult(ranks=ranks, sizes=sizes, predicted=predicted, alpha=float(alpha), d_in=d)



# ------------------------------------------------- rsLoRA: the learning rate across ranks


@dataclass(frozen=True)
class RankScalingResult:
    """The learning-rate grid at every rank under both scalings (``rank_scaling_sweep``).

    comparisons : one ``Comparison`` per seed of ``seeds``, of the methods ``name(label, r)``;
    ``comparisons[k]`` chose every rate with ``seeds[k]`` (the seeds rotated, so each seed
    chooses once);  ranks : (R,);  seeds : (S,);  step : the step whose validation MSE chose
    each rate and whose test MSE is reported.
    """
    comparisons: tuple
    ranks: np.ndarray
    seeds: tuple
    step: int

    @staticmethod
    def name(label: str, r: int) -> str:
        return f"{label}, r={int(r)}"

    @property
    def comparison(self) -> Comparison:
        """The comparison whose rates the first seed chose."""
        return self.comparisons[0]

    @property
    def lrs(self) -> np.ndarray:
        """(L,) the grid."""
        return np.array(list(self.comparison.fair[self.name(next(iter(SCALINGS)), self.ranks[0])].grid))

    def best_lr(self, label: str) -> np.ndarray:
        """(S, R) the learning rate chosen on validation at each rank, by each seed."""
        return np.array([[c.lr(self.name(label, r)) for r in self.ranks] for c in self.comparisons])

    def lr_move(self, label: str):
        """``fair.Spread`` over the choosing seeds of best lr at the largest rank ÷ at the smallest."""
        best = self.best_lr(label)
        return spread(best[:, -1] / best[:, 0])

    def lr_curve(self, label: str, r: int) -> np.ndarray:
        """(L,) validation MSE at every rate of the grid (first seed; inf if diverged)."""
        grid = self.comparison.fair[self.name(label, r)].grid
        return np.array([run.validation for run in grid.values()])

    def held_out(self, label: str) -> list:
        """Per rank, the ``fair.Spread`` over seeds of the test MSE at the rate the first seed chose."""
        return [self.comparison.spread(self.name(label, r), f"test@{self.step}") for r in self.ranks]

    def transfer_ratio(self, label: str):
        """``fair.Spread`` over the choosing seeds of (test MSE at the largest rank trained at the
        rate chosen for the smallest rank) ÷ (test MSE at the largest rank at its own rate), both
        on the choosing seed: 1 = nothing lost by not retuning when the rank goes up."""
        key, big, small = f"test@{self.step}", self.name(label, self.ranks[-1]), self.name(label, self.ranks[0])
        ratios = []
        for c in self.comparisons:
            grid = c.fair[big].grid
            ratios.append(grid[c.lr(small)].held_out[key] / grid[c.lr(big)].held_out[key])
        return spread(ratios)


def rank_scaling_sweep(ranks=(2, 8, 32), alpha=4.0, lrs=RANK_LR_GRID, steps=10, seeds=(0, 1, 2), d=32,
                       n=128, workers=1) -> RankScalingResult:
    """Every rank under α/r and under α/√r (same α), each (scaling, rank) with its own learning
    rate from ``lrs``, chosen on the validation MSE after ``steps`` Adam steps, on a full-rank
    random shift (so a larger rank can always fit more). The protocol runs once per seed, with
    that seed choosing the rates, so that where the best rate sits has a spread too. (The
    grids are shared, so the largest rank's grid holds the run at the smallest rank's rate.)"""
    ranks = tuple(check_int(f"ranks[{i}]", r, 1, d) for i, r in enumerate(ranks))
    if len(ranks) < 2 or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must hold at least two distinct ranks, got {ranks}")
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    task_kwargs = dict(d=d, n=n, shift_rank=d)
    specs = {RankScalingResult.name(label, r): AdapterSpec("lora", r, alpha, rslora=rs)
             for label, rs in SCALINGS.items() for r in ranks}
    comparisons = tuple(_comparison(specs, task_kwargs, lrs, seeds[k:] + seeds[:k], dict(alpha=alpha),
                                    steps=steps, workers=workers) for k in range(len(seeds)))
    return RankScalingResult(comparisons=comparisons, ranks=np.array(ranks), seeds=seeds, step=steps)


# -------------------------------------------------------------------------- LoRA+


def loraplus_compare(ratios=(1, 4, 16), lrs=LR_GRID, r=8, alpha=8.0, shift_rank=None, steps=25,
                     seeds=(0, 1, 2), d=32, n=128, workers=1) -> Comparison:
    """LoRA+ at every λ = lr_B / lr_A of ``ratios``, each λ with its own lr_A from ``lrs``, chosen
    on the validation MSE after ``steps`` steps. Methods ``"λ = 16"`` etc. ``shift_rank``: the
    rank of the task's shift (None: full rank, so a rank-r adapter has a floor above zero; a
    shift_rank ≤ r gives a floor of 0, where how fast each λ learns is not capped by it)."""
    specs = {f"λ = {lam:g}": AdapterSpec("lora", r, alpha, lr_ratio=lam) for lam in ratios}
    task_kwargs = dict(d=d, n=n, shift_rank=shift_rank)
    return _comparison(specs, task_kwargs, lrs, seeds, dict(r=r, alpha=alpha), steps=steps,
                       workers=workers)


# ------------------------------------------------------------------ PiSSA and DoRA


def pissa_compare(shift="principal", r=4, alpha=4.0, lrs=LR_GRID, steps=25, shift_rank=4,
                  shift_scale=0.5, seeds=(0, 1, 2), d=32, n=128, report_steps=None,
                  workers=1) -> Comparison:
    """PiSSA's init vs the default (kaiming A, B = 0), same r and α, each init with its own
    learning rate (validation MSE after ``steps`` steps; held-out metrics at ``report_steps``
    and at ``steps``). Methods ``"default init"`` and
    ``"PiSSA"``; ``floors`` holds each one's rank-r floor (PiSSA's frozen weight is the residual,
    so its adapter must carry W₀'s top-r part as well as the shift)."""
    specs = {"default init": AdapterSpec("lora", r, alpha), "PiSSA": AdapterSpec("lora", r, alpha, init="pissa")}
    task_kwargs = dict(d=d, n=n, shift=shift, shift_rank=shift_rank, shift_scale=shift_scale)
    report = tuple(sorted(set(report_steps or ()) | {steps}))
    return _comparison(specs, task_kwargs, lrs, seeds, dict(r=r, alpha=alpha), steps=steps,
                       report_steps=report, workers=workers)


def dora_compare(shift="random", r=4, alpha=4.0, lrs=LR_GRID, steps=200, rescale=0.3,
                 seeds=(0, 1, 2), d=32, n=128, report_steps=(25,), checkpoint_every=10,
                 workers=1) -> Comparison:
    """Full fine-tuning, LoRA, DoRA (exact gradient) and DoRA (detached norm), same r and α, each
    with its own learning rate (validation MSE after ``steps`` steps), on ``shift="random"`` (a
    full-rank random shift) or ``"rescale"`` (rows of W₀ rescaled by 1 + δ_i, δ_i ~ N(0,
    rescale²): built so that DoRA's m fits it exactly). Every run keeps its applied weight every
    ``checkpoint_every`` steps, for ``weight_decomposition``. Held-out metrics at
    ``report_steps`` and at ``steps``."""
    check_choice("shift", shift, ("random", "rescale"))
    every = check_int("checkpoint_every", checkpoint_every, 1, steps)
    task_kwargs = dict(d=d, n=n, shift_rank=d) if shift == "random" else \
        dict(d=d, n=n, shift="rescale", shift_scale=rescale)
    specs = {"full FT": AdapterSpec("full"), "LoRA": AdapterSpec("lora", r, alpha),
             "DoRA exact": AdapterSpec("dora", r, alpha),
             "DoRA detached": AdapterSpec("dora", r, alpha, detach_norm=True)}
    report = tuple(sorted(set(report_steps) | {steps}))
    return _comparison(specs, task_kwargs, lrs, seeds, dict(r=r, alpha=alpha, shift=shift),
                       steps=steps, report_steps=report, checkpoints=range(every, steps + 1, every),
                       workers=workers)


def weight_decomposition(W0, weights):
    """The magnitude and direction changes of Liu et al. 2024 (DoRA, §2.2), per checkpoint.

    W0 : (d_out, d_in) the pretrained weight;  weights : (K, d_out, d_in) (or one (d_out,
    d_in)) the weights a layer applies at K checkpoints. Each output unit i — a row of lora_np's
    (d_out, d_in) weight, the axis DoRA's m and norm run over (``functional.dora_weight``; the
    paper's column of its transposed matrix) — has magnitude ``‖W_i‖`` and direction ``W_i/‖W_i‖``:

        ΔM_t = mean_i | ‖W_t,i‖ − ‖W₀,i‖ |,      ΔD_t = mean_i (1 − cos(W_t,i, W₀,i))

    Returns ``(dM, dD)``, each (K,) (floats for one weight). Raises ValueError for mismatched
    shapes, non-finite entries or a zero row (no direction).
    """
    W0 = np.asarray(W0, dtype=np.float64)
    Ws = np.asarray(weights, dtype=np.float64)
    single = Ws.ndim == 2
    Ws = Ws[None] if single else Ws
    if W0.ndim != 2 or Ws.ndim != 3 or Ws.shape[1:] != W0.shape:
        raise ValueError(f"weight_decomposition needs W0 (d_out, d_in) and weights (K, d_out, d_in) of "
                         f"the same (d_out, d_in); got {W0.shape} and {np.shape(weights)}")
    if not (np.all(np.isfinite(W0)) and np.all(np.isfinite(Ws))):
        raise ValueError("weight_decomposition: W0 and weights must be finite")
    n0, nt = np.linalg.norm(W0, axis=1), np.linalg.norm(Ws, axis=2)       # (d_out,), (K, d_out)
    if np.any(n0 == 0) or np.any(nt == 0):
        raise ValueError("weight_decomposition: a row of W0 or of a weight is zero (no direction)")
    dM = np.abs(nt - n0).mean(axis=1)
    cos = (Ws * W0).sum(axis=2) / (nt * n0)
    dD = (1.0 - cos).mean(axis=1)
    return (float(dM[0]), float(dD[0])) if single else (dM, dD)


def decomposition_slope(dM, dD) -> float:
    """Least-squares slope of ΔD against ΔM over checkpoints (the trend line of the paper's
    Fig. 2: negative for full fine-tuning and DoRA there, positive for LoRA)."""
    dM, dD = np.asarray(dM, dtype=np.float64), np.asarray(dD, dtype=np.float64)
    if dM.shape != dD.shape or dM.ndim != 1 or dM.size < 2 or np.ptp(dM) == 0:
        raise ValueError(f"decomposition_slope needs two 1-D arrays of the same length ≥ 2 with ΔM "
                         f"not constant; got shapes {dM.shape}, {dD.shape}")
    return float(np.polyfit(dM, dD, 1)[0])


@dataclass(frozen=True)
class DoRATrace:
    """One DoRA run, and both backward passes (exact and detached norm) at every step of it.

    cos : (steps,) cosine between the exact and the detached gradient of (A, B) (concatenated)
    at the point each step starts from;  max_ratio : (steps + 1,) max_i m_i / n_i before each
    step and after the last (n_i = ‖(W + sBA)_i‖);  norms : (steps + 1, d_out) n_i / n_i(0);
    train_loss : (steps + 1,) training MSE before each step and after the last;  config (with
    ``detach_norm``: which of the two gradients trained the run).
    """
    cos: np.ndarray
    max_ratio: np.ndarray
    norms: np.ndarray
    train_loss: np.ndarray
    config: dict = field(default_factory=dict)

    @property
    def min_norm(self) -> np.ndarray:
        """(steps + 1,) min_i n_i / n_i(0): how far the most-shrunk row of W + sBA has shrunk."""
        return self.norms.min(axis=1)

    def rises(self, rel: float = 0.0) -> int:
        """Number of steps after which the training MSE went up by more than ``rel`` (relative)."""
        rel = check_number("rel", rel, nonnegative=True)
        L = self.train_loss
        return int(np.sum(L[1:] > L[:-1] * (1.0 + rel)))


def dora_trace(task: RegressionTask, r=4, alpha=4.0, lr=3e-3, steps=200, rng=1,
               detach_norm=True) -> DoRATrace:
    """Train ``DoRALinear(detach_norm=detach_norm)`` on ``task`` (full batch, Adam at ``lr``, one
    ``train_step`` at a time, the run ``fit`` makes) and, before every step, compute both
    backward passes (``functional.dora_linear_backward``, exact and detached) at the current
    weights; ``rng`` draws A."""
    if not isinstance(task, RegressionTask):
        raise TypeError(f"task must be a RegressionTask (make_task), got {type(task).__name__}")
    steps = check_int("steps", steps, minimum=1)
    lr = check_number("lr", lr, positive=True)
    layer = AdapterSpec("dora", r, alpha, detach_norm=check_bool("detach_norm", detach_norm)).build(task.W0, rng)
    opt = Adam(layer, lr)
    X, Y = task.X, task.Y
    cos = np.full(steps, np.nan)
    ratio, losses = np.full(steps + 1, np.nan), np.full(steps + 1, np.nan)
    norms = np.full((steps + 1, layer.d_out), np.nan)
    n0 = F.dora_weight_norm(layer.W, layer.A, layer.B, layer.scale)[1]
    for t in range(steps + 1):
        n = F.dora_weight_norm(layer.W, layer.A, layer.B, layer.scale)[1]
        ratio[t], norms[t] = np.max(layer.m / n), n / n0
        if t == steps:
            losses[t] = evaluate(layer, X, Y)
            break
        grads = []
        for detach in (False, True):
            y, cache = F.dora_linear_forward(X, layer.W, None, layer.A, layer.B, layer.m, layer.scale,
                                             detach_norm=detach)
            _, dA, dB, _ = F.dora_linear_backward(F.mse_loss(y, Y)[1], cache)
            grads.append(np.concatenate([dA.ravel(), dB.ravel()]))
        g_exact, g_detached = grads
        cos[t] = g_exact @ g_detached / (np.linalg.norm(g_exact) * np.linalg.norm(g_detached))
        losses[t] = train_step(layer, opt, X, Y)
        if not math.isfinite(losses[t]):
            break
    return DoRATrace(cos=cos, max_ratio=ratio, norms=norms, train_loss=losses,
                     config=dict(r=r, alpha=alpha, lr=lr, steps=steps, detach_norm=bool(detach_norm)))

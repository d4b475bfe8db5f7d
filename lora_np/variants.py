"""Experiments for the LoRA variants: rsLoRA, LoRA+, PiSSA and DoRA (notebook 07).

Each experiment trains small adapters with the library's own modules, optimizers and training
loop (``lora_np.train``) and returns a plain result object (a frozen dataclass of NumPy arrays
and numbers); ``lora_np.plots`` draws them. Everything is seeded, so every number is
reproducible bit for bit.

The task is a teacher–student linear regression with a known answer, small enough that a whole
notebook of sweeps stays quick:

    X (N, d_in) ~ N(0, I),   Y = X (W₀ + ΔW*)ᵀ,   student = W₀ frozen + a rank-r adapter

W₀ has a decaying spectrum σ_k = 2 k^(−decay) (as pretrained weights do), and the shift ΔW* is
either random (``shift="random"``) or lies along W₀'s top singular directions
(``shift="principal"``). ``RegressionTask.loss_floor`` gives the best loss any rank-r update
could reach, so a plateau can be told apart from slow learning.

Experiments (papers cited where the claim comes from):

* ``first_update_size``  — rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): one SGD step from
  B = 0 changes the output by ``η s² ‖A x‖² ‖g‖`` = Θ(s² r): Θ(1/r) for s = α/r, Θ(1) for s = α/√r.
* ``rank_scaling_curves`` — loss curves across ranks under both scalings.
* ``loraplus_sweep``      — LoRA+ (Hayou et al. 2024, arXiv 2402.12354): λ = lr_B / lr_A ∈ {1, 4, 16}
  across learning rates.
* ``pissa_vs_default``    — PiSSA (Meng et al. 2024, arXiv 2404.02948) vs the B = 0 init, on a
  principal and on a random shift.
* ``dora_curves``         — LoRA vs DoRA (exact and detached-norm gradient), Liu et al. 2024,
  arXiv 2402.09353.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .analysis import tail_energy
from .lora import DoRALinear, LoRALinear, lora_scale
from .modules import Linear
from .optim import SGD, Adam, loraplus_multipliers
from .tasks import random_orthonormal
from .train import TrainingDiverged, train, train_step
from .validate import check_choice, check_int

__all__ = ["RegressionTask", "make_task", "fit_adapter", "FirstUpdateResult", "first_update_size",
           "RankScalingResult", "rank_scaling_curves", "LoRAPlusResult", "loraplus_sweep",
           "CurvesResult", "pissa_vs_default", "dora_curves", "SCALINGS"]

#: the two scalings compared by the rsLoRA experiments: label -> rslora flag
SCALINGS = {"α/r": False, "α/√r": True}


# ------------------------------------------------------------------------------ task


@dataclass(frozen=True)
class RegressionTask:
    """Teacher–student regression ``Y = X (W₀ + ΔW*)ᵀ``.

    X : (N, d_in);  Y : (N, d_out);  W0 : (d_out, d_in) the frozen base;  dW : (d_out, d_in) ΔW*.
    """
    X: np.ndarray
    Y: np.ndarray
    W0: np.ndarray
    dW: np.ndarray

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


def make_task(d=32, n=128, shift_rank=None, shift="random", shift_scale=1.0, decay=0.5, seed=0):
    """A ``RegressionTask`` with d_in = d_out = d.

    W₀ = U diag(σ) Vᵀ with σ_k = 2 k^(−decay).  ΔW* = shift_scale · P diag(k^(−1/2)) Qᵀ with
    (shift_rank = None means d: a full-rank shift)
    orthonormal P (d, shift_rank), Q (d, shift_rank): random for ``shift="random"``,
    P = W₀'s top ``shift_rank`` left singular vectors for ``shift="principal"`` (and then σ_k
    weights the shift too: the task re-weights what W₀ already does most).
    ``shift="rescale"``: ΔW* = diag(δ) W₀ with δ_i ~ N(0, shift_scale²) — every output row of
    W₀ rescaled, a full-rank change (shift_rank is ignored) that DoRA's magnitude m fits exactly.
    """
    check_choice("shift", shift, ("random", "principal", "rescale"))
    shift_rank = check_int("shift_rank", d if shift_rank is None else shift_rank, 1, d)
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
    X = rng.standard_normal((n, d))
    return RegressionTask(X=X, Y=X @ (W0 + dW).T, W0=W0, dW=dW)


# ------------------------------------------------------------------------- training


def fit_adapter(task, r, alpha, steps, lr, *, rslora=False, init="kaiming", use_dora=False,
                detach_norm=False, lr_ratio=1.0):
    """Train one adapter on ``task`` with ``train`` (full batch, Adam at a constant ``lr``);
    return ``(losses, layer)``.

    losses : (steps + 1,) training MSE before each step and after the last one. ``lr_ratio``
    is LoRA+'s λ (B's learning rate is λ·lr). A is drawn from seed 1 in every run, so runs that
    differ in one setting start from the same A. A run that diverges keeps the losses it
    reached and NaN from the first non-finite one on.
    """
    d_out, d_in = task.W0.shape
    base = Linear(d_in, d_out, bias=False)
    base.W[...] = task.W0
    kwargs = dict(rslora=rslora, init=init, rng=1)
    layer = DoRALinear(base, r, alpha, detach_norm=detach_norm, **kwargs) if use_dora \
        else LoRALinear(base, r, alpha, **kwargs)
    opt = Adam(layer, lr, lr_multipliers=loraplus_multipliers(lr_ratio))
    losses = np.full(steps + 1, np.nan)
    try:               # validating on the training set: the last val loss is the loss after the last step
        history = train(layer, task.X, task.Y, steps=steps, optimizer=opt, batch_size=None,
                        schedule="constant", x_val=task.X, y_val=task.Y, eval_every=steps)
        recorded = history.loss_history + [history.final_val_loss]
    except TrainingDiverged as diverged:
        recorded = diverged.history.loss_history
    losses[:len(recorded)] = recorded
    return losses, layer


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


# ---------------------------------------------------------------- rsLoRA: loss curves


@dataclass(frozen=True)
class RankScalingResult:
    """Loss curves across ranks under both scalings.

    ranks : (R,);  curves[label] : (R, steps + 1) training MSE;  floors : (R,) the best MSE a
    rank-r update can reach (``RegressionTask.loss_floor``);  config : the settings used.
    """
    ranks: np.ndarray
    curves: dict
    floors: np.ndarray
    config: dict = field(default_factory=dict)

    def loss_at(self, step: int) -> dict:
        """label -> (R,) loss at ``step``."""
        return {k: v[:, step] for k, v in self.curves.items()}


def rank_scaling_curves(ranks=(2, 8, 32), alpha=4.0, steps=200, lr=3e-3, d=32, n=128, seed=0):
    """Train a rank-r adapter (Adam) for each r under α/r and under α/√r, same α and lr.

    The task's shift has full rank (d), so larger r can always fit more: a good scaling lets
    it, and lets it learn at least as fast as a small r.
    """
    task = make_task(d=d, n=n, shift_rank=d, seed=seed)
    ranks = np.asarray(ranks)
    curves = {label: np.stack([fit_adapter(task, int(r), alpha, steps, lr, rslora=rs)[0]
                               for r in ranks])
              for label, rs in SCALINGS.items()}
    floors = np.array([task.loss_floor(task.W0, int(r)) for r in ranks])
    return RankScalingResult(ranks=ranks, curves=curves, floors=floors,
                             config=dict(alpha=alpha, steps=steps, lr=lr, d=d, n=n, seed=seed))


# -------------------------------------------------------------------------- LoRA+


@dataclass(frozen=True)
class LoRAPlusResult:
    """LoRA+ sweep: ratios (K,) λ = lr_B / lr_A, lrs (L,) lr_A, curves (K, L, steps + 1)."""
    ratios: np.ndarray
    lrs: np.ndarray
    curves: np.ndarray
    config: dict = field(default_factory=dict)

    def loss_at(self, step: int) -> np.ndarray:
        """(K, L) loss at ``step`` (NaN for a diverged run)."""
        return self.curves[:, :, step]

    def best(self, step: int) -> dict:
        """λ -> (best lr_A, its loss at ``step``), over the learning-rate grid."""
        table = self.loss_at(step)
        out = {}
        for k, lam in enumerate(self.ratios):
            row = np.where(np.isfinite(table[k]), table[k], np.inf)
            j = int(np.argmin(row))
            out[float(lam)] = (float(self.lrs[j]), float(row[j]))
        return out


def loraplus_sweep(ratios=(1, 4, 16), lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), r=8, alpha=8.0, steps=150,
                   d=32, n=128, seed=0):
    """Adam on the same task for every (λ, lr_A): B trains at λ·lr_A, A at lr_A."""
    task = make_task(d=d, n=n, shift_rank=d, seed=seed)
    curves = np.stack([np.stack([fit_adapter(task, r, alpha, steps, lr, lr_ratio=lam)[0] for lr in lrs])
                       for lam in ratios])
    return LoRAPlusResult(ratios=np.asarray(ratios, dtype=float), lrs=np.asarray(lrs, dtype=float),
                          curves=curves, config=dict(r=r, alpha=alpha, steps=steps, d=d, n=n, seed=seed))


# ------------------------------------------------------------------ PiSSA and DoRA


@dataclass(frozen=True)
class CurvesResult:
    """Named loss curves per task.

    curves[task][label] : (steps + 1,) training MSE;  floors[task][label] : the best MSE that
    label's adapter can reach (its rank-r capacity on top of its frozen weight);  config.
    """
    curves: dict
    floors: dict
    config: dict = field(default_factory=dict)

    def loss_at(self, step: int) -> dict:
        return {t: {k: float(v[step]) for k, v in c.items()} for t, c in self.curves.items()}


def pissa_vs_default(r=4, alpha=4.0, steps=200, lr=3e-3, shift_rank=4, shift_scale=0.5, d=32, n=128,
                     seed=0):
    """PiSSA init vs the default (kaiming A, B = 0), same r, α, Adam lr, on two tasks.

    ``"principal"``: the shift re-weights W₀'s top singular directions — where PiSSA's adapter
    starts. ``"random"``: the shift lies in random directions. The floors show the catch:
    PiSSA's frozen weight is the residual, so its rank-r adapter must carry W₀'s top-r part
    *and* the shift, which for a random shift needs rank 2r.
    """
    curves, floors = {}, {}
    for shift in ("principal", "random"):
        task = make_task(d=d, n=n, shift_rank=shift_rank, shift=shift, shift_scale=shift_scale, seed=seed)
        curves[shift], floors[shift] = {}, {}
        for init in ("kaiming", "pissa"):
            losses, layer = fit_adapter(task, r, alpha, steps, lr, init=init)
            curves[shift][init] = losses
            floors[shift][init] = task.loss_floor(layer.W, r)     # layer.W: W₀, or PiSSA's residual
    return CurvesResult(curves=curves, floors=floors,
                        config=dict(r=r, alpha=alpha, steps=steps, lr=lr, shift_rank=shift_rank,
                                    shift_scale=shift_scale, d=d, n=n, seed=seed))


def dora_curves(r=4, alpha=4.0, steps=200, lr=3e-3, rescale=0.3, d=32, n=128, seed=0):
    """LoRA vs DoRA (exact gradient) vs DoRA (detached norm), same r, α, Adam lr, on two tasks:
    ``"random"`` (a full-rank random shift) and ``"rescale"`` (rows of W₀ rescaled by 1 + δ_i,
    δ_i ~ N(0, rescale²)). Floors are LoRA's rank-r floors; DoRA's m adds d_out more degrees
    of freedom, so DoRA can go below them."""
    tasks = {"random": make_task(d=d, n=n, shift_rank=d, seed=seed),
             "rescale": make_task(d=d, n=n, shift="rescale", shift_scale=rescale, seed=seed)}
    runs = {"LoRA": {}, "DoRA exact": dict(use_dora=True),
            "DoRA detached": dict(use_dora=True, detach_norm=True)}
    curves = {name: {label: fit_adapter(task, r, alpha, steps, lr, **kw)[0] for label, kw in runs.items()}
              for name, task in tasks.items()}
    floors = {name: {"LoRA": task.loss_floor(task.W0, r)} for name, task in tasks.items()}
    return CurvesResult(curves=curves, floors=floors,
                        config=dict(r=r, alpha=alpha, steps=steps, lr=lr, rescale=rescale, d=d, n=n,
                                    seed=seed))

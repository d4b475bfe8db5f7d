"""Synthetic fine-tuning tasks whose true weight change ΔW* has a known rank r*
(``true_rank``; ``k`` in the code).

The story every experiment tells (notebook 04 teaches it)::

    task A  (pretraining):  y = teacher_A(x),        x drawn from task A's inputs
    task B  (fine-tuning):  y = teacher_B(x) + noise, teacher_B = teacher_A with W ← W + ΔW*

* **The pretrained model is teacher A itself** — pretraining carried to its exact optimum —
  so the pretrained model and task B's teacher differ by ΔW* and nothing else: the best
  possible fine-tuning update is known exactly, and its rank is ``true_rank`` = k.
* **ΔW* = U diag(σ) Vᵀ** for each shifted layer, with U (d_out, k) and V (d_in, k) random
  orthonormal columns and the singular values σ chosen by the caller (default: all equal,
  so that no rank r < k can capture more than r/k of the change).
* **Task A only uses part of the input space.** Its inputs are ``x = Q_A z``, z ~ N(0, I) of
  width ``d_old`` < d_in, while task B's inputs are N(0, I) in all d_in directions. For a
  shifted layer that reads the model's input (``fc1``; ``q_proj``/``k_proj``/``v_proj``) the
  row space V of ΔW* lies in the directions task A never uses, so teacher B gives *exactly*
  teacher A's outputs on task A's inputs. A fine-tuned model that learned ΔW* and nothing
  else would lose nothing on task A; every bit of old-task loss it shows is collateral damage
  (noise fitted into weights that task A's inputs also pass through). A shifted layer deeper
  in the model (``fc2``, ``o_proj``) sees hidden features, not inputs; there V is drawn from
  all directions and learning B necessarily changes A's outputs too.
* **Orthogonal teacher weights** (Saxe et al. 2013, arXiv 1312.6120), scaled so that each
  row has norm 1 on average: for x ~ N(0, I) every pre-activation has unit variance, the
  hidden features ``tanh(W₁x)`` are uncorrelated with equal variance, and ``W₂ᵀW₂ ∝ I``. The
  loss is then close to isotropic in ΔW, so the best rank-r update leaves about the
  Eckart–Young fraction ``Σ_{i>r} σᵢ² / Σ σᵢ²`` of the initial loss L₀.

Everything is drawn from ``np.random.default_rng(seed)`` in a fixed order: the same seed
gives the same task bit for bit.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .modules import MLP, Module, MultiHeadAttention
from .validate import (check_bool, check_choice, check_descending_positive, check_int,
                       check_number)

__all__ = ["Task", "mlp_task", "attention_task", "random_orthonormal", "orthogonal_weight",
           "low_rank_delta", "INPUT_LAYERS"]

#: per task kind, the layers that read the model's input x (their ΔW* avoids task A's inputs)
INPUT_LAYERS = {"mlp": ("fc1",), "attention": ("q_proj", "k_proj", "v_proj")}
_LAYERS = {"mlp": ("fc1", "fc2"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj")}


# --------------------------------------------------------------------------- building blocks


def random_orthonormal(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """An (n, m) matrix with orthonormal columns (m <= n), uniformly (Haar) distributed.

    QR of a Gaussian matrix, with the signs of R's diagonal moved into Q so that the
    distribution is exactly uniform (Mezzadri 2007, arXiv math-ph/0609050).
    """
    if not 1 <= m <= n:
        raise ValueError(f"random_orthonormal: need 1 <= m <= n, got n={n}, m={m}")
    Q, R = np.linalg.qr(rng.standard_normal((n, m)))
    return Q * np.sign(np.diag(R))


def orthogonal_weight(rng: np.random.Generator, d_out: int, d_in: int) -> np.ndarray:
    """A (d_out, d_in) weight with orthogonal rows or columns and mean squared row norm 1.

    ``d_out <= d_in``: orthonormal rows, ``W Wᵀ = I``. ``d_out > d_in``: orthonormal columns
    times ``√(d_out / d_in)``, ``WᵀW = (d_out/d_in) I``. Either way ``E‖W x‖² = d_out`` for
    x ~ N(0, I_{d_in}): every output has unit variance on average.
    """
    if d_out <= d_in:
        return random_orthonormal(rng, d_in, d_out).T
    return random_orthonormal(rng, d_out, d_in) * math.sqrt(d_out / d_in)


def low_rank_delta(rng: np.random.Generator, d_out: int, d_in: int, singular_values,
                   row_basis: np.ndarray | None = None) -> np.ndarray:
    """``ΔW* = U diag(σ) Vᵀ`` of shape (d_out, d_in) and rank k = len(σ).

    U (d_out, k): random orthonormal columns. V (d_in, k): random orthonormal columns, inside
    the span of ``row_basis`` (d_in, m), m >= k, if given (``V = row_basis @ Q``, Q (m, k)
    orthonormal), else anywhere in R^{d_in}. The singular values of the result are exactly σ.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    k = s.size
    U = random_orthonormal(rng, d_out, k)                            # (d_out, k)
    if row_basis is None:
        V = random_orthonormal(rng, d_in, k)                          # (d_in, k)
    else:
        V = row_basis @ random_orthonormal(rng, row_basis.shape[1], k)   # (d_in, k)
    return (U * s) @ V.T                                              # (d_out, d_in)


# --------------------------------------------------------------------------- the task


@dataclass(eq=False)
class Task:
    """A teacher–student fine-tuning task with a known low-rank shift (see the module docstring).

    Attributes
    ----------
    kind : "mlp" or "attention"
    pretrained : Module
        The task-A model (= teacher A). Never trained in place: ``new_model()`` copies it.
    teacher : Module
        Task B's teacher: ``pretrained`` with ``W ← W + ΔW*`` in every shifted layer.
    shifted : tuple of str
        Names of the shifted layers (keys of ``delta_true``).
    delta_true : dict str -> ndarray (d_out, d_in)
        ΔW* of each shifted layer, rank ``true_rank``.
    true_rank : int
        k.
    singular_values : ndarray (k,)
        σ₁ ≥ … ≥ σ_k of every ΔW*.
    noise : float
        Standard deviation of the Gaussian label noise on task B's train and validation
        targets. The best achievable validation loss is ``noise_floor = noise²``.
    x_train, y_train, x_val, y_val : ndarray
        Task B data; MLP: (N, d_in) and (N, d_out); attention: (N, T, d_model) both.
    x_old, y_old : ndarray
        Task A data (inputs in task A's subspace, *clean* targets of the pretrained model,
        so the pretrained model's old-task loss is exactly 0).
    old_basis : ndarray (d_in, d_old)
        Orthonormal basis of task A's input directions.
    seed : int
    """

    kind: str
    pretrained: Module
    teacher: Module
    shifted: tuple
    delta_true: dict
    true_rank: int
    singular_values: np.ndarray
    noise: float
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_old: np.ndarray
    y_old: np.ndarray
    old_basis: np.ndarray
    seed: int
    config: dict = field(default_factory=dict)

    def new_model(self) -> Module:
        """A fresh, independent copy of the pretrained model (all parameters trainable)."""
        return copy.deepcopy(self.pretrained)

    def layer(self, model: Module, name: str) -> Module:
        """The module called ``name`` (a dotted path) inside ``model``."""
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"no layer {name!r} in the model; layers are {sorted(p for p in modules if p)}")
        return modules[name]

    @staticmethod
    def loss(model: Module, x: np.ndarray, y: np.ndarray) -> float:
        """Mean squared error ``(1/M) Σ (model(x) − y)²`` over every element (a Python float)."""
        return F.mse_loss(model(x), y)[0]

    def val_loss(self, model: Module) -> float:
        """Task B validation loss of ``model``."""
        return self.loss(model, self.x_val, self.y_val)

    def old_task_loss(self, model: Module) -> float:
        """Task A loss of ``model``: how far it moved from the pretrained model's outputs on
        task A's inputs (0 for the pretrained model itself)."""
        return self.loss(model, self.x_old, self.y_old)

    @property
    def noise_floor(self) -> float:
        """``noise²``: the validation loss of task B's teacher itself (the best possible)."""
        return self.noise ** 2

    def describe(self) -> str:
        """One line: what the task is."""
        c = self.config
        if self.kind == "mlp":
            arch = f"MLP {c['d_in']}→{c['d_hidden']}→{c['d_out']} ({c['activation']})"
        else:
            arch = f"attention d_model={c['d_model']}, H={c['n_heads']}, T={c['T']}"
        sigma = np.asarray(self.singular_values)
        if sigma.size <= 8:
            sv = ", ".join(f"{s:g}" for s in sigma)
        elif np.all(sigma == sigma[0]):
            sv = f"{sigma[0]:g} (all {sigma.size})"
        else:                               # a long spectrum: its range, not every value
            sv = f"{sigma.max():g} … {sigma.min():g} ({sigma.size} values)"
        return (f"{arch}; shifted {', '.join(self.shifted)} by rank-{self.true_rank} ΔW* "
                f"(σ = {sv}); task A uses {c['d_old']} of {self.old_basis.shape[0]} input "
                f"directions; {len(self.x_train)} train / {len(self.x_val)} val / "
                f"{len(self.x_old)} old-task examples; label noise {self.noise:g}")


# --------------------------------------------------------------------------- argument checks


def _check_sigma(singular_values, k):
    """σ as a descending float64 array of length k (a number means k equal values)."""
    if isinstance(singular_values, numbers.Real) and not isinstance(singular_values, bool):
        singular_values = np.full(k, float(singular_values))
    return check_descending_positive(f"singular_values (one per rank of ΔW*, true_rank={k})",
                                     singular_values, k)


def _check_shifted(kind, shifted):
    if isinstance(shifted, str):
        shifted = (shifted,)
    shifted = tuple(shifted)
    bad = [s for s in shifted if s not in _LAYERS[kind]]
    if not shifted or bad or len(set(shifted)) != len(shifted):
        raise ValueError(f"shifted must be distinct names among {_LAYERS[kind]}, got {shifted!r}")
    return shifted


def _check_rank_fits(k, shifted, layers, d_in, d_old, kind):
    for name in shifted:
        lay = layers[name]
        room = d_in - d_old if name in INPUT_LAYERS[kind] else lay.d_in
        limit = min(lay.d_out, room)
        if k > limit:
            raise ValueError(f"true_rank={k} does not fit layer {name!r} ({lay.d_out}×{lay.d_in}); "
                             f"its ΔW* can have rank at most {limit}"
                             + (f" (d_in − d_old = {room} input directions unused by task A)"
                                if name in INPUT_LAYERS[kind] else ""))


# --------------------------------------------------------------------------- shared construction


def _shift(rng, pretrained, kind, shifted, k, sigma, old_complement):
    """Teacher B and ΔW* per shifted layer (ΔW* drawn in the order of ``shifted``)."""
    teacher = copy.deepcopy(pretrained)
    layers = dict(teacher.named_modules())
    delta = {}
    for name in shifted:
        lay = layers[name]
        basis = old_complement if name in INPUT_LAYERS[kind] else None
        delta[name] = low_rank_delta(rng, lay.d_out, lay.d_in, sigma, row_basis=basis)
        lay.W[...] += delta[name]
    return teacher, delta


def _input_subspaces(rng, d_in, d_old):
    """Task A's input basis Q_A (d_in, d_old) and its orthogonal complement (d_in, d_in − d_old)."""
    basis = random_orthonormal(rng, d_in, d_in)
    return basis[:, :d_old], basis[:, d_old:]


# --------------------------------------------------------------------------- MLP task


def _check_fc1_sigma(values, p):
    """None, or σ⁰ as a descending float64 array of p = min(d_hidden, d_in) finite values > 0."""
    return None if values is None else check_descending_positive("fc1_singular_values", values, p)


def _with_spectrum(M, sigma0, rng):
    """``U₀ diag(σ⁰) V₀ᵀ``: V₀ the orthonormal directions of the orthogonal weight M (d_out, d_in),
    U₀ (d_out, p) random orthonormal from ``rng``."""
    d_out, d_in = M.shape
    if d_out <= d_in:                                  # M = I · Vᵀ, orthonormal rows
        V_t = M                                        # (d_out, d_in) = (p, d_in)
        U = random_orthonormal(rng, d_out, d_out)      # (d_out, p)
    else:                                              # M = c · P, orthonormal columns P
        V_t = random_orthonormal(rng, d_in, d_in).T    # (p, d_in)
        U = M / math.sqrt(d_out / d_in)                # (d_out, p)
    return (U * sigma0) @ V_t


def mlp_task(seed: int = 0, true_rank: int = 4, *, d_in: int = 64, d_hidden: int = 64,
             d_out: int = 64, d_old: int = 32, shifted=("fc1",), singular_values=2.0,
             noise: float = 0.01, n_train: int = 1024, n_val: int = 512, n_old: int = 512,
             activation: str = "tanh", fc1_singular_values=None) -> Task:
    """Teacher–student regression with the MLP ``y = W₂ act(W₁ x + b₁) + b₂``.

    Parameters
    ----------
    seed : int
        Everything (teacher, ΔW*, data, noise) comes from ``np.random.default_rng(seed)``.
    true_rank : int
        k, the rank of every ΔW*; at most ``min(d_out, d_in − d_old)`` for ``fc1``.
    d_in, d_hidden, d_out : int
        Widths; fc1.W is (d_hidden, d_in), fc2.W is (d_out, d_hidden).
    d_old : int
        Number of input directions task A uses, 1 <= d_old < d_in.
    shifted : str or tuple of str
        Layers whose teacher weight task B changes: ``"fc1"`` and/or ``"fc2"``.
    singular_values : float or sequence of k floats
        σ of ΔW* (a number means k equal values).
    noise : float
        Std of the label noise on task B's train/val targets.
    n_train, n_val, n_old : int
        Rows of task B's training and validation data and of task A's data.
    activation : "tanh" (default: odd, so hidden features have mean 0), "gelu" or "relu".
    fc1_singular_values : None or sequence of p = min(d_hidden, d_in) floats > 0
        None (default): the pretrained fc1.W is ``orthogonal_weight`` — all p singular values
        equal, so its singular vectors are not unique (any basis of a degenerate singular
        space is one). Given σ⁰, the pretrained weight is instead

            W₀ = U₀ diag(σ⁰) V₀ᵀ

        keeping one side of the default ``orthogonal_weight``'s orthonormal directions (V₀ =
        its rows when d_hidden <= d_in, else U₀ = its columns) and drawing the other side from
        the separate stream ``default_rng([seed, 1])`` — so fc2, task A's subspace, ΔW* and
        every input x are the same as with None; only W₀ (and so the targets) change. Like
        a real pretrained weight, a decaying σ⁰ gives W₀ distinct, well-defined singular
        vectors (what ``analysis.intruder_dimensions`` compares with).

    Returns
    -------
    Task
        x_train (n_train, d_in), y_train (n_train, d_out), x_val (n_val, d_in),
        y_val (n_val, d_out), x_old (n_old, d_in), y_old (n_old, d_out).
    """
    seed = check_int("seed", seed, minimum=0)
    k = check_int("true_rank", true_rank, minimum=1)
    d_in, d_hidden, d_out = (check_int(n, v, minimum=1) for n, v in
                             (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out)))
    d_old = check_int("d_old", d_old, minimum=1)
    if d_old >= d_in:
        raise ValueError(f"d_old must be < d_in={d_in} (task B needs input directions task A "
                         f"never uses), got d_old={d_old}")
    n_train, n_val, n_old = (check_int(n, v, minimum=1) for n, v in
                             (("n_train", n_train), ("n_val", n_val), ("n_old", n_old)))
    shifted = _check_shifted("mlp", shifted)
    sigma = _check_sigma(singular_values, k)
    noise = check_number("noise", noise, nonnegative=True)
    activation = check_choice("activation", activation, sorted(F.ACTIVATIONS))
    sigma0 = _check_fc1_sigma(fc1_singular_values, min(d_hidden, d_in))

    rng = np.random.default_rng(seed)
    model = MLP(d_in, d_hidden, d_out, activation=activation, rng=rng)
    _check_rank_fits(k, shifted, {"fc1": model.fc1, "fc2": model.fc2}, d_in, d_old, "mlp")
    model.fc1.W[...] = orthogonal_weight(rng, d_hidden, d_in)
    if sigma0 is not None:
        model.fc1.W[...] = _with_spectrum(model.fc1.W, sigma0, np.random.default_rng([seed, 1]))
    model.fc2.W[...] = orthogonal_weight(rng, d_out, d_hidden)
    q_old, q_new = _input_subspaces(rng, d_in, d_old)
    teacher, delta = _shift(rng, model, "mlp", shifted, k, sigma, q_new)

    x_train = rng.standard_normal((n_train, d_in))
    y_train = teacher(x_train) + noise * rng.standard_normal((n_train, d_out))
    x_val = rng.standard_normal((n_val, d_in))
    y_val = teacher(x_val) + noise * rng.standard_normal((n_val, d_out))
    x_old = rng.standard_normal((n_old, d_old)) @ q_old.T           # (n_old, d_in), inside span(Q_A)
    y_old = model(x_old)
    config = dict(d_in=d_in, d_hidden=d_hidden, d_out=d_out, d_old=d_old, activation=activation,
                  n_train=n_train, n_val=n_val, n_old=n_old, fc1_singular_values=sigma0)
    return Task("mlp", model, teacher, shifted, delta, k, sigma, noise, x_train, y_train,
                x_val, y_val, x_old, y_old, q_old, seed, config)


# --------------------------------------------------------------------------- attention task


def attention_task(seed: int = 0, true_rank: int = 4, *, d_model: int = 64, n_heads: int = 4,
                   T: int = 8, d_old: int = 32, shifted=("q_proj", "v_proj"),
                   singular_values=2.0, noise: float = 0.01, n_train: int = 256,
                   n_val: int = 128, n_old: int = 128, causal: bool = False) -> Task:
    """Teacher–student regression with one multi-head self-attention layer.

    ``y = o_proj(attention(q_proj(x), k_proj(x), v_proj(x)))`` on sequences x of shape
    (N, T, d_model), every token drawn like an MLP input (task B: N(0, I); task A: inside
    task A's d_old-dimensional subspace). Task B shifts the projections named in ``shifted``
    (default q and v, the pair Hu et al. 2021 adapt, arXiv 2106.09685 §4.2 / Table 5).

    Note: attention has continuous symmetries — scores depend on q_proj and k_proj only
    through ``W_qᵀ W_k`` per head, outputs on v_proj and o_proj only through ``W_o W_v`` per
    head — so full fine-tuning can reach teacher B with weight changes other than ΔW*.

    Parameters: as ``mlp_task``, plus ``d_model``, ``n_heads`` (d_model divisible by it),
    ``T`` tokens per sequence and ``causal``. ``n_train``, ``n_val``, ``n_old`` count sequences.

    Returns
    -------
    Task
        x_* (N, T, d_model), y_* (N, T, d_model).
    """
    seed = check_int("seed", seed, minimum=0)
    k = check_int("true_rank", true_rank, minimum=1)
    d_model, n_heads, T = (check_int(n, v, minimum=1) for n, v in
                           (("d_model", d_model), ("n_heads", n_heads), ("T", T)))
    d_old = check_int("d_old", d_old, minimum=1)
    if d_old >= d_model:
        raise ValueError(f"d_old must be < d_model={d_model}, got d_old={d_old}")
    n_train, n_val, n_old = (check_int(n, v, minimum=1) for n, v in
                             (("n_train", n_train), ("n_val", n_val), ("n_old", n_old)))
    shifted = _check_shifted("attention", shifted)
    sigma = _check_sigma(singular_values, k)
    noise = check_number("noise", noise, nonnegative=True)
    causal = check_bool("causal", causal)

    rng = np.random.default_rng(seed)
    model = MultiHeadAttention(d_model, n_heads, causal=causal, rng=rng)
    layers = {n: getattr(model, n) for n in _LAYERS["attention"]}
    _check_rank_fits(k, shifted, layers, d_model, d_old, "attention")
    for name in _LAYERS["attention"]:
        layers[name].W[...] = orthogonal_weight(rng, d_model, d_model)
    q_old, q_new = _input_subspaces(rng, d_model, d_old)
    teacher, delta = _shift(rng, model, "attention", shifted, k, sigma, q_new)

    def noisy(x):
        y = teacher(x)
        return y + noise * rng.standard_normal(y.shape)

    x_train = rng.standard_normal((n_train, T, d_model))
    y_train = noisy(x_train)
    x_val = rng.standard_normal((n_val, T, d_model))
    y_val = noisy(x_val)
    x_old = rng.standard_normal((n_old, T, d_old)) @ q_old.T        # (n_old, T, d_model)
    y_old = model(x_old)
    config = dict(d_model=d_model, n_heads=n_heads, T=T, d_old=d_old, causal=causal,
                  n_train=n_train, n_val=n_val, n_old=n_old)
    return Task("attention", model, teacher, shifted, delta, k, sigma, noise, x_train, y_train,
                x_val, y_val, x_old, y_old, q_old, seed, config)


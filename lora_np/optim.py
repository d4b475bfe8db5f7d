"""Optimizers that update a module's *trainable* parameters in place.

``SGD`` and ``Adam`` (AdamW-style decoupled weight decay ``weight_decay``, written wd in the
formulas; Loshchilov & Hutter 2019, arXiv 1711.05101). Both take ``lr_multipliers``: a dict
from a parameter's last name (``"B"``) or its full dotted name (``"attn.q_proj.B"``) to a
factor m_θ on the learning rate — LoRA+ (Hayou et al. 2024, arXiv 2402.12354) is
``lr_multipliers={"B": λ}`` with λ = 16 (``loraplus_multipliers``): λ is LoRA+'s ratio, wd
the weight decay.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import fast
from .validate import check_number

__all__ = ["Optimizer", "SGD", "Adam", "loraplus_multipliers"]


def loraplus_multipliers(ratio: float = 16.0) -> dict[str, float]:
    """LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B learns ``ratio`` = λ times faster than A.

    Returns ``{"B": λ}`` for the ``lr_multipliers`` argument of ``SGD``/``Adam``:
    ``Adam(model, lr, lr_multipliers=loraplus_multipliers(16))`` gives A the rate ``lr`` and B
    ``16 · lr``. λ = 2⁴ = 16 is the starting value the LoRA+ authors recommend (arXiv 2402.12354;
    they stress the best λ depends on model and task); λ = 1 is plain LoRA.
    DoRA's magnitude ``m`` keeps the base rate. Raises TypeError for a non-number and
    ValueError unless λ is finite and > 0 (λ < 1 is allowed, though the paper argues λ ≫ 1).
    """
    return {"B": check_number("LoRA+ ratio λ", ratio, positive=True)}


class Optimizer:
    """Base class: holds the model, the trainable parameters at construction time, and the
    per-parameter learning rates ``lr · multiplier``."""

    def __init__(self, model, lr, lr_multipliers=None):
        self.model = model
        self.lr = check_number("lr", lr, positive=True)
        self.params = model.trainable_parameters()
        if not self.params:
            raise ValueError("optimizer: the model has no trainable parameters")
        lr_multipliers = dict(lr_multipliers or {})
        names = set(self.params) | {n.rsplit(".", 1)[-1] for n in self.params}
        for key, value in lr_multipliers.items():
            if key not in names:
                raise ValueError(f"lr_multipliers: {key!r} names no trainable parameter; "
                                 f"trainable names are {sorted(self.params)}")
            check_number(f"lr_multipliers[{key!r}]", value, positive=True)
        self.lr_multipliers = lr_multipliers
        self.t = 0

    def multiplier(self, name: str) -> float:
        """Learning-rate factor for parameter ``name`` (full name wins over last name)."""
        if name in self.lr_multipliers:
            return float(self.lr_multipliers[name])
        return float(self.lr_multipliers.get(name.rsplit(".", 1)[-1], 1.0))

    def _grads(self):
        # a step on a merged LoRA layer would change A, B under W = W₀ + ΔW, and unmerge would
        # then subtract a different ΔW: W₀ would be lost
        merged = [p or "(model)" for p, m in self.model.named_modules() if getattr(m, "merged", False)]
        if merged:
            raise ValueError(f"optimizer: layers {merged} are merged; expected unmerged layers "
                             "for training: call unmerge_lora(model) first")
        grads = self.model.gradients()
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise ValueError(f"optimizer: no gradient for {missing}; were parameters frozen or "
                             "LoRA added after the optimizer was created?")
        return grads

    def zero_grad(self):
        self.model.zero_grad()

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments); 0 for plain SGD."""
        return 0


class SGD(Optimizer):
    """``θ ← θ − lr · m_θ · g`` (plain gradient descent, optional momentum μ:
    ``v ← μ v + g``, ``θ ← θ − lr · m_θ · v``)."""

    def __init__(self, model, lr, momentum=0.0, lr_multipliers=None):
        super().__init__(model, lr, lr_multipliers)
        self.momentum = check_number("momentum", momentum, nonnegative=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be < 1, got {momentum}")
        self.velocity = {n: np.zeros_like(p) for n, p in self.params.items()} if self.momentum else {}

    def step(self):
        grads = self._grads()
        self.t += 1
        for name, p in self.params.items():
            g = grads[name]
            if self.momentum:
                v = self.velocity[name]
                v *= p.dtype.type(self.momentum)
                v += g
                g = v
            p -= p.dtype.type(self.lr * self.multiplier(name)) * g

    def state_bytes(self) -> int:
        return int(sum(v.nbytes for v in self.velocity.values()))


class Adam(Optimizer):
    """Adam with decoupled weight decay wd = ``weight_decay`` (AdamW when wd > 0)::

        m ← β₁ m + (1 − β₁) g,        v ← β₂ v + (1 − β₂) g²
        θ ← θ − lr·m_θ·wd·θ − lr·m_θ · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

    (m_θ: θ's learning-rate multiplier.) The decay is outside the adaptive normalisation, so it
    shrinks every weight by the factor (1 − lr·m_θ·wd), whatever its gradient.

    The formula is ``_update``; a large parameter is updated slice by slice on two threads
    (``lora_np.fast.map_chunks``: the same operations per element, so the same bits, with each
    slice's passes in the cache instead of a dozen passes over main memory).
    """

    def __init__(self, model, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 lr_multipliers=None):
        super().__init__(model, lr, lr_multipliers)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = check_number("eps", eps, positive=True)
        self.weight_decay = check_number("weight_decay", weight_decay, nonnegative=True)
        self.m = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: np.zeros_like(p) for n, p in self.params.items()}

    def step(self):
        grads = self._grads()
        self.t += 1
        for name, p in self.params.items():
            update = functools.partial(self._update, lr=self.lr * self.multiplier(name))
            g, m, v = grads[name], self.m[name], self.v[name]
            if p.size < fast.MIN_CHUNKED or not all(a.flags.c_contiguous for a in (p, g, m, v)):
                update(p, g, m, v)
            else:                                # the same update, slice by slice (lora_np.fast)
                fast.map_chunks(update, p, g, m, v)

    def _update(self, p, g, m, v, lr):
        """The update of one parameter (or of one slice of it: every operation is elementwise),
        in place on ``p``, ``m``, ``v``, at learning rate ``lr`` (= lr · m_θ)."""
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        f = p.dtype.type                         # Python/NumPy scalars in p's dtype: no promotion
        # one scratch array, reused with out= (each `a * b` would allocate)
        tmp = np.multiply(g, f(1 - b1))
        m *= f(b1)
        m += tmp                                 # m ← β₁ m + (1 − β₁) g
        np.multiply(g, g, out=tmp)
        tmp *= f(1 - b2)
        v *= f(b2)
        v += tmp                                 # v ← β₂ v + (1 − β₂) g²
        if self.weight_decay:
            p *= f(1 - lr * self.weight_decay)   # θ ← (1 − lr·m_θ·wd) θ
        np.sqrt(v, out=tmp)
        tmp *= f(1 / math.sqrt(bc2))
        tmp += f(self.eps)                       # √(v / (1 − β₂ᵗ)) + ε
        np.divide(m, tmp, out=tmp)
        tmp *= f(lr / bc1)
        p -= tmp                                 # θ ← θ − lr · (m / (1 − β₁ᵗ)) / (…)

    def state_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.m.values()) + sum(a.nbytes for a in self.v.values()))

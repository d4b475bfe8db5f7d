"""LoRA: a frozen linear layer plus a trainable low-rank update ``ΔW = s · B A``.

* ``LoRALinear`` wraps a ``Linear``: ``Y = X Wᵀ + b + s (X Aᵀ) Bᵀ`` (Hu et al. 2021,
  arXiv 2106.09685, eq. 3, in the PyTorch ``(d_out, d_in)`` layout).
* ``LoRAEmbedding`` wraps an ``Embedding``: ``Y = W[idx] + s A[:, idx]ᵀ Bᵀ``, ΔW = s (B A)ᵀ
  (loralib's and PEFT's layout, A (r, V), B (d, r)).
* ``add_lora`` wraps chosen ``Linear`` and ``Embedding`` children of any module tree and freezes
  the rest.
* ``merge_lora`` / ``unmerge_lora`` fold ΔW into W for inference (no extra latency) and back.
* ``save_adapter`` / ``load_adapter`` store only A, B (and DoRA's m) and the config: lora_np's ``.npz``, or
  PEFT's adapter folder with ``format="peft"`` (``adapter_config.json`` + ``adapter_model.safetensors``;
  ``lora_np.peft``); never unpickled.

Variants (notebook 07): ``rslora=True`` (s = α/√r, rsLoRA), ``init="pissa"`` (PiSSA: A, B from
the top-r singular triplets of W, frozen W replaced by the residual), ``DoRALinear`` /
``add_lora(..., use_dora=True)`` (DoRA: magnitude m times the direction of W + sBA). LoRA+ is
an optimizer setting, ``lora_np.optim.loraplus_multipliers``.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile

import numpy as np

from . import functional as F
from .modules import Embedding, Linear, Module, make_rng
from .validate import check_bool, check_choice, check_int, check_number, check_probability

__all__ = ["LoRALinear", "DoRALinear", "LoRAEmbedding", "pissa_factors", "add_lora", "merge_lora", "unmerge_lora",
           "save_adapter", "load_adapter", "lora_layers", "lora_scale", "randomize_lora", "INIT_SCHEMES"]

INIT_SCHEMES = ("kaiming", "gaussian", "pissa")
ADAPTER_FORMAT = "lora_np-adapter"
ADAPTER_VERSION = 1


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The LoRA scale s: ``alpha / r`` (Hu et al. 2021) or ``alpha / sqrt(r)`` (rsLoRA,
    Kalajdzievski 2023, arXiv 2312.03732). Raises TypeError/ValueError for an r that is not a
    positive int, an alpha that is not a finite number > 0, or an rslora that is not a bool."""
    r = check_int("r", r, minimum=1)
    alpha = check_number("alpha", alpha, positive=True)
    return alpha / (math.sqrt(r) if check_bool("rslora", rslora) else r)


def _validate_lora_args(base, r, alpha, dropout, rslora, init):
    """Every LoRALinear argument checked, before anything is built."""
    if not isinstance(base, Linear):
        raise TypeError(f"LoRALinear wraps a Linear layer, got {type(base).__name__}")
    lora_scale(alpha, r, rslora)                     # r >= 1 an int, alpha > 0, rslora a bool
    r_max = min(base.d_in, base.d_out)
    if r > r_max:                                    # a rank-r product needs r <= both widths
        raise ValueError(f"r must satisfy 1 <= r <= min(d_in, d_out) = {r_max}, got r={r}")
    check_probability("dropout", dropout)
    check_choice("init", init, INIT_SCHEMES)


def pissa_factors(W, r, scale):
    """PiSSA's A and B: the top-r singular triplets of W, split so that ``s·B A`` is W's best
    rank-r approximation (Meng et al. 2024, arXiv 2404.02948, method section).

    With the SVD ``W = U diag(σ) Vᵀ`` (σ sorted descending)::

        B = U[:, :r] diag(√(σ_:r / s))      (d_out, r)
        A = diag(√(σ_:r / s)) V[:, :r]ᵀ      (r, d_in)
        s·B A = U_r diag(σ_:r) V_rᵀ          (the √σ split gives A and B the same scale)

    The SVD runs in float64 whatever W's dtype (then A, B are cast to it): O(d_out d_in min(d_in, d_out)),
    once. PEFT offers a randomized SVD for large W (``"pissa_niter_k"``); at lora_np's sizes the
    exact SVD is instant.

    Parameters: W (d_out, d_in); r int; scale s > 0.   Returns ``(A, B)``.
    """
    U, S, Vt = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
    root = np.sqrt(S[:r] / float(scale))          # (r,)
    B = U[:, :r] * root                           # (d_out, r), column j scaled by √(σ_j/s)
    A = root[:, None] * Vt[:r]                    # (r, d_in),  row j scaled by √(σ_j/s)
    return A.astype(W.dtype), B.astype(W.dtype)


class _Adapter(Module):
    """What every LoRA layer shares: a frozen ``W``, trainable factors ``adapter_names``, a
    ``delta_weight()`` of W's shape, and merge/unmerge (``W ← W ± ΔW``). ``lora_layers`` finds
    the layers by this class."""

    #: the trainable arrays an adapter file stores
    adapter_names = ("A", "B")
    #: the config entries a saved adapter must share with the layer it is loaded into
    _match_keys = ("r", "alpha", "rslora")

    def delta_weight(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- merge / unmerge ----------------------------------------------------------------
    def merge(self):
        """``W ← W + ΔW`` in place, so inference costs one GEMM. A second merge does nothing
        (with a warning). Raises ValueError, leaving W unchanged, if the result is not finite."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge: already merged; nothing to do", stacklevel=2)
            return self
        new_W, merge_norm = self._merged()
        self.W[...] = new_W
        object.__setattr__(self, "_merge_norm", merge_norm)
        self.merged = True
        return self

    def _merged(self):
        """What ``merge`` writes, checked and not yet written: ``(W + ΔW, None)`` (DoRALinear:
        ``(W', n)``). ValueError if the merged weight is not finite. ``merge_lora`` runs it on
        every layer before merging any."""
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is reported below, as an error
            delta = self.delta_weight()
            new_W = self.W + delta
        if not np.all(np.isfinite(new_W)):
            raise ValueError(f"{type(self).__name__}.merge: expected W + ΔW to be finite, got "
                             f"non-finite entries (max |ΔW| = {np.abs(delta).max()}); W left unchanged")
        return new_W, None

    def unmerge(self):
        """``W ← W − ΔW``: restores the frozen W₀ (up to rounding). No-op with a warning if not merged."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge: not merged; nothing to do", stacklevel=2)
            return self
        self.W[...] = self._unmerged_W()
        object.__setattr__(self, "_merge_norm", None)
        self.merged = False
        return self

    def _unmerged_W(self) -> np.ndarray:
        return self.W - self.delta_weight()

    def _refuse_merged(self, kind):
        if kind == "merged" or self.merged:       # merged since forward: the cache's W changed
            raise ValueError(f"{type(self).__name__}.backward: the layer is merged (W holds the "
                             "merged weight); call unmerge() before training, then forward again")


class LoRALinear(_Adapter):
    """A ``Linear`` with frozen ``W`` (d_out, d_in), ``b`` and a trainable update ``s·B A``.

    Parameters
    ----------
    base : Linear    the layer to adapt; its ``W`` and ``b`` arrays are shared, not copied
                     (except W with ``init="pissa"``, see below)
    r : int          rank, 1 <= r <= min(d_in, d_out)
    alpha : float    > 0; the scale is ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rslora)
    dropout : float  dropout probability on the LoRA branch's input (training mode only)
    init : "kaiming" (A ~ U(−1/√d_in, 1/√d_in), PEFT's default) or "gaussian" (A ~ N(0, 1/r²),
           PEFT's ``init_lora_weights="gaussian"``). B = 0 either way, so the adapted layer
           starts out *exactly* equal to the base layer — and A must not be zero, or no gradient
           would ever reach B (dB = s Gᵀ X Aᵀ).
           "pissa" (Meng et al. 2024, arXiv 2404.02948; PEFT's ``init_lora_weights="pissa"``):
           A, B from the top-r singular triplets of W (``pissa_factors``), so ``s·B A`` is the
           best rank-r part of W, and the layer's frozen W becomes the residual
           ``W_res = W − s·B A`` — a *copy*: ``base.W`` is left untouched, and this layer no
           longer shares its W with ``base``. The output at init equals the base's up to
           rounding. A PiSSA adapter only makes sense on top of that residual: a saved PiSSA
           adapter loads only into a layer built with ``init="pissa"`` from the same W.

    Attributes: ``W``, ``b`` (frozen), ``A`` (r, d_in), ``B`` (d_out, r), ``scale``, ``merged``.
    """

    #: the trainable arrays an adapter file stores (DoRALinear adds "m")
    adapter_names = ("A", "B")
    _match_keys = ("r", "alpha", "rslora", "d_in", "d_out")

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, init="kaiming", rng=None):
        rng = self._setup(base, r, alpha, dropout, rslora, init, rng)
        if init == "pissa":
            # PiSSA: the principal part moves into s·B A, the frozen W keeps the residual. The
            # residual is a NEW array: the caller's base.W is never changed.
            A, B = pissa_factors(base.W, self.r, self.scale)
            W = base.W - F.lora_delta_weight(A, B, self.scale)
        else:
            A = self._init_A(rng).astype(self.dtype)
            B = np.zeros((self.d_out, self.r), dtype=self.dtype)
            W = base.W                                              # shared with base, not copied
        self.add_parameter("W", W, trainable=False)
        if base.bias is not None:
            self.add_parameter("b", base.bias, trainable=False)
        self.add_parameter("A", A)
        self.add_parameter("B", B)

    def _setup(self, base, r, alpha, dropout, rslora, init, rng):
        """Every argument checked, then the attributes every LoRA layer on a Linear-like ``base``
        has (widths, dtype, r, alpha, dropout, rslora, init, scale, not merged); returns the rng.
        The parameters (W, b, A, B) are the caller's: ``QLoRALinear`` keeps no float W."""
        _validate_lora_args(base, r, alpha, dropout, rslora, init)
        Module.__init__(self)
        rng = make_rng(rng)
        self.d_in, self.d_out, self.dtype = base.d_in, base.d_out, base.dtype
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.rslora, self.init = bool(rslora), init
        self.scale = lora_scale(alpha, r, rslora)
        self.merged = False
        object.__setattr__(self, "_rng", rng)
        object.__setattr__(self, "_merge_norm", None)   # DoRA's n at merge time (see DoRALinear)
        return rng

    def _init_A(self, rng):
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(self.d_in)
            return rng.uniform(-bound, bound, size=(self.r, self.d_in))
        return rng.normal(0.0, 1.0 / self.r, size=(self.r, self.d_in))

    @property
    def bias(self):
        return self._params.get("b")

    def delta_weight(self) -> np.ndarray:
        """``ΔW = s · B A`` of shape (d_out, d_in) (``functional.lora_delta_weight``). Formed
        for merge and analysis, never in forward or backward."""
        return F.lora_delta_weight(self.A, self.B, self.scale)

    # --- forward / backward -----------------------------------------------------------
    #: the cache's tag and the gradients the functional backward returns after dx, in order
    _kind, _grad_names = "lora", ("A", "B", "W", "b")

    def _functional_forward(self, x, mask):      # DoRALinear: dora_linear_forward
        return F.lora_linear_forward(x, self.W, self.bias, self.A, self.B, self.scale, mask)

    def _functional_backward(self, dout, cache, **need):
        return F.lora_linear_backward(dout, cache, **need)

    def forward(self, x):
        x = self._check_input(x, self.d_in)
        if self.merged:                      # W already holds the merged weight: one plain GEMM
            y, cache = F.linear_forward(x, self.W, self.bias)
            self._store(("merged", cache), y.shape)
            return y
        y, cache = self._functional_forward(x, self._dropout_mask(x))
        if cache.dropout_mask is not None and "W" not in self._grads:
            cache = cache._replace(x=None)   # backward reads X̃ = X ⊙ mask, not X (W is frozen)
        self._store((self._kind, cache), y.shape)
        return y

    def _dropout_mask(self, x):
        """Inverted-dropout mask for the LoRA branch (None in eval mode or with dropout 0)."""
        if not (self.training and self.dropout > 0):
            return None
        keep = 1.0 - self.dropout
        return (self._rng.random(x.shape) < keep).astype(self.dtype) / self.dtype.type(keep)

    def backward(self, dout):
        (kind, cache), dout = self._check_backward(dout)
        self._refuse_merged(kind)
        # after unfreeze() W, b train too: their gradients are asked for, not left at 0
        need_dW, need_db = "W" in self._grads, "b" in self._grads
        self._check_input_kept(cache.x, need_dW)
        # need_dx: the caller may not read dX (backward(dout, need_input_grad=False)): skip its GEMMs
        dx, *grads = self._functional_backward(dout, cache, need_dW=need_dW, need_db=need_db,
                                               need_dx=self._input_grad_needed())
        for name, grad in zip(self._grad_names, grads):
            self._accumulate(name, grad)
        return dx

    def config(self) -> dict:
        cfg = {"r": self.r, "alpha": self.alpha, "rslora": self.rslora, "d_in": self.d_in,
               "d_out": self.d_out, "dropout": self.dropout, "init": self.init, "dora": False}
        if self.init == "pissa":
            # a PiSSA adapter belongs to its residual base: record ‖W_res‖_F to check on load
            cfg["W_res_norm"] = float(np.linalg.norm(self.W))
        return cfg

    def extra_repr(self):
        return (f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, alpha={self.alpha}, "
                f"scale={self.scale:.4g}, merged={self.merged}")


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, arXiv 2402.09353): magnitude times direction, per output row.

    ``W'_i = m_i (W + s B A)_i / ‖(W + s B A)_i‖``,   ``Y = X W'ᵀ + b``

    Parameters are LoRALinear's (``init="pissa"`` works too) plus

    detach_norm : bool   False (default): exact gradient. True: the paper's cheaper backward
                         (§4.3) that treats the norm as a constant; same forward, same dm,
                         different dA and dB (see ``functional.dora_linear_backward``).

    Attributes: LoRALinear's plus ``m`` (d_out,), trainable, initialised to the row norms of
    ``W + s B A`` (= of W, since B = 0), so the layer starts out exactly equal to the base.
    Norms are per *output row* of the (d_out, d_in) weight, as in PEFT (the paper writes
    column norms of the transposed (d_in, d_out) matrix — the same numbers). Dropout, if any,
    acts on the LoRA branch only.
    """

    adapter_names = ("A", "B", "m")
    _kind, _grad_names = "dora", ("A", "B", "m", "W", "b")

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, init="kaiming", rng=None,
                 detach_norm=False):
        detach_norm = check_bool("detach_norm", detach_norm)
        if isinstance(base, Linear):
            zero_rows = np.flatnonzero(np.linalg.norm(base.W, axis=1) == 0)
            if zero_rows.size:
                raise ValueError(f"DoRALinear: W has all-zero rows {zero_rows.tolist()}; "
                                 "DoRA needs a direction W_i / ‖W_i‖ for every row")
        super().__init__(base, r, alpha, dropout=dropout, rslora=rslora, init=init, rng=rng)
        self.detach_norm = detach_norm
        _, n = F.dora_weight_norm(self.W, self.A, self.B, self.scale)
        self.add_parameter("m", n)                 # the very norm forward divides by: m/n = 1

    def _functional_forward(self, x, mask):
        return F.dora_linear_forward(x, self.W, self.bias, self.A, self.B, self.m, self.scale,
                                     self.detach_norm, mask)

    def _functional_backward(self, dout, cache, **need):
        return F.dora_linear_backward(dout, cache, **need)

    def effective_weight(self) -> np.ndarray:
        """``W' = diag(m / n) (W + s B A)`` of shape (d_out, d_in): the weight the layer applies."""
        if self.merged:
            return self.W.copy()
        return F.dora_weight(self.W, self.A, self.B, self.m, self.scale)[0]

    def _unmerged_W(self) -> np.ndarray:
        # W' = diag(m / n) (W₀ + sBA)  =>  W₀ = diag(n / m) W' − sBA, with n stored at merge time
        return self.W * (self._merge_norm / self.m)[:, None] - F.lora_delta_weight(self.A, self.B, self.scale)

    def delta_weight(self) -> np.ndarray:
        """``W' − W₀`` (d_out, d_in): what ``merge`` adds to the frozen weight. Unlike LoRA's
        ``s B A`` it is not low-rank in general (each row is also rescaled by m / n)."""
        if self.merged:
            return self.W - self._unmerged_W()
        return self.effective_weight() - self.W

    def merge(self) -> "DoRALinear":
        """``W ← W' = diag(m / n) (W + s B A)`` in place, remembering ``n`` so that ``unmerge``
        (``W ← diag(n / m) W' − s B A``) can undo it. Raises ValueError (W unchanged) if an
        entry of m is 0 (that row of W would be erased for good) or if W' is not finite."""
        return super().merge()

    def _merged(self):
        zero = np.flatnonzero(self.m == 0)
        if zero.size:
            raise ValueError(f"DoRALinear.merge: zero magnitude m at rows {zero.tolist()}; merging "
                             "would erase those rows of W and unmerge could not restore them; "
                             "W left unchanged")
        with np.errstate(over="ignore", invalid="ignore"):   # overflow is reported below, as an error
            new_W, n = F.dora_weight(self.W, self.A, self.B, self.m, self.scale)
        if not np.all(np.isfinite(new_W)):
            raise ValueError("DoRALinear.merge: W' has non-finite entries; W left unchanged")
        return new_W, n

    def config(self) -> dict:
        return {**super().config(), "dora": True, "detach_norm": self.detach_norm}

    def extra_repr(self):
        return super().extra_repr() + f", dora=True, detach_norm={self.detach_norm}"


class LoRAEmbedding(_Adapter):
    """An ``Embedding`` with frozen table ``W`` (V, d) and a trainable update ``ΔW = s (B A)ᵀ``.

    ``Y = W[idx] + s · A[:, idx]ᵀ Bᵀ`` with ``A`` (r, V) and ``B`` (d, r) — loralib's and PEFT's
    layout (``lora_embedding_A``, ``lora_embedding_B``): the table is a linear layer on one-hot
    inputs whose (d_out, d_in) weight is ``Wᵀ`` (d, V), and ``s B A`` is LoRA's update of that
    weight (``functional.lora_embedding_forward``). ``B A`` is never formed in forward or backward.

    Parameters
    ----------
    base : Embedding   the table to adapt; its ``W`` is shared, not copied
    r : int            rank, 1 <= r <= min(num_embeddings, d_model)
    alpha : float      > 0; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rslora)
    rslora : bool
    rng                for A's init (a Generator or an int seed; None means seed 0)

    Init: ``B = 0`` and ``A ~ N(0, 1)``, lora_np's rule for every LoRA layer, so the adapted
    table starts out *exactly* equal to the base. loralib and PEFT do it the other way round
    for embeddings (``A = 0``, ``B ~ N(0, 1)``). Either works: the product is 0 at init, and the
    zero factor still gets a gradient because the other one is not zero (here
    ``dB = s Gᵀ A[:, idx]ᵀ``; theirs ``dA[:, v] = s Σ Bᵀ G_n``). N(0, 1) because ``A[:, idx]``
    is itself a lookup — the branch's ``H = X Aᵀ`` with a one-hot X — so unit entries give H the
    unit scale that ``LoRALinear``'s A gives ``X Aᵀ`` for unit-scale inputs.

    No dropout (loralib and PEFT apply none to an embedding's branch either), no PiSSA and no
    DoRA for embeddings. Attributes: ``W`` (frozen), ``A``, ``B``, ``scale``, ``merged``.
    """

    takes_token_ids = True

    _match_keys = ("kind", "r", "alpha", "rslora", "num_embeddings", "d_model")

    def __init__(self, base, r, alpha, rslora=False, rng=None):
        if not isinstance(base, Embedding):
            raise TypeError(f"LoRAEmbedding wraps an Embedding, got {type(base).__name__}")
        lora_scale(alpha, r, rslora)                 # r >= 1 an int, alpha > 0, rslora a bool
        r_max = min(base.num_embeddings, base.d_model)
        if r > r_max:
            raise ValueError(f"r must satisfy 1 <= r <= min(num_embeddings, d_model) = {r_max}, "
                             f"got r={r}")
        super().__init__()
        self.num_embeddings, self.d_model, self.dtype = base.num_embeddings, base.d_model, base.dtype
        self.r, self.alpha, self.rslora = int(r), float(alpha), bool(rslora)
        self.scale = lora_scale(alpha, r, rslora)
        self.merged = False
        object.__setattr__(self, "_merge_norm", None)
        A = make_rng(rng).standard_normal((self.r, self.num_embeddings)).astype(self.dtype)
        self.add_parameter("W", base.W, trainable=False)            # shared with base, not copied
        self.add_parameter("A", A)
        self.add_parameter("B", np.zeros((self.d_model, self.r), dtype=self.dtype))

    def delta_weight(self) -> np.ndarray:
        """``ΔW = s (B A)ᵀ`` of shape (num_embeddings, d_model), the table's update
        (``functional.lora_delta_weight`` transposed). Formed for merge and analysis only."""
        return F.lora_delta_weight(self.A, self.B, self.scale).T

    def forward(self, idx):
        idx = self._check_ids(idx, self.num_embeddings)
        if self.merged:                      # W already holds W + ΔW: a plain lookup
            y, cache = F.embedding_forward(idx, self.W)
            self._store(("merged", cache), y.shape)
            return y
        y, cache = F.lora_embedding_forward(idx, self.W, self.A, self.B, self.scale)
        self._store(("lora", cache), y.shape)
        return y

    def backward(self, dout):
        (kind, cache), dout = self._check_backward(dout)
        self._refuse_merged(kind)
        need_dW = "W" in self._grads         # after unfreeze() the table trains too
        grads = F.lora_embedding_backward(dout, cache, need_dW=need_dW)
        for name, grad in zip(("A", "B", "W"), grads):
            self._accumulate(name, grad)
        return None                          # integer ids have no gradient

    def config(self) -> dict:
        return {"kind": "embedding", "r": self.r, "alpha": self.alpha, "rslora": self.rslora,
                "num_embeddings": self.num_embeddings, "d_model": self.d_model, "dora": False}

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, d_model={self.d_model}, r={self.r}, "
                f"alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}")


# ------------------------------------------------------------------------ model level


def lora_layers(model: Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    """Dotted path -> LoRA layer (``LoRALinear``, ``DoRALinear``, ``LoRAEmbedding``) for every
    adapted layer in ``model``."""
    return {p: m for p, m in model.named_modules() if isinstance(m, _Adapter)}


def randomize_lora(model: Module, rng=None, std: float = 0.5) -> Module:
    """Move every LoRA layer of ``model`` off its ``B = 0`` init: ``B ← std · N(0, 1)`` entries.

    For gradient checks. At the standard init B = 0 the true ``dA = s Bᵀ (dL/dW)`` is exactly
    zero, so a wrong dA formula would pass a finite-difference check silently; with a random
    non-zero B every factor has a non-zero gradient. This changes the model's function (the
    layer no longer starts equal to its base), so never call it before training.

    ``rng``: a Generator or an int seed (None means seed 0). Returns ``model`` (changed in place).
    """
    if not isinstance(model, Module):
        raise TypeError(f"randomize_lora: model must be a lora_np Module, got {type(model).__name__}")
    std = check_number("std", std, positive=True)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("randomize_lora: the model has no LoRA layers; call add_lora first")
    rng = make_rng(rng)
    for m in layers.values():
        m.B[...] = rng.standard_normal(m.B.shape) * std
    return model


def _resolve_targets(model: Module, targets) -> dict[str, Module]:
    """Map each target name to the modules it names. A target matches a module whose dotted
    path equals it or ends with ``"." + target`` (so ``"q_proj"`` matches ``"attn.q_proj"``)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("add_lora: targets is empty; name at least one Linear layer")
    modules = dict(model.named_modules())
    linear_paths = sorted(p for p, m in modules.items()
                          if isinstance(m, (Linear, Embedding, _Adapter)) and p)
    kinds = ("Linear or Embedding layers" if any(isinstance(m, (Embedding, LoRAEmbedding))
                                                  for m in modules.values()) else "Linear layers")
    chosen = {}
    for t in targets:
        if not isinstance(t, str):
            raise TypeError(f"add_lora: target names are strings, got {t!r}")
        hits = [p for p in modules if p and (p == t or p.endswith("." + t))]
        if not hits:
            raise ValueError(f"add_lora: unknown target {t!r}; the {kinds} of this model "
                             f"are {linear_paths}")
        for p in hits:
            m = modules[p]
            if isinstance(m, _Adapter):
                raise ValueError(f"add_lora: layer {p!r} already has LoRA; adding it twice would "
                                 "stack two adapters")
            if not isinstance(m, (Linear, Embedding)):
                what = "not a Linear or an Embedding" if kinds != "Linear layers" else "not a Linear"
                raise TypeError(f"add_lora: target {t!r} names {p!r}, a {type(m).__name__}, "
                                f"{what}; {kinds} are {linear_paths}")
            chosen[p] = m
    return chosen


def _embedding_kwargs(path, use_dora, lora_kwargs) -> dict:
    """The ``add_lora`` options a ``LoRAEmbedding`` takes (rslora), after refusing the ones it
    does not support for the embedding at ``path``: DoRA, dropout > 0, an init scheme."""
    if use_dora:
        raise ValueError(f"add_lora: {path!r} is an Embedding; DoRA on an embedding is not "
                         "supported (use_dora=True adapts Linear layers only)")
    if lora_kwargs.get("dropout", 0.0) != 0.0:
        raise ValueError(f"add_lora: {path!r} is an Embedding, whose LoRA branch takes no dropout "
                         f"(as in loralib and PEFT); got dropout={lora_kwargs['dropout']!r}")
    if "init" in lora_kwargs:
        raise ValueError(f"add_lora: {path!r} is an Embedding, whose LoRA init is fixed (B = 0, "
                         f"A ~ N(0, 1)); init={lora_kwargs['init']!r} applies to Linear layers only")
    return {k: v for k, v in lora_kwargs.items() if k == "rslora"}


def _linear_adapter(path, m, cls):
    """The adapter class for the Linear ``m``: the class its type names in ``lora_class`` (a
    quantised layer names the adapter that reads its stored codes), else ``cls`` (LoRALinear or
    DoRALinear). DoRA on a layer with its own adapter class is refused."""
    own = getattr(type(m), "lora_class", None)
    if own is None:
        return cls
    if cls is DoRALinear:
        raise ValueError(f"add_lora: {path!r} is a {type(m).__name__}, whose adapter is {own.__name__}; "
                         "use_dora=True is not supported on it")
    return own


def add_lora(model: Module, targets, r: int, alpha: float, use_dora: bool = False,
             **lora_kwargs) -> Module:
    """Wrap the named ``Linear`` layers of ``model`` in ``LoRALinear`` (and ``Embedding`` layers
    in ``LoRAEmbedding``) and freeze everything else.

    ``targets``: names like ``"q_proj"`` (matches every layer with that last name) or dotted
    paths like ``"attn.v_proj"``, ``"blocks.1.attn.q_proj"``, ``"tok_emb"``. ``lora_kwargs`` go
    to ``LoRALinear`` (dropout, rslora, init, rng); an Embedding takes rslora and rng only (a
    dropout > 0 or an init with an Embedding target is refused). ``use_dora=True`` wraps in
    ``DoRALinear`` instead (which also takes ``detach_norm``; not for Embedding targets).
    Everything is checked before anything changes, so a bad call leaves ``model`` as it
    was. Returns ``model`` (changed in place).
    """
    use_dora = check_bool("use_dora", use_dora)
    if "detach_norm" in lora_kwargs and not use_dora:
        raise TypeError("add_lora: detach_norm is a DoRA option; pass use_dora=True with it")
    cls = DoRALinear if use_dora else LoRALinear
    chosen = _resolve_targets(model, targets)
    rng = make_rng(lora_kwargs.pop("rng", None))
    # build every wrapper first (this validates r, alpha, ...) and only then change the model
    wrapped = {p: LoRAEmbedding(m, r, alpha, rng=rng, **_embedding_kwargs(p, use_dora, lora_kwargs))
               if isinstance(m, Embedding) else _linear_adapter(p, m, cls)(m, r, alpha, rng=rng, **lora_kwargs)
               for p, m in chosen.items()}
    # freeze everything else, but not the factors of adapters added by an earlier add_lora call
    # (model.freeze() would silently stop training them)
    for _, m in model.named_modules():
        keep = m.adapter_names if isinstance(m, _Adapter) else ()
        for name in [n for n in m._params if n not in keep]:
            m._frozen.add(name)
            m._grads.pop(name, None)
    for path, layer in wrapped.items():
        parent_path, _, name = path.rpartition(".")
        parent = dict(model.named_modules())[parent_path]
        setattr(parent, name, layer)
    return model


def merge_lora(model: Module) -> Module:
    """Merge every LoRA layer of ``model`` (W ← W + ΔW; DoRA: W ← W'). All or nothing: every
    layer's merge is checked (the layer's own check) before any W changes."""
    layers = {p: m for p, m in lora_layers(model).items() if not m.merged}
    for p, m in layers.items():
        try:
            m._merged()                 # checked, then dropped: one merged weight alive at a time
        except ValueError as e:
            raise ValueError(f"merge_lora: layer {p!r} cannot be merged, model left unchanged: {e}") from None
    for m in layers.values():
        m.merge()
    return model


def unmerge_lora(model: Module) -> Module:
    """Undo ``merge_lora`` for every merged LoRA layer."""
    for m in lora_layers(model).values():
        if m.merged:
            m.unmerge()
    return model


# --------------------------------------------------------------------- adapter files

from . import peft as _peft  # noqa: E402  (PEFT's folder layout; peft sits below lora)

ADAPTER_FORMATS = ("npz", "peft")


def _saveable_layers(model: Module, who: str) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{who}: the model has no LoRA layers; call add_lora first")
    if any(m.merged for m in layers.values()):
        raise ValueError(f"{who}: unmerge the model first (A and B are saved, W is not)")
    return layers


def save_adapter(model: Module, path, format: str = "npz", *, base_model_name_or_path=None,
                 task_type=None) -> None:
    """Save only the LoRA factors and their config: an ``.npz`` file (``format="npz"``, the
    default) or PEFT's adapter folder (``format="peft"``).

    ``"npz"``: keys ``"<layer>.A"``, ``"<layer>.B"`` (and ``"<layer>.m"`` for DoRA layers) and
    ``"__config__"`` (a JSON string stored as a NumPy unicode array, so loading never needs
    pickle), written to exactly ``path``.

    ``"peft"``: ``path`` is a folder (created if missing) that receives ``adapter_config.json``
    and ``adapter_model.safetensors`` as Hugging Face PEFT writes them (``save_pretrained``), so
    ``PeftModel.from_pretrained(torch_model, path)`` loads it onto a PyTorch model whose modules
    have the same dotted names and shapes. Keys ``base_model.model.<layer>.lora_A.weight`` (A,
    (r, d_in)), ``….lora_B.weight`` (B, (d_out, r)), ``….lora_magnitude_vector`` (DoRA's m,
    (d_out,)), ``….lora_embedding_A`` / ``….lora_embedding_B`` (an Embedding's A (r, V), B (d, r));
    config ``peft_type "LORA"``, ``r``, ``lora_alpha`` (layers that differ: ``rank_pattern`` /
    ``alpha_pattern``), ``target_modules``, ``lora_dropout``, ``use_rslora``, ``use_dora``,
    ``init_lora_weights``, ``bias "none"``, ``fan_in_fan_out false``, ``task_type`` and
    ``base_model_name_or_path`` (both None unless given). The arrays keep the model's dtype.
    Refused (PEFT has one value for all layers): layers that differ in rsLoRA, DoRA, init or
    dropout, and DoRA next to a LoRA embedding. See ``lora_np.peft``.

    For a PiSSA layer the frozen residual ``W_res`` is part of the model, not of the
    adapter: the adapter applies only to a layer built with ``init="pissa"`` from the same W
    (PEFT's documentation makes the same point and offers a conversion to a plain LoRA
    adapter). lora_np records ``‖W_res‖_F`` (in the npz config; in the safetensors metadata
    under ``"lora_np"``) and checks it on load; the PEFT folder says ``init_lora_weights:
    "pissa"``, and PEFT redoes the SVD of the original weight on loading, as lora_np does.
    """
    check_choice("format", format, ADAPTER_FORMATS)
    if format == "npz" and (base_model_name_or_path is not None or task_type is not None):
        raise TypeError("save_adapter: base_model_name_or_path and task_type are PEFT config fields; "
                        "pass format='peft' with them")
    layers = _saveable_layers(model, "save_adapter")
    if format == "peft":
        return _save_peft(model, layers, path, base_model_name_or_path, task_type)
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
              "layers": {p: m.config() for p, m in layers.items()}}
    arrays = {"__config__": np.array(json.dumps(config, sort_keys=True))}
    for p, m in layers.items():
        for name in m.adapter_names:
            arrays[f"{p}.{name}"] = getattr(m, name)
    with open(path, "wb") as fh:        # exactly ``path``: np.savez(str) would append ".npz",
        np.savez(fh, **arrays)          # and load_adapter(path) would then not find the file


def _kind(m) -> str:
    return "embedding" if isinstance(m, LoRAEmbedding) else "linear"


def _peft_description(m) -> dict:
    """What ``lora_np.peft`` needs to know of a LoRA layer (plain values, no layer objects)."""
    cfg = m.config()
    return {"kind": _kind(m), "r": m.r, "alpha": m.alpha, "rslora": m.rslora,
            "dora": isinstance(m, DoRALinear), "dropout": getattr(m, "dropout", 0.0),
            "init": getattr(m, "init", None), "W_res_norm": cfg.get("W_res_norm"),
            "shapes": {n: getattr(m, n).shape for n in m.adapter_names}, "dtype": m.dtype}


def _save_peft(model, layers, path, base_model_name_or_path, task_type):
    described = {p: _peft_description(m) for p, m in layers.items()}
    config = _peft.build_config(described, [p for p, _ in model.named_modules()],
                                base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    tensors = {_peft.tensor_key(p, _kind(m), name): getattr(m, name)
               for p, m in layers.items() for name in m.adapter_names}
    res = {p: d["W_res_norm"] for p, d in described.items() if d["W_res_norm"] is not None}
    metadata = {"lora_np": json.dumps({"W_res_norm": res}, sort_keys=True)} if res else None
    _peft.write_folder(path, config, tensors, metadata)


_NPY_MAGIC = b"\x93NUMPY"


def _read_npz(path) -> dict:
    """Every array of the ``.npz`` archive at ``path``, never unpickling. The file is opened
    (and closed) here, not by NumPy: ``np.load(path)`` leaves the file open when the archive
    is damaged. Raises ValueError with the reason, without NumPy's advice to unpickle."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot open the file ({e.strerror})") from None
    with fh:
        head = fh.read(len(_NPY_MAGIC))
        fh.seek(0)
        if head.startswith(_NPY_MAGIC):
            raise ValueError("it is a .npy file (one array); an adapter is the .npz archive "
                             "that save_adapter writes")
        if not zipfile.is_zipfile(fh):
            raise ValueError("it is not a zip archive (an .npz file is one)")
        fh.seek(0)
        arrays = {}
        try:
            with np.load(fh, allow_pickle=False) as f:
                for key in f.files:
                    arrays[key] = _read_entry(f, key)
        except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise ValueError(f"the archive is damaged ({e})") from None
    return arrays


def _read_entry(npz, key: str) -> np.ndarray:
    try:
        value = npz[key]
    except ValueError as e:
        if "allow_pickle" in str(e):         # NumPy refuses an object array without pickle
            raise ValueError(f"entry {key!r} holds Python objects (dtype object), which lora_np "
                             "never unpickles; an adapter holds only float arrays and its config") from None
        raise ValueError(f"entry {key!r} is damaged ({e})") from None
    if not isinstance(value, np.ndarray):    # a zip member that is not a .npy file
        raise ValueError(f"entry {key!r} is not a NumPy array")
    return value


def _read_adapter(path):
    try:
        arrays = _read_npz(path)
    except ValueError as e:
        raise ValueError(f"load_adapter: {path!s} is not a lora_np adapter (.npz): {e}") from None
    if "__config__" not in arrays:
        raise ValueError(f"load_adapter: {path!s} has no '__config__' entry; not a lora_np adapter")
    try:
        config = json.loads(str(arrays.pop("__config__")))
    except json.JSONDecodeError as e:
        raise ValueError(f"load_adapter: the config in {path!s} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT \
            or not isinstance(config.get("layers"), dict):
        raise ValueError(f"load_adapter: {path!s} has format {config.get('format') if isinstance(config, dict) else config!r}, "
                         f"expected {ADAPTER_FORMAT!r}")
    return config, arrays


def load_adapter(model: Module, path) -> Module:
    """Load A and B (and m for DoRA) saved by ``save_adapter`` into ``model``'s LoRA layers (in place).

    ``path`` is a lora_np ``.npz`` file, or a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``, written by ``save_adapter(..., format="peft")`` or by PEFT's
    ``save_pretrained``; the folder, or either file in it). The model must already have LoRA on
    the same layers with the same shapes, rank, alpha, scaling and kind (LoRA or DoRA, Linear or
    Embedding; a PiSSA adapter needs a PiSSA layer with the same residual W); any mismatch raises
    ValueError naming the layer or key, and the model is left unchanged. A PEFT folder is also
    refused for an option lora_np does not represent (``fan_in_fan_out: true``, a ``bias`` other
    than "none", ``modules_to_save``, an init that rewrites the base weights other than exact
    PiSSA, …), for bfloat16 tensors (safetensors' NumPy API cannot read them: convert to float32
    first) and for a pickled ``adapter_model.bin``; float16/32/64 tensors are cast to the
    model's dtype. Nothing is ever unpickled.
    """
    if _peft.is_peft_path(path):
        return _load_peft(model, path)
    config, arrays = _read_adapter(path)
    layers = lora_layers(model)
    saved = config["layers"]
    if set(saved) != set(layers):
        raise ValueError(f"load_adapter: the file adapts layers {sorted(saved)}, the model has "
                         f"LoRA on {sorted(layers)}")
    for p, m in layers.items():
        if m.merged:
            raise ValueError(f"load_adapter: layer {p!r} is merged; unmerge the model first")
        want = m.config()
        for key in m._match_keys:
            if saved[p].get(key) != want[key]:
                raise ValueError(f"load_adapter: layer {p!r} was saved with {key}={saved[p].get(key)!r}, "
                                 f"the model has {key}={want[key]!r}")
        if bool(saved[p].get("dora", False)) != want["dora"]:
            raise ValueError(f"load_adapter: layer {p!r} was saved with "
                             f"dora={saved[p].get('dora', False)!r}, the model has "
                             f"dora={want['dora']!r} (add_lora(..., use_dora=...))")
        if "pissa" in (saved[p].get("init"), want.get("init")):
            # a PiSSA adapter only applies on top of its residual base W_res = W − s·B₀A₀
            if saved[p].get("init") != want.get("init"):
                raise ValueError(f"load_adapter: layer {p!r} was saved with init={saved[p].get('init')!r}, "
                                 f"the model has init={want.get('init')!r}; a PiSSA adapter applies only "
                                 "to the residual weight of a layer built with init='pissa'")
            _peft.check_residual_norm(p, saved[p].get("W_res_norm"), want["W_res_norm"])
        for name in m.adapter_names:
            key = f"{p}.{name}"
            target = getattr(m, name)
            if key not in arrays:
                raise ValueError(f"load_adapter: {path!s} is missing {key!r}")
            a = arrays[key]
            if a.shape != target.shape:
                raise ValueError(f"load_adapter: {key} has shape {a.shape} in the file, the model "
                                 f"expects {target.shape}")
            if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
                raise ValueError(f"load_adapter: {key} must hold finite floats, got dtype {a.dtype}")
    for p, m in layers.items():                      # everything checked: now write
        for name in m.adapter_names:
            getattr(m, name)[...] = arrays[f"{p}.{name}"]
    return model


def _load_peft(model: Module, path) -> Module:
    config, tensors, metadata = _peft.read_folder(path)
    layers = lora_layers(model)
    for p, m in layers.items():
        if m.merged:
            raise ValueError(f"load_adapter: layer {p!r} is merged; unmerge the model first")
    arrays = _peft.match_layers(config, tensors, metadata,
                                {p: _peft_description(m) for p, m in layers.items()})
    for p, m in layers.items():                      # everything checked: now write
        for name, a in arrays[p].items():
            getattr(m, name)[...] = a
    return model

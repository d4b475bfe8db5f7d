"""LoRA: a frozen linear layer plus a trainable low-rank update ``ΔW = s · B A``.

* ``LoRALinear`` wraps a ``Linear``: ``Y = X Wᵀ + b + s (X Aᵀ) Bᵀ`` (Hu et al. 2021,
  arXiv 2106.09685, eq. 3, in the PyTorch ``(d_out, d_in)`` layout).
* ``add_lora`` wraps chosen ``Linear`` children of any module tree and freezes the rest.
* ``merge_lora`` / ``unmerge_lora`` fold ΔW into W for inference (no extra latency) and back.
* ``save_adapter`` / ``load_adapter`` store only A, B and the config in an ``.npz`` (never pickled).
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile

import numpy as np

from . import functional as F
from .modules import Linear, Module, make_rng

__all__ = ["LoRALinear", "add_lora", "merge_lora", "unmerge_lora", "save_adapter",
           "load_adapter", "lora_layers", "lora_scale", "INIT_SCHEMES"]

INIT_SCHEMES = ("kaiming", "gaussian")
ADAPTER_FORMAT = "lora_np-adapter"
ADAPTER_VERSION = 1


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The LoRA scale s: ``alpha / r`` (Hu et al. 2021) or ``alpha / sqrt(r)`` (rsLoRA,
    Kalajdzievski 2023, arXiv 2312.03732)."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def _validate_lora_args(base, r, alpha, dropout, rslora, init):
    if not isinstance(base, Linear):
        raise TypeError(f"LoRALinear wraps a Linear layer, got {type(base).__name__}")
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"r must be an int, got {r!r} ({type(r).__name__})")
    r_max = min(base.d_in, base.d_out)
    if not 1 <= r <= r_max:
        raise ValueError(f"r must satisfy 1 <= r <= min(d_in, d_out) = {r_max}, got r={r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if not isinstance(dropout, (int, float, np.floating)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(rslora, (bool, np.bool_)):
        raise TypeError(f"rslora must be True or False, got {rslora!r}")
    if init not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}")


class LoRALinear(Module):
    """A ``Linear`` with frozen ``W`` (d_out, d_in), ``b`` and a trainable update ``s·B A``.

    Parameters
    ----------
    base : Linear    the layer to adapt; its ``W`` and ``b`` arrays are shared, not copied
    r : int          rank, 1 <= r <= min(d_in, d_out)
    alpha : float    > 0; the scale is ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rslora)
    dropout : float  dropout probability on the LoRA branch's input (training mode only)
    init : "kaiming" (A ~ U(−1/√d_in, 1/√d_in), PEFT's default) or "gaussian" (A ~ N(0, 1/r²),
           PEFT's ``init_lora_weights="gaussian"``). B = 0 either way, so the adapted layer
           starts out *exactly* equal to the base layer — and A must not be zero, or no gradient
           would ever reach B (dB = s Gᵀ X Aᵀ).

    Attributes: ``W``, ``b`` (frozen), ``A`` (r, d_in), ``B`` (d_out, r), ``scale``, ``merged``.
    """

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, init="kaiming", rng=None):
        _validate_lora_args(base, r, alpha, dropout, rslora, init)
        super().__init__()
        rng = make_rng(rng)
        self.d_in, self.d_out, self.dtype = base.d_in, base.d_out, base.dtype
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.rslora, self.init = bool(rslora), init
        self.scale = lora_scale(alpha, r, rslora)
        self.merged = False
        object.__setattr__(self, "_rng", rng)
        self.add_parameter("W", base.W, trainable=False)
        if base.bias is not None:
            self.add_parameter("b", base.bias, trainable=False)
        self.add_parameter("A", self._init_A(rng).astype(self.dtype))
        self.add_parameter("B", np.zeros((self.d_out, self.r), dtype=self.dtype))
        self._store(None, ())

    def _init_A(self, rng):
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(self.d_in)
            return rng.uniform(-bound, bound, size=(self.r, self.d_in))
        return rng.normal(0.0, 1.0 / self.r, size=(self.r, self.d_in))

    @property
    def bias(self):
        return self._params.get("b")

    def delta_weight(self) -> np.ndarray:
        """``ΔW = s · B A`` of shape (d_out, d_in). Formed only here (for merge and analysis),
        never in forward or backward."""
        return (self.B @ self.A) * self.dtype.type(self.scale)

    # --- forward / backward -----------------------------------------------------------
    def forward(self, x):
        x = self._check_input(x, self.d_in)
        if self.merged:                      # W already holds W₀ + ΔW: one plain GEMM
            y, cache = F.linear_forward(x, self.W, self.bias)
            self._store(("merged", cache), y.shape)
            return y
        mask = None
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = (self._rng.random(x.shape) < keep).astype(self.dtype) / self.dtype.type(keep)
        y, cache = F.lora_linear_forward(x, self.W, self.bias, self.A, self.B, self.scale, mask)
        self._store(("lora", cache), y.shape)
        return y

    def backward(self, dout):
        (kind, cache), dout = self._check_backward(dout)
        if kind == "merged":
            raise ValueError("LoRALinear.backward: the layer is merged (W holds W₀ + ΔW); "
                             "call unmerge() before training")
        dx, dA, dB = F.lora_linear_backward(dout, cache)
        self._accumulate("A", dA)
        self._accumulate("B", dB)
        self._store(None, ())
        return dx

    # --- merge / unmerge ----------------------------------------------------------------
    def merge(self) -> "LoRALinear":
        """``W ← W + ΔW`` in place, so inference costs one GEMM. A second merge does nothing
        (with a warning). Raises ValueError, leaving W unchanged, if the result is not finite."""
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged; nothing to do", stacklevel=2)
            return self
        new_W = self.W + self.delta_weight()
        if not np.all(np.isfinite(new_W)):
            raise ValueError("LoRALinear.merge: W + ΔW has non-finite entries "
                             f"(max |ΔW| = {np.abs(self.delta_weight()).max()}); W left unchanged")
        self.W[...] = new_W
        self.merged = True
        return self

    def unmerge(self) -> "LoRALinear":
        """``W ← W − ΔW``: restores the frozen W₀ (up to rounding). No-op with a warning if not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged; nothing to do", stacklevel=2)
            return self
        self.W[...] -= self.delta_weight()
        self.merged = False
        return self

    def config(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "rslora": self.rslora, "d_in": self.d_in,
                "d_out": self.d_out, "dropout": self.dropout, "init": self.init}

    def extra_repr(self):
        return (f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, alpha={self.alpha}, "
                f"scale={self.scale:.4g}, merged={self.merged}")


# ------------------------------------------------------------------------ model level


def lora_layers(model: Module) -> dict[str, LoRALinear]:
    """Dotted path -> LoRALinear for every adapted layer in ``model``."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def _resolve_targets(model: Module, targets) -> dict[str, Module]:
    """Map each target name to the modules it names. A target matches a module whose dotted
    path equals it or ends with ``"." + target`` (so ``"q_proj"`` matches ``"attn.q_proj"``)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("add_lora: targets is empty; name at least one Linear layer")
    modules = dict(model.named_modules())
    linear_paths = sorted(p for p, m in modules.items() if isinstance(m, (Linear, LoRALinear)) and p)
    chosen = {}
    for t in targets:
        if not isinstance(t, str):
            raise TypeError(f"add_lora: target names are strings, got {t!r}")
        hits = [p for p in modules if p and (p == t or p.endswith("." + t))]
        if not hits:
            raise ValueError(f"add_lora: unknown target {t!r}; the Linear layers of this model "
                             f"are {linear_paths}")
        for p in hits:
            m = modules[p]
            if isinstance(m, LoRALinear):
                raise ValueError(f"add_lora: layer {p!r} already has LoRA; adding it twice would "
                                 "stack two adapters")
            if not isinstance(m, Linear):
                raise TypeError(f"add_lora: target {t!r} names {p!r}, a {type(m).__name__}, "
                                f"not a Linear; Linear layers are {linear_paths}")
            chosen[p] = m
    return chosen


def add_lora(model: Module, targets, r: int, alpha: float, **lora_kwargs) -> Module:
    """Wrap the named ``Linear`` layers of ``model`` in ``LoRALinear`` and freeze everything else.

    ``targets``: names like ``"q_proj"`` (matches every layer with that last name) or dotted
    paths like ``"attn.v_proj"``. ``lora_kwargs`` go to ``LoRALinear`` (dropout, rslora, init,
    rng). Everything is checked before anything changes, so a bad call leaves ``model`` as it
    was. Returns ``model`` (changed in place).
    """
    chosen = _resolve_targets(model, targets)
    rng = make_rng(lora_kwargs.pop("rng", None))
    # build every wrapper first (this validates r, alpha, ...) and only then change the model
    wrapped = {p: LoRALinear(m, r, alpha, rng=rng, **lora_kwargs) for p, m in chosen.items()}
    model.freeze()
    for path, layer in wrapped.items():
        parent_path, _, name = path.rpartition(".")
        parent = dict(model.named_modules())[parent_path]
        setattr(parent, name, layer)
    return model


def merge_lora(model: Module) -> Module:
    """Merge every LoRA layer of ``model`` (W ← W + ΔW). All-or-nothing on non-finite results."""
    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        if not np.all(np.isfinite(m.W + m.delta_weight())):
            raise ValueError("merge_lora: merging would make W non-finite; model left unchanged")
    for m in layers:
        m.merge()
    return model


def unmerge_lora(model: Module) -> Module:
    """Undo ``merge_lora`` for every merged LoRA layer."""
    for m in lora_layers(model).values():
        if m.merged:
            m.unmerge()
    return model


# --------------------------------------------------------------------- adapter files


def save_adapter(model: Module, path) -> None:
    """Save only the LoRA factors and their config to ``path`` (``.npz``).

    Keys: ``"<layer>.A"``, ``"<layer>.B"`` and ``"__config__"`` (a JSON string stored as a
    NumPy unicode array, so loading never needs pickle).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers; call add_lora first")
    if any(m.merged for m in layers.values()):
        raise ValueError("save_adapter: unmerge the model first (A and B are saved, W is not)")
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
              "layers": {p: m.config() for p, m in layers.items()}}
    arrays = {"__config__": np.array(json.dumps(config, sort_keys=True))}
    for p, m in layers.items():
        arrays[f"{p}.A"], arrays[f"{p}.B"] = m.A, m.B
    np.savez(path, **arrays)


def _read_adapter(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ValueError(f"load_adapter: {path!s} is not a readable lora_np adapter (.npz): {e}") from e
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
    """Load A and B saved by ``save_adapter`` into ``model``'s LoRA layers (in place).

    The model must already have LoRA on the same layers with the same shapes, rank, alpha and
    scaling; any mismatch raises ValueError naming the layer, and the model is left unchanged.
    """
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
        for key in ("r", "alpha", "rslora", "d_in", "d_out"):
            if saved[p].get(key) != want[key]:
                raise ValueError(f"load_adapter: layer {p!r} was saved with {key}={saved[p].get(key)!r}, "
                                 f"the model has {key}={want[key]!r}")
        for name in ("A", "B"):
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
        m.A[...] = arrays[f"{p}.A"]
        m.B[...] = arrays[f"{p}.B"]
    return model

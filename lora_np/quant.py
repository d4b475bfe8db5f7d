"""QLoRA's frozen base in NumPy: 4-bit NormalFloat (NF4), double quantisation, and LoRA on top.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) stores the frozen pretrained weights in 4 bits and
trains only the LoRA factors. This module does what bitsandbytes does for it, in NumPy:

* ``NF4`` — the 16 code values: 8 positive and 7 negative quantiles of N(0, 1) plus an exact 0,
  scaled to [−1, 1] (``nf4_code_values``, bitsandbytes' ``create_normal_map(offset=0.9677083)``);
* ``quantize_nf4(W, block_size=64, double_quant=True)`` — blockwise absmax quantisation: every
  block of 64 consecutive entries (row-major) is divided by its largest |entry| and each entry is
  replaced by the index of the nearest code; two 4-bit indices per byte, the first in the high
  nibble (bitsandbytes' layout). With double quantisation the 32-bit absmax constants are
  themselves quantised: their mean is subtracted, they are cut into blocks of 256 and each block
  is stored as 8-bit integers with one float32 scale (the mean is added back on dequantisation).
  Returns an ``NF4Tensor``: the stored arrays, and nothing else;
* ``dequantize_nf4(q)`` — ``NF4[code] · absmax`` in W's shape and dtype;
* ``QuantizedLinear`` — a frozen ``Linear`` whose W is stored as an ``NF4Tensor`` (no float W);
  ``QLoRALinear`` — its LoRA adapter (``add_lora`` builds it, because
  ``QuantizedLinear.lora_class = QLoRALinear``): ``Y = X deq(W)ᵀ + b + s (X Aᵀ) Bᵀ``;
* ``loftq_factors`` — LoftQ's init (Li et al. 2023, arXiv 2310.08659): alternate quantising
  ``W − s B A`` and the best rank-r fit of what the quantisation lost;
* the byte arithmetic of real models (``nf4_bits_per_parameter``, ``qlora_memory``).

**Bits per parameter**, counted from the arrays stored (``NF4Tensor.bits_per_parameter``): 4 for
the codes, plus the constants — one float32 per block of 64 is 32/64 = 0.5 bits; after double
quantisation one int8 per block plus one float32 per 256 blocks, 8/64 + 32/(64·256) = 0.127 bits
(QLoRA §3: "from 0.5 to 0.127 bits"), ≈ 4.127 in all.

**Choices, and where they differ from bitsandbytes.** The 8-bit code of the constants is a
linear symmetric int8 grid (``round(127 c / max|c|)`` per block of 256); bitsandbytes uses its
8-bit "dynamic" code (a float-like 256-entry table, plus that table in memory). The bit count is
the same. The NF4 values are derived here in float64 from the normal quantiles
(``statistics.NormalDist``); bitsandbytes' published float32 table differs from them by ≤ 1.2e-7
(its quantile positions come from a float32 ``linspace``), which changes no code index in
practice (``tests/test_quant.py`` checks both facts).

**Where the float W lives.** ``QuantizedLinear`` and ``QLoRALinear`` dequantise the weight inside
``forward`` for the one GEMM that needs it and again inside ``backward`` (``dX = G deq(W)``), as
bitsandbytes' 4-bit matmul does; the cache between them holds no W. So a float copy of a
quantised weight exists only while its own GEMM runs, never between steps, and never for more
than one layer at a time.

**Merging.** ``merge()`` on a ``QLoRALinear`` refuses (ValueError, naming the two honest
recipes): the base holds 4-bit codes, so ``W + ΔW`` cannot be written into it without
re-quantising, and re-quantising adds a fresh quantisation error to the merged weight. The
recipes are explicit: ``merged_linear()`` (dequantise, add ΔW, keep a float32/float64 ``Linear``)
and ``requantized_merge()`` (the same, then quantised again: a ``QuantizedLinear`` whose error
``merge_error`` measures). ``dequantize_merge(model)`` applies the first to a whole model.

Notation: lora_np/README.md. Shapes: W (d_out, d_in), n = d_out · d_in, ``n_blocks = ⌈n / 64⌉``.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import numpy as np

from . import functional as F
from .counting.memory import _nbytes_once
from .counting.params import ModelConfig, MODEL_CONFIGS, block_targets, lora_param_count, target_shape
from .lora import LoRALinear, lora_scale, pissa_factors
from .modules import Linear, Module
from .validate import check_bool, check_int, check_number

__all__ = ["NF4", "NF4_OFFSET", "nf4_code_values", "NF4Tensor", "quantize_nf4", "dequantize_nf4",
           "pack_nibbles", "unpack_nibbles", "nearest_code", "quantize_constants", "dequantize_constants",
           "nf4_bits_per_parameter", "QuantizedLinear", "QLoRALinear", "quantize_model", "dequantize_merge",
           "requantize_merge", "absmax_constants",
           "model_bytes", "merge_error", "LoftQ", "loftq_factors", "relative_error",
           "RealModel", "REAL_MODELS", "QLoRAMemory", "qlora_memory", "GB"]

#: bitsandbytes' ``create_normal_map(offset=0.9677083)``: the outermost quantile positions
#: (1 − offset of N(0, 1)'s mass lies beyond the largest code before scaling; QLoRA §3)
NF4_OFFSET = 0.9677083
#: the block of the constants' 8-bit quantisation (QLoRA §3, double quantisation)
CONSTANT_BLOCK = 256
#: decimal gigabyte, the unit GPU memory is sold in
GB = 1e9


def nf4_code_values(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NF4 values, ascending, in float64: bitsandbytes' ``create_normal_map``.

    With Φ⁻¹ the standard normal quantile function and ``offset`` notebook 09's δ::

        positive = Φ⁻¹(p) for the 8 points p = linspace(offset, 1/2, 9) without its last (1/2)
        negative = −Φ⁻¹(p) for the 7 points p = linspace(offset, 1/2, 8) without its last
        NF4 = sort(positive ∪ {0} ∪ negative) / Φ⁻¹(offset)

    8 positive values and 7 negative ones plus an exact zero: an asymmetric type, so that 0 is a
    code (a zero weight, or padding, is stored exactly) and all 16 codes are used. The largest
    is Φ⁻¹(offset) so dividing by it puts the codes in [−1, 1], as an absmax-scaled block is.
    """
    offset = check_number("offset", offset)
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be in (0.5, 1), got offset={offset}")
    ppf = statistics.NormalDist().inv_cdf
    positive = [ppf(float(p)) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(float(p)) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))
    return values / values.max()


#: the 16 NF4 code values, ascending, float32 (read-only); NF4[7] = 0 exactly, NF4[15] = 1
NF4 = nf4_code_values().astype(np.float32)
NF4.setflags(write=False)
#: the decision boundaries between neighbouring codes (nearest-code rounding)
_MIDPOINTS = ((NF4[:-1].astype(np.float64) + NF4[1:]) / 2.0)


#: byte -> the two NF4 values it packs (high nibble first), for dequantisation: (256, 2)
_PAIRS = {dt: np.stack([NF4[np.arange(256) >> 4], NF4[np.arange(256) & 15]], axis=1).astype(dt)
          for dt in (np.float32, np.float64)}


def nearest_code(x) -> np.ndarray:
    """Index (uint8, 0…15) of the NF4 value nearest to each entry of ``x`` (values in [−1, 1];
    outside, the end codes). A tie goes to the lower code, as bitsandbytes' argmin does."""
    return np.searchsorted(_MIDPOINTS, np.asarray(x, dtype=np.float64), side="left").astype(np.uint8)


def pack_nibbles(codes) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble: ``byte = c[2i] << 4 | c[2i+1]``
    (bitsandbytes' layout). An odd count is padded with one 0 nibble. (n,) -> (⌈n/2⌉,) uint8."""
    c = np.asarray(codes, dtype=np.uint8).ravel()
    if c.size % 2:
        c = np.append(c, np.uint8(0))
    return (c[0::2] << 4) | c[1::2]


def unpack_nibbles(packed, n: int) -> np.ndarray:
    """The first ``n`` 4-bit codes of ``packed`` (``pack_nibbles`` undone): (n,) uint8."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(2 * p.size, dtype=np.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0x0F
    return out[:n]


class NF4Tensor(NamedTuple):
    """What ``quantize_nf4`` stores for one matrix: the arrays, and the metadata to read them.

    codes : (⌈n/2⌉,) uint8            two NF4 indices per byte, first in the high nibble
    absmax : (n_blocks,)              float32 constants; with double quantisation int8 codes of
                                      the mean-subtracted constants
    shape, dtype, block_size          W's shape and dtype, entries per block
    absmax_scale : (⌈n_blocks/256⌉,) float32 or None   double quantisation: one scale per 256
    absmax_offset : () float32 or None                 double quantisation: the constants' mean

    ``nbytes`` counts the arrays (the few bytes of shape, dtype and block sizes are metadata).
    """
    codes: np.ndarray
    absmax: np.ndarray
    shape: tuple
    dtype: np.dtype
    block_size: int
    absmax_scale: np.ndarray | None = None
    absmax_offset: np.ndarray | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def size(self) -> int:
        """Entries of W, n."""
        return int(np.prod(self.shape))

    def arrays(self) -> dict:
        """The stored arrays, by name (the ones that exist)."""
        out = {"codes": self.codes, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    @property
    def bits_per_parameter(self) -> float:
        """``8 · nbytes / n``: 4 for the codes plus ``constant_bits_per_parameter``."""
        return 8.0 * self.nbytes / self.size

    @property
    def constant_bits_per_parameter(self) -> float:
        """Bits of the quantisation constants per entry of W: 32/64 = 0.5 without double
        quantisation, 8/64 + 32/(64·256) ≈ 0.127 with it (for large W)."""
        return 8.0 * (self.nbytes - self.codes.nbytes) / self.size


def _check_block_size(block_size) -> int:
    return check_int("block_size", block_size, minimum=2, maximum=4096)


def _check_weight(name, W) -> np.ndarray:
    """``W`` as a finite 2-D float16/32/64 array (TypeError for another dtype, ValueError for
    another shape or a NaN/inf), not copied."""
    if not isinstance(W, np.ndarray):
        W = np.asarray(W)
    if W.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name} must be a float16/float32/float64 array, got dtype {W.dtype}")
    if W.ndim != 2 or W.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D weight matrix (d_out, d_in), got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(W)))} NaN/inf entries")
    return W


def _blocks(flat: np.ndarray, block_size: int) -> np.ndarray:
    """(n,) -> (⌈n/block⌉, block) float64, the last block padded with zeros (a zero never raises
    a block's absmax, and is stored as the exact zero code)."""
    n_blocks = -(-flat.size // block_size)
    padded = np.zeros(n_blocks * block_size, dtype=np.float64)
    padded[:flat.size] = flat
    return padded.reshape(n_blocks, block_size)


def quantize_constants(c, block_size: int = CONSTANT_BLOCK):
    """Double quantisation of the absmax constants ``c`` (n_blocks,) (QLoRA §3)::

        μ = mean(c);   per block k of 256 constants:  a_k = max_{j ∈ k} |c_j − μ|
        q_j = round(127 · (c_j − μ) / a_k) ∈ [−127, 127] (int8),   stored: q, a (float32), μ (float32)

    (notebook 09's notation; a block with a_k = 0 stores a_k = 0 and q = 0.) Returns ``(q, a, μ)``. Subtracting the mean
    first matters: the constants are all positive, so without it half of the 8-bit grid (the
    negative half) would go unused.
    """
    c = np.asarray(c, dtype=np.float32)
    block_size = check_int("block_size", block_size, minimum=1)
    mu = np.float32(c.astype(np.float64).mean())
    d = _blocks(c.astype(np.float64) - float(mu), block_size)
    a = np.abs(d).max(axis=1).astype(np.float32)
    safe = np.where(a > 0, a.astype(np.float64), 1.0)
    q = np.rint(127.0 * d / safe[:, None]).clip(-127, 127).astype(np.int8).ravel()[:c.size]
    return q, a, np.array(mu, dtype=np.float32)


def dequantize_constants(q, a, mu, block_size: int = CONSTANT_BLOCK) -> np.ndarray:
    """``c_j ≈ q_j · a_k / 127 + μ`` (j in block k; (n_blocks,) float32): ``quantize_constants`` undone."""
    q = np.asarray(q)
    blocks = _blocks(q.astype(np.float64), block_size) * (np.asarray(a, dtype=np.float64)[:, None] / 127.0)
    return (blocks.ravel()[:q.size] + float(mu)).astype(np.float32)


def quantize_nf4(W, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantise the matrix ``W`` to NF4, blockwise (QLoRA §3; bitsandbytes' ``quantize_4bit``).

    Row-major, W is cut into blocks of ``block_size`` consecutive entries (the last one may be
    shorter); for every block b::

        c_b = max |W_block|                      the absmax constant (float32)
        code_i = argmin_k |W_i / c_b − NF4[k]|   nearest of the 16 values, an index 0…15

    and the codes are packed two per byte (``pack_nibbles``). ``double_quant=True`` stores the
    constants as ``quantize_constants(c)`` (8-bit, blocks of 256) instead of float32.

    Parameters: W (d_out, d_in) finite float16/32/64 array; block_size int in [2, 4096];
    double_quant bool. Returns an ``NF4Tensor``. Raises TypeError for a non-float W (or a
    non-int block size / non-bool flag) and ValueError for a W that is not 2-D or not finite,
    or a block size out of range — each naming what was expected and what came.
    """
    W = _check_weight("W", W)
    block_size = _check_block_size(block_size)
    double_quant = check_bool("double_quant", double_quant)
    blocks = _blocks(W.ravel(), block_size)                       # (n_blocks, block) float64
    c = np.abs(blocks).max(axis=1).astype(np.float32)             # (n_blocks,)
    safe = np.where(c > 0, c.astype(np.float64), 1.0)             # an all-zero block: codes of 0
    codes = nearest_code(np.clip(blocks / safe[:, None], -1.0, 1.0)).ravel()[:W.size]
    packed = pack_nibbles(codes)
    if not double_quant:
        return NF4Tensor(packed, c, tuple(W.shape), W.dtype, block_size)
    q, a, mu = quantize_constants(c)
    return NF4Tensor(packed, q, tuple(W.shape), W.dtype, block_size, a, mu)


def _check_nf4(q) -> NF4Tensor:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"expected an NF4Tensor (what quantize_nf4 returns), got {type(q).__name__}")
    n = q.size
    n_blocks = -(-n // q.block_size)
    problems = []
    if q.codes.dtype != np.uint8 or q.codes.shape != (-(-n // 2),):
        problems.append(f"codes must be uint8 of shape {(-(-n // 2),)}, got {q.codes.dtype} {q.codes.shape}")
    if q.absmax.shape != (n_blocks,):
        problems.append(f"absmax must have shape {(n_blocks,)}, got {q.absmax.shape}")
    if q.double_quant and q.absmax_scale.shape != (-(-n_blocks // CONSTANT_BLOCK),):
        problems.append(f"absmax_scale must have shape {(-(-n_blocks // CONSTANT_BLOCK),)}, "
                        f"got {q.absmax_scale.shape}")
    if problems:
        raise ValueError("inconsistent NF4Tensor: " + "; ".join(problems))
    return q


def absmax_constants(q: NF4Tensor) -> np.ndarray:
    """The per-block constants (n_blocks,) float32 the dequantisation multiplies by: stored as
    such, or after double quantisation ``dequantize_constants``."""
    if q.double_quant:
        return dequantize_constants(q.absmax, q.absmax_scale, q.absmax_offset)
    return q.absmax


def dequantize_nf4(q: NF4Tensor, dtype=None) -> np.ndarray:
    """``Ŵ_i = NF4[code_i] · c_b`` (entry i in block b), in W's shape and dtype (or ``dtype``): a new array.

    Computed in float32 for a float16/float32 W (as bitsandbytes computes it) and in float64
    for a float64 W, then cast."""
    q = _check_nf4(q)
    out_dtype = np.dtype(q.dtype if dtype is None else dtype)
    work = np.float64 if out_dtype == np.float64 else np.float32
    n = q.size
    # one lookup per byte: _PAIRS[byte] = (NF4[byte >> 4], NF4[byte & 15]), the two values it holds
    values = np.take(_PAIRS[work], q.codes, axis=0).reshape(-1)[:n]   # (n,) in [−1, 1]
    c = absmax_constants(q).astype(work)
    n_full = (n // q.block_size) * q.block_size
    out = np.empty(n, dtype=work)
    out[:n_full] = (values[:n_full].reshape(-1, q.block_size) * c[:n // q.block_size, None]).ravel()
    if n_full < n:                                                    # the last, shorter block
        out[n_full:] = values[n_full:] * c[-1]
    return out.reshape(q.shape).astype(out_dtype, copy=False)


def relative_error(W, W_hat) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` in float64."""
    W = np.asarray(W, dtype=np.float64)
    return float(np.linalg.norm(W - np.asarray(W_hat, dtype=np.float64)) / np.linalg.norm(W))


def nf4_bits_per_parameter(block_size: int = 64, double_quant: bool = True,
                           constant_block: int = CONSTANT_BLOCK) -> float:
    """The formula for the bits per parameter of an NF4 matrix (large n, no partial blocks)::

        no double quantisation:   4 + 32 / block_size                    (64: 4.5)
        double quantisation:      4 + 8 / block_size + 32 / (block_size · 256)   (64: 4.127)

    (the constants' mean, one float32 per matrix, is left out: 32/n bits)."""
    block_size = _check_block_size(block_size)
    if not check_bool("double_quant", double_quant):
        return 4.0 + 32.0 / block_size
    return 4.0 + 8.0 / block_size + 32.0 / (block_size * check_int("constant_block", constant_block, minimum=1))


# ---------------------------------------------------------------------------------- layers


def _no_float_W(obj):
    return AttributeError(f"{type(obj).__name__} stores its frozen weight as NF4 codes, not as a float "
                          "array W; dequantized_weight() returns deq(W) (a new array)")


class _HoldsNF4:
    """What a layer whose frozen W lives in ``self.quantized`` (an ``NF4Tensor``) shares: ``.W``
    raises (there is no float W to read or to write into by mistake), ``dequantized_weight()``
    forms deq(W) in the layer's dtype."""

    def __getattr__(self, name):
        if name == "W":
            raise _no_float_W(self)
        return super().__getattr__(name)

    def dequantized_weight(self) -> np.ndarray:
        """``deq(W)`` (d_out, d_in) of the frozen base, in the layer's dtype (a new array)."""
        return dequantize_nf4(self.quantized, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds: the NF4 arrays plus its parameters (the bias; QLoRA's A and B),
        not gradients or optimizer state."""
        return self.quantized.nbytes + sum(p.nbytes for p in self.parameters().values())


class QuantizedLinear(_HoldsNF4, Linear):
    """A frozen linear layer whose W is stored in NF4: ``Y = X deq(W)ᵀ + b``.

    It holds ``quantized`` (an ``NF4Tensor``: packed codes and constants) and a frozen float bias
    ``b`` — no float W (``layer.W`` raises AttributeError; ``dequantized_weight()`` forms one).
    A ``Linear`` subclass, so ``add_lora`` accepts it as a target and wraps it in its
    ``lora_class``, ``QLoRALinear``. Forward and backward dequantise W for their one GEMM
    (``dX = G deq(W)``) and keep no W in the cache. W is not a parameter (it cannot train:
    ``unfreeze()`` makes only the bias trainable; ``to_linear()`` gives a float layer to fine-tune).

    Build it with ``QuantizedLinear.from_linear(linear, block_size=64, double_quant=True)`` or
    ``QuantizedLinear(quantized, bias=None, dtype=None)`` (dtype: what forward computes in,
    default the quantised W's, float32 or float64).
    """

    #: the adapter ``add_lora`` builds on this layer (see ``lora._linear_adapter``); set below
    lora_class = None

    def __init__(self, quantized: NF4Tensor, bias=None, dtype=None):
        quantized = _check_nf4(quantized)
        Module.__init__(self)                       # not Linear's: no random float W is made
        d_out, d_in = quantized.shape
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.dtype = np.dtype(np.float32 if dtype is None and quantized.dtype == np.float16
                              else quantized.dtype if dtype is None else dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"QuantizedLinear computes in float32 or float64, got dtype {self.dtype}")
        object.__setattr__(self, "quantized", quantized)
        if bias is not None:
            b = np.array(bias, dtype=self.dtype)    # a copy: the float layer can be freed
            if b.shape != (self.d_out,) or not np.all(np.isfinite(b)):
                raise ValueError(f"bias must be finite of shape ({self.d_out},), got shape {b.shape}")
            self.add_parameter("b", b, trainable=False)

    @classmethod
    def from_linear(cls, linear, block_size: int = 64, double_quant: bool = True) -> "QuantizedLinear":
        """``linear``'s W quantised to NF4 (``quantize_nf4``) and its bias copied; ``linear`` is
        left unchanged. TypeError if ``linear`` is not a plain ``Linear``."""
        if not isinstance(linear, Linear) or isinstance(linear, QuantizedLinear):
            raise TypeError(f"QuantizedLinear.from_linear expects a float Linear layer, got "
                            f"{type(linear).__name__}")
        q = quantize_nf4(linear.W, block_size=block_size, double_quant=double_quant)
        return cls(q, linear.bias, dtype=linear.dtype)


    def to_linear(self) -> Linear:
        """A plain float ``Linear`` with W = deq(W) and this bias (copies)."""
        return _float_linear(self.dequantized_weight(), self.bias, self.dtype)

    def forward(self, x):
        x = self._check_input(x, self.d_in)
        y, cache = F.linear_forward(x, self.dequantized_weight(), self.bias)
        self._store(cache._replace(x=None, W=None), y.shape)     # W is frozen: no x, no float W kept
        return y

    def backward(self, dout):
        cache, dout = self._check_backward(dout)
        cache = cache._replace(W=self.dequantized_weight())      # dX = G deq(W): dequantised again
        dx, _, db = F.linear_backward(dout, cache, need_dW=False, need_db="b" in self._grads)
        self._accumulate("b", db)
        return dx

    def extra_repr(self):
        return (f"d_in={self.d_in}, d_out={self.d_out}, nf4 block_size={self.quantized.block_size}, "
                f"double_quant={self.quantized.double_quant}, bias={self.bias is not None}")


def _float_linear(W, bias, dtype) -> Linear:
    layer = Linear(W.shape[1], W.shape[0], bias=bias is not None, rng=0, dtype=dtype)
    layer.W[...] = W
    if bias is not None:
        layer.b[...] = bias
    return layer


class QLoRALinear(_HoldsNF4, LoRALinear):
    """LoRA on an NF4 base (QLoRA): ``Y = X deq(W)ᵀ + b + s (X̃ Aᵀ) Bᵀ``.

    Built by ``add_lora`` on a ``QuantizedLinear`` (or directly, ``QLoRALinear(base, r, alpha,
    dropout=0.0, rslora=False, init="kaiming", rng=None)``). It shares the base's ``quantized``
    arrays and bias; A (r, d_in) and B (d_out, r) train as in ``LoRALinear`` (B = 0 at init, so
    the layer starts exactly equal to its quantised base). Forward runs
    ``functional.lora_linear_forward`` with ``deq(W)`` formed for it; the cache keeps no W, and
    backward dequantises again for ``dX = G deq(W) + s (G B) A``; dA, dB are LoRA's own
    (``functional.lora_linear_backward``). ``init="pissa"`` is refused: PiSSA needs the float W
    (the LoftQ-style init, ``QLoRALinear.from_loftq``, is the quantised counterpart).

    ``merge()`` refuses with a ValueError: see the module docstring, ``merged_linear()`` and
    ``requantized_merge()``.
    """

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, init="kaiming", rng=None):
        if not isinstance(base, QuantizedLinear):
            raise TypeError(f"QLoRALinear wraps a QuantizedLinear, got {type(base).__name__}")
        if init == "pissa":
            raise ValueError("QLoRALinear: init='pissa' needs the float W, which a QuantizedLinear "
                             "does not keep; use QLoRALinear.from_loftq(linear, r, alpha) instead")
        rng = self._setup(base, r, alpha, dropout, rslora, init, rng)
        object.__setattr__(self, "quantized", base.quantized)      # shared, not copied
        if base.bias is not None:
            self.add_parameter("b", base.bias, trainable=False)
        self.add_parameter("A", self._init_A(rng).astype(self.dtype))
        self.add_parameter("B", np.zeros((self.d_out, self.r), dtype=self.dtype))

    @classmethod
    def from_loftq(cls, linear, r, alpha, iterations: int = 5, block_size: int = 64,
                   double_quant: bool = True, rslora: bool = False) -> "QLoRALinear":
        """LoftQ's init from a float ``Linear``: the base is LoftQ's Q and (A, B) its factors
        (``loftq_factors``), so ``deq(Q) + s B A`` is closer to W than ``deq(quant(W))`` is.
        The layer then starts close to the *float* layer, not exactly equal to its base."""
        if not isinstance(linear, Linear) or isinstance(linear, QuantizedLinear):
            raise TypeError(f"from_loftq expects a float Linear layer, got {type(linear).__name__}")
        scale = lora_scale(alpha, r, rslora)
        result = loftq_factors(linear.W, r, scale, iterations=iterations, block_size=block_size,
                               double_quant=double_quant)
        layer = cls(QuantizedLinear(result.quantized, linear.bias, dtype=linear.dtype), r, alpha, rslora=rslora)
        layer.A[...] = result.A
        layer.B[...] = result.B
        return layer

    def _functional_forward(self, x, mask):
        y, cache = F.lora_linear_forward(x, self.dequantized_weight(), self.bias, self.A, self.B,
                                         self.scale, mask)
        return y, cache._replace(W=None)                          # no float W kept until backward

    def _functional_backward(self, dout, cache, **need):
        if need.get("need_dW"):
            raise ValueError("QLoRALinear: the NF4 base W cannot train")
        W = self.dequantized_weight() if need.get("need_dx", True) else None   # deq(W) only for dX
        return F.lora_linear_backward(dout, cache._replace(W=W), **need)

    # --- merging: explicit, never silently wrong --------------------------------------
    def _merged(self):
        raise ValueError(
            f"{type(self).__name__}.merge: the frozen W is stored as 4-bit NF4 codes, so W + ΔW "
            "cannot be written into it without re-quantising, which adds a new quantisation error "
            "to the merged weight. Choose explicitly: merged_linear() gives a float Linear with "
            "W = deq(W) + s·B A (exact, 16/32-bit memory); requantized_merge() quantises that "
            "again (4-bit, with the error merge_error() measures); lora_np.quant.dequantize_merge(model) "
            "does the first for a whole model. The layer is left unmerged")

    def merged_weight(self) -> np.ndarray:
        """``deq(W) + s B A`` (d_out, d_in), the weight this layer applies, in its dtype."""
        return self.dequantized_weight() + self.delta_weight()

    def merged_linear(self) -> Linear:
        """The right recipe: a float ``Linear`` with ``W = deq(W) + s B A`` and this bias. Its
        output equals this layer's up to round-off (the merged weight is not quantised)."""
        return _float_linear(self.merged_weight(), self.bias, self.dtype)

    def requantized_merge(self, block_size: int | None = None, double_quant: bool | None = None) -> QuantizedLinear:
        """The pitfall made explicit: ``quantize_nf4(deq(W) + s B A)`` as a ``QuantizedLinear``
        (the same block size and double quantisation as the base unless given). Its weight
        differs from ``merged_weight()`` by a fresh quantisation error (``merge_error``)."""
        q = quantize_nf4(self.merged_weight(),
                         block_size=self.quantized.block_size if block_size is None else block_size,
                         double_quant=self.quantized.double_quant if double_quant is None else double_quant)
        return QuantizedLinear(q, self.bias, dtype=self.dtype)

    def config(self) -> dict:
        return {**super().config(), "base": "nf4", "block_size": self.quantized.block_size,
                "double_quant": self.quantized.double_quant}

    def extra_repr(self):
        return super().extra_repr() + f", base=nf4(block_size={self.quantized.block_size})"


QuantizedLinear.lora_class = QLoRALinear


def merge_error(layer: QLoRALinear) -> dict:
    """What re-quantising a merged QLoRA layer costs, measured (float64 norms)::

        merged     = deq(W) + s B A                the weight the trained layer applies
        requant    = deq(quant(merged))            after merging into a 4-bit base
        "requant_error"  = ‖requant − merged‖_F / ‖merged‖_F
        "delta_norm"     = ‖s B A‖_F / ‖merged‖_F   (how big the learned change is)
        "ratio"          = ‖requant − merged‖_F / ‖s B A‖_F

    A ratio near or above 1 means re-quantising blurs the learned update as much as the update
    itself: the merged 4-bit model no longer computes what was trained."""
    if not isinstance(layer, QLoRALinear):
        raise TypeError(f"merge_error expects a QLoRALinear, got {type(layer).__name__}")
    merged = layer.merged_weight().astype(np.float64)
    requant = layer.requantized_merge().dequantized_weight().astype(np.float64)
    delta = layer.delta_weight().astype(np.float64)
    err = np.linalg.norm(requant - merged)
    return {"requant_error": float(err / np.linalg.norm(merged)),
            "delta_norm": float(np.linalg.norm(delta) / np.linalg.norm(merged)),
            "ratio": float(err / np.linalg.norm(delta)) if np.any(delta) else math.inf}


# ---------------------------------------------------------------------------------- models


def _matching_paths(model: Module, targets, kind) -> list:
    modules = dict(model.named_modules())
    candidates = [p for p, m in modules.items() if p and type(m) is kind]
    if targets is None:
        return candidates
    if isinstance(targets, str):
        targets = [targets]
    chosen = []
    for t in targets:
        if not isinstance(t, str):
            raise TypeError(f"target names are strings, got {t!r}")
        hits = [p for p in candidates if p == t or p.endswith("." + t)]
        if not hits:
            raise ValueError(f"unknown target {t!r}; the {kind.__name__} layers of this model are {candidates}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def _replace(model: Module, path: str, layer: Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(dict(model.named_modules())[parent_path], name, layer)


def quantize_model(model: Module, targets=None, block_size: int = 64, double_quant: bool = True) -> Module:
    """Replace the plain ``Linear`` layers named by ``targets`` (last names such as ``"fc1"``
    or dotted paths, as ``add_lora`` reads them; None: every plain Linear) by
    ``QuantizedLinear.from_linear``, in place. Every layer is quantised before any is
    replaced, so a bad call leaves ``model`` as it was. Returns ``model``. Call it before
    ``add_lora`` (LoRA then wraps the quantised layers in ``QLoRALinear``)."""
    if not isinstance(model, Module):
        raise TypeError(f"quantize_model expects a lora_np Module, got {type(model).__name__}")
    paths = _matching_paths(model, targets, Linear)
    modules = dict(model.named_modules())
    new = {p: QuantizedLinear.from_linear(modules[p], block_size, double_quant) for p in paths}
    for p, layer in new.items():
        _replace(model, p, layer)
    return model


def dequantize_merge(model: Module) -> Module:
    """The right merge recipe for a whole QLoRA model, in place: every ``QLoRALinear`` becomes
    its ``merged_linear()`` (W = deq(W) + s B A, float) and every remaining ``QuantizedLinear``
    its ``to_linear()``. The model then holds float weights (its dtype) and computes what the
    trained QLoRA model computed, up to round-off. Returns ``model``."""
    modules = dict(model.named_modules())
    new = {p: (m.merged_linear() if isinstance(m, QLoRALinear) else m.to_linear())
           for p, m in modules.items() if p and isinstance(m, (QLoRALinear, QuantizedLinear))}
    for p, layer in new.items():
        _replace(model, p, layer)
    return model


def requantize_merge(model: Module) -> Module:
    """The merge pitfall for a whole model, in place and on purpose: every ``QLoRALinear``
    becomes its ``requantized_merge()`` (``quant(deq(W) + s B A)``, a 4-bit ``QuantizedLinear``).
    The model is 4-bit again, but it no longer computes what was trained: each merged weight
    carries a fresh quantisation error (``merge_error``). Returns ``model``."""
    modules = dict(model.named_modules())
    new = {p: m.requantized_merge() for p, m in modules.items() if isinstance(m, QLoRALinear)}
    for p, layer in new.items():
        _replace(model, p, layer)
    return model


def model_bytes(model: Module) -> dict:
    """Bytes a model holds, counted from its arrays (each array once)::

        "nf4"        the NF4 arrays of every QuantizedLinear / QLoRALinear (codes, constants)
        "frozen"     every frozen float parameter (embeddings, norms, biases, float Ws)
        "trainable"  every trainable parameter (LoRA's A and B)
        "total"      the sum

    (gradients and optimizer state are the training state: ``counting.measured_training_state_bytes``)."""
    trainable = model.trainable_parameters()
    shared = {id(p) for p in trainable.values()}
    frozen = {n: p for n, p in model.parameters().items() if n not in trainable and id(p) not in shared}
    out = {"nf4": _nbytes_once(m.quantized.arrays() for _, m in model.named_modules() if isinstance(m, _HoldsNF4)),
           "frozen": _nbytes_once([frozen]), "trainable": _nbytes_once([trainable])}
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------- LoftQ


class LoftQ(NamedTuple):
    """``loftq_factors``' result: the base ``quantized`` (NF4Tensor), the factors ``A`` (r, d_in)
    and ``B`` (d_out, r), and ``errors`` — ``‖W − deq(Q_t) − s B_t A_t‖_F / ‖W‖_F`` for
    t = 0 (plain NF4, no adapter), 1, …, iterations."""
    quantized: NF4Tensor
    A: np.ndarray
    B: np.ndarray
    errors: list


def loftq_factors(W, r: int, scale: float, iterations: int = 5, block_size: int = 64,
                  double_quant: bool = True) -> LoftQ:
    """LoftQ (Li et al. 2023, arXiv 2310.08659, Algorithm 1): a quantised base Q and LoRA factors
    with ``deq(Q) + s B A ≈ W``, by alternating::

        Q_t = quant(W − s B_{t−1} A_{t−1})           (B_0 A_0 = 0: Q_1 = quant(W))
        s B_t A_t = best rank-r approximation of W − deq(Q_t)    (truncated SVD; pissa_factors)

    t = 1 alone is "quantise, then fit the quantisation error with rank r"; later steps let the
    quantiser see what the adapter already covers. Returns the last ``LoftQ`` (Q, A, B) with the
    relative error after every step. W, r, scale as for LoRA (1 ≤ r ≤ min(W.shape), s > 0).
    """
    W = _check_weight("W", W)
    r = check_int("r", r, minimum=1, maximum=min(W.shape))
    scale = check_number("scale", scale, positive=True)
    iterations = check_int("iterations", iterations, minimum=1)
    W64 = W.astype(np.float64)
    dtype = W.dtype if W.dtype != np.float16 else np.float32
    q = quantize_nf4(W, block_size, double_quant)                  # Q_1 = quant(W)
    deq = dequantize_nf4(q, dtype=np.float64)
    errors = [relative_error(W64, deq)]                            # t = 0: NF4 alone
    for t in range(iterations):
        if t > 0:
            q = quantize_nf4((W64 - low_rank).astype(W.dtype), block_size, double_quant)
            deq = dequantize_nf4(q, dtype=np.float64)
        A, B = pissa_factors(W64 - deq, r, scale)                  # s B A = the residual's best rank-r part
        low_rank = F.lora_delta_weight(A, B, scale)
        errors.append(relative_error(W64, deq + low_rank))
    return LoftQ(q, A.astype(dtype), B.astype(dtype), errors)


# ---------------------------------------------------------------------------------- real models


class RealModel(NamedTuple):
    """A LLaMA-style decoder for the byte arithmetic: the block shapes (``counting``'s
    ``ModelConfig``), the vocabulary (token embedding and the untied LM head, V × d_model each)."""
    config: ModelConfig
    vocab: int

    @property
    def name(self) -> str:
        return self.config.name

    def block_linear_params(self) -> int:
        """Entries of every linear layer of every block (what QLoRA quantises)."""
        per_block = sum(int(np.prod(target_shape(self.config, t))) for t in block_targets(self.config))
        return self.config.n_layers * per_block

    def other_params(self) -> int:
        """Embedding, LM head and RMSNorm weights (2 per block and a final one): kept in 16 bit."""
        d = self.config.d_model
        return 2 * self.vocab * d + (2 * self.config.n_layers + 1) * d

    def n_params(self) -> int:
        return self.block_linear_params() + self.other_params()


#: LLaMA-2 7B (Touvron et al. 2023; 6,738,415,616 parameters) and LLaMA 65B (Touvron et al. 2023a,
#: arXiv 2302.13971, Table 2: d_model 8192, 80 layers, 64 heads; SwiGLU width 22016; 65.3e9)
REAL_MODELS = {
    "llama2-7b": RealModel(MODEL_CONFIGS["llama2-7b"], 32000),
    "llama-65b": RealModel(ModelConfig("llama-65b", d_model=8192, n_layers=80, d_ff=22016, n_params=65e9,
                                       gated_mlp=True), 32000),
}


class QLoRAMemory(NamedTuple):
    """Bytes of fine-tuning one real model (``qlora_memory``); activations are not counted."""
    name: str
    n_params: int
    lora_params: int
    base_16bit: int           # every weight in 16 bit
    base_nf4: int             # block linears in NF4 (+ double quant), the rest in 16 bit
    lora_state: int           # LoRA params (16 bit) + grads (16 bit) + Adam m, v (32 bit)
    full_ft_16bit: int        # full fine-tuning: 16-bit weights + 16-bit grads + 32-bit Adam m, v

    @property
    def lora_16bit(self) -> int:
        return self.base_16bit + self.lora_state

    @property
    def qlora(self) -> int:
        return self.base_nf4 + self.lora_state


def qlora_memory(model: str = "llama-65b", r: int = 64, block_size: int = 64, double_quant: bool = True) -> QLoRAMemory:
    """The "65B on one 48 GB GPU" arithmetic (QLoRA §1, §4), as formulas of the shapes.

    * base in 16 bit: ``2 · n`` bytes;
    * base in NF4: ``nf4_bits_per_parameter / 8`` bytes per entry of the block linears, 2 bytes
      per other parameter (embeddings, LM head, norms stay 16 bit, as QLoRA keeps them);
    * LoRA on every linear layer of every block (QLoRA's setting, r = 64):
      ``r (d_in + d_out)`` per matrix, stored and differentiated in 16 bit (2 + 2 bytes) with
      Adam's m, v in 32 bit (8 bytes): 12 bytes per LoRA parameter;
    * full fine-tuning in 16 bit with Adam: 12 bytes per parameter (65B: ≈ 783 GB, QLoRA's
      "more than 780 GB").

    Left out, and what a real run needs besides: activations (they grow with batch × sequence
    length; QLoRA uses gradient checkpointing to keep them small) and the memory spikes that
    QLoRA's *paged optimizer* absorbs by moving Adam's state to CPU RAM when the GPU runs out;
    also the CUDA context and framework overheads.
    """
    if model not in REAL_MODELS:
        raise ValueError(f"model must be one of {sorted(REAL_MODELS)}, got {model!r}")
    m = REAL_MODELS[model]
    r = check_int("r", r, minimum=1)
    bits = nf4_bits_per_parameter(block_size, double_quant)
    n_lin, n_other = m.block_linear_params(), m.other_params()
    lora = lora_param_count(m.config, block_targets(m.config), r)
    return QLoRAMemory(
        name=model, n_params=n_lin + n_other, lora_params=lora,
        base_16bit=2 * (n_lin + n_other),
        base_nf4=int(round(n_lin * bits / 8)) + 2 * n_other,
        lora_state=lora * (2 + 2 + 8),
        full_ft_16bit=(n_lin + n_other) * (2 + 2 + 8))

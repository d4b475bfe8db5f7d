"""Pure forward/backward pairs: the whole of lora_np's math lives here.

Every op is a pair, in the style of the CS231n layer files::

    out, cache = op_forward(inputs...)
    grads      = op_backward(dout, cache)

* ``forward`` returns the output and a NamedTuple ``cache`` holding exactly what the backward
  pass needs (so ``cache.H`` reads as the math reads).
* ``backward`` takes ``dout = dL/dout`` (same shape as ``out``) and returns one gradient per
  differentiable input, named ``d<input>``.
* Pure: no globals, inputs are never changed in place.
* ``x`` may have any number of leading dimensions (``N`` rows = their product).
* dtype in = dtype out. Scalars are turned into the input's dtype before they touch an array,
  because NumPy 2 promotes ``float32_array * np.float64(s)`` to float64.

Notation (lora_np/README.md): ``W`` (d_out, d_in), ``b`` (d_out,), ``A`` (r, d_in),
``B`` (d_out, r), ``scale`` = s, ``G`` = dL/dY, ``H`` = X Aᵀ; ``N`` rows, ``T`` tokens.

Backward functions of layers with a frozen weight take ``need_dW`` / ``need_db`` flags: a
frozen W needs no ``dW = Gᵀ X``, and skipping that (d_out, d_in) GEMM is where LoRA saves
backward compute; the flags are set when W, b are trainable (after ``Module.unfreeze()``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "linear_forward", "linear_backward",
    "embedding_forward", "embedding_backward", "lora_embedding_forward", "lora_embedding_backward",
    "lora_delta_weight", "lora_linear_forward", "lora_linear_backward",
    "relu_forward", "relu_backward", "gelu_forward", "gelu_backward",
    "tanh_forward", "tanh_backward", "ACTIVATIONS",
    "softmax_forward", "softmax_backward",
    "attention_forward", "attention_backward",
    "layer_norm_forward", "layer_norm_backward",
    "mse_loss", "cross_entropy_loss",
    "dora_weight_norm", "dora_weight", "dora_linear_forward", "dora_linear_backward",
]


def _rows(a: np.ndarray) -> np.ndarray:
    """View ``a`` of shape (..., d) as a matrix (N, d), N = product of leading dims."""
    return a.reshape(-1, a.shape[-1])


def _matmul_rows(a: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``a @ M`` for ``a`` (..., k) and a matrix ``M`` (k, n), as ONE GEMM (N, k) @ (k, n)
    viewed back as (..., n). (NumPy's ``@`` on a 3-D ``a`` runs one smaller GEMM per leading
    index, which is slower for large matrices.)"""
    if a.ndim == 2:                               # already (N, k): skip two reshapes
        return a @ M
    return (_rows(a) @ M).reshape(*a.shape[:-1], M.shape[-1])


def _as_scalar(value: float, dtype: np.dtype):
    """``value`` as a NumPy scalar of ``dtype``, so it cannot promote a float32 array."""
    return np.dtype(dtype).type(value)


def _sum_rows(a: np.ndarray) -> np.ndarray:
    """``Σ_rows a``: (..., d) -> (d,), the sum over all N rows (a bias's gradient Σ G)."""
    return _rows(a).sum(axis=0)


def _weight_grad(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``Gᵀ X`` (d_out, d_in) for G (..., d_out), X (..., d_in): the gradient of the weight
    of ``Y = X Wᵀ``, summed over all N rows — one (d_out, N) @ (N, d_in) GEMM."""
    return _rows(dy).T @ _rows(x)


# ----------------------------------------------------------------------------- linear


class LinearCache(NamedTuple):
    x: np.ndarray          # (..., d_in)
    W: np.ndarray          # (d_out, d_in)
    has_bias: bool


def linear_forward(x, W, b=None):
    """Affine map ``Y = X Wᵀ + b``.

    Parameters
    ----------
    x : (..., d_in)
    W : (d_out, d_in)   PyTorch ``nn.Linear`` layout
    b : (d_out,) or None

    Returns
    -------
    y : (..., d_out)
    cache : LinearCache
    """
    y = _matmul_rows(x, W.T)                      # (..., d_in) @ (d_in, d_out) -> (..., d_out)
    if b is not None:
        y += b                                    # y is a fresh array, so += is safe
    return y, LinearCache(x, W, b is not None)


def linear_backward(dy, cache: LinearCache, need_dW=True, need_db=True, need_dx=True):
    """Gradients of ``Y = X Wᵀ + b`` with ``G = dL/dY`` of shape (..., d_out)::

        dX = G W          (..., d_in)
        dW = Gᵀ X         (d_out, d_in)   (sum over all N rows)
        db = Σ_rows G     (d_out,)        (None when there is no bias)

    ``need_dW=False`` (a frozen W) skips the dW GEMM and returns None for it; the cache's
    ``x`` may then be None. ``need_db=False`` likewise returns None for db, and
    ``need_dx=False`` (nobody reads the input gradient: a model's first layer) None for dx,
    skipping its GEMM. Returns ``(dx, dW, db)``.
    """
    x, W, has_bias = cache
    dx = _matmul_rows(dy, W) if need_dx else None   # (..., d_out) @ (d_out, d_in) -> (..., d_in)
    dW = _weight_grad(dy, x) if need_dW else None
    db = _sum_rows(dy) if has_bias and need_db else None
    return dx, dW, db


# -------------------------------------------------------------------------- embedding
#
# An embedding is a linear layer whose input is one-hot: with ``e_v`` the v-th unit vector of
# length V, ``W[v] = e_vᵀ W``. So its forward is a row lookup instead of a GEMM, and its
# backward ``dW = Σ_n e_{idx_n} G_nᵀ`` is a scatter-add of the rows of G into the rows they
# came from — a row looked up k times collects k gradients.


def _scatter_add_rows(idx, rows, V):
    """``out[v] = Σ_{n : idx_n = v} rows[n]``: idx (N,) ints in [0, V), rows (N, k) -> (V, k).

    The same sums as ``np.add.at(out, idx, rows)`` (repeated indices add up), computed by
    sorting: a stable sort groups the rows of each index, one ``np.add.reduceat`` sums each
    group, and the sums are written to their rows (indices that never occur get 0). Several
    times faster than ``np.add.at`` on (N, k) rows; exact up to the order of the additions.
    """
    out = np.zeros((V, rows.shape[1]), dtype=rows.dtype)
    if idx.size == 0:
        return out
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])   # first row of each group
    out[sorted_idx[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


class EmbeddingCache(NamedTuple):
    idx: np.ndarray        # (...) integer ids in [0, V)
    V: int                 # number of rows of W (num_embeddings)


def embedding_forward(idx, W):
    """Row lookup ``Y[...] = W[idx[...]]``, i.e. ``Y = onehot(idx) W``.

    Parameters
    ----------
    idx : (...) integer ids in [0, V) (not checked here: the module checks them, since NumPy
          would read a negative id from the end of W)
    W : (V, d)   one row per id (PyTorch ``nn.Embedding.weight`` layout)

    Returns
    -------
    y : (..., d)   a fresh array (fancy indexing copies)
    cache : EmbeddingCache
    """
    return W[idx], EmbeddingCache(idx, W.shape[0])


def embedding_backward(dy, cache: EmbeddingCache):
    """Gradient of the lookup with ``G = dL/dY`` (..., d)::

        dW = onehot(idx)ᵀ G,   i.e.   dW[v] = Σ_{n : idx_n = v} G_n      (V, d)

    a scatter-add: an id that occurs k times gets the sum of its k rows of G; an id that does
    not occur gets 0. There is no input gradient (the ids are integers). Returns ``dW``.
    """
    idx, V = cache
    return _scatter_add_rows(idx.reshape(-1), _rows(dy), V)


class LoRAEmbeddingCache(NamedTuple):
    idx: np.ndarray        # (...) integer ids in [0, V)
    H: np.ndarray          # (..., r)  H = A[:, idx]ᵀ, the LoRA branch's lookup
    B: np.ndarray          # (d, r)
    V: int                 # number of rows of W
    scale: float


def lora_embedding_forward(idx, W, A, B, scale):
    """LoRA on an embedding (loralib's and PEFT's layout): frozen ``W`` (V, d) plus ``s (B A)ᵀ``::

        Y = W[idx] + s · H Bᵀ,    H = A[:, idx]ᵀ = (Aᵀ)[idx]      (..., r)

    The embedding is a linear layer on a one-hot input ``e_idx``: its weight in the
    (d_out, d_in) layout is ``Wᵀ`` (d, V), and LoRA's ``ΔWᵀ = s B A`` with ``A`` (r, V) and
    ``B`` (d, r) is the usual update of that weight, and the branch's ``X Aᵀ = e_idxᵀ Aᵀ =
    A[:, idx]ᵀ`` is a lookup too. The table's update is ``ΔW = s (B A)ᵀ`` (V, d)
    (``lora_delta_weight(A, B, s).T``) — never formed here.

    Parameters
    ----------
    idx : (...) integer ids in [0, V)
    W : (V, d) frozen;   A : (r, V);   B : (d, r);   scale : float (s)

    Returns
    -------
    y : (..., d);   cache : LoRAEmbeddingCache
    """
    s = _as_scalar(scale, W.dtype)
    H = A.T[idx]                                  # (..., r): column idx of A, one row per id
    y = W[idx]                                    # (..., d)  frozen path, a fresh array
    y += _matmul_rows(H * s, B.T)                 # (..., r) @ (r, d) -> (..., d)
    return y, LoRAEmbeddingCache(idx, H, B, W.shape[0], scale)


def lora_embedding_backward(dy, cache: LoRAEmbeddingCache, need_dW=False):
    """Gradients of the LoRA embedding, with ``G = dL/dY`` (..., d) and ``H = A[:, idx]ᵀ``::

        dB = s Gᵀ H                                     (d, r)
        dA = (scatter_add(idx, s G B))ᵀ,  i.e.  dA[:, v] = s Σ_{n : idx_n = v} Bᵀ G_n     (r, V)

    the LoRA linear layer's ``dB = s Gᵀ X Aᵀ`` and ``dA = s (G B)ᵀ X`` with a one-hot X, so
    every product with X is a lookup or a scatter-add. Equivalently, ``dA = s Bᵀ (dL/dW)ᵀ``
    and ``dB = s (dL/dW)ᵀ Aᵀ`` with the table's gradient ``dL/dW`` (V, d), which is not formed.

    Returns ``(dA, dB)``, or ``(dA, dB, dW)`` with ``need_dW`` (the frozen table trained too,
    after ``unfreeze()``): ``dW = embedding_backward``'s scatter-add of G (V, d).
    """
    idx, H, B, V, scale = cache
    s = _as_scalar(scale, dy.dtype)
    G2, ids = _rows(dy), idx.reshape(-1)
    dB = G2.T @ _rows(H)                          # (d, N) @ (N, r) -> (d, r)
    dB *= s
    sGB = G2 @ B                                  # (N, d) @ (d, r) -> (N, r)
    sGB *= s
    dA = _scatter_add_rows(ids, sGB, V).T         # (V, r) -> (r, V)
    if not need_dW:
        return dA, dB
    return dA, dB, _scatter_add_rows(ids, G2, V)


# ------------------------------------------------------------------------ LoRA linear


def lora_delta_weight(A, B, scale):
    """LoRA's weight update ``ΔW = s · B A``: (d_out, r) @ (r, d_in) -> (d_out, d_in).

    The one place ΔW is formed, for merging, PiSSA's residual, DoRA's norm and analysis —
    never in LoRA's forward or backward (they cost O(N r (d_in + d_out)) without it). The
    result has B's dtype (s is cast to it first).
    """
    return (B @ A) * _as_scalar(scale, B.dtype)


class LoRALinearCache(NamedTuple):
    x: np.ndarray                  # (..., d_in) input
    xd: np.ndarray                 # (..., d_in) input of the LoRA branch (x after dropout)
    H: np.ndarray                  # (..., r)    H = xd Aᵀ
    W: np.ndarray                  # (d_out, d_in)
    A: np.ndarray                  # (r, d_in)
    B: np.ndarray                  # (d_out, r)
    scale: float
    dropout_mask: np.ndarray | None


def lora_linear_forward(x, W, b, A, B, scale, dropout_mask=None):
    """LoRA linear layer: frozen ``W``, ``b`` plus a trainable low-rank branch.

    ``Y = X Wᵀ + b + s · (X̃ Aᵀ) Bᵀ``  with  ``X̃ = X ⊙ mask`` (dropout on the LoRA branch only,
    as loralib and PEFT do; ``mask`` already holds the 1/(1-p) rescaling) and ``s = scale``.

    ``B @ A`` is never formed: the branch costs O(N r (d_in + d_out)) instead of O(N d_in d_out).

    Parameters
    ----------
    x : (..., d_in)
    W : (d_out, d_in) frozen;   b : (d_out,) or None, frozen
    A : (r, d_in);   B : (d_out, r);   scale : float
    dropout_mask : None or array broadcastable to x

    Returns
    -------
    y : (..., d_out);   cache : LoRALinearCache
    """
    s = _as_scalar(scale, x.dtype)
    xd = x if dropout_mask is None else x * dropout_mask.astype(x.dtype, copy=False)
    H = _matmul_rows(xd, A.T)                     # (..., d_in) @ (d_in, r) -> (..., r)
    y = _matmul_rows(x, W.T)                      # (..., d_out)  frozen path
    if b is not None:
        y += b
    y += _matmul_rows(H * s, B.T)                 # (s H) Bᵀ: scale the (..., r) side, not (..., d_out)
    return y, LoRALinearCache(x, xd, H, W, A, B, scale, dropout_mask)


def lora_linear_backward(dy, cache: LoRALinearCache, need_dW=False, need_db=False, need_dx=True):
    """Gradients of the LoRA layer, with ``G = dL/dY`` (..., d_out) and ``H = X̃ Aᵀ``::

        dB = s Gᵀ H            (d_out, r)
        dA = s (G B)ᵀ X̃        (r, d_in)
        dX = G W + s ((G B) A) ⊙ mask     (..., d_in)

    Equivalently ``dB = s (dL/dW) Aᵀ`` and ``dA = s Bᵀ (dL/dW)`` with ``dL/dW = Gᵀ X̃``: the
    full-weight gradient projected onto the factors. That gradient is *not* formed here (the
    frozen ``W`` needs no ``dW``), which is where LoRA saves backward compute.

    Returns ``(dx, dA, dB)``. When the base W, b are trainable too (``need_dW`` / ``need_db``,
    after ``unfreeze()``) it returns ``(dx, dA, dB, dW, db)`` with ``dW = Gᵀ X`` (d_out, d_in)
    and ``db = Σ_rows G`` (d_out,) — the plain linear layer's — and None for the one not asked.
    ``need_dx=False`` (nobody reads the input gradient) returns None for dx and skips its two
    GEMMs, ``G W`` the larger.
    """
    x, xd, H, W, A, B, scale, mask = cache
    s = _as_scalar(scale, dy.dtype)
    sGB = _matmul_rows(dy, B)                     # (..., d_out) @ (d_out, r) -> (..., r)
    sGB *= s                                      # s G B: the scale on the small (..., r) side
    G2, H2, sGB2, Xd2 = _rows(dy), _rows(H), _rows(sGB), _rows(xd)
    dB = G2.T @ H2                                # (d_out, N) @ (N, r) -> (d_out, r)
    dB *= s                                       # dB = s Gᵀ H
    dA = sGB2.T @ Xd2                             # (r, N) @ (N, d_in) -> (r, d_in) = s (G B)ᵀ X̃
    dx = None
    if need_dx:
        d_branch = _matmul_rows(sGB, A)           # (..., r) @ (r, d_in) -> (..., d_in) = s (G B) A
        if mask is not None:
            d_branch *= mask.astype(dy.dtype, copy=False)
        dx = _matmul_rows(dy, W)                  # (..., d_in)
        dx += d_branch
    if not (need_dW or need_db):
        return dx, dA, dB
    dW = _weight_grad(dy, x) if need_dW else None   # (d_out, d_in); x, not X̃: W sees the whole input
    return dx, dA, dB, dW, _sum_rows(dy) if need_db else None


# ------------------------------------------------------------------------ activations


class ActivationCache(NamedTuple):
    x: np.ndarray
    y: np.ndarray


def relu_forward(x):
    """``y = max(x, 0)`` elementwise. Shapes: any -> same."""
    y = np.maximum(x, 0)
    return y, ActivationCache(x, y)


def relu_backward(dy, cache: ActivationCache):
    """``dx = dy ⊙ [x > 0]`` (the kink at 0 gets gradient 0)."""
    return dy * (cache.x > 0)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, tanh approximation (GPT-2; PyTorch ``approximate='tanh'``)::

        u = √(2/π) (x + 0.044715 x³),   y = ½ x (1 + tanh u)

    Computed in two fresh arrays, updated in place (``x**3`` would call ``pow`` per element,
    several times slower than two multiplies, and every ``a * b`` of whole arrays allocates).
    """
    u = x * x
    u *= 0.044715
    u += 1.0
    u *= x                                        # x (1 + 0.044715 x²) = x + 0.044715 x³
    u *= _GELU_C                                  # u
    t = np.tanh(u, out=u)                         # t = tanh u, in u's memory
    y = t + 1.0
    y *= x
    y *= 0.5                                      # y = ½ x (1 + t)
    return y, GeluCache(x, t)


class GeluCache(NamedTuple):
    x: np.ndarray
    t: np.ndarray      # tanh(u)


def gelu_backward(dy, cache: GeluCache):
    """``dy/dx = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²)`` with ``t = tanh u``."""
    x, t = cache
    dx = x * x
    dx *= 3 * 0.044715
    dx += 1.0
    dx *= _GELU_C                                 # du/dx = √(2/π) (1 + 3·0.044715 x²)
    w = t * t
    np.subtract(1.0, w, out=w)
    w *= x                                        # x (1 − t²)
    dx *= w
    dx += t
    dx += 1.0
    dx *= 0.5                                     # ½ (1 + t) + ½ x (1 − t²) du/dx
    dx *= dy
    return dx


def tanh_forward(x):
    """``y = tanh x``."""
    y = np.tanh(x)
    return y, ActivationCache(x, y)


def tanh_backward(dy, cache: ActivationCache):
    """``dx = dy ⊙ (1 − y²)``."""
    return dy * (1.0 - cache.y * cache.y)


#: name -> (forward, backward), used by the modules to pick an activation by name
ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "tanh": (tanh_forward, tanh_backward),
}


# ---------------------------------------------------------------------------- softmax


class SoftmaxCache(NamedTuple):
    p: np.ndarray
    axis: int


def softmax_forward(x, axis=-1):
    """Numerically stable softmax along ``axis``: ``p_i = exp(x_i − max x) / Σ_j exp(x_j − max x)``.

    Subtracting the max changes nothing mathematically and keeps ``exp`` from overflowing.
    Entries equal to ``-inf`` (masked) get probability 0.
    """
    p = x - x.max(axis=axis, keepdims=True)       # z = x − max x (a fresh array) ...
    np.exp(p, out=p)                              # ... e = exp z in place ...
    p /= p.sum(axis=axis, keepdims=True)          # ... p = e / Σ e in place
    return p, SoftmaxCache(p, axis)


def softmax_backward(dp, cache: SoftmaxCache):
    """Jacobian-vector product of softmax: ``dx = p ⊙ (dp − Σ_j dp_j p_j)``."""
    p, axis = cache
    dx = dp * p
    row = dx.sum(axis=axis, keepdims=True)        # Σ_j dp_j p_j
    np.subtract(dp, row, out=dx)
    dx *= p                                       # p ⊙ (dp − Σ_j dp_j p_j), in one fresh array
    return dx


# -------------------------------------------------------------------------- attention


class AttentionCache(NamedTuple):
    q: np.ndarray      # (..., T, d_head)
    k: np.ndarray      # (..., T, d_head)
    v: np.ndarray      # (..., T, d_head)
    P: np.ndarray      # (..., T, T) attention probabilities
    softmax: SoftmaxCache
    scale: float


def causal_mask(T: int) -> np.ndarray:
    """Boolean (T, T) mask, True where query t may *not* look (keys after t)."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


def _causal_bias(T: int, dtype) -> np.ndarray:
    """(T, T) of ``dtype``: −∞ where ``causal_mask`` is True, 0 elsewhere. Adding it to the
    scores sets exactly the masked entries to −∞ and leaves the others as they are (x + 0 = x),
    several times faster than assigning through the boolean mask on every (batch, head)."""
    return np.where(causal_mask(T), -np.inf, 0.0).astype(dtype)


def attention_forward(q, k, v, causal=False):
    """Scaled dot-product attention core::

        S = q kᵀ / √d_head        (..., T, T)
        P = softmax(S)  (row-wise; with causal=True, S[t, u] = −∞ for u > t)
        out = P v                 (..., T, d_head)

    Parameters
    ----------
    q, k, v : (..., T, d_head)   leading dims are usually (batch, heads)
    """
    T, d_head = q.shape[-2], q.shape[-1]
    c = 1.0 / math.sqrt(d_head)
    S = q @ np.swapaxes(k, -1, -2)                # (..., T, d) @ (..., d, T) -> (..., T, T)
    S *= _as_scalar(c, S.dtype)
    if causal:
        S += _causal_bias(T, S.dtype)             # −∞ at every (t, u > t) entry of every (batch, head)
    P, sm_cache = softmax_forward(S, axis=-1)
    out = P @ v                                   # (..., T, T) @ (..., T, d) -> (..., T, d)
    return out, AttentionCache(q, k, v, P, sm_cache, c)


def attention_backward(dout, cache: AttentionCache):
    """Backward of the attention core. With ``dO = dL/dout``::

        dP = dO vᵀ,   dV = Pᵀ dO,   dS = softmax_backward(dP),
        dq = dS k / √d_head,   dk = dSᵀ q / √d_head

    Masked entries have P = 0, so their dS is 0 automatically. Returns ``(dq, dk, dv)``.
    """
    q, k, v, P, sm_cache, c = cache
    c = _as_scalar(c, dout.dtype)
    dP = dout @ np.swapaxes(v, -1, -2)            # (..., T, d) @ (..., d, T) -> (..., T, T)
    dv = np.swapaxes(P, -1, -2) @ dout            # (..., T, T) @ (..., T, d) -> (..., T, d)
    dS = softmax_backward(dP, sm_cache)           # (..., T, T)
    dq = dS @ k                                   # (..., T, T) @ (..., T, d) -> (..., T, d)
    dq *= c
    dk = np.swapaxes(dS, -1, -2) @ q              # (..., T, T) @ (..., T, d) -> (..., T, d)
    dk *= c
    return dq, dk, dv


# ------------------------------------------------------------------------- layer norm


class LayerNormCache(NamedTuple):
    xhat: np.ndarray       # (..., D) normalised input
    rstd: np.ndarray       # (..., 1) 1 / sqrt(var + eps)
    gamma: np.ndarray      # (D,)


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """Layer normalisation over the last dimension D::

        μ = mean(x),  σ² = mean((x − μ)²),  x̂ = (x − μ) / √(σ² + ε),  y = γ ⊙ x̂ + β

    x : (..., D);  gamma, beta : (D,)  ->  y : (..., D)
    """
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + _as_scalar(eps, x.dtype))
    xhat = xc * rstd
    y = xhat * gamma + beta
    return y, LayerNormCache(xhat, rstd, gamma)


def layer_norm_backward(dy, cache: LayerNormCache):
    """Backward of layer norm (the fused form; D = last dim)::

        dγ = Σ_rows dy ⊙ x̂,   dβ = Σ_rows dy,   g = dy ⊙ γ
        dx = (1/σ̂) (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))

    Returns ``(dx, dgamma, dbeta)``.
    """
    xhat, rstd, gamma = cache
    g = dy * gamma
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dgamma = _sum_rows(dy * xhat)
    dbeta = _sum_rows(dy)
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------- losses


def mse_loss(pred, target):
    """Mean squared error over every element and its gradient::

        L = (1/M) Σ (pred − target)²,   dL/dpred = (2/M)(pred − target),  M = pred.size

    Returns ``(loss, dpred)``; ``loss`` is a Python float.
    """
    if pred.shape != target.shape:
        raise ValueError(f"mse_loss: pred has shape {pred.shape} but target has shape {target.shape}; "
                         "expected equal shapes")
    diff = pred - target.astype(pred.dtype, copy=False)
    M = diff.size
    loss = float((diff * diff).sum() / M)
    dpred = diff * _as_scalar(2.0 / M, pred.dtype)
    return loss, dpred


def cross_entropy_loss(logits, labels):
    """Mean cross-entropy of integer ``labels`` under ``softmax(logits)``, numerically stable::

        L = −(1/N) Σ_n log p[n, y_n],   p = softmax(logits),   dL/dlogits = (p − onehot(y)) / N

    logits : (..., C);  labels : (...) integers in [0, C). Uses log-sum-exp, so huge logits
    never overflow. Returns ``(loss, dlogits)``.
    """
    if logits.shape[:-1] != np.shape(labels):
        raise ValueError(f"cross_entropy_loss: logits {logits.shape} need labels of shape "
                         f"{logits.shape[:-1]}, got {np.shape(labels)}")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"cross_entropy_loss: labels must be integers, got dtype {labels.dtype}")
    C = logits.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"cross_entropy_loss: labels must lie in [0, {C}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    Z = _rows(logits)
    y = labels.reshape(-1)
    N = Z.shape[0]
    z = Z - Z.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z).sum(axis=1))
    log_p = z[np.arange(N), y] - log_sum
    loss = float(-log_p.mean())
    p = np.exp(z - log_sum[:, None])
    p[np.arange(N), y] -= 1.0
    dlogits = (p * _as_scalar(1.0 / N, logits.dtype)).reshape(logits.shape)
    return loss, dlogits


# ------------------------------------------------------------------------------- DoRA
#
# DoRA (Liu et al. 2024, arXiv 2402.09353, §4, eq. 5) splits the adapted weight into a magnitude
# and a direction, per output row i in the (d_out, d_in) layout (as PEFT does):
#
#     V = W + s B A                   (d_out, d_in)  the LoRA-updated weight
#     n_i = ‖V_i‖                     (d_out,)       row norms
#     W'_i = m_i V_i / n_i            (d_out, d_in)  each row rescaled to length |m_i|
#     Y = X W'ᵀ + b = c ⊙ (X Wᵀ + s (X̃ Aᵀ) Bᵀ) + b,   c = m / n   (d_out,)
#
# The X-path stays low-rank (no O(N d_in d_out) GEMM); only the norm needs V itself, which
# costs O(r d_in d_out) once per step, independent of N — DoRA's price over LoRA.


class DoRALinearCache(NamedTuple):
    x: np.ndarray                  # (..., d_in)  input
    xd: np.ndarray                 # (..., d_in)  input of the LoRA branch (x after dropout)
    H: np.ndarray                  # (..., r)     H = X̃ Aᵀ
    Z: np.ndarray                  # (..., d_out) Z = X Wᵀ + s H Bᵀ (un-normalised, no bias)
    W: np.ndarray                  # (d_out, d_in)
    A: np.ndarray                  # (r, d_in)
    B: np.ndarray                  # (d_out, r)
    m: np.ndarray                  # (d_out,)     magnitude
    V: np.ndarray                  # (d_out, d_in) V = W + s B A
    n: np.ndarray                  # (d_out,)     n_i = ‖V_i‖
    scale: float
    detach_norm: bool
    dropout_mask: np.ndarray | None


def dora_weight_norm(W, A, B, scale):
    """Row norms of the LoRA-updated weight: ``n_i = ‖(W + s B A)_i‖``.

    W : (d_out, d_in);  A : (r, d_in);  B : (d_out, r)  ->  (V (d_out, d_in), n (d_out,))

    The one place DoRA forms ``B A`` (the norm needs every entry of V). ``DoRALinear``
    initialises ``m`` with this very function, so at init ``m / n`` is exactly 1.
    """
    V = W + lora_delta_weight(A, B, scale)        # (d_out, d_in)
    n = np.sqrt((V * V).sum(axis=1))              # (d_out,)
    return V, n


def dora_weight(W, A, B, m, scale):
    """The weight a DoRA layer applies, ``W' = diag(m / n) V`` with ``V = W + s B A`` and
    ``n_i = ‖V_i‖``: row i has V_i's direction and length |m_i|.

    W : (d_out, d_in);  A : (r, d_in);  B : (d_out, r);  m : (d_out,)
    ->  (W' (d_out, d_in), n (d_out,))   (n, so that a merge can be undone: W₀ = diag(n/m) W' − sBA)
    """
    V, n = dora_weight_norm(W, A, B, scale)
    return V * (m / n)[:, None], n


def dora_linear_forward(x, W, b, A, B, m, scale, detach_norm=False, dropout_mask=None):
    """DoRA linear layer: ``Y = c ⊙ (X Wᵀ + s (X̃ Aᵀ) Bᵀ) + b`` with ``c = m / ‖W + s B A‖_row``.

    Equivalently ``Y = X W'ᵀ + b`` with ``W'_i = m_i (W + sBA)_i / ‖(W + sBA)_i‖``: row i of the
    adapted weight has direction ``(W + sBA)_i`` and length ``|m_i|``. The bias is not rescaled
    (as in PEFT). Dropout, if any, acts on the LoRA branch's input only.

    Parameters
    ----------
    x : (..., d_in)
    W : (d_out, d_in) frozen;   b : (d_out,) or None, frozen
    A : (r, d_in);   B : (d_out, r);   m : (d_out,) magnitude;   scale : float (s)
    detach_norm : bool
        False: the exact gradient. True: the paper's cheaper variant (Liu et al. 2024, §4.3;
        the only one PEFT implements) that treats ``n`` as a constant in the backward pass.
        The forward is the same.
    dropout_mask : None or array broadcastable to x (holding the 1/(1-p) rescaling)

    Returns
    -------
    y : (..., d_out);   cache : DoRALinearCache

    Raises ValueError if a row of ``W + sBA`` is zero (its direction is undefined).
    """
    s = _as_scalar(scale, x.dtype)
    V, n = dora_weight_norm(W, A, B, scale)
    if np.any(n == 0):
        raise ValueError(f"dora_linear_forward: rows {np.flatnonzero(n == 0).tolist()} of W + s·B@A "
                         "are zero, so their direction (row / norm) is undefined")
    xd = x if dropout_mask is None else x * dropout_mask.astype(x.dtype, copy=False)
    H = xd @ A.T                                  # (..., d_in) @ (d_in, r) -> (..., r)
    Z = x @ W.T                                   # (..., d_out) frozen path
    Z += s * (H @ B.T)                            # (..., r) @ (r, d_out) -> (..., d_out)
    y = Z * (m / n)                               # (..., d_out) * (d_out,): row i scaled by c_i
    if b is not None:
        y += b
    return y, DoRALinearCache(x, xd, H, Z, W, A, B, m, V, n, scale, bool(detach_norm), dropout_mask)


def dora_linear_backward(dy, cache: DoRALinearCache, need_dW=False, need_db=False, need_dx=True):
    """Gradients of the DoRA layer, with ``G = dL/dY`` (..., d_out) and ``c = m / n``::

        dm_i = Σ_rows G_i Z_i / n_i                       (d_out,)  same in both variants
        G̃   = G ⊙ c                                       (..., d_out)
        dB   = s G̃ᵀ H  +  s K A ᵀ                          (d_out, r)
        dA   = s (G̃ B)ᵀ X̃  +  s Bᵀ K                        (r, d_in)
        dX   = G̃ W + s ((G̃ B) A) ⊙ mask                    (..., d_in)  same in both variants

    where ``K = diag(k) V`` (d_out, d_in), ``k_i = −m_i dm_i / n_i²``, is the gradient that
    flows through the norm. With ``detach_norm=True`` the norm is a constant and the K terms
    are dropped: the backward is then LoRA's backward with ``G`` replaced by ``G̃``.

    Why (row i, with ``dL/dW'_i = g_i = Σ_rows G_i X_rowᵀ`` and ``v̂_i = V_i / n_i``)::

        dL/dm_i = v̂_i · g_i,     dL/dV_i = (m_i / n_i) (I − v̂_i v̂_iᵀ) g_i     (exact)
                                 dL/dV_i = (m_i / n_i) g_i                    (detached)

    and ``dA = s Bᵀ dL/dV``, ``dB = s (dL/dV) Aᵀ`` (V depends on A, B only through s B A).
    The exact direction gradient is projected orthogonally to V_i: moving V_i along itself
    changes nothing, since W'_i only sees V_i's direction.

    Returns ``(dx, dA, dB, dm)``. When the base W, b are trainable too (``need_dW`` /
    ``need_db``, after ``unfreeze()``) it returns ``(dx, dA, dB, dm, dW, db)`` with
    ``dW = dL/dV = G̃ᵀ X + K`` (V = W + sBA depends on W with slope 1; no K when detached) and
    ``db = Σ_rows G`` (the bias is not rescaled), and None for the one not asked for.
    ``need_dx=False`` returns None for dx and skips its GEMMs (nobody reads it).
    """
    x, xd, H, Z, W, A, B, m, V, n, scale, detach_norm, mask = cache
    s = _as_scalar(scale, dy.dtype)
    c = m / n                                     # (d_out,)
    dm = _sum_rows(dy * Z) / n                   # (N, d_out) -> (d_out,)
    Gc = dy * c                                   # (..., d_out)  gradient w.r.t. Z
    GcB = Gc @ B                                  # (..., d_out) @ (d_out, r) -> (..., r)
    G2, H2, GcB2, Xd2 = _rows(Gc), _rows(H), _rows(GcB), _rows(xd)
    dB = s * (G2.T @ H2)                          # (d_out, N) @ (N, r) -> (d_out, r)
    dA = s * (GcB2.T @ Xd2)                       # (r, N) @ (N, d_in) -> (r, d_in)
    K = None if detach_norm else V * (-(m * dm) / (n * n))[:, None]   # (d_out, d_in) through the norm
    if K is not None:
        dB += s * (K @ A.T)                       # (d_out, d_in) @ (d_in, r) -> (d_out, r)
        dA += s * (B.T @ K)                       # (r, d_out) @ (d_out, d_in) -> (r, d_in)
    dx = None
    if need_dx:
        d_branch = s * (GcB @ A)                  # (..., r) @ (r, d_in) -> (..., d_in)
        if mask is not None:
            d_branch *= mask.astype(dy.dtype, copy=False)
        dx = Gc @ W                               # (..., d_in)
        dx += d_branch
    if not (need_dW or need_db):
        return dx, dA, dB, dm
    dW = None
    if need_dW:
        dW = _weight_grad(Gc, x)                  # G̃ᵀ X (d_out, d_in)
        if K is not None:
            dW += K
    return dx, dA, dB, dm, dW, _sum_rows(dy) if need_db else None

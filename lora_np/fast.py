"""Fast forms of lora_np's elementwise math: the same operations, run chunk by chunk.

The readable formulas live in ``functional`` (GELU) and ``optim`` (Adam's update). On a large
array each of their NumPy operations is one pass over memory: GELU's forward makes nine, Adam
about thirteen, and at d = 1024 every pass reads and writes arrays of 8–32 MiB from main memory.
``map_chunks`` runs the *same* operations on slices of a few hundred KiB instead, so that all
of a formula's passes over one slice hit the CPU's cache, and hands the slices to
``THREADS`` threads (NumPy releases the GIL inside its elementwise loops, so the slices run at
the same time).

Every operation here is elementwise, so applying it slice by slice computes every element
with exactly the operations, in exactly the order, of the readable form: the results are
**bit-for-bit** the same (tests/test_functional.py and tests/test_optim.py check it in float32
and float64). Only the memory traffic and the number of threads change.

* ``map_chunks(kernel, *arrays)`` — ``kernel(*slices)`` over aligned slices of same-size
  contiguous arrays, in parallel;
* ``gelu_forward`` / ``gelu_backward`` — ``functional.gelu_forward`` / ``gelu_backward``
  applied slice by slice; ``activation(name)`` is what ``modules.MLP`` calls;
* ``optim.Adam`` calls ``map_chunks`` with its own update formula;
* ``layer_norm_forward`` / ``layer_norm_backward`` — ``functional``'s layer norm with its
  temporaries reused in place (fewer full-size arrays allocated and passed over; each function's
  docstring says which), the same operations in the same order per element.

Small arrays (below ``MIN_CHUNKED`` elements) go straight to the readable function: splitting
them would only add Python overhead.
"""

from __future__ import annotations

import atexit
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import functional as F

__all__ = ["CHUNK", "THREADS", "MIN_CHUNKED", "map_chunks", "gelu_forward", "gelu_backward",
           "activation", "layer_norm_forward", "layer_norm_backward"]

#: elements per slice: 128 Ki numbers = 512 KiB in float32 (the best of 8 Ki … 512 Ki in
#: interleaved timings of GELU at (2048, 384) and (512, 4096)): large enough that the Python
#: calls per slice are cheap, small enough that a formula's passes over it stay in the cache
CHUNK = 1 << 17
#: threads the slices are spread over (the calling thread is one of them)
THREADS = max(1, min(2, os.cpu_count() or 1))
#: arrays smaller than this many elements are not split: 1 Mi numbers (4 MiB in float32). Below
#: it the arrays sit in the cache already and, in interleaved timings of whole training steps
#: (the d = 96 transformer's (2048, 384) GELU), the threads gained nothing; above it (the d = 1024
#: MLP's GELU and Adam) slicing on two threads made Adam about 2× and GELU about 1.5× faster
MIN_CHUNKED = 1 << 20

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=THREADS - 1, thread_name_prefix="lora_np-fast")
        atexit.register(_pool.shutdown)
    return _pool


def _forget_pool_after_fork() -> None:
    """A forked child (multiprocessing's workers) has the pool object but not its threads: it
    must start its own, or its first submit would wait forever."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run_range(kernel, flats, starts):
    for s in starts:
        kernel(*(a[s:s + CHUNK] for a in flats))


def map_chunks(kernel, *arrays) -> None:
    """Call ``kernel(*slices)`` on aligned slices of ``arrays`` (C-contiguous, all of the same
    size; each is viewed flat): slices of ``CHUNK`` elements, split into ``THREADS`` runs of
    consecutive slices, one per thread. ``kernel`` works in place on its slices (it writes its
    results into the output arrays' slices). Returns when every slice is done; an exception in
    any thread is raised here."""
    flats = [a.reshape(-1) for a in arrays]
    n = flats[0].size
    if any(a.size != n or not a.flags.c_contiguous for a in arrays):
        raise ValueError("map_chunks: expected C-contiguous arrays of one size, got sizes "
                         f"{[a.size for a in arrays]}")
    starts = list(range(0, n, CHUNK))
    threads = min(THREADS, len(starts))
    if threads <= 1:
        _run_range(kernel, flats, starts)
        return
    per = -(-len(starts) // threads)
    runs = [starts[i * per:(i + 1) * per] for i in range(threads)]
    futures = [_executor().submit(_run_range, kernel, flats, run) for run in runs[1:]]
    _run_range(kernel, flats, runs[0])
    for f in futures:
        f.result()


def gelu_forward(x):
    """``functional.gelu_forward`` slice by slice: the same ``(y, GeluCache(x, t))``, bit for bit."""
    if x.size < MIN_CHUNKED or not x.flags.c_contiguous:
        return F.gelu_forward(x)
    y, t = np.empty_like(x), np.empty_like(x)

    def kernel(xs, ys, ts):
        ys[...], cache = F.gelu_forward(xs)
        ts[...] = cache.t
    map_chunks(kernel, x, y, t)
    return y, F.GeluCache(x, t)


def gelu_backward(dy, cache: F.GeluCache):
    """``functional.gelu_backward`` slice by slice: the same ``dx``, bit for bit."""
    x, t = cache
    if dy.size < MIN_CHUNKED or not all(a.flags.c_contiguous for a in (x, t)) or dy.shape != x.shape:
        return F.gelu_backward(dy, cache)
    dx = np.empty_like(x, dtype=np.result_type(dy, x))

    def kernel(dys, xs, ts, dxs):
        dxs[...] = F.gelu_backward(dys, F.GeluCache(xs, ts))
    map_chunks(kernel, np.ascontiguousarray(dy), x, t, dx)
    return dx


#: readable pair -> its fast form (ReLU and tanh are single passes already)
_FAST_FORMS = {(F.gelu_forward, F.gelu_backward): (gelu_forward, gelu_backward)}


def activation(name: str):
    """``(forward, backward)`` of ``functional.ACTIVATIONS[name]``, in its fast form where this
    file has one (GELU); an entry replaced in ``functional.ACTIVATIONS`` is used as it is."""
    pair = F.ACTIVATIONS[name]
    return _FAST_FORMS.get(pair, pair)


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """``functional.layer_norm_forward`` with its temporaries reused: x − μ becomes x̂ in place
    and γ ⊙ x̂ becomes y in place. The same ``(y, LayerNormCache)``, bit for bit."""
    mu = x.mean(axis=-1, keepdims=True)
    xhat = x - mu                                 # xc, a fresh array ...
    sq = xhat * xhat
    var = sq.mean(axis=-1, keepdims=True)
    del sq
    rstd = 1.0 / np.sqrt(var + F._as_scalar(eps, x.dtype))
    xhat *= rstd                                  # ... x̂ = xc · rstd in its memory
    y = xhat * gamma
    y += beta
    return y, F.LayerNormCache(xhat, rstd, gamma)


def layer_norm_backward(dy, cache: F.LayerNormCache):
    """``functional.layer_norm_backward`` in two arrays (g and one scratch) instead of nine:
    ``dx = rstd ⊙ ((g − mean g) − x̂ ⊙ mean(g ⊙ x̂))``, the same operations in the same order,
    so the same ``(dx, dgamma, dbeta)``, bit for bit."""
    xhat, rstd, gamma = cache
    g = dy * gamma
    tmp = g * xhat
    g_mean = g.mean(axis=-1, keepdims=True)
    gx_mean = tmp.mean(axis=-1, keepdims=True)
    np.multiply(dy, xhat, out=tmp)
    dgamma = F._sum_rows(tmp)                     # Σ_rows dy ⊙ x̂
    dbeta = F._sum_rows(dy)
    g -= g_mean                                   # g − mean(g)            (g becomes dx)
    np.multiply(xhat, gx_mean, out=tmp)
    g -= tmp                                      #   − x̂ ⊙ mean(g ⊙ x̂)
    np.multiply(rstd, g, out=g)                   # rstd ⊙ (…)
    return g, dgamma, dbeta

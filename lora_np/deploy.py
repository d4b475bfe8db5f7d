"""Serving an adapter: merged vs unmerged inference, several adapters on one base, and what
merging and unmerging do to the weights in floating point (notebook 10).

* ``forward_flops`` — the FLOPs of a model's linear layers in one inference forward: a merged
  LoRA layer costs exactly its base layer (``counting.linear_forward_flops``), an unmerged one
  adds the low-rank branch (``counting.lora_forward_flops``).
* ``median_time``, ``compare_times`` — the median wall time of a call over repeats, and of
  several calls timed in turn (timings are printed, never asserted).
* ``swap_adapter`` — unmerge, load another adapter file, merge again: one base model, the
  adapter of the moment folded into its weights.
* ``MultiAdapterLinear``, ``serving_model``, ``serve`` — several adapters on one copy of the
  base weights, a different adapter per request in one batch (as S-LoRA and Punica serve them,
  Sheng et al. 2023, arXiv 2311.03285; Chen et al. 2023, arXiv 2310.18547)::

      Y_i = X_i Wᵀ + b + s_k (X_i A_kᵀ) B_kᵀ       request i routed to adapter k = ids[i]

  The frozen GEMM runs once for the whole batch; each adapter's branch runs on its own rows.
* ``round_trip_errors`` — ‖W after n merge/unmerge round trips − W₀‖_F, with the layer's own
  ``merge``/``unmerge``, for one adapter or a new adapter on every trip.

Notation: lora_np/README.md (W (d_out, d_in), A (r, d_in), B (d_out, r), s = α/r).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import NamedTuple, Sequence

import numpy as np

from . import functional as F
from .counting import linear_forward_flops, lora_forward_flops
from .lora import DoRALinear, LoRAEmbedding, LoRALinear, load_adapter, lora_layers, merge_lora, unmerge_lora
from .modules import Embedding, Linear, Module, no_grad
from .validate import check_int

__all__ = ["forward_flops", "Timing", "median_time", "compare_times", "swap_adapter", "MultiAdapterLinear",
           "serving_model", "serve", "RoundTrips", "round_trip_errors"]


# ------------------------------------------------------------------------------ FLOPs, time

def forward_flops(model: Module, n_rows: int) -> int:
    """FLOPs of every linear layer of ``model`` in one inference forward on ``n_rows`` rows
    (tokens: batch × sequence length).

    ``Linear`` and a merged ``LoRALinear``: ``linear_forward_flops`` (merging adds nothing); an
    unmerged ``LoRALinear``: ``lora_forward_flops`` (the branch s (X Aᵀ) Bᵀ on top). Everything
    else of a forward (attention scores, softmax, LayerNorm, GELU, embedding look-ups) is the
    same for the base, the merged and the unmerged model and is not counted here. DoRA and
    embedding adapters are refused (their unmerged forwards are not this formula).
    """
    if not isinstance(model, Module):
        raise TypeError(f"forward_flops: model must be a lora_np Module, got {type(model).__name__}")
    n_rows = check_int("n_rows", n_rows, minimum=1)
    total = 0
    for path, m in model.named_modules():
        if isinstance(m, (DoRALinear, LoRAEmbedding, MultiAdapterLinear)):
            raise TypeError(f"forward_flops: {path!r} is a {type(m).__name__}; only Linear and "
                            "LoRALinear layers are counted")
        if isinstance(m, LoRALinear):
            bias = m.bias is not None
            total += (linear_forward_flops(n_rows, m.d_in, m.d_out, bias) if m.merged
                      else lora_forward_flops(n_rows, m.d_in, m.d_out, m.r, bias))
        elif isinstance(m, Linear):
            total += linear_forward_flops(n_rows, m.d_in, m.d_out, m.bias is not None)
    return total


class Timing(NamedTuple):
    """Wall times of repeated calls (seconds): their ``median`` and every one (``times``)."""
    median: float
    times: tuple


def median_time(fn, repeats: int = 7, warmup: int = 1) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times, each timed with
    ``time.perf_counter``; the median resists the odd slow call on a busy machine. Timings
    depend on the machine and what else runs on it: print them, never assert them.
    (``compare_times`` of one call.)"""
    if not callable(fn):
        raise TypeError(f"median_time: fn must be callable, got {type(fn).__name__}")
    return compare_times({"fn": fn}, repeats, warmup)["fn"]


def compare_times(fns: dict, repeats: int = 9, warmup: int = 1) -> dict:
    """The median wall time of several calls, interleaved: ``warmup`` untimed rounds, then
    ``repeats`` timed ones; round t calls every ``fns[name]()`` once,
    in order, so a machine that slows down or speeds up part-way (another process, CPU
    frequency) shifts every call alike instead of the one that happened to run then. Returns
    name -> ``Timing``. Print the times and their ratios; never assert them."""
    if not isinstance(fns, dict) or not fns or not all(callable(f) for f in fns.values()):
        raise TypeError("compare_times: fns must be a non-empty dict of name -> callable")
    repeats = check_int("repeats", repeats, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(statistics.median(t), tuple(t)) for name, t in times.items()}


# ---------------------------------------------------------------------------- swap by merging

def swap_adapter(model: Module, path) -> Module:
    """Replace the adapter folded into ``model``'s weights by the one in the file ``path``:
    ``unmerge_lora`` (W ← W − s B A), ``load_adapter`` (the file's A, B), ``merge_lora``
    (W ← W + s B' A'). The model keeps one copy of its weights and serves at the base model's
    cost; each swap rounds W twice (``round_trip_errors`` measures what that costs). A file
    that does not fit is refused by ``load_adapter`` before anything changes, and the model is
    merged again with its old adapter."""
    if not isinstance(model, Module):
        raise TypeError(f"swap_adapter: model must be a lora_np Module, got {type(model).__name__}")
    if not lora_layers(model):
        raise ValueError("swap_adapter: the model has no LoRA layers; call add_lora first")
    was_merged = {p: m.merged for p, m in lora_layers(model).items()}
    unmerge_lora(model)
    try:
        load_adapter(model, path)
    except ValueError:
        if all(was_merged.values()):
            merge_lora(model)             # leave it as it came: merged with its old adapter
        raise
    return merge_lora(model)


# ------------------------------------------------------------- several adapters in one batch

class MultiAdapterLinear(Module):
    """A frozen ``Linear`` shared by K adapters, each request routed to one of them.

    ``forward(x)``, x of shape (n, ..., d_in) with n requests, and ``routing`` an int array
    (n,) with entries in [−1, K) (−1: the base model alone)::

        Y = X Wᵀ + b                           one GEMM for the whole batch
        Y[i] += s_k (X[i] A_kᵀ) B_kᵀ           for the rows i with routing[i] = k, k = 0 … K−1

    Parameters (all frozen, shared, never copied): ``W``, ``b`` of the base layer and ``A{k}``,
    ``B{k}`` of each adapter. An adapter that does not adapt this layer is ``None``: its
    requests get the base layer. For inference only: forward keeps no cache and ``backward``
    raises.
    """

    def __init__(self, base: Linear, adapters: Sequence):
        if not isinstance(base, Linear):
            raise TypeError(f"MultiAdapterLinear wraps a Linear, got {type(base).__name__}")
        adapters = list(adapters)
        if not adapters:
            raise ValueError("MultiAdapterLinear: give at least one adapter (A, B, scale) or None")
        super().__init__()
        self.d_in, self.d_out, self.dtype = base.d_in, base.d_out, base.dtype
        self.add_parameter("W", base.W, trainable=False)
        if base.bias is not None:
            self.add_parameter("b", base.bias, trainable=False)
        scales = []
        for k, ad in enumerate(adapters):
            if ad is None:
                scales.append(None)
                continue
            A, B, scale = ad
            if A.ndim != 2 or B.ndim != 2 or A.shape[1] != self.d_in or B.shape[0] != self.d_out \
                    or A.shape[0] != B.shape[1]:
                raise ValueError(f"MultiAdapterLinear: adapter {k} has A {A.shape}, B {B.shape}; "
                                 f"expected A (r, {self.d_in}) and B ({self.d_out}, r)")
            self.add_parameter(f"A{k}", A, trainable=False)
            self.add_parameter(f"B{k}", B, trainable=False)
            scales.append(float(scale))
        self.scales = tuple(scales)
        self.routing = None

    @property
    def n_adapters(self) -> int:
        return len(self.scales)

    def forward(self, x):
        x = self._check_input(x, self.d_in)
        routing = self.routing
        if routing is None or len(routing) != x.shape[0]:
            raise ValueError(f"MultiAdapterLinear: set a routing of {x.shape[0]} adapter ids (one per "
                             f"request, the first axis of x) with serve(); got "
                             f"{None if routing is None else len(routing)}")
        y, _ = F.linear_forward(x, self.W, self.bias)                  # the frozen GEMM, once
        for k, scale in enumerate(self.scales):
            rows = np.flatnonzero(routing == k)
            if scale is None or rows.size == 0:
                continue
            H, _ = F.linear_forward(x[rows], self._params[f"A{k}"])    # (n_k, ..., r)  H = X Aᵀ
            branch, _ = F.linear_forward(H, self._params[f"B{k}"])     # (n_k, ..., d_out)
            y[rows] += y.dtype.type(scale) * branch
        return y

    @property
    def bias(self):
        return self._params.get("b")

    def backward(self, dout):
        raise ValueError("MultiAdapterLinear serves adapters; it has no backward (train each "
                         "adapter with add_lora, then serve them together)")

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, adapters={self.n_adapters}"


def _adapter_of(model, path):
    layer = lora_layers(model).get(path)
    if layer is None:
        return None
    if type(layer) is not LoRALinear:
        raise TypeError(f"serving_model: {path!r} is a {type(layer).__name__}; only plain LoRALinear "
                        "adapters can be served together")
    if layer.merged:
        raise ValueError(f"serving_model: {path!r} is merged; unmerge the adapted model first")
    return layer


def serving_model(base: Module, adapted: Sequence[Module]) -> Module:
    """One model that holds ``base``'s weights once and the adapters of every model in
    ``adapted`` (each ``base`` + ``add_lora`` + training or ``load_adapter``), ready for ``serve``.

    Every layer that some adapted model adapts becomes a ``MultiAdapterLinear`` around the
    base layer; adapter k is ``adapted[k]``'s (A, B, s) there, or None where that model leaves
    the layer alone. The base is deep-copied once and the adapters' A, B are copied, so later
    training of ``adapted`` does not change the server. Refused (ValueError/TypeError, nothing
    built): a base with LoRA, an adapted model whose frozen weights differ from the base's
    (a merged model, a PiSSA residual), DoRA or embedding adapters.
    """
    if not isinstance(base, Module):
        raise TypeError(f"serving_model: base must be a lora_np Module, got {type(base).__name__}")
    if lora_layers(base):
        raise ValueError("serving_model: base already has LoRA layers; pass the plain base model")
    adapted = list(adapted)
    if not adapted or not all(isinstance(m, Module) for m in adapted):
        raise TypeError("serving_model: adapted must be a non-empty sequence of lora_np Modules")
    base_modules = dict(base.named_modules())
    paths = sorted({p for m in adapted for p in lora_layers(m)})
    if not paths:
        raise ValueError("serving_model: none of the adapted models has LoRA layers")
    factors = {}
    for p in paths:
        target = base_modules.get(p)
        if isinstance(target, Embedding) or not isinstance(target, Linear):
            raise TypeError(f"serving_model: {p!r} is not a Linear layer of the base model")
        row = []
        for k, m in enumerate(adapted):
            layer = _adapter_of(m, p)
            if layer is None:
                row.append(None)
                continue
            if layer.W.shape != target.W.shape or not np.array_equal(layer.W, target.W):
                raise ValueError(f"serving_model: model {k}'s frozen weight at {p!r} is not the base's "
                                 "(a different base, a merged or a PiSSA model)")
            row.append((layer.A.copy(), layer.B.copy(), layer.scale))
        factors[p] = row
    server = copy.deepcopy(base)
    modules = dict(server.named_modules())
    for p, row in factors.items():
        parent_path, _, name = p.rpartition(".")
        setattr(modules[parent_path], name, MultiAdapterLinear(modules[p], row))
    server.freeze()                        # a server trains nothing
    server.eval()
    return server


def serve(server: Module, x, adapter_ids):
    """``server(x)`` with request i (``x[i]``, the first axis) through adapter ``adapter_ids[i]``
    (−1: the base model), in eval mode and under ``no_grad()``; the routing is cleared after.

    ``server``: a ``serving_model``. Returns what the model returns (logits for a language model).
    """
    layers = [m for _, m in server.named_modules() if isinstance(m, MultiAdapterLinear)]
    if not layers:
        raise ValueError("serve: the model has no MultiAdapterLinear layers; build it with serving_model")
    n_adapters = layers[0].n_adapters
    ids = np.asarray(adapter_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"serve: adapter_ids must be a 1-D array of ints, got shape {ids.shape}, "
                        f"dtype {ids.dtype}")
    n = np.shape(x)[0] if np.ndim(x) else 0
    if len(ids) != n:
        raise ValueError(f"serve: one adapter id per request: x has {n} requests, adapter_ids {len(ids)}")
    if ids.size and (ids.min() < -1 or ids.max() >= n_adapters):
        raise ValueError(f"serve: adapter ids must lie in [-1, {n_adapters}), got [{ids.min()}, {ids.max()}]")
    modes = [(m, m.training) for _, m in server.named_modules()]
    server.eval()
    try:
        for m in layers:
            m.routing = ids
        with no_grad():
            return server(x)
    finally:
        for m in layers:
            m.routing = None
        for m, mode in modes:
            m.training = mode


# ------------------------------------------------------------------------ round-trip error

class RoundTrips(NamedTuple):
    """``errors[n-1] = ‖W after n round trips − W₀‖_F``; ``ulp = ‖spacing(W₀)‖_F``, the size of a
    one-ulp change of every entry; ``changed[n-1]``: how many entries trip n changed."""
    errors: np.ndarray
    ulp: float
    changed: np.ndarray


def round_trip_errors(layer: LoRALinear, n_trips: int, adapters=None) -> RoundTrips:
    """Merge and unmerge a copy of ``layer`` ``n_trips`` times (its own ``merge``/``unmerge``:
    W ← W + s B A, then W ← W − s B A, in the layer's dtype) and measure W against W₀ after each.

    ``adapters``: None — the layer's own A, B on every trip; or a sequence of (A, B) pairs,
    trip t using ``adapters[t % len(adapters)]`` (a server swapping tenants' adapters by
    merging). ``layer`` is not changed. Returns ``RoundTrips``.
    """
    if type(layer) is not LoRALinear:
        raise TypeError(f"round_trip_errors: layer must be a LoRALinear, got {type(layer).__name__}")
    if layer.merged:
        raise ValueError("round_trip_errors: the layer is merged; unmerge it first")
    n_trips = check_int("n_trips", n_trips, minimum=1)
    if adapters is not None:
        adapters = [(np.asarray(A), np.asarray(B)) for A, B in adapters]
        if not adapters:
            raise ValueError("round_trip_errors: adapters is empty; pass None to reuse the layer's own")
        for k, (A, B) in enumerate(adapters):
            if A.shape != layer.A.shape or B.shape != layer.B.shape:
                raise ValueError(f"round_trip_errors: adapter {k} has A {A.shape}, B {B.shape}; the layer "
                                 f"has A {layer.A.shape}, B {layer.B.shape}")
    work = copy.deepcopy(layer)
    W0 = work.W.copy()
    errors, changed = np.empty(n_trips), np.empty(n_trips, dtype=np.int64)
    for t in range(n_trips):
        if adapters is not None:
            A, B = adapters[t % len(adapters)]
            work.A[...] = A
            work.B[...] = B
        before = work.W.copy()
        work.merge()
        work.unmerge()
        changed[t] = int(np.count_nonzero(work.W != before))
        errors[t] = float(np.linalg.norm((work.W - W0).astype(np.float64)))
    ulp = float(np.linalg.norm(np.spacing(np.abs(W0)).astype(np.float64)))
    return RoundTrips(errors, ulp, changed)

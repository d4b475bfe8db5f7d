"""Modules: thin classes that hold parameters and call ``lora_np.functional``.

Every module has ``forward(x)`` (also ``module(x)``), ``backward(dout) -> dx`` and

* ``parameters()``           dotted name -> array, e.g. ``"attn.q_proj.W"``
* ``trainable_parameters()`` the subset that an optimizer updates
* ``gradients()``            dotted name -> gradient, for every trainable parameter
* ``zero_grad()``            set every gradient to zero

Gradients *accumulate* (``+=``) across backward calls, as in PyTorch; call ``zero_grad()``
before each step. Frozen parameters get no gradient at all, and their ``dW`` is never computed.
Which forward a ``backward`` differentiates is fixed by one rule, written in ``Module``'s
docstring (and in lora_np/README.md); ``no_grad()`` runs forwards that keep nothing for backward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import numpy as np

from . import fast
from . import functional as F
from .validate import check_bool, check_choice, check_dtype, check_int, check_number

__all__ = ["Module", "Linear", "Embedding", "ModuleList", "LayerNorm", "MLP", "MultiHeadAttention",
           "TransformerBlock", "make_rng", "no_grad", "batched_mean_loss"]


def make_rng(rng) -> np.random.Generator:
    """``rng`` as a Generator: a Generator is used as is, an int is a seed, None means seed 0
    (so that every object in lora_np is reproducible bit for bit unless told otherwise)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


# --------------------------------------------------------------- which forward backward sees

#: False inside ``no_grad()``: forwards keep no cache for backward
_GRAD_ENABLED = contextvars.ContextVar("lora_np_grad_enabled", default=True)
#: the top-level forward call in progress (a ``_Pass``), None between calls
_PASS = contextvars.ContextVar("lora_np_forward_pass", default=None)


@contextlib.contextmanager
def no_grad():
    """``with no_grad(): y = model(x)`` — a forward that keeps no cache for backward.

    Use it for validation, inference and anything else you will not differentiate: the
    forward stores nothing (no memory held for backward) and leaves the pending forward of
    every module as it was, so a later ``backward`` still differentiates the last training
    forward. Unlike ``model.eval()`` it does not switch dropout off. Also usable as a
    decorator (``@no_grad()``).
    """
    token = _GRAD_ENABLED.set(False)
    try:
        yield
    finally:
        _GRAD_ENABLED.reset(token)


def batched_mean_loss(model, x, y, loss_fn, batch_size: int) -> float:
    """``loss_fn``'s loss of ``model`` on (x, y), as the row-weighted mean over batches::

        L = Σ_b n_b · loss_fn(model(x_b), y_b) / N        (batches of ``batch_size`` rows, in order)

    which is the loss over all N rows for a loss that is a mean over rows of equal size (MSE,
    cross-entropy), without one huge forward. Runs in eval mode (no dropout) inside
    ``no_grad()`` (nothing kept for backward) and restores the model's mode. Deterministic.
    Used by ``train.evaluate`` and ``text.corpus.lm_loss``.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with no_grad():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                total += float(loss_fn(model(xb), yb)[0]) * len(xb)
    finally:
        model.train(was_training)
    return total / len(x)


def _fill_zero(a) -> None:
    a.fill(0)


class _Pass:
    """One top-level forward call. Every module that keeps a cache during it is tagged with
    it, so a second use of the same module within the same call is recognised as such."""
    __slots__ = ("stores",)

    def __init__(self):
        self.stores = 0                     # caches kept so far in this call


def _forward_entry(forward):
    """Wrap a subclass's ``forward``: the outermost forward call opens a pass (``_Pass``) that
    every module it runs sees; ``_forward_in_pass`` applies the rule."""
    @functools.wraps(forward)
    def entry(self, *args, **kwargs):
        if self.__dict__["_in_forward"]:    # a subclass's forward calling super().forward
            return forward(self, *args, **kwargs)
        token = _PASS.set(_Pass()) if _PASS.get() is None else None
        try:
            return _forward_in_pass(self, forward, _PASS.get(), args, kwargs)
        finally:
            if token is not None:
                _PASS.reset(token)
    entry._lora_np_entry = True
    return entry


def _forward_in_pass(module, forward, current: _Pass, args, kwargs):
    """Run ``forward`` as part of the pass ``current``: refuse a second recording use of
    ``module`` in it, make a recording forward pending even if it had nothing of its own to
    ``_store``, note a forward that records nothing (for backward's message), and drop the
    module's cache if the call fails after caches were kept (they would not fit together)."""
    records = module._records()
    if records and module.__dict__["_pass"] is current:
        raise ValueError(module._reuse_message())
    stores = current.stores
    object.__setattr__(module, "_in_forward", True)
    try:
        out = forward(module, *args, **kwargs)
    except BaseException:
        if current.stores != stores:
            module._forget("failed")
        raise
    finally:
        object.__setattr__(module, "_in_forward", False)
    if not records:
        object.__setattr__(module, "_skipped", "inside no_grad()" if module.training else "in eval mode")
    elif module.__dict__["_pass"] is not current:
        module._store(True, np.shape(out))
    return out


def _backward_entry(backward):
    """Wrap a subclass's ``backward``: refuse it without a pending forward (saying why there is
    none); after it returns, that forward is consumed."""
    @functools.wraps(backward)
    def entry(self, dout, need_input_grad=True):
        if self.__dict__["_in_backward"]:   # a subclass's backward calling super().backward
            return backward(self, dout)
        if self.__dict__["_cache"] is None:
            raise ValueError(self._no_forward_message())
        need_input_grad = check_bool("need_input_grad", need_input_grad)
        object.__setattr__(self, "_in_backward", True)
        object.__setattr__(self, "_need_input_grad", need_input_grad)
        try:
            dx = backward(self, dout)
        finally:
            object.__setattr__(self, "_in_backward", False)
            object.__setattr__(self, "_need_input_grad", True)
        self._release()
        return dx if need_input_grad else None
    entry._lora_np_entry = True
    return entry


class Module:
    """Base class: a tree of child modules plus this module's own parameters.

    Children are found automatically: any attribute that is a ``Module`` is a child, named by
    its attribute name. Own parameters are registered with ``add_parameter`` and read as
    attributes (``layer.W``). Arrays are updated in place by optimizers, so a reference to
    ``layer.W`` always sees the current weights.

    The forward/backward rule
    -------------------------
    * A forward in training mode (``train()``, the default) keeps **one pending cache** per
      module: what its backward needs. A later training-mode forward replaces it.
    * ``backward(dout)`` differentiates the pending forward and **consumes** it: a second
      ``backward`` raises ValueError ("already consumed"); run forward again first.
    * A forward in eval mode (``eval()``) or inside ``with no_grad():`` keeps **nothing** and
      leaves the pending cache as it was. So ``y = m(x_tr); m.eval(); m(x_val); m.train();
      m.backward(dy)`` differentiates ``x_tr``'s forward, and a ``backward`` after only such
      forwards raises ValueError saying so.
    * One top-level forward call (the outermost ``forward``/``__call__``, with the children it
      runs) may use each module **once** in training mode. A module used twice in one forward
      (a layer applied twice, one object registered as two children) would need two caches;
      its second use raises ValueError instead of giving a wrong gradient. (In eval mode or
      under ``no_grad()`` reuse is fine: nothing is cached.)
    * A forward that raises part-way leaves no pending cache in the modules whose children
      had already cached (they would not fit together): backward then asks for a new forward.
    * ``backward(dout, need_input_grad=False)`` fills the parameters' gradients and returns
      None: the input gradient nobody reads (a model's input, ``train_step``'s call) is not
      computed where a module can skip it (``Linear`` skips its ``dX = G W`` GEMM; ``MLP``,
      ``MultiHeadAttention``, ``TransformerBlock`` pass the flag to the layer that sees the
      input). The parameters' gradients are the same either way.

    Subclasses write ``forward`` and ``backward`` as plain methods; ``Module`` wraps them
    (``__init_subclass__``) to apply the rule, so ``m.forward(x)`` and ``m(x)`` behave the
    same. Inside, ``forward`` calls ``self._store(cache, y.shape)`` (a module with nothing of
    its own to keep need not) and ``backward`` starts with
    ``cache, dout = self._check_backward(dout)``; ``self._release()`` frees the cache early
    (the wrapper releases it in any case when backward returns); ``self._input_grad_needed()``
    says whether the caller asked for the input gradient (a backward that ignores it is
    correct, only slower).
    """

    #: True for modules whose input is integer token ids (``Embedding``, ``LanguageModel``):
    #: they have no input gradient, and the gradient checker checks their parameters only
    takes_token_ids = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, wrap in (("forward", _forward_entry), ("backward", _backward_entry)):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_lora_np_entry", False):
                setattr(cls, name, wrap(method))

    def __init__(self):
        object.__setattr__(self, "_params", {})      # name -> array
        object.__setattr__(self, "_grads", {})       # name -> array (trainable only)
        object.__setattr__(self, "_frozen", set())   # names of own frozen parameters
        object.__setattr__(self, "_children", {})    # name -> Module
        object.__setattr__(self, "training", True)
        for name, value in (("_in_forward", False), ("_in_backward", False), ("_skipped", None),
                            ("_need_input_grad", True)):
            object.__setattr__(self, name, value)
        self._forget("never")

    # --- registration -------------------------------------------------------------
    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._children[name] = value
        elif name in self._children:
            del self._children[name]
        if name in self._params:
            raise AttributeError(f"parameter {name!r} is updated in place; use {name}[...] = value")
        object.__setattr__(self, name, value)

    def __getattr__(self, name):       # only called when normal lookup fails
        params = self.__dict__.get("_params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def add_parameter(self, name: str, value: np.ndarray, trainable: bool = True) -> np.ndarray:
        self._params[name] = value
        if trainable:
            self._grads[name] = np.zeros_like(value)
        else:
            self._frozen.add(name)
        return value

    def named_children(self):
        return dict(self._children)

    def named_modules(self, prefix: str = ""):
        """Every module in the tree (this one first) as (dotted path, module)."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    # --- parameters and gradients ---------------------------------------------------
    def parameters(self) -> dict[str, np.ndarray]:
        out = {}
        for path, m in self.named_modules():
            for name, p in m._params.items():
                out[f"{path}.{name}" if path else name] = p
        return out

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        out = {}
        for path, m in self.named_modules():
            for name, p in m._params.items():
                if name not in m._frozen:
                    out[f"{path}.{name}" if path else name] = p
        return out

    def gradients(self) -> dict[str, np.ndarray]:
        out = {}
        for path, m in self.named_modules():
            for name, g in m._grads.items():
                out[f"{path}.{name}" if path else name] = g
        return out

    def zero_grad(self) -> None:
        for _, m in self.named_modules():
            for g in m._grads.values():
                if g.size >= fast.MIN_CHUNKED and g.flags.c_contiguous:
                    fast.map_chunks(_fill_zero, g)       # a large gradient: on two threads
                else:
                    g.fill(0)

    def _accumulate(self, name: str, grad) -> None:
        if grad is not None and name in self._grads:
            self._grads[name] += grad

    def freeze(self, names=None) -> "Module":
        """Freeze own parameters ``names`` (default all) of every module in the tree."""
        for _, m in self.named_modules():
            for name in list(m._params) if names is None else names:
                if name in m._params:
                    m._frozen.add(name)
                    m._grads.pop(name, None)
        return self

    def unfreeze(self) -> "Module":
        """Make every parameter of the tree trainable (full fine-tuning)."""
        for _, m in self.named_modules():
            for name in list(m._frozen):
                m._frozen.discard(name)
                m._grads[name] = np.zeros_like(m._params[name])
        return self

    def train(self, mode: bool = True) -> "Module":
        """Training mode (``mode=True``: dropout on, forwards cache for backward) or eval mode
        for every module of the tree. Returns ``self``."""
        mode = check_bool("mode", mode)
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # --- forward / backward ---------------------------------------------------------
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    def _input_grad_needed(self) -> bool:
        """Inside ``backward``: False when the caller passed ``need_input_grad=False`` (the
        returned input gradient is then discarded, so it need not be computed)."""
        return self.__dict__.get("_need_input_grad", True)

    def _has_trainable(self) -> bool:
        """Whether any parameter of this module's tree is trainable (it then needs its output's
        gradient in backward)."""
        return any(m._grads for _, m in self.named_modules())

    def _records(self) -> bool:
        """Whether a forward now keeps a cache: training mode and outside ``no_grad()``."""
        return self.training and _GRAD_ENABLED.get()

    def _store(self, cache, out_shape):
        """Keep ``cache`` (what backward needs) as the pending forward — if this forward records."""
        if not self._records():
            return
        current = _PASS.get()
        if current is not None:
            current.stores += 1
        for name, value in (("_cache", cache), ("_out_shape", tuple(out_shape)), ("_pass", current),
                            ("_status", "pending"), ("_skipped", None)):
            object.__setattr__(self, name, value)

    def _forget(self, status: str):
        """Drop the pending cache; ``status`` says why there is none ("never", "consumed", "failed")."""
        for name, value in (("_cache", None), ("_out_shape", ()), ("_pass", None), ("_status", status)):
            object.__setattr__(self, name, value)

    def _release(self):
        """The pending forward is used up (backward ran): free its cache."""
        self._forget("consumed")
        object.__setattr__(self, "_skipped", None)

    def _check_backward(self, dout):
        """The pending cache and ``dout`` in this module's dtype, after checking that ``dout``
        has the output's shape (that there is a pending forward, the wrapper has checked)."""
        state = self.__dict__["_cache"]
        out_shape = self.__dict__["_out_shape"]
        # in this module's dtype, as forward does with x: a float64 dout must not turn a float32
        # model's dx and intermediate gradients into float64
        dout = np.asarray(dout, dtype=getattr(self, "dtype", None))
        if dout.shape != out_shape:
            raise ValueError(f"{type(self).__name__}.backward: upstream gradient must have the "
                             f"output's shape {out_shape}, got {dout.shape}")
        return state, dout

    def _no_forward_message(self) -> str:
        name, status, skipped = type(self).__name__, self.__dict__["_status"], self.__dict__["_skipped"]
        again = "run forward(x) first, in training mode (each backward consumes one forward)"
        if status == "consumed":
            msg = (f"{name}.backward: the forward it would differentiate was already consumed by "
                   f"an earlier backward; {again}")
        elif status == "failed":
            msg = (f"{name}.backward: the last training-mode forward raised an error part-way, so "
                   f"its caches do not fit together; {again}")
        elif skipped:
            return (f"{name}.backward called after only forwards {skipped}, which keep no cache "
                    f"for backward; {again} (model.train(), outside no_grad())")
        else:
            return f"{name}.backward called before forward: {again}"
        if skipped:
            msg += f". The forwards since then ran {skipped} and keep no cache for backward"
        return msg

    def _reuse_message(self) -> str:
        return (f"{type(self).__name__}({self.extra_repr()}) is used twice in one forward pass (a "
                "layer applied twice, or one module object registered as two children). Each "
                "module keeps one cache for backward, so the second use would make backward "
                "return a wrong gradient: use a separate module for each use, or run this forward "
                "in eval mode / inside no_grad() if you do not need gradients")

    def _check_input_kept(self, x, need_dW: bool):
        """A forward with W frozen keeps no input (its backward needs none); if W was made
        trainable since, its ``dW = Gᵀ X`` cannot be formed: refuse rather than skip it."""
        if need_dW and x is None:
            raise ValueError(f"{type(self).__name__}.backward: W was frozen during forward (so its "
                             "input was not kept) and is trainable now; run forward(x) again")

    def _check_input(self, x, d_expected: int, what: str = "x", sequence: bool = False):
        """``x`` as an array of this module's dtype whose last dimension is ``d_expected``;
        with ``sequence=True`` (attention, blocks) it must be (batch, T, d_expected)."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if sequence and x.ndim != 3:
            raise ValueError(f"{type(self).__name__} expects {what} of shape (batch, seq, "
                             f"d_model={d_expected}), got a {x.ndim}-D array of shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{type(self).__name__}: {what} must be a float array, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != d_expected:
            raise ValueError(f"{type(self).__name__}: expected {what} with last dimension "
                             f"{d_expected}, got shape {x.shape}")
        return x.astype(self.dtype, copy=False)

    def _check_ids(self, idx, V: int):
        """``idx`` as an integer array of ids in [0, V) (any shape): TypeError for a non-integer
        dtype (bools included), ValueError naming the range for an id outside it — NumPy would
        silently read a negative id from the end of the table."""
        if not isinstance(idx, np.ndarray):
            idx = np.asarray(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{type(self).__name__}: idx must be an integer array of ids, got dtype "
                            f"{idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"{type(self).__name__}: ids must lie in [0, {V}), got ids in "
                             f"[{idx.min()}, {idx.max()}]")
        return idx

    def known_zero_gradients(self) -> set[str]:
        """Dotted names of parameters whose true gradient is exactly zero for every input
        (see ``MultiHeadAttention``). The gradient checker checks these are zero instead."""
        out = set()
        for path, m in self.named_modules():
            for name in m._structural_zeros():
                out.add(f"{path}.{name}" if path else name)
        return out

    def _structural_zeros(self):
        return ()

    def num_parameters(self, trainable_only: bool = False) -> int:
        ps = self.trainable_parameters() if trainable_only else self.parameters()
        return int(sum(p.size for p in ps.values()))

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()})"]
        for name, child in self._children.items():
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return ""


class Linear(Module):
    """``y = x Wᵀ + b``;  W (d_out, d_in), b (d_out,).

    Init: ``W ~ N(0, 1/d_in)`` (keeps activations' scale), ``b = 0``.
    """

    def __init__(self, d_in, d_out, bias=True, rng=None, dtype=np.float64):
        super().__init__()
        self.d_in, self.d_out = check_int("d_in", d_in, minimum=1), check_int("d_out", d_out, minimum=1)
        self.dtype = check_dtype("dtype", dtype)
        rng = make_rng(rng)
        W = rng.standard_normal((self.d_out, self.d_in)) / np.sqrt(self.d_in)
        self.add_parameter("W", W.astype(self.dtype))
        if check_bool("bias", bias):
            self.add_parameter("b", np.zeros(self.d_out, dtype=self.dtype))

    @property
    def bias(self):
        return self._params.get("b")

    def forward(self, x):
        x = self._check_input(x, self.d_in)
        y, cache = F.linear_forward(x, self.W, self.bias)
        if "W" not in self._grads:               # frozen W: backward needs W (dX = G W), not x,
            cache = cache._replace(x=None)       # so the input is not kept alive until backward
        self._store(cache, y.shape)
        return y

    def backward(self, dout):
        cache, dout = self._check_backward(dout)
        need_dW = "W" in self._grads             # frozen W: the dW GEMM is skipped entirely
        self._check_input_kept(cache.x, need_dW)
        dx, dW, db = F.linear_backward(dout, cache, need_dW=need_dW, need_db="b" in self._grads,
                                       need_dx=self._input_grad_needed())
        self._accumulate("W", dW)
        self._accumulate("b", db)
        return dx

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None}, dtype={self.dtype}"


class Embedding(Module):
    """A lookup table: ``y = W[idx]``;  W (num_embeddings, d_model), idx (...) ints -> y (..., d_model).

    The same as a bias-free ``Linear`` applied to one-hot inputs (``W[v] = e_vᵀ W``), without
    forming them: the forward is a row lookup and the backward a scatter-add
    (``functional.embedding_forward`` / ``embedding_backward``). ``backward(dout)`` returns
    None: integer ids have no gradient.

    Init: ``W ~ N(0, std²)``; ``std=1.0`` is PyTorch's ``nn.Embedding`` default (unit-scale
    rows, the scale ``Linear``'s init keeps activations at). ``LanguageModel`` picks its own.
    """

    takes_token_ids = True

    def __init__(self, num_embeddings, d_model, rng=None, dtype=np.float64, std=1.0):
        super().__init__()
        self.num_embeddings = check_int("num_embeddings", num_embeddings, minimum=1)
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.dtype = check_dtype("dtype", dtype)
        std = check_number("std", std, positive=True)
        W = make_rng(rng).standard_normal((self.num_embeddings, self.d_model)) * std
        self.add_parameter("W", W.astype(self.dtype))

    def forward(self, idx):
        idx = self._check_ids(idx, self.num_embeddings)
        y, cache = F.embedding_forward(idx, self.W)
        self._store(cache, y.shape)          # the ids are kept even when W is frozen (cheap)
        return y

    def backward(self, dout):
        cache, dout = self._check_backward(dout)
        if "W" in self._grads:               # frozen W: nothing to compute at all
            self._accumulate("W", F.embedding_backward(dout, cache))
        return None

    def extra_repr(self):
        return f"num_embeddings={self.num_embeddings}, d_model={self.d_model}, dtype={self.dtype}"


class ModuleList(Module):
    """An ordered container: ``ModuleList([m0, m1, ...])`` has children named ``"0"``, ``"1"``, …,
    so a model holding it as ``self.blocks`` names them ``blocks.0``, ``blocks.1`` (and LoRA
    targets read ``"blocks.1.attn.q_proj"``). ``len``, indexing and iteration give the modules;
    it has no forward of its own (the owner calls the modules in order)."""

    def __init__(self, modules=()):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"ModuleList holds lora_np Modules, got {type(m).__name__} at index {i}")
            setattr(self, str(i), m)

    def __len__(self):
        return len(self._children)

    def __getitem__(self, i):
        i, n = check_int("index", i), len(self)
        if not -n <= i < n:
            raise IndexError(f"ModuleList index must be in [{-n}, {n}), got {i}")
        return self._children[str(i % n)]

    def __iter__(self):
        return iter([self._children[str(i)] for i in range(len(self))])

    def extra_repr(self):
        return f"len={len(self)}"


class LayerNorm(Module):
    """``y = γ ⊙ (x − μ)/√(σ² + ε) + β`` over the last dim; gamma = 1, beta = 0 at init."""

    def __init__(self, d, eps=1e-5, dtype=np.float64):
        super().__init__()
        self.d = check_int("d", d, minimum=1)
        self.eps = check_number("eps", eps, positive=True)
        self.dtype = check_dtype("dtype", dtype)
        self.add_parameter("gamma", np.ones(self.d, dtype=self.dtype))
        self.add_parameter("beta", np.zeros(self.d, dtype=self.dtype))

    def forward(self, x):
        x = self._check_input(x, self.d)
        y, cache = fast.layer_norm_forward(x, self.gamma, self.beta, self.eps)   # functional's, in place
        self._store(cache, y.shape)
        return y

    def backward(self, dout):
        cache, dout = self._check_backward(dout)
        dx, dgamma, dbeta = fast.layer_norm_backward(dout, cache)
        self._accumulate("gamma", dgamma)
        self._accumulate("beta", dbeta)
        return dx

    def extra_repr(self):
        return f"d={self.d}"


class MLP(Module):
    """Two-layer perceptron ``y = fc2(act(fc1(x)))``; x (..., d_in) -> y (..., d_out)."""

    def __init__(self, d_in, d_hidden, d_out, activation="gelu", rng=None, dtype=np.float64):
        super().__init__()
        self.activation = check_choice("activation", activation, sorted(F.ACTIVATIONS))
        self.dtype = check_dtype("dtype", dtype)
        self.d_in = check_int("d_in", d_in, minimum=1)
        d_hidden, d_out = check_int("d_hidden", d_hidden, minimum=1), check_int("d_out", d_out, minimum=1)
        rng = make_rng(rng)
        self.fc1 = Linear(d_in, d_hidden, rng=rng, dtype=dtype)
        self.fc2 = Linear(d_hidden, d_out, rng=rng, dtype=dtype)

    def forward(self, x):
        x = self._check_input(x, self.d_in)
        act_forward, _ = fast.activation(self.activation)      # functional's, slice by slice
        h, act_cache = act_forward(self.fc1(x))
        y = self.fc2(h)
        self._store(act_cache, y.shape)
        return y

    def backward(self, dout):
        act_cache, dout = self._check_backward(dout)
        _, act_backward = fast.activation(self.activation)
        dh = act_backward(self.fc2.backward(dout), act_cache)
        self._release()                          # the activation's cache is used up: free it
        del act_cache                            # before fc1's backward allocates its gradients
        return self.fc1.backward(dh, need_input_grad=self._input_grad_needed())

    def extra_repr(self):
        return f"activation={self.activation!r}"


class MultiHeadAttention(Module):
    """Multi-head self-attention on x of shape (batch, T, d_model), T tokens.

    ``q, k, v = x W_qᵀ, x W_kᵀ, x W_vᵀ`` (+ biases), split into H heads of width
    d_head = d_model / H (contiguous slices of the last dim), attention per head, heads
    concatenated back and projected by ``o_proj``.
    """

    def __init__(self, d_model, n_heads, causal=False, rng=None, dtype=np.float64):
        super().__init__()
        d_model, n_heads = check_int("d_model", d_model, minimum=1), check_int("n_heads", n_heads, minimum=1)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, check_bool("causal", causal)
        self.dtype = check_dtype("dtype", dtype)
        rng = make_rng(rng)
        self.q_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.o_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)

    def _structural_zeros(self):
        # The key bias adds q·b_k to every score of a query's row; softmax ignores a constant
        # added to a whole row, so the loss cannot depend on b_k: dL/db_k = 0 always.
        return ("k_proj.b",) if "b" in self.k_proj._params else ()

    def _split(self, t):
        Bsz, T, C = t.shape
        t = t.reshape(Bsz, T, self.n_heads, C // self.n_heads)   # (B, T, C) -> (B, T, H, d_head)
        return t.transpose(0, 2, 1, 3)                           # -> (B, H, T, d_head)

    def _merge(self, t):
        Bsz, H, T, d = t.shape
        t = t.transpose(0, 2, 1, 3)                              # (B, H, T, d) -> (B, T, H, d)
        return t.reshape(Bsz, T, H * d)                          # -> (B, T, C)

    def forward(self, x):
        x = self._check_input(x, self.d_model, sequence=True)
        q = self._split(self.q_proj(x))                          # (B, H, T, d_head)
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        att, cache = F.attention_forward(q, k, v, causal=self.causal)   # (B, H, T, d_head)
        y = self.o_proj(self._merge(att))                        # (B, T, C)
        self._store(cache, y.shape)
        return y

    def backward(self, dout):
        cache, dout = self._check_backward(dout)
        datt = self._split(self.o_proj.backward(dout))           # (B, H, T, d_head)
        dq, dk, dv = F.attention_backward(datt, cache)           # each (B, H, T, d_head)
        self._release()                          # q, k, v and P are used up: free them before
        del cache, datt                          # the projections' backward allocates more
        if not self._input_grad_needed():        # the projections' weight gradients only
            for proj, d in ((self.q_proj, dq), (self.k_proj, dk), (self.v_proj, dv)):
                proj.backward(self._merge(d), need_input_grad=False)
            return None
        dx = self.q_proj.backward(self._merge(dq))               # (B, T, C)
        dx += self.k_proj.backward(self._merge(dk))
        dx += self.v_proj.backward(self._merge(dv))
        return dx

    def extra_repr(self):
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}"


class TransformerBlock(Module):
    """Pre-LayerNorm residual block (GPT-2 style)::

        h = x + attn(ln1(x))
        y = h + mlp(ln2(h))

    x, y : (batch, T, d_model), T tokens. Children: ``ln1``, ``attn``, ``ln2``, ``mlp``
    (``mlp.fc1``, ``mlp.fc2``), so LoRA targets read ``"attn.q_proj"``, ``"mlp.fc1"``.
    """

    def __init__(self, d_model, n_heads, d_hidden, causal=False, activation="gelu", rng=None,
                 dtype=np.float64):
        super().__init__()
        rng = make_rng(rng)
        self.dtype = check_dtype("dtype", dtype)
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.ln1 = LayerNorm(d_model, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, n_heads, causal=causal, rng=rng, dtype=dtype)
        self.ln2 = LayerNorm(d_model, dtype=dtype)
        self.mlp = MLP(d_model, d_hidden, d_model, activation=activation, rng=rng, dtype=dtype)

    def forward(self, x):
        x = self._check_input(x, self.d_model, sequence=True)
        h = x + self.attn(self.ln1(x))
        return h + self.mlp(self.ln2(h))          # nothing of its own to _store

    def backward(self, dout):
        _, dout = self._check_backward(dout)
        dh = dout + self.ln2.backward(self.mlp.backward(dout))   # residual: both paths
        if not self._input_grad_needed() and not self.ln1._has_trainable():
            # nobody reads dx, and ln1 has nothing to train: attention's input gradient, which
            # only ln1's backward would read, is skipped, and ln1's forward is simply released
            self.attn.backward(dh, need_input_grad=False)
            self.ln1._release()
            return None
        return dh + self.ln1.backward(self.attn.backward(dh))

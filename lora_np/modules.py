"""Modules: thin classes that hold parameters and call ``lora_np.functional``.

Every module has ``forward(x)`` (also ``module(x)``), ``backward(dout) -> dx`` and

* ``parameters()``           dotted name -> array, e.g. ``"attn.q_proj.W"``
* ``trainable_parameters()`` the subset that an optimizer updates
* ``gradients()``            dotted name -> gradient, for every trainable parameter
* ``zero_grad()``            set every gradient to zero

Gradients *accumulate* (``+=``) across backward calls, as in PyTorch; call ``zero_grad()``
before each step. Frozen parameters get no gradient at all, and their ``dW`` is never computed.
"""

from __future__ import annotations

import numpy as np

from . import functional as F

__all__ = ["Module", "Linear", "LayerNorm", "MLP", "MultiHeadAttention", "TransformerBlock",
           "make_rng"]


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


def _check_dim(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


class Module:
    """Base class: a tree of child modules plus this module's own parameters.

    Children are found automatically: any attribute that is a ``Module`` is a child, named by
    its attribute name. Own parameters are registered with ``add_parameter`` and read as
    attributes (``layer.W``). Arrays are updated in place by optimizers, so a reference to
    ``layer.W`` always sees the current weights.
    """

    def __init__(self):
        object.__setattr__(self, "_params", {})      # name -> array
        object.__setattr__(self, "_grads", {})       # name -> array (trainable only)
        object.__setattr__(self, "_frozen", set())   # names of own frozen parameters
        object.__setattr__(self, "_children", {})    # name -> Module
        object.__setattr__(self, "training", True)

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
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
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

    def _check_backward(self, dout, cache_name: str = "_cache"):
        """The stored forward state, after checking that backward may run with this ``dout``."""
        state = self.__dict__.get(cache_name)
        if state is None:
            raise ValueError(f"{type(self).__name__}.backward called before forward: "
                             "run forward(x) first (each backward consumes one forward)")
        out_shape = self.__dict__["_out_shape"]
        # in this module's dtype, as forward does with x: a float64 dout must not turn a float32
        # model's dx and intermediate gradients into float64
        dout = np.asarray(dout, dtype=getattr(self, "dtype", None))
        if dout.shape != out_shape:
            raise ValueError(f"{type(self).__name__}.backward: upstream gradient must have the "
                             f"output's shape {out_shape}, got {dout.shape}")
        return state, dout

    def _store(self, cache, out_shape):
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_out_shape", tuple(out_shape))

    def _check_input(self, x, d_expected: int, what: str = "x"):
        """``x`` as an array of this module's dtype whose last dimension is ``d_expected``."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{type(self).__name__}: {what} must be a float array, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != d_expected:
            raise ValueError(f"{type(self).__name__}: expected {what} with last dimension "
                             f"{d_expected}, got shape {x.shape}")
        return x.astype(self.dtype, copy=False)

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
        self.d_in, self.d_out = _check_dim("d_in", d_in), _check_dim("d_out", d_out)
        self.dtype = _check_dtype(dtype)
        rng = make_rng(rng)
        W = rng.standard_normal((self.d_out, self.d_in)) / np.sqrt(self.d_in)
        self.add_parameter("W", W.astype(self.dtype))
        if bias:
            self.add_parameter("b", np.zeros(self.d_out, dtype=self.dtype))
        self._store(None, ())

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
        if "W" in self._grads:
            dx, dW, db = F.linear_backward(dout, cache)
            self._accumulate("W", dW)
            self._accumulate("b", db)
        else:                                    # frozen W: skip the dW GEMM entirely
            dx = F._matmul_rows(dout, self.W)    # dX = G W as one 2-D GEMM over all rows
            if "b" in self._grads:
                self._accumulate("b", dout.reshape(-1, self.d_out).sum(axis=0))
        self._store(None, ())
        return dx

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None}, dtype={self.dtype}"


class LayerNorm(Module):
    """``y = γ ⊙ (x − μ)/√(σ² + ε) + β`` over the last dim; gamma = 1, beta = 0 at init."""

    def __init__(self, d, eps=1e-5, dtype=np.float64):
        super().__init__()
        self.d = _check_dim("d", d)
        self.eps = float(eps)
        self.dtype = _check_dtype(dtype)
        self.add_parameter("gamma", np.ones(self.d, dtype=self.dtype))
        self.add_parameter("beta", np.zeros(self.d, dtype=self.dtype))
        self._store(None, ())

    def forward(self, x):
        x = self._check_input(x, self.d)
        y, cache = F.layer_norm_forward(x, self.gamma, self.beta, self.eps)
        self._store(cache, y.shape)
        return y

    def backward(self, dout):
        cache, dout = self._check_backward(dout)
        dx, dgamma, dbeta = F.layer_norm_backward(dout, cache)
        self._accumulate("gamma", dgamma)
        self._accumulate("beta", dbeta)
        self._store(None, ())
        return dx

    def extra_repr(self):
        return f"d={self.d}"


class MLP(Module):
    """Two-layer perceptron ``y = fc2(act(fc1(x)))``; x (..., d_in) -> y (..., d_out)."""

    def __init__(self, d_in, d_hidden, d_out, activation="gelu", rng=None, dtype=np.float64):
        super().__init__()
        if activation not in F.ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(F.ACTIVATIONS)}, got {activation!r}")
        rng = make_rng(rng)
        self.activation = activation
        self.dtype = _check_dtype(dtype)
        self.d_in = _check_dim("d_in", d_in)
        self.fc1 = Linear(d_in, d_hidden, rng=rng, dtype=dtype)
        self.fc2 = Linear(d_hidden, d_out, rng=rng, dtype=dtype)
        self._store(None, ())

    def forward(self, x):
        x = self._check_input(x, self.d_in)
        act_forward, _ = F.ACTIVATIONS[self.activation]
        h, act_cache = act_forward(self.fc1(x))
        y = self.fc2(h)
        self._store(act_cache, y.shape)
        return y

    def backward(self, dout):
        act_cache, dout = self._check_backward(dout)
        _, act_backward = F.ACTIVATIONS[self.activation]
        dh = act_backward(self.fc2.backward(dout), act_cache)
        self._store(None, ())                    # the activation's cache is used up: free it
        del act_cache                            # before fc1's backward allocates its gradients
        return self.fc1.backward(dh)

    def extra_repr(self):
        return f"activation={self.activation!r}"


class MultiHeadAttention(Module):
    """Multi-head self-attention on x of shape (batch, T, d_model).

    ``q, k, v = x W_qᵀ, x W_kᵀ, x W_vᵀ`` (+ biases), split into H heads of width
    d_head = d_model / H (contiguous slices of the last dim), attention per head, heads
    concatenated back and projected by ``o_proj``.
    """

    def __init__(self, d_model, n_heads, causal=False, rng=None, dtype=np.float64):
        super().__init__()
        d_model, n_heads = _check_dim("d_model", d_model), _check_dim("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        rng = make_rng(rng)
        self.d_model, self.n_heads, self.causal = d_model, n_heads, bool(causal)
        self.dtype = _check_dtype(dtype)
        self.q_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.o_proj = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self._store(None, ())

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
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"MultiHeadAttention expects x of shape (batch, seq, d_model={self.d_model}), "
                             f"got a {x.ndim}-D array of shape {x.shape}")
        x = self._check_input(x, self.d_model)
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
        self._store(None, ())                    # q, k, v and P are used up: free them before
        del cache, datt                          # the projections' backward allocates more
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

    x, y : (batch, T, d_model). Children: ``ln1``, ``attn``, ``ln2``, ``mlp`` (``mlp.fc1``,
    ``mlp.fc2``), so LoRA targets read ``"attn.q_proj"``, ``"mlp.fc1"``.
    """

    def __init__(self, d_model, n_heads, d_hidden, causal=False, activation="gelu", rng=None,
                 dtype=np.float64):
        super().__init__()
        rng = make_rng(rng)
        self.dtype = _check_dtype(dtype)
        self.d_model = _check_dim("d_model", d_model)
        self.ln1 = LayerNorm(d_model, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, n_heads, causal=causal, rng=rng, dtype=dtype)
        self.ln2 = LayerNorm(d_model, dtype=dtype)
        self.mlp = MLP(d_model, d_hidden, d_model, activation=activation, rng=rng, dtype=dtype)
        self._store(None, ())

    def forward(self, x):
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"TransformerBlock expects x of shape (batch, seq, d_model={self.d_model}), "
                             f"got shape {x.shape}")
        x = self._check_input(x, self.d_model)
        h = x + self.attn(self.ln1(x))
        y = h + self.mlp(self.ln2(h))
        self._store(True, y.shape)
        return y

    def backward(self, dout):
        _, dout = self._check_backward(dout)
        dh = dout + self.ln2.backward(self.mlp.backward(dout))   # residual: both paths
        dx = dh + self.ln1.backward(self.attn.backward(dh))
        self._store(None, ())
        return dx

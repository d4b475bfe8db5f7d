"""The one finite-difference gradient checker of lora_np.

Centered differences, in float64::

    ∂f/∂θ_i ≈ (f(θ + h e_i) − f(θ − h e_i)) / (2h)

The error of the centered formula is O(h²) (the O(h) terms cancel), plus a round-off term
≈ ε_mach |f| / h. With float64 (ε_mach ≈ 1.1e-16) and h = 1e-6 both are ≈ 1e-10 relative;
in float32 (ε_mach ≈ 6e-8) the round-off term alone would be ≈ 1e-1 — useless.

Array-valued functions are checked by contracting with a fixed random upstream gradient
``dout``: f(θ) = Σ out(θ) ⊙ dout, so the checked gradient is exactly what backward(dout) returns.

Relative error (one number per array, on the whole array)::

    rel_error(a, n) = ‖a − n‖ / max(‖a‖ + ‖n‖, tiny)

Per-array rather than per-element: an entry whose true gradient is ~0 has a finite-difference
value of ~1e-10 from round-off, and a per-element ratio would call that a 100% error.

The ladder (float64, one layer, h = 1e-6):

    > 1e-2           the gradient is wrong
    1e-2 .. 1e-4     suspicious; kinks (relu at 0) or a bug
    1e-4 .. 1e-7     fine for deep stacks of layers, suspicious for one layer
    <= 1e-7          good — the default threshold of ``check_gradients``

``python -m lora_np.gradcheck`` prints the table for every layer and block, LoRA and full,
and exits with status 1 if any check fails.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

__all__ = ["numerical_gradient", "rel_error", "check_gradients", "GradCheckRow",
           "format_table", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 1e-7
TINY = 1e-300


def rel_error(a, n) -> float:
    """``‖a − n‖ / max(‖a‖ + ‖n‖, tiny)``: 0 for equal arrays, 1 for opposite ones."""
    a, n = np.asarray(a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {n.shape}")
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), TINY))


def numerical_gradient(f, x, dout=None, h=1e-6):
    """Centered-difference gradient of ``f`` with respect to the array ``x``.

    ``f()`` takes no arguments and reads ``x`` (which this function perturbs in place and
    restores). If ``dout`` is given, ``f`` may return an array and the scalar differentiated is
    ``Σ f() ⊙ dout``. Returns an array shaped like ``x`` (float64).
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise TypeError("numerical_gradient needs a float64 array (float32 round-off swamps the "
                        f"differences), got {getattr(x, 'dtype', type(x).__name__)}")

    def scalar():
        out = f()
        return float(np.sum(out * dout)) if dout is not None else float(out)

    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        f_plus = scalar()
        x[i] = old - h
        f_minus = scalar()
        x[i] = old
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


class GradCheckRow(NamedTuple):
    name: str             # parameter name, or "x" for the input
    shape: tuple
    rel_error: float      # for a structural zero: the max absolute error instead (see below)
    max_abs_error: float
    grad_norm: float      # ‖analytic gradient‖ — must not be 0 at a non-degenerate point
    passed: bool
    structural_zero: bool = False   # the true gradient is 0 for every input (the key bias)
    reason: str = ""                # why the row failed ("" when it passed)


def check_gradients(module, x, threshold=DEFAULT_THRESHOLD, seed=0, h=1e-6, check_input=True):
    """Check every trainable parameter of ``module`` (each on its own) and the input ``x``.

    Runs ``forward(x)``, a random upstream gradient ``dout`` (seeded), ``backward(dout)``, and
    compares each analytic gradient with ``numerical_gradient``. A row passes when its relative
    error is ≤ ``threshold`` *and* the gradient is not all zeros (a zero gradient would hide a
    wrong formula, e.g. dA at the standard B = 0 init). The one exception are parameters that
    ``module.known_zero_gradients()`` names (the attention key bias): their true gradient is 0
    for every input, so the row, with ``structural_zero=True``, passes when both gradients are ~0 and shows
    the max absolute error instead of a relative one.

    The module must be float64 and deterministic (no dropout in training mode).
    Returns a list of ``GradCheckRow``.
    """
    x = np.array(x, dtype=np.float64)          # own copy: the checker perturbs it
    for name, p in module.parameters().items():
        if p.dtype != np.float64:
            raise TypeError(f"check_gradients needs a float64 module; {name} is {p.dtype}")
    rng = np.random.default_rng(seed)
    y = module.forward(x)
    dout = rng.standard_normal(y.shape)
    module.zero_grad()
    dx = module.backward(dout)
    analytic = {n: g.copy() for n, g in module.gradients().items()}
    if check_input:
        analytic["x"] = dx
    targets = dict(module.trainable_parameters())
    if check_input:
        targets["x"] = x

    zeros = module.known_zero_gradients()
    rows = []
    for name, arr in targets.items():
        num = numerical_gradient(lambda: module.forward(x), arr, dout=dout, h=h)
        a = analytic[name]
        err, abs_err = rel_error(a, num), float(np.abs(a - num).max())
        norm = float(np.linalg.norm(a))
        if name in zeros:
            # true gradient is 0 by the math (e.g. the key bias); a relative error is
            # meaningless, so both must be zero up to round-off instead
            num_max = float(np.abs(num).max())
            passed = norm <= 1e-12 and num_max <= 1e-7
            reason = "" if passed else (f"structurally zero, but |analytic| = {norm:.1e} > 1e-12 or "
                                        f"max|numerical| = {num_max:.1e} > 1e-7")
            rows.append(GradCheckRow(name, tuple(arr.shape), abs_err, abs_err, norm, passed,
                                     structural_zero=True, reason=reason))
            continue
        if norm == 0:
            reason = "the analytic gradient is all zeros (a degenerate point hides a wrong formula)"
        elif err > threshold:
            reason = f"rel_error {err:.1e} > {threshold:.0e}"
        else:
            reason = ""
        rows.append(GradCheckRow(name, tuple(arr.shape), err, abs_err, norm, not reason, reason=reason))
    module.forward(x)          # leave a fresh forward state, as after a normal forward
    return rows


def format_table(rows, title=None) -> str:
    """The rows as an aligned text table."""
    lines = [title] if title else []
    lines.append(f"  {'parameter':<22} {'shape':<14} {'rel_error':>10} {'max|a-n|':>10} "
                 f"{'|grad|':>9}  ok")
    for r in rows:
        lines.append(f"  {r.name:<22} {str(r.shape):<14} {r.rel_error:>10.1e} "
                     f"{r.max_abs_error:>10.1e} {r.grad_norm:>9.2e}  {'yes' if r.passed else 'NO'}")
    return "\n".join(lines)


def _randomize_lora(model, rng):
    """Move every LoRA layer off the degenerate B = 0 init (``lora.randomize_lora``)."""
    from .lora import randomize_lora    # local import: gradcheck is a leaf module
    randomize_lora(model, rng)


def _randomize_norms(model, rng):
    for name, p in model.parameters().items():
        if name.endswith(("gamma", "beta")):
            p[...] = p + 0.3 * rng.standard_normal(p.shape)
        elif name.endswith(".b") or name == "b":
            p[...] = 0.1 * rng.standard_normal(p.shape)


def standard_cases():
    """(title, module, x) for every layer and block, full fine-tuning and LoRA (default, PiSSA
    and DoRA init), each at a non-degenerate point: random non-zero B, scale ≠ 1, random biases."""
    from .lora import DoRALinear, LoRALinear, add_lora
    from .modules import MLP, Linear, MultiHeadAttention, TransformerBlock

    rng = np.random.default_rng(0)
    cases = []

    def with_lora(model, targets, r, alpha):
        add_lora(model, targets, r=r, alpha=alpha, rng=rng)
        _randomize_lora(model, rng)
        return model

    lin = Linear(6, 5, rng=rng)
    _randomize_norms(lin, rng)
    cases.append(("Linear (full)", lin, rng.standard_normal((4, 6))))
    for r in (1, 5):
        layer = LoRALinear(Linear(6, 5, rng=rng), r=r, alpha=3.0, rng=rng)
        _randomize_lora(layer, rng)
        cases.append((f"LoRALinear r={r} (scale {layer.scale:.2f})", layer, rng.standard_normal((2, 3, 6))))
    pissa = LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, init="pissa", rng=rng)
    cases.append((f"LoRALinear r=2, PiSSA init (scale {pissa.scale:.2f})", pissa, rng.standard_normal((3, 6))))
    # DoRA with its exact gradient (the detached-norm backward is by design not the gradient of
    # the forward, so finite differences would rightly reject it; tests/test_dora.py checks it
    # against the forward with the norm frozen). m moved off its init (the row norms of W).
    dora = DoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng)
    _randomize_lora(dora, rng)
    dora.m[...] = dora.m * (1 + 0.3 * rng.standard_normal(dora.m.shape))
    cases.append((f"DoRALinear r=2, exact gradient (scale {dora.scale:.2f})", dora, rng.standard_normal((2, 3, 6))))
    for act in ("gelu", "tanh", "relu"):
        mlp = MLP(5, 7, 4, activation=act, rng=rng)
        _randomize_norms(mlp, rng)
        cases.append((f"MLP {act} (full)", mlp, rng.standard_normal((3, 5))))
    cases.append(("MLP gelu + LoRA fc1,fc2 r=2",
                  with_lora(MLP(5, 7, 4, rng=rng), ["fc1", "fc2"], 2, 5.0), rng.standard_normal((1, 5))))
    for causal in (False, True):
        mha = MultiHeadAttention(8, 2, causal=causal, rng=rng)
        _randomize_norms(mha, rng)
        cases.append((f"MultiHeadAttention causal={causal} (full)", mha, rng.standard_normal((2, 4, 8))))
    cases.append(("MultiHeadAttention + LoRA q,k,v,o r=2",
                  with_lora(MultiHeadAttention(8, 4, causal=True, rng=rng),
                            ["q_proj", "k_proj", "v_proj", "o_proj"], 2, 4.0),
                  rng.standard_normal((2, 3, 8))))
    blk = TransformerBlock(8, 2, 12, causal=True, rng=rng)
    _randomize_norms(blk, rng)
    cases.append(("TransformerBlock causal (full)", blk, rng.standard_normal((2, 3, 8))))
    blk = with_lora(TransformerBlock(8, 2, 12, rng=rng), ["q_proj", "v_proj", "fc1"], 2, 8.0)
    _randomize_norms(blk, rng)
    cases.append(("TransformerBlock + LoRA q,v,fc1 r=2", blk, rng.standard_normal((1, 3, 8))))
    return cases


def main() -> int:
    n_checks, worst, failed = 0, 0.0, []
    for title, module, x in standard_cases():
        rows = check_gradients(module, x)
        print(format_table(rows, title=title))
        print()
        n_checks += len(rows)
        worst = max(worst, max(r.rel_error for r in rows if not r.structural_zero))
        failed += [f"{title}: {r.name}: {r.reason}" for r in rows if not r.passed]
    print(f"{n_checks} gradients checked, worst relative error {worst:.1e} "
          f"(threshold {DEFAULT_THRESHOLD:.0e}); {len(failed)} failed")
    for f in failed:
        print(f"  FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

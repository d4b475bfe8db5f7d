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

The ladder (float64, one layer, h = 1e-6; the thresholds are for rel_error, the symmetric error —
an error relative to a known exact value, |n − a|/|a|, is about twice it):

    > 1e-2           the gradient is wrong, or a kink (relu at 0) in a check on very few rows
    1e-2 .. 1e-4     suspicious: a bug, or a kink in a check on more rows
    1e-4 .. 1e-7     fine for deep stacks of layers, suspicious for one layer
    <= 1e-7          good — the default threshold of ``check_gradients``

Checking your own model. LoRA starts at ``B = 0``, where the true ``dA = s Bᵀ (dL/dW)`` is 0
and a wrong dA formula passes any check; and with ``s = 1`` a formula that applies the scale twice
gives the right numbers. So move the model off that point first, with ``s ≠ 1``::

    model = lora_np.add_lora(lora_np.MLP(5, 7, 4, rng=0), ["fc1"], r=2, alpha=5.0, rng=0)
    lora_np.randomize_lora(model, rng=0)          # B random and non-zero
    x = np.random.default_rng(1).standard_normal((3, 5))
    print(format_table(check_gradients(model, x)))

``check_gradients`` needs a float64 module in training mode (backward differentiates the forward
of training mode; an eval-mode forward keeps nothing for backward) whose forward is a
deterministic function of x and the parameters. It refuses, with a ValueError, dropout > 0 in
training mode (a new mask per forward would make every row fail with rel_error ≈ 1) and a forward
that gives two different outputs for the same x. A row that fails says why in ``reason``.

``python -m lora_np.gradcheck`` prints the table for every layer and block, LoRA and full,
and exits with status 1 if any check fails (``--help`` for its options).
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import numpy as np

from .validate import check_bool, check_float_array, check_int, check_number

__all__ = ["numerical_gradient", "rel_error", "check_gradients", "GradCheckRow",
           "format_table", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 1e-7
TINY = 1e-300
# A structural zero (true gradient 0 for every input) passes when both gradients are 0 up to
# round-off: the analytic one is a sum of exactly cancelling terms (≈ 1e-16), the numerical one
# is the O(ε_mach |f| / h) ≈ 1e-10 noise of the centered difference.
ZERO_ANALYTIC = 1e-12        # bound on ‖analytic‖
ZERO_NUMERICAL = 1e-7        # bound on max |numerical|
# Two forwards of a deterministic module on the same x may differ by round-off (a BLAS that is
# not bit-reproducible); dropout or other random state differs by O(|y|).
REPEAT_RTOL = 1e-12


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
    h = check_number("h", h, positive=True)

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


def check_gradients(module, x, threshold=DEFAULT_THRESHOLD, seed=0, h=1e-6, check_input=None):
    """Check every trainable parameter of ``module`` (each on its own) and the input ``x``.

    Runs ``forward(x)``, a random upstream gradient ``dout`` (seeded), ``backward(dout)``, and
    compares each analytic gradient with ``numerical_gradient``. A row passes when its relative
    error is ≤ ``threshold`` *and* the gradient is not all zeros (a zero gradient would hide a
    wrong formula, e.g. dA at the standard B = 0 init). The one exception are parameters that
    ``module.known_zero_gradients()`` names (the attention key bias): their true gradient is 0
    for every input, so the row, with ``structural_zero=True``, passes when ‖analytic‖ ≤ 1e-12
    and max |numerical| ≤ 1e-7, and shows the max absolute error instead of a relative one.
    A failed row says why in ``reason``.

    ``x`` is a float array (integers are promoted to float64) and its gradient is checked too —
    except for a module that takes token ids (``module.takes_token_ids``: ``Embedding``,
    ``LanguageModel``): by default (``check_input=None``) its integer ``x`` stays integer and
    only the parameters are checked, since ids have no gradient. ``check_input=False`` keeps an
    integer ``x`` integer for any module; ``True`` forces the input check.

    Raises TypeError for a module that is not a float64 lora_np Module, and ValueError for one
    that cannot be checked: in eval mode, with dropout > 0 in training mode, or with a forward
    that is not a deterministic function of ``x`` (see the module docstring).
    Returns a list of ``GradCheckRow``.
    """
    threshold = check_number("threshold", threshold, positive=True)
    h = check_number("h", h, positive=True)
    seed = check_int("seed", seed, minimum=0)
    if check_input is None:                    # token ids: nothing to differentiate
        check_input = not getattr(module, "takes_token_ids", False)
    check_input = check_bool("check_input", check_input)
    x = _own_input(x, check_input)
    _check_checkable(module)
    rng = np.random.default_rng(seed)
    y = _repeatable_forward(module, x)
    dout = rng.standard_normal(y.shape)
    module.zero_grad()
    dx = module.backward(dout)
    analytic = {n: g.copy() for n, g in module.gradients().items()}
    targets = dict(module.trainable_parameters())
    if check_input:
        analytic["x"], targets["x"] = dx, x

    zeros = module.known_zero_gradients()
    rows = [_row(name, analytic[name],
                 numerical_gradient(lambda: module.forward(x), arr, dout=dout, h=h),
                 threshold, structural=name in zeros)
            for name, arr in targets.items()]
    module.forward(x)          # leave a fresh forward state, as after a normal forward
    return rows


def _own_input(x, check_input):
    """The checker's own copy of ``x`` (it perturbs it): float64 — or, with
    ``check_input=False``, an integer array kept as integers (token ids, which have no
    gradient and must not become floats)."""
    arr = np.asarray(x)
    if not check_input and arr.dtype.kind in "iu":
        if arr.size == 0:
            raise ValueError(f"x must be a non-empty array, got shape {arr.shape}")
        return arr.copy()
    return np.array(check_float_array("x", x), dtype=np.float64)


def _check_checkable(module):
    """Refuse, before any forward, a module whose gradient this checker cannot check."""
    from .modules import Module          # local import: gradcheck is a leaf module
    if not isinstance(module, Module):
        raise TypeError(f"check_gradients needs a lora_np Module, got {type(module).__name__}")
    for name, p in module.parameters().items():
        if p.dtype != np.float64:
            raise TypeError(f"check_gradients needs a float64 module; {name} is {p.dtype}")
    for path, m in module.named_modules():
        where = f"{path} ({type(m).__name__})" if path else type(m).__name__
        if not m.training:
            raise ValueError(
                f"check_gradients: {where} is in eval mode, where forward keeps nothing for "
                "backward, so there is no analytic gradient to check; call module.train() "
                "first (with dropout 0: the check needs a deterministic forward)")
        p = getattr(m, "dropout", 0.0)
        if p > 0:
            raise ValueError(
                f"check_gradients: {where} has dropout {p} in training mode, so every forward "
                "draws a new mask and the finite differences would compare different functions "
                "(rel_error ≈ 1 on every row). Set its dropout to 0 for the check "
                "(layer.dropout = 0.0), or check the layer's functions with one fixed mask: "
                "functional.lora_linear_forward(x, W, b, A, B, scale, dropout_mask=mask) "
                "(or dora_linear_forward) and numerical_gradient")


def _repeatable_forward(module, x):
    """``forward(x)`` twice: refuse a forward that is not a deterministic function of x (random
    state such as a noise draw, or a forward that changes the module) or that changes x itself
    — either would make the finite differences compare different functions. Returns the output
    of the second call, whose forward state the following backward consumes."""
    x_before = x.copy()
    y1 = np.array(module.forward(x))                 # a copy: forward may reuse its buffers
    y2 = np.asarray(module.forward(x))
    if not np.array_equal(x, x_before):
        raise ValueError("check_gradients: forward(x) changed its input x in place; the checker "
                         "perturbs x entry by entry and needs forward to leave it as it was")
    scale = float(np.max(np.abs(y1), initial=0.0, where=np.isfinite(y1)))
    if y1.shape != y2.shape or not np.allclose(y1, y2, rtol=0, atol=REPEAT_RTOL * scale,
                                               equal_nan=True):
        diff = (f"max |difference| {np.nanmax(np.abs(y2 - y1)):.1e}" if y1.shape == y2.shape
                else f"shapes {y1.shape} and {y2.shape}")
        raise ValueError(f"check_gradients: forward(x) gave two different outputs for the same x "
                         f"({diff}); the checker needs forward to be a deterministic function of "
                         "x and the parameters (no random state such as dropout or noise, no "
                         "forward that changes the module)")
    return y2


def _row(name, a, num, threshold, structural) -> GradCheckRow:
    """One row: analytic gradient ``a`` against numerical ``num``, and why it fails if it does."""
    err, abs_err = rel_error(a, num), float(np.abs(a - num).max())
    norm = float(np.linalg.norm(a))
    if structural:
        # the true gradient is 0 by the math: a relative error of two round-off noises is
        # meaningless, so both must be zero up to round-off instead
        reason = _structural_zero_reason(norm, float(np.abs(num).max()))
        return GradCheckRow(name, tuple(a.shape), abs_err, abs_err, norm, not reason,
                            structural_zero=True, reason=reason)
    reason = _failure_reason(a, num, err, norm, threshold)
    return GradCheckRow(name, tuple(a.shape), err, abs_err, norm, not reason, reason=reason)


def _failure_reason(a, num, err, norm, threshold) -> str:
    """Why an ordinary row fails ("" if it passes). ``not err <= threshold`` also fails a NaN."""
    for what, g in (("analytic", a), ("numerical", num)):
        if not np.all(np.isfinite(g)):
            return f"the {what} gradient has NaN or inf entries"
    if norm == 0 and not err <= threshold:
        return f"the analytic gradient is all zeros but the numerical one is not (rel_error {err:.1e})"
    if norm == 0:
        return ("the analytic gradient is all zeros, and so is the numerical one: at this point "
                "a wrong formula would pass too (B = 0? call lora_np.randomize_lora first)")
    if not err <= threshold:
        return f"rel_error {err:.1e} > threshold {threshold:g}"
    return ""


def _structural_zero_reason(norm, num_max) -> str:
    """Why a structural-zero row fails ("" if both gradients are zero up to round-off)."""
    bad = []
    if not norm <= ZERO_ANALYTIC:
        bad.append(f"‖analytic‖ = {norm:.1e} > {ZERO_ANALYTIC:g}")
    if not num_max <= ZERO_NUMERICAL:
        bad.append(f"max |numerical| = {num_max:.1e} > {ZERO_NUMERICAL:g}")
    return "structurally zero, but " + " and ".join(bad) if bad else ""


def format_table(rows, title=None) -> str:
    """The rows as an aligned text table, one line per row, then a legend if a structural zero is
    shown and one line per failed row saying why.

    A structural-zero row shows ``=0`` in the rel_error column: its true gradient is 0, a ratio
    of two round-off noises means nothing, and the row is judged by ``max|a-n|`` and ``|grad|``.
    """
    lines = [title] if title else []
    lines.append(f"  {'parameter':<22} {'shape':<14} {'rel_error':>10} {'max|a-n|':>10} "
                 f"{'|grad|':>9}  ok")
    for r in rows:
        rel = f"{'=0':>10}" if r.structural_zero else f"{r.rel_error:>10.1e}"
        lines.append(f"  {r.name:<22} {str(r.shape):<14} {rel} {r.max_abs_error:>10.1e} "
                     f"{r.grad_norm:>9.2e}  {'yes' if r.passed else 'NO'}")
    if any(r.structural_zero for r in rows):
        lines.append(f"  =0: true gradient 0 for every input; passes when |grad| <= {ZERO_ANALYTIC:g} "
                     f"and max|numerical| <= {ZERO_NUMERICAL:g}")
    lines += [f"  FAILED {r.name}: {r.reason}" for r in rows if not r.passed]
    return "\n".join(lines)


def _randomize_norms(model, rng):
    """Biases off their 0 init and LayerNorm γ, β off 1, 0 (in place): at those values some
    terms of the gradients vanish, and a wrong term would go unnoticed."""
    for name, p in model.parameters().items():
        if name.endswith(("gamma", "beta")):
            p[...] = p + 0.3 * rng.standard_normal(p.shape)
        elif name.endswith(".b") or name == "b":
            p[...] = 0.1 * rng.standard_normal(p.shape)


def standard_cases():
    """(title, module, x) for every layer and block, full fine-tuning and LoRA (default, PiSSA
    and DoRA init), each at a non-degenerate point: random non-zero B, scale ≠ 1, random biases;
    then the embedding, its LoRA, and a tiny ``LanguageModel`` (every parameter, and LoRA on
    every linear layer and the token embedding). Their ``x`` are integer token ids (every id
    occurs, some several times): checked with ``check_input=False``, as ``main`` does."""
    # local imports: gradcheck is a leaf
    from .lora import DoRALinear, LoRAEmbedding, LoRALinear, add_lora, randomize_lora
    from .modules import MLP, Embedding, Linear, MultiHeadAttention, TransformerBlock
    from .text.model import LanguageModel

    rng = np.random.default_rng(0)
    cases = []

    def with_lora(model, targets, r, alpha):
        add_lora(model, targets, r=r, alpha=alpha, rng=rng)
        randomize_lora(model, rng)
        return model

    lin = Linear(6, 5, rng=rng)
    _randomize_norms(lin, rng)
    cases.append(("Linear (full)", lin, rng.standard_normal((4, 6))))
    for r in (1, 5):
        layer = LoRALinear(Linear(6, 5, rng=rng), r=r, alpha=3.0, rng=rng)
        randomize_lora(layer, rng)
        cases.append((f"LoRALinear r={r} (scale {layer.scale:.2f})", layer, rng.standard_normal((2, 3, 6))))
    pissa = LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, init="pissa", rng=rng)
    cases.append((f"LoRALinear r=2, PiSSA init (scale {pissa.scale:.2f})", pissa, rng.standard_normal((3, 6))))
    # DoRA with its exact gradient (the detached-norm backward is by design not the gradient of
    # the forward, so finite differences would rightly reject it; tests/test_dora.py checks it
    # against the forward with the norm frozen). m moved off its init (the row norms of W).
    dora = DoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng)
    randomize_lora(dora, rng)
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

    def token_ids(V, shape):
        """ids of ``shape`` in which every id in [0, V) occurs and some occur again."""
        ids = rng.integers(0, V, size=shape).reshape(-1)
        ids[:V] = rng.permutation(V)
        return rng.permutation(ids).reshape(shape)

    cases.append(("Embedding (full)", Embedding(6, 4, rng=rng), token_ids(6, (3, 4))))
    emb = LoRAEmbedding(Embedding(6, 4, rng=rng), r=2, alpha=3.0, rng=rng)
    randomize_lora(emb, rng)
    cases.append((f"LoRAEmbedding r=2 (scale {emb.scale:.2f})", emb, token_ids(6, (2, 5))))
    tiny = dict(vocab_size=7, d_model=8, n_heads=2, n_layers=2, d_hidden=12, context=5)
    lm = LanguageModel(**tiny, rng=rng)
    _randomize_norms(lm, rng)
    cases.append(("LanguageModel (full)", lm, token_ids(7, (2, 5))))
    lm = LanguageModel(**tiny, rng=rng)
    _randomize_norms(lm, rng)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "head", "tok_emb"]
    cases.append(("LanguageModel + LoRA on every linear and tok_emb r=2",
                  with_lora(lm, targets, 2, 5.0), token_ids(7, (2, 5))))
    return cases


def _threshold_arg(text: str) -> float:
    try:
        return check_number("--threshold", float(text), positive=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m lora_np.gradcheck",
        description="Check every gradient of every layer and block of lora_np (full fine-tuning "
                    "and LoRA, default/PiSSA/DoRA init), of the embedding and of a tiny language "
                    "model, against centered finite differences in float64, print one table per "
                    "case and a summary; exit 1 if any check fails.")
    parser.add_argument("--threshold", type=_threshold_arg, default=DEFAULT_THRESHOLD,
                        help="largest relative error a row may have and pass "
                             f"(default {DEFAULT_THRESHOLD:g})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """``python -m lora_np.gradcheck [--threshold T]``; returns the exit status (1 if any row fails)."""
    threshold = _parse_args(argv).threshold
    n_checks, n_zero, worst, failed = 0, 0, 0.0, []
    for title, module, x in standard_cases():
        rows = check_gradients(module, x, threshold=threshold)   # token ids: parameters only
        print(format_table(rows, title=title))
        print()
        n_checks += len(rows)
        n_zero += sum(r.structural_zero for r in rows)
        worst = max(worst, max((r.rel_error for r in rows if not r.structural_zero), default=0.0))
        failed += [f"{title}: {r.name}: {r.reason}" for r in rows if not r.passed]
    print(f"{n_checks} gradients checked ({n_zero} structural zeros), worst "
          f"relative error {worst:.1e} (threshold {threshold:g}); {len(failed)} failed")
    for f in failed:
        print(f"  FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

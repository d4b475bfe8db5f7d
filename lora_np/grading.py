"""The assignments' grader: a student's forward/backward against finite differences, with hints.

One function per assignment (notebooks/assignments/)::

    check_lora_linear(forward, backward=None, seed=0)      # functional.lora_linear_forward / _backward
    check_lora_attention(forward, backward, seed=0)        # lora_attention_forward below / its backward
    check_lora_embedding(forward, backward=None, seed=0)   # functional.lora_embedding_forward / _backward

Each takes the student's functions (with the signatures of the reference ones), runs them on
several cases at non-degenerate points — random non-zero B, s ≠ 1, float64, shapes with and
without a leading batch dimension — and returns a ``GradeResult``: ``.passed`` (bool), ``.rows``
(the table) and ``.hints`` (list of str). Shown in a notebook (or printed) it prints the table and
the hints, in the spirit of makemore's backprop exercise::

    check                              exact  close  max difference  result
    y (forward)                        no     yes    8.9e-16         ok
    dx                                 no     NO     1.7e+01         FAIL  (x (6, 5), r=2, s=2.5)
    dA                                 yes    yes    2.6e-09         ok
    ...
    hints:
      - dx is G W only: dX is missing the LoRA path s (G B) A. ...

(the note after FAIL names the first case that failed).

How each column is computed:

* **close** — the gradient against the *true* gradient, computed by centered finite differences
  of the reference forward (``gradcheck.numerical_gradient``, h = 1e-6, contracted with a random
  upstream gradient ``dy``); close means ``gradcheck.rel_error ≤ 1e-7`` in every case. This is
  what grades. For ``y`` (the forward) close means equal to the reference forward up to 1e-10
  relative.
* **exact** — bit for bit equal to ``lora_np.functional``'s hand-derived formula. A correct answer
  computed in another order is close but not exact; that is fine.
* **max difference** — max |yours − finite differences| over the cases (for y: − reference).

Besides the gradients it checks that a float32 input gives float32 outputs, that no argument is
changed in place, and that no (d_out, d_in)-sized array is formed (LoRA's point: ``B @ A`` is
never built). That last check is a memory measurement, said honestly: on a large layer
(d_in = d_out = 384, N = 4, r = 2) the peak of the memory NumPy allocates during the call
(``tracemalloc``) is compared with the bytes of one (d_out, d_in) matrix, and flagged from half
of it (``DENSE_FRACTION``); the reference code peaks at about a tenth of it (the attention
block's backward) or less. These three
rows count toward ``.passed`` like the gradients: a dense solution is correct but not LoRA.
The measurement cannot tell *which* dense array was formed (``B @ A``, the full gradient
``Gᵀ X``, a copy of ``W``), so the hint names all three.

The hints come from planted-mistake candidates: the grader computes what common wrong formulas
give (s missing or applied twice, transposed, swapped slots, dX without the LoRA path, the
softmax backward without its row-sum term, a scatter-add that loses repeated ids, ...) and says
which one the student's numbers match. A gradient that is right at B = 0 (LoRA's init, where the
true dA is 0) but wrong at random B gets its own hint. A NotImplementedError from the student's
function is not caught: an unfinished TODO stops the check cell, as in nbgrader.
"""

from __future__ import annotations

import copy
import math
import tracemalloc
from typing import Callable, NamedTuple

import numpy as np

from . import functional as F
from .gradcheck import DEFAULT_THRESHOLD, numerical_gradient, rel_error
from .validate import check_int

__all__ = ["GradeRow", "GradeResult", "check_lora_linear", "check_lora_attention",
           "check_lora_embedding", "lora_attention_forward", "lora_attention_backward",
           "LoRAAttentionCache", "FORWARD_RTOL", "MATCH_RTOL"]

FORWARD_RTOL = 1e-10          # y against the reference forward (relative)
MATCH_RTOL = 1e-6             # a wrong answer "matches" a planted-mistake candidate within this
ZERO_B_ATOL = 1e-8            # at B = 0 a true gradient may be 0: compared in absolute terms there
BIG = dict(d=384, N=4, r=2)   # the layer of the memory check
DENSE_FRACTION = 0.5          # flagged when the peak reaches this fraction of one (d_out, d_in) matrix


# ----------------------------------------------------------------------------- the result


class GradeRow(NamedTuple):
    name: str                     # "dA", "y (forward)", "float32 in, float32 out", ...
    exact: bool | None            # bit for bit the library's formula (None: not a numerical row)
    close: bool | None            # within the tolerance of finite differences, in every case
    max_diff: float | None        # max |yours − finite differences| over the cases
    passed: bool
    note: str = ""                # where it failed first, or what was measured


def _yes(v, fail="NO"):
    return "-" if v is None else ("yes" if v else fail)


class GradeResult:
    """What a check returns: ``.passed``, ``.rows`` (list of ``GradeRow``), ``.hints`` (list of
    str). ``str(result)`` (and the notebook display) is the table followed by the hints."""

    def __init__(self, title: str, cases: list[str], rows: list[GradeRow], hints: list[str], info: str = ""):
        self.title, self.cases, self.rows, self.hints, self.info = title, cases, rows, hints, info

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def row(self, name: str) -> GradeRow:
        """The row called ``name`` (KeyError if there is none)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def __str__(self) -> str:
        lines = [f"{self.title}: {len(self.cases)} cases at random non-zero B, s ≠ 1, float64"]
        lines += [f"  case {i + 1}: {c}" for i, c in enumerate(self.cases)]
        lines.append("close: relative error against finite differences ≤ "
                     f"{DEFAULT_THRESHOLD:.0e} in every case (what counts); "
                     "exact: bit for bit lora_np's formula")
        lines.append("")
        w = max(32, max(len(r.name) for r in self.rows) + 2)
        lines.append(f"{'check':<{w}}{'exact':<7}{'close':<7}{'max difference':<16}result")
        for r in self.rows:
            md = "-" if r.max_diff is None else f"{r.max_diff:.1e}"
            res = "ok" if r.passed else "FAIL"
            note = f"  {r.note}" if r.note else ""
            lines.append(f"{r.name:<{w}}{_yes(r.exact, 'no'):<7}{_yes(r.close):<7}{md:<16}{res}{note}")
        if self.info:
            lines.append(self.info)
        failed = sum(not r.passed for r in self.rows)
        lines.append("")
        lines.append("PASSED: every check" if self.passed else f"FAILED: {failed} of {len(self.rows)} checks")
        if self.hints:
            lines.append("hints:")
            for h in self.hints:
                lines.append("  - " + h)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle):          # IPython / Jupyter: the plain-text table
        p.text(str(self))


# ------------------------------------------------------------------------ the attention block


class LoRAAttentionCache(NamedTuple):
    """What ``lora_attention_forward`` keeps for the backward (single head, d = d_model)."""
    x: np.ndarray        # (..., T, d)  input
    Hq: np.ndarray       # (..., T, r)  Hq = X A_qᵀ
    Hv: np.ndarray       # (..., T, r)  Hv = X A_vᵀ
    q: np.ndarray        # (..., T, d)  q = X W_qᵀ + s Hq B_qᵀ
    k: np.ndarray        # (..., T, d)  k = X W_kᵀ
    v: np.ndarray        # (..., T, d)  v = X W_vᵀ + s Hv B_vᵀ
    P: np.ndarray        # (..., T, T)  P = softmax(q kᵀ / √d)
    O: np.ndarray        # (..., T, d)  O = P v
    params: dict         # "Wq", "Wk", "Wv", "Wo" (d, d) frozen; "Aq", "Av" (r, d); "Bq", "Bv" (d, r)
    scale: float         # s
    causal: bool


ATTENTION_KEYS = ("Wq", "Wk", "Wv", "Wo", "Aq", "Bq", "Av", "Bv")


def lora_attention_forward(x, params, scale, causal=False):
    """A single-head self-attention block with LoRA on the query and value projections::

        q = X W_qᵀ + s (X A_qᵀ) B_qᵀ,   k = X W_kᵀ,   v = X W_vᵀ + s (X A_vᵀ) B_vᵀ
        S = q kᵀ / √d,   P = softmax(S) (row-wise; causal: S[t, u] = −∞ for u > t)
        O = P v,         Y = O W_oᵀ

    x : (..., T, d);  params : dict of ``ATTENTION_KEYS`` (W_* (d, d), A_* (r, d), B_* (d, r));
    scale : s.  Returns ``(y (..., T, d), LoRAAttentionCache)``. Composed of ``functional``'s
    pieces (the attention assignment's student writes the backward).
    """
    p = params
    q, cq = F.lora_linear_forward(x, p["Wq"], None, p["Aq"], p["Bq"], scale)
    k, _ = F.linear_forward(x, p["Wk"])
    v, cv = F.lora_linear_forward(x, p["Wv"], None, p["Av"], p["Bv"], scale)
    O, ca = F.attention_forward(q, k, v, causal=causal)
    y, _ = F.linear_forward(O, p["Wo"])
    return y, LoRAAttentionCache(x, cq.H, cv.H, q, k, v, ca.P, O, p, scale, bool(causal))


def _attention_pieces(dy, c: LoRAAttentionCache):
    """The reference backward's pieces: dO, (dq, dk, dv) and the three projections' backward."""
    p = c.params
    dO, _, _ = F.linear_backward(dy, F.LinearCache(c.O, p["Wo"], False), need_dW=False, need_db=False)
    d = c.q.shape[-1]
    att = F.AttentionCache(c.q, c.k, c.v, c.P, F.SoftmaxCache(c.P, -1), 1.0 / math.sqrt(d))
    return dO, F.attention_backward(dO, att)


def _qv_backward(dq, dk, dv, c: LoRAAttentionCache):
    p = c.params
    dxq, dAq, dBq = F.lora_linear_backward(dq, F.LoRALinearCache(c.x, c.x, c.Hq, p["Wq"], p["Aq"], p["Bq"],
                                                                   c.scale, None))
    dxk, _, _ = F.linear_backward(dk, F.LinearCache(c.x, p["Wk"], False), need_dW=False, need_db=False)
    dxv, dAv, dBv = F.lora_linear_backward(dv, F.LoRALinearCache(c.x, c.x, c.Hv, p["Wv"], p["Av"], p["Bv"],
                                                                   c.scale, None))
    return (dxq, dxk, dxv), (dAq, dBq, dAv, dBv)


def lora_attention_backward(dy, cache: LoRAAttentionCache):
    """The reference backward of ``lora_attention_forward`` (``functional``'s pieces chained):
    returns ``(dx, dAq, dBq, dAv, dBv)``. The attention assignment asks the student for this."""
    _, (dq, dk, dv) = _attention_pieces(dy, cache)
    (dxq, dxk, dxv), grads = _qv_backward(dq, dk, dv, cache)
    return (dxq + dxk + dxv, *grads)


# ----------------------------------------------------------------------------- the engine


class _Case(NamedTuple):
    label: str
    args: dict                 # forward's arguments by name, in order (a dict value for params)
    zero_B: bool = False


class _Spec(NamedTuple):
    title: str
    grad_names: tuple          # backward's outputs in order
    wrt: dict                  # gradient -> path of the array it differentiates: ("x",), ("params", "Aq")
    ref_forward: Callable
    ref_backward: Callable
    cases: Callable            # rng -> list of _Case
    big_case: Callable         # rng -> (_Case, entries of one dense matrix)
    candidates: Callable       # (case, dy, ref_y, ref_grads) -> list of (slot, array, key)
    hints: dict                # key -> hint text
    shape_hint: str
    dense_name: str            # "(d_out, d_in)"


def _get(args, path):
    v = args[path[0]]
    return v if len(path) == 1 else v[path[1]]


def _leaves(args, prefix=""):
    """(name, array) for every array argument, dict values included."""
    for k, v in args.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, np.ndarray):
                    yield f"{k}[{kk!r}]", vv
        elif isinstance(v, np.ndarray):
            yield k, v


def _call(fn, *args):
    """(result, None) or (None, exception); a NotImplementedError (an unfinished TODO) propagates."""
    try:
        return fn(*args), None
    except NotImplementedError:
        raise
    except Exception as e:                     # noqa: BLE001 — the student's error is reported, not raised
        return None, e


def _changed(original, given):
    return [name for (name, a), (_, b) in zip(_leaves(original), _leaves(given))
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)]


def _peak_bytes(fn, *args):
    """The peak of the memory NumPy allocates while ``fn(*args)`` runs (tracemalloc), and its result."""
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out = _call(fn, *args)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        if not was:
            tracemalloc.stop()
    return out, max(peak - base, 0)


def _matches(a, cand):
    a = np.asarray(a)
    if not isinstance(cand, np.ndarray) or a.shape != cand.shape or a.dtype.kind not in "fc":
        return False
    if not np.any(cand) and not np.any(a):
        return True
    return rel_error(a, cand) <= MATCH_RTOL


def _check_callable(name, fn, optional=False):
    if fn is None and optional:
        return None
    if not callable(fn):
        raise TypeError(f"{name} must be a function (callable), got {fn!r} ({type(fn).__name__})")
    return fn


def _grade(spec: _Spec, forward, backward, seed) -> GradeResult:
    _check_callable("forward", forward)
    _check_callable("backward", backward, optional=True)
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    slots = ("y",) + (spec.grad_names if backward is not None else ())
    cases = spec.cases(rng)
    labels = [c.label for c in cases if not c.zero_B]
    stats = {s: dict(exact=True, close=True, max=0.0, note="") for s in slots}
    zero_close = {s: True for s in slots}
    hints: list[str] = []
    hint_keys: list[str] = []
    inplace: list[str] = []
    hinted: set[str] = set()

    def hint(key, text=None):
        if key not in hint_keys:
            hint_keys.append(key)
            hints.append(text if text is not None else spec.hints[key])

    def fail(slot, case, why):
        st = stats[slot]
        st["close"] = False
        if not st["note"]:
            st["note"] = f"{why} ({case.label})" if why else f"({case.label})"

    for case in cases:
        args = case.args
        ref_y, ref_cache = spec.ref_forward(*copy.deepcopy(args).values())
        dy = rng.standard_normal(ref_y.shape)
        ref_grads = dict(zip(spec.grad_names, spec.ref_backward(dy, ref_cache)))
        given = copy.deepcopy(args)
        out, err = _call(forward, *given.values())
        if err is None and not (isinstance(out, tuple) and len(out) == 2):
            err = TypeError(f"forward returned {type(out).__name__}"
                            f"{f' of length {len(out)}' if isinstance(out, tuple) else ''}; "
                            "expected the pair (y, cache)")
        if err is not None:
            if case.zero_B:
                zero_close = dict.fromkeys(slots, False)
                continue
            for s in slots:
                fail(s, case, f"forward raised {type(err).__name__}")
            hint("forward-error", f"forward raised {type(err).__name__}: {err} — in case {case.label}. "
                                  + spec.shape_hint)
            continue
        y, cache = out
        changed = _changed(args, given)
        if changed:
            inplace += [f"forward changed {n}" for n in changed]
            given = copy.deepcopy(args)           # compare the backward against fresh arrays
        got = {"y": y}
        if backward is not None:
            dy_given = dy.copy()
            before = copy.deepcopy(given)
            gout, gerr = _call(backward, dy_given, cache)
            if not np.array_equal(dy_given, dy):
                inplace.append("backward changed dy")
            inplace += [f"backward changed {n} (the cache holds the caller's arrays)"
                        for n in _changed(before, given)]
            if gerr is None and not (isinstance(gout, tuple) and len(gout) == len(spec.grad_names)):
                n = len(gout) if isinstance(gout, (tuple, list)) else None
                length = f" of length {n}" if n is not None else ""
                gerr = TypeError(f"backward returned {type(gout).__name__}{length}; "
                                 f"expected the tuple ({', '.join(spec.grad_names)})")
            if gerr is not None:
                if case.zero_B:
                    zero_close.update(dict.fromkeys(spec.grad_names, False))
                else:
                    for s in spec.grad_names:
                        fail(s, case, f"backward raised {type(gerr).__name__}")
                    hint("backward-error", f"backward raised {type(gerr).__name__}: {gerr} — in case "
                                           f"{case.label}. " + spec.shape_hint)
            else:
                got.update(zip(spec.grad_names, gout))
        # compare
        refs = {"y": ref_y, **ref_grads}
        wrong = {}
        for s in slots:
            if s not in got:
                continue
            a = np.asarray(got[s]) if got[s] is not None else None
            ref = refs[s]
            if a is None or a.shape != ref.shape:
                if case.zero_B:
                    zero_close[s] = False
                    continue
                shape = None if a is None else a.shape
                fail(s, case, f"shape {shape}, expected {ref.shape}")
                hint(f"shape-{s}", _shape_hint(s, shape, ref.shape, refs))
                hinted.add(s)
                continue
            if s == "y":
                num = ref_y
                close = bool(np.allclose(a, ref, rtol=FORWARD_RTOL, atol=FORWARD_RTOL * np.abs(ref).max()))
            else:
                num = numerical_gradient(lambda: spec.ref_forward(*args.values())[0], _get(args, spec.wrt[s]),
                                         dout=dy)
                err_ = rel_error(a, num)
                close = err_ <= DEFAULT_THRESHOLD
                if case.zero_B:
                    close = close or float(np.abs(a - num).max()) <= ZERO_B_ATOL
            diff = float(np.abs(a - num).max())
            if case.zero_B:
                zero_close[s] &= bool(close)
                continue
            st = stats[s]
            st["max"] = max(st["max"], diff)
            st["exact"] &= bool(np.array_equal(a, ref))
            if not close:
                fail(s, case, "")
                wrong[s] = a
        if wrong and not case.zero_B:
            cands = (_generic_candidates(refs, spec.grad_names, args)
                     + spec.candidates(case, dy, ref_y, ref_grads))
            for s, a in wrong.items():
                for slot, cand, key in cands:
                    if slot == s and _matches(a, cand):
                        hint(f"{key}-{s}", spec.hints[key].format(g=s) if key in spec.hints
                             else _generic_hint(key, s))
                        hinted.add(s)
                        break
    # right only at B = 0
    for s in slots:
        if not stats[s]["close"] and zero_close[s] and s != "y" and s not in hinted:
            hint(f"zeroB-{s}", spec.hints["zeroB"].format(g=s))

    rows = [GradeRow("y (forward)" if s == "y" else s, stats[s]["exact"], stats[s]["close"], stats[s]["max"],
                     stats[s]["close"], stats[s]["note"]) for s in slots]
    zb = ", ".join(f"{s} {'yes' if zero_close[s] else 'NO'}" for s in slots if s != "y")
    info = f"at B = 0 (LoRA's init; not graded — a wrong dA passes there): close {zb}" if zb else ""

    # float32 in, float32 out
    dtype_bad = _dtype_check(spec, forward, backward, cases[0], rng)
    rows.append(GradeRow("float32 in, float32 out", None, None, None, not dtype_bad, "; ".join(dtype_bad)))
    if dtype_bad:
        hint("dtype", "A float32 input must give float32 outputs (dtype in = dtype out), but "
                      + "; ".join(dtype_bad) + ". A float64 array promoted it: `np.zeros(shape)` without "
                      "`dtype=x.dtype`, `.astype(float)`, or a `np.float64` scalar times a float32 array.")
    rows.append(GradeRow("inputs unchanged", None, None, None, not inplace,
                         "; ".join(dict.fromkeys(inplace))))
    if inplace:
        hint("inplace", "An input was modified in place: " + "; ".join(dict.fromkeys(inplace))
             + ". The caller's arrays must stay as they were (a `+=`, `*=` or `[...] =` on an argument, "
               "or on an array the cache shares with the caller). Write `z = s * A`, not `A *= s`.")
    # memory: no dense (d_out, d_in) matrix
    big, entries = spec.big_case(rng)
    row, text = _memory_check(spec, forward, backward, big, entries)
    rows.append(row)
    if text:
        hint("dense", text)
    return GradeResult(spec.title, labels, rows, hints, info)


def _other(key):
    return key.split(":", 1)[1] if ":" in key else ""


def _generic_candidates(refs, grad_names, args):
    """Planted mistakes every gradient can make: s missing or twice, transposed, another slot's value."""
    s = float(args["scale"])
    out = []
    for g in grad_names:
        r = refs[g]
        out += [(g, r / s, "s-missing"), (g, r * s, "s-twice"),
                (g, r.T if r.ndim == 2 else None, "transposed"), (g, np.zeros_like(r), "zeros")]
        for o in grad_names:
            if o != g:
                out.append((g, refs[o], f"swapped:{o}"))
                if refs[o].ndim == 2:
                    out.append((g, refs[o].T, f"swapped:{o}"))
    return out


def _generic_hint(key, g):
    if key == "s-missing":
        return (f"{g} is off by exactly a factor 1/s: the scale s is missing from {g}. The LoRA branch is "
                f"s·(X Aᵀ) Bᵀ, so every gradient through it carries one factor s.")
    if key == "s-twice":
        return (f"{g} is off by exactly a factor s: the scale s is applied twice in {g} (e.g. once in "
                "a saved product and once more at the end). Each gradient through the branch carries s once.")
    if key == "transposed":
        return f"{g} holds the right numbers transposed: a gradient has the shape of its parameter."
    if key == "zeros":
        return f"{g} is all zeros, but the true gradient is not (the grader's B is random and non-zero)."
    if key.startswith("swapped:"):
        o = _other(key)
        return (f"{g} holds the values of {o}: two gradients are swapped (check the order of the returned "
                f"tuple and which of A, B goes where).")
    raise KeyError(key)


def _shape_hint(slot, got, want, refs):
    if got is None:
        return f"{slot} is None; expected an array of shape {want}."
    if len(got) == 2 and tuple(got) == tuple(want)[::-1]:
        return f"{slot} has shape {got}, the transpose of {want}: a gradient has the shape of its parameter."
    if len(want) > 2 and tuple(got) == (int(np.prod(want[:-1])), want[-1]):
        return (f"{slot} has shape {got} but should be {want}: the leading dimensions were flattened and "
                "not restored. x may have any number of leading dimensions; reshape back with "
                "`.reshape(*x.shape[:-1], -1)`.")
    for o, r in refs.items():
        if o != slot and r.shape == tuple(got):
            return f"{slot} has shape {got}, which is {o}'s shape ({want} expected): are two results swapped?"
    return f"{slot} has shape {got}; expected {want}."


def _dtype_check(spec, forward, backward, case, rng):
    args32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else
                  ({kk: vv.astype(np.float32) for kk, vv in v.items()} if isinstance(v, dict) else v))
              for k, v in copy.deepcopy(case.args).items()}
    out, err = _call(forward, *args32.values())
    if err is not None or not (isinstance(out, tuple) and len(out) == 2):
        return []                               # reported by the float64 rows already
    y, cache = out
    bad = []
    if getattr(y, "dtype", None) != np.float32:
        bad.append(f"y is {getattr(y, 'dtype', type(y).__name__)}")
    if backward is not None and isinstance(y, np.ndarray):
        dy = rng.standard_normal(y.shape).astype(np.float32)
        gout, gerr = _call(backward, dy, cache)
        if gerr is None and isinstance(gout, tuple):
            bad += [f"{n} is {getattr(g, 'dtype', type(g).__name__)}" for n, g in zip(spec.grad_names, gout)
                    if getattr(g, "dtype", None) != np.float32]
    return bad


def _memory_check(spec, forward, backward, case, entries):
    dense = entries * 8
    given = copy.deepcopy(case.args)
    (out, err), peak_f = _peak_bytes(forward, *given.values())
    name = f"never forms a {spec.dense_name} array"
    if err is not None or not (isinstance(out, tuple) and len(out) == 2):
        return GradeRow(name, None, None, None, False, "forward failed on the large case"), None
    peak_b = 0
    if backward is not None:
        dy = np.random.default_rng(0).standard_normal(np.shape(out[0]))
        (gout, gerr), peak_b = _peak_bytes(backward, dy, out[1])
        if gerr is not None:
            return GradeRow(name, None, None, None, False, "backward failed on the large case"), None
    where = [w for w, p in (("forward", peak_f), ("backward", peak_b)) if p >= DENSE_FRACTION * dense]
    back = f", {peak_b / 2**20:.2f} MB in backward" if backward is not None else ""
    note = (f"peak {peak_f / 2**20:.2f} MB in forward{back}; one {spec.dense_name} matrix is "
            f"{dense / 2**20:.2f} MB")
    if not where:
        return GradeRow(name, None, None, None, True, note), None
    text = (f"Your {' and '.join(where)} allocated {max(peak_f, peak_b) / 2**20:.2f} MB on a large layer, "
            f"the size of a {spec.dense_name} matrix ({dense / 2**20:.2f} MB; measured with tracemalloc): "
            "you formed a dense matrix — B @ A, the full gradient Gᵀ X (then projected), or a copy of W. "
            "The numbers can be right, but it costs O(N·d_in·d_out) time and d_in·d_out memory, which is what "
            "LoRA avoids. Keep every product on the rank-r side: H = X Aᵀ, then (s H) Bᵀ; "
            "dA = s (G B)ᵀ X, never Bᵀ (Gᵀ X).")
    return GradeRow(name, None, None, None, False, note), text


# --------------------------------------------------------------------------- the three specs


def _mat(rng, *shape):
    return rng.standard_normal(shape)


def _lora_args(rng, lead, d_in, d_out, r, s, zero_B=False, bias=True):
    return {"x": _mat(rng, *lead, d_in), "W": _mat(rng, d_out, d_in) / math.sqrt(d_in),
            "b": _mat(rng, d_out) if bias else None, "A": _mat(rng, r, d_in) / math.sqrt(d_in),
            "B": np.zeros((d_out, r)) if zero_B else _mat(rng, d_out, r), "scale": s}


def _label(args, r):
    return f"x {args['x'].shape}, r={r}, s={args['scale']}{', b=None' if args['b'] is None else ''}"


_ZERO_B = ("{g} is right at B = 0 but wrong at a random B. At B = 0 — LoRA's initialisation — "
           "the true dA = s (G B)ᵀ X is exactly 0 and the LoRA part of dX, s (G B) A, vanishes too, so a "
           "formula that is wrong by any term with a factor B (or that leaves that term out) agrees there. "
           "A gradient check at B = 0 cannot see this mistake; the grader uses a random non-zero B.")

_SHAPES_LINEAR = ("Shapes: x (..., d_in), W (d_out, d_in), A (r, d_in), B (d_out, r); H = X Aᵀ is (..., r) "
                  "and the branch s H Bᵀ is (..., d_out).")


def _linear_cases(rng):
    return [_Case(_label(a, r), a) for a, r in (
        (_lora_args(rng, (6,), 5, 4, 2, 2.5), 2),
        (_lora_args(rng, (2, 3), 5, 4, 3, 0.4), 3),
        (_lora_args(rng, (2, 4), 4, 4, 2, 1.7, bias=False), 2),   # square: A and B swapped still runs
    )] + [_Case("B = 0", _lora_args(rng, (6,), 5, 4, 2, 2.5, zero_B=True), zero_B=True)]


def _linear_big(rng):
    d, N, r = BIG["d"], BIG["N"], BIG["r"]
    return _Case("large", _lora_args(rng, (N,), d, d, r, 2.0)), d * d


def _linear_candidates(case, dy, ref_y, g):
    x, W, b, A, B, s = case.args.values()
    frozen = F.linear_forward(x, W, b)[0]
    lora = ref_y - frozen
    dx_frozen = F.linear_forward(dy, W.T)[0]                # G W
    dx_lora = g["dx"] - dx_frozen
    out = [("y", frozen, "y-no-lora"), ("y", frozen + lora / s, "y-s-missing"),
           ("y", frozen + lora * s, "y-s-twice"),
           ("dx", dx_frozen, "dx-no-lora"), ("dx", dx_frozen + dx_lora / s, "dx-s-missing"),
           ("dx", dx_frozen + dx_lora * s, "dx-s-twice"), ("dx", dx_lora, "dx-no-frozen")]
    if b is not None:
        out.append(("y", ref_y - b, "y-no-bias"))
    if x.shape[-1] == W.shape[0]:                           # square: X B A runs
        out.append(("y", frozen + s * ((x @ B) @ A), "y-swapped"))
    return out


_LINEAR_HINTS = {
    "zeroB": _ZERO_B,
    "y-no-lora": "y is X Wᵀ + b only: the LoRA branch s (X Aᵀ) Bᵀ is missing from the forward.",
    "y-s-missing": "y matches X Wᵀ + b + (X Aᵀ) Bᵀ: the scale s is missing from the forward's branch.",
    "y-s-twice": "y matches X Wᵀ + b + s² (X Aᵀ) Bᵀ: the scale s is applied twice in the forward.",
    "y-no-bias": "y is right except for the bias: add b (it is frozen, but still part of the output).",
    "y-swapped": "y matches X Wᵀ + b + s (X B) A: A and B are swapped. A (r, d_in) reads the input first: "
                 "H = X Aᵀ (..., r), then H Bᵀ with B (d_out, r).",
    "dx-no-lora": "dx is G W only: dX is missing the LoRA path s (G B) A. X feeds both the frozen path and "
                  "the branch, so dX is the sum of both (at B = 0 the branch's part is 0, which hides this).",
    "dx-s-missing": "dx matches G W + (G B) A: the scale s is missing from dX's LoRA path.",
    "dx-s-twice": "dx matches G W + s² (G B) A: the scale s is applied twice in dX's LoRA path.",
    "dx-no-frozen": "dx is s (G B) A only: the frozen path G W is missing. W is frozen (no dW), but X "
                    "still flows through it, so dX needs G W.",
}


def check_lora_linear(forward, backward=None, seed=0) -> GradeResult:
    """Grade a LoRA linear layer: ``forward(x, W, b, A, B, scale) -> (y, cache)`` and
    ``backward(dy, cache) -> (dx, dA, dB)``, the signatures of ``functional.lora_linear_forward``
    / ``lora_linear_backward`` (without dropout). ``backward=None`` grades the forward alone.

    Cases: x (6, 5), (2, 3, 5) and a square (2, 4, 4) layer without bias (b=None), r ∈ {2, 3},
    s ∈ {2.5, 0.4, 1.7}, random non-zero B, float64; one more at B = 0 (reported, not graded).
    Returns a ``GradeResult``. Raises TypeError if ``forward`` or ``backward`` is not callable.
    """
    spec = _Spec("check_lora_linear", ("dx", "dA", "dB"), {"dx": ("x",), "dA": ("A",), "dB": ("B",)},
                 F.lora_linear_forward, F.lora_linear_backward,
                 _linear_cases, _linear_big, _linear_candidates, _LINEAR_HINTS, _SHAPES_LINEAR,
                 "(d_out, d_in)")
    return _grade(spec, forward, backward, seed)


# ---- attention


def _attention_args(rng, lead, T, d, r, s, causal, zero_B=False):
    p = {k: _mat(rng, d, d) / math.sqrt(d) for k in ("Wq", "Wk", "Wv", "Wo")}
    for n in ("q", "v"):
        p[f"A{n}"] = _mat(rng, r, d) / math.sqrt(d)
        p[f"B{n}"] = np.zeros((d, r)) if zero_B else _mat(rng, d, r) / math.sqrt(r)
    return {"x": _mat(rng, *lead, T, d), "params": p, "scale": s, "causal": causal}


def _attention_cases(rng):
    cs = [(_attention_args(rng, (), 5, 6, 2, 2.5, False), 2),
          (_attention_args(rng, (2,), 4, 6, 3, 0.4, True), 3),
          (_attention_args(rng, (2, 2), 3, 4, 2, 1.7, False), 2)]
    out = [_Case(f"x {a['x'].shape}, r={r}, s={a['scale']}{', causal' if a['causal'] else ''}", a)
           for a, r in cs]
    return out + [_Case("B = 0", _attention_args(rng, (), 5, 6, 2, 2.5, False, zero_B=True), zero_B=True)]


def _attention_big(rng):
    d, N, r = BIG["d"], BIG["N"], BIG["r"]
    return _Case("large", _attention_args(rng, (1,), N, d, r, 2.0, False)), d * d


def _attention_candidates(case, dy, ref_y, g):
    c = lora_attention_forward(*case.args.values())[1]
    dO, (dq, dk, dv) = _attention_pieces(dy, c)
    (dxq, dxk, dxv), _ = _qv_backward(dq, dk, dv, c)
    out = [("dx", dxq + dxv, "dx-no-k"), ("dx", dxk + dxv, "dx-no-q"), ("dx", dxq + dxk, "dx-no-v")]
    # the frozen-only dX (no LoRA paths in q and v)
    p = c.params
    dx_frozen_qv = F.linear_forward(dq, p["Wq"].T)[0] + F.linear_forward(dv, p["Wv"].T)[0]
    out.append(("dx", dx_frozen_qv + dxk, "dx-no-lora"))
    # the attention core's backward with one step wrong: (dS, the factor of dq and dk, dv)
    dP = dO @ np.swapaxes(c.v, -1, -2)                     # dP = dO vᵀ
    dS = F.softmax_backward(dP, F.SoftmaxCache(c.P, -1))   # dS = P ⊙ (dP − rowsum(dP ⊙ P))
    inv_sqrt_d = 1.0 / math.sqrt(c.q.shape[-1])
    variants = {
        "softmax-rowsum": (c.P * dP, inv_sqrt_d, dv),      # dS = P ⊙ dP
        "no-sqrt-d": (dS, 1.0, dv),                        # dq = dS k, dk = dSᵀ q
        "dv-no-transpose": (dS, inv_sqrt_d, c.P @ dO),     # dv = P dO
    }
    for key, (dS2, f, dv2) in variants.items():
        dq2, dk2 = (dS2 @ c.k) * f, (np.swapaxes(dS2, -1, -2) @ c.q) * f
        (a, b_, cc), grads = _qv_backward(dq2, dk2, dv2, c)
        for name, val in zip(("dx", "dAq", "dBq", "dAv", "dBv"), (a + b_ + cc, *grads)):
            out.append((name, val, key))
    return out


_ATTENTION_HINTS = {
    "zeroB": _ZERO_B.replace("dA = s (G B)ᵀ X", "dA_q, dA_v (s (G B)ᵀ X with G the gradient at q or v)"),
    "dx-no-k": "dx misses the key path: x feeds q, k and v, so dX = dX_q + dX_k + dX_v. k has no adapter "
               "(no gradient of its own to return), but it still depends on x: add dk W_k.",
    "dx-no-q": "dx misses the query path: x feeds q, k and v, so dX sums all three.",
    "dx-no-v": "dx misses the value path: x feeds q, k and v, so dX sums all three.",
    "dx-no-lora": "dx is missing the LoRA paths of q and v (s (dq B_q) A_q and s (dv B_v) A_v): X feeds the "
                  "frozen projections and the branches.",
    "softmax-rowsum": "{g} matches a softmax backward without its row-sum term (dS = P ⊙ dP). The softmax "
                      "Jacobian is diag(p) − p pᵀ, so dS = P ⊙ (dP − Σ_u dP_u P_u), row by row.",
    "no-sqrt-d": "{g} matches a backward that forgot the 1/√d of the scores: S = q kᵀ / √d, so "
                 "dq = dS k / √d and dk = dSᵀ q / √d.",
    "dv-no-transpose": "{g} matches dv = P dO: O = P v, so dv = Pᵀ dO (every key's value collects the "
                       "gradient of the queries that read it).",
}


def check_lora_attention(forward, backward, seed=0) -> GradeResult:
    """Grade the attention block with LoRA on q and v: ``forward(x, params, scale, causal=False)
    -> (y, cache)`` (normally ``lora_attention_forward``) and ``backward(dy, cache) ->
    (dx, dAq, dBq, dAv, dBv)`` (the reference is ``lora_attention_backward``).

    Cases: x (5, 6), (2, 4, 6) causal and (2, 2, 3, 4), r ∈ {2, 3}, s ∈ {2.5, 0.4, 1.7}, random
    non-zero B_q, B_v, float64; one more at B = 0 (reported, not graded).
    """
    _check_callable("backward", backward)
    spec = _Spec("check_lora_attention", ("dx", "dAq", "dBq", "dAv", "dBv"),
                 {"dx": ("x",), "dAq": ("params", "Aq"), "dBq": ("params", "Bq"), "dAv": ("params", "Av"),
                  "dBv": ("params", "Bv")},
                 lora_attention_forward, lora_attention_backward, _attention_cases, _attention_big,
                 _attention_candidates, _ATTENTION_HINTS,
                 "Shapes: x (..., T, d); W_* (d, d); A_q, A_v (r, d); B_q, B_v (d, r); P (..., T, T).",
                 "(d, d)")
    return _grade(spec, forward, backward, seed)


# ---- embedding


def _embedding_args(rng, shape, V, d, r, s, zero_B=False):
    idx = rng.integers(0, V - 1, size=shape)          # id V-1 never occurs: its column of dA must be 0
    idx.reshape(-1)[:2] = idx.reshape(-1)[2]          # and some ids repeat (three times at least)
    return {"idx": idx, "W": _mat(rng, V, d), "A": _mat(rng, r, V),
            "B": np.zeros((d, r)) if zero_B else _mat(rng, d, r), "scale": s}


def _embedding_cases(rng):
    cs = [(_embedding_args(rng, (8,), 7, 4, 2, 2.5), 2), (_embedding_args(rng, (2, 5), 6, 3, 3, 0.4), 3),
          (_embedding_args(rng, (3, 4), 5, 5, 2, 1.7), 2)]
    out = [_Case(f"idx {a['idx'].shape} (repeats), V={a['W'].shape[0]}, r={r}, s={a['scale']}", a)
           for a, r in cs]
    return out + [_Case("B = 0", _embedding_args(rng, (8,), 7, 4, 2, 2.5, zero_B=True), zero_B=True)]


def _embedding_big(rng):
    V = d = BIG["d"]
    return _Case("large", _embedding_args(rng, (BIG["N"],), V, d, BIG["r"], 2.0)), V * d


def _embedding_candidates(case, dy, ref_y, g):
    idx, W, A, B, s = case.args.values()
    frozen = W[idx]
    lora = ref_y - frozen
    sGB = (dy.reshape(-1, dy.shape[-1]) @ B) * s
    lost = np.zeros_like(g["dA"])
    lost[:, idx.reshape(-1)] += sGB.T                  # buffered: a repeated id keeps one row only
    return [("y", frozen, "y-no-lora"), ("y", frozen + lora / s, "y-s-missing"),
            ("y", frozen + lora * s, "y-s-twice"), ("dA", lost, "dA-repeats")]


_EMBEDDING_HINTS = {
    "zeroB": _ZERO_B.replace("dA = s (G B)ᵀ X", "dA (a scatter-add of s G B)").replace(
        " and the LoRA part of dX, s (G B) A, vanishes too", ""),
    "y-no-lora": "y is W[idx] only: the LoRA branch s H Bᵀ with H = A[:, idx]ᵀ is missing.",
    "y-s-missing": "y matches W[idx] + H Bᵀ: the scale s is missing from the forward's branch.",
    "y-s-twice": "y matches W[idx] + s² H Bᵀ: the scale s is applied twice in the forward.",
    "dA-repeats": "dA is right except where an id repeats: `dA[:, idx] += ...` is buffered, so a column "
                  "looked up k times keeps one contribution instead of the sum of k. Use a scatter-add: "
                  "`np.add.at(dA.T, idx.ravel(), rows)` (repeated indices add up).",
}


def check_lora_embedding(forward, backward=None, seed=0) -> GradeResult:
    """Grade a LoRA embedding: ``forward(idx, W, A, B, scale) -> (y, cache)`` and
    ``backward(dy, cache) -> (dA, dB)``, the signatures of ``functional.lora_embedding_forward``
    / ``lora_embedding_backward``, with A (r, V), B (d, r). ``backward=None`` grades the forward.

    Cases: idx (8,), (2, 5), (3, 4) with repeated ids and an id that never occurs, s ∈ {2.5, 0.4,
    1.7}, random non-zero B, float64; one more at B = 0 (reported, not graded).
    """
    spec = _Spec("check_lora_embedding", ("dA", "dB"), {"dA": ("A",), "dB": ("B",)},
                 F.lora_embedding_forward, F.lora_embedding_backward,
                 _embedding_cases, _embedding_big, _embedding_candidates, _EMBEDDING_HINTS,
                 "Shapes: idx (...) ints, W (V, d), A (r, V), B (d, r); H = A[:, idx]ᵀ is (..., r).",
                 "(V, d)")
    return _grade(spec, forward, backward, seed)

"""The assignments' grader: reference solutions pass every check, and every diagnosed mistake,
planted on purpose, fails with its own hint."""

import math

import numpy as np
import pytest

from lora_np import functional as F
from lora_np import grading as G


def _hints(result):
    return " | ".join(result.hints)


# ------------------------------------------------------------------- references pass


@pytest.mark.parametrize("check,fwd,bwd", [
    (G.check_lora_linear, F.lora_linear_forward, F.lora_linear_backward),
    (G.check_lora_attention, G.lora_attention_forward, G.lora_attention_backward),
    (G.check_lora_embedding, F.lora_embedding_forward, F.lora_embedding_backward),
], ids=["linear", "attention", "embedding"])
def test_reference_passes_every_check(check, fwd, bwd):
    for seed in (0, 3):
        r = check(fwd, bwd, seed=seed)
        assert r.passed, str(r)
        assert r.hints == []
        names = [row.name for row in r.rows]
        assert "float32 in, float32 out" in names and "inputs unchanged" in names
        for row in r.rows:
            if row.max_diff is not None and row.name != "y (forward)":
                assert 0 < row.max_diff < 1e-6


def test_result_prints_table_and_hints():
    r = G.check_lora_linear(F.lora_linear_forward, F.lora_linear_backward)
    text = str(r)
    assert text == repr(r)
    for word in ("exact", "close", "max difference", "dA", "dB", "dx", "PASSED", "x (2, 3, 5)"):
        assert word in text

    class P:                                    # IPython's pretty printer
        def text(self, t):
            self.out = t
    p = P()
    r._repr_pretty_(p, False)
    assert p.out == text
    assert r.row("dA").passed and r.row("dA").close is True
    with pytest.raises(KeyError):
        r.row("nope")


def test_forward_alone_and_argument_checks():
    r = G.check_lora_linear(F.lora_linear_forward)
    assert r.passed and [row.name for row in r.rows][0] == "y (forward)"
    assert "dA" not in [row.name for row in r.rows]
    with pytest.raises(TypeError, match="forward"):
        G.check_lora_linear("not a function", F.lora_linear_backward)
    with pytest.raises(TypeError, match="backward"):
        G.check_lora_linear(F.lora_linear_forward, 3)
    with pytest.raises(TypeError, match="backward"):
        G.check_lora_attention(G.lora_attention_forward, None)
    with pytest.raises(TypeError, match="seed"):
        G.check_lora_embedding(F.lora_embedding_forward, seed=1.5)


def test_not_implemented_propagates():
    def todo(*args):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError):
        G.check_lora_linear(todo, todo)
    with pytest.raises(NotImplementedError):
        G.check_lora_linear(F.lora_linear_forward, todo)


def test_attention_reference_matches_the_module():
    """lora_attention_forward is the single-head block MultiHeadAttention computes (no biases)."""
    import lora_np
    rng = np.random.default_rng(0)
    d, r, s = 6, 2, 2.5
    mha = lora_np.MultiHeadAttention(d, 1, rng=0)
    for lin in (mha.q_proj, mha.k_proj, mha.v_proj, mha.o_proj):
        lin.b[...] = 0
    m = lora_np.add_lora(mha, ["q_proj", "v_proj"], r=r, alpha=s * r, rng=0)
    lora_np.randomize_lora(m, rng=1)
    p = {"Wq": m.q_proj.W, "Wk": m.k_proj.W, "Wv": m.v_proj.W, "Wo": m.o_proj.W,
         "Aq": m.q_proj.A, "Bq": m.q_proj.B, "Av": m.v_proj.A, "Bv": m.v_proj.B}
    x = rng.standard_normal((2, 4, d))
    y, _ = G.lora_attention_forward(x, p, m.q_proj.scale)
    np.testing.assert_allclose(y, m(x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------- planted mistakes: linear

def _fwd(s_power=1, lora=True, bias=True, swap=False, flatten=False, inplace=False, dense=False, f32=False):
    def forward(x, W, b, A, B, scale):
        xx = x.reshape(-1, x.shape[-1]) if flatten else x
        y = xx @ W.T
        if bias and b is not None:
            y = y + b
        if lora:
            if dense:
                y = y + xx @ (scale * (B @ A)).T
            elif swap:
                y = y + scale ** s_power * ((xx @ B) @ A)
            else:
                y = y + scale ** s_power * ((xx @ A.T) @ B.T)
        if inplace:
            A *= 1.0
            A += 0.5
        if f32:
            y = y.astype(np.float64)
        return y, (x, W, A, B, scale)
    return forward


def _bwd(dA_mode="ok", dB_mode="ok", dx_mode="ok", order="ok", dense=False, inplace=False, f32=False):
    def backward(dy, cache):
        x, W, A, B, s = cache
        G2, X2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        H = X2 @ A.T
        dB = s * G2.T @ H
        if dB_mode == "nos":
            dB = G2.T @ H
        elif dB_mode == "twice":
            dB = s * s * G2.T @ H
        elif dB_mode == "T":
            dB = s * H.T @ G2
        dA = s * (G2 @ B).T @ X2
        if dA_mode == "nos":
            dA = (G2 @ B).T @ X2
        elif dA_mode == "T":
            dA = s * X2.T @ (G2 @ B)
        elif dA_mode == "B0":                    # wrong by a term with a factor B: right only at B = 0
            dA = 3.0 * s * (G2 @ B).T @ X2
        elif dA_mode == "zeros":
            dA = np.zeros_like(A)
        if dense:
            dA = s * B.T @ (G2.T @ X2)
        lora = s * (G2 @ B) @ A
        dx = G2 @ W + (lora if dx_mode == "ok" else lora / s if dx_mode == "nos" else 0)
        dx = dx.reshape(x.shape)
        if inplace:
            dy *= 2.0
        if f32:
            dA = dA.astype(np.float64)
        return (dx, dB, dA) if order == "swap" else (dx, dA, dB)
    return backward


def _planted_linear(fwd, bwd):
    r = G.check_lora_linear(fwd, bwd)
    assert not r.passed, str(r)
    return r


def test_planted_correct_rewrite_passes():
    """The planted mistakes' own correct form passes (so each mistake below is the only change)."""
    r = G.check_lora_linear(_fwd(), _bwd())
    assert r.passed, str(r)


@pytest.mark.parametrize("kw,row,needle", [
    (dict(s_power=0), "y (forward)", "scale s is missing from the forward"),
    (dict(s_power=2), "y (forward)", "applied twice in the forward"),
    (dict(lora=False), "y (forward)", "LoRA branch s (X Aᵀ) Bᵀ is missing"),
    (dict(swap=True), "y (forward)", "A and B are swapped"),
    (dict(flatten=True), "y (forward)", "leading dimensions were flattened"),
])
def test_planted_forward_mistakes(kw, row, needle):
    r = _planted_linear(_fwd(**kw), _bwd())
    assert not r.row(row).passed
    assert needle in _hints(r), str(r)


def test_swapped_forward_raises_on_a_non_square_layer_and_says_the_shapes():
    r = _planted_linear(_fwd(swap=True), None)
    assert "forward raised ValueError" in _hints(r) and "A (r, d_in)" in _hints(r)


@pytest.mark.parametrize("kw,row,needle", [
    (dict(dA_mode="nos"), "dA", "scale s is missing from dA"),
    (dict(dB_mode="nos"), "dB", "scale s is missing from dB"),
    (dict(dB_mode="twice"), "dB", "applied twice in dB"),
    (dict(dA_mode="T"), "dA", "transpose of"),
    (dict(dB_mode="T"), "dB", "transpose of"),
    (dict(order="swap"), "dA", "which is dB's shape"),
    (dict(dx_mode="none"), "dx", "dX is missing the LoRA path"),
    (dict(dx_mode="nos"), "dx", "scale s is missing from dX's LoRA path"),
    (dict(dA_mode="B0"), "dA", "right at B = 0 but wrong at a random B"),
    (dict(dA_mode="zeros"), "dA", "dA is all zeros"),
])
def test_planted_backward_mistakes(kw, row, needle):
    r = _planted_linear(_fwd(), _bwd(**kw))
    assert not r.row(row).passed
    assert needle in _hints(r), str(r)
    assert r.row("y (forward)").passed


def test_right_only_at_B0_is_invisible_at_B0():
    """The planted dA (3x the true one) agrees at B = 0: the report's B = 0 line says close."""
    r = _planted_linear(_fwd(), _bwd(dA_mode="B0"))
    assert "dA yes" in r.info
    assert r.row("dA").max_diff > 1e-3


def test_planted_dense_BA_is_correct_but_flagged():
    r = _planted_linear(_fwd(dense=True), _bwd(dense=True))
    for name in ("y (forward)", "dx", "dA", "dB"):
        assert r.row(name).passed                # the numbers are right
    row = r.row("never forms a (d_out, d_in) array")
    assert not row.passed
    assert "B @ A" in _hints(r) and "O(N·d_in·d_out)" in _hints(r) and "tracemalloc" in _hints(r)


def test_planted_dense_only_in_backward():
    r = _planted_linear(_fwd(), _bwd(dense=True))
    assert "Your backward allocated" in _hints(r)


def test_planted_inplace_mistakes():
    r = _planted_linear(_fwd(inplace=True), _bwd())
    assert not r.row("inputs unchanged").passed and "forward changed A" in _hints(r)
    r = _planted_linear(_fwd(), _bwd(inplace=True))
    assert "backward changed dy" in _hints(r)


def test_planted_dtype_mistakes():
    r = _planted_linear(_fwd(f32=True), _bwd())
    assert not r.row("float32 in, float32 out").passed and "y is float64" in _hints(r)
    r = _planted_linear(_fwd(), _bwd(f32=True))
    assert "dA is float64" in _hints(r)


def test_wrong_return_structure():
    r = _planted_linear(lambda *a: F.lora_linear_forward(*a)[0], None)
    assert "expected the pair (y, cache)" in _hints(r)
    r = _planted_linear(F.lora_linear_forward, lambda dy, c: F.lora_linear_backward(dy, c)[:2])
    assert "expected the tuple (dx, dA, dB)" in _hints(r)


# ------------------------------------------------------ planted mistakes: attention


def _att_bwd(mode):
    """The reference backward with one planted mistake (written out, as a student would)."""
    def backward(dy, c):
        p, s = c.params, c.scale
        d = c.q.shape[-1]
        dO = dy @ p["Wo"]
        dP = dO @ np.swapaxes(c.v, -1, -2)
        dv = (c.P if mode == "dv" else np.swapaxes(c.P, -1, -2)) @ dO
        dS = c.P * dP if mode == "rowsum" else c.P * (dP - (dP * c.P).sum(-1, keepdims=True))
        f = 1.0 if mode == "sqrt" else 1.0 / math.sqrt(d)
        dq, dk = dS @ c.k * f, np.swapaxes(dS, -1, -2) @ c.q * f
        sq, sv = (1.0 if mode == "nos" else s), s

        def lora(g, H, W, A, B, ss):
            G2, H2, X2 = g.reshape(-1, d), H.reshape(-1, H.shape[-1]), c.x.reshape(-1, d)
            return g @ W + ss * (g @ B) @ A, ss * (G2 @ B).T @ X2, ss * G2.T @ H2
        dxq, dAq, dBq = lora(dq, c.Hq, p["Wq"], p["Aq"], p["Bq"], sq)
        dxv, dAv, dBv = lora(dv, c.Hv, p["Wv"], p["Av"], p["Bv"], sv)
        dx = dxq + dxv + (0 if mode == "nok" else dk @ p["Wk"])
        if mode == "swapqv":
            return dx, dAv, dBv, dAq, dBq
        return dx, dAq, dBq, dAv, dBv
    return backward


def test_attention_planted_correct_rewrite_passes():
    assert G.check_lora_attention(G.lora_attention_forward, _att_bwd("ok")).passed


@pytest.mark.parametrize("mode,row,needle", [
    ("rowsum", "dAq", "without its row-sum term"),
    ("sqrt", "dBq", "forgot the 1/√d"),
    ("dv", "dAv", "dv = Pᵀ dO"),
    ("nok", "dx", "misses the key path"),
    ("nos", "dAq", "scale s is missing from dAq"),
    ("swapqv", "dAq", "holds the values of dAv"),
])
def test_attention_planted_mistakes(mode, row, needle):
    r = G.check_lora_attention(G.lora_attention_forward, _att_bwd(mode))
    assert not r.passed and not r.row(row).passed
    assert needle in _hints(r), str(r)


def test_attention_dense_flagged():
    def fwd(x, params, scale, causal=False):
        p = dict(params)
        p["Wq"] = p["Wq"] + scale * p["Bq"] @ p["Aq"]       # merged: right, but a (d, d) array per call
        p["Bq"] = np.zeros_like(p["Bq"])
        y, c = G.lora_attention_forward(x, p, scale, causal)
        return y, c
    r = G.check_lora_attention(fwd, G.lora_attention_backward)
    assert r.row("y (forward)").passed
    assert not r.row("never forms a (d, d) array").passed and "B @ A" in _hints(r)


# ------------------------------------------------------ planted mistakes: embedding


def _emb_bwd(mode):
    def backward(dy, c):
        idx, H, B, V, s = c
        G2, ids = dy.reshape(-1, dy.shape[-1]), idx.reshape(-1)
        dB = (1.0 if mode == "nos" else s) * G2.T @ H.reshape(-1, H.shape[-1])
        dA = np.zeros((B.shape[1], V), dtype=np.float64 if mode == "f64" else dy.dtype)
        if mode == "buffered":
            dA[:, ids] += s * (G2 @ B).T
        else:
            np.add.at(dA.T, ids, s * (G2 @ B))
        if mode == "T":
            dA = dA.T
        return dA, dB
    return backward


def test_embedding_planted_correct_rewrite_passes():
    assert G.check_lora_embedding(F.lora_embedding_forward, _emb_bwd("ok")).passed


@pytest.mark.parametrize("mode,row,needle", [
    ("buffered", "dA", "dA[:, idx] += ...` is buffered"),
    ("nos", "dB", "scale s is missing from dB"),
    ("T", "dA", "transpose of"),
    ("f64", "float32 in, float32 out", "dA is float64"),
])
def test_embedding_planted_mistakes(mode, row, needle):
    r = G.check_lora_embedding(F.lora_embedding_forward, _emb_bwd(mode))
    assert not r.passed and not r.row(row).passed
    assert needle in _hints(r), str(r)


def test_embedding_forward_mistakes():
    def fwd(idx, W, A, B, scale):
        H = A.T[idx]
        return W[idx] + (H @ B.T), None                        # s missing
    r = G.check_lora_embedding(fwd)
    assert "scale s is missing from the forward" in _hints(r)

    def dense(idx, W, A, B, scale):
        return W[idx] + F.lora_delta_weight(A, B, scale).T[idx], None
    r = G.check_lora_embedding(dense)
    assert r.row("y (forward)").passed and not r.row("never forms a (V, d) array").passed


@pytest.mark.parametrize("spec_big,fwd,bwd", [
    (G._linear_big, F.lora_linear_forward, F.lora_linear_backward),
    (G._attention_big, G.lora_attention_forward, G.lora_attention_backward),
    (G._embedding_big, F.lora_embedding_forward, F.lora_embedding_backward),
], ids=["linear", "attention", "embedding"])
def test_memory_check_has_a_wide_margin(spec_big, fwd, bwd):
    """The reference code peaks well below the flag (half of one dense matrix); B @ A reaches a whole one."""
    case, entries = spec_big(np.random.default_rng(0))
    (out, err), peak_f = G._peak_bytes(fwd, *case.args.values())
    assert err is None
    (_, err), peak_b = G._peak_bytes(bwd, np.ones_like(out[0]), out[1])
    assert err is None
    assert max(peak_f, peak_b) < 0.15 * entries * 8 < G.DENSE_FRACTION * entries * 8
    p = case.args.get("params", case.args)
    A, B = p.get("Aq", p.get("A")), p.get("Bq", p.get("B"))
    (_, err), peak_dense = G._peak_bytes(lambda: B @ A)
    assert err is None and peak_dense >= entries * 8


def test_forward_that_cannot_take_b_none():
    def fwd(x, W, b, A, B, scale):
        return x @ W.T + b + (scale * (x @ A.T)) @ B.T, None
    r = G.check_lora_linear(fwd)
    assert not r.row("y (forward)").passed
    assert "forward raised TypeError" in _hints(r) and "b=None" in _hints(r)

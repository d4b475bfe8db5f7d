"""Tests for lora_np.functional: every forward/backward pair against finite differences, the
known answers (plain formulas), numerical stability, and dtype preservation."""

import math

import numpy as np
import pytest
from conftest import assert_grad_close

import lora_np.functional as F

# ---------------------------------------------------------------------------------------------
# finite-difference checks: one test per (op, shape) case, each gradient checked on its own
# ---------------------------------------------------------------------------------------------


def _dout(out, seed=7):
    return np.random.default_rng(seed).standard_normal(out.shape)


@pytest.mark.parametrize("x_shape", [(4, 6), (2, 3, 6), (1, 6)], ids=["2d", "3d", "batch1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_gradients(rng, x_shape, bias):
    x = rng.standard_normal(x_shape)
    W = rng.standard_normal((5, 6))
    b = rng.standard_normal(5) if bias else None
    y, cache = F.linear_forward(x, W, b)
    dout = _dout(y)
    dx, dW, db = F.linear_backward(dout, cache)
    f = lambda: F.linear_forward(x, W, b)[0]  # noqa: E731
    assert_grad_close("dx", dx, f, x, dout)
    assert_grad_close("dW", dW, f, W, dout)
    if bias:
        assert_grad_close("db", db, f, b, dout)
    else:
        assert db is None


# (d_in, d_out, r, x_shape): r = 1, r = min(d_in, d_out) (both orientations), 2-D, 3-D, batch of 1
LORA_SHAPES = [
    (6, 5, 1, (4, 6)),
    (6, 5, 5, (2, 3, 6)),
    (4, 7, 4, (3, 4)),
    (6, 5, 2, (1, 6)),
    (6, 5, 3, (1, 1, 6)),
]


@pytest.mark.parametrize("d_in, d_out, r, x_shape", LORA_SHAPES,
                         ids=[f"din{a}-dout{b}-r{c}-x{'x'.join(map(str, s))}" for a, b, c, s in LORA_SHAPES])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "dropoutmask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lora_linear_gradients(rng, d_in, d_out, r, x_shape, with_mask, bias):
    x = rng.standard_normal(x_shape)
    W = rng.standard_normal((d_out, d_in))
    b = rng.standard_normal(d_out) if bias else None
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))                  # random, non-zero: not the B = 0 init
    scale = 2.5                                          # != 1
    mask = None
    if with_mask:                                        # inverted dropout, p = 0.25
        mask = (rng.random(x_shape) < 0.75) / 0.75
        mask.flat[0], mask.flat[-1] = 0.0, 1 / 0.75      # at least one dropped, one kept entry
    y, cache = F.lora_linear_forward(x, W, b, A, B, scale, mask)
    dout = _dout(y)
    dx, dA, dB = F.lora_linear_backward(dout, cache)
    f = lambda: F.lora_linear_forward(x, W, b, A, B, scale, mask)[0]  # noqa: E731
    assert_grad_close("dx", dx, f, x, dout)
    assert_grad_close("dA", dA, f, A, dout)
    assert_grad_close("dB", dB, f, B, dout)


def _away_from_zero(rng, shape, low=0.1):
    """Random values with |x| >= low, so relu's kink at 0 is never within h of a sample."""
    return rng.uniform(low, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)


@pytest.mark.parametrize("name", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (1, 4)], ids=["2d", "3d", "batch1"])
def test_activation_gradients(rng, name, shape):
    fwd, bwd = F.ACTIVATIONS[name]
    x = _away_from_zero(rng, shape)
    y, cache = fwd(x)
    dout = _dout(y)
    dx = bwd(dout, cache)
    assert_grad_close(f"{name} dx", dx, lambda: fwd(x)[0], x, dout)


@pytest.mark.parametrize("shape, axis", [((4, 6), -1), ((2, 3, 5), -1), ((2, 3, 5), 1), ((1, 4), -1)],
                         ids=["2d", "3d", "3d-axis1", "batch1"])
def test_softmax_gradients(rng, shape, axis):
    x = 2.0 * rng.standard_normal(shape)
    p, cache = F.softmax_forward(x, axis=axis)
    dout = _dout(p)
    dx = F.softmax_backward(dout, cache)
    assert_grad_close("softmax dx", dx, lambda: F.softmax_forward(x, axis=axis)[0], x, dout)


# leading dims: none, (batch,), (batch, heads), (1, 1) ; T tokens ; d_head
ATTN_SHAPES = [(), (2,), (2, 3), (1, 1)]


@pytest.mark.parametrize("lead", ATTN_SHAPES, ids=["noleading", "batch", "batch-heads", "ones"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_attention_gradients(rng, lead, causal):
    T, d = 4, 3
    q, k, v = (rng.standard_normal(lead + (T, d)) for _ in range(3))
    out, cache = F.attention_forward(q, k, v, causal=causal)
    dout = _dout(out)
    dq, dk, dv = F.attention_backward(dout, cache)
    f = lambda: F.attention_forward(q, k, v, causal=causal)[0]  # noqa: E731
    assert_grad_close("dq", dq, f, q, dout)
    assert_grad_close("dk", dk, f, k, dout)
    assert_grad_close("dv", dv, f, v, dout)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (1, 6)], ids=["2d", "3d", "batch1"])
def test_layer_norm_gradients(rng, shape):
    x = 1.5 * rng.standard_normal(shape) + 0.3
    gamma = 1.0 + 0.5 * rng.standard_normal(shape[-1])
    beta = 0.5 * rng.standard_normal(shape[-1])
    y, cache = F.layer_norm_forward(x, gamma, beta)
    dout = _dout(y)
    dx, dgamma, dbeta = F.layer_norm_backward(dout, cache)
    f = lambda: F.layer_norm_forward(x, gamma, beta)[0]  # noqa: E731
    assert_grad_close("dx", dx, f, x, dout)
    assert_grad_close("dgamma", dgamma, f, gamma, dout)
    assert_grad_close("dbeta", dbeta, f, beta, dout)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2), (1, 1)], ids=["2d", "3d", "single"])
def test_mse_loss_gradient(rng, shape):
    pred, target = rng.standard_normal(shape), rng.standard_normal(shape)
    loss, dpred = F.mse_loss(pred, target)
    assert isinstance(loss, float)
    assert_grad_close("dpred", dpred, lambda: F.mse_loss(pred, target)[0], pred)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (1, 3)], ids=["2d", "3d", "batch1"])
def test_cross_entropy_gradient(rng, shape):
    logits = 2.0 * rng.standard_normal(shape)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    loss, dlogits = F.cross_entropy_loss(logits, labels)
    assert isinstance(loss, float)
    assert_grad_close("dlogits", dlogits, lambda: F.cross_entropy_loss(logits, labels)[0], logits)


# --- the base weight's gradients when asked for (a frozen W skips them) ------------------------


@pytest.mark.parametrize("need_dW, need_db", [(False, False), (False, True), (True, False)])
def test_linear_backward_skips_what_is_not_needed(rng, need_dW, need_db):
    x, W, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    y, cache = F.linear_forward(x, W, b)
    G = _dout(y)
    dx_all, dW_all, db_all = F.linear_backward(G, cache)
    if not need_dW:
        cache = cache._replace(x=None)                 # a frozen layer keeps no input
    dx, dW, db = F.linear_backward(G, cache, need_dW=need_dW, need_db=need_db)
    np.testing.assert_array_equal(dx, dx_all)
    assert (dW is None) == (not need_dW) and (db is None) == (not need_db)
    if need_dW:
        np.testing.assert_array_equal(dW, dW_all)
    if need_db:
        np.testing.assert_array_equal(db, db_all)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "dropoutmask"])
def test_lora_linear_backward_gives_dW_and_db_when_asked(rng, with_mask):
    """After unfreeze() the base W, b train too: dW = Gᵀ X (the whole X, not X ⊙ mask), db = Σ G."""
    x, W, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    A, B, s = rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), 2.5
    mask = (rng.random(x.shape) < 0.75) / 0.75 if with_mask else None
    y, cache = F.lora_linear_forward(x, W, b, A, B, s, mask)
    dout = _dout(y)
    three = F.lora_linear_backward(dout, cache)
    assert len(three) == 3                                  # the contract: (dx, dA, dB)
    dx, dA, dB, dW, db = F.lora_linear_backward(dout, cache, need_dW=True, need_db=True)
    for got, want in zip((dx, dA, dB), three):
        np.testing.assert_array_equal(got, want)
    f = lambda: F.lora_linear_forward(x, W, b, A, B, s, mask)[0]  # noqa: E731
    assert_grad_close("dW", dW, f, W, dout)
    assert_grad_close("db", db, f, b, dout)
    assert F.lora_linear_backward(dout, cache, need_db=True)[3] is None


def test_lora_delta_weight_is_s_B_A_and_keeps_the_dtype(rng):
    A, B = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    np.testing.assert_allclose(F.lora_delta_weight(A, B, 1.5), 1.5 * B @ A, rtol=1e-15)
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    assert F.lora_delta_weight(A32, B32, 1.5).dtype == np.float32   # s cast first: no promotion


# ---------------------------------------------------------------------------------------------
# known answers: the plain formulas
# ---------------------------------------------------------------------------------------------


def test_lora_linear_forward_is_the_plain_formula(rng):
    x, W, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    A, B, s = rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), 1.75
    y, _ = F.lora_linear_forward(x, W, b, A, B, s)
    expected = x @ W.T + b + s * (x @ A.T) @ B.T
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)
    # and it is the linear layer with the merged weight W + s B A
    np.testing.assert_allclose(y, F.linear_forward(x, W + s * B @ A, b)[0], rtol=1e-12, atol=1e-12)


def test_lora_gradients_are_the_full_gradient_projected_onto_the_factors(rng):
    """dB = s (dL/dW) Aᵀ and dA = s Bᵀ (dL/dW), with dL/dW the gradient of a plain linear
    layer whose weight is the merged W + s B A."""
    x, W, b = rng.standard_normal((7, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    A, B, s = rng.standard_normal((3, 6)), rng.standard_normal((5, 3)), 0.6
    y, cache = F.lora_linear_forward(x, W, b, A, B, s)
    G = rng.standard_normal(y.shape)
    dx, dA, dB = F.lora_linear_backward(G, cache)
    dx_full, dW_full, _ = F.linear_backward(G, F.linear_forward(x, W + s * B @ A, b)[1])
    np.testing.assert_allclose(dB, s * dW_full @ A.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dA, s * B.T @ dW_full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_full, rtol=1e-12, atol=1e-12)


def test_linear_backward_known_answer(rng):
    x, W, b = rng.standard_normal((2, 4, 3)), rng.standard_normal((5, 3)), rng.standard_normal(5)
    G = rng.standard_normal((2, 4, 5))
    dx, dW, db = F.linear_backward(G, F.linear_forward(x, W, b)[1])
    np.testing.assert_allclose(dW, np.einsum("nto,nti->oi", G, x), rtol=1e-13)
    np.testing.assert_allclose(db, G.sum(axis=(0, 1)), rtol=1e-13)
    np.testing.assert_allclose(dx, G @ W, rtol=1e-13)


def test_gelu_matches_the_tanh_formula():
    x = np.linspace(-6, 6, 101)
    y, _ = F.gelu_forward(x)
    expected = np.array([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
                         for v in x])
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-15)
    assert F.gelu_forward(np.array([0.0]))[0][0] == 0.0


def test_relu_and_tanh_known_values():
    x = np.array([-2.0, -0.5, 0.5, 3.0])
    np.testing.assert_array_equal(F.relu_forward(x)[0], [0.0, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(F.tanh_forward(x)[0], np.tanh(x))
    # relu's kink gets gradient 0 (documented choice)
    y, cache = F.relu_forward(np.array([0.0, 1.0]))
    np.testing.assert_array_equal(F.relu_backward(np.ones(2), cache), [0.0, 1.0])


def test_softmax_sums_to_one_and_is_stable_for_huge_logits():
    x = np.array([[1e4, 0.0, -1e4], [800.0, 799.0, 0.0], [1e300, 1e300, 1e300]])
    p, _ = F.softmax_forward(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
    e = 1.0 / (1.0 + math.exp(-1.0))
    np.testing.assert_allclose(p[1], [e, 1 - e, 0.0], rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(p[2], [1 / 3] * 3, rtol=1e-15)
    # shift invariance: softmax(x + c) = softmax(x)
    z = np.array([0.3, -1.2, 2.0])
    np.testing.assert_allclose(F.softmax_forward(z + 1e5)[0], F.softmax_forward(z)[0], rtol=1e-10)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4 - 2.0]])
    labels = np.array([0, 2])
    loss, dlogits = F.cross_entropy_loss(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    # row 0: log p = 0 exactly; row 1: −log p = log(1 + e²)
    np.testing.assert_allclose(loss, math.log1p(math.exp(2.0)) / 2, rtol=1e-12)
    p1 = np.array([0.0, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])
    np.testing.assert_allclose(dlogits[1], (p1 - [0, 0, 1]) / 2, rtol=1e-12, atol=1e-300)


def test_cross_entropy_known_value():
    logits = np.array([[0.0, 0.0, 0.0, 0.0]])
    loss, d = F.cross_entropy_loss(logits, np.array([2]))
    assert loss == pytest.approx(math.log(4), rel=1e-15)
    np.testing.assert_allclose(d, [[0.25, 0.25, -0.75, 0.25]], rtol=1e-15)


def test_mse_known_value():
    loss, d = F.mse_loss(np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0]))
    assert loss == pytest.approx((0 + 4 + 9) / 3, rel=1e-15)
    np.testing.assert_allclose(d, [0.0, 4 / 3, 2.0], rtol=1e-15)


def test_layer_norm_known_answer():
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    y, _ = F.layer_norm_forward(x, np.ones(4), np.zeros(4), eps=0.0)
    xc = x - 3.0
    np.testing.assert_allclose(y, xc / math.sqrt((xc**2).mean()), rtol=1e-14)
    np.testing.assert_allclose(y.mean(), 0.0, atol=1e-15)


def test_attention_matches_the_plain_formula(rng):
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    out, _ = F.attention_forward(q, k, v, causal=True)
    for n in range(2):
        S = q[n] @ k[n].T / math.sqrt(3)
        S[np.triu_indices(4, 1)] = -np.inf
        P = np.exp(S - S.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(out[n], P @ v[n], rtol=1e-13, atol=1e-14)
    # the first query can only see the first key: its output is v[0] exactly
    np.testing.assert_array_equal(out[:, 0], v[:, 0])


@pytest.mark.parametrize("future", [1, 2, 3])
def test_causal_attention_blocks_the_future(rng, future):
    """Changing token `future` (its q, k and v) changes no output before it."""
    q, k, v = (rng.standard_normal((2, 3, 4, 5)) for _ in range(3))
    out, _ = F.attention_forward(q, k, v, causal=True)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[..., future, :] += 10 * rng.standard_normal(a[..., future, :].shape)
    out2, _ = F.attention_forward(q2, k2, v2, causal=True)
    np.testing.assert_array_equal(out2[..., :future, :], out[..., :future, :])
    assert not np.allclose(out2[..., future, :], out[..., future, :])
    # without the mask the past does see the change
    a, _ = F.attention_forward(q, k, v)
    b, _ = F.attention_forward(q2, k2, v2)
    assert not np.allclose(a[..., :future, :], b[..., :future, :])


def test_masked_attention_probabilities_are_exactly_zero(rng):
    q, k, v = (rng.standard_normal((3, 4)) for _ in range(3))
    _, cache = F.attention_forward(q, k, v, causal=True)
    assert np.all(cache.P[np.triu_indices(3, 1)] == 0.0)
    np.testing.assert_allclose(cache.P.sum(axis=-1), 1.0, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# purity and dtype
# ---------------------------------------------------------------------------------------------


def test_forward_and_backward_do_not_change_their_inputs(rng):
    x, W, b = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal(2)
    A, B = rng.standard_normal((1, 4)), rng.standard_normal((2, 1))
    mask = (rng.random((3, 4)) < 0.5) * 2.0
    copies = [a.copy() for a in (x, W, b, A, B, mask)]
    y, cache = F.lora_linear_forward(x, W, b, A, B, 3.0, mask)
    dy = rng.standard_normal(y.shape)
    dy0 = dy.copy()
    F.lora_linear_backward(dy, cache)
    for a, c in zip((x, W, b, A, B, mask, dy), copies + [dy0]):
        np.testing.assert_array_equal(a, c)


def _float32_cases(rng):
    f = np.float32
    x = rng.standard_normal((2, 3, 4)).astype(f)
    ids = np.array([[0, 2, 2], [4, 0, 1]])
    W, b = rng.standard_normal((5, 4)).astype(f), rng.standard_normal(5).astype(f)
    A, B = rng.standard_normal((2, 4)).astype(f), rng.standard_normal((5, 2)).astype(f)
    g, be = rng.standard_normal(4).astype(f), rng.standard_normal(4).astype(f)
    mask = ((rng.random(x.shape) < 0.8) / 0.8).astype(f)
    return {
        "linear": (lambda: F.linear_forward(x, W, b), F.linear_backward),
        "lora_linear": (lambda: F.lora_linear_forward(x, W, b, A, B, 1.7, mask), F.lora_linear_backward),
        "relu": (lambda: F.relu_forward(x), F.relu_backward),
        "gelu": (lambda: F.gelu_forward(x), F.gelu_backward),
        "tanh": (lambda: F.tanh_forward(x), F.tanh_backward),
        "softmax": (lambda: F.softmax_forward(x), F.softmax_backward),
        "attention": (lambda: F.attention_forward(x, x, x, causal=True), F.attention_backward),
        "layer_norm": (lambda: F.layer_norm_forward(x, g, be), F.layer_norm_backward),
        "embedding": (lambda: F.embedding_forward(ids, W), F.embedding_backward),
        # W (5, 4) as a table of 5 ids; A (2, 5), B (4, 2)
        "lora_embedding": (lambda: F.lora_embedding_forward(ids, W, B.T, A.T, 1.7),
                           lambda dy, c: F.lora_embedding_backward(dy, c, need_dW=True)),
    }


@pytest.mark.parametrize("op", ["linear", "lora_linear", "relu", "gelu", "tanh", "softmax",
                                "attention", "layer_norm", "embedding", "lora_embedding"])
def test_float32_in_float32_out(rng, op):
    fwd, bwd = _float32_cases(rng)[op]
    out, cache = fwd()
    assert out.dtype == np.float32
    grads = bwd(np.ones_like(out), cache)
    for g in grads if isinstance(grads, tuple) else (grads,):
        if g is not None:
            assert g.dtype == np.float32


def test_losses_keep_float32(rng):
    pred = rng.standard_normal((3, 4)).astype(np.float32)
    _, d = F.mse_loss(pred, rng.standard_normal((3, 4)))        # float64 target
    assert d.dtype == np.float32
    _, d = F.cross_entropy_loss(pred, np.array([0, 3, 1]))
    assert d.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# bad input to the losses
# ---------------------------------------------------------------------------------------------


def test_mse_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        F.mse_loss(np.zeros(3), np.zeros(4))


def test_cross_entropy_label_out_of_range_raises():
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 3\]"):
        F.cross_entropy_loss(np.zeros((2, 3)), np.array([0, 3]))


def test_cross_entropy_float_labels_raise():
    with pytest.raises(TypeError, match="integers.*float64"):
        F.cross_entropy_loss(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_cross_entropy_label_shape_raises():
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        F.cross_entropy_loss(np.zeros((2, 3)), np.array([0, 1, 2]))


class _Factor(np.ndarray):
    """An array tagged "A" or "B" (views keep the tag); a matmul of an A-tagged with a B-tagged
    operand raises, so a test can prove that ``B @ A`` is never formed."""

    def __new__(cls, a, tag):
        obj = np.asarray(a).view(cls)
        obj.tag = tag
        return obj

    def __array_finalize__(self, obj):
        self.tag = getattr(obj, "tag", None)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        tags = {getattr(i, "tag", None) for i in inputs}
        if ufunc is np.matmul and {"A", "B"} <= tags:
            raise AssertionError("B @ A (a d_out × d_in matrix) was formed")
        plain = [np.asarray(i) if isinstance(i, _Factor) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, _Factor) else o for o in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)


def test_lora_linear_never_forms_B_times_A(rng):
    x, W, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    A0, B0 = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    A, B = _Factor(A0, "A"), _Factor(B0, "B")
    with pytest.raises(AssertionError, match="was formed"):      # the guard itself works
        B @ A
    mask = (rng.random(x.shape) < 0.5) * 2.0
    y, cache = F.lora_linear_forward(x, W, b, A, B, 1.5, mask)
    dx, dA, dB = F.lora_linear_backward(rng.standard_normal(y.shape), cache)
    y_plain, _ = F.lora_linear_forward(x, W, b, A0, B0, 1.5, mask)
    np.testing.assert_array_equal(np.asarray(y), y_plain)


# ---------------------------------------------------------------------------------------------
# embedding: a row lookup forward, a scatter-add backward
# ---------------------------------------------------------------------------------------------

#: ids with repeats (0 three times, 3 twice) and an id that never occurs (5), in several shapes
_IDS = {"1d": np.array([0, 3, 0, 1, 3, 0]), "2d": np.array([[0, 3, 0], [1, 3, 4]]),
        "3d": np.array([[[2], [2]], [[0], [4]]]), "scalar": np.array(3)}


@pytest.mark.parametrize("ids", list(_IDS.values()), ids=list(_IDS))
def test_embedding_gradient(rng, ids):
    W = rng.standard_normal((6, 4))
    y, cache = F.embedding_forward(ids, W)
    assert y.shape == ids.shape + (4,)
    dy = _dout(y)
    dW = F.embedding_backward(dy, cache)
    assert_grad_close("dW", dW, lambda: F.embedding_forward(ids, W)[0], W, dy)


def test_embedding_backward_sums_repeated_ids_and_zeros_the_rest(rng):
    ids = _IDS["2d"]
    W = rng.standard_normal((6, 4))
    y, cache = F.embedding_forward(ids, W)
    np.testing.assert_array_equal(y, W[ids])
    dy = rng.integers(-5, 5, size=y.shape).astype(np.float64)   # small integers: every sum is exact
    dW = F.embedding_backward(dy, cache)
    expected = np.zeros_like(W)
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, 4))
    np.testing.assert_array_equal(dW, expected)
    np.testing.assert_array_equal(dW[0], dy[0, 0] + dy[0, 2])   # id 0 at two positions
    np.testing.assert_array_equal(dW[3], dy[0, 1] + dy[1, 1])
    np.testing.assert_array_equal(dW[[2, 5]], 0.0)               # ids that do not occur
    # as the one-hot matmul it stands for: dW = onehot(ids)ᵀ G
    onehot = np.eye(6)[ids.reshape(-1)]
    np.testing.assert_array_equal(dW, onehot.T @ dy.reshape(-1, 4))


def test_embedding_backward_matches_add_at_on_random_rows(rng):
    ids = rng.integers(0, 50, size=(16, 33))
    dy = rng.standard_normal((16, 33, 7))
    _, cache = F.embedding_forward(ids, rng.standard_normal((50, 7)))
    expected = np.zeros((50, 7))
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, 7))
    np.testing.assert_allclose(F.embedding_backward(dy, cache), expected, rtol=1e-13, atol=1e-13)


def test_embedding_of_no_ids_has_a_zero_gradient(rng):
    W = rng.standard_normal((3, 2))
    y, cache = F.embedding_forward(np.zeros((0, 4), dtype=np.int64), W)
    assert y.shape == (0, 4, 2)
    np.testing.assert_array_equal(F.embedding_backward(np.zeros(y.shape), cache), np.zeros((3, 2)))


@pytest.mark.parametrize("ids", list(_IDS.values()), ids=list(_IDS))
def test_lora_embedding_gradients(rng, ids):
    V, d, r, s = 6, 4, 2, 1.7
    W, A, B = rng.standard_normal((V, d)), rng.standard_normal((r, V)), rng.standard_normal((d, r))
    y, cache = F.lora_embedding_forward(ids, W, A, B, s)
    dy = _dout(y)
    dA, dB, dW = F.lora_embedding_backward(dy, cache, need_dW=True)
    f = lambda: F.lora_embedding_forward(ids, W, A, B, s)[0]      # noqa: E731
    assert_grad_close("dA", dA, f, A, dy)
    assert_grad_close("dB", dB, f, B, dy)
    assert_grad_close("dW", dW, f, W, dy)
    dA2, dB2 = F.lora_embedding_backward(dy, cache)                # the frozen table: no dW
    np.testing.assert_array_equal(dA2, dA)
    np.testing.assert_array_equal(dB2, dB)


def test_lora_embedding_is_the_table_plus_s_BA_transposed(rng):
    """Y = W[idx] + s·onehot(idx) (B A)ᵀ: the lookup of the merged table W + lora_delta_weight(A, B, s)ᵀ."""
    ids = _IDS["2d"]
    W, A, B = rng.standard_normal((6, 4)), rng.standard_normal((3, 6)), rng.standard_normal((4, 3))
    y, _ = F.lora_embedding_forward(ids, W, A, B, 2.5)
    merged = W + F.lora_delta_weight(A, B, 2.5).T
    np.testing.assert_allclose(y, merged[ids], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(y, W[ids] + 2.5 * np.eye(6)[ids] @ (B @ A).T, rtol=1e-13, atol=1e-13)


def test_lora_embedding_gradients_are_the_table_gradient_projected(rng):
    """dA = s Bᵀ (dL/dW)ᵀ and dB = s (dL/dW)ᵀ Aᵀ with the table's gradient dL/dW (V, d)."""
    ids = _IDS["1d"]
    W, A, B = rng.standard_normal((6, 4)), rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    y, cache = F.lora_embedding_forward(ids, W, A, B, 0.7)
    dy = rng.standard_normal(y.shape)
    dA, dB, dW = F.lora_embedding_backward(dy, cache, need_dW=True)
    np.testing.assert_allclose(dA, 0.7 * B.T @ dW.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dB, 0.7 * dW.T @ A.T, rtol=1e-12, atol=1e-12)


def test_embedding_ops_do_not_change_their_inputs(rng):
    ids = _IDS["2d"]
    W, A, B = rng.standard_normal((6, 4)), rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    copies = [a.copy() for a in (ids, W, A, B)]
    y, cache = F.lora_embedding_forward(ids, W, A, B, 3.0)
    dy = rng.standard_normal(y.shape)
    dy0 = dy.copy()
    F.lora_embedding_backward(dy, cache, need_dW=True)
    _, cache = F.embedding_forward(ids, W)
    F.embedding_backward(dy, cache)
    for a, c in zip((ids, W, A, B, dy), copies + [dy0]):
        np.testing.assert_array_equal(a, c)


def test_lora_embedding_never_forms_B_times_A(rng):
    ids = _IDS["2d"]
    W, A0, B0 = rng.standard_normal((6, 4)), rng.standard_normal((2, 6)), rng.standard_normal((4, 2))
    A, B = _Factor(A0, "A"), _Factor(B0, "B")
    y, cache = F.lora_embedding_forward(ids, W, A, B, 1.5)
    F.lora_embedding_backward(rng.standard_normal(y.shape), cache, need_dW=True)
    np.testing.assert_array_equal(np.asarray(y), F.lora_embedding_forward(ids, W, A0, B0, 1.5)[0])


# ---------------------------------------------------------------------------------------------
# the fast forms (lora_np.fast): the readable formulas slice by slice, bit for bit
# ---------------------------------------------------------------------------------------------

from lora_np import fast as _fast  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7), (1031, 1031), (4, 64, 384)])
def test_fast_gelu_is_bit_for_bit_the_readable_gelu(dtype, shape):
    # (1031, 1031) is 8 slices and a ragged last one; (3, 7) goes straight to the readable form
    rng = np.random.default_rng(3)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y_ref, c_ref = F.gelu_forward(x)
    y, c = _fast.gelu_forward(x)
    assert y.dtype == dtype and np.array_equal(y, y_ref) and np.array_equal(c.t, c_ref.t)
    assert c.x is x
    if x.size >= _fast.MIN_CHUNKED:
        assert x.size > 4 * _fast.CHUNK                              # several slices, ragged end
    dx = _fast.gelu_backward(dy, c)
    assert dx.dtype == dtype and np.array_equal(dx, F.gelu_backward(dy, c_ref))


def test_map_chunks_covers_every_element_once_on_several_threads():
    n = 5 * _fast.CHUNK + 17
    a = np.zeros(n)
    seen = []

    def kernel(s):
        seen.append(s.size)
        s += 1.0
    _fast.map_chunks(kernel, a)
    assert np.all(a == 1.0) and sum(seen) == n and len(seen) == 6


def test_map_chunks_refuses_arrays_that_do_not_line_up():
    with pytest.raises(ValueError, match="one size"):
        _fast.map_chunks(lambda a, b: None, np.zeros(10), np.zeros(11))
    with pytest.raises(ValueError, match="C-contiguous"):
        _fast.map_chunks(lambda a: None, np.zeros((10, 10))[:, ::2])


def test_fast_activation_keeps_a_replaced_entry():
    assert _fast.activation("gelu") == (_fast.gelu_forward, _fast.gelu_backward)
    assert _fast.activation("relu") == F.ACTIVATIONS["relu"]


# ---------------------------------------------------------------------------------------------
# need_dx=False: the input gradient nobody reads is skipped, nothing else changes
# ---------------------------------------------------------------------------------------------

def test_linear_backward_without_dx_gives_the_same_weight_gradients():
    rng = np.random.default_rng(4)
    x, W, b, G = (rng.standard_normal(s) for s in ((5, 3, 6), (4, 6), (4,), (5, 3, 4)))
    _, cache = F.linear_forward(x, W, b)
    dx, dW, db = F.linear_backward(G, cache)
    none, dW2, db2 = F.linear_backward(G, cache, need_dx=False)
    assert none is None and np.array_equal(dW, dW2) and np.array_equal(db, db2)


@pytest.mark.parametrize("need_dW", [False, True])
def test_lora_linear_backward_without_dx_gives_the_same_factor_gradients(need_dW):
    rng = np.random.default_rng(5)
    x, W, b = rng.standard_normal((7, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    A, B, G = rng.standard_normal((2, 6)), rng.standard_normal((4, 2)), rng.standard_normal((7, 4))
    mask = (rng.random((7, 6)) < 0.8) / 0.8
    _, cache = F.lora_linear_forward(x, W, b, A, B, 1.7, mask)
    ref = F.lora_linear_backward(G, cache, need_dW=need_dW, need_db=need_dW)
    got = F.lora_linear_backward(G, cache, need_dW=need_dW, need_db=need_dW, need_dx=False)
    assert got[0] is None and len(got) == len(ref)
    for a, r in zip(got[1:], ref[1:]):
        assert np.array_equal(a, r)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 7), (2, 33, 96)])
def test_fast_layer_norm_is_bit_for_bit_the_readable_layer_norm(dtype, shape):
    rng = np.random.default_rng(8)
    x = (2 + 3 * rng.standard_normal(shape)).astype(dtype)
    gamma, beta = (rng.standard_normal(shape[-1]).astype(dtype) for _ in range(2))
    dy = rng.standard_normal(shape).astype(dtype)
    x0 = x.copy()
    y_ref, c_ref = F.layer_norm_forward(x, gamma, beta)
    y, c = _fast.layer_norm_forward(x, gamma, beta)
    assert np.array_equal(x, x0)                                    # the input is not touched
    assert y.dtype == dtype and np.array_equal(y, y_ref)
    assert np.array_equal(c.xhat, c_ref.xhat) and np.array_equal(c.rstd, c_ref.rstd)
    for got, ref in zip(_fast.layer_norm_backward(dy, c), F.layer_norm_backward(dy, c_ref)):
        assert got.dtype == dtype and np.array_equal(got, ref)


def test_dora_linear_backward_without_dx_gives_the_same_gradients():
    rng = np.random.default_rng(9)
    x, W, b = rng.standard_normal((7, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    A, B, G = rng.standard_normal((2, 6)), rng.standard_normal((4, 2)), rng.standard_normal((7, 4))
    m = rng.random(4) + 0.5
    _, cache = F.dora_linear_forward(x, W, b, A, B, m, 1.3)
    ref = F.dora_linear_backward(G, cache)
    got = F.dora_linear_backward(G, cache, need_dx=False)
    assert got[0] is None
    for a, r in zip(got[1:], ref[1:]):
        assert np.array_equal(a, r)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is Unix's")
def test_fast_forms_work_in_a_forked_child():
    """A child forked after the parent started the pool's threads gets a pool of its own
    (multiprocessing's workers fork; a stale pool would wait forever)."""
    import multiprocessing as mp
    x = np.linspace(-3, 3, _fast.MIN_CHUNKED + 5)                  # sliced, on the pool
    _fast.gelu_forward(x)                                           # the parent's pool exists
    with mp.get_context("fork").Pool(1) as pool:
        y = pool.apply_async(_fast_gelu_in_child, (x,)).get(timeout=60)
    assert np.array_equal(y, F.gelu_forward(x)[0])


def _fast_gelu_in_child(x):
    return _fast.gelu_forward(x)[0]

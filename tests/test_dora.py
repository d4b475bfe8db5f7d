"""DoRA: the functional pair (exact and detached-norm gradients), DoRALinear, add_lora(use_dora=True).

Every gradient check runs in float64 at a non-degenerate point: random non-zero B, a magnitude
m that is NOT the row norms of W + sBA (so c = m/n ≠ 1), scale ≠ 1, each array on its own, and
an assertion that the checked gradient is not all zeros.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import Snapshot, assert_grad_close, assert_module_grads

from lora_np import MLP, DoRALinear, Linear, LoRALinear, MultiHeadAttention, add_lora
from lora_np import functional as F
from lora_np.gradcheck import check_gradients, numerical_gradient, rel_error
from lora_np.lora import load_adapter, lora_layers, merge_lora, save_adapter, unmerge_lora

TOL = 1e-7


def _point(seed=0, N=(2, 5), d_in=6, d_out=5, r=3, bias=True):
    """A non-degenerate point: x (..., d_in), W, b, A, B ≠ 0, m ≠ row norms, s = 1.7."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*N, d_in))
    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    b = 0.3 * rng.standard_normal(d_out) if bias else None
    A = rng.standard_normal((r, d_in)) / np.sqrt(d_in)
    B = 0.5 * rng.standard_normal((d_out, r))
    m = 1.0 + rng.uniform(0.2, 1.5, size=d_out)
    dy = rng.standard_normal((*N, d_out))
    return dict(x=x, W=W, b=b, A=A, B=B, m=m, scale=1.7), dy


def _frozen_norm_forward(x, W, b, A, B, m, scale, n_fixed):
    """Independent reference: DoRA's output with the norm n taken from FIXED copies of A, B."""
    y = (x @ W.T + scale * (x @ A.T) @ B.T) * (m / n_fixed)
    return y if b is None else y + b


def _grads(p, dy, detach):
    y, cache = F.dora_linear_forward(**p, detach_norm=detach)
    return y, dict(zip(("x", "A", "B", "m"), F.dora_linear_backward(dy, cache)))


# --------------------------------------------------------------------------- forward


def test_forward_equals_dense_reference():
    """Y = X W'ᵀ + b with W'_i = m_i V_i / ‖V_i‖, V = W + sBA, written out densely."""
    p, _ = _point()
    V = p["W"] + p["scale"] * p["B"] @ p["A"]
    W_eff = p["m"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
    y, _ = F.dora_linear_forward(**p)
    np.testing.assert_allclose(y, p["x"] @ W_eff.T + p["b"], rtol=0, atol=1e-13)
    # every row of W' has length |m_i|: magnitude and direction really are separate
    np.testing.assert_allclose(np.linalg.norm(W_eff, axis=1), p["m"], rtol=1e-14)


def test_zero_row_of_V_raises():
    p, _ = _point()
    p["W"][2] = 0.0
    p["B"][2] = 0.0
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        F.dora_linear_forward(**p)


def test_inputs_not_changed():
    p, dy = _point()
    copies = {k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)}
    _grads(p, dy, detach=False)
    for k, v in copies.items():
        np.testing.assert_array_equal(p[k], v, err_msg=f"dora changed its input {k}")


# ------------------------------------------------------------------ gradient checks


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["x", "A", "B", "m"])
def test_exact_gradient_matches_finite_differences(name, bias):
    p, dy = _point(bias=bias)
    _, g = _grads(p, dy, detach=False)
    assert_grad_close(f"exact DoRA d{name}", g[name], lambda: F.dora_linear_forward(**p)[0],
                      p[name], dout=dy)


@pytest.mark.parametrize("name", ["x", "A", "B", "m"])
def test_detached_gradient_matches_the_frozen_norm_function(name):
    """detach_norm=True is the exact gradient of the function whose norm is a constant."""
    p, dy = _point(seed=1)
    _, g = _grads(p, dy, detach=True)
    _, n_fixed = F.dora_weight_norm(p["W"], p["A"].copy(), p["B"].copy(), p["scale"])
    assert_grad_close(f"detached DoRA d{name}", g[name],
                      lambda: _frozen_norm_forward(**p, n_fixed=n_fixed), p[name], dout=dy)


def test_gradients_with_dropout_mask():
    p, dy = _point(seed=2)
    mask = (np.random.default_rng(5).random(p["x"].shape) < 0.7) / 0.7
    y, cache = F.dora_linear_forward(**p, dropout_mask=mask)
    g = dict(zip(("x", "A", "B", "m"), F.dora_linear_backward(dy, cache)))
    for name in ("x", "A", "B", "m"):
        assert_grad_close(f"DoRA+dropout d{name}", g[name],
                          lambda: F.dora_linear_forward(**p, dropout_mask=mask)[0], p[name], dout=dy)


@pytest.mark.parametrize("detach", [False, True], ids=["exact", "detached"])
def test_base_gradients_when_asked_for(detach):
    """After unfreeze(): dW = dL/dV = G̃ᵀ X + K (K, the norm term, only for the exact gradient;
    the detached one is the gradient of the frozen-norm function), db = Σ G."""
    p, dy = _point(seed=3)
    y, cache = F.dora_linear_forward(**p, detach_norm=detach)
    four = F.dora_linear_backward(dy, cache)
    dx, dA, dB, dm, dW, db = F.dora_linear_backward(dy, cache, need_dW=True, need_db=True)
    for got, want in zip((dx, dA, dB, dm), four):
        np.testing.assert_array_equal(got, want)
    if detach:
        _, n_fixed = F.dora_weight_norm(p["W"].copy(), p["A"], p["B"], p["scale"])
        f = lambda: _frozen_norm_forward(**p, n_fixed=n_fixed)  # noqa: E731
    else:
        f = lambda: F.dora_linear_forward(**p)[0]  # noqa: E731
    assert_grad_close("dW", dW, f, p["W"], dy)
    assert_grad_close("db", db, f, p["b"], dy)
    assert F.dora_linear_backward(dy, cache, need_dW=True)[5] is None


def test_dora_weight_is_the_applied_weight():
    p, _ = _point(seed=4)
    W_prime, n = F.dora_weight(p["W"], p["A"], p["B"], p["m"], p["scale"])
    np.testing.assert_allclose(np.linalg.norm(W_prime, axis=1), p["m"], rtol=1e-14)
    np.testing.assert_array_equal(n, F.dora_weight_norm(p["W"], p["A"], p["B"], p["scale"])[1])
    y, _ = F.dora_linear_forward(**p)
    np.testing.assert_allclose(y, p["x"] @ W_prime.T + p["b"], rtol=0, atol=1e-13)


def test_exact_and_detached_same_output_and_dm_different_dA_dB():
    """Pins down which variant is which: identical forward, dx and dm; different dA, dB."""
    p, dy = _point(seed=3)
    y_exact, g_exact = _grads(p, dy, detach=False)
    y_det, g_det = _grads(p, dy, detach=True)
    np.testing.assert_array_equal(y_exact, y_det)
    np.testing.assert_array_equal(g_exact["m"], g_det["m"])
    np.testing.assert_array_equal(g_exact["x"], g_det["x"])
    for name in ("A", "B"):
        diff = rel_error(g_exact[name], g_det[name])
        assert diff > 1e-3, \
            f"exact and detached d{name} agree (rel diff {diff:.1e}); the norm term is missing"
    # the detached backward is LoRA's backward with G replaced by G ⊙ (m / n)
    _, n = F.dora_weight_norm(p["W"], p["A"], p["B"], p["scale"])
    _, cache = F.lora_linear_forward(p["x"], p["W"], p["b"], p["A"], p["B"], p["scale"])
    _, dA, dB = F.lora_linear_backward(dy * (p["m"] / n), cache)
    np.testing.assert_allclose(g_det["A"], dA, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_det["B"], dB, rtol=1e-12, atol=1e-14)
    # and the exact one is NOT the gradient of the frozen-norm function (nor vice versa)
    num_true = numerical_gradient(lambda: F.dora_linear_forward(**p)[0], p["A"], dout=dy)
    assert rel_error(g_det["A"], num_true) > 1e-3


def test_exact_direction_gradient_is_orthogonal_to_V():
    """dL/dV_i = (m_i/n_i)(I − v̂_i v̂_iᵀ) g_i is orthogonal to V_i (W'_i sees only V_i's
    direction), and dA = s Bᵀ dL/dV, dB = s (dL/dV) Aᵀ. dL/dV by finite differences of an
    independent dense forward Y = X (diag(m/‖V‖) V)ᵀ + b."""
    p, dy = _point(seed=4)
    _, g = _grads(p, dy, detach=False)
    V = p["W"] + p["scale"] * p["B"] @ p["A"]

    def dense():
        return p["x"] @ (p["m"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)).T + p["b"]

    dV = numerical_gradient(dense, V, dout=dy)
    cos = np.abs((dV * V).sum(axis=1)) / (np.linalg.norm(dV, axis=1) * np.linalg.norm(V, axis=1))
    assert cos.max() <= 1e-8, f"exact dL/dV not orthogonal to V: max |cos| {cos.max():.1e}"
    assert rel_error(g["A"], p["scale"] * p["B"].T @ dV) <= TOL
    assert rel_error(g["B"], p["scale"] * dV @ p["A"].T) <= TOL


def test_float32_in_float32_out():
    p, dy = _point()
    p32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    y, cache = F.dora_linear_forward(**p32)
    grads = F.dora_linear_backward(dy.astype(np.float32), cache)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)


# --------------------------------------------------------------------------- module


def _randomize(layer, rng):
    """Move a DoRA layer off its init: B ≠ 0 and m ≠ row norms."""
    layer.B[...] = 0.5 * rng.standard_normal(layer.B.shape)
    layer.m[...] = layer.m * rng.uniform(0.5, 1.5, size=layer.m.shape)


def test_identity_at_init():
    rng = np.random.default_rng(0)
    base = Linear(7, 5, rng=rng)
    base.b[...] = rng.standard_normal(5)
    x = rng.standard_normal((3, 4, 7))
    for detach in (False, True):
        layer = DoRALinear(base, r=2, alpha=3.0, rng=1, detach_norm=detach)
        np.testing.assert_allclose(layer.m, np.linalg.norm(base.W, axis=1), rtol=1e-15)
        err = np.abs(layer(x) - base(x)).max()
        assert err <= 1e-12, f"DoRA at init differs from the base by {err:.1e}"


def test_module_parameters_and_shapes():
    layer = DoRALinear(Linear(6, 4), r=2, alpha=2.0)
    assert set(layer.trainable_parameters()) == {"A", "B", "m"}
    assert set(layer.parameters()) == {"W", "b", "A", "B", "m"}
    assert layer.m.shape == (4,) and layer.config()["dora"] is True


@pytest.mark.parametrize("rslora", [False, True])
def test_module_gradcheck_exact(rslora):
    rng = np.random.default_rng(1)
    layer = DoRALinear(Linear(6, 5, rng=rng), r=3, alpha=4.0, rslora=rslora, rng=rng)
    _randomize(layer, rng)
    assert_module_grads(layer, rng.standard_normal((2, 3, 6)), expect={"A", "B", "m", "x"})


def test_module_gradcheck_detached_fails_exactly_for_A_and_B():
    """Against the TRUE function, the detached layer is right for x and m and wrong for A, B."""
    rng = np.random.default_rng(2)
    layer = DoRALinear(Linear(6, 5, rng=rng), r=3, alpha=4.0, rng=rng, detach_norm=True)
    _randomize(layer, rng)
    rows = {r.name: r for r in check_gradients(layer, rng.standard_normal((4, 6)))}
    assert rows["x"].passed and rows["m"].passed
    assert rows["A"].rel_error > 1e-3 and rows["B"].rel_error > 1e-3


def test_merge_unmerge_round_trip():
    rng = np.random.default_rng(3)
    layer = DoRALinear(Linear(8, 6, rng=rng), r=2, alpha=5.0, rng=rng)
    _randomize(layer, rng)
    x = rng.standard_normal((5, 8))
    W0, y0 = layer.W.copy(), layer(x)
    W_eff = layer.effective_weight()
    delta = layer.delta_weight()
    np.testing.assert_allclose(W0 + delta, W_eff, atol=1e-14)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(layer.W, W_eff, atol=1e-14)
    np.testing.assert_allclose(layer(x), y0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.delta_weight(), delta, atol=1e-13)
    with pytest.raises(ValueError, match="merged"):
        layer.backward(np.ones_like(y0))
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(layer.W, W0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(layer(x), y0, rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_refuses_zero_magnitude_and_leaves_W():
    layer = DoRALinear(Linear(4, 3), r=1, alpha=1.0)
    layer.m[1] = 0.0
    snap = Snapshot(layer)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        layer.merge()
    assert not layer.merged
    snap.assert_unchanged()


def test_validation():
    with pytest.raises(TypeError, match="detach_norm"):
        DoRALinear(Linear(4, 3), r=1, alpha=1.0, detach_norm="yes")
    base = Linear(4, 3)
    base.W[0] = 0.0
    with pytest.raises(ValueError, match="all-zero rows"):
        DoRALinear(base, r=1, alpha=1.0)
    mlp = MLP(4, 5, 3)
    snap = Snapshot(mlp)
    with pytest.raises(TypeError, match="use_dora"):
        add_lora(mlp, ["fc1"], r=1, alpha=1.0, use_dora=1)
    with pytest.raises(TypeError, match="detach_norm is a DoRA option"):
        add_lora(mlp, ["fc1"], r=1, alpha=1.0, detach_norm=True)
    snap.assert_unchanged()


def test_float32_module():
    layer = DoRALinear(Linear(6, 4, dtype=np.float32), r=2, alpha=2.0)
    y = layer(np.ones((2, 6), dtype=np.float32))
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == layer.gradients()["m"].dtype == np.float32


# -------------------------------------------------------------------- inside models


def test_add_lora_use_dora_in_mlp_gradcheck():
    rng = np.random.default_rng(4)
    mlp = MLP(5, 7, 4, rng=rng)
    add_lora(mlp, ["fc1", "fc2"], r=2, alpha=3.0, use_dora=True, rng=rng)
    layers = lora_layers(mlp)
    assert set(layers) == {"fc1", "fc2"} and all(isinstance(m, DoRALinear) for m in layers.values())
    assert set(mlp.trainable_parameters()) == {f"{l}.{p}" for l in ("fc1", "fc2") for p in "ABm"}
    for m in layers.values():
        _randomize(m, rng)
    assert_module_grads(mlp, rng.standard_normal((3, 5)),
                        expect={f"{l}.{p}" for l in ("fc1", "fc2") for p in "ABm"} | {"x"})


def test_add_lora_use_dora_in_attention_gradcheck():
    rng = np.random.default_rng(5)
    mha = MultiHeadAttention(8, 2, causal=True, rng=rng)
    add_lora(mha, ["q_proj", "v_proj", "o_proj"], r=2, alpha=4.0, use_dora=True, rng=rng)
    for m in lora_layers(mha).values():
        _randomize(m, rng)
    assert_module_grads(mha, rng.standard_normal((2, 3, 8)),
                        expect={f"{l}.{p}" for l in ("q_proj", "v_proj", "o_proj") for p in "ABm"} | {"x"})


def test_model_merge_unmerge_and_identity():
    rng = np.random.default_rng(6)
    mha = MultiHeadAttention(8, 2, rng=rng)
    x = rng.standard_normal((2, 3, 8))
    y_base = mha(x)
    add_lora(mha, ["q_proj", "k_proj", "v_proj", "o_proj"], r=2, alpha=4.0, use_dora=True, rng=rng)
    assert np.abs(mha(x) - y_base).max() <= 1e-12
    for m in lora_layers(mha).values():
        _randomize(m, rng)
    y = mha(x)
    merge_lora(mha)
    np.testing.assert_allclose(mha(x), y, rtol=0, atol=1e-12)
    unmerge_lora(mha)
    np.testing.assert_allclose(mha(x), y, rtol=0, atol=1e-12)


def test_adapter_round_trip_keeps_m(tmp_path):
    rng = np.random.default_rng(7)
    src = add_lora(MLP(5, 6, 3, rng=0), ["fc1"], r=2, alpha=2.0, use_dora=True, rng=rng)
    _randomize(src.fc1, rng)
    path = tmp_path / "dora.npz"
    save_adapter(src, path)
    dst = add_lora(MLP(5, 6, 3, rng=0), ["fc1"], r=2, alpha=2.0, use_dora=True, rng=9)
    load_adapter(dst, path)
    for name in ("A", "B", "m"):
        np.testing.assert_array_equal(getattr(dst.fc1, name), getattr(src.fc1, name))
    x = rng.standard_normal((4, 5))
    np.testing.assert_array_equal(dst(x), src(x))
    plain = add_lora(MLP(5, 6, 3, rng=0), ["fc1"], r=2, alpha=2.0, rng=9)
    snap = Snapshot(plain)
    with pytest.raises(ValueError, match="dora"):
        load_adapter(plain, path)
    snap.assert_unchanged()


def test_lora_layers_still_finds_plain_lora():
    mlp = add_lora(MLP(4, 5, 3), ["fc1"], r=1, alpha=1.0)
    assert isinstance(mlp.fc1, LoRALinear) and not isinstance(mlp.fc1, DoRALinear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(mlp)
        unmerge_lora(mlp)


def test_unfrozen_dora_layer_trains_W_and_b_too():
    """After unfreeze() (full fine-tuning on top of DoRA) W and b get their true gradients:
    dL/dW = dL/dV, since V = W + sBA."""
    rng = np.random.default_rng(8)
    base = Linear(6, 5, rng=rng)
    base.b[...] = 0.1 * rng.standard_normal(5)
    layer = DoRALinear(base, r=2, alpha=3.0, rng=rng)
    _randomize(layer, rng)
    layer.unfreeze()
    assert_module_grads(layer, rng.standard_normal((4, 6)), expect={"W", "b", "A", "B", "m", "x"})


def test_merge_lora_is_all_or_nothing_with_a_zero_magnitude():
    mlp = add_lora(MLP(4, 5, 3, rng=0), ["fc1", "fc2"], r=1, alpha=2.0, use_dora=True)
    mlp.fc2.m[0] = 0.0
    snap = Snapshot(mlp)
    with pytest.raises(ValueError, match="zero magnitude"):
        merge_lora(mlp)
    assert not mlp.fc1.merged and not mlp.fc2.merged
    snap.assert_unchanged()

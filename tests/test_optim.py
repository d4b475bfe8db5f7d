"""Tests for lora_np.optim: SGD and Adam steps against closed forms computed here by hand,
decoupled weight decay, per-parameter learning-rate multipliers, state size, bad input."""

import math

import numpy as np
import pytest
from conftest import Snapshot

from lora_np import MLP, SGD, Adam, Linear, LoRALinear, TransformerBlock, add_lora, merge_lora, unmerge_lora


def _tiny(W):
    """A bias-free Linear(2, 1) whose one parameter W (1, 2) is set to ``W``."""
    lin = Linear(2, 1, bias=False)
    lin.W[...] = W
    return lin


def _set_grad(model, name, g):
    model.gradients()[name][...] = g


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------


def test_sgd_step_is_p_minus_lr_g(rng):
    mlp = MLP(3, 4, 2, rng=rng)
    before = {n: p.copy() for n, p in mlp.parameters().items()}
    ids = {n: id(p) for n, p in mlp.parameters().items()}
    for n in mlp.gradients():
        _set_grad(mlp, n, rng.standard_normal(before[n].shape))
    grads = {n: g.copy() for n, g in mlp.gradients().items()}
    SGD(mlp, lr=0.05).step()
    for n, p in mlp.parameters().items():
        np.testing.assert_array_equal(p, before[n] - 0.05 * grads[n])
        assert id(p) == ids[n]                           # updated in place


def test_sgd_momentum_by_hand():
    lin = _tiny([[0.5, -2.0]])
    opt = SGD(lin, lr=0.1, momentum=0.9)
    g1, g2 = np.array([[1.0, -3.0]]), np.array([[0.5, 2.0]])
    _set_grad(lin, "W", g1)
    opt.step()
    _set_grad(lin, "W", g2)
    opt.step()
    v1 = g1
    v2 = 0.9 * v1 + g2
    np.testing.assert_allclose(lin.W, np.array([[0.5, -2.0]]) - 0.1 * v1 - 0.1 * v2, rtol=1e-15)
    assert opt.t == 2


# ---------------------------------------------------------------------------------------------
# Adam / AdamW
# ---------------------------------------------------------------------------------------------


def _adamw_by_hand(p, grads, lr, b1, b2, eps, wd):
    """Scalar-by-scalar AdamW (Loshchilov & Hutter 2019, Algorithm 2) in plain Python floats."""
    p = [float(v) for v in p]
    m, v = [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * wd * p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_the_closed_form(wd):
    p0, lr, betas, eps = [0.5, -2.0], 0.1, (0.9, 0.999), 1e-8
    grads = [[1.0, -3.0], [0.5, 2.0], [-0.25, 1e-3]]
    lin = _tiny([p0])
    opt = Adam(lin, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        _set_grad(lin, "W", [g])
        opt.step()
    expected = _adamw_by_hand(p0, grads, lr, *betas, eps, wd)
    np.testing.assert_allclose(lin.W[0], expected, rtol=1e-14)


def test_adam_first_step_moves_each_weight_by_lr():
    """After one step m̂ = g and v̂ = g², so every weight moves by lr·sign(g) (|g| ≫ eps)."""
    lin = _tiny([[0.5, -2.0]])
    _set_grad(lin, "W", [[3.0, -1e-3]])
    Adam(lin, lr=0.01).step()
    np.testing.assert_allclose(lin.W, [[0.49, -1.99]], rtol=1e-7)


def test_weight_decay_is_decoupled():
    """AdamW: decay is lr·wd·θ, outside the adaptive normalisation. With a zero gradient the
    weight shrinks by exactly (1 − lr·wd) per step; L2-in-the-gradient Adam would instead move
    it by ≈ lr per step (the normalised g = wd·θ)."""
    lin = _tiny([[0.5, -2.0]])
    opt = Adam(lin, lr=0.1, weight_decay=0.2)
    for _ in range(3):
        _set_grad(lin, "W", [[0.0, 0.0]])
        opt.step()
    np.testing.assert_allclose(lin.W, np.array([[0.5, -2.0]]) * 0.98**3, rtol=1e-15)
    coupled = _adamw_by_hand([0.5, -2.0], [[0.2 * 0.5, 0.2 * -2.0]], 0.1, 0.9, 0.999, 1e-8, 0.0)
    assert abs(coupled[0] - 0.5 * 0.98) > 0.05          # the two rules really differ


def test_adam_state_is_per_parameter_and_float_of_the_param():
    blk = add_lora(TransformerBlock(8, 2, 12, rng=0, dtype=np.float32), ["q_proj"], r=2, alpha=4.0)
    opt = Adam(blk, lr=1e-3)
    assert set(opt.m) == set(opt.v) == {"attn.q_proj.A", "attn.q_proj.B"}
    assert all(a.dtype == np.float32 for a in list(opt.m.values()) + list(opt.v.values()))


# ---------------------------------------------------------------------------------------------
# learning-rate multipliers
# ---------------------------------------------------------------------------------------------


def test_sgd_lr_multipliers_by_last_name_and_full_name(rng):
    mlp = add_lora(MLP(4, 5, 3, rng=rng), ["fc1", "fc2"], r=2, alpha=4.0, rng=rng)
    for n in mlp.gradients():
        _set_grad(mlp, n, rng.standard_normal(mlp.parameters()[n].shape))
    before = {n: p.copy() for n, p in mlp.trainable_parameters().items()}
    grads = {n: g.copy() for n, g in mlp.gradients().items()}
    opt = SGD(mlp, lr=0.1, lr_multipliers={"B": 4.0, "fc1.B": 2.0})
    assert opt.multiplier("fc1.B") == 2.0 and opt.multiplier("fc2.B") == 4.0 and opt.multiplier("fc1.A") == 1.0
    opt.step()
    for n, factor in {"fc1.A": 1.0, "fc2.A": 1.0, "fc1.B": 2.0, "fc2.B": 4.0}.items():
        np.testing.assert_array_equal(mlp.parameters()[n], before[n] - (0.1 * factor) * grads[n])


def test_adam_lr_multiplier_scales_the_step():
    layer = LoRALinear(Linear(2, 2, rng=0), r=1, alpha=2.0, rng=0)
    A0, B0 = layer.A.copy(), layer.B.copy()
    _set_grad(layer, "A", [[1.0, -2.0]])
    _set_grad(layer, "B", [[3.0], [-0.5]])
    Adam(layer, lr=0.01, lr_multipliers={"B": 16.0}).step()
    np.testing.assert_allclose(layer.A - A0, [[-0.01, 0.01]], rtol=1e-7)
    np.testing.assert_allclose(layer.B - B0, [[-0.16], [0.16]], rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# state size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, itemsize", [(np.float64, 8), (np.float32, 4)])
def test_state_bytes(dtype, itemsize):
    d, h, r = 8, 12, 2
    blk = add_lora(TransformerBlock(d, 2, h, rng=0, dtype=dtype), ["q_proj", "fc1"], r=r, alpha=4.0)
    n_trainable = r * (d + d) + r * (d + h)
    assert blk.num_parameters(trainable_only=True) == n_trainable
    assert Adam(blk, lr=1e-3).state_bytes() == 2 * n_trainable * itemsize     # m and v
    assert SGD(blk, lr=1e-3).state_bytes() == 0
    assert SGD(blk, lr=1e-3, momentum=0.9).state_bytes() == n_trainable * itemsize
    full = TransformerBlock(d, 2, h, rng=0, dtype=dtype)
    assert Adam(full, lr=1e-3).state_bytes() == 2 * full.num_parameters() * itemsize


# ---------------------------------------------------------------------------------------------
# bad input: one test per case; the model is left unchanged
# ---------------------------------------------------------------------------------------------


def _model():
    return add_lora(MLP(4, 5, 3, rng=0), ["fc1"], r=2, alpha=4.0)


@pytest.mark.parametrize("opt", [SGD, Adam])
@pytest.mark.parametrize("lr, exc, pattern", [
    (0.0, ValueError, r"lr must be a finite number > 0, got lr=0\.0"),
    (-1e-3, ValueError, r"lr must be a finite number > 0, got lr=-0\.001"),
    (float("nan"), ValueError, r"lr must be a finite number > 0, got lr=nan"),
    (float("inf"), ValueError, r"lr must be a finite number > 0, got lr=inf"),
    ("0.1", TypeError, r"lr must be a number, got '0\.1'"),
    (True, TypeError, r"lr must be a number, got True"),
], ids=["zero", "negative", "nan", "inf", "str", "bool"])
def test_bad_learning_rate_raises(opt, lr, exc, pattern):
    model = _model()
    snap = Snapshot(model)
    with pytest.raises(exc, match=pattern):
        opt(model, lr=lr)
    snap.assert_unchanged()


@pytest.mark.parametrize("opt", [SGD, Adam])
def test_unknown_lr_multiplier_key_raises(opt):
    model = _model()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"'fc2.B' names no trainable parameter; trainable names are "
                                         r"\['fc1.A', 'fc1.B'\]"):
        opt(model, lr=1e-3, lr_multipliers={"B": 2.0, "fc2.B": 2.0})
    snap.assert_unchanged()


@pytest.mark.parametrize("opt", [SGD, Adam])
def test_non_positive_lr_multiplier_raises(opt):
    model = _model()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"lr_multipliers\['B'\] must be a finite number > 0, got lr_multipliers\['B'\]=-2\.0"):
        opt(model, lr=1e-3, lr_multipliers={"B": -2})
    snap.assert_unchanged()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0\.9, 1\.0\)"),
    ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\), got \(0\.9,\)"),
    ({"eps": 0.0}, r"eps must be a finite number > 0, got eps=0\.0"),
    ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0, got weight_decay=-0\.1"),
], ids=["beta2=1", "one-beta", "eps0", "negative-wd"])
def test_bad_adam_hyperparameters_raise(kwargs, pattern):
    model = _model()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        Adam(model, lr=1e-3, **kwargs)
    snap.assert_unchanged()


@pytest.mark.parametrize("momentum, pattern", [(1.0, "momentum must be < 1, got 1.0"),
                                               (-0.5, "momentum must be a finite number >= 0, got momentum=-0.5")])
def test_bad_momentum_raises(momentum, pattern):
    model = _model()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        SGD(model, lr=1e-3, momentum=momentum)
    snap.assert_unchanged()


def test_model_without_trainable_parameters_raises():
    model = MLP(3, 4, 2).freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        Adam(model, lr=1e-3)


def test_lora_added_after_the_optimizer_raises_on_step(rng):
    mlp = MLP(4, 5, 3, rng=rng)
    opt = Adam(mlp, lr=1e-3)                         # holds fc1.W, fc1.b, ...
    add_lora(mlp, ["fc1"], r=2, alpha=4.0)           # ... which are now frozen
    snap = Snapshot(mlp)
    with pytest.raises(ValueError, match=r"no gradient for \['fc1.W', 'fc1.b', 'fc2.W', 'fc2.b'\]"):
        opt.step()
    snap.assert_unchanged()


def test_step_on_a_merged_model_raises_and_changes_nothing(rng):
    """Stepping while merged would move A, B under W = W₀ + ΔW; unmerge could not restore W₀."""
    mlp = add_lora(MLP(4, 5, 3, rng=rng), ["fc1"], r=2, alpha=4.0, rng=rng)
    opt = Adam(mlp, lr=0.1)
    y = mlp(rng.standard_normal((2, 4)))
    mlp.backward(np.ones_like(y))
    opt.step()
    W0 = mlp.fc1.W.copy()
    merge_lora(mlp)
    snap = Snapshot(mlp)
    with pytest.raises(ValueError, match=r"\['fc1'\] are merged; expected unmerged layers.*unmerge_lora"):
        opt.step()
    snap.assert_unchanged()
    unmerge_lora(mlp)
    np.testing.assert_allclose(mlp.fc1.W, W0, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Adam's fast form: the update slice by slice on threads (lora_np.fast) is bit for bit the
# update applied to the whole arrays at once
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_sliced_update_is_bit_for_bit_the_whole_array_update(dtype):
    from lora_np import fast
    rng = np.random.default_rng(7)
    big = MLP(300, 3500, 300, rng=rng, dtype=dtype)         # fc1.W, fc2.W: 1,050,000 numbers each
    assert big.fc1.W.size >= fast.MIN_CHUNKED
    twin = MLP(300, 3500, 300, rng=np.random.default_rng(7), dtype=dtype)
    opts = [Adam(m, lr=3e-3, weight_decay=0.1, lr_multipliers={"fc2.W": 4.0}) for m in (big, twin)]

    def whole_array_step(opt):                               # the readable update, no slicing
        grads = opt._grads()
        opt.t += 1
        for name, p in opt.params.items():
            opt._update(p, grads[name], opt.m[name], opt.v[name], lr=opt.lr * opt.multiplier(name))

    for step in range(3):
        for m in (big, twin):
            for g in m.gradients().values():
                g[...] = np.random.default_rng(step).standard_normal(g.shape).astype(dtype)
        opts[0].step()
        whole_array_step(opts[1])
    for name, p in big.parameters().items():
        assert p.dtype == dtype and np.array_equal(p, twin.parameters()[name]), name
    for name in opts[0].m:
        assert np.array_equal(opts[0].m[name], opts[1].m[name])
        assert np.array_equal(opts[0].v[name], opts[1].v[name])

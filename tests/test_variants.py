"""rsLoRA and LoRA+ hyper-parameters, and the variant experiments of lora_np.variants (the
figures are tested in test_plots_variants.py).

The experiment tests run small configurations and assert what each experiment is there to
show, with margins that the seeded runs clear by a wide factor (never a timing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import Snapshot

from lora_np import SGD, Adam, DoRALinear, Linear, LoRALinear, loraplus_multipliers
from lora_np import fair
from lora_np import functional as F
from lora_np import variants as V
from lora_np.lora import lora_scale


# ------------------------------------------------------------ hyper-parameters


def test_lora_scale_values():
    assert lora_scale(8, 4) == 2.0
    assert lora_scale(8, 4, rslora=True) == 4.0
    assert lora_scale(3.0, np.int64(9), rslora=True) == 1.0


@pytest.mark.parametrize("r, alpha, rslora, exc", [
    (0, 1.0, False, ValueError), (-2, 1.0, True, ValueError), (2.0, 1.0, False, TypeError),
    (True, 1.0, False, TypeError), (4, 0.0, False, ValueError), (4, -1.0, True, ValueError),
    (4, math.nan, False, ValueError), (4, math.inf, True, ValueError), (4, "8", False, TypeError),
    (4, 8.0, "yes", TypeError), (4, 8.0, 1, TypeError),
])
def test_lora_scale_rejects_bad_values(r, alpha, rslora, exc):
    with pytest.raises(exc):
        lora_scale(alpha, r, rslora)


def test_rslora_flag_validated_by_the_layer():
    with pytest.raises(TypeError, match="rslora"):
        LoRALinear(Linear(4, 3), r=2, alpha=1.0, rslora="true")
    layer = LoRALinear(Linear(8, 8), r=4, alpha=6.0, rslora=True)
    assert layer.scale == 3.0


def test_loraplus_multipliers_default_and_validation():
    assert loraplus_multipliers() == {"B": 16.0}
    assert loraplus_multipliers(4) == {"B": 4.0}
    for bad in (0, -4, math.inf, math.nan):
        with pytest.raises(ValueError, match="LoRA\\+ ratio"):
            loraplus_multipliers(bad)
    for bad in ("16", True, None, [16]):
        with pytest.raises(TypeError, match="LoRA\\+ ratio"):
            loraplus_multipliers(bad)


def test_loraplus_with_sgd_scales_only_B_step():
    rng = np.random.default_rng(0)
    layer = LoRALinear(Linear(5, 4, rng=rng), r=2, alpha=3.0, rng=rng)
    layer.B[...] = rng.standard_normal(layer.B.shape)
    lr, lam = 0.1, 16.0
    opt = SGD(layer, lr, lr_multipliers=loraplus_multipliers(lam))
    A0, B0 = layer.A.copy(), layer.B.copy()
    layer.zero_grad()
    layer.backward(np.ones_like(layer(rng.standard_normal((3, 5)))))
    g = {k: v.copy() for k, v in layer.gradients().items()}
    opt.step()
    np.testing.assert_allclose(layer.A, A0 - lr * g["A"], rtol=1e-14)
    np.testing.assert_allclose(layer.B, B0 - lam * lr * g["B"], rtol=1e-14)


def test_loraplus_with_adam_first_step_sizes():
    """Adam's first step moves every entry by ≈ its learning rate: lr for A, λ·lr for B."""
    rng = np.random.default_rng(1)
    layer = LoRALinear(Linear(5, 4, rng=rng), r=2, alpha=3.0, rng=rng)
    layer.B[...] = rng.standard_normal(layer.B.shape)
    A0, B0 = layer.A.copy(), layer.B.copy()
    opt = Adam(layer, 1e-3, lr_multipliers=loraplus_multipliers(16))
    layer.backward(rng.standard_normal(layer(rng.standard_normal((6, 5))).shape))
    opt.step()
    np.testing.assert_allclose(np.abs(layer.A - A0), 1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.abs(layer.B - B0), 16e-3, rtol=1e-3)


def test_bad_multiplier_leaves_model_unchanged():
    layer = LoRALinear(Linear(5, 4), r=2, alpha=3.0)
    snap = Snapshot(layer)
    with pytest.raises(ValueError):
        Adam(layer, 1e-3, lr_multipliers=loraplus_multipliers(16) | {"C": 2.0})
    snap.assert_unchanged()


# ------------------------------------------------------------------------ task


def test_make_task_is_reproducible_and_validated():
    a, b = V.make_task(d=8, n=16, shift_rank=3, seed=4), V.make_task(d=8, n=16, shift_rank=3, seed=4)
    for name in ("X", "Y", "W0", "dW"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert np.linalg.matrix_rank(a.dW) == 3
    np.testing.assert_allclose(a.Y, a.X @ (a.W0 + a.dW).T)
    with pytest.raises(ValueError, match="shift"):
        V.make_task(shift="sideways")
    with pytest.raises(ValueError, match="shift_rank"):
        V.make_task(d=8, shift_rank=9)


def test_principal_and_rescale_shifts():
    t = V.make_task(d=8, n=16, shift_rank=2, shift="principal", seed=1)
    U = np.linalg.svd(t.W0)[0]
    P = U[:, :2] @ U[:, :2].T                         # projector on W₀'s top-2 left directions
    np.testing.assert_allclose(P @ t.dW, t.dW, atol=1e-12)
    t = V.make_task(d=8, n=16, shift="rescale", shift_scale=0.3, seed=1)
    ratio = np.linalg.norm(t.dW, axis=1) / np.linalg.norm(t.W0, axis=1)
    np.testing.assert_allclose(np.abs(t.dW), ratio[:, None] * np.abs(t.W0), atol=1e-12)


def test_loss_floor_with_whitened_inputs_is_eckart_young():
    """With XᵀX/N = I the floor is the plain tail sum of squared singular values / d_out."""
    rng = np.random.default_rng(2)
    d, N = 6, 12
    Q, _ = np.linalg.qr(rng.standard_normal((N, d)))
    X = Q * math.sqrt(N)                              # XᵀX / N = I exactly
    W0, dW = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    task = V.RegressionTask(X=X, Y=X @ (W0 + dW).T, W0=W0, dW=dW)
    sigma = np.linalg.svd(dW, compute_uv=False)
    for r in range(d + 1):
        assert task.loss_floor(W0, r) == pytest.approx((sigma[r:] ** 2).sum() / d, rel=1e-10, abs=1e-14)
    # and a rank-r update reaching it: the truncated SVD of dW
    U, S, Vt = np.linalg.svd(dW)
    D = (U[:, :2] * S[:2]) @ Vt[:2]
    loss, _ = F.mse_loss(X @ (W0 + D).T, task.Y)
    assert loss == pytest.approx(task.loss_floor(W0, 2), rel=1e-10)


def test_fit_adapter_reports_divergence_as_nan():
    task = V.make_task(d=8, n=16, shift_rank=2, seed=0)
    losses, _ = V.fit_adapter(task, 2, 4.0, steps=40, lr=1e200)     # Adam moves B by ≈ lr
    assert losses.shape == (41,) and np.isfinite(losses[0]) and np.all(np.isnan(losses[1:]))


@pytest.mark.parametrize("kwargs", [{}, {"use_dora": True, "lr_ratio": 4.0}])
def test_fit_adapter_is_full_batch_adam_through_train(kwargs):
    """losses[t] is the loss before step t + 1 and losses[steps] the loss after the last
    step, the same numbers a hand-written full-batch Adam loop gives, bit for bit."""
    task = V.make_task(d=8, n=16, shift_rank=2, seed=0)
    losses, layer = V.fit_adapter(task, 2, 4.0, steps=12, lr=1e-2, **kwargs)
    base = Linear(8, 8, bias=False)
    base.W[...] = task.W0
    cls = DoRALinear if kwargs else LoRALinear
    ref = cls(base, 2, 4.0, rng=1)
    opt = Adam(ref, 1e-2, lr_multipliers=loraplus_multipliers(kwargs.get("lr_ratio", 1.0)))
    expected = []
    for _ in range(12):
        loss, dy = F.mse_loss(ref(task.X), task.Y)
        ref.zero_grad()
        ref.backward(dy)
        opt.step()
        expected.append(loss)
    expected.append(F.mse_loss(ref(task.X), task.Y)[0])
    np.testing.assert_array_equal(losses, expected)
    np.testing.assert_array_equal(layer.B, ref.B)


# ----------------------------------------------------------------- experiments


def test_first_update_equals_s2_norm_Ax_squared():
    """The identity behind the experiment, on one example: Δy = −η s² ‖A x‖² g."""
    rng = np.random.default_rng(3)
    layer = LoRALinear(Linear(10, 6, rng=rng), r=3, alpha=5.0, rng=rng)
    x = rng.standard_normal((1, 10))
    y0 = layer(x)
    g = rng.standard_normal(y0.shape)
    layer.backward(g)
    SGD(layer, 0.01).step()
    expected = -0.01 * layer.scale**2 * float(np.sum((layer.A @ x[0]) ** 2)) * g
    np.testing.assert_allclose(layer(x) - y0, expected, rtol=1e-12, atol=1e-15)


def test_first_update_size_scalings():
    res = V.first_update_size(ranks=(1, 4, 16, 64), n_examples=16, d=64)
    assert abs(res.slope("α/r") + 1) < 0.15, f"α/r slope {res.slope('α/r'):.2f}, expected ≈ −1"
    assert abs(res.slope("α/√r")) < 0.15, f"α/√r slope {res.slope('α/√r'):.2f}, expected ≈ 0"
    # same A for both scalings, so per example the ratio is exactly (s_√ / s_r)² = r
    ratio = res.sizes["α/√r"] / res.sizes["α/r"]
    np.testing.assert_allclose(ratio, np.broadcast_to(res.ranks[:, None], ratio.shape).astype(float),
                               rtol=1e-9)
    for label in res.sizes:
        np.testing.assert_allclose(res.mean(label), res.predicted[label], rtol=0.35)


# ------------------------------------------------------------ splits and fits


def test_make_task_held_out_splits_leave_the_training_data_unchanged():
    a = V.make_task(d=8, n=16, shift_rank=3, seed=4)
    b = V.make_task(d=8, n=16, shift_rank=3, seed=4, n_val=5, n_test=7)
    for name in ("X", "Y", "W0", "dW"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.X_val.shape == a.X_test.shape == (16, 8)
    assert b.split("val")[0].shape == (5, 8) and b.split("test")[1].shape == (7, 8)
    for split in ("val", "test"):
        x, y = b.split(split)
        np.testing.assert_allclose(y, x @ (b.W0 + b.dW).T)
    assert not np.array_equal(a.X_val, a.X_test) and not np.array_equal(a.X, a.X_val)
    with pytest.raises(ValueError, match="split"):
        a.split("dev")
    bare = V.RegressionTask(X=a.X, Y=a.Y, W0=a.W0, dW=a.dW)
    with pytest.raises(ValueError, match="no 'val' split"):
        bare.split("val")


@pytest.mark.parametrize("kwargs, exc", [
    (dict(n=0), ValueError), (dict(n_val=0), ValueError), (dict(n_test=2.5), TypeError),
    (dict(seed=-1), ValueError), (dict(shift_scale=-1.0), ValueError), (dict(d=0), ValueError),
    (dict(decay="1"), TypeError),
])
def test_make_task_rejects_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        V.make_task(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="lora2"), "kind"), (dict(r=0), "r"), (dict(alpha=0.0), "alpha"),
    (dict(init="svd"), "init"), (dict(lr_ratio=-1.0), "lr_ratio"),
    (dict(detach_norm=True), "detach_norm"), (dict(kind="full", r=8), "full"),
    (dict(kind="full", lr_ratio=4.0), "full"),
])
def test_adapter_spec_rejects_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        V.AdapterSpec(**kwargs)


def test_adapter_spec_builds_each_kind_on_w0():
    task = V.make_task(d=8, n=16, seed=0)
    full = V.AdapterSpec("full").build(task.W0)
    assert type(full) is Linear and set(full.trainable_parameters()) == {"W"}
    assert not np.shares_memory(full.W, task.W0)
    lora = V.AdapterSpec("lora", 2, 4.0, rslora=True).build(task.W0, 3)
    assert isinstance(lora, LoRALinear) and lora.scale == pytest.approx(4.0 / math.sqrt(2))
    dora = V.AdapterSpec("dora", 2, 4.0, detach_norm=True).build(task.W0)
    assert isinstance(dora, DoRALinear) and dora.detach_norm
    for layer in (full, lora, dora):                     # every kind starts as the base model
        np.testing.assert_allclose(V.applied_weight(layer), task.W0, atol=1e-14)


def test_applied_weight_of_a_merged_adapter_is_its_W():
    task = V.make_task(d=8, n=16, seed=0)
    layer = V.AdapterSpec("lora", 2, 4.0).build(task.W0, 3)
    layer.B[...] = np.random.default_rng(0).standard_normal(layer.B.shape)
    unmerged = V.applied_weight(layer)
    layer.merge()                                        # W holds W₀ + s B A: added once, not twice
    np.testing.assert_allclose(V.applied_weight(layer), unmerged, atol=1e-14)
    assert not np.allclose(unmerged, task.W0)


def test_fit_shapes_and_checkpoints_do_not_change_the_run():
    task = V.make_task(d=8, n=16, shift_rank=2, seed=0)
    spec = V.AdapterSpec("dora", 2, 4.0)
    plain = V.fit(task, spec, 12, 1e-2)
    marked = V.fit(task, spec, 12, 1e-2, checkpoints=(3, 7, 3))
    np.testing.assert_array_equal(plain.train_loss, marked.train_loss)   # bit for bit
    assert plain.train_loss.shape == (13,) and plain.steps.tolist() == [0, 12]
    assert marked.steps.tolist() == [0, 3, 7, 12]
    assert marked.val.shape == marked.test.shape == (4,) and marked.weights.shape == (4, 8, 8)
    np.testing.assert_allclose(marked.weights[0], task.W0, atol=1e-14)
    np.testing.assert_array_equal(marked.weights[-1], plain.weights[-1])
    np.testing.assert_allclose(marked.weights[-1], marked.layer.effective_weight(), rtol=1e-15)
    assert marked.at("test", 7) == marked.test[2] and marked.at("train", 5) == marked.train_loss[5]
    x, y = task.split("val")
    assert marked.at("val", 0) == pytest.approx(F.mse_loss(x @ task.W0.T, y)[0], rel=1e-12)
    assert not marked.diverged
    with pytest.raises(ValueError, match="not a checkpoint"):
        marked.at("test", 5)
    with pytest.raises(ValueError, match="split"):
        marked.at("dev", 3)


def test_fit_is_deterministic_bit_for_bit_and_rng_draws_A():
    task = V.make_task(d=8, n=16, shift_rank=2, seed=1)
    spec = V.AdapterSpec("lora", 2, 4.0)
    a, b = (V.fit(task, spec, 10, 1e-2, rng=fair.init_rng(3, 2), checkpoints=(5,)) for _ in range(2))
    for field in ("train_loss", "val", "test", "weights"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = V.fit(task, spec, 10, 1e-2, rng=fair.init_rng(4, 2), checkpoints=(5,))
    assert not np.array_equal(a.train_loss[1:], c.train_loss[1:])
    full = V.fit(task, V.AdapterSpec("full"), 10, 1e-2)          # full FT learns too
    assert full.train_loss[-1] < 0.5 * full.train_loss[0]


def test_fit_adapter_is_fit_with_A_from_seed_1():
    task = V.make_task(d=8, n=16, shift_rank=2, seed=0)
    losses, _ = V.fit_adapter(task, 2, 4.0, 9, 1e-2, lr_ratio=4.0)
    result = V.fit(task, V.AdapterSpec("lora", 2, 4.0, lr_ratio=4.0), 9, 1e-2, rng=1)
    np.testing.assert_array_equal(losses, result.train_loss)


def test_fit_divergence_and_bad_arguments():
    task = V.make_task(d=8, n=16, shift_rank=2, seed=0)
    spec = V.AdapterSpec("lora", 2, 4.0)
    blown = V.fit(task, spec, 20, 1e200, checkpoints=(5,))
    assert blown.diverged and np.isfinite(blown.train_loss[0]) and np.all(np.isnan(blown.train_loss[1:]))
    assert np.isnan(blown.test[-1])
    for args, kwargs, exc in [((task.X, spec, 5, 1e-2), {}, TypeError), ((task, "lora", 5, 1e-2), {}, TypeError),
                              ((task, spec, 0, 1e-2), {}, ValueError), ((task, spec, 5, -1.0), {}, ValueError),
                              ((task, spec, 5, 1e-2), dict(checkpoints=(6,)), ValueError),
                              ((task, spec, 5, 1e-2), dict(checkpoints="5"), TypeError)]:
        with pytest.raises(exc):
            V.fit(*args, **kwargs)


# ------------------------------------------------------------- the protocol


def test_fair_compare_chooses_each_rate_on_validation():
    specs = {"λ = 1": V.AdapterSpec("lora", 2, 4.0), "λ = 8": V.AdapterSpec("lora", 2, 4.0, lr_ratio=8.0)}
    result = V.fair_compare(specs, dict(d=8, n=16, shift_rank=2), (1e-3, 1e-2, 1e-1), seeds=(0, 1, 2),
                            steps=8, report_steps=(4, 8))
    assert isinstance(result, fair.FairResult) and result.names == list(specs)
    for outcome in result:
        val = {lr: run.validation for lr, run in outcome.grid.items()}
        assert outcome.lr == min(val, key=val.get)
        assert outcome.runs[0] is outcome.grid[outcome.lr] and len(outcome.runs) == 3
        assert set(outcome.best.held_out) == {"test@4", "train@4", "test@8", "train@8"}
        fit = outcome.best.details
        task = V.make_task(d=8, n=16, shift_rank=2, seed=0)
        assert outcome.best.validation == fit.at("val", 8)
        ref = V.fit(task, specs[outcome.name], 8, outcome.lr, rng=fair.init_rng(0, 2), checkpoints=(4,))
        np.testing.assert_array_equal(fit.train_loss, ref.train_loss)       # the same run, bit for bit


@pytest.mark.parametrize("specs, task_kwargs, kwargs, exc", [
    ({}, dict(d=8), dict(steps=4), TypeError),
    ({"a": "lora"}, dict(d=8), dict(steps=4), TypeError),
    ({"a": V.AdapterSpec()}, dict(d=8, seed=1), dict(steps=4), TypeError),
    ({"a": V.AdapterSpec()}, dict(d=8), dict(steps=4, report_steps=(5,)), ValueError),
    ({"a": V.AdapterSpec()}, dict(d=8), dict(steps=4, select_step=0), ValueError),
    ({"a": V.AdapterSpec()}, dict(d=8, shift="sideways"), dict(steps=4), ValueError),
])
def test_fair_compare_rejects_bad_arguments(specs, task_kwargs, kwargs, exc):
    with pytest.raises(exc):
        V.fair_compare(specs, task_kwargs, (1e-2,), seeds=(0,), **kwargs)


# ----------------------------------------------------------------- experiments


def test_rank_scaling_sweep_small_shapes():
    res = V.rank_scaling_sweep(ranks=(2, 8), lrs=(0.01, 0.03, 0.1), steps=4, seeds=(0, 1), d=8, n=16)
    assert len(res.comparisons) == 2 and [c.fair.selection_seed for c in res.comparisons] == [0, 1]
    assert res.best_lr("α/r").shape == (2, 2) and res.lrs.tolist() == [0.01, 0.03, 0.1]
    assert res.lr_curve("α/√r", 8).shape == (3,) and len(res.held_out("α/r")) == 2
    move = res.lr_move("α/r")
    best = res.best_lr("α/r")
    assert move.mean == pytest.approx(np.mean(best[:, 1] / best[:, 0]))
    assert res.transfer_ratio("α/√r").low > 0
    with pytest.raises(ValueError, match="ranks"):
        V.rank_scaling_sweep(ranks=(4,), d=8)


def test_rank_scaling_sweep_alpha_sqrt_r_keeps_its_rate():
    """The section-1 claim at the notebook's settings: keeping r = 2's rate at r = 32 costs
    α/r clearly more than α/√r."""
    res = V.rank_scaling_sweep()
    assert res.transfer_ratio("α/r").mean > 1.1 > res.transfer_ratio("α/√r").high
    assert res.lr_move("α/r").low > res.lr_move("α/√r").high


def test_loraplus_compare_floor_and_names():
    free = V.loraplus_compare(ratios=(1, 16), lrs=(1e-2, 5e-2), r=4, shift_rank=2, steps=10, seeds=(0, 1),
                              d=8, n=16)
    capped = V.loraplus_compare(ratios=(1, 16), lrs=(1e-2, 5e-2), r=4, steps=10, seeds=(0, 1), d=8, n=16)
    assert free.names == capped.names == ["λ = 1", "λ = 16"]
    assert np.all(free.floors["λ = 1"] < 1e-20) and np.all(capped.floors["λ = 16"] > 1e-3)
    assert free.specs["λ = 16"].lr_ratio == 16.0 and free.values("λ = 1", "test@10").shape == (2,)
    ratio = free.ratio("λ = 16", "λ = 1", "test@10")
    assert ratio.mean == pytest.approx(np.mean(free.values("λ = 16", "test@10") / free.values("λ = 1", "test@10")))


def test_pissa_compare_floors():
    res = V.pissa_compare(shift="random", lrs=(1e-2, 5e-2), steps=30, seeds=(0, 1), report_steps=(10,))
    assert res.floors["default init"].max() < 1e-20 and res.floors["PiSSA"].min() > 5e-3
    assert set(res.fair["PiSSA"].best.held_out) == {"test@10", "train@10", "test@30", "train@30"}
    last = res.values("PiSSA", "train@30")
    np.testing.assert_array_less(res.floors["PiSSA"] * (1 - 1e-9), last)     # never below its floor


def test_dora_compare_methods_and_the_rescale_task():
    res = V.dora_compare(shift="rescale", lrs=(5e-3, 2e-2, 5e-2), steps=60, seeds=(0, 1), checkpoint_every=20)
    assert res.names == ["full FT", "LoRA", "DoRA exact", "DoRA detached"]
    assert res.fits("LoRA")[0].steps.tolist() == [0, 20, 25, 40, 60]
    assert res.floors["full FT"].tolist() == [0.0, 0.0]
    lora, dora = res.values("LoRA", "test@60"), res.values("DoRA exact", "test@60")
    assert np.all(dora < 0.3 * lora), (dora, lora)            # built for m: DoRA fits it, LoRA cannot
    with pytest.raises(ValueError, match="shift"):
        V.dora_compare(shift="principal")


def test_weight_decomposition_by_hand():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((5, 4))
    scaled = W0 * np.array([1.0, 2.0, 0.5, 1.0, 3.0])[:, None]          # magnitude only
    dM, dD = V.weight_decomposition(W0, scaled)
    n = np.linalg.norm(W0, axis=1)
    assert dM == pytest.approx(np.mean(np.abs(np.array([0, 1, -0.5, 0, 2]) * n)), rel=1e-12)
    assert dD == pytest.approx(0.0, abs=1e-15)
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    rotated = W0 @ Q                                                     # rows keep their norms
    dM, dD = V.weight_decomposition(W0, np.stack([W0, rotated]))
    np.testing.assert_allclose(dM, 0.0, atol=1e-12)
    cos = (rotated * W0).sum(1) / n**2
    assert dD[0] == pytest.approx(0.0, abs=1e-15) and dD[1] == pytest.approx(np.mean(1 - cos), rel=1e-12)
    for bad, match in [(np.ones((2, 4, 5)), "same"), (np.zeros((5, 4)), "zero"), (np.full((5, 4), np.nan), "finite")]:
        with pytest.raises(ValueError, match=match):
            V.weight_decomposition(W0, bad)


def test_decomposition_slope():
    assert V.decomposition_slope([0.0, 1.0, 2.0], [1.0, 0.5, 0.0]) == pytest.approx(-0.5)
    for dM, dD in [([1.0], [1.0]), ([1.0, 1.0], [0.0, 1.0]), ([0.0, 1.0], [0.0, 1.0, 2.0])]:
        with pytest.raises(ValueError):
            V.decomposition_slope(dM, dD)


def test_dora_trace_is_the_fit_run_and_measures_both_gradients():
    task = V.make_task(d=8, n=16, shift="rescale", shift_scale=0.3, seed=0)
    for detach in (False, True):
        tr = V.dora_trace(task, r=2, alpha=4.0, lr=1e-2, steps=15, rng=5, detach_norm=detach)
        ref = V.fit(task, V.AdapterSpec("dora", 2, 4.0, detach_norm=detach), 15, 1e-2, rng=5)
        np.testing.assert_array_equal(tr.train_loss, ref.train_loss)      # the same run, bit for bit
        assert tr.cos.shape == (15,) and tr.max_ratio.shape == (16,) and tr.norms.shape == (16, 8)
        assert np.all(np.abs(tr.cos) <= 1 + 1e-12) and tr.max_ratio[0] == pytest.approx(1.0)
        np.testing.assert_allclose(tr.norms[0], 1.0) and np.testing.assert_allclose(tr.min_norm, tr.norms.min(1))
        assert tr.config["detach_norm"] is detach and 0 <= tr.rises() <= 15
    # at B = 0 the exact and detached gradients differ (the norm's term), so the first cosine is < 1
    assert tr.cos[0] < 1 - 1e-6
    with pytest.raises(TypeError):
        V.dora_trace(task.X)
    with pytest.raises(ValueError):
        V.dora_trace(task, steps=0)
    with pytest.raises(ValueError):
        tr.rises(-1.0)

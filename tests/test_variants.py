"""rsLoRA and LoRA+ hyper-parameters, and the variant experiments of lora_np.variants.

The experiment tests run small configurations and assert what each experiment is there to
show, with margins that the seeded runs clear by a wide factor (never a timing).
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
from conftest import Snapshot

from lora_np import SGD, Adam, DoRALinear, Linear, LoRALinear, loraplus_multipliers
from lora_np import functional as F
from lora_np import plots as P
from lora_np import variants as V
from lora_np.lora import lora_scale

matplotlib.use("Agg")


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


def test_rank_scaling_curves():
    res = V.rank_scaling_curves(ranks=(2, 16), steps=40, d=16, n=64)
    assert res.curves["α/r"].shape == (2, 41)
    early = res.loss_at(25)
    # α/√r: the high rank learns much faster than under α/r (same α, same lr)
    assert early["α/√r"][1] < 0.7 * early["α/r"][1]
    assert res.floors[0] > res.floors[1] >= 0
    assert np.all(res.curves["α/r"][0] >= res.floors[0] * (1 - 1e-9))


def test_loraplus_sweep():
    res = V.loraplus_sweep(ratios=(1, 16), lrs=(3e-4, 1e-3), steps=25, d=16, n=64)
    assert res.curves.shape == (2, 2, 26)
    table = res.loss_at(25)
    assert np.all(table[1] < 0.9 * table[0]), f"λ=16 not faster than λ=1 at small lr: {table}"
    assert set(res.best(25)) == {1.0, 16.0}


def test_pissa_vs_default():
    res = V.pissa_vs_default(steps=60)
    early, last = res.loss_at(25), res.loss_at(60)
    assert early["principal"]["pissa"] < 0.5 * early["principal"]["kaiming"]
    floor = res.floors["random"]["pissa"]
    assert floor > 0.5 * res.curves["random"]["pissa"][0], "PiSSA's random-shift floor should be high"
    assert last["random"]["pissa"] == pytest.approx(floor, rel=0.05)
    assert last["random"]["kaiming"] < 0.2 * floor
    assert res.floors["principal"]["pissa"] < 1e-20 and res.floors["random"]["kaiming"] < 1e-20


def test_dora_curves():
    res = V.dora_curves(steps=80)
    last = res.loss_at(80)
    lora_floor = res.floors["rescale"]["LoRA"]
    assert np.all(res.curves["rescale"]["LoRA"] >= lora_floor * (1 - 1e-9))
    assert last["rescale"]["DoRA exact"] < 0.3 * lora_floor
    assert last["rescale"]["DoRA detached"] < lora_floor
    for name in ("random", "rescale"):                    # identical start: DoRA = base at init
        starts = {k: v[0] for k, v in res.curves[name].items()}
        assert len(set(starts.values())) == 1, starts


# ------------------------------------------------------------------------ plots


def test_plots_return_figures_and_save(tmp_path):
    figs = {
        "first": P.plot_first_update_size(V.first_update_size(ranks=(1, 4), n_examples=4, d=16)),
        "rank": P.plot_rank_scaling(V.rank_scaling_curves(ranks=(2, 4), steps=5, d=8, n=16)),
        "plus": P.plot_loraplus(V.loraplus_sweep(ratios=(1, 4), lrs=(1e-3, 1e-2), steps=5, d=8, n=16),
                                step=5),
        "pissa": P.plot_pissa(V.pissa_vs_default(steps=5, d=8, n=16)),
        "dora": P.plot_dora(V.dora_curves(steps=5, d=8, n=16), path=tmp_path / "sub" / "dora.png"),
    }
    n_axes = {"first": 1, "rank": 2, "plus": 2, "pissa": 2, "dora": 2}
    for name, fig in figs.items():
        assert len(fig.axes) == n_axes[name], name
        assert all(ax.get_xlabel() for ax in fig.axes), f"{name}: an axis has no label"
    assert (tmp_path / "sub" / "dora.png").stat().st_size > 10_000


def test_pissa_plot_says_when_it_clips_a_curve():
    # a curve drawn at LOSS_FLOOR would look like a plateau, so the title must say so
    def title(low):
        curves = {"principal": {"kaiming": np.array([1e-2, 1e-3]), "pissa": np.array([1e-2, low])},
                  "random": {"kaiming": np.array([1e-2, 1e-3]), "pissa": np.array([1e-2, 1e-3])}}
        floors = {t: {k: 0.0 for k in c} for t, c in curves.items()}
        res = V.CurvesResult(curves=curves, floors=floors, config=dict(r=4))
        return P.plot_pissa(res)._suptitle.get_text()
    assert "floored" not in title(10 * P.LOSS_FLOOR)
    assert f"floored at {P.LOSS_FLOOR:g}" in title(P.LOSS_FLOOR / 10)

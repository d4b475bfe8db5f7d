"""PiSSA initialisation: LoRALinear(init="pissa") and pissa_factors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Snapshot, assert_module_grads

from lora_np import MLP, DoRALinear, Linear, LoRALinear, add_lora
from lora_np.lora import load_adapter, lora_layers, merge_lora, pissa_factors, save_adapter, unmerge_lora

def _base(d_in=9, d_out=7, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    base = Linear(d_in, d_out, rng=rng, dtype=dtype)
    base.b[...] = rng.standard_normal(d_out)
    return base


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_factors_give_the_best_rank_r_part(scale):
    W = _base().W
    r = 3
    A, B = pissa_factors(W, r, scale)
    assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    top = (U[:, :r] * S[:r]) @ Vt[:r]
    np.testing.assert_allclose(scale * B @ A, top, rtol=0, atol=1e-12)
    # √σ split: column j of B and row j of A both have length √(σ_j / s)
    np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.sqrt(S[:r] / scale), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(S[:r] / scale), rtol=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [1, 4, 7])
def test_identity_at_init_and_base_untouched(r, rslora):
    base = _base()
    W_before = base.W.copy()
    layer = LoRALinear(base, r=r, alpha=5.0, rslora=rslora, init="pissa")
    x = np.random.default_rng(1).standard_normal((3, 4, 9))
    err = np.abs(layer(x) - base(x)).max()
    assert err <= 1e-12, f"PiSSA r={r} at init differs from the base by {err:.1e}"
    np.testing.assert_array_equal(base.W, W_before)            # the caller's layer is intact
    assert not np.shares_memory(layer.W, base.W)                # the residual is a copy
    assert layer.b is base.b                                    # the bias is still shared


def test_residual_holds_the_remaining_singular_values():
    base = _base()
    r = 3
    layer = LoRALinear(base, r=r, alpha=2.0, init="pissa")
    S = np.linalg.svd(base.W, compute_uv=False)
    S_res = np.linalg.svd(layer.W, compute_uv=False)
    np.testing.assert_allclose(S_res[: len(S) - r], S[r:], atol=1e-12)
    np.testing.assert_allclose(S_res[len(S) - r:], 0.0, atol=1e-12)
    np.testing.assert_allclose(layer.W + layer.delta_weight(), base.W, atol=1e-14)
    assert np.linalg.norm(layer.B) > 0 and np.linalg.norm(layer.A) > 0


def test_gradcheck_at_init_is_non_degenerate():
    """PiSSA starts with B ≠ 0, so the check at init is already non-degenerate."""
    base = _base()
    layer = LoRALinear(base, r=3, alpha=5.0, init="pissa")
    assert_module_grads(layer, np.random.default_rng(2).standard_normal((2, 5, 9)),
                        expect={"A", "B", "x"})


def test_merge_unmerge_round_trip():
    base = _base()
    layer = LoRALinear(base, r=2, alpha=3.0, init="pissa")
    rng = np.random.default_rng(3)
    layer.A[...] += 0.1 * rng.standard_normal(layer.A.shape)     # as if trained
    layer.B[...] += 0.1 * rng.standard_normal(layer.B.shape)
    x = rng.standard_normal((6, 9))
    W_res, y = layer.W.copy(), layer(x)
    layer.merge()
    np.testing.assert_allclose(layer(x), y, rtol=0, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.W, W_res, rtol=0, atol=1e-14)
    np.testing.assert_allclose(layer(x), y, rtol=0, atol=1e-12)


def test_float32():
    base = _base(dtype=np.float32)
    layer = LoRALinear(base, r=2, alpha=2.0, init="pissa")
    assert layer.W.dtype == layer.A.dtype == layer.B.dtype == np.float32
    x = np.random.default_rng(4).standard_normal((3, 9)).astype(np.float32)
    y = layer(x)
    assert y.dtype == np.float32
    assert np.abs(y - base(x)).max() <= 1e-5


def test_dora_with_pissa_init_is_identity():
    base = _base()
    layer = DoRALinear(base, r=2, alpha=3.0, init="pissa")
    x = np.random.default_rng(5).standard_normal((4, 9))
    assert np.abs(layer(x) - base(x)).max() <= 1e-12
    rng = np.random.default_rng(6)
    layer.m[...] *= rng.uniform(0.5, 1.5, size=layer.m.shape)
    assert_module_grads(layer, x, expect={"A", "B", "m", "x"})


def test_add_lora_pissa_in_mlp():
    rng = np.random.default_rng(7)
    mlp = MLP(6, 8, 4, rng=rng)
    x = rng.standard_normal((5, 6))
    y0 = mlp(x)
    add_lora(mlp, ["fc1", "fc2"], r=2, alpha=4.0, init="pissa")
    assert np.abs(mlp(x) - y0).max() <= 1e-12
    assert_module_grads(mlp, x, expect={"fc1.A", "fc1.B", "fc2.A", "fc2.B", "x"})
    merge_lora(mlp)
    unmerge_lora(mlp)
    assert np.abs(mlp(x) - y0).max() <= 1e-12


def test_adapter_applies_only_to_the_pissa_residual(tmp_path):
    def model(seed=0, init="pissa"):
        return add_lora(MLP(6, 8, 4, rng=seed), ["fc1"], r=2, alpha=4.0, init=init)

    src = model()
    src.fc1.B[...] += 0.2                                        # "trained"
    path = tmp_path / "pissa.npz"
    save_adapter(src, path)
    dst = model()
    load_adapter(dst, path)
    x = np.random.default_rng(8).standard_normal((3, 6))
    np.testing.assert_array_equal(dst(x), src(x))
    with pytest.raises(ValueError, match="init='pissa'"):
        load_adapter(model(init="kaiming"), path)
    other = model(seed=1)
    snap = Snapshot(other)
    with pytest.raises(ValueError, match="residual"):
        load_adapter(other, path)
    snap.assert_unchanged()


def test_pissa_listed_and_bad_init_rejected():
    with pytest.raises(ValueError, match="pissa"):
        LoRALinear(_base(), r=2, alpha=1.0, init="svd")
    assert isinstance(lora_layers(add_lora(MLP(3, 4, 2), ["fc1"], 1, 1.0, init="pissa"))["fc1"], LoRALinear)

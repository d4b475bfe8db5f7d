"""Tests for lora_np.deploy: FLOP counts of merged/unmerged inference, swapping adapters by
merging, several adapters served in one batch (checked against the merged models), the
round-trip error of merge/unmerge, and bad input."""

import copy

import numpy as np
import pytest

import lora_np
from lora_np import counting, deploy
from lora_np.modules import MLP, Linear, TransformerBlock
from lora_np.text import LanguageModel


def _tiny_lm(dtype=np.float64):
    return LanguageModel(11, d_model=8, n_heads=2, n_layers=2, d_hidden=16, context=6, rng=0, dtype=dtype)


def _adapted(base, targets, r, seed):
    m = copy.deepcopy(base)
    lora_np.add_lora(m, targets, r=r, alpha=3.0, rng=seed)
    lora_np.randomize_lora(m, seed, std=0.3)          # B off zero: the adapter changes the output
    return m


def _ids(n, T=6, V=11, seed=0):
    return np.random.default_rng(seed).integers(0, V, (n, T))


# ------------------------------------------------------------------------------- FLOPs, time

def test_forward_flops_merged_equals_base_and_unmerged_adds_the_branch():
    base = MLP(6, 10, 4, rng=0)
    m = copy.deepcopy(base)
    lora_np.add_lora(m, ["fc1"], r=2, alpha=2.0)
    N = 5
    base_flops = deploy.forward_flops(base, N)
    assert base_flops == counting.linear_forward_flops(N, 6, 10) + counting.linear_forward_flops(N, 10, 4)
    assert base_flops == 2 * N * (6 * 10 + 10 * 4) + N * (10 + 4)
    extra = 2 * N * 2 * (6 + 10) + N * 2 + N * 10             # 2Nr(d_in + d_out) + Nr + N d_out
    assert deploy.forward_flops(m, N) == base_flops + extra
    lora_np.merge_lora(m)
    assert deploy.forward_flops(m, N) == base_flops


def test_forward_flops_refuses_dora_and_bad_rows():
    m = MLP(6, 10, 4, rng=0)
    with pytest.raises(TypeError, match="n_rows must be an int"):
        deploy.forward_flops(m, 2.0)
    lora_np.add_lora(m, ["fc1"], r=2, alpha=2.0, use_dora=True)
    with pytest.raises(TypeError, match="DoRALinear"):
        deploy.forward_flops(m, 3)
    with pytest.raises(TypeError, match="Module"):
        deploy.forward_flops("model", 3)


def test_median_time_calls_and_reports():
    calls = []
    t = deploy.median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(t.times) == 5
    assert t.median == sorted(t.times)[2] and all(x >= 0 for x in t.times)
    with pytest.raises(TypeError, match="callable"):
        deploy.median_time(3)
    with pytest.raises(ValueError, match="repeats"):
        deploy.median_time(lambda: None, repeats=0)


# --------------------------------------------------------------------------------- swapping

def test_swap_adapter_equals_the_other_merged_model(tmp_path):
    base = _tiny_lm()
    a, b = _adapted(base, ["q_proj", "fc2"], 2, 1), _adapted(base, ["q_proj", "fc2"], 2, 2)
    lora_np.save_adapter(b, tmp_path / "b.npz")
    x = _ids(3)
    with lora_np.no_grad():
        want = lora_np.merge_lora(copy.deepcopy(b)).eval()(x)
        lora_np.merge_lora(a)
        deploy.swap_adapter(a, tmp_path / "b.npz")
        got = a.eval()(x)
    assert all(m.merged for m in lora_np.lora_layers(a).values())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_swap_adapter_refuses_a_wrong_file_and_stays_merged(tmp_path):
    base = _tiny_lm()
    a, other = _adapted(base, ["q_proj"], 2, 1), _adapted(base, ["v_proj"], 2, 2)
    lora_np.save_adapter(other, tmp_path / "other.npz")
    lora_np.merge_lora(a)
    W = a.blocks[0].attn.q_proj.W.copy()
    with pytest.raises(ValueError, match="adapts layers"):
        deploy.swap_adapter(a, tmp_path / "other.npz")
    assert a.blocks[0].attn.q_proj.merged
    np.testing.assert_allclose(a.blocks[0].attn.q_proj.W, W, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="no LoRA layers"):
        deploy.swap_adapter(base, tmp_path / "other.npz")


# ---------------------------------------------------------------- several adapters, one batch

@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_serve_matches_each_merged_model(dtype, atol):
    base = _tiny_lm(dtype)
    adapted = [_adapted(base, ["q_proj", "v_proj", "fc1"], 2, 1),
               _adapted(base, ["fc2", "head"], 3, 2)]                     # different layers, ranks
    server = deploy.serving_model(base, adapted)
    x, ids = _ids(5), np.array([0, 1, -1, 1, 0])
    y = deploy.serve(server, x, ids)
    assert y.dtype == dtype and y.shape == (5, 6, 11)
    with lora_np.no_grad():
        refs = [lora_np.merge_lora(copy.deepcopy(m)).eval() for m in adapted] + [base.eval()]
        for i, k in enumerate(ids):
            want = refs[k](x[i:i + 1])
            np.testing.assert_allclose(y[i:i + 1], want, rtol=0, atol=atol)
    assert np.abs(y[0] - y[2]).max() > 1e-3                                 # the adapters matter
    assert all(m.routing is None for _, m in server.named_modules()
               if isinstance(m, deploy.MultiAdapterLinear))


def test_serving_model_holds_the_base_once_and_copies_the_factors():
    base = _tiny_lm()
    adapted = [_adapted(base, ["q_proj"], 2, 1), _adapted(base, ["q_proj"], 2, 2)]
    server = deploy.serving_model(base, adapted)
    n_base = base.num_parameters()
    n_adapters = sum(m.num_parameters(trainable_only=True) for m in adapted)
    assert server.num_parameters() == n_base + n_adapters
    assert server.num_parameters(trainable_only=True) == 0
    before = deploy.serve(server, _ids(2), np.array([0, 1]))
    for m in adapted:
        m.blocks[0].attn.q_proj.B[...] += 1.0                              # training them later ...
    np.testing.assert_array_equal(deploy.serve(server, _ids(2), np.array([0, 1])), before)   # ... changes nothing


def test_serving_model_refuses_what_it_cannot_serve():
    base = _tiny_lm()
    good = _adapted(base, ["q_proj"], 2, 1)
    with pytest.raises(ValueError, match="already has LoRA"):
        deploy.serving_model(good, [good])
    merged = lora_np.merge_lora(copy.deepcopy(good))
    with pytest.raises(ValueError, match="merged"):
        deploy.serving_model(base, [merged])
    other_base = _adapted(LanguageModel(11, d_model=8, n_heads=2, n_layers=2, d_hidden=16, context=6, rng=5),
                          ["q_proj"], 2, 1)
    with pytest.raises(ValueError, match="not the base's"):
        deploy.serving_model(base, [good, other_base])
    dora = copy.deepcopy(base)
    lora_np.add_lora(dora, ["q_proj"], r=2, alpha=2.0, use_dora=True)
    with pytest.raises(TypeError, match="DoRALinear"):
        deploy.serving_model(base, [dora])
    with pytest.raises(ValueError, match="none of the adapted"):
        deploy.serving_model(base, [copy.deepcopy(base)])
    with pytest.raises(TypeError, match="non-empty"):
        deploy.serving_model(base, [])


def test_serve_checks_the_routing():
    base = _tiny_lm()
    server = deploy.serving_model(base, [_adapted(base, ["q_proj"], 2, 1)])
    with pytest.raises(ValueError, match="one adapter id per request"):
        deploy.serve(server, _ids(3), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"in \[-1, 1\)"):
        deploy.serve(server, _ids(2), np.array([0, 1]))
    with pytest.raises(TypeError, match="1-D array of ints"):
        deploy.serve(server, _ids(2), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="serving_model"):
        deploy.serve(base, _ids(2), np.array([0, 0]))
    layer = server.blocks[0].attn.q_proj
    with pytest.raises(ValueError, match="routing"):
        with lora_np.no_grad():
            server(_ids(2))                                               # no routing set


def test_multi_adapter_linear_checks_shapes_and_has_no_backward():
    base = Linear(4, 3, rng=0)
    with pytest.raises(ValueError, match="expected A"):
        deploy.MultiAdapterLinear(base, [(np.zeros((2, 5)), np.zeros((3, 2)), 1.0)])
    with pytest.raises(TypeError, match="wraps a Linear"):
        deploy.MultiAdapterLinear(MLP(4, 4, 4), [None])
    with pytest.raises(ValueError, match="at least one"):
        deploy.MultiAdapterLinear(base, [])
    layer = deploy.MultiAdapterLinear(base, [None, (np.ones((1, 4)), np.ones((3, 1)), 0.5)])
    layer.routing = np.array([0, 1])
    x = np.arange(8.0).reshape(2, 4)
    y = layer(x)
    np.testing.assert_allclose(y[0], x[0] @ base.W.T + base.b)
    np.testing.assert_allclose(y[1], x[1] @ base.W.T + base.b + 0.5 * x[1].sum())
    with pytest.raises(ValueError):
        layer.backward(np.ones((2, 3)))


# ------------------------------------------------------------------------ round-trip error

def _layer(dtype, seed=0):
    layer = lora_np.LoRALinear(Linear(24, 16, rng=seed, dtype=dtype), r=3, alpha=6.0, rng=seed)
    layer.B[...] = np.random.default_rng(seed).standard_normal(layer.B.shape).astype(dtype)
    return layer


def test_one_adapter_round_trips_stop_after_the_first():
    layer = _layer(np.float32)
    W = layer.W.copy()
    rt = deploy.round_trip_errors(layer, 6)
    np.testing.assert_array_equal(layer.W, W)                            # the layer is untouched
    assert rt.errors[0] > 0 and np.all(rt.errors == rt.errors[0])         # a fixed point after trip 1
    assert rt.changed[0] > 0 and np.all(rt.changed[1:] == 0)
    assert rt.errors[0] < rt.ulp                                          # less than one ulp per entry
    assert rt.ulp == pytest.approx(np.linalg.norm(np.spacing(np.abs(W)).astype(np.float64)))


def test_new_adapters_make_the_error_grow_like_a_random_walk():
    layer = _layer(np.float32)
    rng = np.random.default_rng(1)
    adapters = [(layer.A, rng.standard_normal(layer.B.shape).astype(np.float32)) for _ in range(256)]
    rt = deploy.round_trip_errors(layer, 256, adapters=adapters)
    n = np.arange(1, 257)
    slope = np.polyfit(np.log(n[3:]), np.log(rt.errors[3:]), 1)[0]
    assert 0.35 < slope < 0.65                                            # ∝ √n
    rt64 = deploy.round_trip_errors(_layer(np.float64), 256,
                                    adapters=[(a.astype(np.float64), b.astype(np.float64)) for a, b in adapters])
    ratio = (rt.errors[-1] / rt.ulp) / (rt64.errors[-1] / rt64.ulp)
    assert 0.3 < ratio < 3                                                # the same number of ulps
    assert rt64.errors[-1] < 1e-6 * rt.errors[-1]


def test_round_trip_errors_bad_input():
    layer = _layer(np.float64)
    with pytest.raises(ValueError, match="n_trips"):
        deploy.round_trip_errors(layer, 0)
    with pytest.raises(ValueError, match="adapter 0 has A"):
        deploy.round_trip_errors(layer, 2, adapters=[(np.zeros((2, 24)), np.zeros((16, 2)))])
    with pytest.raises(ValueError, match="empty"):
        deploy.round_trip_errors(layer, 2, adapters=[])
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        deploy.round_trip_errors(layer, 2)
    with pytest.raises(TypeError, match="LoRALinear"):
        deploy.round_trip_errors(Linear(3, 3), 2)


def test_compare_times_interleaves_the_calls():
    order = []
    t = deploy.compare_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and set(t) == {"a", "b"} and len(t["a"].times) == 3
    with pytest.raises(TypeError, match="dict of name"):
        deploy.compare_times([lambda: None])

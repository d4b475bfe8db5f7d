"""Tests for lora_np.lora: gradient checks with LoRA on every kind of layer, why the check point
must be non-degenerate, exact equality at init, merge/unmerge, frozen weights under training,
parameter counts, dropout, float32, adapter files, and bad input (one test per case)."""

import gc
import json
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
from conftest import Snapshot, assert_module_grads, randomize

import lora_np.functional as F
from lora_np import (MLP, SGD, Adam, LayerNorm, Linear, LoRALinear, MultiHeadAttention,
                     TransformerBlock, add_lora, load_adapter, lora_layers, merge_lora, save_adapter,
                     unmerge_lora)
from lora_np.gradcheck import check_gradients

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]

# ---------------------------------------------------------------------------------------------
# gradient checks with LoRA (random non-zero B, scale != 1, each parameter on its own)
# ---------------------------------------------------------------------------------------------

# (d_in, d_out, r, x_shape, bias, rslora, init)
LORA_LAYER_CASES = [
    (6, 5, 1, (4, 6), True, False, "kaiming"),          # r = 1, 2-D
    (6, 5, 5, (2, 3, 6), True, False, "kaiming"),       # r = min(d_in, d_out) = d_out, 3-D
    (4, 7, 4, (3, 4), False, False, "gaussian"),        # r = min = d_in, no bias
    (6, 5, 2, (1, 6), True, True, "kaiming"),           # batch of one, rsLoRA
    (6, 5, 3, (1, 1, 6), True, False, "gaussian"),      # 3-D batch of one
]


@pytest.mark.parametrize("d_in, d_out, r, x_shape, bias, rslora, init", LORA_LAYER_CASES,
                         ids=["r1-2d", "rmin-3d", "rmin-din-nobias", "batch1-rslora", "batch1-3d"])
def test_lora_linear_gradcheck(rng, d_in, d_out, r, x_shape, bias, rslora, init):
    layer = LoRALinear(Linear(d_in, d_out, bias=bias, rng=rng), r=r, alpha=3.7, rslora=rslora,
                       init=init, rng=rng)
    randomize(layer, rng)
    assert_module_grads(layer, rng.standard_normal(x_shape), expect={"A", "B", "x"})


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("targets", [["fc1", "fc2"], ["fc1"]], ids=["fc1+fc2", "fc1-only"])
def test_mlp_lora_gradcheck(rng, activation, targets):
    mlp = add_lora(MLP(5, 7, 4, activation=activation, rng=rng), targets, r=2, alpha=5.0, rng=rng)
    randomize(mlp, rng)
    x = rng.standard_normal((3, 5))
    if activation == "relu":
        assert np.abs(mlp.fc1(x)).min() > 1e-4          # no pre-activation at relu's kink
    assert_module_grads(mlp, x, expect={f"{t}.{n}" for t in targets for n in "AB"} | {"x"})


@pytest.mark.parametrize("n_heads, causal, r", [(1, False, 1), (2, True, 2), (4, False, 8), (4, True, 1)],
                         ids=["1head-noncausal-r1", "2heads-causal-r2", "4heads-noncausal-rmin",
                              "4heads-causal-r1"])
def test_attention_lora_gradcheck(rng, n_heads, causal, r):
    mha = add_lora(MultiHeadAttention(8, n_heads, causal=causal, rng=rng),
                   ["q_proj", "k_proj", "v_proj", "o_proj"], r=r, alpha=3.0, rng=rng)
    randomize(mha, rng)
    expect = {f"{p}_proj.{n}" for p in "qkvo" for n in "AB"} | {"x"}
    assert_module_grads(mha, rng.standard_normal((2, 3, 8)), expect=expect)


@pytest.mark.parametrize("causal, targets, x_shape", [
    (True, ALL_LINEAR, (2, 3, 8)),
    (False, ["q_proj", "v_proj"], (1, 4, 8)),
], ids=["causal-all-linear", "noncausal-qv-batch1"])
def test_transformer_block_lora_gradcheck(rng, causal, targets, x_shape):
    blk = add_lora(TransformerBlock(8, 2, 12, causal=causal, rng=rng), targets, r=2, alpha=6.0, rng=rng)
    randomize(blk, rng)
    parent = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn", "fc1": "mlp", "fc2": "mlp"}
    expect = {f"{parent[t]}.{t}.{n}" for t in targets for n in "AB"} | {"x"}
    assert_module_grads(blk, rng.standard_normal(x_shape), expect=expect)


def test_dropout_backward_uses_the_forward_mask(rng):
    """In training mode the module draws a mask; backward must use that same mask."""
    from conftest import assert_grad_close
    layer = LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, dropout=0.4, rng=rng)
    randomize(layer, rng)
    x = rng.standard_normal((3, 6))
    y = layer(x)
    mask = layer.__dict__["_cache"][1].dropout_mask
    assert mask is not None and (mask == 0).any() and (mask != 0).any()
    dout = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(dout)
    f = lambda: F.lora_linear_forward(x, layer.W, layer.b, layer.A, layer.B, layer.scale, mask)[0]  # noqa: E731
    assert_grad_close("A (dropout)", layer.gradients()["A"], f, layer.A, dout)
    assert_grad_close("B (dropout)", layer.gradients()["B"], f, layer.B, dout)
    assert_grad_close("x (dropout)", dx, f, x, dout)


# ---------------------------------------------------------------------------------------------
# why the check point must not be degenerate
# ---------------------------------------------------------------------------------------------


def _forgot_scale_in_dA(monkeypatch):
    """Plant a classic bug: dA computed without the scale s."""
    right = F.lora_linear_backward

    def wrong(dy, cache, **flags):
        dx, dA, dB = right(dy, cache, **flags)
        return dx, dA / cache.scale, dB
    monkeypatch.setattr(F, "lora_linear_backward", wrong)


def test_b_zero_hides_a_wrong_dA_but_random_b_catches_it(rng, monkeypatch):
    _forgot_scale_in_dA(monkeypatch)
    layer = LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=5.0, rng=rng)     # s = 2.5
    x = rng.standard_normal((4, 6))

    # at the standard init B = 0 the true dA is 0 and so is the wrong one: the error is 0
    rows = {r.name: r for r in check_gradients(layer, x)}
    assert np.all(layer.B == 0)
    assert rows["A"].rel_error <= 1e-7 and rows["A"].grad_norm == 0.0
    assert not rows["A"].passed          # only the "gradient is not all zeros" guard notices

    # at a random B the same wrong formula is caught by the error itself
    layer.B[...] = rng.standard_normal(layer.B.shape)
    rows = {r.name: r for r in check_gradients(layer, x)}
    assert rows["A"].rel_error > 0.1 and not rows["A"].passed
    assert rows["B"].passed and rows["x"].passed          # the rest of backward is right

    # and without the planted bug the same point passes
    monkeypatch.undo()
    assert all(r.passed for r in check_gradients(layer, x))


def test_scale_one_hides_a_forgotten_scale(rng, monkeypatch):
    """With s = 1 (alpha = r) forgetting s changes nothing: why the checks use s != 1."""
    _forgot_scale_in_dA(monkeypatch)
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=2.0, rng=rng), rng)
    assert layer.scale == 1.0
    assert all(r.passed for r in check_gradients(layer, rng.standard_normal((4, 6))))


# ---------------------------------------------------------------------------------------------
# init, scale, delta weight
# ---------------------------------------------------------------------------------------------

BASES = {
    "Linear": (lambda: Linear(8, 6, rng=0), ["W"]),
    "MLP": (lambda: MLP(8, 12, 8, rng=0), ["fc1", "fc2"]),
    "MHA": (lambda: MultiHeadAttention(8, 2, causal=True, rng=0), ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "Block": (lambda: TransformerBlock(8, 2, 12, rng=0), ALL_LINEAR),
}


@pytest.mark.parametrize("name", ["MLP", "MHA", "Block"])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_lora_at_init_equals_the_base_exactly(name, init):
    make, targets = BASES[name]
    base = randomize(make(), np.random.default_rng(3))
    x = np.random.default_rng(4).standard_normal((2, 3, 8))
    y0 = base(x)
    model = add_lora(base, targets, r=2, alpha=16.0, init=init, rng=5)
    for m in lora_layers(model).values():
        assert np.all(m.B == 0) and np.linalg.norm(m.A) > 0     # B = 0, A random (so dB != 0)
    np.testing.assert_array_equal(model(x), y0)


def test_lora_linear_at_init_equals_the_base_exactly(rng):
    base = randomize(Linear(6, 5, rng=rng), rng)
    x = rng.standard_normal((3, 6))
    y0 = base(x)
    layer = LoRALinear(base, r=3, alpha=7.0, rng=rng)
    np.testing.assert_array_equal(layer(x), y0)
    assert layer.W is base.W and layer.b is base.b             # shared, not copied


@pytest.mark.parametrize("r, rslora, expected", [(4, False, 2.0), (4, True, 4.0), (1, False, 8.0)])
def test_scale(r, rslora, expected):
    assert LoRALinear(Linear(8, 8), r=r, alpha=8.0, rslora=rslora).scale == expected


def test_delta_weight_is_s_B_A(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    assert layer.scale == 1.5
    np.testing.assert_allclose(layer.delta_weight(), 1.5 * (layer.B @ layer.A), rtol=1e-15)
    assert np.linalg.matrix_rank(layer.delta_weight()) == 2


def test_init_schemes_are_reproducible_and_distinct():
    a = LoRALinear(Linear(64, 32), r=4, alpha=8.0, init="kaiming", rng=1)
    b = LoRALinear(Linear(64, 32), r=4, alpha=8.0, init="kaiming", rng=1)
    g = LoRALinear(Linear(64, 32), r=4, alpha=8.0, init="gaussian", rng=1)
    np.testing.assert_array_equal(a.A, b.A)
    assert np.abs(a.A).max() <= 1 / np.sqrt(64)                 # U(−1/√d_in, 1/√d_in)
    assert np.abs(g.A).max() > 1 / np.sqrt(64)                  # N(0, 1/r²): std 0.25


# ---------------------------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------------------------


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_merge_then_forward_matches_unmerged(rng):
    layer = randomize(LoRALinear(Linear(16, 12, rng=rng), r=3, alpha=6.0, rng=rng), rng)
    x = rng.standard_normal((5, 16))
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert _rel(layer(x), y) <= 1e-12


def test_merge_lora_on_a_block_matches_unmerged(rng):
    blk = randomize(add_lora(TransformerBlock(8, 2, 12, causal=True, rng=rng), ALL_LINEAR, r=2,
                             alpha=4.0, rng=rng), rng)
    x = rng.standard_normal((2, 5, 8))
    y = blk(x)
    merge_lora(blk)
    assert all(m.merged for m in lora_layers(blk).values())
    assert _rel(blk(x), y) <= 1e-12
    unmerge_lora(blk)
    assert _rel(blk(x), y) <= 1e-12


def test_merge_unmerge_restores_W(rng):
    layer = randomize(LoRALinear(Linear(16, 12, rng=rng), r=3, alpha=6.0, rng=rng), rng)
    W0 = layer.W.copy()
    layer.merge()
    assert not np.allclose(layer.W, W0)
    np.testing.assert_allclose(layer.W, W0 + layer.delta_weight(), rtol=1e-15, atol=1e-15)
    layer.unmerge()
    assert not layer.merged
    assert _rel(layer.W, W0) <= 1e-12


def test_second_merge_does_not_add_twice(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    layer.merge()
    W1 = layer.W.copy()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    np.testing.assert_array_equal(layer.W, W1)
    merge_lora(layer)                                  # model-level merge skips merged layers
    np.testing.assert_array_equal(layer.W, W1)


def test_unmerge_when_not_merged_does_nothing(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    W0 = layer.W.copy()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    np.testing.assert_array_equal(layer.W, W0)


def test_merge_that_overflows_raises_and_leaves_W_unchanged(rng):
    layer = LoRALinear(Linear(4, 3, rng=rng), r=2, alpha=1000.0, rng=rng)
    layer.B[...] = 1e308
    snap = Snapshot(layer)
    with pytest.raises(ValueError, match="expected W \\+ ΔW to be finite, got non-finite"):
        layer.merge()
    snap.assert_unchanged()
    assert not layer.merged


def test_merge_lora_is_all_or_nothing(rng):
    mlp = add_lora(MLP(4, 5, 3, rng=rng), ["fc1", "fc2"], r=2, alpha=1000.0, rng=rng)
    mlp.fc1.B[...] = 0.1
    mlp.fc2.B[...] = 1e308                                 # only fc2 would overflow
    snap = Snapshot(mlp)
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora(mlp)
    snap.assert_unchanged()
    assert not mlp.fc1.merged and not mlp.fc2.merged


def test_merged_layer_backward_raises(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    layer.merge()
    y = layer(rng.standard_normal((2, 6)))
    snap = Snapshot(layer)
    with pytest.raises(ValueError, match="merged.*unmerge\\(\\) before training"):
        layer.backward(np.ones_like(y))
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------------
# training: frozen stays frozen, counts
# ---------------------------------------------------------------------------------------------


def _train(model, optim, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x, target = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
        loss, dpred = F.mse_loss(model(x), target)
        optim.zero_grad()
        model.backward(dpred)
        optim.step()


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd", "sgd-momentum"])
def test_frozen_weights_do_not_change_under_training(opt):
    blk = add_lora(TransformerBlock(8, 2, 12, rng=0), ["q_proj", "v_proj", "fc1"], r=2, alpha=4.0, rng=1)
    before = {n: p.copy() for n, p in blk.parameters().items()}
    trainable = set(blk.trainable_parameters())
    assert trainable == {f"attn.{p}.{n}" for p in ("q_proj", "v_proj") for n in "AB"} | {"mlp.fc1.A", "mlp.fc1.B"}
    optim = {"adam": lambda: Adam(blk, lr=1e-2), "adamw": lambda: Adam(blk, lr=1e-2, weight_decay=0.5),
             "sgd": lambda: SGD(blk, lr=1e-1), "sgd-momentum": lambda: SGD(blk, lr=1e-1, momentum=0.9)}[opt]()
    _train(blk, optim)
    for n, p in blk.parameters().items():
        if n in trainable:
            assert not np.array_equal(p, before[n]), f"{n} did not change"
        else:       # W, b of adapted and untargeted layers, LayerNorm gains and biases
            assert np.array_equal(p, before[n]), f"frozen {n} changed"


def test_trainable_counts_are_r_times_din_plus_dout():
    d, h, r = 8, 12, 3
    blk = add_lora(TransformerBlock(d, 2, h, rng=0), ALL_LINEAR, r=r, alpha=4.0, rng=1)
    layers = lora_layers(blk)
    shapes = {"attn.q_proj": (d, d), "attn.k_proj": (d, d), "attn.v_proj": (d, d),
              "attn.o_proj": (d, d), "mlp.fc1": (d, h), "mlp.fc2": (h, d)}
    assert set(layers) == set(shapes)
    for path, (d_in, d_out) in shapes.items():
        assert layers[path].num_parameters(trainable_only=True) == r * (d_in + d_out)
    expected = sum(r * (a + b) for a, b in shapes.values())
    assert blk.num_parameters(trainable_only=True) == expected == 3 * (4 * 16 + 20 + 20)
    assert blk.num_parameters() == TransformerBlock(d, 2, h).num_parameters() + expected


def test_second_add_lora_keeps_earlier_adapters_trainable():
    blk = add_lora(TransformerBlock(8, 2, 12, rng=0), ["q_proj"], r=2, alpha=4.0, rng=1)
    add_lora(blk, ["fc1"], r=4, alpha=8.0, rng=2)
    assert set(blk.trainable_parameters()) == {"attn.q_proj.A", "attn.q_proj.B", "mlp.fc1.A", "mlp.fc1.B"}
    assert set(blk.gradients()) == set(blk.trainable_parameters())


def test_targets_by_last_name_and_by_dotted_path():
    blk = add_lora(TransformerBlock(8, 2, 12, rng=0), ["attn.v_proj", "fc2"], r=1, alpha=2.0)
    assert set(lora_layers(blk)) == {"attn.v_proj", "mlp.fc2"}
    assert isinstance(blk.attn.v_proj, LoRALinear) and isinstance(blk.attn.q_proj, Linear)


# ---------------------------------------------------------------------------------------------
# dropout on the LoRA branch
# ---------------------------------------------------------------------------------------------


def test_dropout_acts_on_the_lora_branch_only(rng):
    base = randomize(Linear(6, 5, rng=rng), rng)
    x = rng.standard_normal((4, 6))
    y_base = base(x)
    layer = LoRALinear(base, r=2, alpha=3.0, dropout=0.5, rng=rng)
    np.testing.assert_array_equal(layer(x), y_base)           # B = 0: dropout cannot touch W x + b
    randomize(layer, rng)                                       # (changes the shared b too)
    y_base = x @ layer.W.T + layer.b
    y = layer(x)
    mask = layer.__dict__["_cache"][1].dropout_mask
    assert set(np.unique(mask)) == {0.0, 2.0}                   # inverted dropout: 0 or 1/(1 − p)
    np.testing.assert_allclose(y - y_base, layer.scale * ((x * mask) @ layer.A.T) @ layer.B.T,
                               rtol=1e-12, atol=1e-12)


def test_dropout_eval_mode_is_deterministic_and_dropout_free(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, dropout=0.3, rng=rng), rng)
    x = rng.standard_normal((4, 6))
    assert not np.array_equal(layer(x), layer(x))                # training: a new mask each time
    layer.eval()
    y1, y2 = layer(x), layer(x)
    np.testing.assert_array_equal(y1, y2)
    expected, _ = F.lora_linear_forward(x, layer.W, layer.b, layer.A, layer.B, layer.scale)
    np.testing.assert_array_equal(y1, expected)
    layer.train()
    assert layer.training


def test_dropout_preserves_the_expected_value():
    rng = np.random.default_rng(0)
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, dropout=0.3, rng=rng), rng)
    x = np.tile(rng.standard_normal(6), (40000, 1))             # the same row 40000 times
    base = x[:1] @ layer.W.T + layer.b
    branch_train = (layer(x) - base).mean(axis=0)
    layer.eval()
    branch_eval = (layer(x[:1]) - base)[0]
    # each training row is an independent draw: the mean is within a few standard errors
    stderr = (layer.train()(x) - base).std(axis=0) / np.sqrt(len(x))
    assert np.all(np.abs(branch_train - branch_eval) < 5 * stderr)
    assert np.all(stderr < 0.02 * np.abs(branch_eval).max())


# ---------------------------------------------------------------------------------------------
# float32 end to end with LoRA
# ---------------------------------------------------------------------------------------------

F32 = {
    "LoRALinear": lambda: LoRALinear(Linear(8, 8, rng=0, dtype=np.float32), r=2, alpha=4.0, dropout=0.1, rng=1),
    "MLP": lambda: add_lora(MLP(8, 12, 8, rng=0, dtype=np.float32), ["fc1", "fc2"], r=2, alpha=4.0,
                            dropout=0.1, rng=1),
    "MHA": lambda: add_lora(MultiHeadAttention(8, 2, causal=True, rng=0, dtype=np.float32),
                            ["q_proj", "v_proj"], r=2, alpha=4.0, rng=1),
    "Block": lambda: add_lora(TransformerBlock(8, 2, 12, rng=0, dtype=np.float32), ALL_LINEAR, r=2,
                              alpha=4.0, rslora=True, rng=1),
}


@pytest.mark.parametrize("name", list(F32))
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_float32_lora_model_stays_float32(name, opt):
    model = F32[name]()
    assert all(p.dtype == np.float32 for p in model.parameters().values())
    optim = (Adam(model, lr=1e-2, weight_decay=0.1, lr_multipliers={"B": 4.0}) if opt == "adam"
             else SGD(model, lr=1e-2, momentum=0.9, lr_multipliers={"B": 4.0}))
    rng = np.random.default_rng(0)
    for _ in range(3):
        y = model(rng.standard_normal((2, 3, 8)))
        assert y.dtype == np.float32
        optim.zero_grad()
        dx = model.backward(rng.standard_normal(y.shape))
        assert dx.dtype == np.float32
        assert all(g.dtype == np.float32 for g in model.gradients().values())
        optim.step()
        assert all(p.dtype == np.float32 for p in model.parameters().values())
    for m in lora_layers(model).values():
        assert m.delta_weight().dtype == np.float32
    merge_lora(model)
    assert all(p.dtype == np.float32 for p in model.parameters().values())
    assert model(np.ones((1, 2, 8))).dtype == np.float32


# ---------------------------------------------------------------------------------------------
# adapter files
# ---------------------------------------------------------------------------------------------


def _trained_block(seed=1):
    blk = add_lora(TransformerBlock(8, 2, 12, rng=0), ["q_proj", "v_proj", "fc2"], r=2, alpha=4.0, rng=seed)
    randomize(blk, np.random.default_rng(seed + 10), b_scale=0.5)
    return blk


def test_adapter_round_trip_reproduces_outputs_exactly(tmp_path):
    trained = _trained_block(seed=1)
    path = tmp_path / "adapter.npz"
    save_adapter(trained, path)
    fresh = add_lora(TransformerBlock(8, 2, 12, rng=0), ["q_proj", "v_proj", "fc2"], r=2, alpha=4.0, rng=99)
    # the trained block's LayerNorms etc. were randomized too: copy the frozen base weights over
    for n, p in fresh.parameters().items():
        if not n.endswith((".A", ".B")):
            p[...] = trained.parameters()[n]
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    assert not np.array_equal(fresh(x), trained(x))
    load_adapter(fresh, path)
    np.testing.assert_array_equal(fresh(x), trained(x))


def test_adapter_file_holds_only_A_B_and_config(tmp_path):
    trained = _trained_block()
    path = tmp_path / "adapter.npz"
    save_adapter(trained, path)
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        assert keys == {"__config__"} | {f"{p}.{n}" for p in ("attn.q_proj", "attn.v_proj", "mlp.fc2")
                                         for n in "AB"}
        for p, m in lora_layers(trained).items():
            np.testing.assert_array_equal(f[f"{p}.A"], m.A)
            np.testing.assert_array_equal(f[f"{p}.B"], m.B)
        config = json.loads(str(f["__config__"]))
    assert config["layers"]["mlp.fc2"]["r"] == 2 and config["layers"]["mlp.fc2"]["d_in"] == 12
    assert config["layers"]["mlp.fc2"]["alpha"] == 4.0


def test_adapter_path_without_npz_suffix(tmp_path):
    trained = _trained_block()
    path = tmp_path / "adapter.bin"
    save_adapter(trained, path)
    assert os.listdir(tmp_path) == ["adapter.bin"]
    fresh = _trained_block(seed=2)
    load_adapter(fresh, path)
    for n, p in lora_layers(trained).items():
        np.testing.assert_array_equal(lora_layers(fresh)[n].B, p.B)


def test_save_adapter_without_lora_raises(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(MLP(3, 4, 2), tmp_path / "a.npz")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# bad input: one test per case (exception type, message with expected and got, object unchanged)
# ---------------------------------------------------------------------------------------------


def _assert_lora_rejected(exc, pattern, **kwargs):
    """Both LoRALinear(...) and add_lora(...) reject the arguments; nothing changes."""
    base = Linear(6, 4, rng=0)
    snap_base = Snapshot(base)
    with pytest.raises(exc, match=pattern):
        LoRALinear(base, **kwargs)
    snap_base.assert_unchanged()
    blk = TransformerBlock(8, 2, 12, rng=0)
    snap = Snapshot(blk)
    with pytest.raises(exc, match=pattern):
        add_lora(blk, ["q_proj", "fc1"], **kwargs)
    snap.assert_unchanged()


@pytest.mark.parametrize("r", [0, -2])
def test_rank_below_one_raises(r):
    _assert_lora_rejected(ValueError, rf"r must be >= 1, got r={r}", r=r, alpha=2.0)


@pytest.mark.parametrize("r", [2.0, 1.5, "2", True])
def test_non_integer_rank_raises(r):
    _assert_lora_rejected(TypeError, rf"r must be an int, got {r!r}".replace("(", r"\(").replace(".", r"\."),
                          r=r, alpha=2.0)


def test_rank_above_min_dims_raises():
    base = Linear(6, 4, rng=0)
    snap = Snapshot(base)
    with pytest.raises(ValueError, match=r"min\(d_in, d_out\) = 4, got r=5"):
        LoRALinear(base, r=5, alpha=2.0)
    snap.assert_unchanged()
    blk = TransformerBlock(8, 2, 12, rng=0)
    snap = Snapshot(blk)
    with pytest.raises(ValueError, match=r"min\(d_in, d_out\) = 8, got r=9"):
        add_lora(blk, ["q_proj", "fc1"], r=9, alpha=2.0)
    snap.assert_unchanged()


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_alpha_not_positive_raises(alpha):
    _assert_lora_rejected(ValueError, rf"alpha must be a finite number > 0, got alpha={float(alpha)}",
                          r=2, alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.1"])
def test_bad_dropout_raises(dropout):
    _assert_lora_rejected(ValueError, rf"dropout must be a probability in \[0, 1\), got {dropout!r}",
                          r=2, alpha=2.0, dropout=dropout)


def test_bad_init_name_raises():
    _assert_lora_rejected(ValueError, r"init must be one of \(.*'kaiming'.*\), got 'xavier'",
                          r=2, alpha=2.0, init="xavier")


def test_lora_on_a_non_linear_module_raises():
    ln = LayerNorm(4)
    snap = Snapshot(ln)
    with pytest.raises(TypeError, match="wraps a Linear layer, got LayerNorm"):
        LoRALinear(ln, r=1, alpha=2.0)
    snap.assert_unchanged()


def test_wrong_input_width_to_lora_layer_raises(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    y = layer(rng.standard_normal((2, 6)))
    snap = Snapshot(layer)
    with pytest.raises(ValueError, match=r"last dimension 6, got shape \(2, 5\)"):
        layer(rng.standard_normal((2, 5)))
    snap.assert_unchanged()
    layer.backward(np.ones_like(y))


def test_lora_backward_before_forward_raises(rng):
    layer = LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng)
    snap = Snapshot(layer)
    with pytest.raises(ValueError, match="backward called before forward"):
        layer.backward(np.ones((2, 5)))
    snap.assert_unchanged()


def test_lora_upstream_gradient_of_wrong_shape_raises(rng):
    layer = LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng)
    layer(rng.standard_normal((2, 6)))
    snap = Snapshot(layer)
    with pytest.raises(ValueError, match=r"shape \(2, 5\), got \(5, 2\)"):
        layer.backward(np.ones((5, 2)))
    snap.assert_unchanged()


def test_unknown_target_raises():
    blk = TransformerBlock(8, 2, 12, rng=0)
    snap = Snapshot(blk)
    with pytest.raises(ValueError, match=r"unknown target 'query'.*\['attn.k_proj', 'attn.o_proj', "
                                         r"'attn.q_proj', 'attn.v_proj', 'mlp.fc1', 'mlp.fc2'\]"):
        add_lora(blk, ["q_proj", "query"], r=2, alpha=4.0)
    snap.assert_unchanged()


@pytest.mark.parametrize("target, kind", [("ln1", "LayerNorm"), ("attn", "MultiHeadAttention"), ("mlp", "MLP")])
def test_non_linear_target_raises(target, kind):
    blk = TransformerBlock(8, 2, 12, rng=0)
    snap = Snapshot(blk)
    with pytest.raises(TypeError, match=rf"target '{target}' names '{target}', a {kind}, not a Linear; "
                                        r"Linear layers are \['attn.k_proj'"):
        add_lora(blk, ["q_proj", target], r=2, alpha=4.0)
    snap.assert_unchanged()


def test_empty_targets_raise():
    blk = TransformerBlock(8, 2, 12, rng=0)
    snap = Snapshot(blk)
    with pytest.raises(ValueError, match="targets is empty"):
        add_lora(blk, [], r=2, alpha=4.0)
    snap.assert_unchanged()


def test_adding_lora_twice_raises():
    blk = add_lora(TransformerBlock(8, 2, 12, rng=0), ["q_proj"], r=2, alpha=4.0)
    randomize(blk, np.random.default_rng(0))
    snap = Snapshot(blk)
    with pytest.raises(ValueError, match="'attn.q_proj' already has LoRA"):
        add_lora(blk, ["v_proj", "q_proj"], r=2, alpha=4.0)
    snap.assert_unchanged()


def test_wrapping_a_lora_layer_again_raises():
    layer = LoRALinear(Linear(6, 5), r=2, alpha=4.0)
    snap = Snapshot(layer)
    with pytest.raises(TypeError, match="wraps a Linear layer, got LoRALinear"):
        LoRALinear(layer, r=2, alpha=4.0)
    snap.assert_unchanged()


def _saved(tmp_path, **kw):
    args = dict(d_hidden=12, targets=["q_proj", "v_proj", "fc2"], r=2, alpha=4.0) | kw
    blk = add_lora(TransformerBlock(8, 2, args["d_hidden"], rng=0), args["targets"], r=args["r"],
                   alpha=args["alpha"], rng=1)
    randomize(blk, np.random.default_rng(2))
    path = tmp_path / "adapter.npz"
    save_adapter(blk, path)
    return path


def _target_model():
    model = _trained_block(seed=5)
    return model, Snapshot(model)


def test_loading_an_adapter_for_other_shapes_raises(tmp_path):
    path = _saved(tmp_path, d_hidden=16)                   # fc2 is 16 -> 8 in the file, 12 -> 8 here
    model, snap = _target_model()
    with pytest.raises(ValueError, match="'mlp.fc2' was saved with d_in=16, the model has d_in=12"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_an_adapter_with_arrays_of_other_shapes_raises(tmp_path):
    """A file whose config matches but whose arrays do not (hand-edited): the shape check."""
    path = _saved(tmp_path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["mlp.fc2.A"] = np.zeros((2, 13))
    np.savez(path, **arrays)
    model, snap = _target_model()
    with pytest.raises(ValueError, match=r"mlp.fc2.A has shape \(2, 13\) in the file, the model expects \(2, 12\)"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_an_adapter_of_other_rank_raises(tmp_path):
    path = _saved(tmp_path, r=4)
    model, snap = _target_model()
    with pytest.raises(ValueError, match="saved with r=4, the model has r=2"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_an_adapter_for_other_layers_raises(tmp_path):
    path = _saved(tmp_path, targets=["q_proj", "k_proj"])
    model, snap = _target_model()
    with pytest.raises(ValueError, match=r"adapts layers \['attn.k_proj', 'attn.q_proj'\], the model has "
                                         r"LoRA on \['attn.q_proj', 'attn.v_proj', 'mlp.fc2'\]"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_random_bytes_raises(tmp_path):
    path = tmp_path / "adapter.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    model, snap = _target_model()
    with pytest.raises(ValueError, match="is not a lora_np adapter \\(\\.npz\\)"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_a_truncated_zip_raises(tmp_path):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    model, snap = _target_model()
    with pytest.raises(ValueError, match="is not a lora_np adapter \\(\\.npz\\)"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_a_zip_with_corrupted_bytes_raises(tmp_path):
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:                       # flip a byte inside fc2.B's data
        info = z.getinfo("mlp.fc2.B.npy")
    raw[info.header_offset + 200] ^= 0xFF
    path.write_bytes(bytes(raw))
    model, snap = _target_model()
    with pytest.raises(ValueError, match="is not a lora_np adapter \\(\\.npz\\).*CRC"):
        load_adapter(model, path)
    snap.assert_unchanged()


class _Boom:
    """Unpickling this creates a directory: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_an_object_array_never_unpickles(tmp_path):
    path = _saved(tmp_path)
    marker = str(tmp_path / "UNPICKLED")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["mlp.fc2.A"] = np.array([_Boom(marker)], dtype=object)
    np.savez(path, **arrays)                               # np.savez pickles object arrays
    model, snap = _target_model()
    with pytest.raises(ValueError, match="not a lora_np adapter \\(\\.npz\\).*Python objects"):
        load_adapter(model, path)
    assert not os.path.exists(marker)
    snap.assert_unchanged()


def _write_not_an_adapter(tmp_path, kind):
    """A file that is not an adapter: what a user might pass to load_adapter by mistake."""
    path = tmp_path / f"file.{kind}"
    if kind in ("npy", "object-npy"):
        arr = np.ones(3) if kind == "npy" else np.array([_Boom(str(tmp_path / "UNPICKLED"))], dtype=object)
        with open(path, "wb") as fh:                            # np.save(path) would append ".npy"
            np.save(fh, arr, allow_pickle=True)
    elif kind == "txt":
        path.write_text("r = 2, alpha = 4\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(_Boom(str(tmp_path / "UNPICKLED"))))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip-magic":                                  # starts like a zip, is not one
        path.write_bytes(b"PK\x03\x04" + bytes(200))
    return path


NOT_ADAPTERS = {
    "npy": r"it is a \.npy file \(one array\)",
    "object-npy": r"it is a \.npy file",
    "txt": "it is not a zip archive",
    "pickle": "it is not a zip archive",
    "empty": "it is not a zip archive",
    "zip-magic": "it is not a zip archive",
}


@pytest.mark.parametrize("kind", list(NOT_ADAPTERS))
def test_loading_a_file_that_is_not_an_adapter_says_so_without_pickle_advice(tmp_path, kind):
    path = _write_not_an_adapter(tmp_path, kind)
    model, snap = _target_model()
    with pytest.raises(ValueError, match=rf"load_adapter: .*file\.{kind} is not a lora_np adapter "
                                         rf"\(\.npz\): {NOT_ADAPTERS[kind]}") as info:
        load_adapter(model, path)
    assert "allow_pickle" not in str(info.value) and "pickle.load" not in str(info.value)
    assert not os.path.exists(tmp_path / "UNPICKLED")
    snap.assert_unchanged()


def _resource_warnings(fn, path):
    """Run ``fn`` (which raises) and collect the ResourceWarnings about ``path`` it leaves: a
    file left open warns when it is garbage-collected, after the exception (and its traceback,
    which holds the file) is gone."""
    gc.collect()                                       # earlier tests' garbage: not counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception:
            pass
        gc.collect()
    return [str(w.message) for w in caught
            if issubclass(w.category, ResourceWarning) and str(path) in str(w.message)]


def test_the_resource_warning_check_sees_an_unclosed_file(tmp_path):
    """The check below can fail: np.load(path) on a damaged zip leaves the file open."""
    path = _write_not_an_adapter(tmp_path, "zip-magic")
    assert any("unclosed file" in w for w in _resource_warnings(lambda: np.load(path, allow_pickle=False), path))


@pytest.mark.parametrize("kind", ["zip-magic", "truncated", "npy", "txt", "object-npz"])
def test_loading_a_bad_file_closes_it(tmp_path, kind):
    if kind == "truncated":
        path = _saved(tmp_path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "object-npz":
        path = tmp_path / "objects.npz"
        np.savez(path, a=np.array([{"a": 1}], dtype=object))
    else:
        path = _write_not_an_adapter(tmp_path, kind)
    model, _ = _target_model()
    assert _resource_warnings(lambda: load_adapter(model, path), path) == []


def test_loading_a_file_without_config_raises(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, **{"attn.q_proj.A": np.zeros((2, 8))})
    model, snap = _target_model()
    with pytest.raises(ValueError, match="no '__config__' entry"):
        load_adapter(model, path)
    snap.assert_unchanged()


def test_loading_a_missing_file_raises(tmp_path):
    model, snap = _target_model()
    with pytest.raises(ValueError, match=r"not a lora_np adapter \(\.npz\): cannot open the file"):
        load_adapter(model, tmp_path / "nope.npz")
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["MLP", "Block"])
def test_unfrozen_lora_model_trains_everything_gradcheck(rng, name):
    """add_lora then unfreeze(): full fine-tuning *and* LoRA. The adapted layers' W and b are
    trainable then and must get their true gradient (Gᵀ X, Σ G), not a silent zero."""
    if name == "MLP":
        model = add_lora(MLP(5, 7, 4, rng=rng), ["fc1", "fc2"], r=2, alpha=5.0, rng=rng)
        x = rng.standard_normal((3, 5))
    else:
        model = add_lora(TransformerBlock(8, 2, 12, rng=rng), ["q_proj", "fc1"], r=2, alpha=6.0, rng=rng)
        x = rng.standard_normal((1, 3, 8))
    model.unfreeze()
    randomize(model, rng)
    expect = set(model.parameters()) | {"x"}           # (the key bias is checked to be 0)
    assert {"fc1.W", "fc1.A"} <= expect or {"mlp.fc1.W", "mlp.fc1.A"} <= expect
    assert_module_grads(model, x, expect=expect)


def test_lora_with_dropout_and_only_the_bias_trainable_gets_db(rng):
    """W frozen, b trainable, dropout on: the forward keeps X̃ but not X (W needs no dW); the
    bias gradient Σ G must still come (it used to fail on the missing X)."""
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, dropout=0.5, rng=rng), rng)
    layer.unfreeze()
    layer.freeze(["W"])
    x, dy = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 5))
    layer(x)
    layer.zero_grad()
    layer.backward(dy)
    assert sorted(layer.gradients()) == ["A", "B", "b"]
    np.testing.assert_allclose(layer.gradients()["b"], dy.sum(axis=(0, 1)), rtol=1e-14)


def test_merge_lora_names_the_layer_that_cannot_be_merged(rng):
    mlp = add_lora(MLP(4, 5, 3, rng=rng), ["fc1", "fc2"], r=2, alpha=1000.0, rng=rng)
    mlp.fc2.B[...] = 1e308
    with pytest.raises(ValueError, match=r"merge_lora: layer 'fc2' cannot be merged, model left "
                                         r"unchanged: LoRALinear.merge: expected W \+ ΔW to be finite"):
        merge_lora(mlp)


def test_merging_between_forward_and_backward_is_refused(rng):
    """merge() changes W in place, and the pending forward's cache refers to W: backward would
    compute dX with the merged weight (it used to, silently)."""
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    y = layer(rng.standard_normal((2, 6)))
    layer.merge()
    with pytest.raises(ValueError, match=r"the layer is merged .*call unmerge\(\) before training"):
        layer.backward(np.ones_like(y))

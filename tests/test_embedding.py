"""Tests for the embedding layers: ``Embedding`` and ``ModuleList`` (lora_np.modules) and
``LoRAEmbedding`` with ``add_lora`` / merge / adapter files (lora_np.lora) — gradient checks with
repeated ids, the id checks, the forward/backward rule, float32, and bad input (object unchanged)."""

import numpy as np
import pytest
from conftest import GRAD_RECORDS, THRESHOLD, Snapshot, _current_test

from lora_np import (Adam, Embedding, Linear, LoRAEmbedding, LoRALinear, Module, ModuleList, add_lora,
                     load_adapter, lora_layers, merge_lora, no_grad, randomize_lora, save_adapter,
                     unmerge_lora)
from lora_np import functional as F
from lora_np.gradcheck import check_gradients

#: ids with repeats (0 three times, 3 twice) and ids that never occur (2, 5)
IDS = np.array([[0, 3, 0], [1, 3, 4], [0, 1, 1]])


def assert_token_grads(module, ids, expect):
    """``check_gradients`` on integer ids (no input gradient): every trainable parameter on its
    own, the checked names exactly ``expect``, none all-zero, every one within the threshold."""
    rows = check_gradients(module, ids, threshold=THRESHOLD, check_input=False)
    assert {r.name for r in rows} == set(expect)
    for r in rows:
        GRAD_RECORDS.append((_current_test(), r.name, r.rel_error))
        assert r.grad_norm > 0, f"{r.name}: analytic gradient is all zeros"
        assert r.passed, f"{r.name}: {r.reason}"
    return rows


class _Tiny(Module):
    """ids (B, T) -> emb -> lin: an embedding feeding a linear layer."""

    def __init__(self, rng=0):
        super().__init__()
        self.emb = Embedding(6, 4, rng=rng)
        self.lin = Linear(4, 3, rng=rng)

    def forward(self, idx):
        return self.lin(self.emb(idx))

    def backward(self, dout):
        return self.emb.backward(self.lin.backward(dout))


def _lora_tiny(**kwargs):
    model = add_lora(_Tiny(), ["emb", "lin"], r=2, alpha=3.0, rng=1, **kwargs)
    return randomize_lora(model, rng=2)           # B off 0; the frozen base stays as built


# ---------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [IDS, IDS[0], IDS[:, :, None]], ids=["2d", "1d", "3d"])
def test_embedding_gradcheck(ids):
    emb = Embedding(6, 4, rng=0)
    assert_token_grads(emb, ids, {"W"})


def test_embedding_forward_is_a_lookup_and_backward_a_scatter_add(rng):
    emb = Embedding(6, 4, rng=0)
    y = emb(IDS)
    np.testing.assert_array_equal(y, emb.W[IDS])
    dy = rng.integers(-4, 4, size=y.shape).astype(np.float64)      # exact sums
    assert emb.backward(dy) is None                                # ids have no gradient
    g = emb.gradients()["W"]
    np.testing.assert_array_equal(g[0], dy[0, 0] + dy[0, 2] + dy[2, 0])   # id 0, three times
    np.testing.assert_array_equal(g[[2, 5]], 0.0)                  # ids that never occur


def test_embedding_init_and_reproducibility():
    a, b = Embedding(500, 40, rng=3), Embedding(500, 40, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.W, b.W)
    assert abs(a.W.std() - 1.0) < 0.02                              # N(0, 1): nn.Embedding's init
    assert abs(Embedding(500, 40, rng=3, std=0.02).W.std() - 0.02) < 0.001


def test_embedding_float32_stays_float32(rng):
    emb = Embedding(6, 4, rng=0, dtype=np.float32)
    opt = Adam(emb, lr=1e-2)
    for _ in range(2):
        y = emb(IDS)
        assert y.dtype == np.float32
        opt.zero_grad()
        emb.backward(rng.standard_normal(y.shape))                  # a float64 upstream gradient
        assert emb.gradients()["W"].dtype == np.float32
        opt.step()
        assert emb.W.dtype == np.float32


def test_frozen_embedding_gets_no_gradient_and_unfreezing_before_backward_works(rng):
    emb = Embedding(6, 4, rng=0).freeze()
    y = emb(IDS)
    emb.backward(np.ones_like(y))
    assert emb.gradients() == {}
    dy = rng.standard_normal(y.shape)
    emb(IDS)
    emb.unfreeze()                              # the ids are always kept: dW can still be formed
    emb.backward(dy)
    np.testing.assert_array_equal(emb.gradients()["W"], F.embedding_backward(dy, F.embedding_forward(IDS, emb.W)[1]))


@pytest.mark.parametrize("ids, exc, pattern", [
    (IDS.astype(np.float64), TypeError, "Embedding: idx must be an integer array of ids, got dtype float64"),
    (IDS > 0, TypeError, "got dtype bool"),
    (IDS - 1, ValueError, r"ids must lie in \[0, 6\), got ids in \[-1, 3\]"),
    (IDS + 2, ValueError, r"ids must lie in \[0, 6\), got ids in \[2, 6\]"),
], ids=["float", "bool", "negative", "too-large"])
def test_bad_ids_raise_and_leave_the_layer_unchanged(ids, exc, pattern):
    emb = Embedding(6, 4, rng=0)
    y = emb(IDS)                                       # a pending forward that must survive
    snap = Snapshot(emb)
    with pytest.raises(exc, match=pattern):
        emb(ids)
    snap.assert_unchanged()
    emb.backward(np.ones_like(y))


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"num_embeddings": 0}, ValueError, "num_embeddings must be >= 1, got num_embeddings=0"),
    ({"d_model": 4.0}, TypeError, r"d_model must be an int, got 4\.0"),
    ({"std": 0.0}, ValueError, "std must be a finite number > 0"),
    ({"dtype": np.int32}, TypeError, "float32 or float64, got int32"),
], ids=["zero-rows", "float-width", "std-0", "int-dtype"])
def test_bad_embedding_arguments_raise(kwargs, exc, pattern):
    args = {"num_embeddings": 6, "d_model": 4, **kwargs}
    with pytest.raises(exc, match=pattern):
        Embedding(**args)


def test_embedding_keeps_the_forward_backward_rule(rng):
    emb = Embedding(6, 4, rng=0)
    dy = rng.standard_normal((3, 3, 4))
    emb(IDS)
    emb.eval()
    emb(IDS[::-1])                                    # a validation forward in between ...
    emb.train()
    with no_grad():
        emb(IDS[::-1])
    emb.backward(dy)                                  # ... does not change what backward sees
    want = F.embedding_backward(dy, F.embedding_forward(IDS, emb.W)[1])
    np.testing.assert_array_equal(emb.gradients()["W"], want)
    with pytest.raises(ValueError, match="already consumed"):
        emb.backward(dy)
    with pytest.raises(ValueError, match="upstream gradient must have the output's shape"):
        emb(IDS)
        emb.backward(np.ones((3, 3, 5)))


class _TwoLookups(Module):
    """One Embedding object registered as two children (tied tables): refused in training mode."""

    def __init__(self):
        super().__init__()
        self.a = self.b = Embedding(6, 4, rng=0)

    def forward(self, idx):
        return self.a(idx) + self.b(idx)

    def backward(self, dout):
        self.a.backward(dout)
        self.b.backward(dout)


def test_an_embedding_used_twice_in_one_forward_is_refused():
    with pytest.raises(ValueError, match="is used twice in one forward pass"):
        _TwoLookups()(IDS)
    with no_grad():
        _TwoLookups()(IDS)                            # nothing cached: fine


# ---------------------------------------------------------------------------------------------
# ModuleList
# ---------------------------------------------------------------------------------------------


def test_module_list_names_its_children_by_index():
    class Stack(Module):
        def __init__(self):
            super().__init__()
            self.blocks = ModuleList([Linear(4, 4, rng=i) for i in range(3)])

    s = Stack()
    assert len(s.blocks) == 3 and s.blocks[-1] is s.blocks[2] and list(s.blocks) == [s.blocks[i] for i in range(3)]
    assert sorted(s.parameters()) == [f"blocks.{i}.{n}" for i in range(3) for n in ("W", "b")]
    add_lora(s, ["blocks.1"], r=1, alpha=2.0)           # a dotted path through the list
    assert isinstance(s.blocks[1], LoRALinear) and set(lora_layers(s)) == {"blocks.1"}
    assert not isinstance(s.blocks[0], LoRALinear)


def test_module_list_bad_input():
    with pytest.raises(TypeError, match="ModuleList holds lora_np Modules, got int at index 1"):
        ModuleList([Linear(2, 2), 3])
    ml = ModuleList([Linear(2, 2)])
    with pytest.raises(IndexError, match=r"index must be in \[-1, 1\), got 1"):
        ml[1]
    with pytest.raises(TypeError, match="index must be an int"):
        ml["0"]


# ---------------------------------------------------------------------------------------------
# LoRAEmbedding
# ---------------------------------------------------------------------------------------------


def test_lora_embedding_starts_equal_to_its_base():
    base = Embedding(6, 4, rng=0)
    layer = LoRAEmbedding(base, r=2, alpha=3.0, rng=1)
    assert layer.A.shape == (2, 6) and layer.B.shape == (4, 2) and np.all(layer.B == 0)
    assert np.all(layer.A != 0)
    assert layer.W is base.W                          # shared, not copied
    np.testing.assert_array_equal(layer(IDS), base(IDS))
    assert set(layer.trainable_parameters()) == {"A", "B"}


def test_lora_embedding_gradcheck():
    layer = randomize_lora(LoRAEmbedding(Embedding(6, 4, rng=0), r=2, alpha=3.0, rng=1), rng=2)
    assert layer.scale == 1.5
    assert_token_grads(layer, IDS, {"A", "B"})
    layer.unfreeze()                                   # full fine-tuning of the adapted table
    assert_token_grads(layer, IDS, {"A", "B", "W"})


def test_model_with_lora_on_an_embedding_and_a_linear_gradcheck():
    assert_token_grads(_lora_tiny(), IDS, {"emb.A", "emb.B", "lin.A", "lin.B"})


def test_lora_embedding_rslora_scale():
    layer = LoRAEmbedding(Embedding(6, 4), r=4, alpha=2.0, rslora=True)
    assert layer.scale == 1.0


def test_lora_embedding_delta_weight_is_the_transposed_s_B_A():
    layer = randomize_lora(LoRAEmbedding(Embedding(6, 4, rng=0), r=2, alpha=3.0, rng=1), rng=2)
    dW = layer.delta_weight()
    assert dW.shape == (6, 4)
    np.testing.assert_array_equal(dW, F.lora_delta_weight(layer.A, layer.B, 1.5).T)


def test_lora_embedding_merge_and_unmerge():
    layer = randomize_lora(LoRAEmbedding(Embedding(6, 4, rng=0), r=2, alpha=3.0, rng=1), rng=2)
    W0 = layer.W.copy()
    y = layer(IDS)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(layer(IDS), y, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="the layer is merged"):
        layer.backward(np.ones_like(y))
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    np.testing.assert_allclose(layer.W, W0, rtol=0, atol=1e-14)
    layer(IDS)
    layer.merge()                                      # merged between forward and backward
    with pytest.raises(ValueError, match="the layer is merged"):
        layer.backward(np.ones_like(y))


def test_lora_embedding_float32_stays_float32(rng):
    layer = LoRAEmbedding(Embedding(6, 4, rng=0, dtype=np.float32), r=2, alpha=3.0, rng=1)
    assert layer.A.dtype == layer.B.dtype == np.float32
    y = layer(IDS)
    assert y.dtype == np.float32
    layer.backward(rng.standard_normal(y.shape))
    assert all(g.dtype == np.float32 for g in layer.gradients().values())


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: LoRAEmbedding(Linear(4, 3), 1, 1.0), TypeError, "LoRAEmbedding wraps an Embedding, got Linear"),
    (lambda: LoRAEmbedding(Embedding(6, 4), 5, 1.0), ValueError,
     r"1 <= r <= min\(num_embeddings, d_model\) = 4, got r=5"),
    (lambda: LoRAEmbedding(Embedding(6, 4), 0, 1.0), ValueError, "r must be >= 1"),
    (lambda: LoRAEmbedding(Embedding(6, 4), 2, -1.0), ValueError, "alpha must be a finite number > 0"),
    (lambda: LoRALinear(Embedding(6, 4), 2, 1.0), TypeError, "LoRALinear wraps a Linear layer, got Embedding"),
], ids=["not-embedding", "r-too-big", "r-0", "alpha<0", "lora-linear-on-embedding"])
def test_bad_lora_embedding_arguments_raise(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_lora_embedding_ids_are_checked():
    layer = LoRAEmbedding(Embedding(6, 4), 2, 1.0)
    with pytest.raises(ValueError, match=r"LoRAEmbedding: ids must lie in \[0, 6\)"):
        layer(IDS + 3)


# ---------------------------------------------------------------------------------------------
# add_lora, merge_lora, adapter files with an embedding
# ---------------------------------------------------------------------------------------------


def test_add_lora_targets_an_embedding_by_name():
    model = _lora_tiny()
    assert isinstance(model.emb, LoRAEmbedding) and isinstance(model.lin, LoRALinear)
    assert set(lora_layers(model)) == {"emb", "lin"}
    assert sorted(model.trainable_parameters()) == ["emb.A", "emb.B", "lin.A", "lin.B"]
    assert np.all(model.emb.B != 0)                     # randomize_lora covers it


@pytest.mark.parametrize("kwargs, pattern", [
    ({"use_dora": True}, "'emb' is an Embedding; DoRA on an embedding is not supported"),
    ({"dropout": 0.1}, "'emb' is an Embedding, whose LoRA branch takes no dropout"),
    ({"init": "pissa"}, "'emb' is an Embedding, whose LoRA init is fixed"),
], ids=["dora", "dropout", "init"])
def test_add_lora_refuses_what_an_embedding_does_not_support(kwargs, pattern):
    model = _Tiny()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        add_lora(model, ["lin", "emb"], r=2, alpha=3.0, **kwargs)
    snap.assert_unchanged()


def test_add_lora_lists_embeddings_among_the_targets():
    with pytest.raises(ValueError, match=r"unknown target 'tok'; the Linear or Embedding layers of this "
                                         r"model are \['emb', 'lin'\]"):
        add_lora(_Tiny(), ["tok"], r=2, alpha=3.0)


def test_merge_lora_with_an_embedding_gives_the_same_outputs():
    model = _lora_tiny()
    y = model(IDS)
    merge_lora(model)
    assert model.emb.merged and model.lin.merged
    np.testing.assert_allclose(model(IDS), y, rtol=0, atol=1e-12)
    unmerge_lora(model)
    np.testing.assert_allclose(model(IDS), y, rtol=0, atol=1e-12)


def test_adapter_round_trip_with_an_embedding(tmp_path):
    trained = _lora_tiny()
    path = tmp_path / "adapter.npz"
    save_adapter(trained, path)
    fresh = add_lora(_Tiny(), ["emb", "lin"], r=2, alpha=3.0, rng=7)
    load_adapter(fresh, path)
    for name in ("emb.A", "emb.B", "lin.A", "lin.B"):
        np.testing.assert_array_equal(fresh.parameters()[name], trained.parameters()[name])
    np.testing.assert_array_equal(fresh(IDS), trained(IDS))


@pytest.mark.parametrize("make, pattern", [
    (lambda: add_lora(_Tiny(), ["emb", "lin"], r=1, alpha=3.0), "layer 'emb' was saved with r=2, the model has r=1"),
    (lambda: add_lora(_Tiny(), ["emb", "lin"], r=2, alpha=3.0, rslora=True), "was saved with rslora=False"),
    (lambda: add_lora(_Tiny(), ["lin"], r=2, alpha=3.0), r"adapts layers \['emb', 'lin'\], the model has LoRA on \['lin'\]"),
], ids=["rank", "rslora", "layers"])
def test_loading_an_embedding_adapter_into_a_different_model_raises(tmp_path, make, pattern):
    path = tmp_path / "adapter.npz"
    save_adapter(_lora_tiny(), path)
    model = make()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        load_adapter(model, path)
    snap.assert_unchanged()

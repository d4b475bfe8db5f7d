"""Tests for lora_np.modules (full fine-tuning): gradient checks of every module, the attention
key bias's structural zero gradient, causality, the parameter/gradient API, float32 end to end,
bad input (one test per case; the object is left unchanged) and the forward/backward rule
(pending cache, eval / no_grad forwards, consumed forwards, a module used twice)."""

import numpy as np
import pytest
from conftest import Snapshot, assert_module_grads, randomize

from lora_np import (SGD, Adam, DoRALinear, LayerNorm, Linear, LoRALinear, MLP, Module,
                     MultiHeadAttention, TransformerBlock, add_lora, no_grad)
from lora_np import functional as F

# ---------------------------------------------------------------------------------------------
# gradient checks, full fine-tuning (every parameter trainable)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape", [(4, 6), (2, 3, 6), (1, 6)], ids=["2d", "3d", "batch1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_gradcheck(rng, x_shape, bias):
    layer = randomize(Linear(6, 5, bias=bias, rng=rng), rng)
    assert_module_grads(layer, rng.standard_normal(x_shape), expect={"W", "b", "x"} if bias else {"W", "x"})


@pytest.mark.parametrize("x_shape", [(4, 6), (2, 3, 6), (1, 6)], ids=["2d", "3d", "batch1"])
def test_layer_norm_gradcheck(rng, x_shape):
    ln = randomize(LayerNorm(6), rng)
    assert_module_grads(ln, 2.0 * rng.standard_normal(x_shape) + 0.5, expect={"gamma", "beta", "x"})


MLP_NAMES = {"fc1.W", "fc1.b", "fc2.W", "fc2.b", "x"}


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("x_shape", [(4, 5), (2, 3, 5), (1, 5)], ids=["2d", "3d", "batch1"])
def test_mlp_gradcheck(rng, activation, x_shape):
    mlp = randomize(MLP(5, 7, 4, activation=activation, rng=rng), rng)
    x = rng.standard_normal(x_shape)
    if activation == "relu":      # stay away from relu's kink: no pre-activation within 1e-4 of 0
        assert np.abs(mlp.fc1(x)).min() > 1e-4
    assert_module_grads(mlp, x, expect=MLP_NAMES)


MHA_NAMES = {f"{p}.{n}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for n in ("W", "b")} | {"x"}


@pytest.mark.parametrize("n_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("x_shape", [(2, 4, 8), (1, 3, 8)], ids=["batch2", "batch1"])
def test_multi_head_attention_gradcheck(rng, n_heads, causal, x_shape):
    mha = randomize(MultiHeadAttention(8, n_heads, causal=causal, rng=rng), rng)
    assert_module_grads(mha, rng.standard_normal(x_shape), expect=MHA_NAMES)


BLOCK_NAMES = ({f"attn.{n}" for n in MHA_NAMES - {"x"}} | {"ln1.gamma", "ln1.beta", "ln2.gamma", "ln2.beta"}
               | {f"mlp.{n}" for n in MLP_NAMES - {"x"}} | {"x"})


@pytest.mark.parametrize("causal, activation, x_shape", [
    (True, "gelu", (2, 3, 8)), (True, "tanh", (1, 4, 8)),
    (False, "gelu", (1, 4, 8)), (False, "tanh", (2, 3, 8)),
], ids=["causal-gelu-batch2", "causal-tanh-batch1", "noncausal-gelu-batch1", "noncausal-tanh-batch2"])
def test_transformer_block_gradcheck(rng, causal, activation, x_shape):
    blk = randomize(TransformerBlock(8, 2, 12, causal=causal, activation=activation, rng=rng), rng)
    assert_module_grads(blk, rng.standard_normal(x_shape), expect=BLOCK_NAMES)


# ---------------------------------------------------------------------------------------------
# the attention key bias: its true gradient is zero for every input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_key_bias_gradient_is_structurally_zero(rng, causal):
    mha = randomize(MultiHeadAttention(8, 2, causal=causal, rng=rng), rng)
    assert mha.known_zero_gradients() == {"k_proj.b"}
    x = rng.standard_normal((2, 4, 8))
    y = mha(x)
    mha.zero_grad()
    mha.backward(rng.standard_normal(y.shape))
    g = mha.gradients()
    # q·b_k is added to a whole row of scores and softmax ignores that: dL/db_k = 0 ...
    assert np.linalg.norm(g["k_proj.b"]) <= 1e-12 * np.linalg.norm(g["k_proj.W"])
    assert np.linalg.norm(g["k_proj.W"]) > 0 and np.linalg.norm(g["q_proj.b"]) > 0
    # ... and the output does not depend on b_k at all
    mha.k_proj.b[...] += 5.0 * rng.standard_normal(8)
    y2 = mha(x)
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    # the checker marks that row structural_zero and checks both gradients are zero instead
    rows = {r.name: r for r in assert_module_grads(mha, x)}
    assert "k_proj.b" in rows and rows["k_proj.b"].passed and rows["k_proj.b"].structural_zero
    assert rows["k_proj.b"].grad_norm <= 1e-12


def test_transformer_block_names_its_key_bias():
    assert TransformerBlock(8, 2, 12).known_zero_gradients() == {"attn.k_proj.b"}


# ---------------------------------------------------------------------------------------------
# causality at module level
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mha", "block"])
@pytest.mark.parametrize("future", [1, 3])
def test_causal_module_does_not_look_ahead(rng, kind, future):
    model = (MultiHeadAttention(8, 2, causal=True, rng=rng) if kind == "mha"
             else randomize(TransformerBlock(8, 2, 12, causal=True, rng=rng), rng))
    x = rng.standard_normal((2, 5, 8))
    y = model(x)
    x2 = x.copy()
    x2[:, future] += 3.0 * rng.standard_normal((2, 8))
    y2 = model(x2)
    np.testing.assert_allclose(y2[:, :future], y[:, :future], rtol=1e-14, atol=1e-14)
    assert not np.allclose(y2[:, future], y[:, future])
    # a non-causal model with the same weights does see the future
    model_nc = (MultiHeadAttention(8, 2, causal=False, rng=np.random.default_rng(1)) if kind == "mha"
                else TransformerBlock(8, 2, 12, causal=False, rng=np.random.default_rng(1)))
    assert not np.allclose(model_nc(x2)[:, :future], model_nc(x)[:, :future])


def test_heads_split_the_last_dim_contiguously(rng):
    """One head = plain attention on the first d_head columns: compare with a hand computation."""
    mha = MultiHeadAttention(4, 2, rng=rng)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(mha, p).W[...] = np.eye(4)
    x = rng.standard_normal((1, 3, 4))
    y = mha(x)
    for h in range(2):
        xs = x[0, :, 2 * h:2 * h + 2]                      # head h sees columns 2h, 2h+1
        S = xs @ xs.T / np.sqrt(2)
        P = np.exp(S - S.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(y[0, :, 2 * h:2 * h + 2], P @ xs, rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# the parameter / gradient API
# ---------------------------------------------------------------------------------------------


def test_block_parameter_names_and_full_fine_tuning():
    blk = TransformerBlock(8, 2, 12)
    names = BLOCK_NAMES - {"x"}
    assert set(blk.parameters()) == names
    assert set(blk.trainable_parameters()) == names           # full fine-tuning by default
    assert set(blk.gradients()) == names
    assert blk.num_parameters() == 4 * (8 * 8 + 8) + 4 * 8 + (8 * 12 + 12) + (12 * 8 + 8)


def test_gradients_accumulate_and_zero_grad_resets(rng):
    mlp = MLP(3, 4, 2, rng=rng)
    x, d = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    mlp(x)
    mlp.backward(d)
    once = {n: g.copy() for n, g in mlp.gradients().items()}
    mlp(x)
    mlp.backward(d)
    for n, g in mlp.gradients().items():
        np.testing.assert_allclose(g, 2 * once[n], rtol=1e-15)
    mlp.zero_grad()
    assert all(np.all(g == 0) for g in mlp.gradients().values())


def test_parameters_are_the_live_arrays(rng):
    lin = Linear(3, 2, rng=rng)
    lin.parameters()["W"][0, 0] = 42.0
    assert lin.W[0, 0] == 42.0
    with pytest.raises(AttributeError, match="in place"):
        lin.W = np.zeros((2, 3))


def test_freeze_and_unfreeze(rng):
    mlp = MLP(3, 4, 2, rng=rng)
    mlp.freeze()
    assert mlp.trainable_parameters() == {} and mlp.gradients() == {}
    x = rng.standard_normal((2, 3))
    mlp(x)
    dx = mlp.backward(np.ones((2, 2)))          # dx still flows through frozen layers
    assert np.linalg.norm(dx) > 0
    mlp.unfreeze()
    assert set(mlp.trainable_parameters()) == MLP_NAMES - {"x"}


def test_seeded_construction_is_reproducible():
    a, b = TransformerBlock(8, 2, 12, rng=3), TransformerBlock(8, 2, 12, rng=np.random.default_rng(3))
    for n, p in a.parameters().items():
        np.testing.assert_array_equal(p, b.parameters()[n])
    c, d = MLP(3, 4, 2), MLP(3, 4, 2)          # rng=None is seed 0: reproducible too
    np.testing.assert_array_equal(c.fc1.W, d.fc1.W)


@pytest.mark.parametrize("make", [lambda: Linear(4, 3), lambda: LayerNorm(4), lambda: MLP(4, 5, 3),
                                  lambda: MultiHeadAttention(4, 2), lambda: TransformerBlock(4, 2, 6)],
                         ids=["Linear", "LayerNorm", "MLP", "MHA", "Block"])
def test_float64_is_the_default(make):
    m = make()
    assert all(p.dtype == np.float64 for p in m.parameters().values())
    x = np.ones((1, 2, 4), dtype=np.float32)
    assert m(x).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# float32 stays float32: outputs, every gradient, parameters after optimizer steps
# ---------------------------------------------------------------------------------------------

F32_MODELS = {
    "Linear": lambda: Linear(8, 8, rng=0, dtype=np.float32),
    "LayerNorm": lambda: LayerNorm(8, dtype=np.float32),
    "MLP": lambda: MLP(8, 12, 8, rng=0, dtype=np.float32),
    "MHA": lambda: MultiHeadAttention(8, 2, causal=True, rng=0, dtype=np.float32),
    "Block": lambda: TransformerBlock(8, 2, 12, causal=True, rng=0, dtype=np.float32),
}


@pytest.mark.parametrize("name", list(F32_MODELS))
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_float32_model_stays_float32(name, opt):
    model = F32_MODELS[name]()
    rng = np.random.default_rng(0)
    mult = {sorted(model.trainable_parameters())[0]: 2.0}
    optim = (Adam(model, lr=1e-2, weight_decay=0.1, lr_multipliers=mult) if opt == "adam"
             else SGD(model, lr=1e-2, momentum=0.9))
    for _ in range(3):
        x = rng.standard_normal((2, 3, 8))            # float64 input: cast to the model's dtype
        y = model(x)
        assert y.dtype == np.float32
        optim.zero_grad()
        dx = model.backward(rng.standard_normal(y.shape))   # float64 upstream gradient too
        assert dx.dtype == np.float32
        for n, g in model.gradients().items():
            assert g.dtype == np.float32, n
        optim.step()
        for n, p in model.parameters().items():
            assert p.dtype == np.float32, n
    state = optim.m | optim.v if opt == "adam" else optim.velocity
    assert state and all(a.dtype == np.float32 for a in state.values())


# ---------------------------------------------------------------------------------------------
# bad input: one test per case; the right exception, a message naming expected and got, and
# the object left exactly as it was
# ---------------------------------------------------------------------------------------------

MODELS_3D = {
    "Linear": lambda: Linear(8, 6, rng=0),
    "LayerNorm": lambda: LayerNorm(8),
    "MLP": lambda: MLP(8, 12, 6, rng=0),
    "MHA": lambda: MultiHeadAttention(8, 2, rng=0),
    "Block": lambda: TransformerBlock(8, 2, 12, rng=0),
}


@pytest.mark.parametrize("name", list(MODELS_3D))
def test_wrong_input_width_raises(name):
    model = MODELS_3D[name]()
    good = np.ones((2, 3, 8))
    y = model(good)                                  # a stored forward state that must survive
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"8.*got.*\(2, 3, 7\)"):
        model(np.ones((2, 3, 7)))
    snap.assert_unchanged()
    model.backward(np.ones_like(y))                   # the earlier forward is still usable


@pytest.mark.parametrize("name", ["MHA", "Block"])
@pytest.mark.parametrize("shape", [(3, 8), (2, 2, 3, 8)], ids=["2d", "4d"])
def test_attention_input_not_3d_raises(name, shape):
    model = MODELS_3D[name]()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"\(batch, seq, d_model=8\).*got.*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        model(np.ones(shape))
    snap.assert_unchanged()


@pytest.mark.parametrize("make", [lambda rng: MultiHeadAttention(10, 3, rng=rng),
                                  lambda rng: TransformerBlock(10, 3, 12, rng=rng)], ids=["MHA", "Block"])
def test_d_model_not_divisible_by_n_heads_raises(make):
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match="divisible by n_heads.*d_model=10, n_heads=3"):
        make(rng)
    assert rng.bit_generator.state == state          # nothing drawn from the caller's generator


@pytest.mark.parametrize("name", list(MODELS_3D))
def test_backward_before_forward_raises(name):
    model = MODELS_3D[name]()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="backward called before forward.*forward\\(x\\) first"):
        model.backward(np.ones((2, 3, 6 if name in ("Linear", "MLP") else 8)))
    snap.assert_unchanged()


@pytest.mark.parametrize("name", list(MODELS_3D))
def test_upstream_gradient_of_wrong_shape_raises(name):
    model = MODELS_3D[name]()
    y = model(np.ones((2, 3, 8)))
    snap = Snapshot(model)
    bad = y.shape[:-1] + (y.shape[-1] + 1,)
    with pytest.raises(ValueError, match=(r"shape \(2, 3, %d\), got \(2, 3, %d\)" % (y.shape[-1], bad[-1]))):
        model.backward(np.ones(bad))
    snap.assert_unchanged()
    model.backward(np.ones_like(y))                   # the forward state survived


def test_integer_input_raises_type_error():
    lin = Linear(3, 2)
    snap = Snapshot(lin)
    with pytest.raises(TypeError, match="float array, got dtype int64"):
        lin(np.ones((2, 3), dtype=np.int64))
    snap.assert_unchanged()


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'relu', 'tanh'\), got 'swish'"):
        MLP(3, 4, 2, activation="swish")


@pytest.mark.parametrize("args, exc, pattern", [
    ((0, 3), ValueError, "d_in must be >= 1, got d_in=0"),
    ((3.0, 3), TypeError, r"d_in must be an int, got 3\.0"),
    ((3, True), TypeError, "d_out must be an int, got True"),
], ids=["zero", "float", "bool"])
def test_bad_linear_dims_raise(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        Linear(*args)


def test_bad_dtype_raises():
    with pytest.raises(TypeError, match="float32 or float64, got int32"):
        Linear(3, 2, dtype=np.int32)


def test_bad_rng_raises():
    with pytest.raises(TypeError, match="Generator, an int seed or None, got str"):
        Linear(3, 2, rng="seed")


# ---------------------------------------------------------------------------------------------
# the forward/backward rule (Module's docstring): one pending cache per module, a training
# forward replaces it, backward consumes it; eval / no_grad forwards keep nothing and leave it
# alone; a module used twice in one forward is refused
# ---------------------------------------------------------------------------------------------

def _lora_block():
    return randomize(add_lora(TransformerBlock(8, 2, 12, rng=0), ["q_proj", "fc1"], r=2, alpha=3.0, rng=1),
                     np.random.default_rng(2))


def _dora_mlp():
    return randomize(add_lora(MLP(8, 12, 6, rng=0), ["fc1", "fc2"], r=2, alpha=3.0, use_dora=True, rng=1),
                     np.random.default_rng(2))


RULE_MODELS = {
    **MODELS_3D,
    "LoRALinear": lambda: randomize(LoRALinear(Linear(8, 6, rng=0), r=2, alpha=3.0, rng=1),
                                    np.random.default_rng(2)),
    "DoRALinear": lambda: randomize(DoRALinear(Linear(8, 6, rng=0), r=2, alpha=3.0, rng=1),
                                    np.random.default_rng(2)),
    "LoRA-Block": _lora_block,
    "DoRA-MLP": _dora_mlp,
}


def _grads_of(model, x, dy):
    """dx and every gradient of one plain forward(x) + backward(dy)."""
    model.zero_grad()
    model(x)
    dx = model.backward(dy)
    return dx, {n: g.copy() for n, g in model.gradients().items()}


def _assert_same_grads(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    assert sorted(got[1]) == sorted(want[1])
    for n in want[1]:
        np.testing.assert_array_equal(got[1][n], want[1][n], err_msg=n)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))


@pytest.mark.parametrize("name", list(RULE_MODELS))
@pytest.mark.parametrize("how", ["eval", "no_grad"])
def test_a_validation_forward_does_not_change_what_backward_differentiates(name, how):
    """The reproducer: ``m(x_tr); m.eval(); m(x_val); m.train(); m.backward(dY)`` used to
    return x_val's gradients (the shapes agree); it must return x_tr's."""
    model = RULE_MODELS[name]()
    x_tr, x_val = _data()
    dy = np.random.default_rng(1).standard_normal(model(x_tr).shape)
    want = _grads_of(model, x_tr, dy)
    model.zero_grad()
    model(x_tr)
    if how == "eval":
        model.eval()
        model(x_val)
        model.train()
    else:
        with no_grad():
            model(x_val)
    got = model.backward(dy), {n: g.copy() for n, g in model.gradients().items()}
    _assert_same_grads(got, want)


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_eval_and_no_grad_forwards_keep_no_cache(name):
    model = RULE_MODELS[name]()
    x, _ = _data()
    model.eval()
    y_eval = model(x)
    model.train()
    with no_grad():
        y_nograd = model(x)
    assert all(m.__dict__["_cache"] is None for _, m in model.named_modules())
    np.testing.assert_array_equal(y_eval, y_nograd)       # no dropout here: the same function
    np.testing.assert_array_equal(y_eval, model(x))       # ... as a training forward


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_backward_after_only_eval_forwards_says_so(name):
    model = RULE_MODELS[name]().eval()
    x, _ = _data()
    y = model(x)
    model.train()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"backward called after only forwards in eval mode, which keep "
                                         r"no cache for backward; run forward\(x\) first, in training mode"):
        model.backward(np.ones_like(y))
    snap.assert_unchanged()


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_backward_after_only_no_grad_forwards_says_so(name):
    model = RULE_MODELS[name]()
    x, _ = _data()
    with no_grad():
        y = model(x)
    with pytest.raises(ValueError, match=r"backward called after only forwards inside no_grad\(\)"):
        model.backward(np.ones_like(y))


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_second_backward_says_the_forward_was_consumed(name):
    model = RULE_MODELS[name]()
    x, _ = _data()
    y = model(x)
    model.backward(np.ones_like(y))
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"already consumed by an earlier backward; run forward\(x\) "
                                         r"first, in training mode \(each backward consumes one forward\)$"):
        model.backward(np.ones_like(y))
    snap.assert_unchanged()
    model.eval()
    model(x)                                              # an eval forward since: said too
    with pytest.raises(ValueError, match=r"already consumed.*The forwards since then ran in eval mode"):
        model.backward(np.ones_like(y))


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_a_new_training_forward_replaces_the_pending_one(name):
    model = RULE_MODELS[name]()
    x1, x2 = _data()
    dy = np.random.default_rng(1).standard_normal(model(x2).shape)
    want = _grads_of(model, x2, dy)
    model.zero_grad()
    model(x1)
    model(x2)
    _assert_same_grads((model.backward(dy), {n: g.copy() for n, g in model.gradients().items()}), want)


@pytest.mark.parametrize("name", list(RULE_MODELS))
def test_many_direct_forward_calls_then_a_step_work(name):
    """What the finite-difference checker does: forward(x) (the method, not __call__) many
    times in training mode and nothing else; then an ordinary forward + backward."""
    model = RULE_MODELS[name]()
    x, _ = _data()
    for _ in range(5):
        model.forward(x)
    dy = np.ones_like(model.forward(x))
    assert model.backward(dy).shape == x.shape


def test_no_grad_restores_recording_on_exit_and_on_error_and_nests():
    lin = Linear(8, 6, rng=0)
    x = np.ones((2, 8))
    with no_grad():
        with no_grad():
            lin(x)
        lin(x)
    assert lin.__dict__["_cache"] is None
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    lin(x)
    assert lin.__dict__["_cache"] is not None                # recording again


def test_no_grad_works_as_a_decorator():
    lin = Linear(8, 6, rng=0)

    @no_grad()
    def predict(x):
        return lin(x)
    predict(np.ones((2, 8)))
    assert lin.__dict__["_cache"] is None


def test_no_grad_keeps_dropout_on_in_training_mode():
    """no_grad only stops caching; eval() is what switches dropout off."""
    layer = randomize(LoRALinear(Linear(8, 6, rng=0), r=2, alpha=3.0, dropout=0.5, rng=1),
                      np.random.default_rng(2))
    x = np.ones((4, 8))
    with no_grad():
        assert not np.array_equal(layer(x), layer(x))
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))


# --- a module used twice in one forward -------------------------------------------------------

class _AppliesTwice(Module):
    """A parent whose forward applies the same layer twice: y = fc1(fc1(x))."""

    def __init__(self, direct=False):
        super().__init__()
        self.fc1 = Linear(8, 8, rng=0)
        self.direct = direct

    def forward(self, x):
        if self.direct:                                   # the method, not __call__
            return self.fc1.forward(self.fc1.forward(x))
        return self.fc1(self.fc1(x))

    def backward(self, dout):
        return self.fc1.backward(self.fc1.backward(dout))


class _SharedChild(Module):
    """One Linear object registered as two children, a and b: y = b(a(x))."""

    def __init__(self, shared):
        super().__init__()
        self.a = shared
        self.b = shared

    def forward(self, x):
        return self.b(self.a(x))

    def backward(self, dout):
        return self.a.backward(self.b.backward(dout))


TWICE = {
    "applied-twice": lambda: _AppliesTwice(),
    "applied-twice-via-forward": lambda: _AppliesTwice(direct=True),
    "shared-Linear": lambda: _SharedChild(Linear(8, 8, rng=0)),
    "shared-LoRALinear": lambda: _SharedChild(randomize(LoRALinear(Linear(8, 8, rng=0), r=2, alpha=3.0, rng=1),
                                                        np.random.default_rng(2))),
    "shared-DoRALinear": lambda: _SharedChild(randomize(DoRALinear(Linear(8, 8, rng=0), r=2, alpha=3.0, rng=1),
                                                        np.random.default_rng(2))),
    "shared-MLP": lambda: _SharedChild(MLP(8, 12, 8, rng=0)),
    "shared-MHA": lambda: _SharedChild(MultiHeadAttention(8, 2, rng=0)),
    "shared-Block": lambda: _SharedChild(TransformerBlock(8, 2, 12, rng=0)),
}


@pytest.mark.parametrize("name", list(TWICE))
@pytest.mark.parametrize("call", ["call", "forward"])
def test_a_module_used_twice_in_one_forward_is_refused(name, call):
    model = TWICE[name]()
    x, _ = _data()
    run = model if call == "call" else model.forward
    with pytest.raises(ValueError, match=r"is used twice in one forward pass.*would make backward "
                                         r"return a wrong gradient"):
        run(x)
    # and nothing half-done can be differentiated afterwards
    with pytest.raises(ValueError, match="raised an error part-way|before forward"):
        model.backward(np.ones((2, 3, 8)))


@pytest.mark.parametrize("name", list(TWICE))
def test_a_module_used_twice_is_fine_without_caching(name):
    model = TWICE[name]()
    x, _ = _data()
    with no_grad():
        y = model(x)
    model.eval()
    np.testing.assert_array_equal(model(x), y)


def test_a_module_used_in_two_separate_forwards_is_fine():
    """Two top-level calls are two forwards: the second replaces the first (no refusal)."""
    lin = Linear(8, 8, rng=0)
    x, _ = _data()
    lin(lin(x))                    # two calls from outside any forward: two passes
    lin.backward(np.ones((2, 3, 8)))


def test_a_forward_that_fails_part_way_leaves_nothing_to_differentiate(monkeypatch):
    """MLP: fc1 has cached, then the activation raises. A backward must not combine the MLP's
    old cache with fc1's new one (that used to give a silent wrong gradient)."""
    mlp = MLP(8, 12, 6, rng=0)
    x, _ = _data()
    y = mlp(x)                                            # a complete, pending forward

    def broken(h):
        raise FloatingPointError("boom")
    monkeypatch.setitem(F.ACTIVATIONS, "gelu", (broken, F.gelu_backward))
    with pytest.raises(FloatingPointError):
        mlp(2 * x)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"MLP.backward: the last training-mode forward raised an "
                                         r"error part-way, so its caches do not fit together"):
        mlp.backward(np.ones_like(y))
    mlp(x)
    mlp.backward(np.ones_like(y))                         # a new forward starts afresh


def test_unfreezing_between_forward_and_backward_is_refused():
    """A forward with W frozen keeps no input; dW cannot be formed if W is trainable at backward."""
    lin = Linear(8, 6, rng=0).freeze()
    x, _ = _data()
    y = lin(x)
    lin.unfreeze()
    with pytest.raises(ValueError, match=r"W was frozen during forward .* run forward\(x\) again"):
        lin.backward(np.ones_like(y))


def test_train_mode_must_be_a_bool():
    with pytest.raises(TypeError, match="mode must be True or False, got 'eval'"):
        Linear(3, 2).train("eval")


# ---------------------------------------------------------------------------------------------
# backward(dout, need_input_grad=False): the same parameter gradients, no input gradient
# ---------------------------------------------------------------------------------------------

def _grads_with(model, x, dout, need_input_grad):
    model.zero_grad()
    model(x)
    dx = model.backward(dout, need_input_grad=need_input_grad)
    return dx, {k: g.copy() for k, g in model.gradients().items()}


@pytest.mark.parametrize("kind", ["linear", "mlp", "attention", "block", "block-lora", "mlp-lora"])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(kind):
    rng = np.random.default_rng(11)
    d = 8
    model = {"linear": lambda: Linear(d, d, rng=rng), "mlp": lambda: MLP(d, 16, d, rng=rng),
             "mlp-lora": lambda: MLP(d, 16, d, rng=rng),
             "attention": lambda: MultiHeadAttention(d, 2, causal=True, rng=rng),
             "block": lambda: TransformerBlock(d, 2, 16, causal=True, rng=rng),
             "block-lora": lambda: TransformerBlock(d, 2, 16, causal=True, rng=rng)}[kind]()
    if kind.endswith("lora"):
        add_lora(model, ["q_proj", "v_proj", "fc1", "fc2"] if kind == "block-lora" else ["fc1", "fc2"],
                 r=2, alpha=3, rng=rng)
        for name, p in model.parameters().items():
            if name.endswith(".B"):
                p[...] = rng.standard_normal(p.shape)
    x = rng.standard_normal((2, 5, d))
    dout = rng.standard_normal((2, 5, d))
    dx, ref = _grads_with(model, x, dout, True)
    none, got = _grads_with(model, x, dout, False)
    assert dx is not None and dx.shape == x.shape and none is None
    assert got.keys() == ref.keys() and ref
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name
        assert np.any(got[name] != 0) or name.endswith("k_proj.b"), name
    with pytest.raises(ValueError, match="already consumed"):       # the rule still holds
        model.backward(dout, need_input_grad=False)


def test_need_input_grad_must_be_a_bool():
    layer = Linear(3, 2)
    layer(np.ones((1, 3)))
    with pytest.raises(TypeError):
        layer.backward(np.ones((1, 2)), need_input_grad="no")
    assert layer.backward(np.ones((1, 2))).shape == (1, 3)             # the forward is still pending


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_lora_layer_backward_without_input_grad_skips_dx(kind, monkeypatch):
    """A LoRA/DoRA/QLoRA layer asked for no input gradient returns None, gives the same A, B (m)
    gradients bit for bit, and never calls the functional backward with need_dx=True."""
    from lora_np import ModuleList, quant
    rng = np.random.default_rng(5)
    base = Linear(8, 6, rng=rng)
    if kind == "qlora":
        base = quant.QuantizedLinear.from_linear(base, block_size=16)
    model = add_lora(ModuleList([base]), ["0"], r=2, alpha=3, use_dora=kind == "dora", rng=rng)
    layer = model[0]
    layer.B[...] = rng.standard_normal(layer.B.shape)
    x, dout = rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 4, 6))
    layer.zero_grad(); layer(x); dx = layer.backward(dout)
    ref = {k: g.copy() for k, g in layer.gradients().items()}
    seen = []
    name = "dora_linear_backward" if kind == "dora" else "lora_linear_backward"
    real = getattr(F, name)
    monkeypatch.setattr(F, name, lambda *a, **k: (seen.append(k.get("need_dx", True)), real(*a, **k))[1])
    layer.zero_grad(); layer(x)
    assert layer.backward(dout, need_input_grad=False) is None and dx.shape == x.shape
    assert seen == [False]
    got = layer.gradients()
    assert got.keys() == ref.keys() and ref
    for k in ref:
        assert np.array_equal(got[k], ref[k]) and np.any(ref[k] != 0), k

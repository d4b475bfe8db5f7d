"""lora_np.quant: NF4, double quantisation, the quantised layer and QLoRA on top of it."""

import copy

import numpy as np
import pytest

import lora_np
from lora_np import MLP, Linear, add_lora, gradcheck, merge_lora, randomize_lora
from lora_np import quant as Q

#: bitsandbytes' published NF4 table (``create_normal_map(offset=0.9677083)``, float32 values)
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def gaussian(shape, seed=0, dtype=np.float32, std=0.02):
    return (std * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


# ------------------------------------------------------------------------------------ NF4


def test_nf4_is_derived_from_normal_quantiles_and_matches_bitsandbytes():
    assert Q.NF4.shape == (16,) and Q.NF4.dtype == np.float32
    assert np.all(np.diff(Q.NF4) > 0)                                  # ascending
    assert Q.NF4[0] == -1 and Q.NF4[15] == 1 and Q.NF4[7] == 0         # exact ends and zero
    assert (Q.NF4 > 0).sum() == 8 and (Q.NF4 < 0).sum() == 7           # asymmetric: 8 + 0 + 7
    assert np.abs(Q.NF4 - BNB_NF4).max() <= 1.2e-7                     # float32 linspace vs float64
    assert np.abs(Q.nf4_code_values() - BNB_NF4).max() <= 1.2e-7
    assert not Q.NF4.flags.writeable


def test_nearest_code_is_the_argmin_and_agrees_with_the_published_table():
    x = np.random.default_rng(0).uniform(-1, 1, 20000)
    brute = np.abs(x[:, None] - Q.NF4.astype(np.float64)).argmin(axis=1)
    np.testing.assert_array_equal(Q.nearest_code(x), brute)
    np.testing.assert_array_equal(Q.nearest_code(x), np.abs(x[:, None] - BNB_NF4).argmin(axis=1))
    np.testing.assert_array_equal(Q.nearest_code(Q.NF4), np.arange(16))


def test_nf4_code_values_rejects_a_bad_offset():
    with pytest.raises(ValueError, match=r"offset must be in \(0.5, 1\), got offset=1.2"):
        Q.nf4_code_values(1.2)


def test_packing_puts_the_first_code_in_the_high_nibble():
    np.testing.assert_array_equal(Q.pack_nibbles([1, 2, 15, 0]), [0x12, 0xF0])
    np.testing.assert_array_equal(Q.pack_nibbles([7, 3, 9]), [0x73, 0x90])     # odd: a 0 nibble pad
    codes = np.random.default_rng(1).integers(0, 16, 101).astype(np.uint8)
    np.testing.assert_array_equal(Q.unpack_nibbles(Q.pack_nibbles(codes), 101), codes)


# ------------------------------------------------------------------------------------ quantise


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_round_trip_keeps_shape_and_dtype_and_the_error_is_bounded(dtype):
    W = gaussian((48, 40), dtype=dtype)
    q = Q.quantize_nf4(W, block_size=64, double_quant=False)
    assert q.codes.dtype == np.uint8 and q.codes.shape == (48 * 40 // 2,)
    assert q.absmax.dtype == np.float32 and q.absmax.shape == (30,)
    W_hat = Q.dequantize_nf4(q)
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype
    blocks = np.abs(W.astype(np.float64).ravel().reshape(30, 64))
    err = np.abs(W_hat.astype(np.float64) - W.astype(np.float64)).ravel().reshape(30, 64)
    half_gap = np.diff(Q.NF4.astype(np.float64)).max() / 2
    tol = 1e-3 if dtype == np.float16 else 1e-6
    assert np.all(err <= blocks.max(axis=1, keepdims=True) * half_gap * (1 + tol) + 1e-7)
    # each block's largest |entry| is stored exactly (code ±1 times its own absmax)
    i = np.abs(W.astype(np.float64).ravel()[:64]).argmax()
    assert abs(float(W_hat.ravel()[i]) - float(W.ravel()[i])) <= 1e-3 * abs(float(W.ravel()[i]))


def test_codes_are_the_nearest_code_of_each_entry_over_its_block_absmax():
    W = gaussian((8, 16), seed=3, dtype=np.float64)
    q = Q.quantize_nf4(W, block_size=32, double_quant=False)
    codes = Q.unpack_nibbles(q.codes, W.size).reshape(4, 32)
    x = W.reshape(4, 32) / np.abs(W.reshape(4, 32)).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(codes, np.abs(x[..., None] - Q.NF4.astype(np.float64)).argmin(-1))
    np.testing.assert_allclose(q.absmax, np.abs(W.reshape(4, 32)).max(axis=1).astype(np.float32))


def test_partial_last_block_odd_size_and_an_all_zero_block():
    W = gaussian((5, 7), seed=2, dtype=np.float64)           # 35 entries: blocks 16, 16, 3; odd
    W[0, :7] = 0
    W[1, :7] = 0
    W[2, :2] = 0                                             # the first block (16 entries) is all zero
    for dq in (False, True):
        q = Q.quantize_nf4(W, block_size=16, double_quant=dq)
        assert q.codes.shape == (18,) and q.absmax.shape == (3,)
        W_hat = Q.dequantize_nf4(q)
        assert W_hat.shape == (5, 7) and np.all(W_hat.ravel()[:16] == 0)
        assert Q.relative_error(W, W_hat) < 0.15


def test_double_quantisation_stores_int8_constants_in_blocks_of_256_and_adds_the_mean_back():
    W = gaussian((1024, 1024), seed=4)                       # 16,384 blocks = 64 blocks of 256
    plain = Q.quantize_nf4(W, double_quant=False)
    q = Q.quantize_nf4(W, double_quant=True)
    assert q.absmax.dtype == np.int8 and q.absmax.shape == (16384,)
    assert q.absmax_scale.dtype == np.float32 and q.absmax_scale.shape == (64,)
    assert q.absmax_offset.shape == () and q.absmax_offset == np.float32(plain.absmax.astype(np.float64).mean())
    np.testing.assert_array_equal(q.codes, plain.codes)      # W's codes use the exact constants
    c, c_hat = plain.absmax.astype(np.float64), Q.absmax_constants(q).astype(np.float64)
    d = (c - c.mean()).reshape(64, 256)
    assert np.all(np.abs(c_hat - c).reshape(64, 256) <= np.abs(d).max(axis=1, keepdims=True) / 254 * 1.001 + 1e-9)
    assert abs(c_hat.mean() - c.mean()) < 1e-3 * c.mean()
    # the constants cost 0.5 → 0.127 bits per parameter, counted from the stored arrays
    assert plain.constant_bits_per_parameter == 0.5
    n = W.size
    assert q.nbytes == n // 2 + 16384 * 1 + 64 * 4 + 4
    assert q.constant_bits_per_parameter == pytest.approx(8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert round(q.constant_bits_per_parameter, 3) == 0.127 and round(q.bits_per_parameter, 3) == 4.127
    assert Q.nf4_bits_per_parameter(64, True) == pytest.approx(4.126953125)
    assert Q.nf4_bits_per_parameter(64, False) == 4.5
    # and the extra error it adds is small next to NF4's own
    e_plain, e_dq = Q.relative_error(W, Q.dequantize_nf4(plain)), Q.relative_error(W, Q.dequantize_nf4(q))
    assert e_plain < e_dq < 1.01 * e_plain


@pytest.mark.parametrize("bad,err,match", [
    (1, ValueError, r"block_size must be in \[2, 4096\], got block_size=1"),
    (8192, ValueError, r"block_size must be in \[2, 4096\], got block_size=8192"),
    (64.0, TypeError, r"block_size must be an int, got 64.0"),
])
def test_bad_block_size(bad, err, match):
    with pytest.raises(err, match=match):
        Q.quantize_nf4(gaussian((4, 4)), block_size=bad)


@pytest.mark.parametrize("W,err,match", [
    (np.ones(8, dtype=np.float32), ValueError, r"2-D weight matrix \(d_out, d_in\), got shape \(8,\)"),
    (np.ones((2, 2, 2)), ValueError, r"2-D weight matrix .* got shape \(2, 2, 2\)"),
    (np.array([[1.0, np.nan]]), ValueError, r"W must be finite, got 1 NaN/inf"),
    (np.ones((2, 2), dtype=np.int64), TypeError, r"float16/float32/float64 array, got dtype int64"),
    (np.ones((2, 2), dtype=np.complex128), TypeError, r"got dtype complex128"),
])
def test_bad_weights(W, err, match):
    with pytest.raises(err, match=match):
        Q.quantize_nf4(W)


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        Q.quantize_nf4(gaussian((4, 4)), double_quant="yes")
    with pytest.raises(TypeError, match="expected an NF4Tensor .* got ndarray"):
        Q.dequantize_nf4(gaussian((4, 4)))
    q = Q.quantize_nf4(gaussian((4, 16)))
    with pytest.raises(ValueError, match=r"codes must be uint8 of shape \(32,\)"):
        Q.dequantize_nf4(q._replace(codes=q.codes[:-1]))


# ------------------------------------------------------------------------------------ the layer


def float_linear(d_in, d_out, seed=0, dtype=np.float64):
    layer = Linear(d_in, d_out, rng=seed, dtype=dtype)
    layer.b[...] = 0.1 * np.random.default_rng(seed + 100).standard_normal(d_out)
    return layer


def test_quantized_linear_stores_codes_not_a_float_weight():
    lin = float_linear(64, 48, dtype=np.float32)
    ql = Q.QuantizedLinear.from_linear(lin)
    assert isinstance(ql, Linear) and Q.QuantizedLinear.lora_class is Q.QLoRALinear
    with pytest.raises(AttributeError, match="stores its frozen weight as NF4 codes"):
        ql.W
    float_arrays = [a for a in list(ql.parameters().values()) + list(vars(ql).values())
                    if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    assert all(a.size < 48 * 64 for a in float_arrays)
    assert set(ql.parameters()) == {"b"} and ql.trainable_parameters() == {}
    assert ql.nbytes == ql.quantized.nbytes + 48 * 4
    assert ql.quantized.nbytes / lin.W.nbytes == pytest.approx(4.127 / 32, rel=0.02)   # vs float32
    assert ql.quantized.nbytes / (lin.W.size * 2) == pytest.approx(4.127 / 16, rel=0.02)  # vs float16
    np.testing.assert_array_equal(ql.bias, lin.bias)
    assert ql.bias is not lin.bias                                 # copied: the float layer can go


def test_quantized_linear_forward_backward_and_dtype():
    lin = float_linear(20, 12, dtype=np.float32)
    ql = Q.QuantizedLinear.from_linear(lin, block_size=16)
    x = np.random.default_rng(0).standard_normal((3, 5, 20)).astype(np.float32)
    ref = Q._float_linear(ql.dequantized_weight(), ql.bias, np.float32)
    y = ql(x)
    assert y.dtype == np.float32 and y.shape == (3, 5, 12)
    np.testing.assert_allclose(y, ref(x), rtol=1e-6, atol=1e-6)
    assert ql.__dict__["_cache"].W is None and ql.__dict__["_cache"].x is None
    G = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    np.testing.assert_allclose(ql.backward(G), G @ ql.dequantized_weight(), rtol=1e-5, atol=1e-5)


def test_quantized_linear_input_gradient_is_checked():
    ql = Q.QuantizedLinear.from_linear(float_linear(10, 7, seed=2), block_size=8)
    rows = gradcheck.check_gradients(ql, np.random.default_rng(0).standard_normal((4, 10)))
    assert [r.name for r in rows] == ["x"] and rows[0].passed and rows[0].grad_norm > 0


def test_from_linear_refuses_what_it_cannot_quantise():
    with pytest.raises(TypeError, match="expects a float Linear layer, got MLP"):
        Q.QuantizedLinear.from_linear(MLP(4, 4, 4))
    ql = Q.QuantizedLinear.from_linear(float_linear(8, 8))
    with pytest.raises(TypeError, match="got QuantizedLinear"):
        Q.QuantizedLinear.from_linear(ql)
    lin = float_linear(8, 8)
    lin.W[0, 0] = np.inf
    with pytest.raises(ValueError, match="W must be finite"):
        Q.QuantizedLinear.from_linear(lin)
    with pytest.raises(ValueError, match="block_size must be in"):
        Q.QuantizedLinear.from_linear(float_linear(8, 8), block_size=0)


# ------------------------------------------------------------------------------------ QLoRA


def qlora_mlp(seed=0, r=2, alpha=3.0, dtype=np.float64):
    model = MLP(12, 16, 10, rng=seed, dtype=dtype)
    Q.quantize_model(model, ["fc1", "fc2"], block_size=16)
    add_lora(model, ["fc1", "fc2"], r=r, alpha=alpha, rng=seed + 1)
    return model


def test_add_lora_on_a_quantized_layer_builds_qlora_and_starts_equal():
    model = MLP(12, 16, 10, rng=0)
    Q.quantize_model(model, ["fc1", "fc2"], block_size=16)
    x = np.random.default_rng(0).standard_normal((6, 12))
    before = model(x)
    add_lora(model, ["fc1", "fc2"], r=2, alpha=3.0, rng=1)
    assert type(model.fc1) is Q.QLoRALinear and isinstance(model.fc1, lora_np.LoRALinear)
    assert model.fc1.scale == 1.5 and model.fc1.quantized is not None
    np.testing.assert_array_equal(model(x), before)                # B = 0: exactly the NF4 model
    assert set(model.trainable_parameters()) == {"fc1.A", "fc1.B", "fc2.A", "fc2.B"}
    with pytest.raises(AttributeError, match="NF4 codes"):
        model.fc1.W
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        add_lora(Q.quantize_model(MLP(4, 4, 4), ["fc1"]), ["fc1"], r=1, alpha=1.0, use_dora=True)


def test_qlora_gradients_match_finite_differences():
    model = qlora_mlp()
    randomize_lora(model, rng=5)                                   # B random, non-zero; s = 1.5
    x = np.random.default_rng(0).standard_normal((5, 12))
    rows = gradcheck.check_gradients(model, x)
    assert {r.name for r in rows} == {"fc1.A", "fc1.B", "fc2.A", "fc2.B", "x"}
    for r in rows:
        assert r.passed and r.grad_norm > 0, (r.name, r.reason)
        assert r.rel_error < 1e-7
    layer = Q.QLoRALinear(Q.QuantizedLinear.from_linear(float_linear(9, 6, seed=3), block_size=8),
                          r=3, alpha=7.0, rng=4)
    randomize_lora(layer, rng=6)
    rows = gradcheck.check_gradients(layer, np.random.default_rng(1).standard_normal((2, 4, 9)))
    assert all(r.passed and r.grad_norm > 0 for r in rows) and len(rows) == 3


def test_qlora_backward_is_lora_backward_through_the_dequantized_weight():
    layer = Q.QLoRALinear(Q.QuantizedLinear.from_linear(float_linear(16, 8, seed=1)), r=2, alpha=5.0, rng=0)
    randomize_lora(layer, rng=1)
    x = np.random.default_rng(2).standard_normal((7, 16))
    W = layer.dequantized_weight()
    y_ref, cache = lora_np.functional.lora_linear_forward(x, W, layer.bias, layer.A, layer.B, layer.scale)
    y = layer(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
    assert layer.__dict__["_cache"][1].W is None                   # no float W between the passes
    G = np.random.default_rng(3).standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(G)
    dx_ref, dA_ref, dB_ref = lora_np.functional.lora_linear_backward(G, cache)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.gradients()["A"], dA_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.gradients()["B"], dB_ref, rtol=1e-13, atol=1e-13)


def test_qlora_trains_in_float32_and_stays_float32():
    model = qlora_mlp(dtype=np.float32, alpha=4.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    target = rng.standard_normal((64, 10)).astype(np.float32)
    opt = lora_np.Adam(model, lr=1e-2)
    losses = []
    for _ in range(30):
        y = model(x)
        assert y.dtype == np.float32
        loss, dy = lora_np.functional.mse_loss(y, target)
        model.zero_grad(); model.backward(dy); opt.step()
        losses.append(loss)
    assert losses[-1] < 0.9 * losses[0]
    assert all(a.dtype == np.float32 for a in model.trainable_parameters().values())


def test_merge_refuses_and_the_explicit_recipes_work():
    model = qlora_mlp()
    randomize_lora(model, rng=2)
    x = np.random.default_rng(0).standard_normal((4, 12))
    y = model(x)
    state = {n: p.copy() for n, p in model.parameters().items()}
    with pytest.raises(ValueError, match="stored as 4-bit NF4 codes.*merged_linear\\(\\).*requantized_merge"):
        model.fc1.merge()
    with pytest.raises(ValueError, match="merge_lora: layer 'fc1' cannot be merged, model left unchanged"):
        merge_lora(model)
    assert not model.fc1.merged and all(np.array_equal(state[n], p) for n, p in model.parameters().items())
    np.testing.assert_allclose(model.fc1.merged_linear()(x), model.fc1(x), rtol=1e-12, atol=1e-12)
    err = Q.merge_error(model.fc1)
    assert 0 < err["requant_error"] < 0.2 and err["delta_norm"] > 0 and err["ratio"] > 0
    requant = model.fc1.requantized_merge()
    assert isinstance(requant, Q.QuantizedLinear)
    assert Q.relative_error(model.fc1.merged_weight(), requant.dequantized_weight()) == pytest.approx(err["requant_error"])
    merged = Q.dequantize_merge(copy.deepcopy(model))
    assert type(merged.fc1) is Linear and type(merged.fc2) is Linear
    np.testing.assert_allclose(merged(x), y, rtol=1e-12, atol=1e-12)
    requant = Q.requantize_merge(copy.deepcopy(model))
    assert type(requant.fc1) is Q.QuantizedLinear and type(requant.fc2) is Q.QuantizedLinear
    assert lora_np.lora_layers(requant) == {}
    gap = np.abs(requant(x) - y).max()
    assert 0 < gap < 0.5 * np.abs(y).max()                         # 4-bit again: close, not equal


def test_qlora_refuses_pissa_and_a_float_base():
    base = Q.QuantizedLinear.from_linear(float_linear(8, 8))
    with pytest.raises(ValueError, match="init='pissa' needs the float W"):
        Q.QLoRALinear(base, 2, 2.0, init="pissa")
    with pytest.raises(TypeError, match="QLoRALinear wraps a QuantizedLinear, got Linear"):
        Q.QLoRALinear(float_linear(8, 8), 2, 2.0)
    with pytest.raises(ValueError, match="r must satisfy"):
        Q.QLoRALinear(base, 9, 2.0)


def test_model_bytes_counts_every_array_once():
    model = qlora_mlp(dtype=np.float32)
    b = Q.model_bytes(model)
    nf4 = model.fc1.quantized.nbytes + model.fc2.quantized.nbytes
    lora = sum(p.nbytes for p in model.trainable_parameters().values())
    assert b["nf4"] == nf4 and b["trainable"] == lora
    assert b["frozen"] == (16 + 10) * 4 and b["total"] == nf4 + lora + (16 + 10) * 4


def test_deepcopy_and_adapter_file_round_trip(tmp_path):
    model = qlora_mlp()
    randomize_lora(model, rng=3)
    twin = copy.deepcopy(model)
    x = np.random.default_rng(0).standard_normal((3, 12))
    np.testing.assert_array_equal(twin(x), model(x))
    lora_np.save_adapter(model, tmp_path / "a.npz")
    fresh = qlora_mlp()
    lora_np.load_adapter(fresh, tmp_path / "a.npz")
    np.testing.assert_array_equal(fresh(x), model(x))


# ------------------------------------------------------------------------------------ LoftQ


def test_loftq_reduces_the_error_and_its_layer_starts_closer_to_the_float_layer():
    lin = float_linear(48, 32, seed=7)
    res = Q.loftq_factors(lin.W, r=4, scale=2.0, iterations=4, block_size=16)
    assert len(res.errors) == 5 and res.A.shape == (4, 48) and res.B.shape == (32, 4)
    assert res.errors[1] < res.errors[0] and res.errors[-1] <= res.errors[1] + 1e-12
    got = Q.relative_error(lin.W, Q.dequantize_nf4(res.quantized) + 2.0 * res.B @ res.A)
    assert got == pytest.approx(res.errors[-1])
    layer = Q.QLoRALinear.from_loftq(lin, r=4, alpha=8.0, iterations=4, block_size=16)
    plain = Q.QuantizedLinear.from_linear(lin, block_size=16)
    x = np.random.default_rng(0).standard_normal((20, 48))
    e_loftq = np.linalg.norm(layer(x) - lin(x))
    e_plain = np.linalg.norm(plain(x) - lin(x))
    assert e_loftq < e_plain


# ------------------------------------------------------------------------------------ real configs


def test_real_model_arithmetic():
    seven, big = Q.REAL_MODELS["llama2-7b"], Q.REAL_MODELS["llama-65b"]
    assert seven.n_params() == 6_738_415_616
    assert big.n_params() == 65_285_660_672
    m = Q.qlora_memory("llama-65b", r=64)
    assert m.full_ft_16bit > 780 * Q.GB                     # QLoRA: "more than 780 GB"
    assert m.qlora < 48 * Q.GB < m.base_16bit               # fits one 48 GB GPU; the 16-bit base does not
    assert m.base_nf4 == round(big.block_linear_params() * 4.126953125 / 8) + 2 * big.other_params()
    assert m.lora_params == 80 * 64 * (4 * 2 * 8192 + 3 * (8192 + 22016))
    with pytest.raises(ValueError, match="model must be one of"):
        Q.qlora_memory("gpt-5")

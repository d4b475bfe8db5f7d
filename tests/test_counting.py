"""Tests for lora_np.counting: exact paper numbers, the GPT-2 discrepancy, bytes (formula and
measured), the FLOP and byte models of a training step (hand counts), bad input."""

import numpy as np
import pytest

from lora_np import counting
from lora_np.counting import (ADAM_FLOPS_PER_PARAM, ATTENTION_TARGETS, MODEL_CONFIGS,
                              PAPER_REPORTED, ModelConfig, adam_flops, adapter_checkpoint_bytes,
                              attention_step_flops, block_targets, checkpoint_bytes, full_params,
                              linear_step_flops, lora_linear_step_flops, lora_param_count,
                              lora_params, measured_total_state_bytes,
                              measured_training_state_bytes, mlp_step_flops, paper_comparison,
                              state_bytes_model, target_shape, total_state_bytes,
                              training_state_bytes)


# ---------------------------------------------------------------------------------------------
# one matrix
# ---------------------------------------------------------------------------------------------

def test_lora_params_is_r_times_din_plus_dout():
    assert lora_params(d_in=10, d_out=6, r=3) == 3 * 16
    assert lora_params(12288, 12288, 1) == 24576


def test_lora_params_accepts_numpy_ints():
    assert lora_params(np.int64(8), np.int32(4), np.int64(2)) == 24


def test_full_params_is_din_times_dout():
    assert full_params(10, 6) == 60


def test_lora_is_cheaper_than_full_only_when_r_is_small():
    # square d×d: LoRA/full = 2r/d, so r < d/2 saves parameters
    assert lora_params(64, 64, 31) < full_params(64, 64) < lora_params(64, 64, 33)


@pytest.mark.parametrize("args, exc", [
    ((10, 6, 0), ValueError),          # r < 1
    ((10, 6, 7), ValueError),          # r > min(d_in, d_out)
    ((0, 6, 1), ValueError),           # d_in < 1
    ((10, 6, 2.0), TypeError),         # float rank
    ((10, "6", 2), TypeError),         # string width
    ((10, 6, True), TypeError),        # bool is not a rank
])
def test_lora_params_bad_input(args, exc):
    with pytest.raises(exc):
        lora_params(*args)


def test_full_params_bad_width():
    with pytest.raises(TypeError, match="d_out must be an int"):
        full_params(3, 4.0)


def test_error_message_names_expected_and_got():
    with pytest.raises(ValueError, match=r"r must be <= min\(d_in, d_out\) = 6, got r=7"):
        lora_params(10, 6, 7)


# ---------------------------------------------------------------------------------------------
# real configs and the paper's numbers (Hu et al. 2021, arXiv:2106.09685)
# ---------------------------------------------------------------------------------------------

def test_configs_match_their_sources():
    g = MODEL_CONFIGS["gpt3-175b"]
    assert (g.d_model, g.n_layers, g.d_ff) == (12288, 96, 49152)
    assert g.n_params == 175e9
    assert (MODEL_CONFIGS["llama2-7b"].d_ff, MODEL_CONFIGS["llama2-7b"].gated_mlp) == (11008, True)
    assert [c.gated_mlp for c in MODEL_CONFIGS.values()].count(True) == 1


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        MODEL_CONFIGS["gpt3-175b"].d_model = 1


def test_gpt3_qv_r1_is_4_7M():                                   # Table 4
    assert lora_param_count("gpt3-175b", ("q_proj", "v_proj"), 1) == 4_718_592


@pytest.mark.parametrize("targets, r", [(("q_proj",), 8), (("q_proj", "k_proj"), 4),
                                        (("q_proj", "v_proj"), 4), (ATTENTION_TARGETS, 2)])
def test_gpt3_table5_budget_is_18_87M(targets, r):                 # Table 5, "18M"
    assert lora_param_count("gpt3-175b", targets, r) == 18_874_368


def test_gpt3_qv_r8_is_37_7M():                                  # Table 4
    assert lora_param_count("gpt3-175b", ["q_proj", "v_proj"], 8) == 37_748_736


def test_roberta_qv_r8():                                         # Table 2, 0.3M / 0.8M
    assert lora_param_count("roberta-base", ("q_proj", "v_proj"), 8) == 294_912
    assert lora_param_count(MODEL_CONFIGS["roberta-large"], ("q_proj", "v_proj"), 8) == 786_432


def test_target_names_are_the_ones_the_modules_use():
    # the names add_lora takes on lora_np's MultiHeadAttention and MLP count here too
    from lora_np import MLP, MultiHeadAttention
    layers = {**MultiHeadAttention(8, 2).named_children(), **MLP(8, 32, 8).named_children()}
    assert block_targets("gpt2-medium") == tuple(layers) == ("q_proj", "k_proj", "v_proj",
                                                             "o_proj", "fc1", "fc2")
    for name in layers:
        assert target_shape("gpt2-medium", name) == {"fc1": (4096, 1024), "fc2": (1024, 4096)}.get(
            name, (1024, 1024))
    assert lora_param_count("gpt2-medium", ("fc1", "fc2"), 2) == 24 * 2 * 2 * (1024 + 4096)


def test_gated_mlp_targets_are_llamas():
    g = MODEL_CONFIGS["llama2-7b"]
    assert block_targets(g)[4:] == ("gate_proj", "up_proj", "down_proj")
    assert target_shape(g, "up_proj") == target_shape(g, "gate_proj") == (11008, 4096)
    assert target_shape(g, "down_proj") == (4096, 11008)
    assert lora_param_count(g, ("gate_proj",), 1) == 32 * (4096 + 11008)


@pytest.mark.parametrize("config, target", [("llama2-7b", "fc1"), ("gpt2-large", "gate_proj"),
                                            ("gpt2-large", "up_proj"), ("gpt3-175b", "q")])
def test_names_a_block_does_not_have_are_refused(config, target):
    # fc1/fc2 only without a gate, gate/up/down only with one; the paper's short "q" is not a name
    with pytest.raises(ValueError, match=f"unknown target '{target}'.*valid targets"):
        lora_param_count(config, (target,), 1)


def test_gpt2_table3_is_a_real_discrepancy():
    # Formula (q, v, r = 4) gives 0.39M / 0.74M; Table 3 prints 0.35M / 0.77M.
    medium = lora_param_count("gpt2-medium", ("q_proj", "v_proj"), 4)
    large = lora_param_count("gpt2-large", ("q_proj", "v_proj"), 4)
    assert (medium, large) == (393_216, 737_280)
    assert round(medium / 1e6, 2) != 0.35 and round(large / 1e6, 2) != 0.77
    # and no integer r·n_targets would round to the printed value either
    for n_layers, d, printed in [(24, 1024, 0.35), (36, 1280, 0.77)]:
        unit = n_layers * 2 * d
        assert all(round(u * unit / 1e6, 2) != printed for u in range(1, 30))


def test_paper_comparison_shows_the_gap_without_fudging():
    rows = {(r.config, r.targets, r.r): r for r in paper_comparison()}
    assert set(rows) == set(PAPER_REPORTED)
    for key, row in rows.items():
        assert row.formula == lora_param_count(*key)              # nothing adjusted
        assert row.paper == PAPER_REPORTED[key].value
        assert row.ratio == pytest.approx(row.formula / row.paper)
        assert row.citation.startswith("Hu et al. 2021")
    gpt2 = rows[("gpt2-medium", ("q_proj", "v_proj"), 4)], rows[("gpt2-large", ("q_proj", "v_proj"), 4)]
    assert gpt2[0].ratio == pytest.approx(1.1235, abs=1e-4)
    assert gpt2[1].ratio == pytest.approx(0.9575, abs=1e-4)
    exact = [r for k, r in rows.items() if k[0] in ("gpt3-175b", "roberta-base", "roberta-large")
             and r.paper != 18e6]
    assert all(abs(r.ratio - 1) < 0.02 for r in exact)         # within the paper's rounding


def test_unknown_config_lists_valid_names():
    with pytest.raises(ValueError, match="gpt3-175b"):
        lora_param_count("gpt-5", ("q_proj",), 1)


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'q_proj', 'k_proj', 'v_proj', 'o_proj', 'fc1', 'fc2'"):
        lora_param_count("gpt3-175b", ("x",), 1)


def test_targets_as_string_rejected():
    with pytest.raises(TypeError, match="string 'qv'"):
        lora_param_count("gpt3-175b", "qv", 1)


def test_empty_and_repeated_targets_rejected():
    with pytest.raises(ValueError, match="at least one"):
        lora_param_count("gpt3-175b", (), 1)
    with pytest.raises(ValueError, match="repeat"):
        lora_param_count("gpt3-175b", ("q_proj", "q_proj"), 1)


def test_config_wrong_type_rejected():
    with pytest.raises(TypeError, match="ModelConfig"):
        lora_param_count(42, ("q_proj",), 1)


def test_custom_config_works():
    tiny = ModelConfig("tiny", d_model=8, n_layers=2, d_ff=32, n_params=1000)
    assert lora_param_count(tiny, ("q_proj", "v_proj"), 2) == 2 * 2 * 2 * 16


# ---------------------------------------------------------------------------------------------
# checkpoint bytes (Hu et al. 2021 §4.2: "350GB -> 35MB")
# ---------------------------------------------------------------------------------------------

def test_gpt3_full_checkpoint_is_350GB_fp16():
    assert checkpoint_bytes(MODEL_CONFIGS["gpt3-175b"].n_params) == 350_000_000_000


def test_gpt3_qv_r4_adapter_is_37_7MB_not_35MB():
    b = adapter_checkpoint_bytes("gpt3-175b", ("q_proj", "v_proj"), 4)
    assert b == 37_748_736                      # 37.7 MB decimal
    assert b / 2**20 == pytest.approx(36.0)     # 36.0 MiB
    assert 9_000 < 350e9 / b < 10_000           # "roughly 10,000x" is ≈ 9,272x
    # no GPT-3 (targets, r) lands on 35 MB: adapters come in 4,718,592-byte units
    unit = adapter_checkpoint_bytes("gpt3-175b", ("q_proj",), 1)
    assert unit == 4_718_592
    assert 7 * unit < 35e6 < 8 * unit


def test_checkpoint_bytes_bad_input():
    with pytest.raises(ValueError, match="whole"):
        checkpoint_bytes(1.5)
    with pytest.raises(ValueError, match=">= 0"):
        checkpoint_bytes(-1)
    with pytest.raises(TypeError, match="number"):
        checkpoint_bytes("10")
    with pytest.raises(ValueError, match="bytes_per_param"):
        checkpoint_bytes(10, bytes_per_param=0)


# ---------------------------------------------------------------------------------------------
# training state
# ---------------------------------------------------------------------------------------------

def test_training_state_bytes_formula():
    assert training_state_bytes(100, "adam", np.float64) == 100 * 8 * 4
    assert training_state_bytes(100, "sgd", np.float64) == 100 * 8 * 2
    assert training_state_bytes(100, "adam", np.float32) == 100 * 4 * 4
    assert training_state_bytes(100) == 3200                   # defaults: adam, float64


def test_total_state_includes_frozen_weights_gpt3():
    full = total_state_bytes(175e9, 0, "adam", np.float16)
    lora = total_state_bytes(18_874_368, 175e9, "adam", np.float16)
    assert full == 1_400_000_000_000                            # 1.4 TB (paper: 1.2 TB)
    assert lora == 350_000_000_000 + 18_874_368 * 2 * 4         # ≈ 350 GB (paper: 350 GB)


def test_training_state_bad_optimizer_and_dtype():
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adam'\)"):
        training_state_bytes(10, "rmsprop")
    with pytest.raises(TypeError, match="floating"):
        training_state_bytes(10, "adam", np.int32)


# ---------------------------------------------------------------------------------------------
# measured training state: each array once
# ---------------------------------------------------------------------------------------------

class _Optimizer:
    def __init__(self, nbytes):
        self.nbytes = nbytes

    def state_bytes(self):
        return self.nbytes


class _TiedModel:
    """Two layers that share one frozen W and one trainable B (tied weights): five names,
    three parameter arrays."""

    def __init__(self):
        self.W, self.A, self.B = np.zeros((6, 4)), np.zeros((2, 4)), np.zeros((6, 2))
        self.dA, self.dB = np.zeros_like(self.A), np.zeros_like(self.B)

    def parameters(self):
        return {"enc.W": self.W, "dec.W": self.W, "enc.A": self.A, "enc.B": self.B, "dec.B": self.B}

    def trainable_parameters(self):
        return {"enc.A": self.A, "enc.B": self.B, "dec.B": self.B}

    def gradients(self):
        return {"enc.A": self.dA, "enc.B": self.dB, "dec.B": self.dB}


def test_measured_state_counts_shared_arrays_once():
    m, opt = _TiedModel(), _Optimizer(2 * (8 + 12) * 8)      # Adam's m, v of A and B
    trainable = (8 + 12) * 8 * 2 + opt.nbytes                 # A, B, dA, dB + moments
    assert measured_training_state_bytes(m, opt) == trainable
    assert measured_total_state_bytes(m, opt) == trainable + 24 * 8      # + W once
    assert measured_training_state_bytes(m, opt) == training_state_bytes(8 + 12, "adam")


def test_measured_state_of_a_real_lora_model_matches_the_formulas():
    from lora_np import MLP, Adam, add_lora
    model = add_lora(MLP(8, 16, 4, rng=0), ["fc1"], r=2, alpha=4, rng=0)
    opt = Adam(model, lr=1e-3)
    n_lora, n_frozen = 2 * (8 + 16), (16 * 8 + 16) + (4 * 16 + 4)
    assert measured_training_state_bytes(model, opt) == training_state_bytes(n_lora, "adam")
    assert measured_total_state_bytes(model, opt) == total_state_bytes(n_lora, n_frozen, "adam")


# ---------------------------------------------------------------------------------------------
# FLOP model of a training step: hand counts for tiny shapes
# ---------------------------------------------------------------------------------------------

def test_linear_step_flops_by_hand():
    # N=2, d_in=3, d_out=4: a GEMM is 2·2·3·4 = 48
    forward = 48 + 2 * 4                     # X Wᵀ + b
    dX = 48
    dW_db = 48 + 2 * 4                       # Gᵀ X and Σ_rows G
    adam = ADAM_FLOPS_PER_PARAM * (12 + 4)   # W and b
    assert linear_step_flops(2, 3, 4, trainable=True) == forward + dX + dW_db + adam
    assert linear_step_flops(2, 3, 4, trainable=False) == forward + dX


def test_lora_linear_step_flops_by_hand():
    N, d_in, d_out, r = 2, 3, 4, 1
    frozen = (2 * N * d_in * d_out + N * d_out) + 2 * N * d_in * d_out     # forward, dX = G W
    forward_branch = 2 * N * r * d_in + N * r + 2 * N * r * d_out + N * d_out   # H, sH, (sH)Bᵀ, add
    backward_branch = (2 * N * r * d_out + N * r          # G B, s·(G B)
                       + 2 * N * r * d_out + r * d_out    # dB = s (Gᵀ H)
                       + 2 * N * r * d_in                 # dA = (sGB)ᵀ X
                       + 2 * N * r * d_in + N * d_in)     # (sGB) A, added to dX
    adam = ADAM_FLOPS_PER_PARAM * r * (d_in + d_out)
    expected = frozen + forward_branch + backward_branch + adam
    assert expected == 104 + 106 + 98
    assert lora_linear_step_flops(N, d_in, d_out, r) == expected


def test_lora_skips_exactly_the_dW_gemm_and_adds_the_branch():
    N, d, r = 64, 32, 4
    full, lora = linear_step_flops(N, d, d), lora_linear_step_flops(N, d, d, r)
    frozen = linear_step_flops(N, d, d, trainable=False)
    # full − frozen = the dW GEMM, db and Adam on W, b
    assert full - frozen == 2 * N * d * d + N * d + adam_flops(d * d + d)
    # LoRA − frozen = the branch (6·N·r·(d_in+d_out) GEMM FLOPs + O(N·(r + d))) and Adam on A, B
    assert lora - frozen == 6 * N * r * 2 * d + 2 * N * r + 2 * N * d + r * d + adam_flops(2 * r * d)


def test_mlp_step_flops_by_hand():
    N, d = 2, 4
    per_linear = (64 + 8) + 64 + (64 + 8) + ADAM_FLOPS_PER_PARAM * 20
    elementwise = (counting.GELU_FORWARD_FLOPS + counting.GELU_BACKWARD_FLOPS
                   + counting.MSE_FLOPS) * N * d
    assert mlp_step_flops(N, d) == 2 * per_linear + elementwise
    assert mlp_step_flops(N, d, r=2) == 2 * lora_linear_step_flops(N, d, d, 2) + elementwise


def test_mlp_flop_ratio_tends_to_two_thirds_plus_2r_over_d():
    # at large N and d the GEMMs dominate: LoRA/full → (4 + 12 r/d) / 6 = 2/3 + 2r/d
    N, d, r = 10**6, 8192, 8
    ratio = mlp_step_flops(N, d, r) / mlp_step_flops(N, d)
    assert ratio == pytest.approx(2 / 3 + 2 * r / d, rel=2e-3)


def test_attention_step_flops_by_hand():
    batch, T, d, H = 2, 3, 4, 2
    N, S = batch * T, batch * H * T * T
    core = (12 * batch * T * T * d
            + (counting.SOFTMAX_FORWARD_FLOPS + counting.SOFTMAX_BACKWARD_FLOPS) * S + 2 * N * d)
    rest = 2 * N * d + counting.MSE_FLOPS * N * d       # dX_q + dX_k + dX_v, loss
    assert attention_step_flops(batch, T, d, H) == 4 * linear_step_flops(N, d, d) + core + rest
    lora = (2 * lora_linear_step_flops(N, d, d, 1)              # q_proj, v_proj
            + 2 * linear_step_flops(N, d, d, trainable=False))  # k_proj, o_proj frozen
    assert attention_step_flops(batch, T, d, H, r=1) == lora + core + rest


def test_attention_core_flops_do_not_depend_on_rank():
    def projections(r):
        return (2 * lora_linear_step_flops(512, 256, 256, r)
                + 2 * linear_step_flops(512, 256, 256, trainable=False))
    cores = {attention_step_flops(8, 64, 256, 4, r) - projections(r) for r in (1, 8, 64)}
    assert len(cores) == 1


def test_bench_lora_targets_are_layers_of_the_blocks():
    from lora_np import MLP, MultiHeadAttention
    blocks = {"mlp": MLP(8, 8, 8), "attention": MultiHeadAttention(8, 2)}
    for name, block in blocks.items():
        children = block.named_children()
        assert len(children) == counting.BENCH_BLOCKS[name]
        assert set(counting.BENCH_LORA_TARGETS[name]) <= set(children)


@pytest.mark.parametrize("fn, args, exc", [
    (linear_step_flops, (0, 3, 4), ValueError),
    (lora_linear_step_flops, (2, 3, 4, 0), ValueError),
    (mlp_step_flops, (2.0, 4), TypeError),
    (attention_step_flops, (2, 3, 5, 2), ValueError),       # d not divisible by heads
    (attention_step_flops, (2, 3, 4, True), TypeError),
    (state_bytes_model, ("mlp", 0), ValueError),
    (state_bytes_model, ("mlp", 4, 1.5), TypeError),
])
def test_step_cost_models_reject_bad_sizes(fn, args, exc):
    with pytest.raises(exc):
        fn(*args)


def test_state_bytes_model_by_hand():
    d, r = 16, 2
    P = 2 * (d * d + d)                                   # MLP: two Linear layers
    assert state_bytes_model("mlp", d, None, np.float32) == 4 * 4 * P
    assert state_bytes_model("mlp", d, r, np.float64) == 8 * (P + 4 * 2 * (r * d + d * r))
    with pytest.raises(ValueError, match="model must be one of"):
        state_bytes_model("transformer", d)


# ---------------------------------------------------------------------------------------------
# the whole of training memory (Hu et al. 2021 §4.2; Korthikanti et al. 2022 §4.1)
# ---------------------------------------------------------------------------------------------

def test_configs_carry_heads_and_context():
    g = MODEL_CONFIGS["gpt3-175b"]
    assert (g.n_heads, g.context) == (96, 2048) and g.d_model // g.n_heads == 128
    assert all(c.n_heads and c.context and c.d_model % c.n_heads == 0 for c in MODEL_CONFIGS.values())
    assert ModelConfig("tiny", 8, 2, 32, 1000).n_heads is None


def test_inference_flops_of_a_linear_and_an_unmerged_lora_layer():
    assert counting.linear_forward_flops(5, 4, 3) == 2 * 5 * 4 * 3 + 5 * 3
    assert counting.linear_forward_flops(5, 4, 3, bias=False) == 2 * 5 * 4 * 3
    # the branch: H = X Aᵀ (2Nr d_in), s·H (Nr), H Bᵀ (2Nr d_out), add (N d_out)
    assert counting.lora_forward_flops(5, 4, 3, 2) == 135 + 2 * 5 * 2 * 4 + 5 * 2 + 2 * 5 * 2 * 3 + 5 * 3
    # the same forward lora_linear_step_flops counts inside a training step
    N, d_in, d_out, r = 7, 6, 5, 2
    step = lora_linear_step_flops(N, d_in, d_out, r)
    backward_and_adam = (2 * N * r * d_out + N * r + 2 * N * r * d_out + r * d_out + 2 * N * r * d_in
                         + 2 * N * d_in * d_out + 2 * N * r * d_in + N * d_in + ADAM_FLOPS_PER_PARAM * r * (d_in + d_out))
    assert counting.lora_forward_flops(N, d_in, d_out, r) == step - backward_and_adam
    with pytest.raises(TypeError):
        counting.lora_forward_flops(5, 4, 3, 2.0)


def test_training_memory_gpt3_full_vs_lora():
    n = MODEL_CONFIGS["gpt3-175b"].n_params
    lora = lora_param_count("gpt3-175b", ("q_proj", "v_proj"), 4)
    full = counting.training_memory(0, n, "fp16-adam")
    assert full == counting.TrainingMemory(350e9, 350e9, 700e9, 0, 0) and full.total == 1.4e12
    assert full.total == total_state_bytes(n, 0, "adam", np.float16)        # the simple model, same number
    lo = counting.training_memory(n, lora, "fp16-adam")
    assert lo.weights == (n + lora) * 2 and lo.gradients == 2 * lora and lo.optimizer == 4 * lora
    assert 3.99 < full.total / lo.total < 4.0                               # bounded by (2+2+4)/2
    mixed = counting.training_memory(0, n, "mixed-adam")
    assert mixed.total == 16 * n                                            # ZeRO's 16Ψ
    assert 7.99 < mixed.total / counting.training_memory(n, lora, "mixed-adam").total < 8.0
    # the paper's sentence: "we do not need to store the optimizer states" — weights + m + v
    assert (full.weights + full.optimizer) / lo.weights == pytest.approx(3.0, rel=1e-3)


def test_training_memory_adds_activations_and_checks_input():
    m = counting.training_memory(10, 4, "fp32-adam", activation_bytes=100)
    assert m == (56, 16, 32, 0, 100) and m.state == 104 and m.total == 204
    with pytest.raises(ValueError, match="recipe must be one of"):
        counting.training_memory(1, 1, "bf16")
    with pytest.raises(ValueError, match="n_trainable"):
        counting.training_memory(1, -1)


def test_activation_parts_sum_to_korthikanti():
    s, b, h, a = 2048, 1, 12288, 96
    parts = counting.activation_parts(s, b, h, a)
    assert counting.activation_bytes(parts, 2) == s * b * h * (34 + 5 * a * s // h)
    assert counting.activation_bytes(parts, 2) == counting.korthikanti_activation_bytes(s, b, h, a)
    by_block = {blk: counting.activation_bytes([p for p in parts if p.block == blk]) for blk in
                ("attention", "mlp", "layernorm")}
    assert by_block == {"attention": 11 * s * b * h + 5 * a * s * s * b, "mlp": 19 * s * b * h,
                        "layernorm": 4 * s * b * h}
    plain = counting.activation_parts(s, b, h, a, dropout=False)
    assert sum(p.values for p in plain) == 16 * s * b * h + a * s * s * b and not any(p.is_mask for p in plain)
    # GPT-3 175B, one sequence of 2048, 96 layers: 275 GB without recomputation
    assert counting.korthikanti_activation_bytes(s, b, h, a, 96) == 96 * 2048 * 12288 * 114
    assert counting.korthikanti_activation_bytes(s, b, h, a, 96, "selective") == 96 * 34 * s * b * h
    assert counting.korthikanti_activation_bytes(s, b, h, a, 96, "full") == 96 * 2 * s * b * h


def test_activation_bad_input():
    with pytest.raises(TypeError):
        counting.activation_parts(2048.0, 1, 8, 2)
    with pytest.raises(ValueError, match="recompute"):
        counting.korthikanti_activation_bytes(8, 1, 8, 2, recompute="some")
    with pytest.raises(TypeError, match="ActivationPart"):
        counting.activation_bytes([(1, 2)])


def test_measured_activations_of_a_block_are_the_formula_plus_what_lora_np_keeps_extra():
    from lora_np import TransformerBlock, add_lora
    s, b, h, a = 16, 2, 32, 4
    sbh, ass, sb = s * b * h, a * s * s * b, s * b
    x = np.random.default_rng(0).standard_normal((b, s, h))
    block = TransformerBlock(h, a, 4 * h, causal=True, rng=0)
    block(x)
    got = {k: v // 8 for k, v in counting.measured_activation_bytes(block).items()}      # float64 numbers
    formula = sum(p.values for p in counting.activation_parts(s, b, h, a, dropout=False))
    # lora_np keeps GELU's tanh too (4sbh) and each LayerNorm's 1/σ (sb), beyond the formula
    assert sum(got.values()) == formula + 4 * sbh + 2 * sb
    assert got == {"ln1": sbh + sb, "attn": 3 * sbh + ass, "attn.q_proj": sbh, "attn.o_proj": sbh,
                   "ln2": sbh + sb, "mlp": 8 * sbh, "mlp.fc1": sbh, "mlp.fc2": 4 * sbh}
    # LoRA on q, v: the frozen o_proj, fc1, fc2 keep no input (dX = G W needs W, not X)
    lora = TransformerBlock(h, a, 4 * h, causal=True, rng=0)
    add_lora(lora, ["q_proj", "v_proj"], r=2, alpha=4.0)
    lora(x)
    got = {k: v // 8 for k, v in counting.measured_activation_bytes(lora).items()}
    assert sum(got.values()) == formula + 4 * sbh + 2 * sb - 6 * sbh + 2 * sb * 2
    assert "attn.o_proj" not in got and "mlp.fc2" not in got
    lora.backward(np.ones_like(x))
    assert counting.measured_activation_bytes(lora) == {}                    # consumed by backward


def test_measured_activations_need_a_model():
    with pytest.raises(TypeError, match="named_modules"):
        counting.measured_activation_bytes(object())


def test_measured_activations_count_a_window_view_as_itself():
    # token ids cut by sliding_window_view: the view's "base" claims every window as a copy
    from lora_np.text import LanguageModel
    from lora_np.text.corpus import windows
    ids = np.arange(5000, dtype=np.int32) % 11
    x, _ = windows(ids, context=6, stride=1)
    model = LanguageModel(11, d_model=8, n_heads=2, n_layers=1, d_hidden=16, context=6, rng=0)
    model(x[:2])
    got = counting.measured_activation_bytes(model)
    assert got["tok_emb"] < 1000 and sum(got.values()) < 50_000


def test_input_grad_flops_are_the_skipped_dx_gemms():
    from lora_np.counting import input_grad_flops, linear_step_flops, lora_linear_step_flops
    N, d, r = 64, 32, 4
    assert input_grad_flops("mlp", N, d) == 2 * N * d * d
    assert input_grad_flops("mlp", N, d, r) == 2 * N * d * d + 2 * N * r * d + N * d
    assert input_grad_flops("attention", N, d) == 3 * 2 * N * d * d + 2 * N * d
    assert input_grad_flops("attention", N, d, r) == 3 * 2 * N * d * d + 2 * (2 * N * r * d + N * d) + 2 * N * d
    # the dX GEMM is the difference between a frozen layer's step and its forward + nothing
    assert linear_step_flops(N, d, d, trainable=False) - 2 * N * d * d == 2 * N * d * d + N * d
    assert lora_linear_step_flops(N, d, d, r) > input_grad_flops("mlp", N, d, r)

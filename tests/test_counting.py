"""Tests for lora_np.counting: exact paper numbers, the GPT-2 discrepancy, bytes, bad input."""

import numpy as np
import pytest

from lora_np.counting import (MODEL_CONFIGS, PAPER_REPORTED, ModelConfig, ParamCount, ParamRow,
                              adapter_checkpoint_bytes, checkpoint_bytes, count_parameters,
                              format_parameter_table, full_params, lora_param_count, lora_params,
                              paper_comparison, parameter_table, state_ratio, target_shape,
                              total_state_bytes, training_state_bytes)


# ---------------------------------------------------------------------------------------------
# one matrix
# ---------------------------------------------------------------------------------------------

def test_lora_params_is_r_times_din_plus_dout():
    assert lora_params(d_in=10, d_out=6, r=3) == 3 * 16
    assert lora_params(12288, 12288, 1) == 24576


def test_lora_params_accepts_numpy_ints():
    assert lora_params(np.int64(8), np.int32(4), np.int64(2)) == 24


def test_full_params_with_and_without_bias():
    assert full_params(10, 6) == 60
    assert full_params(10, 6, bias=True) == 66


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


def test_full_params_bad_bias():
    with pytest.raises(TypeError, match="bias"):
        full_params(3, 4, bias="yes")


def test_error_message_names_expected_and_got():
    with pytest.raises(ValueError, match=r"r must be <= min\(d_in, d_out\) = 6, got r=7"):
        lora_params(10, 6, 7)


# ---------------------------------------------------------------------------------------------
# a model, duck typed (a tiny fake: the real Module is not imported by counting.py)
# ---------------------------------------------------------------------------------------------

class FakeModel:
    """Two-layer toy: attention q_proj with LoRA (W frozen, A/B trainable) and a layer norm."""

    def __init__(self):
        self._params = {
            "attn.q_proj.W": np.zeros((6, 4)),     # frozen 24
            "attn.q_proj.b": np.zeros(6),          # frozen 6
            "attn.q_proj.A": np.zeros((2, 4)),     # trainable 8
            "attn.q_proj.B": np.zeros((6, 2)),     # trainable 12
            "ln1.gamma": np.ones(4),               # trainable 4
            "ln1.beta": np.zeros(4),               # frozen 4
            "temperature": np.ones(()),            # trainable 1, top level
        }
        self._trainable = {"attn.q_proj.A", "attn.q_proj.B", "ln1.gamma", "temperature"}

    def parameters(self):
        return dict(self._params)

    def trainable_parameters(self):
        return {n: p for n, p in self._params.items() if n in self._trainable}


def test_count_parameters_on_fake_model():
    c = count_parameters(FakeModel())
    assert c == ParamCount(trainable=8 + 12 + 4 + 1, frozen=24 + 6 + 4, total=59)


def test_parameter_table_groups_by_dotted_prefix_in_order():
    rows = parameter_table(FakeModel())
    assert rows == [ParamRow("attn.q_proj", 20, 30), ParamRow("ln1", 4, 4), ParamRow("", 1, 0)]
    c = count_parameters(FakeModel())
    assert sum(r.trainable for r in rows) == c.trainable
    assert sum(r.frozen for r in rows) == c.frozen


def test_format_parameter_table_is_aligned_and_totals():
    text = format_parameter_table(parameter_table(FakeModel()))
    lines = text.split("\n")
    assert lines[0].split() == ["layer", "trainable", "frozen"]
    assert lines[2].split() == ["attn.q_proj", "20", "30"]
    assert lines[4].split() == ["(model)", "1", "0"]
    assert lines[-1].split()[:3] == ["total", "25", "34"]
    assert "(42.37% trainable)" in lines[-1]                    # 25 / 59
    # every non-rule line ends its 'frozen' column at the same position
    ends = {len(ln.split("  (")[0]) for ln in lines if not ln.startswith("-")}
    assert len(ends) == 1


def test_format_parameter_table_thousands_separator():
    assert "1,234,567" in format_parameter_table([("big", 1234567, 0)])


def test_count_parameters_rejects_object_without_api():
    with pytest.raises(TypeError, match="parameters"):
        count_parameters(object())


def test_count_parameters_rejects_trainable_not_subset():
    m = FakeModel()
    m.trainable_parameters = lambda: {"ghost.W": np.zeros(3)}
    with pytest.raises(ValueError, match="ghost.W"):
        count_parameters(m)


def test_count_parameters_rejects_non_array_values():
    m = FakeModel()
    m.parameters = lambda: {"a.W": [1.0, 2.0]}
    m.trainable_parameters = lambda: {}
    with pytest.raises(TypeError, match="np.ndarray"):
        count_parameters(m)


def test_format_parameter_table_rejects_bad_row():
    with pytest.raises(TypeError, match="row 0"):
        format_parameter_table([("a", 1)])


# ---------------------------------------------------------------------------------------------
# real configs and the paper's numbers (Hu et al. 2021, arXiv:2106.09685)
# ---------------------------------------------------------------------------------------------

def test_configs_match_their_sources():
    g = MODEL_CONFIGS["gpt3-175b"]
    assert (g.d_model, g.n_layers, g.n_heads, g.d_ff) == (12288, 96, 96, 49152)
    assert g.n_params == 175e9
    assert (MODEL_CONFIGS["llama2-7b"].d_ff, MODEL_CONFIGS["llama2-7b"].gated_mlp) == (11008, True)
    for c in MODEL_CONFIGS.values():
        assert c.d_model % c.n_heads == 0, c.name


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        MODEL_CONFIGS["gpt3-175b"].d_model = 1


def test_gpt3_qv_r1_is_4_7M():                                   # Table 4
    assert lora_param_count("gpt3-175b", ("q", "v"), 1) == 4_718_592


@pytest.mark.parametrize("targets, r", [(("q",), 8), (("q", "k"), 4), (("q", "v"), 4),
                                        (("q", "k", "v", "o"), 2)])
def test_gpt3_table5_budget_is_18_87M(targets, r):                 # Table 5, "18M"
    assert lora_param_count("gpt3-175b", targets, r) == 18_874_368


def test_gpt3_qv_r8_is_37_7M():                                  # Table 4
    assert lora_param_count("gpt3-175b", ["q", "v"], 8) == 37_748_736


def test_roberta_qv_r8():                                         # Table 2, 0.3M / 0.8M
    assert lora_param_count("roberta-base", ("q", "v"), 8) == 294_912
    assert lora_param_count(MODEL_CONFIGS["roberta-large"], ("q", "v"), 8) == 786_432


def test_mlp_and_gate_targets():
    g = MODEL_CONFIGS["llama2-7b"]
    assert target_shape(g, "up") == (11008, 4096)
    assert target_shape(g, "down") == (4096, 11008)
    assert lora_param_count(g, ("gate",), 1) == 32 * (4096 + 11008)
    assert lora_param_count("gpt2-medium", ("up", "down"), 2) == 24 * 2 * 2 * (1024 + 4096)


def test_gpt2_table3_is_a_real_discrepancy():
    # Formula (q, v, r = 4) gives 0.39M / 0.74M; Table 3 prints 0.35M / 0.77M.
    medium = lora_param_count("gpt2-medium", ("q", "v"), 4)
    large = lora_param_count("gpt2-large", ("q", "v"), 4)
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
    gpt2 = rows[("gpt2-medium", ("q", "v"), 4)], rows[("gpt2-large", ("q", "v"), 4)]
    assert gpt2[0].ratio == pytest.approx(1.1235, abs=1e-4)
    assert gpt2[1].ratio == pytest.approx(0.9575, abs=1e-4)
    exact = [r for k, r in rows.items() if k[0] in ("gpt3-175b", "roberta-base", "roberta-large")
             and r.paper != 18e6]
    assert all(abs(r.ratio - 1) < 0.02 for r in exact)         # within the paper's rounding


def test_unknown_config_lists_valid_names():
    with pytest.raises(ValueError, match="gpt3-175b"):
        lora_param_count("gpt-5", ("q",), 1)


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'q', 'k', 'v', 'o'"):
        lora_param_count("gpt3-175b", ("x",), 1)


def test_gate_only_for_gated_mlp():
    with pytest.raises(ValueError, match="gate"):
        lora_param_count("gpt2-large", ("gate",), 1)


def test_targets_as_string_rejected():
    with pytest.raises(TypeError, match="string 'qv'"):
        lora_param_count("gpt3-175b", "qv", 1)


def test_empty_and_repeated_targets_rejected():
    with pytest.raises(ValueError, match="at least one"):
        lora_param_count("gpt3-175b", (), 1)
    with pytest.raises(ValueError, match="repeat"):
        lora_param_count("gpt3-175b", ("q", "q"), 1)


def test_config_wrong_type_rejected():
    with pytest.raises(TypeError, match="ModelConfig"):
        lora_param_count(42, ("q",), 1)


def test_custom_config_works():
    tiny = ModelConfig("tiny", d_model=8, n_layers=2, n_heads=2, d_ff=32, vocab_size=10,
                       n_params=1000)
    assert lora_param_count(tiny, ("q", "v"), 2) == 2 * 2 * 2 * 16


# ---------------------------------------------------------------------------------------------
# checkpoint bytes (Hu et al. 2021 §4.2: "350GB -> 35MB")
# ---------------------------------------------------------------------------------------------

def test_gpt3_full_checkpoint_is_350GB_fp16():
    assert checkpoint_bytes(MODEL_CONFIGS["gpt3-175b"].n_params) == 350_000_000_000


def test_gpt3_qv_r4_adapter_is_37_7MB_not_35MB():
    b = adapter_checkpoint_bytes("gpt3-175b", ("q", "v"), 4)
    assert b == 37_748_736                      # 37.7 MB decimal
    assert b / 2**20 == pytest.approx(36.0)     # 36.0 MiB
    assert 9_000 < 350e9 / b < 10_000           # "roughly 10,000x" is ≈ 9,272x
    # no GPT-3 (targets, r) lands on 35 MB: adapters come in 4,718,592-byte units
    unit = adapter_checkpoint_bytes("gpt3-175b", ("q",), 1)
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


def test_state_ratio_is_parameter_ratio():
    assert state_ratio(1000, 10, "adam") == 100.0
    assert state_ratio(1000, 10, "sgd") == 100.0
    full = MODEL_CONFIGS["gpt3-175b"].n_params
    lora = lora_param_count("gpt3-175b", ("q", "v"), 4)
    assert state_ratio(full, lora) == pytest.approx(full / lora)


def test_total_state_includes_frozen_weights_gpt3():
    full = total_state_bytes(175e9, 0, "adam", np.float16)
    lora = total_state_bytes(18_874_368, 175e9, "adam", np.float16)
    assert full == 1_400_000_000_000                            # 1.4 TB (paper: 1.2 TB)
    assert lora == 350_000_000_000 + 18_874_368 * 2 * 4         # ≈ 350 GB (paper: 350 GB)


def test_training_state_bad_optimizer_and_dtype():
    with pytest.raises(ValueError, match=r"\['adam', 'sgd'\]"):
        training_state_bytes(10, "rmsprop")
    with pytest.raises(TypeError, match="floating"):
        training_state_bytes(10, "adam", np.int32)


def test_state_ratio_zero_lora_rejected():
    with pytest.raises(ValueError, match="n_lora"):
        state_ratio(10, 0)

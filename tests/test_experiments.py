"""Full fine-tuning vs LoRA: the result objects, the measurements, and the claims of issue 3.

The claims are asserted on the default sweep (seed 0, run once per session, ~10 s) and, more
cheaply, on three other seeds in quick mode: they hold because of the task's design (see
``lora_np.tasks``), not because of one lucky seed.
"""

import numpy as np
import pytest

from lora_np.analysis import left_subspace_similarity, singular_values
from lora_np.counting import state_ratio, training_state_bytes
from lora_np.experiments import (DEFAULT_RANKS, MethodResult, SweepResult, SweepSettings,
                                 attention_sweep, check_claims, format_claims, format_table,
                                 lora_finetune, rank_sweep, sweep)
from lora_np.tasks import mlp_task

TINY = SweepSettings(steps=20, batch_size=32)
SMALL_TASK = dict(n_train=128, n_val=64, n_old=64)


@pytest.fixture(scope="module")
def tiny():
    return rank_sweep((1, 4), settings=TINY, **SMALL_TASK)


# --------------------------------------------------------------------------- the claims


def test_claim_full_ft_and_lora_at_or_above_true_rank_fit_task_B(default_sweep):
    res, k = default_sweep, default_sweep.task.true_rank
    L0 = res.initial_val_loss
    assert res.full.final_val_loss <= 0.01 * L0, f"full FT {res.full.final_val_loss / L0:.4f}·L₀"
    for r in res.ranks:
        if r >= k:
            got = res.lora[r].final_val_loss / L0
            assert got <= 0.01, f"LoRA r={r}: {got:.4f}·L₀"


def test_claim_lora_below_true_rank_cannot(default_sweep):
    res, k = default_sweep, default_sweep.task.true_rank
    low = [r for r in res.ranks if r < k]
    assert low == [1, 2]
    for r in low:
        got = res.lora[r].final_val_loss / res.initial_val_loss
        assert got >= 0.05, f"LoRA r={r}: {got:.4f}·L₀"
        # Eckart–Young with equal σ: the best rank-r update leaves about (k − r)/k of L₀
        assert got == pytest.approx((k - r) / k, abs=0.1), f"LoRA r={r}: {got:.3f}·L₀ vs {(k - r) / k}"


def test_claim_full_ft_update_is_low_rank_and_points_along_delta_true(default_sweep):
    res, k = default_sweep, default_sweep.task.true_rank
    for name, dW in res.full.delta_weights.items():
        s = singular_values(dW)
        assert s[k] / s[k - 1] <= 0.2, f"{name}: σ_{k + 1}/σ_{k} = {s[k] / s[k - 1]:.3f}"
        phi = left_subspace_similarity(dW, res.task.delta_true[name], k)
        assert phi >= 0.9, f"{name}: φ = {phi:.3f}"


def test_claim_lora_parameter_count_is_the_formula(default_sweep):
    res = default_sweep
    fc1 = res.task.pretrained.fc1
    for r, m in res.lora.items():
        assert m.trainable_params == r * (fc1.d_in + fc1.d_out)
    n_full = sum(p.size for p in res.task.pretrained.parameters().values())
    assert res.full.trainable_params == n_full == 64 * 64 * 2 + 64 * 2


def test_claim_measured_state_shrinks_by_the_formulas_factor(default_sweep):
    res = default_sweep
    for r, m in res.lora.items():
        measured = res.full.state_bytes / m.state_bytes
        predicted = state_ratio(res.full.trainable_params, m.trainable_params)
        assert measured == pytest.approx(predicted, rel=0.1), f"r={r}: {measured:.2f} vs {predicted:.2f}"
        # params + grads + Adam's m and v, 8 bytes each in float64
        assert m.state_bytes == training_state_bytes(m.trainable_params, "adam", np.float64)
    assert res.full.state_bytes == 4 * 8 * res.full.trainable_params


def test_claim_lora_forgets_task_A_less_than_full_ft(default_sweep):
    """Honest finding of this design: yes, at every r ≥ k. Task A never sees ΔW*'s input
    directions, so all old-task loss is collateral damage — label noise fitted into weights
    task A also uses — and it grows with the number of trainable parameters."""
    res, k = default_sweep, default_sweep.task.true_rank
    high = [r for r in res.ranks if r >= k]
    for r in high:
        assert res.lora[r].old_task_loss < res.full.old_task_loss, \
            f"LoRA r={r} old-task loss {res.lora[r].old_task_loss:.2e} ≥ full FT {res.full.old_task_loss:.2e}"
    olds = [res.lora[r].old_task_loss for r in high]
    assert olds == sorted(olds), f"forgetting should grow with r ≥ k: {olds}"


def test_check_claims_agrees(default_sweep):
    claims = check_claims(default_sweep)
    assert len(claims) == 7
    assert all(c.holds for c in claims), format_claims(claims)
    assert format_claims(claims).count("✓") == 7


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_claims_hold_for_other_seeds_in_quick_mode(seed):
    res = rank_sweep((3, 64), seed=seed, settings=SweepSettings(steps=300, seed=seed))
    claims = check_claims(res)
    assert all(c.holds for c in claims), f"seed {seed}:\n{format_claims(claims)}"


# --------------------------------------------------------------------------- result objects


def test_result_objects(default_sweep):
    res = default_sweep
    assert isinstance(res, SweepResult) and res.ranks == list(DEFAULT_RANKS)
    assert res.initial_val_loss == res.task.val_loss(res.task.pretrained)
    assert [m.label for m in res.methods()] == ["full FT"] + [f"LoRA r={r}" for r in DEFAULT_RANKS]
    assert res.full.method == "full" and res.full.rank is None
    for r, m in res.lora.items():
        assert isinstance(m, MethodResult) and m.method == "lora" and m.rank == r
        assert m.targets == ("fc1",) and m.scale == 1.0
        assert set(m.delta_weights) == set(res.task.delta_true)
        assert m.delta_weights["fc1"].shape == (64, 64)
        assert np.linalg.matrix_rank(m.delta_weights["fc1"]) <= r
        A, B = m.lora_factors["fc1"]
        assert A.shape == (r, 64) and B.shape == (64, r)
        np.testing.assert_allclose(m.delta_weights["fc1"], m.scale * B @ A)
    for m in res.methods():
        assert len(m.loss_history) == res.settings.steps == 600
        assert m.val_history[0] == (0, pytest.approx(res.initial_val_loss))
        assert m.val_history[-1] == (600, m.final_val_loss)
        assert m.seconds_per_step > 0 and m.old_task_loss >= 0


def test_the_pretrained_model_is_never_trained(tiny):
    fresh = mlp_task(seed=0, **SMALL_TASK)
    for name, p in fresh.pretrained.parameters().items():
        np.testing.assert_array_equal(tiny.task.pretrained.parameters()[name], p)


def test_full_ft_delta_is_weight_change(tiny):
    assert set(tiny.full.delta_weights) == {"fc1"}
    assert np.abs(tiny.full.delta_weights["fc1"]).max() > 0


def test_sweeps_are_reproducible(tiny):
    again = rank_sweep((1, 4), settings=TINY, **SMALL_TASK)
    for a, b in zip(tiny.methods(), again.methods()):
        assert a.loss_history == b.loss_history
        np.testing.assert_array_equal(a.delta_weights["fc1"], b.delta_weights["fc1"])


def test_lora_on_other_targets():
    task = mlp_task(seed=0, **SMALL_TASK)
    both = lora_finetune(task, 2, targets=("fc1", "fc2"), settings=TINY)
    assert both.trainable_params == 2 * (64 + 64) * 2
    assert set(both.lora_factors) == {"fc1", "fc2"}
    only_fc2 = lora_finetune(task, 2, targets="fc2", settings=TINY)
    # the shifted layer is not adapted: its ΔW is exactly zero
    np.testing.assert_array_equal(only_fc2.delta_weights["fc1"], 0.0)


def test_fixed_alpha():
    task = mlp_task(seed=0, **SMALL_TASK)
    m = lora_finetune(task, 4, settings=SweepSettings(steps=2, alpha=8.0))
    assert m.scale == 2.0


def test_attention_sweep_small():
    res = attention_sweep((2,), settings=SweepSettings(steps=5, batch_size=4),
                          n_train=8, n_val=4, n_old=4, T=4)
    assert res.task.kind == "attention"
    assert set(res.full.delta_weights) == {"q_proj", "v_proj"}
    m = res.lora[2]
    assert m.targets == ("q_proj", "v_proj")
    assert m.trainable_params == 2 * 2 * (64 + 64)
    assert res.full.trainable_params == 4 * (64 * 64 + 64)
    other = attention_sweep((2,), settings=SweepSettings(steps=2, batch_size=4),
                            targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                            shifted=("v_proj",), n_train=8, n_val=4, n_old=4, T=4)
    assert set(other.lora[2].delta_weights) == {"v_proj"}
    assert other.lora[2].trainable_params == 4 * 2 * 128


def test_format_table(tiny):
    text = format_table(tiny)
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].split()[:3] == ["method", "trainable", "%"]
    assert lines[2].startswith("full FT") and "100.0%" in lines[2]
    assert lines[3].startswith("LoRA r=1") and "128" in lines[3]


@pytest.mark.parametrize("ranks, match", [
    ((), "at least one rank"),
    ((0,), "ints >= 1"),
    ((2.0,), "ints >= 1"),
    ((2, 2), "distinct"),
    ((65,), "larger than min"),
])
def test_bad_ranks(ranks, match):
    task = mlp_task(seed=0, **SMALL_TASK)
    with pytest.raises(ValueError, match=match):
        sweep(task, ranks, settings=TINY)


def test_bad_sweep_arguments():
    task = mlp_task(seed=0, **SMALL_TASK)
    with pytest.raises(TypeError, match="Task"):
        sweep("task", (1,))
    with pytest.raises(TypeError, match="SweepSettings"):
        sweep(task, (1,), settings={"steps": 5})
    with pytest.raises(ValueError, match="no layer .fc9."):
        sweep(task, (1,), targets=("fc9",), settings=TINY)

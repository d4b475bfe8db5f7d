"""Full fine-tuning vs LoRA: the result objects, the measurements, and the claims.

The claims are asserted on the default MLP sweep and the default attention sweep (exactly what
``python -m lora_np`` and ``python -m lora_np --model attention`` run, each once per session)
and, more cheaply, on three other seeds in quick mode: they hold because of the task's design
(see ``lora_np.tasks``), not because of one lucky seed.
"""

import copy

import numpy as np
import pytest

from lora_np import add_lora
from lora_np.analysis import left_subspace_similarity, singular_values
from lora_np.counting import lora_params, training_state_bytes
from lora_np.experiments import (DEFAULT_RANKS, MethodResult, SweepResult, SweepSettings,
                                 attention_sweep, check_claims, equivalent_delta, format_claims,
                                 format_table, lora_finetune, rank_sweep, sweep)
from lora_np.tasks import attention_task, mlp_task

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
        assert res.full.equivalent_delta[name] is dW          # an MLP has no symmetry to remove
        s = singular_values(dW)
        assert s[k] / s[k - 1] <= 0.2, f"{name}: σ_{k + 1}/σ_{k} = {s[k] / s[k - 1]:.3f}"
        phi = left_subspace_similarity(dW, res.task.delta_true[name], k)
        assert phi >= 0.9, f"{name}: φ = {phi:.3f}"


def test_trainable_params_counted_from_the_arrays_are_the_formula(default_sweep):
    """Not a claim of the sweep (true by construction of A (r, d_in) and B (d_out, r)), but the
    table's count, made from the model's arrays, must be ``counting.lora_params``'s."""
    res = default_sweep
    fc1 = res.task.pretrained.fc1
    for r, m in res.lora.items():
        assert m.trainable_params == lora_params(fc1.d_in, fc1.d_out, r) == r * (64 + 64)
    n_full = sum(p.size for p in res.task.pretrained.parameters().values())
    assert res.full.trainable_params == n_full == 64 * 64 * 2 + 64 * 2


def test_measured_state_is_the_counting_formula(default_sweep):
    """Likewise the table's state bytes, measured from the arrays (params + grads + Adam's m and
    v, 8 bytes each in float64), against ``counting.training_state_bytes``."""
    res = default_sweep
    for m in res.methods():
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
    assert len(claims) == 5
    assert all(c.holds for c in claims), format_claims(claims)
    assert format_claims(claims).count("✓") == 5
    assert not any("trainable params" in c.statement or "state" in c.statement for c in claims), \
        "claims true by construction are not claims of the sweep"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_claims_hold_for_other_seeds_in_quick_mode(seed):
    res = rank_sweep((3, 64), seed=seed, settings=SweepSettings(steps=300, seed=seed))
    claims = check_claims(res)
    assert all(c.holds for c in claims), f"seed {seed}:\n{format_claims(claims)}"


# --------------------------------------------------------------------------- attention's claims


def test_attention_claims_hold_at_the_default_settings(default_attention_sweep):
    """`python -m lora_np --model attention` printed a ✗ (σ_5/σ_4 of the raw ΔW_q, ΔW_v: 0.24,
    0.31) and exited 0. Every claim must hold at the defaults: 600 steps, every default rank."""
    res = default_attention_sweep
    assert res.ranks == list(DEFAULT_RANKS) and res.settings.steps == 600
    assert res.settings.batch_size == 64 and res.task.kind == "attention"
    claims = check_claims(res)
    assert len(claims) == 5 and all(c.holds for c in claims), format_claims(claims)


def test_attention_fits_task_B_at_and_above_the_true_rank_only(default_attention_sweep):
    res, k = default_attention_sweep, default_attention_sweep.task.true_rank
    L0 = res.initial_val_loss
    assert res.full.final_val_loss <= 0.01 * L0
    for r in res.ranks:
        got = res.lora[r].final_val_loss / L0
        if r >= k:
            assert got <= 0.01, f"LoRA r={r}: {got:.4f}·L₀"
        else:                   # near Eckart–Young's (k − r)/k, like the MLP
            assert got == pytest.approx((k - r) / k, abs=0.1), f"LoRA r={r}: {got:.3f}·L₀"
    high = [res.lora[r].old_task_loss for r in res.ranks if r >= k]
    assert max(high) < res.full.old_task_loss and high == sorted(high)


def test_attention_full_ft_delta_is_rank_k_through_the_symmetries_only(default_attention_sweep):
    """Why attention's claim reads ΔW through W_qᵀW_k and W_oW_v: full FT also moves W_k and W_o,
    so its raw ΔW_q, ΔW_v drift along the symmetries (σ_5/σ_4 > 0.2: no elbow), while the
    function-determined change is ΔW* — rank k, as sharp as the MLP's elbow, within 2% of ΔW*."""
    res, k = default_attention_sweep, default_attention_sweep.task.true_rank
    for name, dW_star in res.task.delta_true.items():
        raw = singular_values(res.full.delta_weights[name])
        eq = singular_values(res.full.equivalent_delta[name])
        assert raw[k] / raw[k - 1] > 0.2, f"{name}: raw σ_{k + 1}/σ_{k} = {raw[k] / raw[k - 1]:.3f}"
        assert eq[k] / eq[k - 1] < 0.02, f"{name}: σ_{k + 1}/σ_{k} = {eq[k] / eq[k - 1]:.4f}"
        assert left_subspace_similarity(res.full.equivalent_delta[name], dW_star, k) > 0.999
        err = np.linalg.norm(res.full.equivalent_delta[name] - dW_star) / np.linalg.norm(dW_star)
        assert err < 0.02, f"{name}: ‖ΔW − ΔW*‖/‖ΔW*‖ = {err:.3f}"
    for m in res.lora.values():            # W_k, W_o frozen: nothing to fold back
        for name, dW in m.delta_weights.items():
            np.testing.assert_allclose(m.equivalent_delta[name], dW, atol=1e-12)


# --------------------------------------------------------------------------- equivalent_delta


def _gauge(model, rng):
    """Apply attention's symmetries with a random invertible G per head, in place."""
    d, H = model.d_model, model.n_heads
    for start in range(0, d, d // H):
        h = slice(start, start + d // H)
        G = np.eye(d // H) + 0.1 * rng.standard_normal((d // H, d // H))
        model.q_proj.W[h] = G @ model.q_proj.W[h]
        model.k_proj.W[h] = np.linalg.inv(G).T @ model.k_proj.W[h]
        model.v_proj.W[h] = G @ model.v_proj.W[h]
        model.o_proj.W[:, h] = model.o_proj.W[:, h] @ np.linalg.inv(G)
    return model


def test_equivalent_delta_of_teacher_B_is_delta_star_however_it_is_parametrised(rng):
    task = attention_task(seed=0, n_train=4, n_val=4, n_old=4, T=4)
    teacher = _gauge(copy.deepcopy(task.teacher), rng)       # the same function, other weights
    np.testing.assert_allclose(teacher(task.x_val), task.teacher(task.x_val), atol=1e-10)
    raw = {n: getattr(teacher, n).W - getattr(task.pretrained, n).W for n in task.shifted}
    got = equivalent_delta(task, teacher, raw)
    for name, dW_star in task.delta_true.items():
        np.testing.assert_allclose(got[name], dW_star, atol=1e-10)
        assert np.linalg.norm(raw[name] - dW_star) > 0.1      # the raw change is not ΔW*


def test_equivalent_delta_leaves_mlp_and_partner_shifted_layers_raw():
    mlp = mlp_task(seed=0, n_train=8, n_val=8, n_old=8)
    raw = {"fc1": np.ones((64, 64))}
    assert equivalent_delta(mlp, mlp.teacher, raw)["fc1"] is raw["fc1"]
    both = attention_task(seed=0, shifted=("q_proj", "k_proj"), n_train=4, n_val=4, n_old=4, T=4)
    raw = {n: getattr(both.teacher, n).W - getattr(both.pretrained, n).W for n in both.shifted}
    got = equivalent_delta(both, both.teacher, raw)
    assert all(got[n] is raw[n] for n in both.shifted)


def test_equivalent_delta_reads_lora_layers_through_their_applied_weight():
    """LoRA on q and k: ΔW_q is the least-squares change of W_q alone that reproduces the change
    of every head's W_qᵀW_k — exactly its part inside W⁰_{k,h}'s row space (projector Π_h)."""
    task = attention_task(seed=0, n_train=4, n_val=4, n_old=4, T=4)
    model = add_lora(task.new_model(), ["q_proj", "k_proj"], r=2, alpha=4.0, rng=0)
    for m in (model.q_proj, model.k_proj):
        m.B[...] = 0.1 * np.random.default_rng(1).standard_normal(m.B.shape)
    raw = {"q_proj": model.q_proj.delta_weight(), "v_proj": np.zeros((64, 64))}
    got = equivalent_delta(task, model, raw)
    P = task.pretrained
    Wq = model.q_proj.W + model.q_proj.delta_weight()
    Wk = model.k_proj.W + model.k_proj.delta_weight()
    for start in range(0, 64, 16):
        h = slice(start, start + 16)
        dM = Wq[h].T @ Wk[h] - P.q_proj.W[h].T @ P.k_proj.W[h]
        Pi = P.k_proj.W[h].T @ P.k_proj.W[h]                  # W⁰_k has orthonormal rows
        np.testing.assert_allclose(got["q_proj"][h].T @ P.k_proj.W[h], dM @ Pi, atol=1e-12)
    np.testing.assert_allclose(got["v_proj"], 0.0, atol=1e-12)


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
    ((0,), r"ranks\[0\] must be >= 1"),
    ((2, 2), "distinct"),
    ((65,), "larger than min"),
])
def test_bad_ranks(ranks, match):
    task = mlp_task(seed=0, **SMALL_TASK)
    with pytest.raises(ValueError, match=match):
        sweep(task, ranks, settings=TINY)


def test_a_float_rank_is_a_type_error():
    with pytest.raises(TypeError, match=r"ranks\[1\] must be an int"):
        sweep(mlp_task(seed=0, **SMALL_TASK), (1, 2.0), settings=TINY)


def test_bad_sweep_arguments():
    task = mlp_task(seed=0, **SMALL_TASK)
    with pytest.raises(TypeError, match="Task"):
        sweep("task", (1,))
    with pytest.raises(TypeError, match="SweepSettings"):
        sweep(task, (1,), settings={"steps": 5})
    with pytest.raises(ValueError, match="no layer .fc9."):
        sweep(task, (1,), targets=("fc9",), settings=TINY)


# --------------------------------------------------------------------------- held-out rows, the fair protocol


def test_held_out_split_is_fresh_task_b_data():
    from lora_np.experiments import held_out_split
    task = mlp_task(0, 4, **SMALL_TASK)
    x, y = held_out_split(task)
    assert x.shape == task.x_val.shape and y.shape == task.y_val.shape
    x2, y2 = held_out_split(task)
    np.testing.assert_array_equal(x, x2)                          # reproducible
    np.testing.assert_array_equal(y, y2)
    assert not np.allclose(x, task.x_val) and not np.allclose(x, task.x_train[:64])
    # targets = teacher B + label noise of the task's std
    resid = y - task.teacher(x)
    assert resid.std() == pytest.approx(task.noise, rel=0.1)
    assert held_out_split(task, 10)[0].shape == (10, 64)
    with pytest.raises(TypeError, match="Task"):
        held_out_split(None)
    with pytest.raises(ValueError, match="n_rows"):
        held_out_split(task, 0)


def test_held_out_losses_are_the_trained_models_losses():
    from lora_np.experiments import full_finetune
    task = mlp_task(0, 4, **SMALL_TASK)
    split = {"val again": (task.x_val, task.y_val)}
    for m in (full_finetune(task, TINY, held_out=split), lora_finetune(task, 4, settings=TINY, held_out=split)):
        assert m.held_out_losses["val again"] == pytest.approx(m.final_val_loss, rel=1e-12)
    assert lora_finetune(task, 4, settings=TINY).held_out_losses == {}


def test_fair_comparison_chooses_each_lr_on_validation_and_reports_held_out():
    from lora_np.experiments import fair_comparison, held_out_split
    task = mlp_task(0, 4, **SMALL_TASK)
    lrs = (1e-3, 1e-2)
    fr = fair_comparison(task, {"full FT": None, "LoRA r=4": 4, "LoRA r=4, α=1": dict(r=4, alpha=1.0)},
                         lrs, seeds=(0, 1), settings=TINY)
    assert fr.names == ["full FT", "LoRA r=4", "LoRA r=4, α=1"]
    for o in fr:
        assert o.lr == min(o.grid, key=lambda lr: o.grid[lr].validation)
        assert len(o.runs) == 2 and set(o.best.held_out) == {"test", "old task"}
    # the first seed at the sweep's own lr is the sweep's run, bit for bit
    same = lora_finetune(task, 4, settings=replace_settings(TINY, lr_lora=1e-2), held_out={"t": held_out_split(task)})
    grid_run = fr["LoRA r=4"].grid[1e-2]
    assert grid_run.validation == same.final_val_loss
    assert grid_run.held_out["test"] == same.held_out_losses["t"]
    assert grid_run.held_out["old task"] == same.old_task_loss
    assert fr["LoRA r=4, α=1"].best.details.scale == 0.25
    # seed 1 is another batch order (and A init): another run
    assert fr["LoRA r=4"].runs[1].validation != fr["LoRA r=4"].runs[0].validation


def replace_settings(settings, **kw):
    from dataclasses import replace
    return replace(settings, **kw)


def test_fair_comparison_bad_arguments():
    from lora_np.experiments import fair_comparison
    task = mlp_task(0, 4, **SMALL_TASK)
    with pytest.raises(TypeError, match="Task"):
        fair_comparison(None, {"a": 4}, (1e-2,))
    with pytest.raises(TypeError, match="non-empty dict"):
        fair_comparison(task, {}, (1e-2,))
    with pytest.raises(TypeError, match="None \\(full FT\\), an int rank or a dict"):
        fair_comparison(task, {"a": "four"}, (1e-2,))
    with pytest.raises(ValueError, match="'r'"):
        fair_comparison(task, {"a": dict(rank=4)}, (1e-2,))
    with pytest.raises(ValueError, match="larger than min"):
        fair_comparison(task, {"a": 65}, (1e-2,))
    with pytest.raises(TypeError, match="SweepSettings"):
        fair_comparison(task, {"a": 4}, (1e-2,), settings=dict(steps=3))


# --------------------------------------------------------------------------- overfitting, by the textbook


def test_lora_free_parameters():
    from lora_np.experiments import lora_free_parameters
    assert lora_free_parameters(64, 64, 4) == 4 * 124 == lora_params(64, 64, 4) - 16
    assert lora_free_parameters(64, 64, 64) == 64 * 64            # every 64 x 64 matrix
    assert lora_free_parameters(10, 30, 2) == 2 * 38
    # the dimension of the rank-r matrices: the rank of the Jacobian of (A, B) -> B A at a generic point
    rng = np.random.default_rng(0)
    d_out, d_in, r = 6, 5, 2
    A, B = rng.standard_normal((r, d_in)), rng.standard_normal((d_out, r))
    J = np.concatenate([np.kron(B, np.eye(d_in)), np.kron(np.eye(d_out), A.T)], axis=1)   # d(BA)/d(vec A, vec B)
    assert np.linalg.matrix_rank(J) == lora_free_parameters(d_in, d_out, r)
    with pytest.raises(ValueError, match="min\\(d_in, d_out\\)"):
        lora_free_parameters(4, 8, 5)


def test_least_squares_overfit_is_what_linear_least_squares_does():
    from lora_np.experiments import least_squares_overfit
    assert least_squares_overfit(8320, 65536) == pytest.approx((0.873047, 1.126953), abs=1e-6)
    assert least_squares_overfit(0, 10) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    n, p, sigma = 400, 100, 0.5
    train, test = [], []
    for _ in range(200):                              # fixed design, fresh noise each time
        X = rng.standard_normal((n, p)) if not train else X
        beta = rng.standard_normal(p)
        y = X @ beta + sigma * rng.standard_normal(n)
        fit = np.linalg.lstsq(X, y, rcond=None)[0]
        train.append(np.mean((X @ fit - y) ** 2) / sigma ** 2)
        test.append(np.mean((X @ fit - X @ beta - sigma * rng.standard_normal(n)) ** 2) / sigma ** 2)
    pred_train, pred_test = least_squares_overfit(p, n)
    assert np.mean(train) == pytest.approx(pred_train, abs=0.01)
    assert np.mean(test) == pytest.approx(pred_test, abs=0.02)
    with pytest.raises(ValueError, match="p must be <= n"):
        least_squares_overfit(11, 10)

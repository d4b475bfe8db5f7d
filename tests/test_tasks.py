"""Tasks: a known rank-k shift ΔW*, invisible on task A's inputs, deterministic from the seed."""

import numpy as np
import pytest

from lora_np import MLP, MultiHeadAttention
from lora_np.tasks import (Task, attention_task, low_rank_delta, mlp_task, orthogonal_weight,
                           random_orthonormal)


@pytest.fixture(scope="module")
def task():
    return mlp_task(seed=0)


def _arrays(t: Task):
    return {"x_train": t.x_train, "y_train": t.y_train, "x_val": t.x_val, "y_val": t.y_val,
            "x_old": t.x_old, "y_old": t.y_old, **{f"delta {k}": v for k, v in t.delta_true.items()},
            **{f"W {k}": v for k, v in t.pretrained.parameters().items()}}


def test_same_seed_same_task_bit_for_bit(task):
    again = mlp_task(seed=0)
    for name, a in _arrays(task).items():
        assert np.array_equal(a, _arrays(again)[name]), f"{name} differs between two calls with seed 0"


def test_different_seeds_differ(task):
    other = mlp_task(seed=1)
    assert not np.allclose(task.delta_true["fc1"], other.delta_true["fc1"])
    assert not np.allclose(task.x_train, other.x_train)


def test_default_shapes_allow_rank_64(task):
    assert task.kind == "mlp" and task.shifted == ("fc1",)
    assert task.x_train.shape == (1024, 64) and task.y_train.shape == (1024, 64)
    assert task.x_val.shape == (512, 64) and task.x_old.shape == (512, 64)
    fc1 = task.pretrained.fc1
    assert min(fc1.d_in, fc1.d_out) >= 64, "LoRA ranks up to 64 need min(d_in, d_out) >= 64"
    assert task.delta_true["fc1"].shape == fc1.W.shape == (64, 64)


def test_delta_true_has_exactly_the_requested_rank_and_singular_values():
    t = mlp_task(seed=3, true_rank=3, singular_values=[0.5, 3.0, 1.0])
    s = np.linalg.svd(t.delta_true["fc1"], compute_uv=False)
    np.testing.assert_allclose(s[:3], [3.0, 1.0, 0.5], rtol=1e-12)
    assert s[3] < 1e-12 * s[0], f"σ_4 = {s[3]:.1e}: ΔW* should have rank 3"
    np.testing.assert_array_equal(t.singular_values, [3.0, 1.0, 0.5])


def test_teacher_is_pretrained_plus_delta(task):
    W0 = task.pretrained.fc1.W
    np.testing.assert_array_equal(task.teacher.fc1.W, W0 + task.delta_true["fc1"])
    np.testing.assert_array_equal(task.teacher.fc2.W, task.pretrained.fc2.W)
    assert task.teacher.fc1.W is not W0


def test_shift_is_invisible_on_task_A_inputs(task):
    """ΔW*'s row space avoids task A's input directions: teacher B = teacher A on task A."""
    assert np.abs(task.delta_true["fc1"] @ task.old_basis).max() < 1e-12
    # task A's inputs lie in span(old_basis)
    resid = task.x_old - task.x_old @ task.old_basis @ task.old_basis.T
    assert np.abs(resid).max() < 1e-12
    np.testing.assert_allclose(task.teacher(task.x_old), task.y_old, atol=1e-12)
    assert task.old_task_loss(task.pretrained) == 0.0
    assert task.old_task_loss(task.teacher) < 1e-24


def test_initial_loss_far_above_the_noise_floor(task):
    L0 = task.val_loss(task.pretrained)
    assert L0 > 100 * task.noise_floor, f"L₀ = {L0:.2e} should dwarf the noise floor {task.noise_floor:.1e}"
    # the teacher itself sits at the noise floor (validation targets carry the label noise)
    assert task.val_loss(task.teacher) == pytest.approx(task.noise_floor, rel=0.1)


def test_noise_zero_means_teacher_is_exact():
    t = mlp_task(seed=0, noise=0.0, n_train=16, n_val=16, n_old=16)
    np.testing.assert_array_equal(t.y_train, t.teacher(t.x_train))
    assert t.val_loss(t.teacher) == 0.0


def test_orthogonal_teacher_weights(task):
    W1, W2 = task.pretrained.fc1.W, task.pretrained.fc2.W
    np.testing.assert_allclose(W1 @ W1.T, np.eye(64), atol=1e-12)
    np.testing.assert_allclose(W2 @ W2.T, np.eye(64), atol=1e-12)


def test_orthogonal_weight_tall_and_wide():
    rng = np.random.default_rng(0)
    wide = orthogonal_weight(rng, 3, 5)
    np.testing.assert_allclose(wide @ wide.T, np.eye(3), atol=1e-12)
    tall = orthogonal_weight(rng, 8, 2)
    np.testing.assert_allclose(tall.T @ tall, 4 * np.eye(2), atol=1e-12)
    assert np.mean(np.sum(tall**2, axis=1)) == pytest.approx(1.0)


def test_random_orthonormal_and_low_rank_delta():
    rng = np.random.default_rng(0)
    Q = random_orthonormal(rng, 6, 4)
    np.testing.assert_allclose(Q.T @ Q, np.eye(4), atol=1e-12)
    basis = random_orthonormal(rng, 10, 3)
    D = low_rank_delta(rng, 7, 10, [2.0, 1.0], row_basis=basis)
    # rows of D lie in span(basis)
    np.testing.assert_allclose(D - D @ basis @ basis.T, 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(D, compute_uv=False)[:3], [2, 1, 0], atol=1e-12)
    with pytest.raises(ValueError, match="1 <= m <= n"):
        random_orthonormal(rng, 3, 4)


def test_new_model_is_an_independent_copy(task):
    before = task.pretrained.fc1.W.copy()
    m = task.new_model()
    assert isinstance(m, MLP)
    m.fc1.W[...] += 1.0
    np.testing.assert_array_equal(task.pretrained.fc1.W, before)
    assert sorted(m.trainable_parameters()) == ["fc1.W", "fc1.b", "fc2.W", "fc2.b"]


def test_shifting_fc2_draws_delta_from_all_directions():
    t = mlp_task(seed=0, shifted=("fc1", "fc2"), n_train=8, n_val=8, n_old=8)
    assert set(t.delta_true) == {"fc1", "fc2"}
    assert np.linalg.matrix_rank(t.delta_true["fc2"]) == 4
    # fc2's ΔW* acts on hidden features, so task A's outputs change too
    assert t.old_task_loss(t.teacher) > 1e-4
    np.testing.assert_array_equal(t.teacher.fc2.W, t.pretrained.fc2.W + t.delta_true["fc2"])


def test_describe_mentions_the_design(task):
    text = task.describe()
    for word in ("MLP 64→64→64", "fc1", "rank-4", "(σ = 2, 2, 2, 2)", "32 of 64", "noise"):
        assert word in text


def test_describe_summarises_a_long_spectrum():
    small = dict(n_train=8, n_val=8, n_old=8)
    flat = mlp_task(true_rank=64, shifted=("fc2",), singular_values=1.0, **small).describe()
    assert "rank-64" in flat and "(σ = 1 (all 64))" in flat
    decaying = mlp_task(true_rank=32, singular_values=np.geomspace(2, 0.1, 32), **small).describe()
    assert "(σ = 2 … 0.1 (32 values))" in decaying


def test_attention_task():
    t = attention_task(seed=0, n_train=8, n_val=4, n_old=4, T=5)
    assert isinstance(t.pretrained, MultiHeadAttention) and t.kind == "attention"
    assert t.x_train.shape == (8, 5, 64) and t.y_train.shape == (8, 5, 64)
    assert set(t.delta_true) == {"q_proj", "v_proj"}
    for name, D in t.delta_true.items():
        assert np.linalg.matrix_rank(D) == 4
        assert np.abs(D @ t.old_basis).max() < 1e-12, f"{name}: ΔW* must avoid task A's inputs"
    np.testing.assert_allclose(t.teacher(t.x_old), t.y_old, atol=1e-12)
    again = attention_task(seed=0, n_train=8, n_val=4, n_old=4, T=5)
    np.testing.assert_array_equal(t.y_train, again.y_train)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"true_rank": 33}, ValueError, "at most 32"),
    ({"true_rank": 0}, ValueError, "true_rank must be >= 1"),
    ({"true_rank": 2.0}, TypeError, "true_rank must be an int"),
    ({"d_old": 64}, ValueError, "d_old must be < d_in"),
    ({"shifted": ("fc3",)}, ValueError, "shifted must be"),
    ({"shifted": ()}, ValueError, "shifted must be"),
    ({"singular_values": [1.0, 2.0]}, ValueError, "4 numbers"),
    ({"singular_values": -1.0}, ValueError, "> 0"),
    ({"noise": -0.1}, ValueError, "noise"),
    ({"noise": "loud"}, TypeError, "noise"),
    ({"activation": "swish"}, ValueError, "activation"),
    ({"n_train": 0}, ValueError, "n_train"),
    ({"seed": -1}, ValueError, "seed"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mlp_task(**kwargs)


def test_attention_bad_arguments():
    with pytest.raises(ValueError, match="shifted must be"):
        attention_task(shifted=("fc1",))
    with pytest.raises(ValueError, match="d_old must be < d_model"):
        attention_task(d_old=64)
    with pytest.raises(ValueError, match="divisible"):
        attention_task(n_heads=5)


# --------------------------------------------------------------------------- fc1_singular_values


@pytest.mark.parametrize("d_hidden", [64, 80, 48])
def test_fc1_singular_values_sets_w0_spectrum_and_keeps_the_rest(d_hidden):
    p = min(d_hidden, 64)
    sigma0 = np.geomspace(3.0, 0.1, p)[::-1]                 # any order; sorted descending
    kw = dict(seed=2, d_hidden=d_hidden, n_train=8, n_val=8, n_old=8)
    t = mlp_task(fc1_singular_values=sigma0, **kw)
    base = mlp_task(**kw)
    W0 = t.pretrained.fc1.W
    np.testing.assert_allclose(np.linalg.svd(W0, compute_uv=False), np.sort(sigma0)[::-1], rtol=1e-12)
    # the other draws are untouched: same ΔW*, fc2, inputs, task A's subspace
    np.testing.assert_array_equal(t.delta_true["fc1"], base.delta_true["fc1"])
    np.testing.assert_array_equal(t.pretrained.fc2.W, base.pretrained.fc2.W)
    np.testing.assert_array_equal(t.x_train, base.x_train)
    np.testing.assert_array_equal(t.old_basis, base.old_basis)
    assert not np.allclose(W0, base.pretrained.fc1.W)
    # the design still holds: teacher B = A + ΔW*, identical on task A's inputs
    np.testing.assert_allclose(t.teacher.fc1.W, W0 + t.delta_true["fc1"], atol=1e-15)
    np.testing.assert_allclose(t.teacher(t.x_old), t.y_old, atol=1e-12)
    again = mlp_task(fc1_singular_values=sigma0, **kw)
    np.testing.assert_array_equal(W0, again.pretrained.fc1.W)
    assert t.config["fc1_singular_values"][0] == 3.0


@pytest.mark.parametrize("values, match", [
    ([1.0] * 63, "64 numbers"),
    ([[1.0] * 64], "64 numbers"),
    ([1.0] * 63 + [0.0], "> 0"),
    ([1.0] * 63 + [np.nan], "> 0"),
])
def test_fc1_singular_values_bad_input(values, match):
    with pytest.raises(ValueError, match=match):
        mlp_task(fc1_singular_values=values)

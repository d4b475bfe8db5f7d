"""Tests for lora_np.analysis: known answers from constructed matrices, statistics, bad input."""

import numpy as np
import pytest

from lora_np.analysis import (IntruderResult, amplification_factor, column_space_basis,
                              effective_rank, energy_rank, intruder_dimensions,
                              left_subspace_similarity, lora_subspace_similarity,
                              random_subspace_baseline, row_space_basis, singular_values,
                              subspace_similarity, subspace_similarity_grid)


def orthonormal(rng, d, k, dtype=np.float64):
    """(d, k) with orthonormal columns spanning a uniformly random k-dim subspace of R^d."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return Q.astype(dtype)


def with_spectrum(rng, s, d_out, d_in):
    """M = U diag(s) Vᵀ with known singular values s; returns (M, U, V)."""
    U, V = orthonormal(rng, d_out, len(s)), orthonormal(rng, d_in, len(s))
    return U @ np.diag(s) @ V.T, U, V


def hadamard(n):
    """Sylvester Hadamard matrix, n a power of 2; H/√n is orthogonal with entries ±1/√n."""
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.kron(H, np.array([[1.0, 1.0], [1.0, -1.0]]))
    return H


# ---------------------------------------------------------------------------------------------
# spectra and ranks
# ---------------------------------------------------------------------------------------------

def test_singular_values_known_answer_descending():
    rng = np.random.default_rng(0)
    s = np.array([5.0, 3.0, 2.0, 0.5])
    M, _, _ = with_spectrum(rng, s, 7, 6)
    got = singular_values(M)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, [5.0, 3.0, 2.0, 0.5, 0.0, 0.0], atol=1e-12)


def test_singular_values_keeps_float32():
    M = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    got = singular_values(M)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.linalg.svd(M.astype(np.float64), compute_uv=False),
                               rtol=1e-5)


@pytest.mark.parametrize("energy, k", [(0.5, 1), (9 / 14, 1), (0.9, 2), (13 / 14, 2),
                                       (0.95, 3), (1.0, 3)])
def test_energy_rank_known_answer(energy, k):
    # σ = 3, 2, 1: energies 9, 4, 1 of 14 -> cumulative 9/14, 13/14, 1
    assert energy_rank(np.array([3.0, 2.0, 1.0]), energy) == k


def test_energy_rank_matrix_equals_its_singular_values_and_any_order():
    M, _, _ = with_spectrum(np.random.default_rng(2), np.array([4.0, 2.0, 1.0, 0.1]), 8, 6)
    assert energy_rank(M, 0.9) == energy_rank(singular_values(M), 0.9) == 2
    assert energy_rank(np.array([1.0, 3.0, 2.0]), 0.9) == 2


def test_energy_rank_exact_zeros_and_zero_matrix():
    assert energy_rank(np.array([3.0, 2.0, 0.0, 0.0]), 1.0) == 2
    assert energy_rank(np.zeros((3, 4))) == 0


def test_effective_rank_known_answers():
    assert effective_rank(np.eye(5)) == pytest.approx(5.0)
    assert effective_rank(np.outer(np.arange(1.0, 4.0), np.ones(6))) == pytest.approx(1.0)
    assert effective_rank(np.array([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    # p = (3/4, 1/4): exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert effective_rank(np.array([3.0, 1.0])) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# bases
# ---------------------------------------------------------------------------------------------

def test_row_and_column_space_bases_recover_known_subspaces():
    rng = np.random.default_rng(3)
    M, U, V = with_spectrum(rng, np.array([4.0, 2.0, 1.0]), 9, 7)
    Vb, Ub = row_space_basis(M, 3), column_space_basis(M, 3)
    assert Vb.shape == (7, 3) and Ub.shape == (9, 3)
    # same vectors up to sign, in order of decreasing σ
    np.testing.assert_allclose(np.abs(V.T @ Vb), np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.abs(U.T @ Ub), np.eye(3), atol=1e-12)


def test_row_space_basis_of_lora_A_default_k_is_r():
    A = np.random.default_rng(4).standard_normal((4, 10))          # (r, d_in)
    V = row_space_basis(A)
    assert V.shape == (10, 4)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(A @ V @ V.T, A, atol=1e-12)        # rows lie in span(V)


# ---------------------------------------------------------------------------------------------
# subspace similarity φ (Hu et al. 2021 §7.2)
# ---------------------------------------------------------------------------------------------

def test_phi_identical_is_one_orthogonal_is_zero():
    Q = orthonormal(np.random.default_rng(5), 12, 6)
    assert subspace_similarity(Q[:, :3], Q[:, :3]) == pytest.approx(1.0)
    assert subspace_similarity(Q[:, :3], Q[:, 3:]) == pytest.approx(0.0, abs=1e-15)
    # the smaller inside the larger also gives 1
    assert subspace_similarity(Q[:, :2], Q[:, :5]) == pytest.approx(1.0)


@pytest.mark.parametrize("theta", [0.0, 0.3, np.pi / 4, 1.2, np.pi / 2])
def test_phi_is_squared_cosine_of_the_angle(theta):
    e = np.eye(5)
    u1 = e[:, :1]
    u2 = (np.cos(theta) * e[:, 0] + np.sin(theta) * e[:, 1])[:, None]
    assert subspace_similarity(u1, u2) == pytest.approx(np.cos(theta) ** 2, abs=1e-15)


def test_phi_known_partial_overlap():
    e = np.eye(6)
    # span{e1, e2} vs span{e1, e3}: one shared direction of two -> 1/2
    assert subspace_similarity(e[:, [0, 1]], e[:, [0, 2]]) == pytest.approx(0.5)


def test_phi_invariant_to_rotation_within_subspace():
    rng = np.random.default_rng(6)
    U1, U2 = orthonormal(rng, 20, 4), orthonormal(rng, 20, 5)
    R1, R2 = orthonormal(rng, 4, 4), orthonormal(rng, 5, 5)
    assert subspace_similarity(U1 @ R1, U2 @ R2) == pytest.approx(subspace_similarity(U1, U2),
                                                                   rel=1e-12)


def test_phi_uses_first_i_and_j_columns_and_is_symmetric():
    rng = np.random.default_rng(7)
    U1, U2 = orthonormal(rng, 15, 5), orthonormal(rng, 15, 4)
    manual = np.linalg.norm(U1[:, :3].T @ U2[:, :2]) ** 2 / 2
    assert subspace_similarity(U1, U2, 3, 2) == pytest.approx(manual)
    assert subspace_similarity(U2, U1, 2, 3) == pytest.approx(manual)


def test_grid_matches_pointwise_phi():
    rng = np.random.default_rng(8)
    U1, U2 = orthonormal(rng, 16, 5), orthonormal(rng, 16, 3)
    grid = subspace_similarity_grid(U1, U2)
    assert grid.shape == (5, 3)
    expected = [[subspace_similarity(U1, U2, i, j) for j in range(1, 4)] for i in range(1, 6)]
    np.testing.assert_allclose(grid, expected, rtol=1e-12)
    assert np.all((grid >= 0) & (grid <= 1 + 1e-12))


def test_random_subspace_baseline_formula():
    assert random_subspace_baseline(4, 8, 64) == 8 / 64
    assert random_subspace_baseline(8, 4, 64) == 8 / 64
    assert random_subspace_baseline(3, 3, 3) == 1.0


def test_random_pairs_match_the_baseline_statistically():
    # 400 independent pairs of random subspaces (dims 4 and 8 in R^64). E[φ] = max(i,j)/d
    # = 0.125 exactly (see random_subspace_baseline). The mean of 400 draws is within
    # 4 standard errors of E[φ] with probability > 0.9999 (CLT; φ is bounded, so the
    # normal approximation is good at n = 400). The standard error is ≈ 0.0014 here
    # (φ's own sd ≈ 0.028: Var‖U1ᵀU2‖²_F = 2ij(d-i)(d-j) / (d²(d-1)(d+2))), so the test
    # would fail for a baseline off by more than ≈ 5%, e.g. the wrong min(i, j)/d = 0.0625.
    rng = np.random.default_rng(9)
    i, j, d, n = 4, 8, 64, 400
    phis = np.array([subspace_similarity(orthonormal(rng, d, i), orthonormal(rng, d, j))
                     for _ in range(n)])
    se = phis.std(ddof=1) / np.sqrt(n)
    expected = random_subspace_baseline(i, j, d)
    assert abs(phis.mean() - expected) < 4 * se
    assert abs(phis.mean() - min(i, j) / d) > 4 * se                # the test can fail
    analytic_sd = np.sqrt(2 * i * j * (d - i) * (d - j) / (d**2 * (d - 1) * (d + 2))) / min(i, j)
    assert phis.std(ddof=1) == pytest.approx(analytic_sd, rel=0.15)


def test_random_subspace_baseline_with_a_shared_subspace_formula():
    # (c + (i-c)(j-c)/(d-c)) / min(i, j): r = 8 vs r = 64 runs sharing ΔW*'s 4 directions
    assert random_subspace_baseline(8, 8, 64, shared=4) == pytest.approx((4 + 4 * 4 / 60) / 8)
    assert random_subspace_baseline(8, 8, 64, shared=4) == pytest.approx(0.5333, abs=1e-4)
    assert random_subspace_baseline(5, 7, 64, shared=4) == pytest.approx((4 + 1 * 3 / 60) / 5)
    assert random_subspace_baseline(4, 9, 64, shared=4) == 1.0       # S lies in the other
    assert random_subspace_baseline(6, 6, 6, shared=6) == 1.0
    assert random_subspace_baseline(4, 8, 64, shared=0) == random_subspace_baseline(4, 8, 64)


def test_random_pairs_sharing_a_subspace_match_the_baseline_statistically():
    # both subspaces = a fixed 4-dim S plus 4 independent random directions orthogonal to S
    # (in R^64), in a random order inside the basis (φ of the whole subspaces does not depend
    # on it). 300 pairs: the mean is within 4 standard errors of (4 + 16/60)/8 = 0.5333 and
    # clearly away from the wrong (4 + 4·8/64)/8 = 0.5625.
    rng = np.random.default_rng(21)
    d, c, extra, n = 64, 4, 4, 300
    S = orthonormal(rng, d, c)
    def with_S():
        R = rng.standard_normal((d, extra))
        R -= S @ (S.T @ R)                                  # in the complement of S
        Q, _ = np.linalg.qr(np.concatenate([S, R], axis=1))
        return Q[:, rng.permutation(c + extra)]
    phis = np.array([subspace_similarity(with_S(), with_S()) for _ in range(n)])
    se = phis.std(ddof=1) / np.sqrt(n)
    expected = random_subspace_baseline(c + extra, c + extra, d, shared=c)
    assert abs(phis.mean() - expected) < 4 * se
    assert abs(phis.mean() - (4 + 4 * 8 / 64) / 8) > 4 * se           # the test can fail


def test_lora_subspace_similarity_row_space_invariance():
    rng = np.random.default_rng(10)
    A1 = rng.standard_normal((4, 12))                               # (r, d_in)
    R = rng.standard_normal((4, 4)) + 4 * np.eye(4)                 # invertible mix of rows
    assert lora_subspace_similarity(A1, R @ A1) == pytest.approx(1.0)
    # a rank-8 A that contains A1's rows: A1's 4 directions are inside -> φ(4, 8) = 1
    A2 = np.vstack([A1, rng.standard_normal((4, 12))])
    assert lora_subspace_similarity(A1, A2, 4, 8) == pytest.approx(1.0)


def test_lora_subspace_similarity_orthogonal_rows_is_zero():
    Q = orthonormal(np.random.default_rng(11), 10, 6)
    A1, A2 = Q[:, :3].T * 2.0, Q[:, 3:].T * 0.5
    assert lora_subspace_similarity(A1, A2) == pytest.approx(0.0, abs=1e-15)


def test_left_subspace_similarity_ignores_right_side_and_scale():
    rng = np.random.default_rng(12)
    U = orthonormal(rng, 10, 2)
    M1 = U @ np.diag([3.0, 1.0]) @ orthonormal(rng, 7, 2).T
    M2 = U @ np.diag([0.2, 0.1]) @ orthonormal(rng, 9, 2).T        # other d_in, same columns
    assert left_subspace_similarity(M1, M2, 2) == pytest.approx(1.0)
    M3 = np.eye(10)[:, [0]] @ np.ones((1, 7))
    M4 = np.eye(10)[:, [1]] @ np.ones((1, 7))
    assert left_subspace_similarity(M3, M4, 1) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# amplification factor (Hu et al. 2021 §7.3)
# ---------------------------------------------------------------------------------------------

def test_amplification_factor_known_answer():
    # W = U diag(w) Vᵀ; ΔW lives on W's two weakest directions, so U_rᵀ W V_r = diag(w[-2:])
    # (up to signs) and amp = ‖s‖ / ‖w[-2:]‖ exactly.
    rng = np.random.default_rng(13)
    d_out, d_in = 8, 6
    U, V = orthonormal(rng, d_out, 6), orthonormal(rng, d_in, 6)
    w = np.array([10.0, 8.0, 6.0, 4.0, 0.3, 0.1])
    W = U @ np.diag(w) @ V.T
    s = np.array([2.0, 1.0])
    dW = U[:, 4:] @ np.diag(s) @ V[:, 4:].T
    expected = np.linalg.norm(s) / np.linalg.norm(w[4:])           # √5 / √0.1 ≈ 7.07
    assert amplification_factor(dW, W, 2) == pytest.approx(expected, rel=1e-10)
    # on W's strongest directions the factor is small
    dW_top = U[:, :2] @ np.diag(s) @ V[:, :2].T
    assert amplification_factor(dW_top, W, 2) == pytest.approx(np.sqrt(5) / np.sqrt(164))


def test_amplification_factor_float32():
    rng = np.random.default_rng(14)
    W = rng.standard_normal((6, 5)).astype(np.float32)
    dW = (rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))).astype(np.float32)
    got = amplification_factor(dW, W, 2)
    assert got == pytest.approx(amplification_factor(dW.astype(np.float64),
                                                     W.astype(np.float64), 2), rel=1e-4)


def test_amplification_factor_undefined_when_projection_is_zero():
    e = np.eye(4)
    W = e[:, [0]] @ e[[0], :]                                      # only direction 1
    dW = e[:, [1]] @ e[[1], :]                                     # only direction 2
    with pytest.raises(ValueError, match="undefined"):
        amplification_factor(dW, W, 1)


# ---------------------------------------------------------------------------------------------
# intruder dimensions (Shuttleworth et al. 2024)
# ---------------------------------------------------------------------------------------------

def test_intruder_dimensions_known_answer():
    # W_tuned's top 8 left singular vectors are Hadamard mixes of W0's first 8: each has
    # |cos| = 1/√8 ≈ 0.354 with 8 of W0's vectors and 0 with the rest -> intruders at eps=0.5.
    rng = np.random.default_rng(15)
    d = 16
    U, V = orthonormal(rng, d, d), orthonormal(rng, d, d)
    W0 = U @ np.diag(np.linspace(16.0, 1.0, d)) @ V.T
    Q = U.copy()
    Q[:, :8] = U[:, :8] @ hadamard(8) / np.sqrt(8)
    W_tuned = Q @ np.diag(np.linspace(32.0, 1.0, d)) @ V.T
    res = intruder_dimensions(W0, W_tuned, k=10, eps=0.5)
    assert isinstance(res, IntruderResult)
    assert res.max_cosines.shape == (10,)
    np.testing.assert_allclose(res.max_cosines[:8], 1 / np.sqrt(8), atol=1e-10)
    np.testing.assert_allclose(res.max_cosines[8:], 1.0, atol=1e-10)
    assert res.n_intruders == 8
    np.testing.assert_array_equal(res.indices, np.arange(8))
    # a stricter threshold below 1/√8 finds none
    assert intruder_dimensions(W0, W_tuned, k=10, eps=0.3).n_intruders == 0


def test_no_intruders_when_unchanged():
    W0 = np.diag(np.arange(6.0, 0.0, -1.0))
    res = intruder_dimensions(W0, W0.copy(), k=6)
    np.testing.assert_allclose(res.max_cosines, 1.0)
    assert res.n_intruders == 0 and res.indices.size == 0
    # the test is strict (< eps): a cosine of exactly 1 is not an intruder even at eps = 1
    assert intruder_dimensions(W0, W0.copy(), k=6, eps=1.0).n_intruders == 0


def test_intruders_absolute_cosine_is_a_choice_sign_flips_fool_the_raw_one():
    # W_tuned has exactly W0's left singular vectors and values (only its right ones differ):
    # no direction is new, but the SVD returns some of them with the opposite sign.
    rng = np.random.default_rng(22)
    d = 8
    U, V = orthonormal(rng, d, d), orthonormal(rng, d, d)
    sigma = np.linspace(8.0, 1.0, d)
    W0 = U @ np.diag(sigma) @ V.T
    W_tuned = U @ np.diag(sigma) @ orthonormal(rng, d, d).T     # same left directions as W0
    res_abs = intruder_dimensions(W0, W_tuned, k=d, eps=0.5)
    assert res_abs.n_intruders == 0
    np.testing.assert_allclose(res_abs.max_cosines, 1.0, atol=1e-6)
    # the raw cosine: a vector the SVD returns with the opposite sign to W0's has cos = -1
    U0 = column_space_basis(W0)
    Ut = column_space_basis(W_tuned, d)
    signs = np.sign(np.sum(U0 * Ut, axis=0))                # +1 or -1 per direction
    assert np.any(signs < 0) and np.any(signs > 0)          # LAPACK picked some flipped
    res_raw = intruder_dimensions(W0, W_tuned, k=d, eps=0.5, absolute=False)
    assert res_raw.n_intruders == int(np.sum(signs < 0))
    np.testing.assert_allclose(res_raw.max_cosines[signs > 0], 1.0, atol=1e-6)
    assert np.all(res_raw.max_cosines[signs < 0] < 0.5)
    with pytest.raises(TypeError, match="absolute must be a bool"):
        intruder_dimensions(W0, W_tuned, k=d, absolute="yes")


# ---------------------------------------------------------------------------------------------
# dtype and purity
# ---------------------------------------------------------------------------------------------

def test_float32_end_to_end_and_inputs_unchanged():
    rng = np.random.default_rng(16)
    W = rng.standard_normal((10, 8)).astype(np.float32)
    dW = (rng.standard_normal((10, 2)) @ rng.standard_normal((2, 8))).astype(np.float32)
    A1 = rng.standard_normal((2, 8)).astype(np.float32)
    A2 = rng.standard_normal((4, 8)).astype(np.float32)
    copies = [x.copy() for x in (W, dW, A1, A2)]
    assert row_space_basis(A1).dtype == np.float32
    assert column_space_basis(W, 3).dtype == np.float32
    U1, U2 = column_space_basis(W, 3), column_space_basis(dW, 2)
    assert 0.0 <= subspace_similarity(U1, U2) <= 1.0
    assert subspace_similarity_grid(U1, U2).shape == (3, 2)
    assert 0.0 <= lora_subspace_similarity(A1, A2, 2, 4) <= 1.0 + 1e-6
    assert 0.0 <= left_subspace_similarity(W, W + dW, 2) <= 1.0 + 1e-6
    assert energy_rank(W) >= 1 and effective_rank(W) > 1.0
    amplification_factor(dW, W, 2)
    intruder_dimensions(W, W + dW, k=3)
    for before, after in zip(copies, (W, dW, A1, A2)):
        np.testing.assert_array_equal(before, after)


def test_integer_input_promoted_to_float64():
    assert singular_values(np.eye(3, dtype=int)).dtype == np.float64


# ---------------------------------------------------------------------------------------------
# bad input: one case per line
# ---------------------------------------------------------------------------------------------

Q = np.linalg.qr(np.random.default_rng(17).standard_normal((6, 3)))[0]


@pytest.mark.parametrize("call, exc, match", [
    (lambda: singular_values(np.ones(3)), ValueError, "2-D"),
    (lambda: singular_values(np.zeros((0, 3))), ValueError, "non-empty"),
    (lambda: singular_values(np.array([[1.0, np.nan]])), ValueError, "finite"),
    (lambda: singular_values(np.ones((2, 2), dtype=complex)), TypeError, "real"),
    (lambda: singular_values(np.array([["a"]])), TypeError, "float"),
    (lambda: energy_rank(np.eye(3), 0.0), ValueError, r"\(0, 1\]"),
    (lambda: energy_rank(np.eye(3), 1.5), ValueError, r"\(0, 1\]"),
    (lambda: energy_rank(np.eye(3), "0.9"), TypeError, "energy"),
    (lambda: energy_rank(np.array([1.0, -1.0])), ValueError, ">= 0"),
    (lambda: energy_rank(np.ones((2, 2, 2))), ValueError, "2-D matrix or a non-empty 1-D"),
    (lambda: effective_rank(np.zeros((2, 2))), ValueError, "zero matrix"),
    (lambda: row_space_basis(np.eye(3), 4), ValueError, r"\[1, 3\]"),
    (lambda: column_space_basis(np.eye(3), 0), ValueError, r"\[1, 3\]"),
    (lambda: column_space_basis(np.eye(3), 1.0), TypeError, "k must be an int"),
    (lambda: subspace_similarity(Q * 2, Q), ValueError, "orthonormal"),
    (lambda: subspace_similarity(Q.T, Q.T), ValueError, "r <= d"),
    (lambda: subspace_similarity(Q, np.eye(5)[:, :2]), ValueError, "same space"),
    (lambda: subspace_similarity(Q, Q, 4, 1), ValueError, r"i must be in \[1, 3\]"),
    (lambda: subspace_similarity(Q, Q, 1, 0), ValueError, r"j must be in \[1, 3\]"),
    (lambda: subspace_similarity_grid(Q, np.eye(5)[:, :2]), ValueError, "same space"),
    (lambda: lora_subspace_similarity(np.ones((2, 5)), np.ones((2, 6))), ValueError, "d_in"),
    (lambda: random_subspace_baseline(5, 2, 4), ValueError, r"i must be in \[1, 4\]"),
    (lambda: random_subspace_baseline(1, 2, 0), ValueError, "d must be"),
    (lambda: random_subspace_baseline(4, 8, 64, shared=5), ValueError, r"shared must be in \[0, 4\]"),
    (lambda: random_subspace_baseline(4, 8, 64, shared=1.0), TypeError, "shared must be an int"),
    (lambda: left_subspace_similarity(np.eye(3), np.eye(4), 1), ValueError, "d_out"),
    (lambda: left_subspace_similarity(np.eye(3), np.eye(3), 4), ValueError, "k must be"),
    (lambda: amplification_factor(np.eye(3), np.eye(4), 1), ValueError, "same shape"),
    (lambda: amplification_factor(np.eye(3), np.eye(3), 4), ValueError, "r must be"),
    (lambda: intruder_dimensions(np.eye(3), np.eye(4)), ValueError, "same shape"),
    (lambda: intruder_dimensions(np.eye(4), np.eye(4), k=5), ValueError, "k must be"),
    (lambda: intruder_dimensions(np.eye(4), np.eye(4), k=2, eps=0.0), ValueError, "eps"),
    (lambda: intruder_dimensions(np.eye(4), np.eye(4), k=2, eps=None), TypeError, "eps"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

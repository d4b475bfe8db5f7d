"""Looking inside weight updates: spectra, ranks, subspace similarity, amplification, intruders.

A leaf module (NumPy only). Every function accepts float32 or float64 arrays (integer arrays
are promoted to float64), never modifies its inputs, and returns results in the input's
floating dtype or as Python scalars.

Notation (lora_np/README.md): ``W`` is (d_out, d_in); ``A`` is (r, d_in); ``B`` is (d_out, r);
``ΔW = scale · B @ A`` is (d_out, d_in). The SVD is ``M = U diag(σ) Vᵀ`` with
σ₁ ≥ σ₂ ≥ … ≥ 0; the *left* singular vectors (columns of U) span M's column space, the
*right* singular vectors (columns of V) its row space.

References
----------
* Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685,
  §7.2 (subspace similarity φ) and §7.3 (amplification factor, Table 7).
* Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality", EUSIPCO.
* Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
  arXiv:2410.21228 (intruder dimensions).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from .validate import check_float_array, check_int

__all__ = [
    "singular_values", "tail_energy", "energy_rank", "effective_rank",
    "row_space_basis", "column_space_basis",
    "subspace_similarity", "lora_subspace_similarity", "subspace_similarity_grid",
    "random_subspace_baseline", "left_subspace_similarity",
    "amplification_factor", "IntruderResult", "intruder_dimensions",
]


# ---------------------------------------------------------------------------------------------
# input checks (shared)
# ---------------------------------------------------------------------------------------------

def _as_matrix(M, name: str) -> np.ndarray:
    return check_float_array(name, M, ndim=2)


def _check_k(k, name: str, upper: int) -> int:
    return check_int(name, k, 1, upper)


def _spectrum(M_or_s, name: str) -> np.ndarray:
    """Singular values, descending: from a matrix, or a checked 1-D array of them."""
    arr = check_float_array(name, M_or_s)
    if arr.ndim == 2:
        return singular_values(arr)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a 2-D matrix or a non-empty 1-D array of singular "
                         f"values, got shape {arr.shape}")
    if np.any(arr < 0):
        raise ValueError(f"{name}: singular values must be >= 0, got min {arr.min()}")
    return np.sort(arr)[::-1]


def _check_orthonormal(U, name: str) -> np.ndarray:
    U = _as_matrix(U, name)
    d, r = U.shape
    if r > d:
        raise ValueError(f"{name} must have orthonormal columns, so shape (d, r) with r <= d; "
                         f"got {U.shape}")
    err = np.abs(U.T @ U - np.eye(r, dtype=U.dtype)).max()
    tol = np.sqrt(np.finfo(U.dtype).eps)       # 1.5e-8 (float64), 3.5e-4 (float32)
    if err > tol:
        raise ValueError(f"{name} must have orthonormal columns: max |{name}ᵀ{name} - I| = "
                         f"{err:.2e} > {tol:.1e}")
    return U


# ---------------------------------------------------------------------------------------------
# spectra and ranks
# ---------------------------------------------------------------------------------------------

def singular_values(M) -> np.ndarray:
    """Singular values σ₁ ≥ … ≥ σ_p ≥ 0 of a matrix, p = min(d_out, d_in).

    .. math:: M = U \\operatorname{diag}(\\sigma) V^\\top

    Parameters
    ----------
    M : array, shape (d_out, d_in)
        Finite, real.

    Returns
    -------
    sv : ndarray, shape (min(d_out, d_in),), same float dtype as M
    """
    M = _as_matrix(M, "M")
    return np.linalg.svd(M, compute_uv=False)


def tail_energy(M_or_singular_values, relative: bool = False) -> np.ndarray:
    """Eckart–Young: what the best rank-r approximation of M leaves behind, for every r.

    .. math:: \\min_{\\operatorname{rank} D \\le r} \\|M - D\\|_F^2 = \\sum_{i > r} \\sigma_i^2

    (the minimum is reached by the truncated SVD ``M_r = U_r diag(σ_:r) V_rᵀ``).

    Parameters
    ----------
    M_or_singular_values : array, shape (d_out, d_in) or (p,)
        A matrix, or its singular values (any order; they are sorted descending).
    relative : bool
        False: ``Σ_{i>r} σ_i²``. True: divided by ``‖M‖²_F = Σ_i σ_i²`` (the fraction of the
        energy left; 1 at r = 0), which needs a non-zero M.

    Returns
    -------
    tail : ndarray (float64), shape (p + 1,)
        ``tail[r]`` for r = 0, 1, …, p; ``tail[0] = ‖M‖²_F`` (or 1), ``tail[p] = 0``.
        ``np.sqrt(tail)`` is the Frobenius error ‖M − M_r‖_F itself.
    """
    sv = _spectrum(M_or_singular_values, "M_or_singular_values").astype(np.float64)
    # tail[r] = Σ_{i>r} σ_i², summed from the smallest σ up so that small tails keep their digits
    tail = np.concatenate([np.cumsum((sv**2)[::-1])[::-1], [0.0]])
    if relative:
        if tail[0] == 0.0:
            raise ValueError("tail_energy(relative=True) is undefined for the zero matrix (all σ = 0)")
        tail = tail / tail[0]
    return tail


def energy_rank(M_or_singular_values, energy: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold a fraction ``energy`` of ‖M‖²_F.

    .. math:: k^* = \\min\\Big\\{k : \\sum_{i \\le k} \\sigma_i^2
                      \\ge \\text{energy} \\cdot \\sum_i \\sigma_i^2\\Big\\}

    (``‖M‖²_F = Σ σ_i²``; by Eckart–Young, the best rank-k approximation leaves
    ``Σ_{i>k} σ_i²`` behind.) With ``energy = 1`` every non-zero σ counts, including the
    ~1e-16·σ₁ round-off an SVD leaves on a rank-deficient matrix; use e.g. 0.99 for a rank
    that ignores noise. The zero matrix has energy rank 0.

    Parameters
    ----------
    M_or_singular_values : array, shape (d_out, d_in) or (p,)
        A matrix, or its singular values (any order; they are sorted descending).
    energy : float in (0, 1]

    Returns
    -------
    int
    """
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
        raise TypeError(f"energy must be a float in (0, 1], got {type(energy).__name__}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sv = _spectrum(M_or_singular_values, "M_or_singular_values").astype(np.float64)
    cumulative = np.cumsum(sv**2)
    if cumulative[-1] == 0.0:
        return 0
    # dividing by cumulative[-1] (not a separate sum) makes the last fraction exactly 1.0
    fraction = cumulative / cumulative[-1]
    return int(np.argmax(fraction >= energy)) + 1


def effective_rank(M_or_singular_values) -> float:
    """Entropy-based effective rank of Roy & Vetterli (2007).

    .. math:: p_i = \\frac{\\sigma_i}{\\sum_j \\sigma_j}, \\quad
              H = -\\sum_i p_i \\log p_i \\ (0 \\log 0 = 0), \\quad
              \\operatorname{erank}(M) = e^{H}

    A real number in [1, rank(M)]: exactly r for r equal non-zero singular values, close to 1
    when one direction dominates. Note the σ (not σ²) normalisation, as in the paper.

    Parameters
    ----------
    M_or_singular_values : array, shape (d_out, d_in) or (p,)
        Must not be all zeros (the entropy is undefined).

    Returns
    -------
    float
    """
    sv = _spectrum(M_or_singular_values, "M_or_singular_values").astype(np.float64)
    total = sv.sum()
    if total == 0.0:
        raise ValueError("effective_rank is undefined for the zero matrix (all σ = 0)")
    p = sv[sv > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


# ---------------------------------------------------------------------------------------------
# orthonormal bases
# ---------------------------------------------------------------------------------------------

def row_space_basis(A, k: int | None = None) -> np.ndarray:
    """Orthonormal basis of the top-k right-singular directions of A (its row space).

    .. math:: A = U \\operatorname{diag}(\\sigma) V^\\top, \\qquad \\text{basis} = V_{:, :k}

    For a LoRA factor A of shape (r, d_in) the rows span an r-dimensional subspace of the
    input space R^{d_in}; this is the ``U_A`` of Hu et al. 2021 §7.2 (their "right-singular
    unitary matrix" of A). If A has rank < k the trailing columns are still orthonormal but
    their directions are arbitrary.

    Parameters
    ----------
    A : array, shape (r, d_in)
    k : int, optional
        Number of directions, 1 <= k <= min(r, d_in); default min(r, d_in).

    Returns
    -------
    V_k : ndarray, shape (d_in, k), orthonormal columns, ordered by decreasing σ
    """
    A = _as_matrix(A, "A")
    p = min(A.shape)
    k = p if k is None else _check_k(k, "k", p)
    _, _, Vt = np.linalg.svd(A, full_matrices=False)   # Vt: (p, d_in)
    return np.ascontiguousarray(Vt[:k].T)               # (d_in, k)


def column_space_basis(M, k: int | None = None) -> np.ndarray:
    """Orthonormal basis of the top-k left-singular directions of M (its column space).

    .. math:: M = U \\operatorname{diag}(\\sigma) V^\\top, \\qquad \\text{basis} = U_{:, :k}

    Parameters
    ----------
    M : array, shape (d_out, d_in)
    k : int, optional
        1 <= k <= min(d_out, d_in); default min(d_out, d_in).

    Returns
    -------
    U_k : ndarray, shape (d_out, k), orthonormal columns, ordered by decreasing σ
    """
    M = _as_matrix(M, "M")
    p = min(M.shape)
    k = p if k is None else _check_k(k, "k", p)
    U, _, _ = np.linalg.svd(M, full_matrices=False)    # U: (d_out, p)
    return np.ascontiguousarray(U[:, :k])


# ---------------------------------------------------------------------------------------------
# subspace similarity (Hu et al. 2021, §7.2)
# ---------------------------------------------------------------------------------------------

def subspace_similarity(U1, U2, i: int | None = None, j: int | None = None) -> float:
    """Normalised overlap φ of the spans of the first i columns of U1 and first j of U2.

    .. math:: \\phi(U_1, U_2, i, j) = \\frac{\\lVert U_{1,:, :i}^\\top U_{2,:, :j}
              \\rVert_F^2}{\\min(i, j)} \\in [0, 1]

    Hu et al. 2021 §7.2, eq. (4). ``‖U1ᵢᵀ U2ⱼ‖²_F`` is the sum of squared cosines of the
    principal angles between the two subspaces, so φ = 1 when the smaller subspace lies in
    the larger, 0 when they are orthogonal, and it does not change if either basis is rotated
    within its span. Two random subspaces of R^d give φ ≈ ``random_subspace_baseline``.

    Parameters
    ----------
    U1 : array, shape (d, r1), orthonormal columns
    U2 : array, shape (d, r2), orthonormal columns
    i : int, optional
        1 <= i <= r1; default r1.
    j : int, optional
        1 <= j <= r2; default r2.

    Returns
    -------
    float
    """
    U1 = _check_orthonormal(U1, "U1")
    U2 = _check_orthonormal(U2, "U2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"U1 and U2 must live in the same space (same number of rows), got "
                         f"shapes {U1.shape} and {U2.shape}")
    i = U1.shape[1] if i is None else _check_k(i, "i", U1.shape[1])
    j = U2.shape[1] if j is None else _check_k(j, "j", U2.shape[1])
    overlap = U1[:, :i].T @ U2[:, :j]                   # (i, j) cosines
    return float(np.sum(overlap.astype(np.float64) ** 2) / min(i, j))


def lora_subspace_similarity(A1, A2, i: int | None = None, j: int | None = None) -> float:
    """φ between the top-i row-space directions of A1 and the top-j of A2 (Hu et al. §7.2).

    .. math:: \\phi(A_1, A_2, i, j) = \\frac{\\lVert V_{A_1, :i}^\\top V_{A_2, :j}
              \\rVert_F^2}{\\min(i, j)}

    with ``V_A = row_space_basis(A)``. The paper compares A from runs with r = 8 and r = 64
    and finds that the top direction is shared (φ > 0.5) while most others are not.

    Parameters
    ----------
    A1 : array, shape (r1, d_in)
    A2 : array, shape (r2, d_in)
    i, j : int, optional
        Default: all min(r, d_in) directions of each.

    Returns
    -------
    float
    """
    A1, A2 = _as_matrix(A1, "A1"), _as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 must have the same d_in (number of columns), got shapes "
                         f"{A1.shape} and {A2.shape}")
    return subspace_similarity(row_space_basis(A1), row_space_basis(A2), i, j)


def subspace_similarity_grid(U1, U2) -> np.ndarray:
    """φ for every (i, j): ``grid[i-1, j-1] = subspace_similarity(U1, U2, i, j)``.

    With ``C = U1ᵀ U2`` (shape (r1, r2)), ``‖U1ᵢᵀ U2ⱼ‖²_F`` is the (i, j) 2-D prefix sum
    of ``C²``, so the whole grid costs one matrix product (the heat maps of Hu et al.
    Fig. 3).

    Parameters
    ----------
    U1 : array, shape (d, r1), orthonormal columns
    U2 : array, shape (d, r2), orthonormal columns

    Returns
    -------
    grid : ndarray, shape (r1, r2), float64, values in [0, 1]
    """
    U1 = _check_orthonormal(U1, "U1")
    U2 = _check_orthonormal(U2, "U2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"U1 and U2 must live in the same space (same number of rows), got "
                         f"shapes {U1.shape} and {U2.shape}")
    C2 = (U1.T @ U2).astype(np.float64) ** 2            # (r1, r2)
    prefix = C2.cumsum(axis=0).cumsum(axis=1)           # prefix[i-1, j-1] = ‖U1ᵢᵀU2ⱼ‖²_F
    i = np.arange(1, C2.shape[0] + 1)[:, None]
    j = np.arange(1, C2.shape[1] + 1)[None, :]
    return prefix / np.minimum(i, j)


def random_subspace_baseline(i: int, j: int, d: int, shared: int = 0) -> float:
    """Expected φ between random subspaces of dims i and j in R^d that share ``shared`` dims.

    With ``shared = 0`` the two subspaces are independent and uniformly random:

    .. math:: \\mathbb{E}\\,\\lVert U_1^\\top U_2 \\rVert_F^2
              = \\operatorname{tr}(P_1\\, \\mathbb{E} P_2) = \\operatorname{tr}(P_1)\\,\\frac{j}{d}
              = \\frac{ij}{d}
              \\quad\\Rightarrow\\quad
              \\mathbb{E}\\,\\phi = \\frac{ij/d}{\\min(i, j)} = \\frac{\\max(i, j)}{d}

    (``P = U Uᵀ`` is the projector; a uniformly random rank-j projector averages to
    ``(j/d) I`` by symmetry). A measured φ well above this means the subspaces share
    directions beyond chance.

    With ``shared = c > 0`` both subspaces contain one common c-dimensional subspace S (the
    first c directions of each span S, e.g. the row space of a rank-c ΔW* that two LoRA runs
    both learned) and their other ``i − c`` and ``j − c`` directions are independent and
    uniformly random in the (d − c)-dimensional orthogonal complement of S. S contributes
    ``c`` to ``‖U1ᵀU2‖²_F`` and the rest the formula above in d − c dimensions:

    .. math:: \\mathbb{E}\\,\\phi = \\frac{c + (i - c)(j - c)/(d - c)}{\\min(i, j)}

    e.g. r = 8 and r = 64 runs that share a 4-dimensional subspace of R^64, at i = j = 8:
    (4 + 4·4/60)/8 ≈ 0.533 (not (4 + 4·8/64)/8 = 0.5625: the 4 extra directions of each are
    drawn in the 60 dimensions S leaves, and there are 4, not 8, of them on each side).

    Parameters
    ----------
    i, j : int
        Subspace dimensions, 1 <= i, j <= d (and >= shared).
    d : int
        Ambient dimension, >= 1.
    shared : int
        Dimensions the two subspaces have in common, 0 <= shared <= min(i, j), and < d when
        either subspace has directions beyond it.

    Returns
    -------
    float
    """
    d = check_int("d", d, 1)
    i = _check_k(i, "i", d)
    j = _check_k(j, "j", d)
    c = check_int("shared", shared, 0, min(i, j))
    if c == 0:
        return max(i, j) / d
    if max(i, j) == c:                      # one subspace is S itself: it lies in the other
        return 1.0
    return (c + (i - c) * (j - c) / (d - c)) / min(i, j)


def left_subspace_similarity(M1, M2, k: int) -> float:
    """φ between the top-k left singular subspaces (column spaces) of two matrices.

    .. math:: \\phi = \\frac{\\lVert U_{M_1, :k}^\\top U_{M_2, :k} \\rVert_F^2}{k}

    Used to ask whether a learned ΔW points in the same output directions as the true ΔW*
    of a synthetic task.

    Parameters
    ----------
    M1, M2 : array, shape (d_out, d_in1) and (d_out, d_in2)
        Same number of rows.
    k : int
        1 <= k <= min of both matrices' smaller dimensions.

    Returns
    -------
    float
    """
    M1, M2 = _as_matrix(M1, "M1"), _as_matrix(M2, "M2")
    if M1.shape[0] != M2.shape[0]:
        raise ValueError(f"M1 and M2 must have the same d_out (number of rows), got shapes "
                         f"{M1.shape} and {M2.shape}")
    k = _check_k(k, "k", min(min(M1.shape), min(M2.shape)))
    return subspace_similarity(column_space_basis(M1, k), column_space_basis(M2, k))


# ---------------------------------------------------------------------------------------------
# amplification factor (Hu et al. 2021, §7.3)
# ---------------------------------------------------------------------------------------------

def amplification_factor(delta_W, W, r: int) -> float:
    """How strongly ΔW amplifies directions that W already has but does not emphasise.

    .. math:: \\text{amp} = \\frac{\\lVert \\Delta W \\rVert_F}
                                 {\\lVert U_r^\\top W V_r \\rVert_F}

    where ``U_r`` (d_out, r) and ``V_r`` (d_in, r) are the top-r left and right singular
    vectors of ΔW, so ``U_rᵀ W V_r`` (r, r) is W projected onto ΔW's r-dimensional subspace.
    Hu et al. 2021 §7.3 / Table 7 report, for W_q of layer 48 of GPT-3 175B with r = 4,
    ``‖ΔW_q‖_F ≈ 6.91`` against a projection norm ``≈ 0.32``, i.e. a factor ≈ 21.5 (their
    numbers; we have not computed them — we have no GPT-3 weights). A large factor says ΔW
    boosts directions that were weak in W rather than repeating W's top directions.

    Parameters
    ----------
    delta_W : array, shape (d_out, d_in)
    W : array, shape (d_out, d_in)
    r : int
        1 <= r <= min(d_out, d_in); usually the LoRA rank.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If W has no component in ΔW's top-r subspace (the factor would be infinite).
    """
    delta_W, W = _as_matrix(delta_W, "delta_W"), _as_matrix(W, "W")
    if delta_W.shape != W.shape:
        raise ValueError(f"delta_W and W must have the same shape (d_out, d_in), got "
                         f"{delta_W.shape} and {W.shape}")
    r = _check_k(r, "r", min(W.shape))
    U, _, Vt = np.linalg.svd(delta_W, full_matrices=False)
    projected = U[:, :r].T @ W @ Vt[:r].T                # (r, r)
    denominator = float(np.linalg.norm(projected))
    if denominator == 0.0:
        raise ValueError("W has no component in delta_W's top-r singular subspace "
                         "(‖U_rᵀ W V_r‖_F = 0); the amplification factor is undefined")
    return float(np.linalg.norm(delta_W)) / denominator


# ---------------------------------------------------------------------------------------------
# intruder dimensions (Shuttleworth et al. 2024)
# ---------------------------------------------------------------------------------------------

class IntruderResult(NamedTuple):
    """``max_cosines[m]``: best |cos| (or cos, with ``absolute=False``) of W_tuned's m-th left
    singular vector with any of W0's; ``indices``: the m (0-based, into the top k) with
    ``max_cosines[m] < eps``."""
    max_cosines: np.ndarray
    n_intruders: int
    indices: np.ndarray


def intruder_dimensions(W0, W_tuned, k: int = 10, eps: float = 0.5, absolute: bool = True) -> IntruderResult:
    """Find "intruder dimensions": top singular vectors of W_tuned that are new to W0.

    .. math:: c_m = \\max_n \\lvert \\langle u^{tuned}_m, u^{0}_n \\rangle \\rvert,
              \\quad m = 1..k; \\qquad u^{tuned}_m \\text{ is an intruder if } c_m < \\varepsilon

    with ``u^{tuned}_m`` the m-th left singular vector of W_tuned (by decreasing σ) and
    ``u^0_n`` every left singular vector of W0 from the reduced SVD (the
    ``min(d_out, d_in)`` ones that carry a singular value; for square W0 that is a full basis).
    Shuttleworth et al. 2024 (arXiv:2410.21228) find such intruders after LoRA fine-tuning but
    rarely after full fine-tuning.

    The absolute value is lora_np's choice, not the paper's: their Algorithm 1 compares
    ``cos(y_j, x_i)`` itself with ε. A singular vector is defined only up to its sign (the SVD
    may return ``−u`` for ``u``), so with the raw cosine a direction of W0 that the SVD of
    W_tuned happens to return flipped (cos = −1) would count as an intruder. ``absolute=False``
    gives the raw cosine, to see the difference.

    Parameters
    ----------
    W0 : array, shape (d_out, d_in)
        Weight before fine-tuning.
    W_tuned : array, shape (d_out, d_in)
        Weight after fine-tuning (e.g. ``W0 + ΔW``).
    k : int
        How many top singular vectors of W_tuned to test, 1 <= k <= min(d_out, d_in).
    eps : float in (0, 1]
        Cosine threshold.
    absolute : bool
        True (default): ``max_n |cos|``; False: ``max_n cos`` (the paper's Algorithm 1 as
        printed), which depends on the arbitrary signs of the singular vectors.

    Returns
    -------
    IntruderResult
        ``max_cosines`` (k,) float64, ``n_intruders`` int, ``indices`` (n_intruders,) int.
    """
    W0, W_tuned = _as_matrix(W0, "W0"), _as_matrix(W_tuned, "W_tuned")
    if W0.shape != W_tuned.shape:
        raise ValueError(f"W0 and W_tuned must have the same shape (d_out, d_in), got "
                         f"{W0.shape} and {W_tuned.shape}")
    k = _check_k(k, "k", min(W0.shape))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float in (0, 1], got {type(eps).__name__}")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if not isinstance(absolute, (bool, np.bool_)):
        raise TypeError(f"absolute must be a bool, got {type(absolute).__name__}")
    U0 = column_space_basis(W0)                         # (d_out, p)
    Uk = column_space_basis(W_tuned, k)                 # (d_out, k)
    cosines = (Uk.T @ U0).astype(np.float64)           # (k, p)
    if absolute:
        cosines = np.abs(cosines)
    max_cosines = cosines.max(axis=1)                   # (k,)
    indices = np.flatnonzero(max_cosines < eps)
    return IntruderResult(max_cosines, int(indices.size), indices)

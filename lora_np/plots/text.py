"""Figures of the real-text experiment (``lora_np.text_experiment``, ``python -m lora_np --task
text``): a character model pretrained on Jane Austen, fine-tuned on the King James Bible by full
fine-tuning and by LoRA at every rank.

Every function takes plain numbers — dicts of ``lora_np.fair.Spread`` (mean and range over
seeds), lists of checkpoints, ΔW matrices, LoRA factors — so it can be drawn from any run, or
from made-up inputs in a test; ``save_text_figures`` pulls them out of a ``TextResult``.
Losses are held-out cross-entropies in nats per character.
"""

from __future__ import annotations

import numbers
import pathlib

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from ..analysis import (effective_rank, energy_rank, random_subspace_baseline, row_space_basis,
                        singular_values, subspace_similarity_grid)
from ..validate import check_float_array, check_number
from .style import COLORS, FULL_FT, log2_ticks, teaching_figure

__all__ = ["TEXT_FIGURE_NAMES", "save_text_figures", "plot_text_loss_vs_rank",
           "plot_learning_forgetting", "plot_text_delta_spectra", "plot_text_subspace_similarity"]

#: file name of each figure that ``save_text_figures`` writes
TEXT_FIGURE_NAMES = {
    "loss_vs_rank": "text_loss_vs_rank.png",
    "learning_forgetting": "text_learning_forgetting.png",
    "delta_spectra": "text_delta_spectra.png",
    "subspace_similarity": "text_subspace_similarity.png",
}

#: the two held-out losses every figure reads: the new text (learning) and the old (forgetting)
TARGET, SOURCE = "kjv", "austen"
_TARGET_LABEL = "held-out KJV loss (nats/char) — learning"
_SOURCE_LABEL = "held-out Austen loss (nats/char) — forgetting"
PRETRAINED = dict(color="C3", marker="*", ms=22, ls="none", zorder=6)


# --------------------------------------------------------------------------- argument checks


def _as_spread(name: str, value) -> tuple:
    """(mean, low, high) from a number or a ``Spread``-like (mean, low, high[, n]) tuple, with
    low ≤ mean ≤ high, all finite."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = check_number(name, value)
        return v, v, v
    if not isinstance(value, (tuple, list)) or len(value) not in (3, 4):
        raise TypeError(f"{name} must be a number or a (mean, low, high) Spread, got {value!r}")
    mean, low, high = (check_number(f"{name}[{i}]", v) for i, v in enumerate(value[:3]))
    if not low <= mean <= high:
        raise ValueError(f"{name} must have low <= mean <= high, got {value!r}")
    return mean, low, high


def _losses(name: str, value) -> dict:
    """``{"kjv": (mean, low, high), "austen": (...)}`` from a dict with those two keys."""
    if not isinstance(value, dict) or set(value) < {TARGET, SOURCE}:
        raise ValueError(f"{name} must be a dict with keys {TARGET!r} and {SOURCE!r}, got {value!r}")
    return {k: _as_spread(f"{name}[{k!r}]", value[k]) for k in (TARGET, SOURCE)}


def _by_rank(name: str, lora) -> dict:
    """rank -> losses (``_losses``), ranks sorted; at least one."""
    if not isinstance(lora, dict) or not lora:
        raise ValueError(f"{name} must be a non-empty dict rank -> {{{TARGET!r}, {SOURCE!r}}}, got {lora!r}")
    for r in lora:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"{name}: ranks must be ints >= 1, got {r!r}")
    return {int(r): _losses(f"{name}[{r}]", lora[r]) for r in sorted(lora)}


def _rank_colors(ranks) -> dict:
    cmap = mpl.colormaps["viridis"]
    n = max(len(ranks) - 1, 1)
    return {r: cmap(0.9 * i / n) for i, r in enumerate(ranks)}


def _yerr(points) -> np.ndarray:
    """(2, n) distances from each mean down to low and up to high (matplotlib's error bars)."""
    return np.array([[m - lo for m, lo, _ in points], [hi - m for m, _, hi in points]])


# --------------------------------------------------------------------------- loss vs rank


def plot_text_loss_vs_rank(lora: dict, full: dict, pretrained: dict, path=None) -> Figure:
    """Left: held-out KJV loss after fine-tuning against LoRA rank (log₂ axis), mean over
    seeds with the range as error bars; full fine-tuning as a dashed line with its range shaded;
    the pretrained model dotted. Right: the same for the held-out Austen loss (forgetting).

    lora : dict rank -> {"kjv": Spread, "austen": Spread} (a Spread, or a plain number for one
        seed);  full : {"kjv": Spread, "austen": Spread};  pretrained : {"kjv": float,
        "austen": float}
    """
    lora, full, base = _by_rank("lora", lora), _losses("full", full), _losses("pretrained", pretrained)
    ranks = list(lora)
    with teaching_figure(1, 2, figsize=(16, 6.2), path=path) as (fig, axes):
        for ax, key, title in ((axes[0], TARGET, "Learning: KJV (the new text)"),
                               (axes[1], SOURCE, "Forgetting: Austen (the pretraining text)")):
            points = [lora[r][key] for r in ranks]
            ax.errorbar(ranks, [p[0] for p in points], yerr=_yerr(points), fmt="o-", color="C0",
                        ms=9, capsize=5, label="LoRA (mean, range over seeds)")
            m, lo, hi = full[key]
            ax.axhline(m, label="full fine-tuning", **FULL_FT)
            if hi > lo:
                ax.axhspan(lo, hi, color="black", alpha=0.08)
            ax.axhline(base[key][0], color="C3", ls=":", lw=2, label="pretrained (before fine-tuning)")
            log2_ticks(ax, ranks)
            ax.set(xlabel="LoRA rank r (α = 2r)", ylabel=_TARGET_LABEL if key == TARGET else _SOURCE_LABEL,
                   title=title)
            ax.legend(loc="best", fontsize=11)
    return fig


# --------------------------------------------------------------------------- the plane


def _check_curve(curve) -> np.ndarray:
    """(n, 3) float64: step, KJV loss, Austen loss of each checkpoint, steps increasing."""
    a = check_float_array("full_curve", curve, ndim=2).astype(np.float64, copy=False)
    if a.shape[1] != 3 or len(a) < 2:
        raise ValueError(f"full_curve must be (step, kjv, austen) rows, at least two, got shape {a.shape}")
    if np.any(np.diff(a[:, 0]) <= 0):
        raise ValueError("full_curve's steps must increase")
    return a


def _label_steps(ax, curve, xs, ys, min_gap: float = 0.04) -> None:
    """Write each checkpoint's step beside it, skipping one that would sit on the last label
    written (closer than ``min_gap`` of the data's extent, in both directions)."""
    x_all, y_all = np.concatenate([curve[:, 1], xs]), np.concatenate([curve[:, 2], ys])
    span = np.array([np.ptp(x_all) or 1.0, np.ptp(y_all) or 1.0])
    last = None
    for step, x, y in curve[1:]:
        here = np.array([x, y]) / span
        if last is None or np.max(np.abs(here - last)) >= min_gap:
            ax.annotate(f"{int(step)}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=11)
            last = here


def plot_learning_forgetting(full_curve, lora: dict, pretrained: dict, placements: dict | None = None,
                             full: dict | None = None, path=None) -> Figure:
    """The learning–forgetting plane of Biderman et al. 2024 ("LoRA Learns Less and Forgets
    Less", arXiv 2405.09673): x = held-out loss on the new text (KJV; left is better
    learning), y = held-out loss on the pretraining text (Austen; lower is less forgetting).

    Full fine-tuning's checkpoints along its run (one seed) are a curve from the pretrained
    model (a star), labelled with their steps (a label that would overlap the previous one is
    left out); LoRA's ranks are points coloured by rank with
    their range over seeds as error bars in both directions; other LoRA placements (optional)
    are squares.

    full_curve : (n, 3) rows (step, kjv, austen), steps increasing (step 0: the pretrained model)
    lora : dict rank -> {"kjv": Spread, "austen": Spread}
    pretrained : {"kjv": float, "austen": float}
    placements : dict label -> {"kjv": Spread, "austen": Spread}, optional
    full : full FT's {"kjv": Spread, "austen": Spread} over seeds, optional (a black square)
    """
    curve = _check_curve(full_curve)
    lora, base = _by_rank("lora", lora), _losses("pretrained", pretrained)
    placements = {} if placements is None else {k: _losses(f"placements[{k!r}]", v) for k, v in placements.items()}
    colors = _rank_colors(list(lora))
    with teaching_figure(figsize=(12, 8), path=path) as (fig, (ax,)):
        ax.plot(curve[:, 1], curve[:, 2], "o-", color="black", lw=2, ms=6,
                label="full fine-tuning, checkpoints along its run")
        _label_steps(ax, curve, [base[TARGET][0]] + [p[TARGET][0] for p in lora.values()],
                     [base[SOURCE][0]] + [p[SOURCE][0] for p in lora.values()])
        if full is not None:
            f = _losses("full", full)
            ax.errorbar([f[TARGET][0]], [f[SOURCE][0]], xerr=_yerr([f[TARGET]]), yerr=_yerr([f[SOURCE]]),
                        fmt="s", color="black", ms=11, capsize=4, label="full fine-tuning (mean, range)")
        for r, p in lora.items():
            ax.errorbar([p[TARGET][0]], [p[SOURCE][0]], xerr=_yerr([p[TARGET]]), yerr=_yerr([p[SOURCE]]),
                        fmt="o", color=colors[r], ms=11, capsize=4, label=f"LoRA r={r}")
        for n, (label, p) in enumerate(placements.items()):
            ax.errorbar([p[TARGET][0]], [p[SOURCE][0]], xerr=_yerr([p[TARGET]]), yerr=_yerr([p[SOURCE]]),
                        fmt="D", mfc="white", mew=2.2, color=COLORS[(n + 1) % len(COLORS)], ms=10,
                        capsize=3, label=label)
        ax.plot([base[TARGET][0]], [base[SOURCE][0]], label="pretrained", **PRETRAINED)
        ax.set(xlabel="held-out KJV loss (nats/char) — ← learns more",
               ylabel="held-out Austen loss (nats/char) — ↓ forgets less",
               title="Learning vs forgetting (Biderman et al. 2024)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=11)
    return fig


# --------------------------------------------------------------------------- ΔW


def _check_deltas(deltas) -> dict:
    """layer -> label -> 2-D float array, every label's matrix of one shape per layer."""
    if not isinstance(deltas, dict) or not deltas:
        raise ValueError(f"deltas must be a non-empty dict layer -> {{label: ΔW}}, got {type(deltas).__name__}")
    out = {}
    for layer, by_label in deltas.items():
        if not isinstance(by_label, dict) or not by_label:
            raise ValueError(f"deltas[{layer!r}] must be a non-empty dict label -> ΔW")
        mats = {lab: check_float_array(f"deltas[{layer!r}][{lab!r}]", M, ndim=2) for lab, M in by_label.items()}
        shapes = {lab: M.shape for lab, M in mats.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"deltas[{layer!r}]: every ΔW must have one shape, got {shapes}")
        if any(not np.any(M) for M in mats.values()):
            raise ValueError(f"deltas[{layer!r}]: a ΔW is all zeros (no spectrum to draw)")
        out[layer] = mats
    return out


def _delta_style(n: int, label: str) -> dict:
    if label.startswith("full"):
        return dict(FULL_FT, marker="s", ms=4)
    if label.startswith("random"):
        return dict(color="0.55", lw=2.5, ls="-")
    return dict(color=COLORS[n % len(COLORS)], marker="o", ms=4, lw=1.8)


def plot_text_delta_spectra(deltas: dict, energy: float = 0.9, path=None) -> Figure:
    """Singular values σᵢ of ΔW (log scale) against i, one panel per layer, for each method
    (full fine-tuning, LoRA at a few ranks) and a reference — typically a random Gaussian matrix
    of the same shape and Frobenius norm as full FT's ΔW. Each legend entry gives the matrix's
    energy rank (smallest k whose top-k σ hold ``energy`` of ‖ΔW‖²_F, ``analysis.energy_rank``)
    and its effective rank (Roy & Vetterli, ``analysis.effective_rank``); the σ of a rank-r LoRA
    ΔW beyond r are round-off and are not drawn (below 1e-5·σ₁).

    deltas : dict layer -> dict label -> ΔW (d_out, d_in); a label starting with "full" is drawn
        as full FT, one starting with "random" as the reference
    energy : the energy fraction of the energy rank, in (0, 1]
    """
    deltas = _check_deltas(deltas)
    energy = check_number("energy", energy, positive=True)
    if energy > 1:
        raise ValueError(f"energy must be in (0, 1], got energy={energy}")
    n = len(deltas)
    with teaching_figure(1, n, figsize=(7.5 * n + 1, 6.8), path=path, sharey=False) as (fig, axes):
        for ax, (layer, mats) in zip(axes, deltas.items()):
            p = min(next(iter(mats.values())).shape)
            for k, (label, M) in enumerate(mats.items()):
                s = singular_values(M).astype(np.float64)
                shown = s[s > 1e-5 * s[0]]
                text = (f"{label}: {int(100 * energy)} % of energy in {energy_rank(s, energy)}, "
                        f"erank {effective_rank(s):.1f}")
                ax.plot(np.arange(1, shown.size + 1), shown, label=text, **_delta_style(k, label))
            ax.set_yscale("log")
            ax.set_xlim(0, p + 1)
            ax.set(xlabel=f"index i (of {p})", ylabel="singular value σᵢ of ΔW", title=f"ΔW of {layer}")
            ax.legend(loc="upper right", fontsize=10)
    return fig


# --------------------------------------------------------------------------- subspaces


def _check_factors(name: str, factors) -> dict:
    if not isinstance(factors, dict) or not factors:
        raise ValueError(f"{name} must be a non-empty dict layer -> A (r, d_in), got {type(factors).__name__}")
    return {layer: check_float_array(f"{name}[{layer!r}]", A, ndim=2) for layer, A in factors.items()}


def plot_text_subspace_similarity(A_small: dict, A_large: dict, path=None) -> Figure:
    """Hu et al. 2021 (arXiv 2106.09685) §7.2, Fig. 3, on real text: how much the subspace
    spanned by the top-i right singular directions of A from a run with small rank (r = 8)
    shares with the top-j of A from a run with a large rank (r = 64),

        φ(i, j) = ‖U_iᵀ V_j‖²_F / min(i, j) ∈ [0, 1]   (``analysis.subspace_similarity_grid``),

    one heat map per layer (i = 1 … r_small down, j = 1 … r_large across); the last panel draws
    φ(i, i) of each layer against two random subspaces' expected max(i, j)/d_in
    (``analysis.random_subspace_baseline``).

    A_small, A_large : dict layer -> A (r, d_in), the same layers, r_small ≤ r_large
    """
    A_small, A_large = _check_factors("A_small", A_small), _check_factors("A_large", A_large)
    if set(A_small) != set(A_large):
        raise ValueError(f"A_small and A_large must name the same layers, got {sorted(A_small)} and {sorted(A_large)}")
    grids = {}
    for layer, A1 in A_small.items():
        A2 = A_large[layer]
        if A1.shape[1] != A2.shape[1] or A1.shape[0] > A2.shape[0]:
            raise ValueError(f"layer {layer!r}: A_small {A1.shape} and A_large {A2.shape} need the same "
                             "d_in and r_small <= r_large")
        grids[layer] = subspace_similarity_grid(row_space_basis(A1), row_space_basis(A2))
    n = len(grids)
    ratios = [5] * n + [4]
    with teaching_figure(1, n + 1, figsize=(6.5 * n + 6.5, 6.2), path=path, constrained=True,
                         gridspec_kw={"width_ratios": ratios}) as (fig, axes):
        im = None
        for ax, (layer, g) in zip(axes, grids.items()):
            im = ax.imshow(g, vmin=0, vmax=1, cmap="magma", aspect="auto", origin="upper",
                           extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
            ax.set_yticks(range(1, g.shape[0] + 1))
            ax.grid(False)
            ax.set(xlabel=f"j (directions of A, r = {g.shape[1]})", ylabel=f"i (directions of A, r = {g.shape[0]})",
                   title=f"φ(i, j): {layer}")
        fig.colorbar(im, ax=list(axes[:n]), fraction=0.03, pad=0.02, label="φ")
        ax = axes[-1]
        d_in = next(iter(A_small.values())).shape[1]
        for k, (layer, g) in enumerate(grids.items()):
            i = np.arange(1, g.shape[0] + 1)
            ax.plot(i, np.diag(g), "o-", color=COLORS[k % len(COLORS)], ms=8, label=layer)
        r_small = max(g.shape[0] for g in grids.values())
        i = np.arange(1, r_small + 1)
        ax.plot(i, [random_subspace_baseline(int(a), int(a), d_in) for a in i], color="gray", ls="--",
                lw=2, label=f"random: i / d_in (d_in = {d_in})")
        ax.set_xticks(i)
        ax.set_ylim(0, 1.05)
        ax.set(xlabel="i = j", ylabel="φ(i, i)", title="Shared top directions vs chance")
        ax.legend(loc="upper right", fontsize=10)
    return fig


# --------------------------------------------------------------------------- all of them


def save_text_figures(result, out_dir="figures", prefix: str = "") -> dict:
    """Draw every figure of a ``lora_np.text_experiment.TextResult`` and save it in ``out_dir``
    as ``prefix + TEXT_FIGURE_NAMES[...]``. Returns ``{figure name: path}``."""
    from ..text_experiment import TextResult
    if not isinstance(result, TextResult):
        raise TypeError(f"result must be a TextResult (from lora_np.text_experiment), got "
                        f"{type(result).__name__}")
    out = pathlib.Path(out_dir)
    paths = {key: out / (prefix + name) for key, name in TEXT_FIGURE_NAMES.items()}
    plot_text_loss_vs_rank(result.rank_losses(), result.method_losses(result.full_name),
                           result.pretrained_losses(), path=paths["loss_vs_rank"])
    plot_learning_forgetting(result.full_curve(), result.rank_losses(), result.pretrained_losses(),
                             placements=result.placement_losses(),
                             full=result.method_losses(result.full_name), path=paths["learning_forgetting"])
    plot_text_delta_spectra(result.spectra_deltas(), path=paths["delta_spectra"])
    A_small, A_large = result.subspace_factors()
    plot_text_subspace_similarity(A_small, A_large, path=paths["subspace_similarity"])
    return paths

"""Full fine-tuning against LoRA at every rank, on a task whose true update ΔW* has rank r* (``k`` in the code).

``rank_sweep`` (MLP task) and ``attention_sweep`` (one attention layer) build a task
(``lora_np.tasks``), fine-tune a fresh copy of its pretrained model once with every parameter
trainable (full FT) and once per rank r with LoRA on the chosen layers (default: the layers
task B shifts), all through the same loop (``lora_np.train.train``) on the same mini-batches,
and return plain dataclasses holding what each run measured.

What is measured, per method (``MethodResult``):

* ``trainable_params`` — counted from the model's trainable arrays;
* ``loss_history`` / ``val_history`` / ``final_val_loss`` — task B;
* ``old_task_loss`` — task A, i.e. forgetting (0 for the pretrained model);
* ``delta_weights`` — ΔW of each shifted layer: ``W_after − W_before`` for full FT,
  ``s·B A`` for LoRA (zeros for a shifted layer LoRA does not adapt);
* ``equivalent_delta`` — the same ΔW with attention's symmetries taken out
  (``equivalent_delta``): the change of the shifted layer alone that gives the model's function,
  the quantity that can be compared with ΔW* (equal to ``delta_weights`` for an MLP);
* ``seconds_per_step`` — wall time per training step;
* ``state_bytes`` — training state measured from the arrays
  (``counting.measured_training_state_bytes``): trainable parameters + their gradients + the
  optimizer's state (Adam's m and v).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from .analysis import left_subspace_similarity, singular_values
from .claims import Claim, format_claims
from .counting import lora_params, measured_training_state_bytes
from .fair import FairResult, Run, compare
from .lora import add_lora, lora_layers
from .modules import Linear, no_grad
from .tasks import Task, attention_task, mlp_task
from .train import TrainHistory, train
from .validate import check_int

__all__ = ["MethodResult", "SweepResult", "SweepSettings", "full_finetune", "lora_finetune",
           "sweep", "rank_sweep", "attention_sweep", "format_table", "equivalent_delta",
           "lora_formula_params", "Claim", "check_claims", "format_claims",
           "DEFAULT_RANKS", "QUICK_RANKS", "held_out_split", "fair_comparison",
           "lora_free_parameters", "least_squares_overfit"]

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
QUICK_RANKS = (1, 2, 4, 8, 64)


@dataclass(frozen=True)
class SweepSettings:
    """Training settings shared by every run of a sweep.

    steps, batch_size, schedule : see ``lora_np.train.train`` (Adam, cosine decay)
    lr_full : peak learning rate of full fine-tuning
    lr_lora : peak learning rate of LoRA
    alpha : LoRA's α; None means α = r, i.e. scale s = α/r = 1 at every rank
    seed : seed of the mini-batch order (the same batches for every method) and of LoRA's A init
    """
    steps: int = 600
    batch_size: int | None = 256
    lr_full: float = 1e-2
    lr_lora: float = 1e-2
    alpha: float | None = None
    schedule: str = "cosine"
    seed: int = 0


@dataclass
class MethodResult:
    """What one fine-tuning run measured (see the module docstring).

    method : "full" or "lora";  rank : r (None for full FT);  targets : layers LoRA adapts
    (for full FT: every layer). ``delta_weights`` and ``equivalent_delta`` map each of
    ``task.delta_true``'s keys to ΔW (d_out, d_in); ``lora_factors`` maps each LoRA layer to
    (A (r, d_in), B (d_out, r)); ``held_out_losses`` maps each name of the ``held_out`` splits
    given to ``full_finetune``/``lora_finetune`` to the trained model's loss on it (empty when
    none was given).
    """
    method: str
    rank: int | None
    targets: tuple
    trainable_params: int
    loss_history: list
    val_history: list
    final_val_loss: float
    old_task_loss: float
    delta_weights: dict
    equivalent_delta: dict
    seconds_per_step: float
    state_bytes: int
    lora_factors: dict = field(default_factory=dict)
    scale: float | None = None
    held_out_losses: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "full FT" if self.method == "full" else f"LoRA r={self.rank}"


@dataclass
class SweepResult:
    """Full fine-tuning and LoRA at each rank on one task.

    task : Task;  initial_val_loss : L₀, the pretrained model's validation loss on task B;
    full : MethodResult;  lora : dict r -> MethodResult;  settings : SweepSettings;
    seconds : wall time of the whole sweep.
    """
    task: Task
    initial_val_loss: float
    full: MethodResult
    lora: dict
    settings: SweepSettings
    seconds: float = 0.0

    @property
    def ranks(self) -> list:
        return sorted(self.lora)

    def methods(self) -> list:
        """Full FT first, then LoRA by increasing rank."""
        return [self.full] + [self.lora[r] for r in self.ranks]


# --------------------------------------------------------------------------- one run


#: attention's symmetries: per head h the scores see W_q and W_k only through
#: M^qk_h = W_{q,h}ᵀ W_{k,h}, the output sees W_v and W_o only through M^ov_h = W_{o,h} W_{v,h}
SYMMETRY_PARTNER = {"q_proj": "k_proj", "k_proj": "q_proj", "v_proj": "o_proj", "o_proj": "v_proj"}


def _applied_weight(layer) -> np.ndarray:
    """The weight a layer multiplies by: ``W``, plus ``delta_weight()`` for an unmerged LoRA or
    DoRA layer."""
    if getattr(layer, "merged", True):
        return layer.W
    return layer.W + layer.delta_weight()


def _head_product(model, name, h) -> np.ndarray:
    """M^qk_h = W_{q,h}ᵀ W_{k,h} (for q_proj, k_proj) or M^ov_h = W_{o,h} W_{v,h} (for v_proj,
    o_proj), (d_model, d_model); ``h`` is the slice of head h's rows (columns of W_o)."""
    W = {n: _applied_weight(getattr(model, n)) for n in (name, SYMMETRY_PARTNER[name])}
    if name in ("q_proj", "k_proj"):
        return W["q_proj"][h].T @ W["k_proj"][h]
    return W["o_proj"][:, h] @ W["v_proj"][h]


def _one_sided_delta(pretrained, model, name) -> np.ndarray:
    """The change of ``name`` alone (partner at its pretrained weight) that reproduces the
    change of every head's product; see ``equivalent_delta``."""
    d, H = pretrained.d_model, pretrained.n_heads
    partner = getattr(pretrained, SYMMETRY_PARTNER[name]).W
    out = np.zeros((d, d))
    for start in range(0, d, d // H):
        h = slice(start, start + d // H)
        dP = _head_product(model, name, h) - _head_product(pretrained, name, h)      # (d, d)
        if name == "q_proj":                  # ΔM^qk_h = ΔW_{q,h}ᵀ W⁰_{k,h}
            out[h] = np.linalg.pinv(partner[h].T) @ dP.T
        elif name == "k_proj":                # ΔM^qk_h = W⁰_{q,h}ᵀ ΔW_{k,h}
            out[h] = np.linalg.pinv(partner[h].T) @ dP
        elif name == "v_proj":                # ΔM^ov_h = W⁰_{o,h} ΔW_{v,h}
            out[h] = np.linalg.pinv(partner[:, h]) @ dP
        else:                                 # ΔM^ov_h = ΔW_{o,h} W⁰_{v,h}
            out[:, h] = dP @ np.linalg.pinv(partner[h])
    return out


def equivalent_delta(task: Task, model, delta: dict) -> dict:
    """ΔW of each shifted layer with attention's symmetries taken out: the change of that layer
    *alone* (every other weight at its pretrained value) closest to ``model``'s function — what
    can be compared with ΔW*.

    ``delta`` maps each of ``task.delta_true``'s keys to the raw change ``W − W₀`` (d_out, d_in).
    An MLP has no continuous symmetry, so its entries are returned as they are. In attention,
    for every invertible C (d_h, d_h),

        (W_{q,h}, W_{k,h}) → (C W_{q,h}, C⁻ᵀ W_{k,h}),   (W_{v,h}, W_{o,h}) → (C W_{v,h}, W_{o,h} C⁻¹)

    leave the layer's output unchanged, so full fine-tuning, which also moves W_k and W_o, ends
    at a raw ΔW_q that is ΔW*_q plus a drift along these directions — of any rank. Only the
    per-head products M^qk_h = W_{q,h}ᵀ W_{k,h} and M^ov_h = W_{o,h} W_{v,h} are fixed by the
    function, so each product's change is written as a change of the shifted matrix with its
    partner at its pretrained weight, in the least-squares sense (``⁺`` = pseudo-inverse):

        ΔW_{q,h} = (W⁰_{k,h}ᵀ)⁺ (ΔM^qk_h)ᵀ   ΔW_{k,h} = (W⁰_{q,h}ᵀ)⁺ ΔM^qk_h     (d_h, d)
        ΔW_{v,h} = (W⁰_{o,h})⁺ ΔM^ov_h      ΔW_{o,h} = ΔM^ov_h (W⁰_{v,h})⁺      ((d_h, d), (d, d_h))

    This keeps the part of ΔM^qk_h that W_q alone can make (the columns in W⁰_{k,h}'s row space),
    and likewise for the others. It is invariant under the symmetries; it is ΔW* exactly for
    teacher B, however its weights are parametrised, and the layer's own ΔW when only that layer
    changed (LoRA on q and v). A layer whose partner is shifted too keeps its raw ΔW: how a
    product's change splits between two shifted matrices is not fixed by the function.
    Weights only: bias changes are not folded in.
    """
    if task.kind != "attention":
        return dict(delta)
    return {name: (dW if SYMMETRY_PARTNER[name] in task.shifted
                   else _one_sided_delta(task.pretrained, model, name))
            for name, dW in delta.items()}


def _run(task: Task, model, method, rank, targets, lr, settings, verbose, scale=None,
         held_out=None) -> MethodResult:
    before = {name: task.layer(model, name).W.copy() for name in task.delta_true}
    hist: TrainHistory = train(model, task.x_train, task.y_train, steps=settings.steps, lr=lr,
                               batch_size=settings.batch_size, schedule=settings.schedule,
                               x_val=task.x_val, y_val=task.y_val,
                               rng=np.random.default_rng([settings.seed, 1]), verbose=verbose,
                               label=("full FT    " if method == "full" else f"LoRA r={rank:<4}"))
    loras = lora_layers(model)
    delta = {}
    for name in task.delta_true:
        if name in loras:
            delta[name] = loras[name].delta_weight()
        else:
            delta[name] = task.layer(model, name).W - before[name]
    model.eval()
    held = {name: task.loss(model, x, y) for name, (x, y) in (held_out or {}).items()}
    return MethodResult(
        method=method, rank=rank, targets=tuple(targets),
        trainable_params=model.num_parameters(trainable_only=True),
        loss_history=hist.loss_history, val_history=hist.val_history,
        final_val_loss=hist.final_val_loss, old_task_loss=task.old_task_loss(model),
        delta_weights=delta, equivalent_delta=equivalent_delta(task, model, delta),
        seconds_per_step=hist.seconds_per_step,
        state_bytes=measured_training_state_bytes(model, hist.optimizer),
        lora_factors={p: (m.A.copy(), m.B.copy()) for p, m in loras.items()}, scale=scale,
        held_out_losses=held)


def full_finetune(task: Task, settings: SweepSettings = SweepSettings(),
                  verbose: bool = False, held_out=None) -> MethodResult:
    """Fine-tune a copy of ``task.pretrained`` with every parameter trainable (Adam).

    ``held_out`` : optional dict name -> (x, y); the trained model's loss on each split goes to
    ``MethodResult.held_out_losses`` (e.g. ``held_out_split``'s test rows).
    """
    model = task.new_model()
    names = tuple(p for p, m in model.named_modules() if isinstance(m, Linear))
    return _run(task, model, "full", None, names, settings.lr_full, settings, verbose,
                held_out=held_out)


def lora_finetune(task: Task, r: int, targets=None, settings: SweepSettings = SweepSettings(),
                  verbose: bool = False, held_out=None) -> MethodResult:
    """Fine-tune a copy of ``task.pretrained`` with LoRA of rank ``r`` on ``targets``
    (default: ``task.shifted``), everything else frozen.

    α = ``settings.alpha`` (None: α = r, so s = 1). A is drawn from
    ``default_rng([settings.seed, 2, r])``; B starts at 0, so training starts from exactly the
    pretrained model. ``held_out`` as in ``full_finetune``.
    """
    targets = _targets(task, targets)
    alpha = float(r) if settings.alpha is None else settings.alpha
    model = add_lora(task.new_model(), targets, r=r, alpha=alpha,
                     rng=np.random.default_rng([settings.seed, 2, int(r)]))
    scale = next(iter(lora_layers(model).values())).scale
    return _run(task, model, "lora", int(r), targets, settings.lr_lora, settings, verbose, scale,
                held_out=held_out)


# --------------------------------------------------------------------------- sweeps


def _targets(task: Task, targets) -> tuple:
    """LoRA's target layers as a tuple (None: the layers task B shifts)."""
    if targets is None:
        return tuple(task.shifted)
    return (targets,) if isinstance(targets, str) else tuple(targets)


def _check_ranks(ranks, task, targets):
    ranks = tuple(ranks)
    if not ranks:
        raise ValueError("ranks must list at least one rank")
    ranks = tuple(check_int(f"ranks[{i}]", r, minimum=1) for i, r in enumerate(ranks))
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct, got {ranks}")
    model = task.pretrained
    for name in targets:
        lay = task.layer(model, name)
        if max(ranks) > min(lay.d_in, lay.d_out):
            raise ValueError(f"rank {max(ranks)} is larger than min(d_in, d_out) = "
                             f"{min(lay.d_in, lay.d_out)} of layer {name!r}")
    return tuple(sorted(ranks))


def sweep(task: Task, ranks=DEFAULT_RANKS, targets=None, settings: SweepSettings = SweepSettings(),
          verbose: bool = False) -> SweepResult:
    """Full FT and LoRA at each rank in ``ranks`` on ``task`` (LoRA on ``targets``, default
    ``task.shifted``). Every run starts from its own copy of the pretrained model and sees the
    same mini-batches."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lora_np.tasks.Task, got {type(task).__name__}")
    if not isinstance(settings, SweepSettings):
        raise TypeError(f"settings must be a SweepSettings, got {type(settings).__name__}")
    targets = _targets(task, targets)
    ranks = _check_ranks(ranks, task, targets)
    t0 = time.perf_counter()
    initial = task.val_loss(task.pretrained)
    full = full_finetune(task, settings, verbose)
    lora = {r: lora_finetune(task, r, targets, settings, verbose) for r in ranks}
    return SweepResult(task, initial, full, lora, settings, time.perf_counter() - t0)


def rank_sweep(ranks=DEFAULT_RANKS, true_rank: int = 4, seed: int = 0, *, targets=None,
               settings: SweepSettings | None = None, verbose: bool = False,
               **task_kwargs) -> SweepResult:
    """The default experiment: the MLP task of ``tasks.mlp_task(seed, true_rank, **task_kwargs)``
    (ΔW* on fc1), full FT against LoRA at each rank (on fc1 unless ``targets`` says otherwise).

    ``settings`` defaults to ``SweepSettings(seed=seed)``: 600 Adam steps of 256 rows, cosine
    decay from lr 1e-2, α = r.
    """
    task = mlp_task(seed, true_rank, **task_kwargs)
    return sweep(task, ranks, targets, settings or SweepSettings(seed=seed), verbose)


def attention_sweep(ranks=DEFAULT_RANKS, true_rank: int = 4, seed: int = 0, *, targets=None,
                    settings: SweepSettings | None = None, verbose: bool = False,
                    **task_kwargs) -> SweepResult:
    """The same comparison on one multi-head attention layer (``tasks.attention_task``).

    ``task_kwargs["shifted"]`` chooses the projections task B shifts (default q_proj and
    v_proj); ``targets`` the ones LoRA adapts (default: the shifted ones), e.g.
    ``targets=("q_proj", "k_proj", "v_proj", "o_proj")``. Default settings: 600 Adam steps of
    64 sequences, lr 1e-2.
    """
    task = attention_task(seed, true_rank, **task_kwargs)
    return sweep(task, ranks, targets, settings or SweepSettings(seed=seed, batch_size=64), verbose)


# --------------------------------------------------------------------------- reporting


def lora_formula_params(task: Task, r: int, targets) -> int:
    """``Σ_targets r·(d_in + d_out)`` (``counting.lora_params``) for ``task``'s model."""
    return sum(lora_params(task.layer(task.pretrained, t).d_in, task.layer(task.pretrained, t).d_out, r)
               for t in targets)


def format_table(result: SweepResult) -> str:
    """The sweep as a plain-text table, one row per method: trainable parameters (and % of
    full FT's), final validation loss (and ÷ L₀), old-task loss, ms/step, training state."""
    n_full = result.full.trainable_params
    L0 = result.initial_val_loss
    header = ("method", "trainable", "% of full", "val loss", "÷ L₀", "old-task loss", "ms/step",
              "state bytes")
    rows = []
    for m in result.methods():
        rows.append((m.label, f"{m.trainable_params:,}", f"{100 * m.trainable_params / n_full:.1f}%",
                     f"{m.final_val_loss:.3e}", f"{m.final_val_loss / L0:.4f}",
                     f"{m.old_task_loss:.2e}", f"{1e3 * m.seconds_per_step:.2f}",
                     f"{m.state_bytes:,}"))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(r):
        return "  ".join(f"{v:<{w}}" if c == 0 else f"{v:>{w}}" for c, (v, w) in enumerate(zip(r, widths)))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows)])


# --------------------------------------------------------------------------- the claims


def check_claims(result: SweepResult) -> list:
    """The claims the task is designed to show, evaluated on ``result``.

    With L₀ = ``initial_val_loss`` and k = the true rank:

    1. full FT and LoRA with r ≥ k end at a validation loss ≤ 0.01·L₀;
    2. LoRA with r < k stays ≥ 0.05·L₀ (Eckart–Young: it cannot hold all k directions);
    3. full FT's ΔW of every shifted layer is close to rank k: σ_{k+1}/σ_k ≤ 0.2;
    4. its top-k left singular subspace is ΔW*'s: φ ≥ 0.9 (Hu et al. §7.2's measure);
    5. LoRA with r ≥ k forgets task A less than full FT (lower old-task loss).

    Claims 3 and 4 read ΔW through ``equivalent_delta``: on attention, full FT's raw ΔW_q and
    ΔW_v also carry a drift along the W_qᵀW_k and W_oW_v symmetries that no loss can see (the
    detail prints the raw ratio beside it); the MLP has no such symmetry. What every run shows by
    construction is not claimed: LoRA's parameter count r·(d_in + d_out) and its training state
    are counted from the arrays in the table and checked against ``lora_np.counting`` in the
    tests. A claim about a set of ranks the sweep does not contain (say, no r < k) holds
    vacuously and says so.
    """
    res = result
    k, L0 = res.task.true_rank, res.initial_val_loss
    high = [r for r in res.ranks if r >= k]
    low = [r for r in res.ranks if r < k]
    worst = max([res.full.final_val_loss] + [res.lora[r].final_val_loss for r in high])
    out = [Claim(f"full FT and LoRA r ≥ {k} end at ≤ 0.01·L₀", worst <= 0.01 * L0,
                 f"worst {worst / L0:.4f}·L₀")]
    if low:
        best = min(res.lora[r].final_val_loss for r in low)
        out.append(Claim(f"LoRA r < {k} stays ≥ 0.05·L₀", best >= 0.05 * L0, f"best {best / L0:.3f}·L₀"))
    else:
        out.append(Claim(f"LoRA r < {k} stays ≥ 0.05·L₀", True, "no rank r < k in this sweep"))
    out += _full_ft_delta_claims(res)
    if high:
        forget = {r: res.lora[r].old_task_loss for r in high}
        out.append(Claim(f"LoRA r ≥ {k} forgets task A less than full FT",
                         all(v < res.full.old_task_loss for v in forget.values()),
                         f"full FT {res.full.old_task_loss:.2e}; LoRA "
                         + ", ".join(f"r={r} {v:.2e}" for r, v in forget.items())))
    return out


def _elbow(dW, k) -> float | None:
    """σ_{k+1}/σ_k of ``dW`` (None if k is its full rank)."""
    s = singular_values(dW)
    return None if k >= s.size else float(s[k] / s[k - 1])


def _full_ft_delta_claims(res: SweepResult) -> list:
    """Claims 3 and 4 of ``check_claims``: full FT's ΔW (through ``equivalent_delta``) has an
    elbow at k and points along ΔW*."""
    task, full = res.task, res.full
    k = task.true_rank
    folded = [n for n in full.delta_weights
              if task.kind == "attention" and SYMMETRY_PARTNER[n] not in task.shifted]
    ratios, details = [], []
    for name, dW in full.equivalent_delta.items():
        ratio = _elbow(dW, k)
        ratios.append(ratio)
        text = f"{name} (k = full rank)" if ratio is None else f"{name} {ratio:.4f}"
        if name in folded:
            text += f" (raw W − W₀: {_elbow(full.delta_weights[name], k):.2f})"
        details.append(text)
    via = ""
    if folded:
        products = {"q_proj": "W_qᵀW_k", "k_proj": "W_qᵀW_k", "v_proj": "W_oW_v", "o_proj": "W_oW_v"}
        via = f"read through {', '.join(dict.fromkeys(products[n] for n in folded))}: "
    phis = {n: left_subspace_similarity(dW, task.delta_true[n], k)
            for n, dW in full.equivalent_delta.items()}
    return [Claim(f"full-FT ΔW has σ_{k + 1}/σ_{k} ≤ 0.2", all(r is None or r <= 0.2 for r in ratios),
                  via + ", ".join(details)),
            Claim(f"full-FT ΔW's top-{k} left subspace matches ΔW* (φ ≥ 0.9)",
                  all(p >= 0.9 for p in phis.values()),
                  via + ", ".join(f"{n} φ = {p:.4f}" for n, p in phis.items()))]




# --------------------------------------------------------------------------- fair comparison


def held_out_split(task: Task, n_rows: int | None = None) -> tuple:
    """Fresh task-B rows that no run trains or chooses a learning rate on: inputs drawn like
    task B's (standard normal, the shape of ``task.x_val``'s rows), targets from task B's
    teacher plus label noise of the task's std, all from ``default_rng([task.seed, 3])`` — a
    stream the task itself never draws from. ``n_rows`` defaults to the validation split's size.
    Returns ``(x, y)``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lora_np.tasks.Task, got {type(task).__name__}")
    n = len(task.x_val) if n_rows is None else check_int("n_rows", n_rows, minimum=1)
    rng = np.random.default_rng([task.seed, 3])
    x = rng.standard_normal((n, *task.x_val.shape[1:]))
    with no_grad():
        clean = task.teacher(x)
    y = clean + task.noise * rng.standard_normal(clean.shape)
    return x, y


def _method_spec(name, spec, settings) -> dict:
    """``fair_comparison``'s spec of one method as dict(r=…, alpha=…, targets=…) (r None: full FT)."""
    if spec is None:
        return dict(r=None, alpha=None, targets=None)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return dict(r=check_int(f"methods[{name!r}]", spec, minimum=1), alpha=settings.alpha, targets=None)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"r", "alpha", "targets"})
        if unknown or "r" not in spec:
            raise ValueError(f"methods[{name!r}] must be None (full FT), a rank, or a dict with 'r' and "
                             f"optionally 'alpha', 'targets'; got {spec!r}")
        return dict(r=check_int(f"methods[{name!r}]['r']", spec["r"], minimum=1),
                    alpha=spec.get("alpha", settings.alpha), targets=spec.get("targets"))
    raise TypeError(f"methods[{name!r}] must be None (full FT), an int rank or a dict, got {spec!r}")


def fair_comparison(task: Task, methods: dict, lrs, seeds=(0, 1, 2), *,
                    settings: SweepSettings = SweepSettings(), n_test: int | None = None,
                    workers: int = 1, verbose: bool = False) -> FairResult:
    """Full fine-tuning and LoRA configurations on ``task`` under ``lora_np.fair.compare``: each
    method's learning rate chosen from its own grid on task B's validation loss (first seed),
    then every seed at that rate, reported on rows no run has seen.

    methods : dict name -> None (full FT), an int r (LoRA of rank r, α = ``settings.alpha``,
        on ``task.shifted``), or dict(r=…, alpha=…, targets=…)
    lrs : one grid for every method, or dict name -> grid (``fair.compare``)
    seeds : the training seeds (mini-batch order and LoRA's A init, as ``rank_sweep``'s
        ``settings.seed``); the task itself stays ``task``
    settings : everything else (steps, batch size, schedule); its lr and seed are replaced

    Each ``Run`` has ``validation`` = the final validation loss (what the rate is chosen on),
    ``held_out`` = {"test": loss on ``held_out_split(task, n_test)``, "old task": task A loss}
    and ``details`` = the ``MethodResult``. The first seed at ``settings``'s own learning rate is
    the same run as ``rank_sweep``'s, bit for bit.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lora_np.tasks.Task, got {type(task).__name__}")
    if not isinstance(settings, SweepSettings):
        raise TypeError(f"settings must be a SweepSettings, got {type(settings).__name__}")
    if not isinstance(methods, dict) or not methods:
        raise TypeError(f"methods must be a non-empty dict name -> None / rank / dict, got {methods!r}")
    specs = {name: _method_spec(name, spec, settings) for name, spec in methods.items()}
    for name, spec in specs.items():
        if spec["r"] is not None:
            _check_ranks((spec["r"],), task, _targets(task, spec["targets"]))
    test = {"test": held_out_split(task, n_test)}

    def method(spec):
        def fn(lr, seed):
            s = replace(settings, lr_full=lr, lr_lora=lr, seed=seed, alpha=spec["alpha"])
            if spec["r"] is None:
                m = full_finetune(task, s, held_out=test)
            else:
                m = lora_finetune(task, spec["r"], spec["targets"], s, held_out=test)
            return Run(validation=m.final_val_loss,
                       held_out={"test": m.held_out_losses["test"], "old task": m.old_task_loss},
                       details=m)
        return fn

    return compare({name: method(spec) for name, spec in specs.items()}, lrs, seeds,
                   workers=workers, verbose=verbose)


# --------------------------------------------------------------------------- overfitting


def lora_free_parameters(d_in: int, d_out: int, r: int) -> int:
    """The number of free directions of a rank-r product ``B A`` (d_out, d_in):
    ``r·(d_in + d_out − r)``, the dimension of the set of rank-r matrices. ``B A`` has
    ``r·(d_in + d_out)`` entries, but ``(B G)(G⁻¹ A)`` is the same product for every invertible
    G (r, r), so r² of them are redundant; at r = min(d_in, d_out) it is ``d_in·d_out``, every
    matrix."""
    d_in, d_out = check_int("d_in", d_in, minimum=1), check_int("d_out", d_out, minimum=1)
    r = check_int("r", r, minimum=1)
    if r > min(d_in, d_out):
        raise ValueError(f"r must be <= min(d_in, d_out) = {min(d_in, d_out)}, got {r}")
    return r * (d_in + d_out - r)


def least_squares_overfit(p: int, n: int) -> tuple:
    """Textbook linear least squares with ``p`` free parameters fitted to ``n`` noisy numbers
    (targets = a function the model can represent + noise of variance σ², fitted to the
    minimum): the expected training loss is σ²(1 − p/n) — p of the n noise directions are
    fitted away — and the expected loss on fresh noise at the same inputs σ²(1 + p/n).
    Returns ``(train, test)`` in units of σ² (noise²)."""
    p, n = check_int("p", p, minimum=0), check_int("n", n, minimum=1)
    if p > n:
        raise ValueError(f"p must be <= n (more parameters than numbers fit the noise exactly), got p={p}, n={n}")
    return 1.0 - p / n, 1.0 + p / n

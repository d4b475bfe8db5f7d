"""LoRA on real text: the character model pretrained on Jane Austen, fine-tuned on the King James
Bible by full fine-tuning and by LoRA at every rank and placement, compared fairly.

``run_text_experiment(settings)`` loads the committed pretrained model
(``lora_np/data/austen_lm.npz``, ``lora_np.text.checkpoint.load_lm``) and fine-tunes a fresh copy
of it on the KJV's training split once per method and learning rate and seed:

* **full fine-tuning** — every parameter trainable;
* **LoRA at r = 1, 2, 4, …, 64** on ``q_proj, v_proj, o_proj, fc1, fc2`` of every block, α = 2r
  (so the scale s = α/r = 2 at every rank), everything else frozen;
* **placement** — LoRA at one rank on q, v only (Hu et al. 2021, Table 5's favourite), on all
  of attention (q, k, v, o), on the MLP only (fc1, fc2), and on every linear layer of every
  block (the head stays frozen), as Biderman et al. 2024 and the QLoRA paper ask.

The comparison follows ``lora_np.fair``: each method's learning rate is chosen from a small grid
on a slice of the KJV *validation* split (with the first seed); the headline methods (full FT
and a few ranks) are then rerun with every further seed; the tables report the held-out *test*
splits as the mean and range over seeds. Every run takes the same number of Adam steps (cosine
decay) on the same mini-batches, drawn from ``fair.batch_rng(seed)``; LoRA's A comes from
``fair.init_rng(seed, r)`` (B = 0, so every run starts from exactly the pretrained model).

What is measured, per run (``TextRun``):

* **learning** — held-out KJV loss (nats/char) on evenly spaced windows of the KJV test split;
* **forgetting** — held-out Austen loss on the Austen test split, which pretraining never saw;
* trainable parameters, training-state bytes (``counting.measured_training_state_bytes``:
  trainable parameters + gradients + Adam's m and v), ms per training step;
* full FT only: both held-out losses at checkpoints along its run (the learning–forgetting
  curve of Biderman et al. 2024);
* the trained parameters themselves, from which ``TextResult`` derives ΔW, its spectra and
  energy ranks, the subspace similarity of Hu et al. §7.2, and the samples.

Evaluations read fixed slices (``val_windows``, ``test_windows`` windows of ``context``
characters, spread evenly over the split), not the whole split: the same slice for every
method, so differences between methods are measured on exactly the same text.
"""

from __future__ import annotations

import copy
import math
import pathlib
import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from . import functional as F
from .analysis import effective_rank, energy_rank
from .claims import Claim, format_claims
from .counting import measured_training_state_bytes
from .fair import FairResult, Run, batch_rng, compare, format_grid, format_spread, init_rng
from .lora import add_lora, lora_layers
from .modules import Linear
from .optim import Adam
from .text.checkpoint import load_lm
from .text.corpus import DATA_DIR, NATS_TO_BITS, lm_loss, load_splits, windows
from .text.model import generate
from .train import train
from .validate import check_int, check_number

__all__ = ["PRETRAINED_PATH", "DEFAULT_RANKS", "LORA_TARGETS", "PLACEMENTS", "TextSettings",
           "QUICK_SETTINGS", "MethodSpec", "TextData", "TextRun", "TextResult", "method_specs",
           "lora_grid", "run_text_experiment", "format_text_table", "format_energy_ranks", "check_text_claims",
           "format_samples", "results_markdown", "Claim", "format_claims", "random_like",
           "austen_on_full_curve", "load_data", "new_model", "finetune"]

#: the committed pretrained model (``python -m lora_np.pretrain`` writes it)
PRETRAINED_PATH = DATA_DIR / "austen_lm.npz"
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
#: where the rank sweep puts LoRA (every block): attention's q, v, o and both MLP layers
LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "fc1", "fc2")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LAYERS = ("fc1", "fc2")
#: the placement comparison: name -> the layers of every block that get LoRA
PLACEMENTS = {
    "q, v": ("q_proj", "v_proj"),
    "attention q, k, v, o": ATTENTION,
    "MLP fc1, fc2": MLP_LAYERS,
    "every linear layer": ATTENTION + MLP_LAYERS,
}
FULL = "full FT"
#: the held-out metrics of every run: the new text (learning), the old one (forgetting)
KJV, AUSTEN = "kjv", "austen"


@dataclass(frozen=True)
class TextSettings:
    """Everything the experiment does, in one place (the defaults are ``python -m lora_np --task
    text``; ``QUICK_SETTINGS`` is ``--quick``).

    steps, batch_size : Adam steps per run (cosine decay) and windows of ``context`` characters
        per step — the same for every method
    ranks : LoRA ranks of the sweep (on ``targets``, α = 2r)
    placement_rank : the rank of the placement comparison;  placements : names in PLACEMENTS
    lr_full : full FT's learning-rate grid
    lr_lora, lr_lora_large, large_rank : the grid of every LoRA method, and the one of the ranks
        ≥ ``large_rank``. With α = 2r the scale s = 2 at every rank, so a larger rank moves more
        directions of ΔW per step and its best rate is lower (the search in
        figures/text_results.md shows it); each grid is centred where its methods' best rate
        lies, so that the chosen rate is inside the grid, not at an end (a claim checks it)
    seeds : the seeds; the first chooses the learning rates
    headline_ranks : the ranks that, with full FT, are run with every seed (the rest once)
    val_windows, test_windows : windows in the validation slice (lr choice) and in each
        held-out test slice (KJV and Austen)
    curve_points : full FT's checkpoints along its run (evenly spaced steps, plus step 0)
    sample_ranks, sample_prompt, sample_chars, temperature, sample_seed : the samples
    spectra_layers : the ΔW whose spectra are drawn (in block ``analysis_block``)
    similarity_ranks, similarity_layers : the two ranks and the layers of the subspace
        similarity figure
    analysis_block : the block the ΔW figures read (None: the middle one)
    workers : processes the runs are spread over (``fair.compare``)
    checkpoint : the pretrained model's file
    """
    steps: int = 300
    batch_size: int = 8
    ranks: tuple = DEFAULT_RANKS
    targets: tuple = LORA_TARGETS
    placement_rank: int = 8
    placements: tuple = tuple(PLACEMENTS)
    lr_full: tuple = (3e-4, 1e-3, 3e-3)
    lr_lora: tuple = (3e-3, 1e-2, 3e-2)
    lr_lora_large: tuple = (1e-3, 3e-3, 1e-2)
    large_rank: int = 32
    seeds: tuple = (0, 1, 2)
    headline_ranks: tuple = (1, 4, 16)
    val_windows: int = 64
    test_windows: int = 128
    curve_points: int = 6
    sample_ranks: tuple = (1, 8, 64)
    sample_prompt: str = "And he said unto her, "
    sample_chars: int = 200
    temperature: float = 0.8
    sample_seed: int = 0
    spectra_layers: tuple = ("attn.q_proj", "attn.v_proj", "mlp.fc1")
    similarity_ranks: tuple = (8, 64)
    similarity_layers: tuple = ("attn.q_proj", "attn.v_proj")
    analysis_block: int | None = None
    workers: int = 2
    checkpoint: str = str(PRETRAINED_PATH)

    def check(self) -> "TextSettings":
        """Self, after checking that the numbers fit together (ValueError/TypeError naming the
        field)."""
        for name in ("steps", "batch_size", "placement_rank", "large_rank", "val_windows", "test_windows",
                     "curve_points", "sample_chars", "workers"):
            check_int(name, getattr(self, name), minimum=1)
        check_number("temperature", self.temperature, nonnegative=True)
        for name in ("ranks", "seeds", "lr_full", "lr_lora", "lr_lora_large", "targets"):
            if not tuple(getattr(self, name)):
                raise ValueError(f"TextSettings.{name} must not be empty")
        for r in (*self.ranks, *self.headline_ranks, *self.sample_ranks, *self.similarity_ranks):
            check_int("rank", r, minimum=1)
        unknown = [p for p in self.placements if p not in PLACEMENTS]
        if unknown:
            raise ValueError(f"placements must be among {list(PLACEMENTS)}, got {unknown}")
        for name in ("headline_ranks", "sample_ranks", "similarity_ranks"):
            missing = [r for r in getattr(self, name) if r not in self.ranks]
            if missing:
                raise ValueError(f"TextSettings.{name}: ranks {missing} are not in ranks {self.ranks}")
        if len(self.similarity_ranks) != 2 or self.similarity_ranks[0] >= self.similarity_ranks[1]:
            raise ValueError(f"similarity_ranks must be two ranks, small then large, got {self.similarity_ranks}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct, got {self.ranks}")
        return self


#: ``--quick``: few steps, few methods, small slices — the whole pipeline in well under a minute
QUICK_SETTINGS = TextSettings(
    steps=40, batch_size=8, ranks=(1, 16), placement_rank=16, placements=("MLP fc1, fc2",),
    lr_full=(1e-3,), lr_lora=(3e-3, 1e-2), seeds=(0, 1), headline_ranks=(1,), val_windows=16,
    test_windows=32, curve_points=4, sample_ranks=(1, 16), sample_chars=80, similarity_ranks=(1, 16))


# --------------------------------------------------------------------------- methods


class MethodSpec(NamedTuple):
    """One method: its name, ``"full"`` or ``"lora"``, the LoRA rank and target layers (None,
    () for full FT), and the learning-rate grid and seeds it gets."""
    name: str
    kind: str
    rank: int | None
    targets: tuple
    lrs: tuple
    seeds: tuple


def lora_name(r: int) -> str:
    return f"LoRA r={r}"


def placement_name(placement: str, r: int) -> str:
    return f"r={r} on {placement}"


def method_specs(settings: TextSettings) -> dict:
    """name -> MethodSpec, in report order: full FT, LoRA by rank, then the placements."""
    s = settings
    seeds = tuple(s.seeds)
    specs = {FULL: MethodSpec(FULL, "full", None, (), tuple(s.lr_full), seeds)}
    for r in sorted(s.ranks):
        specs[lora_name(r)] = MethodSpec(lora_name(r), "lora", r, tuple(s.targets), lora_grid(s, r),
                                         seeds if r in s.headline_ranks else seeds[:1])
    for p in s.placements:
        name = placement_name(p, s.placement_rank)
        specs[name] = MethodSpec(name, "lora", s.placement_rank, PLACEMENTS[p],
                                 lora_grid(s, s.placement_rank), seeds[:1])
    return specs


def lora_grid(settings: TextSettings, r: int) -> tuple:
    """The learning-rate grid of LoRA at rank ``r``: ``lr_lora_large`` from ``large_rank`` up,
    else ``lr_lora``."""
    return tuple(settings.lr_lora_large if r >= settings.large_rank else settings.lr_lora)


# --------------------------------------------------------------------------- data


class TextData(NamedTuple):
    """The token ids every run reads (x, y pairs of (N, context) int arrays)."""
    train: tuple            # KJV train: every window (stride 1), a view of the ids
    val: tuple              # KJV validation slice (the learning rate is chosen on it)
    kjv_test: tuple         # KJV test slice (learning)
    austen_test: tuple      # Austen test slice (forgetting; pretraining never saw it)


def _even_rows(xy, n: int) -> tuple:
    """``n`` windows spread evenly over all of them (all if there are fewer), as arrays."""
    x, y = xy
    rows = np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).round().astype(np.int64))
    return np.ascontiguousarray(x[rows]), np.ascontiguousarray(y[rows])


def load_data(tokenizer, context: int, settings: TextSettings) -> TextData:
    """The experiment's windows of ``context`` characters: every KJV training window (stride 1),
    ``settings.val_windows`` KJV validation windows and ``settings.test_windows`` KJV and Austen
    test windows, evenly spaced (stride ``context``, no overlap with each other)."""
    kjv, austen = load_splits("kjv", tokenizer), load_splits("austen", tokenizer)
    return TextData(train=windows(kjv.train, context, 1),
                 val=_even_rows(windows(kjv.val, context, context), settings.val_windows),
                 kjv_test=_even_rows(windows(kjv.test, context, context), settings.test_windows),
                 austen_test=_even_rows(windows(austen.test, context, context), settings.test_windows))


def _held_out(model, data: TextData) -> dict:
    return {KJV: lm_loss(model, *data.kjv_test), AUSTEN: lm_loss(model, *data.austen_test)}


# --------------------------------------------------------------------------- one run


@dataclass
class TextRun:
    """What one fine-tuning run measured, beside its ``fair.Run`` metrics (see the module
    docstring). ``trained`` holds the trained parameters (name -> array), from which the model
    is rebuilt (``TextResult.model``); ``curve`` is full FT's (step, KJV, Austen) checkpoints
    (empty for LoRA and for seeds other than the first); ``scale`` is LoRA's s."""
    name: str
    trainable_params: int
    state_bytes: int
    ms_per_step: float
    loss_history: list
    val_history: list
    curve: list = field(default_factory=list)
    trained: dict = field(default_factory=dict)
    scale: float | None = None


class _CheckpointingAdam(Adam):
    """Adam that, after every ``every``-th update, measures both held-out losses of the model
    (``(step, KJV, Austen)`` in ``points``) — full FT's checkpoints along its run. The time
    they take is kept in ``seconds`` so that it can be left out of ms/step."""

    def __init__(self, model, lr, every: int, data: TextData):
        super().__init__(model, lr)
        self.every, self.data, self.points, self.seconds = every, data, [], 0.0

    def step(self):
        super().step()
        if self.t % self.every == 0:
            t0 = time.perf_counter()
            held = _held_out(self.model, self.data)
            self.points.append((self.t, held[KJV], held[AUSTEN]))
            self.seconds += time.perf_counter() - t0


def new_model(base, spec: MethodSpec, seed: int):
    """A copy of ``base`` ready to train by ``spec``: everything trainable (full FT), or LoRA of
    rank ``spec.rank`` (α = 2r) on ``spec.targets`` with A drawn from ``init_rng(seed, rank)``."""
    model = copy.deepcopy(base)
    if spec.kind == "lora":
        add_lora(model, spec.targets, r=spec.rank, alpha=2.0 * spec.rank, rng=init_rng(seed, spec.rank))
    return model


def finetune(base, data: TextData, settings: TextSettings, spec: MethodSpec, lr: float, seed: int,
              verbose: bool) -> Run:
    """Fine-tune a copy of ``base`` by ``spec`` at ``lr`` with ``seed``; the fair.Run of it."""
    model = new_model(base, spec, seed)
    curve = spec.kind == "full" and seed == spec.seeds[0]
    every = max(1, settings.steps // settings.curve_points)
    opt = _CheckpointingAdam(model, lr, every, data) if curve else Adam(model, lr)
    label = f"{spec.name} lr {lr:.0e} seed {seed}  "
    hist = train(model, *data.train, steps=settings.steps, lr=lr, optimizer=opt,
                 batch_size=settings.batch_size, schedule="cosine", x_val=data.val[0], y_val=data.val[1],
                 eval_every=settings.steps, val_batch_size=64, rng=batch_rng(seed), verbose=verbose,
                 label=label, loss_fn=F.cross_entropy_loss)
    train_seconds = hist.seconds_per_step * settings.steps - (opt.seconds if curve else 0.0)
    held = _held_out(model, data)
    layers = lora_layers(model)
    details = TextRun(name=spec.name, trainable_params=model.num_parameters(trainable_only=True),
                      state_bytes=measured_training_state_bytes(model, opt),
                      ms_per_step=1e3 * train_seconds / settings.steps,
                      loss_history=hist.loss_history, val_history=hist.val_history,
                      curve=list(opt.points) if curve else [],
                      trained={n: p.copy() for n, p in model.trainable_parameters().items()},
                      scale=next(iter(layers.values())).scale if layers else None)
    return Run(validation=hist.final_val_loss, held_out=held, details=details)


# --------------------------------------------------------------------------- the result


def random_like(M: np.ndarray, rng) -> np.ndarray:
    """A Gaussian matrix of ``M``'s shape and dtype rescaled to ``M``'s Frobenius norm: the
    reference a "low-rank" ΔW is compared with (its spectrum is the Marchenko–Pastur
    quarter-circle, no direction preferred)."""
    G = rng.standard_normal(M.shape)
    return (G * (np.linalg.norm(M) / np.linalg.norm(G))).astype(M.dtype)


@dataclass
class TextResult:
    """The experiment's outcome.

    settings : TextSettings;  specs : name -> MethodSpec;  fair : the ``fair.FairResult``
    (each run's ``details`` a ``TextRun``);  pretrained : the pretrained model's held-out
    losses {"kjv", "austen"} and its validation loss "kjv_val";  meta : the checkpoint's meta;
    config : the model's config;  base, tokenizer : the pretrained model and its tokenizer;
    data : the token windows every run read (train, val, kjv_test, austen_test: (x, y) pairs);
    samples : label -> text;  seconds : wall time.
    """
    settings: TextSettings
    specs: dict
    fair: FairResult
    pretrained: dict
    meta: dict
    config: dict
    base: object
    tokenizer: object
    data: TextData
    samples: dict = field(default_factory=dict)
    seconds: float = 0.0

    full_name = FULL

    # ---- access
    def outcome(self, name: str):
        return self.fair[name]

    def details(self, name: str) -> TextRun:
        """The first seed's run of ``name`` at its chosen learning rate."""
        return self.fair[name].best.details

    def model(self, name: str):
        """``name``'s model after fine-tuning (first seed, chosen lr), rebuilt from the base."""
        spec, run = self.specs[name], self.details(name)
        model = new_model(self.base, spec, self.fair.selection_seed)
        params = model.parameters()
        for n, a in run.trained.items():
            params[n][...] = a
        model.eval()
        return model

    @property
    def ranks(self) -> list:
        return sorted(self.settings.ranks)

    def block_name(self) -> str:
        b = self.settings.analysis_block
        return f"blocks.{self.config['n_layers'] // 2 if b is None else b}"

    # ---- the figures' inputs
    def method_losses(self, name: str) -> dict:
        """{"kjv": Spread, "austen": Spread} of ``name`` over its seeds."""
        o = self.fair[name]
        return {KJV: o.spread(KJV), AUSTEN: o.spread(AUSTEN)}

    def rank_losses(self) -> dict:
        return {r: self.method_losses(lora_name(r)) for r in self.ranks}

    def placement_losses(self) -> dict:
        r = self.settings.placement_rank
        return {f"LoRA {placement_name(p, r)}": self.method_losses(placement_name(p, r))
                for p in self.settings.placements}

    def pretrained_losses(self) -> dict:
        return {KJV: self.pretrained[KJV], AUSTEN: self.pretrained[AUSTEN]}

    def full_curve(self) -> list:
        """(step, KJV, Austen) from step 0 (the pretrained model) along full FT's run."""
        return [(0, self.pretrained[KJV], self.pretrained[AUSTEN])] + list(self.details(FULL).curve)

    def delta_weights(self, name: str) -> dict:
        """ΔW of every adapted (or, for full FT, every) Linear layer of the blocks: full FT's
        ``W − W₀``, LoRA's ``s·B A`` (its own ``delta_weight``)."""
        model = self.model(name)
        if self.specs[name].kind == "lora":
            return {p: m.delta_weight() for p, m in lora_layers(model).items()}
        base = dict(self.base.named_modules())
        return {p: m.W - base[p].W for p, m in model.named_modules()
                if isinstance(m, Linear) and p.startswith("blocks.")}

    def spectra_deltas(self) -> dict:
        """layer -> {"full FT", "LoRA r=…" (the similarity ranks), "random Gaussian"} ΔW."""
        block = self.block_name()
        full = self.delta_weights(FULL)
        loras = {r: self.delta_weights(lora_name(r)) for r in self.settings.similarity_ranks}
        rng = np.random.default_rng(self.fair.selection_seed)
        out = {}
        for layer in self.settings.spectra_layers:
            path = f"{block}.{layer}"
            by = {"full FT": full[path]}
            for r, d in loras.items():
                if path in d:
                    by[f"LoRA r={r}"] = d[path]
            by["random (full FT's shape, norm)"] = random_like(full[path], rng)
            out[path] = by
        return out

    def subspace_factors(self) -> tuple:
        """({layer: A of the small rank}, {layer: A of the large rank}) for the similarity figure."""
        r_small, r_large = self.settings.similarity_ranks
        block = self.block_name()
        small = lora_layers(self.model(lora_name(r_small)))
        large = lora_layers(self.model(lora_name(r_large)))
        paths = [f"{block}.{layer}" for layer in self.settings.similarity_layers]
        paths = [p for p in paths if p in small and p in large]
        return {p: small[p].A.copy() for p in paths}, {p: large[p].A.copy() for p in paths}

    def energy_ranks(self, energy: float = 0.9) -> dict:
        """layer -> (shape, energy rank of full FT's ΔW, its effective rank, the energy rank of
        a random Gaussian matrix of the same shape and norm) for every Linear of the blocks."""
        rng = np.random.default_rng(self.fair.selection_seed)
        out = {}
        for path, dW in self.delta_weights(FULL).items():
            out[path] = (dW.shape, energy_rank(dW, energy), effective_rank(dW),
                         energy_rank(random_like(dW, rng), energy))
        return out


# --------------------------------------------------------------------------- the experiment


def run_text_experiment(settings: TextSettings = TextSettings(), verbose: bool = False) -> TextResult:
    """Run the whole experiment (see the module docstring) and return its ``TextResult``.

    ``verbose``: with one worker, a progress bar per run (train's); with several, one line per
    finished run with the time left (``fair.compare``). Raises ValueError/TypeError for bad
    settings or a missing/corrupt checkpoint (naming the file).
    """
    if not isinstance(settings, TextSettings):
        raise TypeError(f"settings must be a TextSettings, got {type(settings).__name__}")
    s = settings.check()
    t0 = time.perf_counter()
    path = pathlib.Path(s.checkpoint)
    if not path.exists():
        raise ValueError(f"the pretrained model {path} is missing; `python -m lora_np.pretrain` writes it")
    base, tokenizer, meta = load_lm(path)
    base.eval()
    config = base.config()
    too_big = [r for r in s.ranks if r > config["d_model"]]
    if too_big:
        raise ValueError(f"ranks {too_big} are larger than d_model = {config['d_model']}")
    data = load_data(tokenizer, config["context"], s)
    pretrained = dict(_held_out(base, data), kjv_val=lm_loss(base, *data.val))
    specs = method_specs(s)
    quiet_runs = s.workers > 1 or not verbose

    def method(spec):
        return lambda lr, seed: finetune(base, data, s, spec, lr, seed, verbose=not quiet_runs)
    result = compare({n: method(sp) for n, sp in specs.items()}, {n: sp.lrs for n, sp in specs.items()},
                     {n: sp.seeds for n, sp in specs.items()}, workers=s.workers, verbose=verbose)
    out = TextResult(s, specs, result, pretrained, meta, config, base, tokenizer, data)
    out.samples = _samples(out)
    out.seconds = time.perf_counter() - t0
    return out


def _samples(result: TextResult) -> dict:
    """label -> the same prompt continued with the same seed, before and after fine-tuning."""
    s = result.settings
    models = {"pretrained (Austen)": result.base, FULL: result.model(FULL)}
    for r in s.sample_ranks:
        models[lora_name(r)] = result.model(lora_name(r))
    return {label: generate(m, result.tokenizer, s.sample_prompt, s.sample_chars,
                            temperature=s.temperature, rng=s.sample_seed)
            for label, m in models.items()}


# --------------------------------------------------------------------------- reporting


def _table_rows(result: TextResult) -> list:
    rows = []
    for name, spec in result.specs.items():
        o, d = result.fair[name], result.details(name)
        rows.append((name, "all" if spec.kind == "full" else ", ".join(spec.targets), f"{o.lr:.0e}",
                     str(len(o.seeds)), f"{d.trainable_params:,}", f"{d.state_bytes:,}",
                     f"{d.ms_per_step:.0f}", format_spread(o.spread(KJV)), format_spread(o.spread(AUSTEN))))
    return rows


_HEADER = ("method", "LoRA on", "lr", "seeds", "trainable", "state bytes", "ms/step",
           "KJV held-out", "Austen held-out")


def format_text_table(result: TextResult) -> str:
    """The results as plain text: one row per method — learning rate chosen on validation,
    seeds, trainable parameters, training-state bytes, ms/step, and the held-out KJV
    (learning) and Austen (forgetting) losses in nats/char, mean (min–max) over seeds."""
    rows = _table_rows(result)
    pre = ("pretrained", "—", "—", "—", "—", "—", "—", f"{result.pretrained[KJV]:.3f}",
           f"{result.pretrained[AUSTEN]:.3f}")
    rows = [pre] + rows
    widths = [max(len(r[c]) for r in [_HEADER, *rows]) for c in range(len(_HEADER))]

    def line(r):
        return "  ".join(f"{v:<{w}}" if c < 2 else f"{v:>{w}}" for c, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(_HEADER), "-" * len(line(_HEADER)), *map(line, rows)])


def _markdown_table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def format_energy_ranks(result: TextResult, energy: float = 0.9) -> str:
    """Full FT's ΔW, layer by layer: shape, energy rank (``energy`` of ‖ΔW‖²_F), effective
    rank, and the energy rank of a random Gaussian matrix of the same shape and norm."""
    rows = [(p, f"{sh[0]}×{sh[1]}", str(k), f"{er:.1f}", str(kr))
            for p, (sh, k, er, kr) in result.energy_ranks(energy).items()]
    return _markdown_table(("layer", "shape", f"{int(100 * energy)} % energy rank", "effective rank",
                            "random matrix's energy rank"), rows)


def format_samples(result: TextResult) -> str:
    """The samples one after the other, each under its label."""
    s = result.settings
    head = (f"prompt {s.sample_prompt!r}, {s.sample_chars} characters, temperature {s.temperature:g}, "
            f"seed {s.sample_seed}")
    return head + "\n\n" + "\n\n".join(f"--- {label}\n{text}" for label, text in result.samples.items())


def austen_on_full_curve(result: "TextResult", kjv: float) -> tuple:
    """Full FT's held-out Austen loss at the point of its run where its held-out KJV loss was
    ``kjv``: linear between the two checkpoints around it (the first such pair from step 0),
    and whether ``kjv`` lies within the run's KJV range at all (else the nearest checkpoint's).
    The learning–forgetting plane's question: at equal learning, who forgot more?"""
    c = np.asarray(result.full_curve(), dtype=np.float64)          # (n, 3): step, KJV, Austen
    x, y = c[:, 1], c[:, 2]
    for i in range(len(c) - 1):
        lo, hi = sorted((x[i], x[i + 1]))
        if lo <= kjv <= hi:
            t = 0.0 if hi == lo else (kjv - x[i]) / (x[i + 1] - x[i])
            return float(y[i] + t * (y[i + 1] - y[i])), True
    return float(y[np.argmin(np.abs(x - kjv))]), False


#: LoRA from this rank up counts as "high rank" in the claims (the largest rank is compared
#: with full FT when it is at least this)
HIGH_RANK = 32
#: the largest rank the claims call "small" (full FT learns more than LoRA up to it)
SMALL_RANK = 8
#: how close (nats/char) the largest rank's KJV loss must come to full FT's to "catch up"
CATCH_UP = 0.01
#: a rank-this LoRA could not hold 90 % of full FT's ΔW in any layer
NOT_LOW_RANK = 16


def check_text_claims(result: TextResult) -> list:
    """The claims this experiment's measured numbers support, each evaluated on ``result``
    (held-out losses as means over each method's seeds). A claim about methods the run does
    not have (a placement, a rank range) is left out.

    1. every chosen learning rate lies inside its grid (grids of three rates or more): the
       protocol found each method's best rate, not the end of its grid;
    2. full FT learns more than LoRA at every rank ≤ SMALL_RANK (lower held-out KJV loss);
    3. LoRA catches up at high rank: the largest rank (≥ HIGH_RANK) comes within CATCH_UP
       nats/char of full FT's KJV loss;
    4. LoRA at the smallest rank forgets least: the lowest held-out Austen loss of all methods;
    5. at equal learning, the smallest rank forgets less than full FT and every rank ≥
       SMALL_RANK forgets more: below / above full FT's checkpoint curve in the
       learning–forgetting plane (``austen_on_full_curve``);
    6. full FT's ΔW is not low-rank: in every block layer 90 % of ‖ΔW‖²_F needs more than
       NOT_LOW_RANK directions;
    7. nor is it random: its 90 % energy rank is below a Gaussian matrix's of the same shape
       and norm in every layer;
    8. where LoRA goes matters: at the placement rank, LoRA on the MLP alone learns more than
       on all of attention.
    """
    res = result
    kjv = {n: res.fair[n].spread(KJV).mean for n in res.specs}
    aus = {n: res.fair[n].spread(AUSTEN).mean for n in res.specs}
    ranks = res.ranks
    claims = []
    wide = [o for o in res.fair if len(o.grid) >= 3]
    if wide:
        ends = [o.name for o in wide if o.lr in (min(o.grid), max(o.grid))]
        claims.append(Claim("every learning rate chosen on validation lies inside its grid (a smaller and a "
                            "larger rate were both worse)", not ends,
                            f"{len(wide) - len(ends)} of {len(wide)} methods" + (f"; at an end: {', '.join(ends)}" if ends else "")))
    small = [r for r in ranks if r <= SMALL_RANK]
    if small:
        best = min(small, key=lambda r: kjv[lora_name(r)])
        claims.append(Claim(f"full FT learns more than LoRA at every rank r ≤ {SMALL_RANK}: lower held-out KJV loss",
                            all(kjv[FULL] < kjv[lora_name(r)] for r in small),
                            f"full FT {kjv[FULL]:.3f}; best of those LoRA r={best} {kjv[lora_name(best)]:.3f} nats/char"))
    r_max, r_min = ranks[-1], ranks[0]
    if r_max >= HIGH_RANK:
        gap = kjv[lora_name(r_max)] - kjv[FULL]
        claims.append(Claim(f"LoRA catches up at high rank: r={r_max}'s held-out KJV loss is within {CATCH_UP} "
                            "nats/char of full FT's", abs(gap) <= CATCH_UP,
                            f"r={r_max} {kjv[lora_name(r_max)]:.3f} vs full FT {kjv[FULL]:.3f} "
                            f"(gap {gap:+.3f}; r={r_min}: {kjv[lora_name(r_min)] - kjv[FULL]:+.3f})"))
    lo = lora_name(r_min)
    least = min(aus, key=aus.get)
    runner_up = min((n for n in aus if n != lo), key=aus.get)
    claims.append(Claim(f"{lo} forgets least: the lowest held-out Austen loss of every method", least == lo,
                        f"{lo} {aus[lo]:.3f}; next {runner_up} {aus[runner_up]:.3f}; full FT {aus[FULL]:.3f} "
                        f"(pretrained {res.pretrained[AUSTEN]:.3f})"))
    high = [r for r in ranks if r >= SMALL_RANK]
    if r_min < SMALL_RANK and high and res.details(FULL).curve:
        def excess(r):                    # Austen loss above full FT's at the same KJV loss
            ref, _ = austen_on_full_curve(res, kjv[lora_name(r)])
            return aus[lora_name(r)] - ref
        ex = {r: excess(r) for r in [r_min] + high}
        claims.append(Claim(f"at equal learning LoRA r={r_min} forgets less than full FT and LoRA r ≥ {SMALL_RANK} "
                            "forgets more: its Austen loss minus full FT's at the same KJV loss (along full FT's "
                            "checkpoints)", ex[r_min] < 0 and all(ex[r] > 0 for r in high),
                            ", ".join(f"r={r} {v:+.3f}" for r, v in ex.items())))
    er = res.energy_ranks()
    k_min = min(er, key=lambda p: er[p][1])
    claims.append(Claim(f"full FT's ΔW is not low-rank: in every block layer 90 % of ‖ΔW‖²_F needs more than "
                        f"{NOT_LOW_RANK} directions", all(k > NOT_LOW_RANK for _, k, _, _ in er.values()),
                        f"fewest: {k_min} {er[k_min][1]} of {min(er[k_min][0])}; most: "
                        f"{max(k for _, k, _, _ in er.values())}"))
    ratio = {p: k / kr for p, (_, k, _, kr) in er.items()}
    p_max = max(ratio, key=ratio.get)
    claims.append(Claim("nor is it random: its 90 % energy rank is below that of a Gaussian matrix of the same "
                        "shape and norm in every layer", all(v < 1 for v in ratio.values()),
                        f"closest: {p_max} {er[p_max][1]} vs {er[p_max][3]}"))
    mlp = placement_name("MLP fc1, fc2", res.settings.placement_rank)
    attn = placement_name("attention q, k, v, o", res.settings.placement_rank)
    if mlp in res.specs and attn in res.specs:
        claims.append(Claim(f"where LoRA goes matters: at r = {res.settings.placement_rank} the MLP alone learns more "
                            "than all of attention (held-out KJV loss)", kjv[mlp] < kjv[attn],
                            f"MLP {kjv[mlp]:.3f} ({res.details(mlp).trainable_params:,} parameters), attention "
                            f"{kjv[attn]:.3f} ({res.details(attn).trainable_params:,})"))
    return claims


def results_markdown(result: TextResult, claims, command: str) -> str:
    """figures/text_results.md: settings, the table, the learning-rate grid, full FT's energy
    ranks, the claims and the samples."""
    s, c = result.settings, result.config
    meta = result.meta
    lines = [
        "# LoRA on real text: results", "",
        f"Written by `{command}` (lora_np.text_experiment); every number below comes from that run.", "",
        f"Model: {c['n_layers']} causal pre-LN blocks, d_model {c['d_model']}, {c['n_heads']} heads, MLP "
        f"{c['d_hidden']}, context {c['context']}, vocabulary {c['vocab_size']}; "
        f"{result.base.num_parameters():,} parameters, pretrained on Austen"
        + (f" ({meta['steps']} steps)" if isinstance(meta, dict) and "steps" in meta else "") + ".",
        f"Fine-tuning on the KJV's training split: {s.steps} Adam steps of {s.batch_size} windows × "
        f"{c['context']} characters (cosine decay), the same batches for every method; LoRA α = 2r. "
        f"Learning rate per method chosen on {s.val_windows} KJV validation windows with seed "
        f"{result.fair.selection_seed}; held-out losses on {s.test_windows} windows of each test split, "
        f"nats/char (× {NATS_TO_BITS:.3f} for bits/char), mean (min–max) over the seeds shown.", "",
        _markdown_table(_HEADER, [("pretrained", "—", "—", "—", "—", "—", "—", f"{result.pretrained[KJV]:.3f}",
                                   f"{result.pretrained[AUSTEN]:.3f}")] + _table_rows(result)), "",
        "## Learning-rate search (validation loss, first seed)", "", "```text", format_grid(result.fair), "```", "",
        "## Full fine-tuning's ΔW: energy ranks", "", format_energy_ranks(result), "",
        "## Claims", "", "```text", format_claims(claims), "```", "",
        "## Samples", "", "```text", format_samples(result), "```", "",
        f"Total time: {result.seconds:.0f} s ({s.workers} worker processes).",
    ]
    return "\n".join(lines) + "\n"

"""The one training loop: full fine-tuning, LoRA at any rank and every LoRA variant train here.

One step (``train_step``), with ``lr_t`` from the schedule::

    model.zero_grad()
    loss, dY = loss_fn(model(X_batch), Y_batch)       # forward + loss and dL/dY
    model.backward(dY)                               # fills model.gradients()
    optimizer.step()                                 # θ ← θ − lr_t · update(g)

``loss_fn`` is any functional loss pair ``(pred, target) -> (loss, dpred)``: ``mse_loss`` (the
default: regression on the synthetic tasks, float targets) or ``cross_entropy_loss`` (a
language model: integer ids in, integer next-character labels as targets).

``train`` repeats it: it draws mini-batches (a fresh permutation of the rows every epoch),
sets the learning rate of each step (cosine decay by default:
``lr_t = lr · ½(1 + cos(π t / steps))``), records the training loss of every step and the
validation loss every ``eval_every`` steps, and measures the time per step. As soon as the
loss stops being a finite number it stops with ``TrainingDiverged`` (a ValueError that names
the step and carries the history recorded so far). ``verbose=True`` shows a progress bar.

Before its first step ``train`` asks glibc to keep freed arrays in the process
(``machine.tune_allocator_for_training``, once per process): otherwise every step would
page-fault its large arrays back in. ``train_step`` asks for no input gradient
(``backward(dY, need_input_grad=False)``): nothing reads dL/dX.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .machine import tune_allocator_for_training
from .modules import Module, batched_mean_loss, make_rng
from .optim import SGD, Adam, Optimizer
from .validate import check_choice, check_float_array, check_int, check_number

__all__ = ["TrainHistory", "TrainingDiverged", "train", "train_step", "learning_rate", "evaluate",
           "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainHistory:
    """What one call to ``train`` recorded.

    loss_history : list of float, length ``steps``
        Training loss of each step, on that step's mini-batch, before the update.
    val_history : list of (step, float)
        Validation loss after ``step`` updates (step 0 = before training; the last entry is
        after the final step). Empty if no validation data was given.
    seconds_per_step : float
        Wall time of the training steps (forward, backward, update) divided by ``steps``;
        validation and the progress bar are not included.
    optimizer : Optimizer
        The optimizer used (its moments are still there, for ``state_bytes()``).
    """

    loss_history: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    seconds_per_step: float = 0.0
    optimizer: Optimizer | None = None

    @property
    def final_val_loss(self) -> float | None:
        """The last validation loss (None without validation data)."""
        return self.val_history[-1][1] if self.val_history else None


class TrainingDiverged(ValueError):
    """The loss, the validation loss or a parameter stopped being a finite number.

    ``history`` is the TrainHistory up to the last step whose loss was finite; the model holds
    the weights that gave the non-finite value.
    """

    def __init__(self, message: str, history: TrainHistory):
        super().__init__(message)
        self.history = history


def learning_rate(step: int, steps: int, lr: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``.

    ``"constant"``: lr. ``"cosine"``: ``lr · ½ (1 + cos(π · step / steps))`` — lr at step 0,
    decaying smoothly towards 0 (never reaching it) at the last step. Decaying the rate lets
    Adam settle into the minimum instead of jittering around it at a fixed step size.

    ``warmup`` > 0 first ramps the rate up linearly, ``lr · (step + 1) / warmup`` for the first
    ``warmup`` steps, and runs the schedule over the remaining ``steps − warmup`` (cosine:
    ``step → step − warmup``). A transformer trained from scratch needs it: Adam's first
    updates have unit size per weight whatever the gradient, and at full rate they can throw a
    fresh model's attention into saturation before its statistics settle.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def evaluate(model: Module, x: np.ndarray, y: np.ndarray, loss_fn=F.mse_loss,
             batch_size: int | None = None) -> float:
    """``loss_fn(model(x), y)`` in eval mode (no dropout); the model's mode is restored.

    ``batch_size=None``: one forward over all of x. Otherwise the rows are taken in order in
    batches of ``batch_size`` (a large validation set never needs one huge forward) and the
    loss is the row-weighted mean ``Σ_b n_b · loss_b / N`` — the same number as one forward
    for a loss that is a mean over rows of equal size (MSE, cross-entropy), up to rounding.
    """
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, minimum=1)
    if batch_size is not None and batch_size < len(x):
        return batched_mean_loss(model, x, y, loss_fn, batch_size)
    was_training = model.training
    model.eval()
    try:
        return float(loss_fn(model(x), y)[0])
    finally:
        model.train(was_training)


def train_step(model: Module, optimizer: Optimizer, x: np.ndarray, y: np.ndarray,
               loss_fn=F.mse_loss) -> float:
    """One step on the batch (x, y): zero the gradients, forward, loss, backward, update.

    ``loss_fn(pred, y) -> (loss, dpred)``: ``F.mse_loss`` (default) or ``F.cross_entropy_loss``.

    Returns the loss on (x, y) *before* the update. A non-finite loss is returned without a
    backward pass or an update (its gradient would make every weight NaN), so the model keeps
    the weights that produced it; the caller decides what it means (``train`` raises).
    """
    model.zero_grad()
    # overflow / invalid values are not warnings here: the caller sees the non-finite loss
    with np.errstate(over="ignore", invalid="ignore"):
        loss, dY = loss_fn(model(x), y)
        if math.isfinite(loss):
            model.backward(dY, need_input_grad=False)   # dL/dx is read by nobody: not computed
            optimizer.step()
    return float(loss)


# --------------------------------------------------------------------------- the loop


def train(model: Module, x: np.ndarray, y: np.ndarray, *, steps: int = 600, lr: float | None = None,
          optimizer="adam", batch_size: int | None = 256, schedule: str = "cosine", warmup: int = 0,
          x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
          eval_every: int | None = None, val_batch_size: int | None = None, rng=None,
          verbose: bool = False, label: str = "", loss_fn=F.mse_loss) -> TrainHistory:
    """Train ``model``'s trainable parameters on (x, y) with ``loss_fn`` (MSE by default), in place.

    Parameters
    ----------
    model : Module
        Trained in place (only ``model.trainable_parameters()`` change).
    x, y : ndarray
        Training inputs and targets, one example per index of axis 0: (N, ...) each. Floats
        for the MSE loss; for any other ``loss_fn`` they are passed on as they are (a language
        model: x (N, T) token ids, y (N, T) next-token labels — ``lora_np.text.windows``).
    steps : int
        Number of optimizer steps (>= 1).
    lr : float, optional
        Peak learning rate (> 0). Default: 1e-2, or the ``lr`` a ready optimizer was built with.
    optimizer : "adam", "sgd" or an ``Optimizer`` built for ``model``
        A ready optimizer carries its own settings (``Adam(model, lr, weight_decay=0.1)``,
        ``lr_multipliers`` for LoRA+); the schedule sets its ``lr`` before every step.
    batch_size : int or None
        Rows per step; None (or >= N) means full-batch.
    schedule : "cosine" or "constant"
        See ``learning_rate``.
    warmup : int
        Steps of linear warm-up before the schedule (0 <= warmup < steps); see ``learning_rate``.
    x_val, y_val : ndarray, optional
        Validation data; its loss is recorded at step 0, every ``eval_every`` steps (default
        ``max(1, steps // 20)``) and after the last step. Every evaluation reads all of it,
        so for a large validation set pass a fixed subset here and score the rest once at the
        end.
    val_batch_size : int or None
        Rows per validation forward (``evaluate``); None means all rows in one forward.
    rng : Generator, int or None
        Order of the mini-batches (None means seed 0: reproducible).
    verbose : bool
        Show a progress bar (tqdm: steps, elapsed<remaining, loss, lr, validation loss) on
        stderr, prefixed by ``label`` (e.g. ``"LoRA r=4  "``): live in a terminal or in
        Jupyter; in a log file or pipe, one summary line when training stops.
    loss_fn : callable
        ``(pred, target) -> (loss, dpred)``, a mean over the batch: ``F.mse_loss`` (default) or
        ``F.cross_entropy_loss``. Training and validation use it.

    Returns
    -------
    TrainHistory

    Raises
    ------
    TypeError, ValueError
        Bad arguments; nothing is changed.
    TrainingDiverged (a ValueError)
        During training, the loss is not a finite number; the message names the step.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lora_np Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function (pred, target) -> (loss, dpred), got {loss_fn!r}")
    floats = loss_fn is F.mse_loss
    x, y = _check_data("x", x, "y", y, floats)
    has_val = x_val is not None or y_val is not None
    if has_val:
        x_val, y_val = _check_data("x_val", x_val, "y_val", y_val, floats)
        if val_batch_size is not None:
            val_batch_size = check_int("val_batch_size", val_batch_size, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    n = len(x)
    batch_size = n if batch_size is None else min(check_int("batch_size", batch_size, minimum=1), n)
    check_choice("schedule", schedule, SCHEDULES)
    warmup = check_int("warmup", warmup, minimum=0, maximum=steps - 1)
    eval_every = max(1, steps // 20) if eval_every is None else check_int("eval_every", eval_every, minimum=1)
    lr, opt = _optimizer(model, optimizer, lr)

    tune_allocator_for_training()      # glibc keeps freed arrays for the next step (lora_np.machine)
    history = TrainHistory(optimizer=opt)
    if has_val:
        history.val_history.append((0, evaluate(model, x_val, y_val, loss_fn, val_batch_size)))
    batches = _batches(make_rng(rng), n, batch_size)
    model.train()
    elapsed = 0.0
    with _Progress(steps, label, enabled=verbose) as progress:
        for step in range(1, steps + 1):
            idx = next(batches)
            xb, yb = (x, y) if batch_size == n else (x[idx], y[idx])
            opt.lr = learning_rate(step - 1, steps, lr, schedule, warmup)
            t0 = time.perf_counter()
            loss = train_step(model, opt, xb, yb, loss_fn)
            elapsed += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise TrainingDiverged(f"train: the loss became {loss} at step {step} of {steps} "
                                       f"(lr {opt.lr:.3g}); the learning rate is probably too "
                                       "large — lower it and start again from fresh weights", history)
            history.loss_history.append(loss)
            if has_val and (step % eval_every == 0 or step == steps):
                with np.errstate(over="ignore", invalid="ignore"):
                    val = evaluate(model, x_val, y_val, loss_fn, val_batch_size)
                if not math.isfinite(val):
                    raise TrainingDiverged(f"train: the validation loss became {val} after step "
                                           f"{step} of {steps} (lr {opt.lr:.3g}); lower the "
                                           "learning rate", history)
                history.val_history.append((step, val))
            progress.update(loss, opt.lr, history.final_val_loss)
    bad = [name for name, p in model.trainable_parameters().items() if not np.all(np.isfinite(p))]
    if bad:
        raise TrainingDiverged(f"train: parameters {bad} became non-finite at step {steps} of "
                               f"{steps}; lower the learning rate", history)
    history.seconds_per_step = elapsed / steps
    return history


# --------------------------------------------------------------------------- helpers


def _check_data(name_x, x, name_y, y, floats: bool):
    """x, y with one row per example each: float arrays (see ``check_float_array``) if
    ``floats`` (the MSE loss), else arrays as they came (token ids, integer labels)."""
    if floats:
        x, y = check_float_array(name_x, x, finite=False), check_float_array(name_y, y, finite=False)
    else:
        x, y = np.asarray(x), np.asarray(y)
        if x.size == 0 or y.size == 0:
            raise ValueError(f"{name_x} and {name_y} must be non-empty, got shapes {x.shape} and {y.shape}")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(f"{name_x} and {name_y} need the same number of rows along axis 0, "
                         f"got shapes {x.shape} and {y.shape}")
    return x, y


def _optimizer(model, optimizer, lr):
    """(peak lr, optimizer): a ready optimizer as it is (it must hold ``model``), or a new
    ``Adam``/``SGD`` for the names in OPTIMIZERS."""
    if isinstance(optimizer, Optimizer):
        if optimizer.model is not model:
            raise ValueError("optimizer was built for a different model; build it with this model")
        return check_number("lr", optimizer.lr if lr is None else lr, positive=True), optimizer
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be one of {OPTIMIZERS} or an Optimizer, got {optimizer!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an Optimizer, got {optimizer!r}")
    lr = check_number("lr", 1e-2 if lr is None else lr, positive=True)
    return lr, (Adam if optimizer == "adam" else SGD)(model, lr=lr)


def _batches(rng, n, batch_size):
    """Endless stream of row-index arrays: a new permutation of range(n) each epoch, cut into
    batches of ``batch_size`` (the last batch of an epoch may be smaller)."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


class _Progress:
    """``verbose=True``'s report on stderr: a tqdm bar (steps done, elapsed<remaining, loss,
    lr, validation loss), live in a terminal and in Jupyter (``tqdm.auto`` draws a widget).

    A log file or pipe (stderr is not a terminal) would fill with the bar's ``\\r``-joined
    redraws, so there it gets one summary line instead, written when training stops.
    ``enabled=False``: nothing at all.
    """

    def __init__(self, steps: int, label: str, enabled: bool):
        self.steps, self.label, self.step, self.stats = steps, label, 0, ""
        self.enabled, self.bar, self.t0 = enabled, None, time.perf_counter()
        if not enabled:
            return
        # imported here: only a verbose run needs tqdm. tqdm.auto imports tqdm.autonotebook
        # (without its warning), whose tqdm is the Jupyter widget in Jupyter, else the text bar
        import tqdm.auto  # noqa: F401
        from tqdm.autonotebook import tqdm
        from tqdm.std import tqdm as text_tqdm
        if tqdm is not text_tqdm or _is_terminal(sys.stderr):
            self.bar = tqdm(total=steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}{postfix}]")

    def update(self, loss: float, lr: float, val: float | None):
        if not self.enabled:
            return
        self.step += 1
        self.stats = f"loss {loss:.3e}  lr {lr:.2e}" + ("" if val is None else f"  val {val:.3e}")
        if self.bar is not None:
            self.bar.set_postfix_str(self.stats, refresh=False)
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write(f"{self.label}step {self.step}/{self.steps}  {self.stats}  "
                             f"{time.perf_counter() - self.t0:.1f}s\n")
            sys.stderr.flush()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

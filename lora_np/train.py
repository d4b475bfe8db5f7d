"""The one training loop that every method (full fine-tuning, LoRA at any rank) goes through.

One step, with ``lr_t`` from the schedule::

    model.zero_grad()
    loss, dY = loss_fn(model(X_batch), Y_batch)      # forward + loss and dL/dY
    model.backward(dY)                               # fills model.gradients()
    optimizer.step()                                 # θ ← θ − lr_t · update(g)

The loop draws mini-batches (a fresh permutation of the rows every epoch), sets the
learning rate of each step (cosine decay by default: ``lr_t = lr · ½(1 + cos(π t / steps))``),
records the training loss of every step and the validation loss every ``eval_every`` steps,
measures the time per step, prints a progress line on request, and stops with a ValueError
naming the step as soon as the loss stops being a finite number.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from .modules import Module, make_rng
from .optim import SGD, Adam, Optimizer

__all__ = ["TrainHistory", "train", "make_optimizer", "learning_rate", "evaluate",
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
        validation is not included.
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


def make_optimizer(model: Module, name: str = "adam", lr: float = 1e-2, **kwargs) -> Optimizer:
    """``Adam(model, lr, **kwargs)`` for ``"adam"``, ``SGD(model, lr, **kwargs)`` for ``"sgd"``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an Optimizer, got {name!r}")
    return (Adam if name == "adam" else SGD)(model, lr=lr, **kwargs)


def learning_rate(step: int, steps: int, lr: float, schedule: str = "cosine") -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``.

    ``"constant"``: lr. ``"cosine"``: ``lr · ½ (1 + cos(π · step / steps))`` — lr at step 0,
    decaying smoothly towards 0 (never reaching it) at the last step. Decaying the rate lets
    Adam settle into the minimum instead of jittering around it at a fixed step size.
    """
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def evaluate(model: Module, x: np.ndarray, y: np.ndarray, loss_fn=F.mse_loss) -> float:
    """``loss_fn(model(x), y)``'s loss in eval mode (no dropout); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return float(loss_fn(model(x), y)[0])
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- checks


def _check_data(name_x, x, name_y, y):
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(f"{name_x} and {name_y} must be NumPy arrays, got "
                        f"{type(x).__name__} and {type(y).__name__}")
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name_x} and {name_y} need the same number of rows (>= 1) along axis 0, "
                         f"got shapes {x.shape} and {y.shape}")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number, got {lr!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    return float(lr)


def _resolve_optimizer(model, optimizer, lr, weight_decay):
    if isinstance(optimizer, Optimizer):
        if optimizer.model is not model:
            raise ValueError("optimizer was built for a different model; build it with this model")
        return optimizer
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be one of {OPTIMIZERS} or an Optimizer, got {optimizer!r}")
    kwargs = {"weight_decay": weight_decay} if optimizer == "adam" and weight_decay else {}
    if optimizer == "sgd" and weight_decay:
        raise ValueError("weight_decay is an Adam (AdamW) option here; use optimizer='adam'")
    return make_optimizer(model, optimizer, lr, **kwargs)


def _batches(rng, n, batch_size):
    """Endless stream of row-index arrays: a new permutation of range(n) each epoch, cut into
    batches of ``batch_size`` (the last batch of an epoch may be smaller)."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


class _Progress:
    """A progress line on stderr, rewritten in place with ``\\r`` every ``every`` steps on a
    terminal; into a file or pipe (a log, CI) only the last step's line, so that a log does not
    fill with ``\\r``-joined lines."""

    def __init__(self, label, steps, every, stream):
        self.label, self.steps, self.every, self.stream = label, steps, every, stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def update(self, step, loss, lr, val=None):
        if step != self.steps and (step % self.every or not self.live):
            return
        back = "\r" if self.live else ""            # back to the start of the terminal line
        text = (f"{back}{self.label}step {step:>{len(str(self.steps))}}/{self.steps}  "
                f"loss {loss:.3e}  lr {lr:.2e}")
        if val is not None:
            text += f"  val {val:.3e}"
        self.stream.write(text + f"  {time.perf_counter() - self.t0:5.1f}s")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


# --------------------------------------------------------------------------- the loop


def train(model: Module, x: np.ndarray, y: np.ndarray, *, steps: int = 600, lr: float | None = None,
          optimizer="adam", batch_size: int | None = 256, schedule: str = "cosine",
          weight_decay: float = 0.0, x_val: np.ndarray | None = None,
          y_val: np.ndarray | None = None, eval_every: int | None = None,
          loss_fn=F.mse_loss, rng=None, verbose: bool = False, print_every: int | None = None,
          label: str = "", stream=None) -> TrainHistory:
    """Train ``model``'s trainable parameters on (x, y) in place and return the history.

    Parameters
    ----------
    model : Module
        Trained in place (only ``model.trainable_parameters()`` change).
    x, y : ndarray
        Training inputs and targets, one example per index of axis 0: (N, ...) each.
    steps : int
        Number of optimizer steps (>= 1).
    lr : float, optional
        Peak learning rate (> 0). Default: 1e-2, or the ``lr`` a ready optimizer was built with.
    optimizer : "adam", "sgd" or an ``Optimizer`` built for ``model``
        The schedule sets the optimizer's ``lr`` attribute before every step.
    batch_size : int or None
        Rows per step; None (or >= N) means full-batch.
    schedule : "cosine" or "constant"
        See ``learning_rate``.
    weight_decay : float
        AdamW's decoupled weight decay (Adam only).
    x_val, y_val : ndarray, optional
        Validation data; its loss is recorded at step 0, every ``eval_every`` steps and after
        the last step.
    eval_every : int, optional
        Default: ``max(1, steps // 20)``.
    loss_fn : callable (pred, target) -> (loss, dpred)
        Default ``functional.mse_loss``; ``functional.cross_entropy_loss`` works too.
    rng : Generator, int or None
        Order of the mini-batches (None means seed 0: reproducible).
    verbose : bool
        Print a progress line to ``stream`` (default stderr) every ``print_every`` steps
        (default ``max(1, steps // 20)``), rewritten in place with ``\\r``.
    label : str
        Prefix of the progress line, e.g. ``"LoRA r=4  "``.

    Returns
    -------
    TrainHistory

    Raises
    ------
    ValueError
        Bad arguments (nothing is changed), or — during training — the loss is not a finite
        number; the message names the step. The model then holds the weights of that step.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lora_np Module, got {type(model).__name__}")
    _check_data("x", x, "y", y)
    steps = _check_int("steps", steps, 1)
    if lr is None:
        lr = optimizer.lr if isinstance(optimizer, Optimizer) else 1e-2
    lr = _check_lr(lr)
    n = len(x)
    batch_size = n if batch_size is None else min(_check_int("batch_size", batch_size, 1), n)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    has_val = x_val is not None or y_val is not None
    if has_val:
        _check_data("x_val", x_val, "y_val", y_val)
    eval_every = max(1, steps // 20) if eval_every is None else _check_int("eval_every", eval_every, 1)
    print_every = max(1, steps // 20) if print_every is None else _check_int("print_every", print_every, 1)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (pred, target) -> (loss, dpred), got {loss_fn!r}")
    rng = make_rng(rng)
    opt = _resolve_optimizer(model, optimizer, lr, weight_decay)

    history = TrainHistory(optimizer=opt)
    if has_val:
        history.val_history.append((0, evaluate(model, x_val, y_val, loss_fn)))
    progress = _Progress(label, steps, print_every, stream or sys.stderr) if verbose else None
    batches = _batches(rng, n, batch_size)
    model.train()
    elapsed = 0.0
    try:
        for step in range(1, steps + 1):
            idx = next(batches)
            xb, yb = (x, y) if batch_size == n else (x[idx], y[idx])
            t0 = time.perf_counter()
            opt.lr = learning_rate(step - 1, steps, lr, schedule)
            model.zero_grad()
            # overflow / invalid values are not warnings here: they are caught below as a
            # non-finite loss and reported as an error that names the step
            with np.errstate(over="ignore", invalid="ignore"):
                loss, dpred = loss_fn(model(xb), yb)
                if not math.isfinite(loss):
                    raise ValueError(f"train: the loss became {loss} at step {step} of {steps} "
                                     f"(lr {opt.lr:.3g}); the learning rate is probably too "
                                     "large — lower it and start again from fresh weights")
                model.backward(dpred)
                opt.step()
            elapsed += time.perf_counter() - t0
            history.loss_history.append(float(loss))
            val = None
            if has_val and (step % eval_every == 0 or step == steps):
                with np.errstate(over="ignore", invalid="ignore"):
                    val = evaluate(model, x_val, y_val, loss_fn)
                if not math.isfinite(val):
                    raise ValueError(f"train: the validation loss became {val} after step {step} "
                                     f"of {steps} (lr {opt.lr:.3g}); lower the learning rate")
                history.val_history.append((step, val))
            if progress:
                progress.update(step, loss, opt.lr, val)
    finally:
        if progress:
            progress.close()
    bad = [name for name, p in model.trainable_parameters().items() if not np.all(np.isfinite(p))]
    if bad:
        raise ValueError(f"train: parameters {bad} became non-finite at step {steps} of {steps}; "
                         "lower the learning rate")
    history.seconds_per_step = elapsed / steps
    return history

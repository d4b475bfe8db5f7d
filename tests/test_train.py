"""The training loop: it learns, records, reproduces, schedules, reports progress, and stops
with an error naming the step when the loss stops being finite."""

import io
import math
import re
import sys

import numpy as np
import pytest

from conftest import Snapshot
from lora_np import MLP, SGD, Adam, Linear, add_lora
from lora_np import functional as F
from lora_np.train import TrainHistory, TrainingDiverged, evaluate, learning_rate, train, train_step


def _problem(seed=0, n=64, d=6, dtype=np.float64):
    rng = np.random.default_rng(seed)
    teacher = MLP(d, 8, 3, activation="tanh", rng=rng, dtype=dtype)
    x = rng.standard_normal((n, d)).astype(dtype)
    return x, teacher(x)


def _model(seed=1, dtype=np.float64):
    return MLP(6, 8, 3, activation="tanh", rng=seed, dtype=dtype)


def test_training_lowers_the_loss_and_records_history():
    x, y = _problem()
    model = _model()
    before = F.mse_loss(model(x), y)[0]
    h = train(model, x, y, steps=200, lr=2e-2, batch_size=16, x_val=x, y_val=y, eval_every=50)
    assert isinstance(h, TrainHistory)
    assert len(h.loss_history) == 200
    assert [s for s, _ in h.val_history] == [0, 50, 100, 150, 200]
    assert h.val_history[0][1] == pytest.approx(before)
    assert h.final_val_loss == pytest.approx(F.mse_loss(model(x), y)[0])
    assert h.final_val_loss < 0.05 * before, f"{h.final_val_loss:.2e} vs {before:.2e}"
    assert h.seconds_per_step > 0
    assert isinstance(h.optimizer, Adam)


def test_same_rng_same_result_bit_for_bit():
    x, y = _problem()
    runs = []
    for _ in range(2):
        m = _model()
        h = train(m, x, y, steps=30, batch_size=10, rng=5)
        runs.append((m.fc1.W.copy(), h.loss_history))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    m = _model()
    h = train(m, x, y, steps=30, batch_size=10, rng=6)            # other batch order
    assert h.loss_history != runs[0][1]


def test_full_batch_and_batches_cover_every_row_each_epoch():
    x, y = _problem(n=10)
    m = _model()
    seen = []
    real_forward = m.forward

    def spy(xb):
        seen.append(len(xb))
        return real_forward(xb)

    object.__setattr__(m, "forward", spy)
    train(m, x, y, steps=6, batch_size=4)                         # epochs of 4 + 4 + 2 rows
    assert seen == [4, 4, 2, 4, 4, 2]
    seen.clear()
    train(m, x, y, steps=2, batch_size=None)
    assert seen == [10, 10]


def test_cosine_schedule_sets_the_optimizer_lr():
    assert learning_rate(0, 100, 0.1) == 0.1
    assert learning_rate(50, 100, 0.1) == pytest.approx(0.05)
    assert 0 < learning_rate(99, 100, 0.1) < 1e-4
    assert learning_rate(99, 100, 0.1, "constant") == 0.1
    x, y = _problem()
    m = _model()
    h = train(m, x, y, steps=10, lr=0.1)
    assert h.optimizer.lr == pytest.approx(learning_rate(9, 10, 0.1))


def test_only_trainable_parameters_change_with_lora():
    x, y = _problem()
    m = add_lora(_model(), ["fc1"], r=2, alpha=4, rng=0)
    W1, W2 = m.fc1.W.copy(), m.fc2.W.copy()
    train(m, x, y, steps=20, lr=1e-2)
    np.testing.assert_array_equal(m.fc1.W, W1)
    np.testing.assert_array_equal(m.fc2.W, W2)
    assert np.abs(m.fc1.B).max() > 0


def test_sgd_and_a_ready_optimizer():
    x, y = _problem()
    m = _model()
    h = train(m, x, y, steps=5, lr=0.05, optimizer="sgd")
    assert isinstance(h.optimizer, SGD)
    m = _model()
    opt = Adam(m, lr=3e-3)
    h = train(m, x, y, steps=5, optimizer=opt, schedule="constant")
    assert h.optimizer is opt and opt.lr == 3e-3 and opt.t == 5


def test_float32_stays_float32():
    x, y = _problem(dtype=np.float32)
    m = _model(dtype=np.float32)
    train(m, x, y, steps=5, lr=1e-2, x_val=x, y_val=y)
    assert all(p.dtype == np.float32 for p in m.parameters().values())


def test_non_finite_loss_names_the_step():
    x, y = _problem()
    m = _model()
    with pytest.raises(ValueError, match=r"at step \d+ of 50"):
        train(m, x, y, steps=50, lr=1e150, optimizer="sgd", schedule="constant")


def test_nan_in_the_data_is_caught_at_step_1():
    x, y = _problem()
    y = y.copy()
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="loss became nan at step 1 of 3"):
        train(_model(), x, y, steps=3, batch_size=None)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_is_one_summary_line(monkeypatch):
    """Into a file or pipe a live bar would write \r-joined redraws: one line at the end instead."""
    x, y = _problem()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    train(_model(), x, y, steps=40, verbose=True, label="demo ", x_val=x, y_val=y, eval_every=10)
    text = log.getvalue()
    assert text.startswith("demo step 40/40  loss ") and text.count("\n") == 1 and "\r" not in text
    assert "  lr " in text and "  val " in text


def test_progress_bar_in_a_terminal(monkeypatch):
    x, y = _problem()
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    train(_model(), x, y, steps=40, verbose=True, label="demo ", x_val=x, y_val=y)
    text = tty.getvalue()
    assert "\r" in text and text.endswith("\n")               # redrawn in place, then left
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("demo 100%|") and "| 40/40 [" in last and "<00:00" in last   # ETA
    assert "loss " in last and "val " in last


def test_progress_uses_tqdm_auto_so_jupyter_gets_its_widget(monkeypatch):
    """In Jupyter tqdm.auto picks the notebook bar (tqdm.autonotebook.tqdm); it must be used
    although stderr is no terminal there."""
    import tqdm.autonotebook
    import tqdm.std
    made = []

    class NotebookBar(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.autonotebook, "tqdm", NotebookBar)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    x, y = _problem()
    train(_model(), x, y, steps=5, verbose=True)
    assert len(made) == 1 and made[0]["total"] == 5


def test_no_progress_unless_verbose(capsys):
    x, y = _problem()
    train(_model(), x, y, steps=5, x_val=x, y_val=y)
    assert capsys.readouterr() == ("", "")


def test_a_diverged_run_stops_the_bar_and_carries_its_history(monkeypatch):
    x, y = _problem()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with pytest.raises(TrainingDiverged, match=r"at step \d+ of 50") as info:
        train(_model(), x, y, steps=50, lr=1e150, optimizer="sgd", schedule="constant", verbose=True)
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert isinstance(info.value, ValueError)
    assert len(info.value.history.loss_history) == step - 1
    assert all(math.isfinite(v) for v in info.value.history.loss_history)
    assert log.getvalue().startswith(f"step {step - 1}/50  loss ")


def test_train_step_returns_the_loss_before_the_update():
    x, y = _problem()
    m = _model()
    opt = SGD(m, lr=0.1)
    before = F.mse_loss(m(x), y)[0]
    assert train_step(m, opt, x, y) == before
    assert F.mse_loss(m(x), y)[0] < before


def test_train_step_does_not_update_on_a_non_finite_loss():
    x, y = _problem()
    y = y.copy()
    y[0, 0] = np.inf
    m = _model()
    before = {name: p.copy() for name, p in m.parameters().items()}
    assert train_step(m, SGD(m, lr=0.1), x, y) == np.inf
    for name, p in m.parameters().items():
        np.testing.assert_array_equal(p, before[name], err_msg=name)


def test_evaluate_restores_the_mode():
    x, y = _problem()
    m = _model()
    m.train()
    assert math.isfinite(evaluate(m, x, y))
    assert m.training
    m.eval()
    evaluate(m, x, y)
    assert not m.training


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"steps": 2.5}, TypeError, "steps must be an int"),
    ({"lr": -1.0}, ValueError, "lr must be"),
    ({"lr": float("nan")}, ValueError, "lr must be"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"schedule": "step"}, ValueError, "schedule"),
    ({"optimizer": "lbfgs"}, ValueError, "optimizer must be one of"),
    ({"optimizer": 3}, TypeError, "optimizer must be"),
    ({"x_val": np.zeros((3, 6))}, ValueError, "x_val and y_val"),
    ({"eval_every": 0}, ValueError, "eval_every"),
    ({"eval_every": 1.5}, TypeError, "eval_every must be an int"),
    ({"optimizer": Adam(Linear(6, 3, rng=0), lr=1e-3)}, ValueError, "different model"),
])
def test_bad_arguments_leave_the_model_unchanged(kwargs, error, match):
    x, y = _problem()
    m = _model()
    snap = Snapshot(m)
    if "x_val" in kwargs:
        kwargs = dict(kwargs, y_val=np.zeros((4, 3)))
    with pytest.raises(error, match=match):
        train(m, x, y, **kwargs)
    snap.assert_unchanged()


def test_bad_data_and_model():
    x, y = _problem()
    with pytest.raises(ValueError, match="same number of rows"):
        train(_model(), x, y[:-1])
    with pytest.raises(TypeError, match="x must be a real float32/float64 array"):
        train(_model(), x.astype(complex), y)
    with pytest.raises(ValueError, match="need the same number of rows"):
        train(_model(), np.float64(1.0), y)
    with pytest.raises(TypeError, match="lora_np Module"):
        train(lambda v: v, x, y)
    with pytest.raises(TypeError, match="unexpected keyword argument 'weight_decay'"):
        train(_model(), x, y, weight_decay=0.1)         # a ready Adam(model, lr, weight_decay=…) instead


def test_lists_are_data_too():
    x, y = _problem()
    a, b = _model(), _model()
    assert train(a, x.tolist(), y.tolist(), steps=3).loss_history == train(b, x, y, steps=3).loss_history


# ------------------------------------------------------------ any loss: cross-entropy, warm-up


def _classes(seed=0, n=96, d=5, C=4):
    """Float inputs and integer class labels (N,) from a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, np.argmax(x @ rng.standard_normal((d, C)), axis=1)


def test_cross_entropy_trains_on_integer_labels():
    x, y = _classes()
    m = Linear(5, 4, rng=0)
    before = F.cross_entropy_loss(m(x), y)[0]
    h = train(m, x, y, steps=150, lr=5e-2, batch_size=16, x_val=x, y_val=y, eval_every=50,
              loss_fn=F.cross_entropy_loss)
    assert h.val_history[0][1] == pytest.approx(before)
    assert h.final_val_loss == pytest.approx(F.cross_entropy_loss(m(x), y)[0])
    assert h.final_val_loss < 0.5 * before
    now = F.cross_entropy_loss(m(x), y)[0]
    assert train_step(m, SGD(m, lr=0.1), x, y, F.cross_entropy_loss) == now     # before the update
    assert F.cross_entropy_loss(m(x), y)[0] < now


def test_a_language_model_trains_on_token_windows():
    from lora_np.text.corpus import windows
    from lora_np.text.model import LanguageModel
    ids = np.tile(np.arange(5, dtype=np.int32), 40)                 # 0 1 2 3 4 0 1 2 …
    x, y = windows(ids, context=8, stride=1)
    m = LanguageModel(5, d_model=8, n_heads=2, n_layers=1, d_hidden=16, context=8, rng=0)
    h = train(m, x, y, steps=60, lr=3e-2, batch_size=8, warmup=5, x_val=x[:16], y_val=y[:16],
              loss_fn=F.cross_entropy_loss)
    assert h.val_history[0][1] > 1.4 and h.final_val_loss < 0.1     # ln 5 = 1.61 -> next id known


def test_validation_in_batches_is_the_row_weighted_mean():
    x, y = _classes(n=50)
    m = Linear(5, 4, rng=0)
    whole = evaluate(m, x, y, F.cross_entropy_loss)
    for bs in (1, 7, 49):
        assert evaluate(m, x, y, F.cross_entropy_loss, batch_size=bs) == pytest.approx(whole, rel=1e-12)
    assert evaluate(m, x, y, F.cross_entropy_loss, batch_size=50) == whole      # one forward
    xr, yr = _problem()
    mr = _model()
    assert evaluate(mr, xr, yr, batch_size=10) == pytest.approx(evaluate(mr, xr, yr), rel=1e-12)
    h1 = train(Linear(5, 4, rng=0), x, y, steps=20, x_val=x, y_val=y, val_batch_size=7,
               loss_fn=F.cross_entropy_loss)
    h2 = train(Linear(5, 4, rng=0), x, y, steps=20, x_val=x, y_val=y, loss_fn=F.cross_entropy_loss)
    assert h1.loss_history == h2.loss_history
    assert [v for _, v in h1.val_history] == pytest.approx([v for _, v in h2.val_history], rel=1e-12)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(m, x, y, batch_size=0)


def test_warmup_then_the_schedule():
    assert [learning_rate(s, 10, 1.0, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, 10, 1.0, warmup=4) == 1.0                          # cosine starts
    assert learning_rate(7, 10, 1.0, warmup=4) == pytest.approx(0.5)           # half way
    assert learning_rate(9, 10, 1.0, "constant", warmup=4) == 1.0
    for s in range(10):                                                         # warmup=0 as before
        assert learning_rate(s, 10, 0.1, warmup=0) == 0.1 * 0.5 * (1.0 + math.cos(math.pi * s / 10))
    x, y = _problem()
    seen = []
    opt = Adam(_model(), lr=1.0)
    real_step = opt.step

    def spy():
        seen.append(opt.lr)
        real_step()

    object.__setattr__(opt, "step", spy)
    train(opt.model, x, y, steps=6, optimizer=opt, lr=0.1, warmup=2)
    assert seen == [learning_rate(s, 6, 0.1, warmup=2) for s in range(6)] and seen[0] == 0.05


@pytest.mark.parametrize("kwargs, error, match", [
    ({"warmup": 3}, ValueError, r"warmup must be in \[0, 2\]"),
    ({"warmup": -1}, ValueError, "warmup must be in"),
    ({"val_batch_size": 0, "x_val": "x", "y_val": "y"}, ValueError, "val_batch_size must be >= 1"),
    ({"loss_fn": "mse"}, TypeError, "loss_fn must be a function"),
])
def test_bad_loss_schedule_arguments(kwargs, error, match):
    x, y = _problem()
    m = _model()
    snap = Snapshot(m)
    kwargs = {k: (x if v == "x" else y if v == "y" else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        train(m, x, y, steps=3, **kwargs)
    snap.assert_unchanged()


def test_integer_data_for_a_loss_that_takes_it():
    x, y = _classes()
    with pytest.raises(ValueError, match="must be non-empty"):
        train(Linear(5, 4, rng=0), x[:0], y[:0], loss_fn=F.cross_entropy_loss)
    with pytest.raises(ValueError, match="same number of rows"):
        train(Linear(5, 4, rng=0), x, y[:-1], loss_fn=F.cross_entropy_loss)

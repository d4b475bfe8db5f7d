"""lora_np.fair: the learning rate is chosen on validation (never on held-out data), every
method gets the same seeds and so the same batches, results are mean and range over seeds, a
diverging rate loses the selection; checked on stand-in methods and on the synthetic MLP task."""

import math

import numpy as np
import pytest

import lora_np.train as train_module
from lora_np import add_lora
from lora_np.fair import (FairResult, Run, Spread, batch_rng, compare, format_grid, format_spread,
                          init_rng, spread)
from lora_np.tasks import mlp_task
from lora_np.train import TrainingDiverged, train


def _quadratic(best_val, best_test, calls=None, name="m"):
    """A stand-in method: validation is smallest at lr = best_val, the held-out metric at
    lr = best_test (so choosing on the wrong one shows); held-out "seed" records the seed."""
    def fn(lr, seed):
        if calls is not None:
            calls.append((name, lr, seed))
        return Run(validation=(math.log10(lr) - math.log10(best_val)) ** 2,
                   held_out={"test": (math.log10(lr) - math.log10(best_test)) ** 2 + seed,
                             "seed": float(seed)})
    return fn


GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def test_lr_is_chosen_on_validation_not_on_held_out_data():
    res = compare({"a": _quadratic(1e-2, 1e-3), "b": _quadratic(1e-4, 1e-1)}, GRID, seeds=(0,))
    assert res["a"].lr == 1e-2 and res["b"].lr == 1e-4
    # the held-out metric would have chosen differently: it is recorded, not used
    a_test = {lr: r.held_out["test"] for lr, r in res["a"].grid.items()}
    assert min(a_test, key=a_test.get) == 1e-3
    assert list(res["a"].grid) == list(GRID)


def test_every_method_gets_the_same_seeds_and_the_grid_uses_the_first():
    calls = []
    methods = {n: _quadratic(1e-2, 1e-2, calls, n) for n in ("full", "lora")}
    res = compare(methods, {"full": (1e-3, 1e-2), "lora": GRID}, seeds=(3, 1, 2))
    grid_calls = [c for c in calls if c[2] == 3]
    assert grid_calls == [("full", 1e-3, 3), ("full", 1e-2, 3)] + [("lora", lr, 3) for lr in GRID]
    for name in methods:
        assert [(lr, s) for n, lr, s in calls if n == name and s != 3] == [(1e-2, 1), (1e-2, 2)]
        o = res[name]
        assert o.seeds == (3, 1, 2) and o.runs[0] is o.grid[o.lr]          # no rerun of seed 3
        assert [r.held_out["seed"] for r in o.runs] == [3.0, 1.0, 2.0]
    assert res.selection_seed == 3 and res.names == ["full", "lora"] and len(res) == 2


def test_mean_and_range_over_seeds():
    res = compare({"m": _quadratic(1e-2, 1e-2)}, GRID, seeds=(0, 4, 2))
    s = res["m"].spread("seed")
    assert s == Spread(2.0, 0.0, 4.0, 3)
    assert res["m"].summary["seed"] == s and set(res["m"].summary) == {"test", "seed"}
    assert res["m"].spread("validation") == Spread(0.0, 0.0, 0.0, 3)
    assert format_spread(s, ".2f") == "2.00 (0.00–4.00)"
    assert format_spread(spread([1.5]), ".1f") == "1.5"
    with pytest.raises(KeyError, match="'nope'"):
        res["m"].spread("nope")


def test_seeds_per_method_share_the_first_seed():
    calls = []
    res = compare({"head": _quadratic(1e-2, 1e-2, calls, "head"), "rest": _quadratic(1e-2, 1e-2, calls, "rest")},
                  GRID, seeds={"head": (0, 1, 2), "rest": (0,)})
    assert res["head"].spread("seed").n == 3 and res["rest"].spread("seed").n == 1
    assert len(calls) == 2 * len(GRID) + 2
    with pytest.raises(ValueError, match="first seed must be the same"):
        compare({"a": _quadratic(1, 1), "b": _quadratic(1, 1)}, GRID, seeds={"a": (0, 1), "b": (1, 0)})


def test_a_diverging_rate_loses_and_all_diverging_is_an_error():
    def fn(lr, seed):
        if lr > 1e-2 or (seed == 7 and lr == 1e-2):
            raise TrainingDiverged("boom", None)
        return Run(validation=-lr, held_out={"test": lr})     # larger lr would win if it ran
    res = compare({"m": fn}, GRID, seeds=(0, 7), verbose=True)
    o = res["m"]
    assert o.lr == 1e-2 and o.grid[1e-1].diverged and o.grid[1e-1].validation == math.inf
    assert o.runs[1].diverged and o.runs[1].held_out == {"test": math.inf}    # a diverged seed shows
    assert o.spread("test").high == math.inf
    assert "diverged" in format_grid(res) and "1e-02: -0.0100*" in format_grid(res)
    assert "(the" not in format_grid(res)                    # 1e-2 is inside the grid
    with pytest.raises(ValueError, match="diverged at every learning rate"):
        compare({"m": fn}, (1.0, 2.0), seeds=(0,))


def test_verbose_prints_one_line_per_run(capsys):
    compare({"m": _quadratic(1e-2, 1e-2)}, (1e-3, 1e-2), seeds=(0, 1), verbose=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith("fair [1/3, 0:00 elapsed, ~0:00 left]: m: lr 0.001, seed 0: validation")
    assert err[2].startswith("fair [3/3") and "lr 0.01, seed 1" in err[2]


def _slow_method(lr, seed):
    """Module level, deterministic: what a worker process computes must equal this process's."""
    rng = np.random.default_rng([seed, int(round(1e6 * lr))])
    return Run(validation=float(abs(np.log10(lr) + 2) + 0.01 * rng.random()),
               held_out={"test": float(rng.random()), "pid_free": float(seed)}, details=rng.random(3))


def test_worker_processes_give_the_same_result():
    methods = {"a": _slow_method, "b": lambda lr, seed: _slow_method(lr * 10, seed)}     # a closure too
    one = compare(methods, GRID, seeds=(0, 1, 2))
    two = compare(methods, GRID, seeds=(0, 1, 2), workers=2)
    for name in methods:
        assert one[name].lr == two[name].lr
        for r1, r2 in zip(one[name].runs + list(one[name].grid.values()),
                          two[name].runs + list(two[name].grid.values())):
            assert (r1.validation, r1.held_out) == (r2.validation, r2.held_out)
            assert np.array_equal(r1.details, r2.details)
    assert two["a"].lr == 1e-2 and two["b"].lr == 1e-3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(methods={}), TypeError, "non-empty dict"),
    (dict(methods={"m": 3}), TypeError, "functions"),
    (dict(lrs=()), ValueError, "at least one learning rate"),
    (dict(lrs=(1e-3, -1.0)), ValueError, r"lrs\[1\]"),
    (dict(lrs=(1e-3, 1e-3)), ValueError, "distinct"),
    (dict(lrs="1e-3"), TypeError, "sequence of learning rates"),
    (dict(lrs={"x": (1e-3,)}), ValueError, r"missing \['m'\]"),
    (dict(seeds=()), ValueError, "at least one seed"),
    (dict(seeds=(0, 0)), ValueError, "distinct seeds"),
    (dict(seeds=(0, 1.5)), TypeError, r"seeds\[1\]"),
    (dict(seeds=(-1,)), ValueError, "seeds"),
    (dict(workers=0), ValueError, "workers"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, error, match):
    calls = []
    args = dict(methods={"m": _quadratic(1e-2, 1e-2, calls)}, lrs=GRID, seeds=(0,))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        compare(args.pop("methods"), **args)
    assert calls == []


def test_a_method_must_return_a_run():
    with pytest.raises(TypeError, match="must return a lora_np.fair.Run, got float"):
        compare({"m": lambda lr, seed: 1.0}, GRID, seeds=(0,))
    with pytest.raises(TypeError, match="FairResult"):
        format_grid({"m": 1})


def test_seeded_streams():
    assert np.array_equal(batch_rng(3).permutation(50), np.random.default_rng([3, 1]).permutation(50))
    assert np.array_equal(init_rng(3, 8).standard_normal(4), np.random.default_rng([3, 2, 8]).standard_normal(4))
    assert not np.array_equal(init_rng(3, 8).standard_normal(4), init_rng(3, 16).standard_normal(4))
    with pytest.raises(TypeError, match="seed"):
        batch_rng(1.0)


# --------------------------------------------------------------------------- on a real task


@pytest.fixture(scope="module")
def task():
    return mlp_task(0, 4, n_train=256, n_val=256, n_old=128)


def _methods(task, record):
    """Full FT and LoRA r=4 on fc1, 40 Adam steps of 64 rows; validation on the first half of
    task B's validation rows, held out: the second half and task A (forgetting)."""
    x_val, y_val, x_test, y_test = task.x_val[:128], task.y_val[:128], task.x_val[128:], task.y_val[128:]

    def run(model, lr, seed, name):
        record[name] = []
        hist = train(model, task.x_train, task.y_train, steps=40, lr=lr, batch_size=64,
                     x_val=x_val, y_val=y_val, rng=batch_rng(seed))
        model.eval()
        return Run(validation=hist.final_val_loss,
                   held_out={"test": task.loss(model, x_test, y_test), "old": task.old_task_loss(model)},
                   details=hist)

    def full(lr, seed):
        return run(task.new_model(), lr, seed, ("full", lr, seed))

    def lora(lr, seed):
        model = add_lora(task.new_model(), ["fc1"], r=4, alpha=8, rng=init_rng(seed, 4))
        return run(model, lr, seed, ("lora", lr, seed))
    return {"full FT": full, "LoRA r=4": lora}


def test_on_the_mlp_task_same_batches_and_a_sensible_choice(task, monkeypatch):
    record = {}
    real_batches = train_module._batches

    def logged_batches(rng, n, batch_size):       # what every training run saw, in order
        log = list(record.values())[-1]            # the run that just started
        for idx in real_batches(rng, n, batch_size):
            log.append(idx.copy())
            yield idx
    monkeypatch.setattr(train_module, "_batches", logged_batches)
    lrs = {"full FT": (1e-3, 1e-2, 1e-1), "LoRA r=4": (1e-3, 1e-2, 1e-1)}
    res = compare(_methods(task, record), lrs, seeds=(0, 1, 2))
    assert isinstance(res, FairResult) and res.seconds > 0
    for seed in (0, 1, 2):
        seen = [b for (name, lr, s), b in record.items() if s == seed]
        assert len(seen) >= 2 and all(len(b) == 40 for b in seen)
        for b in seen[1:]:                                    # every method, every lr: the same batches
            assert all(np.array_equal(u, v) for u, v in zip(seen[0], b))
    assert not all(np.array_equal(u, v) for u, v in zip(record[("full", 1e-3, 0)], record[("full", res["full FT"].lr, 1)]))
    for o in res:
        vals = {lr: r.validation for lr, r in o.grid.items()}
        assert o.lr == min(vals, key=vals.get)
        s = o.spread("test")
        assert s.n == 3 and s.low <= s.mean <= s.high and s.low < s.high
        # the seed-0 run at the chosen rate is the grid run (rerunning it gives the same numbers)
        again = _methods(task, {})[o.name](o.lr, 0)
        assert again.held_out == o.runs[0].held_out
    # on this task LoRA at the true rank changes task A's outputs less than full FT
    assert res["LoRA r=4"].spread("old").mean < res["full FT"].spread("old").mean
    text = format_grid(res)
    assert text.count("*") == 1 + 2 and "full FT" in text        # the header's and one per method
    for o in res:
        flagged = [ln for ln in text.splitlines() if ln.startswith(o.name)][0].endswith("rate of the grid)")
        assert flagged == (o.lr in (1e-3, 1e-1))

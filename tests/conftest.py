"""Shared helpers for the core tests: finite-difference checks and an "object unchanged" snapshot.

Every gradient check in the test suite goes through ``assert_grad_close`` or
``assert_module_grads`` below, which

* compare the analytic gradient with ``lora_np.gradcheck.numerical_gradient`` (centered
  differences, float64) and require ``rel_error <= 1e-7``,
* require the analytic gradient not to be all zeros (a zero gradient hides a wrong formula),
* record the error, so that the end of the run prints how many gradient checks ran and the
  worst relative error among them (``pytest -q`` shows it in the terminal summary).
"""

from __future__ import annotations

import os

# One BLAS thread for the whole test run, set before NumPy is first imported (an explicit
# OPENBLAS_NUM_THREADS etc. is respected). The tests multiply small matrices, for which a second
# thread only adds synchronisation, and on a busy machine OpenBLAS's spinning threads slow the
# whole run down several-fold. `python -m lora_np` and the notebook kernels make the same choice.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest

from lora_np import lora_layers
from lora_np.gradcheck import check_gradients, numerical_gradient, rel_error
from lora_np.lora import randomize_lora

THRESHOLD = 1e-7

#: (test id, gradient name, relative error) for every finite-difference check that ran
GRAD_RECORDS: list[tuple[str, str, float]] = []


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]


def assert_grad_close(name, analytic, f, x, dout=None):
    """Check one gradient: ``analytic`` against the centered difference of ``f`` w.r.t. ``x``.

    ``f()`` reads ``x`` (perturbed in place and restored); with ``dout`` it may return an array
    and the checked scalar is ``Σ f() ⊙ dout``. Returns the relative error.
    """
    assert analytic is not None, f"{name}: backward returned None"
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != {x.shape}"
    norm = float(np.linalg.norm(analytic))
    assert norm > 0, f"{name}: analytic gradient is all zeros (degenerate point hides bugs)"
    num = numerical_gradient(f, x, dout=dout)
    err = rel_error(analytic, num)
    GRAD_RECORDS.append((_current_test(), name, err))
    assert err <= THRESHOLD, f"{name} rel_error {err:.1e} > {THRESHOLD:.0e}"
    return err


def assert_module_grads(module, x, expect=None):
    """``check_gradients`` on ``module`` (every trainable parameter on its own, and the input),
    with every row asserted. ``expect``, if given, is the exact set of checked names (so a test
    states which parameters it means to check). Returns the rows."""
    for name, p in module.parameters().items():
        assert p.dtype == np.float64, f"{name} is {p.dtype}; gradient checks run in float64"
    for path, m in lora_layers(module).items():
        assert m.scale != 1.0, f"{path}: scale is 1, pick alpha so that s != 1"
        assert np.all(m.B != 0), f"{path}: B has zeros; randomize it (B = 0 is degenerate)"
    rows = check_gradients(module, x, threshold=THRESHOLD)
    names = {r.name for r in rows}
    if expect is not None:
        assert names == set(expect), f"checked {sorted(names)}, expected {sorted(expect)}"
    assert "x" in names
    bad = []
    for r in rows:
        if r.structural_zero:
            bad += [] if r.passed else [f"{r.name}: |grad| {r.grad_norm:.1e}, max|a-n| {r.max_abs_error:.1e}"]
            continue
        GRAD_RECORDS.append((_current_test(), r.name, r.rel_error))
        if r.grad_norm == 0:
            bad.append(f"{r.name}: analytic gradient is all zeros")
        elif not (r.rel_error <= THRESHOLD and r.passed):
            bad.append(f"{r.name} rel_error {r.rel_error:.1e} > {THRESHOLD:.0e}")
    assert not bad, "; ".join(bad)
    return rows


def randomize(model, rng, b_scale=0.5):
    """Move a model off every degenerate point: random non-zero LoRA ``B``, random biases and
    LayerNorm gains/shifts (``b = 0``, ``γ = 1``, ``β = 0`` at init)."""
    if lora_layers(model):
        randomize_lora(model, rng, std=b_scale)
    for name, p in model.parameters().items():
        last = name.rsplit(".", 1)[-1]
        if last in ("gamma",):
            p[...] = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif last in ("beta", "b"):
            p[...] = 0.1 * rng.standard_normal(p.shape)
    return model


class Snapshot:
    """Everything a failed call must leave as it was: parameter names, values (bit for bit),
    which are trainable, the module tree's types, the LoRA layers, and each module's stored
    forward state."""

    def __init__(self, model):
        self.model = model
        self.params = {n: p.copy() for n, p in model.parameters().items()}
        self.ids = {n: id(p) for n, p in model.parameters().items()}
        self.trainable = sorted(model.trainable_parameters())
        self.grads = {n: g.copy() for n, g in model.gradients().items()}
        self.tree = [(p, type(m).__name__) for p, m in model.named_modules()]
        self.lora = sorted(lora_layers(model))
        self.state = [(p, id(m.__dict__.get("_cache")), m.__dict__.get("_out_shape"))
                      for p, m in model.named_modules()]

    def assert_unchanged(self):
        m = self.model
        now = m.parameters()
        assert sorted(now) == sorted(self.params), "parameter names changed"
        for n, p in now.items():
            assert np.array_equal(p, self.params[n]), f"{n} changed"
            assert id(p) == self.ids[n], f"{n} was replaced by a new array"
        assert sorted(m.trainable_parameters()) == self.trainable, "trainable set changed"
        grads = m.gradients()
        assert sorted(grads) == sorted(self.grads), "gradient names changed"
        for n, g in grads.items():
            assert np.array_equal(g, self.grads[n]), f"gradient {n} changed"
        assert [(p, type(x).__name__) for p, x in m.named_modules()] == self.tree, "module tree changed"
        assert sorted(lora_layers(m)) == self.lora, "LoRA layers changed"
        assert [(p, id(x.__dict__.get("_cache")), x.__dict__.get("_out_shape"))
                for p, x in m.named_modules()] == self.state, "stored forward state changed"


@pytest.fixture(scope="session")
def default_sweep():
    """The default MLP rank sweep, exactly what `python -m lora_np` runs (run once per session
    and shared by tests/test_experiments.py and tests/test_readme.py)."""
    from lora_np.experiments import rank_sweep
    return rank_sweep()


@pytest.fixture(scope="session")
def default_attention_sweep():
    """The default attention rank sweep, exactly what `python -m lora_np --model attention` runs
    (600 steps, every default rank; run once per session)."""
    from lora_np.experiments import attention_sweep
    return attention_sweep()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_terminal_summary(terminalreporter):
    if not GRAD_RECORDS:
        return
    worst = max(GRAD_RECORDS, key=lambda r: r[2])
    terminalreporter.write_line(
        f"gradient checks: {len(GRAD_RECORDS)} finite-difference comparisons, worst relative "
        f"error {worst[2]:.2e} ({worst[1]} in {worst[0]}); threshold {THRESHOLD:.0e}")

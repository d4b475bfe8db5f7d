"""Tests for lora_np.gradcheck: the finite-difference checker itself (known derivatives,
rel_error's properties, check_gradients' verdicts) and the ``python -m lora_np.gradcheck`` command."""

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import randomize

import lora_np.functional as F
from lora_np import Linear, LoRALinear, MLP, lora_layers
from lora_np import gradcheck as gc
from lora_np.gradcheck import check_gradients, format_table, numerical_gradient, rel_error

# ---------------------------------------------------------------------------------------------
# numerical_gradient on functions with known derivatives
# ---------------------------------------------------------------------------------------------


def test_numerical_gradient_of_sum_of_cubes(rng):
    x = rng.standard_normal((3, 4))
    num = numerical_gradient(lambda: np.sum(x**3), x)
    # round-off is ≈ ε_mach·|f|/h ≈ 1e-9 absolute per entry (|f| ≈ 10): relative to the array, tiny
    assert rel_error(num, 3 * x**2) < 1e-9
    np.testing.assert_allclose(num, 3 * x**2, rtol=0, atol=1e-8)


def test_numerical_gradient_of_a_quadratic_form(rng):
    """f = xᵀ M x  ->  ∇f = (M + Mᵀ) x; centered differences are exact for quadratics up to round-off."""
    M, x = rng.standard_normal((5, 5)), rng.standard_normal(5)
    num = numerical_gradient(lambda: x @ M @ x, x)
    np.testing.assert_allclose(num, (M + M.T) @ x, rtol=1e-8)


def test_numerical_gradient_contracts_array_outputs_with_dout(rng):
    x, dout = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    num = numerical_gradient(lambda: np.sin(x), x, dout=dout)
    np.testing.assert_allclose(num, np.cos(x) * dout, rtol=1e-8, atol=1e-10)


def test_numerical_gradient_restores_x_exactly(rng):
    x = rng.standard_normal((4, 3))
    x0 = x.copy()
    numerical_gradient(lambda: np.sum(np.exp(x)), x)
    np.testing.assert_array_equal(x, x0)


def test_centered_difference_error_is_second_order(rng):
    """Error ∝ h² for a smooth function: shrinking h by 10 shrinks the error by ~100."""
    x = rng.standard_normal(6)
    exact = np.cos(x)
    e1 = rel_error(numerical_gradient(lambda: np.sum(np.sin(x)), x, h=1e-2), exact)
    e2 = rel_error(numerical_gradient(lambda: np.sum(np.sin(x)), x, h=1e-3), exact)
    assert 50 < e1 / e2 < 200


@pytest.mark.parametrize("x", [np.ones(3, dtype=np.float32), [1.0, 2.0], np.arange(3)],
                         ids=["float32", "list", "int"])
def test_numerical_gradient_needs_a_float64_array(x):
    with pytest.raises(TypeError, match="needs a float64 array"):
        numerical_gradient(lambda: 0.0, x)


# ---------------------------------------------------------------------------------------------
# rel_error
# ---------------------------------------------------------------------------------------------


def test_rel_error_properties(rng):
    a, n = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    assert rel_error(a, a) == 0.0
    assert rel_error(a, -a) == pytest.approx(1.0, rel=1e-15)             # opposite: the maximum
    assert rel_error(a, np.zeros_like(a)) == pytest.approx(1.0, rel=1e-15)
    assert rel_error(a, n) == rel_error(n, a)                              # symmetric
    assert 0.0 <= rel_error(a, n) <= 1.0
    assert rel_error(1e-8 * a, 1e-8 * n) == pytest.approx(rel_error(a, n), rel=1e-12)   # scale-free
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0                      # no 0/0
    assert rel_error(1.0, 1.0 + 2e-9) == pytest.approx(1e-9, rel=1e-6)


def test_rel_error_is_per_array_not_per_entry():
    """A tiny true entry with round-off noise does not make the whole gradient 'wrong'."""
    a = np.array([1.0, 1e-12])
    n = np.array([1.0, 2e-12])
    assert rel_error(a, n) < 1e-11


def test_rel_error_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"shapes differ, \(3,\) vs \(4,\)"):
        rel_error(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------------------------------------
# check_gradients
# ---------------------------------------------------------------------------------------------


def test_check_gradients_passes_a_correct_module(rng):
    layer = randomize(LoRALinear(Linear(5, 4, rng=rng), r=2, alpha=3.0, rng=rng), rng)
    x = rng.standard_normal((3, 5))
    x0 = x.copy()
    rows = check_gradients(layer, x)
    assert [r.name for r in rows] == ["A", "B", "x"]
    assert [r.shape for r in rows] == [(2, 5), (4, 2), (3, 5)]
    assert all(r.passed and r.rel_error <= 1e-7 and r.grad_norm > 0 for r in rows)
    np.testing.assert_array_equal(x, x0)                       # the caller's x is not touched
    layer.backward(np.ones((3, 4)))                            # a fresh forward state is left


def test_check_gradients_fails_a_wrong_backward(rng, monkeypatch):
    right = F.linear_backward
    monkeypatch.setattr(F, "linear_backward",
                        lambda dy, cache: (lambda dx, dW, db: (dx, dW, 1.1 * db))(*right(dy, cache)))
    lin = randomize(Linear(4, 3, rng=rng), rng)
    rows = {r.name: r for r in check_gradients(lin, rng.standard_normal((5, 4)))}
    assert not rows["b"].passed and rows["b"].rel_error > 1e-2
    assert rows["W"].passed and rows["x"].passed


def test_check_gradients_flags_an_all_zero_gradient(rng):
    """B = 0: the true dA is 0 and so is the computed one; rel_error 0, but not a pass."""
    layer = LoRALinear(Linear(5, 4, rng=rng), r=2, alpha=3.0, rng=rng)
    rows = {r.name: r for r in check_gradients(layer, rng.standard_normal((3, 5)))}
    assert rows["A"].rel_error == 0.0 and rows["A"].grad_norm == 0.0 and not rows["A"].passed
    assert rows["B"].passed


def test_check_gradients_needs_a_float64_module():
    lin = Linear(3, 2, dtype=np.float32)
    with pytest.raises(TypeError, match="float64 module; W is float32"):
        check_gradients(lin, np.ones((2, 3)))


def test_format_table_lists_every_row(rng):
    mlp = randomize(MLP(3, 4, 2, rng=rng), rng)
    text = format_table(check_gradients(mlp, rng.standard_normal((2, 3))), title="MLP")
    lines = text.splitlines()
    assert lines[0] == "MLP" and "rel_error" in lines[1]
    for name in ("fc1.W", "fc1.b", "fc2.W", "fc2.b", "x"):
        assert any(line.split()[0] == name and line.rstrip().endswith("yes") for line in lines[2:])


# ---------------------------------------------------------------------------------------------
# the command students run
# ---------------------------------------------------------------------------------------------


def test_standard_cases_are_non_degenerate():
    cases = gc.standard_cases()
    titles = [t for t, _, _ in cases]
    for needle in ("Linear", "LoRALinear r=1", "PiSSA init", "DoRALinear", "MLP gelu", "MLP tanh", "MLP relu", "causal=False",
                   "causal=True", "TransformerBlock causal (full)", "TransformerBlock + LoRA"):
        assert any(needle in t for t in titles), f"no standard case for {needle!r}"
    for title, model, x in cases:
        for path, m in lora_layers(model).items():
            assert np.all(m.B != 0), f"{title}: {path}.B has zeros"
            assert m.scale != 1.0, f"{title}: {path} has scale 1"


def test_python_m_lora_np_gradcheck_exits_0_and_prints_the_summary():
    proc = subprocess.run([sys.executable, "-m", "lora_np.gradcheck"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"^(\d+) gradients checked, worst relative error (\S+) \(threshold 1e-07\); 0 failed$",
                  proc.stdout, re.M)
    assert m, proc.stdout[-500:]
    assert int(m.group(1)) >= 50 and float(m.group(2)) <= 1e-7
    assert "k_proj.b (=0)" in proc.stdout                      # the key bias row is shown
    assert " NO" not in proc.stdout


def test_gradcheck_main_fails_on_a_planted_bug(monkeypatch, capsys):
    right = F.lora_linear_backward

    def wrong(dy, cache):
        dx, dA, dB = right(dy, cache)
        return dx, dA, dB.T.T * 0.5                            # half of dB
    monkeypatch.setattr(F, "lora_linear_backward", wrong)
    assert gc.main() == 1
    out = capsys.readouterr().out
    assert re.search(r"\d+ gradients checked, .*; [1-9]\d* failed", out)
    assert "FAILED LoRALinear r=1" in out and ": B" in out

"""Tests for lora_np.gradcheck: the finite-difference checker itself (known derivatives,
rel_error's properties, check_gradients' verdicts) and the ``python -m lora_np.gradcheck`` command."""

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import randomize

import lora_np.functional as F
from lora_np import DoRALinear, Linear, LoRALinear, MLP, MultiHeadAttention, add_lora, lora_layers
from lora_np import gradcheck as gc
from lora_np.gradcheck import check_gradients, format_table, numerical_gradient, rel_error


def plant(monkeypatch, name, change):
    """Plant a bug: ``F.<name>`` returns ``change(*results)`` (arguments passed through as they come)."""
    right = getattr(F, name)
    monkeypatch.setattr(F, name, lambda *args, **kwargs: change(*right(*args, **kwargs)))


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
    plant(monkeypatch, "linear_backward", lambda dx, dW, db: (dx, dW, 1.1 * db))
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


def test_check_gradients_names_why_a_wrong_gradient_fails(rng, monkeypatch):
    plant(monkeypatch, "linear_backward", lambda dx, dW, db: (dx, dW, 1.1 * db))
    rows = {r.name: r for r in check_gradients(randomize(Linear(4, 3, rng=rng), rng),
                                               rng.standard_normal((5, 4)))}
    assert re.fullmatch(r"rel_error \d\.\de-\d\d > threshold 1e-07", rows["b"].reason), rows["b"].reason
    assert rows["W"].reason == "" and rows["x"].reason == ""


def test_check_gradients_names_a_degenerate_zero_gradient(rng):
    rows = {r.name: r for r in check_gradients(LoRALinear(Linear(5, 4, rng=rng), r=2, alpha=3.0, rng=rng),
                                               rng.standard_normal((3, 5)))}
    assert "all zeros, and so is the numerical one" in rows["A"].reason
    assert "randomize_lora" in rows["A"].reason


def test_check_gradients_names_a_missing_gradient(rng, monkeypatch):
    """A backward that forgets db: the analytic gradient is 0 but the true one is not."""
    plant(monkeypatch, "linear_backward", lambda dx, dW, db: (dx, dW, 0 * db))
    rows = {r.name: r for r in check_gradients(randomize(Linear(4, 3, rng=rng), rng),
                                               rng.standard_normal((5, 4)))}
    assert not rows["b"].passed
    assert rows["b"].reason.startswith("the analytic gradient is all zeros but the numerical one is not")


def test_check_gradients_fails_a_nan_gradient(rng, monkeypatch):
    """NaN > threshold is False: a NaN gradient used to pass with an empty reason."""
    plant(monkeypatch, "linear_backward", lambda dx, dW, db: (dx, dW, db * np.nan))
    rows = {r.name: r for r in check_gradients(randomize(Linear(4, 3, rng=rng), rng),
                                               rng.standard_normal((5, 4)))}
    assert not rows["b"].passed and rows["b"].reason == "the analytic gradient has NaN or inf entries"


def test_structural_zero_is_a_field_and_says_why_it_fails(rng, monkeypatch):
    mha = randomize(MultiHeadAttention(8, 2, rng=rng), rng)
    rows = {r.name: r for r in check_gradients(mha, rng.standard_normal((2, 3, 8)))}
    assert "k_proj.b" in rows                                      # the name carries no marker
    assert rows["k_proj.b"].structural_zero and rows["k_proj.b"].passed
    assert not any(r.structural_zero for n, r in rows.items() if n != "k_proj.b")
    # claim that q_proj.b is structurally zero: its real gradient must fail the row, saying why
    monkeypatch.setattr(mha, "known_zero_gradients", lambda: {"q_proj.b"})
    row = next(r for r in check_gradients(mha, rng.standard_normal((2, 3, 8))) if r.name == "q_proj.b")
    assert row.structural_zero and not row.passed
    assert re.fullmatch(r"structurally zero, but ‖analytic‖ = \S+ > 1e-12 and "
                        r"max \|numerical\| = \S+ > 1e-07", row.reason), row.reason


# ---------------------------------------------------------------------------------------------
# what check_gradients refuses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_check_gradients_refuses_dropout_in_training_mode(rng, cls):
    layer = randomize(cls(Linear(6, 5, rng=rng), r=2, alpha=3.0, dropout=0.3, rng=rng), rng)
    x = rng.standard_normal((4, 6))
    state = layer._rng.bit_generator.state                         # the layer's mask generator
    params = {n: p.copy() for n, p in layer.parameters().items()}
    with pytest.raises(ValueError, match=r"has dropout 0\.3 in training mode.*dropout to 0.*"
                                         r"dropout_mask=mask"):
        check_gradients(layer, x)
    assert layer._rng.bit_generator.state == state                 # refused before any forward
    for n, p in layer.parameters().items():
        np.testing.assert_array_equal(p, params[n])
    layer.dropout = 0.0                                            # the advice works
    assert all(r.passed for r in check_gradients(layer, x))


def test_check_gradients_names_the_layer_with_dropout_deep_in_a_model(rng):
    mlp = add_lora(MLP(5, 7, 4, rng=rng), ["fc2"], r=2, alpha=5.0, dropout=0.1, rng=rng)
    with pytest.raises(ValueError, match=r"^check_gradients: fc2 \(LoRALinear\) has dropout 0\.1"):
        check_gradients(mlp, rng.standard_normal((3, 5)))


def test_check_gradients_refuses_eval_mode(rng):
    layer = randomize(LoRALinear(Linear(6, 5, rng=rng), r=2, alpha=3.0, dropout=0.3, rng=rng), rng)
    layer.eval()
    with pytest.raises(ValueError, match=r"LoRALinear is in eval mode.*call module\.train\(\)"):
        check_gradients(layer, rng.standard_normal((4, 6)))
    assert not layer.training


def test_check_gradients_refuses_a_random_forward(rng, monkeypatch):
    """Any forward that is not a function of x — here noise added by a patched linear_forward."""
    noise = np.random.default_rng(0)
    plant(monkeypatch, "linear_forward", lambda y, cache: (y + 1e-3 * noise.standard_normal(y.shape), cache))
    with pytest.raises(ValueError, match=r"forward\(x\) gave two different outputs for the same x "
                                         r"\(max \|difference\| \S+\).*deterministic"):
        check_gradients(randomize(Linear(4, 3, rng=rng), rng), rng.standard_normal((5, 4)))


def test_check_gradients_refuses_a_forward_that_changes_x(rng, monkeypatch):
    right = F.linear_forward

    def changes_x(x, *args, **kwargs):
        out = right(x, *args, **kwargs)
        x *= 1.5
        return out
    monkeypatch.setattr(F, "linear_forward", changes_x)
    with pytest.raises(ValueError, match=r"forward\(x\) changed its input x in place"):
        check_gradients(randomize(Linear(4, 3, rng=rng), rng), rng.standard_normal((5, 4)))


def test_check_gradients_tolerates_round_off_between_two_forwards(rng, monkeypatch):
    """A BLAS that is not bit-reproducible differs by round-off between calls: not refused."""
    right, calls = F.linear_forward, []

    def jitter(*args, **kwargs):
        y, c = right(*args, **kwargs)
        calls.append(1)
        return y * (1 + 1e-15 * (len(calls) % 2)), c
    monkeypatch.setattr(F, "linear_forward", jitter)
    rows = check_gradients(randomize(Linear(4, 3, rng=rng), rng), rng.standard_normal((5, 4)))
    assert all(r.passed for r in rows)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"threshold": -1e-7}, ValueError, r"threshold must be .*> 0"),
    ({"threshold": "1e-7"}, TypeError, r"threshold must be a number"),
    ({"h": 0.0}, ValueError, r"h must be .*> 0"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"check_input": "yes"}, TypeError, "check_input must be True or False"),
    ({"x": np.array([[1.0, np.nan, 0.0, 0.0]])}, ValueError, r"x must be .*finite"),
    ({"x": np.zeros((0, 4))}, ValueError, r"x must .*(empty|non-empty)"),
], ids=["threshold<0", "threshold-str", "h=0", "seed-float", "check_input-str", "x-nan", "x-empty"])
def test_check_gradients_validates_its_arguments(rng, kwargs, error, match):
    lin = randomize(Linear(4, 3, rng=rng), rng)
    kwargs = {"x": rng.standard_normal((2, 4)), **kwargs}
    with pytest.raises(error, match=match):
        check_gradients(lin, **kwargs)


def test_check_gradients_needs_a_module():
    with pytest.raises(TypeError, match="needs a lora_np Module, got function"):
        check_gradients(lambda x: x, np.ones((2, 3)))


def test_format_table_lists_every_row(rng):
    mlp = randomize(MLP(3, 4, 2, rng=rng), rng)
    text = format_table(check_gradients(mlp, rng.standard_normal((2, 3))), title="MLP")
    lines = text.splitlines()
    assert lines[0] == "MLP" and "rel_error" in lines[1]
    for name in ("fc1.W", "fc1.b", "fc2.W", "fc2.b", "x"):
        assert any(line.split()[0] == name and line.rstrip().endswith("yes") for line in lines[2:])


def test_format_table_marks_structural_zeros_and_says_why_rows_failed(rng, monkeypatch):
    mha = randomize(MultiHeadAttention(8, 2, rng=rng), rng)
    text = format_table(check_gradients(mha, rng.standard_normal((2, 3, 8))))
    line = next(line for line in text.splitlines() if line.split()[0] == "k_proj.b")
    assert line.split()[1:3] == ["(8,)", "=0"] and line.endswith("yes")
    assert "=0: true gradient 0 for every input; passes when |grad| <= 1e-12" in text
    assert "FAILED" not in text
    plant(monkeypatch, "linear_backward", lambda dx, dW, db: (dx, dW, 1.1 * db))
    text = format_table(check_gradients(randomize(Linear(4, 3, rng=rng), rng), rng.standard_normal((5, 4))))
    assert "=0" not in text                                         # no legend without a structural zero
    assert re.search(r"^  FAILED b: rel_error \S+ > threshold 1e-07$", text, re.M), text


# ---------------------------------------------------------------------------------------------
# the command students run
# ---------------------------------------------------------------------------------------------


def test_standard_cases_are_non_degenerate():
    cases = gc.standard_cases()
    titles = [t for t, _, _ in cases]
    for needle in ("Linear", "LoRALinear r=1", "PiSSA init", "DoRALinear", "MLP gelu", "MLP tanh", "MLP relu", "causal=False",
                   "causal=True", "TransformerBlock causal (full)", "TransformerBlock + LoRA",
                   "Embedding (full)", "LoRAEmbedding", "LanguageModel (full)",
                   "LanguageModel + LoRA on every linear and tok_emb"):
        assert any(needle in t for t in titles), f"no standard case for {needle!r}"
    for title, model, x in cases:
        for path, m in lora_layers(model).items():
            assert np.all(m.B != 0), f"{title}: {path}.B has zeros"
            assert m.scale != 1.0, f"{title}: {path} has scale 1"
        if np.issubdtype(x.dtype, np.integer):        # token ids: every id occurs, some repeat
            V = getattr(model, "vocab_size", None) or model.num_embeddings
            assert set(np.unique(x)) == set(range(V)) and x.size > V, title
    lm = next(m for t, m, _ in cases if t.startswith("LanguageModel + LoRA"))
    assert {type(m).__name__ for m in lora_layers(lm).values()} == {"LoRALinear", "LoRAEmbedding"}
    assert "tok_emb" in lora_layers(lm) and "head" in lora_layers(lm)
    assert len(lora_layers(lm)) == 1 + 6 * lm.n_layers + 1


def test_python_m_lora_np_gradcheck_exits_0_and_prints_the_summary():
    proc = subprocess.run([sys.executable, "-m", "lora_np.gradcheck"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"^(\d+) gradients checked \((\d+) structural zeros\), worst relative error (\S+) "
                  r"\(threshold 1e-07\); 0 failed$", proc.stdout, re.M)
    assert m, proc.stdout[-500:]
    # the key bias: one attention, two blocks ... and the tiny language model's two blocks
    assert int(m.group(1)) >= 50 and int(m.group(2)) == 5 and float(m.group(3)) <= 1e-7
    # the key bias row is shown, marked =0 in the rel_error column (not in its name)
    assert re.search(r"^  k_proj\.b +\(8,\) +=0 +\S+ +\S+  yes$", proc.stdout, re.M)
    assert "(=0)" not in proc.stdout
    assert " NO" not in proc.stdout


def test_python_m_lora_np_gradcheck_help_prints_help_and_runs_nothing():
    proc = subprocess.run([sys.executable, "-m", "lora_np.gradcheck", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m lora_np.gradcheck") and "--threshold" in proc.stdout
    assert "gradients checked" not in proc.stdout and "parameter" not in proc.stdout


@pytest.mark.parametrize("argv, match", [(["--bogus"], "unrecognized arguments: --bogus"),
                                         (["--threshold", "-1"], "expected a number > 0, got '-1'"),
                                         (["--threshold", "nan"], "expected a number > 0, got 'nan'")])
def test_gradcheck_main_rejects_bad_flags_with_usage(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gc.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m lora_np.gradcheck") and match in err


def test_gradcheck_main_threshold_is_used(monkeypatch, capsys):
    """--threshold sets every row's bound: 1e-12 is below round-off, so rows fail, saying why."""
    first = gc.standard_cases()[:1]                                # Linear (full): W, b, x
    monkeypatch.setattr(gc, "standard_cases", lambda: first)
    assert gc.main(["--threshold", "1e-12"]) == 1
    out = capsys.readouterr().out
    assert "(threshold 1e-12); 3 failed" in out
    assert re.search(r"^  FAILED Linear \(full\): W: rel_error \S+ > threshold 1e-12$", out, re.M)


def test_gradcheck_main_fails_on_a_planted_bug(monkeypatch, capsys):
    """A bug planted in functional.lora_linear_backward, as notebook 03 plants one, is caught
    (so LoRALinear must look the function up in functional when it runs backward)."""
    plant(monkeypatch, "lora_linear_backward", lambda dx, dA, dB, *rest: (dx, dA, 0.5 * dB, *rest))
    assert gc.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\d+ gradients checked .*; [1-9]\d* failed", out)
    assert re.search(r"^  FAILED LoRALinear r=1 \(scale 3\.00\): B: rel_error \S+ > threshold 1e-07$",
                     out, re.M)


def test_standard_cases_use_the_public_randomize_lora(monkeypatch):
    """The checker moves B off zero with lora_np.randomize_lora, the helper a user calls too."""
    import lora_np.lora as lora_mod
    calls = []
    right = lora_mod.randomize_lora
    monkeypatch.setattr(lora_mod, "randomize_lora", lambda model, rng=None, std=0.5:
                        calls.append(type(model).__name__) or right(model, rng, std))
    gc.standard_cases()
    assert not hasattr(gc, "_randomize_lora")
    assert calls.count("LoRALinear") == 2 and "DoRALinear" in calls and "MLP" in calls


# ---------------------------------------------------------------------------------------------
# integer inputs (token ids)
# ---------------------------------------------------------------------------------------------


def test_integer_token_ids_are_kept_as_integers_without_an_input_check():
    from lora_np import Embedding
    emb = Embedding(5, 3, rng=0)
    ids = np.array([[0, 4, 4], [1, 0, 2]])
    rows = check_gradients(emb, ids, check_input=False)
    assert [r.name for r in rows] == ["W"] and rows[0].passed
    np.testing.assert_array_equal(ids, [[0, 4, 4], [1, 0, 2]])      # the caller's ids untouched
    assert [r.name for r in check_gradients(emb, ids)] == ["W"]   # the default for token-id modules
    with pytest.raises(TypeError, match="idx must be an integer array of ids, got dtype float64"):
        check_gradients(emb, ids, check_input=True)   # forcing the input check makes x float64


def test_integer_x_of_a_float_module_is_still_promoted(rng):
    lin = Linear(3, 2, rng=0)
    rows = check_gradients(lin, np.arange(6).reshape(2, 3))
    assert {r.name for r in rows} == {"W", "b", "x"} and all(r.passed for r in rows)
    with pytest.raises(TypeError, match="float array, got dtype int64"):
        check_gradients(lin, np.arange(6).reshape(2, 3), check_input=False)


def test_empty_integer_ids_raise():
    from lora_np import Embedding
    with pytest.raises(ValueError, match="x must be a non-empty array"):
        check_gradients(Embedding(5, 3), np.zeros((0, 2), dtype=int), check_input=False)


def test_token_ids_are_checked_without_an_input_gradient_by_default():
    # an integer x for an Embedding stays integer and only the parameters are checked
    from lora_np import Embedding
    emb = Embedding(5, 3, rng=0)
    rows = check_gradients(emb, np.array([[0, 3, 3, 1]]))
    assert [r.name for r in rows] == ["W"] and rows[0].passed
    # a float x keeps its input row
    lin = Linear(3, 2, rng=0)
    assert "x" in [r.name for r in check_gradients(lin, np.ones((2, 3)))]

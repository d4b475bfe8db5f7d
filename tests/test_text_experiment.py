"""lora_np.text_experiment on a tiny language model (random weights, saved as a checkpoint in a
temporary folder): every method runs under the fair protocol on the same batches, the measured
counts match lora_np.counting, a result rebuilds the models it measured, the ΔW helpers, the
samples, the report and the claims, and bad settings are refused. The real pretrained model is
run by tests/test_main.py (``--task text --quick``)."""

import math
from dataclasses import replace

import numpy as np
import pytest

import lora_np.train as train_module
from lora_np.analysis import singular_values
from lora_np.counting import lora_params, training_state_bytes
from lora_np.text.checkpoint import save_lm
from lora_np.text.corpus import corpus_tokenizer, lm_loss
from lora_np.text.model import LanguageModel, generate
from lora_np.text_experiment import (FULL, PLACEMENTS, QUICK_SETTINGS, Claim, TextResult, TextSettings,
                                     check_text_claims, format_claims, format_energy_ranks, format_samples,
                                     format_text_table, lora_grid, lora_name, method_specs, random_like,
                                     results_markdown, run_text_experiment, austen_on_full_curve)

D, LAYERS, HIDDEN, CONTEXT = 16, 2, 32, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = corpus_tokenizer()
    model = LanguageModel(tok.vocab_size, d_model=D, n_heads=2, n_layers=LAYERS, d_hidden=HIDDEN,
                          context=CONTEXT, rng=3, dtype=np.float32)
    path = tmp_path_factory.mktemp("lm") / "tiny_lm.npz"
    save_lm(path, model, tok, {"steps": 0})
    return path


def _settings(checkpoint, **kw):
    s = TextSettings(steps=4, batch_size=2, ranks=(1, 2, 4), placement_rank=2,
                     placements=("q, v", "MLP fc1, fc2"), lr_full=(1e-3, 1e-2), lr_lora=(1e-3, 1e-2),
                     seeds=(0, 1), headline_ranks=(1,), val_windows=4, test_windows=4, curve_points=2,
                     sample_ranks=(1, 4), sample_chars=10, similarity_ranks=(2, 4), workers=1,
                     checkpoint=str(checkpoint))
    return replace(s, **kw)


@pytest.fixture(scope="module")
def logged(checkpoint):
    """The tiny experiment, with the mini-batches every training run drew."""
    batches = []
    real = train_module._batches

    def logging(rng, n, batch_size):
        log = []
        batches.append(log)
        for idx in real(rng, n, batch_size):
            log.append(idx.copy())
            yield idx
    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "_batches", logging)
    try:
        result = run_text_experiment(_settings(checkpoint))
    finally:
        mp.undo()
    return result, batches


@pytest.fixture(scope="module")
def result(logged):
    return logged[0]


def test_every_method_under_the_fair_protocol(result):
    s = result.settings
    assert list(result.specs) == [FULL, "LoRA r=1", "LoRA r=2", "LoRA r=4", "r=2 on q, v", "r=2 on MLP fc1, fc2"]
    assert result.specs["r=2 on q, v"].targets == PLACEMENTS["q, v"]
    assert result.specs["LoRA r=4"].targets == s.targets
    for name, spec in result.specs.items():
        o = result.fair[name]
        assert tuple(o.grid) == (s.lr_full if spec.kind == "full" else s.lr_lora)
        vals = {lr: r.validation for lr, r in o.grid.items()}
        assert o.lr == min(vals, key=vals.get)                            # chosen on validation
        assert o.seeds == ((0, 1) if name in (FULL, "LoRA r=1") else (0,))
        for run in o.runs:
            assert set(run.held_out) == {"kjv", "austen"} and all(math.isfinite(v) for v in run.held_out.values())
            assert run.validation == run.details.val_history[-1][1]
            assert len(run.details.loss_history) == s.steps


def test_every_run_of_a_seed_sees_the_same_batches(logged):
    result, batches = logged
    n_runs = sum(len(o.grid) + len(o.runs) - 1 for o in result.fair)
    assert len(batches) == n_runs
    by_first = {}
    for log in batches:
        assert len(log) == result.settings.steps and all(len(b) == result.settings.batch_size for b in log)
        by_first.setdefault(tuple(log[0]), []).append(log)
    assert len(by_first) == 2                                     # one batch order per seed
    for logs in by_first.values():
        for log in logs[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(logs[0], log))
    assert sorted(len(v) for v in by_first.values()) == [2, sum(len(o.grid) for o in result.fair)]


def test_measured_counts_match_the_formulas(result):
    n_full = result.base.num_parameters()
    assert result.details(FULL).trainable_params == n_full
    assert result.details(FULL).state_bytes == training_state_bytes(n_full, "adam", np.float32)
    shapes = {"q_proj": (D, D), "k_proj": (D, D), "v_proj": (D, D), "o_proj": (D, D), "fc1": (D, HIDDEN),
              "fc2": (HIDDEN, D)}
    for name, spec in result.specs.items():
        if spec.kind == "lora":
            n = LAYERS * sum(lora_params(*shapes[t], spec.rank) for t in spec.targets)
            d = result.details(name)
            assert d.trainable_params == n, name
            assert d.state_bytes == training_state_bytes(n, "adam", np.float32), name
            assert d.scale == 2.0                                             # α = 2r
        assert result.details(name).ms_per_step > 0


def test_the_models_are_rebuilt_from_what_was_measured(result):
    for name in result.specs:
        model = result.model(name)
        run = result.fair[name].best
        assert lm_loss(model, *result.data.kjv_test) == run.held_out["kjv"], name
        assert lm_loss(model, *result.data.austen_test) == run.held_out["austen"], name
    assert lm_loss(result.base, *result.data.kjv_test) == result.pretrained["kjv"]


def test_full_ft_checkpoints_along_its_run(result):
    curve = result.full_curve()
    steps = [c[0] for c in curve]
    assert steps == [0, 2, 4]
    assert curve[0][1:] == (result.pretrained["kjv"], result.pretrained["austen"])
    final = result.fair[FULL].best.held_out
    assert curve[-1][1:] == (final["kjv"], final["austen"])              # the last checkpoint is the end
    assert result.fair[FULL].runs[1].details.curve == []                 # only the first seed
    assert result.details("LoRA r=1").curve == []


def test_delta_weights_spectra_and_subspaces(result):
    full = result.delta_weights(FULL)
    assert len(full) == LAYERS * 6 and all(np.any(dW) for dW in full.values())
    base = dict(result.base.named_modules())
    model = dict(result.model(FULL).named_modules())
    p = "blocks.1.mlp.fc1"
    np.testing.assert_array_equal(full[p], model[p].W - base[p].W)
    lora = result.delta_weights("LoRA r=2")
    assert set(lora) == {f"blocks.{b}.{n}" for b in range(LAYERS)
                         for n in ("attn.q_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2")}
    for dW in lora.values():
        s = singular_values(dW.astype(np.float64))
        assert s[1] > 0 and s[2] <= 1e-5 * s[0]                       # rank 2
    spectra = result.spectra_deltas()
    assert list(spectra) == ["blocks.1.attn.q_proj", "blocks.1.attn.v_proj", "blocks.1.mlp.fc1"]
    labels = list(spectra["blocks.1.mlp.fc1"])
    assert labels[:3] == ["full FT", "LoRA r=2", "LoRA r=4"] and labels[3].startswith("random")
    ref = spectra["blocks.1.mlp.fc1"][labels[3]]
    assert ref.shape == full["blocks.1.mlp.fc1"].shape
    assert np.linalg.norm(ref) == pytest.approx(np.linalg.norm(full["blocks.1.mlp.fc1"]), rel=1e-5)
    small, large = result.subspace_factors()
    assert list(small) == ["blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert small["blocks.1.attn.q_proj"].shape == (2, D) and large["blocks.1.attn.q_proj"].shape == (4, D)
    er = result.energy_ranks()
    assert len(er) == LAYERS * 6
    shape, k, erank, k_random = er["blocks.0.mlp.fc2"]
    assert shape == (D, HIDDEN) and 1 <= k <= D and 1 <= erank <= D and 1 <= k_random <= D


def test_random_like_has_the_shape_dtype_and_norm():
    M = np.arange(12, dtype=np.float32).reshape(3, 4)
    R = random_like(M, np.random.default_rng(0))
    assert R.shape == M.shape and R.dtype == np.float32
    assert np.linalg.norm(R) == pytest.approx(np.linalg.norm(M), rel=1e-6)


def test_samples_same_prompt_and_seed(result):
    s = result.settings
    assert list(result.samples) == ["pretrained (Austen)", FULL, "LoRA r=1", "LoRA r=4"]
    for text in result.samples.values():
        assert text.startswith(s.sample_prompt) and len(text) == len(s.sample_prompt) + s.sample_chars
    assert result.samples["pretrained (Austen)"] == generate(result.base, result.tokenizer, s.sample_prompt,
                                                             s.sample_chars, s.temperature, s.sample_seed)
    assert result.samples[FULL] == generate(result.model(FULL), result.tokenizer, s.sample_prompt,
                                            s.sample_chars, s.temperature, s.sample_seed)
    assert format_samples(result).count("--- ") == 4


def test_worker_processes_give_the_same_numbers(checkpoint, result):
    two = run_text_experiment(_settings(checkpoint, workers=2))
    for name in result.specs:
        a, b = result.fair[name], two.fair[name]
        assert a.lr == b.lr
        assert [r.held_out for r in a.runs] == [r.held_out for r in b.runs], name
        assert all(np.array_equal(x, y) for x, y in zip(a.best.details.trained.values(), b.best.details.trained.values()))
    assert two.samples == result.samples


def test_table_and_results_page(result):
    table = format_text_table(result)
    lines = table.splitlines()
    for word in ("method", "LoRA on", "lr", "seeds", "trainable", "state bytes", "ms/step", "KJV held-out",
                 "Austen held-out"):
        assert word in lines[0]
    assert lines[2].startswith("pretrained") and lines[3].startswith("full FT")
    assert len(lines) == 2 + 1 + len(result.specs)
    o = result.fair[FULL]
    assert f"{o.spread('kjv').mean:.3f} ({o.spread('kjv').low:.3f}–{o.spread('kjv').high:.3f})" in lines[3]
    assert format_energy_ranks(result).count("\n") == 1 + LAYERS * 6
    claims = check_text_claims(result)
    assert claims and all(isinstance(c, Claim) and isinstance(c.holds, bool) for c in claims)
    md = results_markdown(result, claims, "python -m lora_np --task text")
    assert md.startswith("# LoRA on real text") and "`python -m lora_np --task text`" in md
    assert format_claims(claims) in md and "| full FT |" in md and "## Samples" in md


def test_method_specs_follow_the_settings():
    specs = method_specs(QUICK_SETTINGS)
    assert list(specs) == [FULL, "LoRA r=1", "LoRA r=16", "r=16 on MLP fc1, fc2"]
    assert specs[FULL].seeds == (0, 1) and specs["LoRA r=16"].seeds == (0,)
    assert specs["LoRA r=1"].lrs == QUICK_SETTINGS.lr_lora and specs[FULL].lrs == QUICK_SETTINGS.lr_full
    default = TextSettings()
    specs = method_specs(default)
    assert [specs[lora_name(r)].lrs for r in (8, 16, 32, 64)] == [default.lr_lora] * 2 + [default.lr_lora_large] * 2
    assert specs["r=8 on q, v"].lrs == default.lr_lora and lora_grid(default, 32) == default.lr_lora_large
    assert sum(len(sp.lrs) + len(sp.seeds) - 1 for sp in specs.values()) == 44        # runs of the default
    TextSettings().check()
    QUICK_SETTINGS.check()


@pytest.mark.parametrize("change, error, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(batch_size=1.5), TypeError, "batch_size"),
    (dict(placements=("everywhere",)), ValueError, "placements"),
    (dict(sample_ranks=(3,)), ValueError, "sample_ranks"),
    (dict(headline_ranks=(8,)), ValueError, "headline_ranks"),
    (dict(similarity_ranks=(4, 2)), ValueError, "similarity_ranks"),
    (dict(ranks=(1, 1, 2, 4)), ValueError, "distinct"),
    (dict(seeds=()), ValueError, "seeds"),
    (dict(ranks=(1, 2, 4, 32), similarity_ranks=(2, 32)), ValueError, "larger than d_model = 16"),
])
def test_bad_settings_are_refused(checkpoint, change, error, match):
    with pytest.raises(error, match=match):
        run_text_experiment(_settings(checkpoint, **change))


def test_a_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match="nope.npz is missing; `python -m lora_np.pretrain` writes it"):
        run_text_experiment(replace(QUICK_SETTINGS, checkpoint=str(path)))
    with pytest.raises(TypeError, match="TextSettings"):
        run_text_experiment({"steps": 3})


def _claim(result, words):
    found = [c for c in check_text_claims(result) if words in c.statement]
    return found[0] if found else None


def test_claims_are_decided_by_the_numbers(result, monkeypatch):
    """The claims flip when the measured numbers do, and a claim about methods the run does not
    have is left out."""
    assert _claim(result, "inside its grid") is None                # no grid of three rates here
    assert _claim(result, "catches up") is None                     # no rank ≥ 32
    assert _claim(result, "MLP alone") is None                      # no attention placement
    assert _claim(result, "at equal learning") is None              # no rank ≥ 8
    full_more = _claim(result, "full FT learns more")
    assert full_more.statement.startswith("full FT learns more than LoRA at every rank r ≤ 8")
    for run in result.fair[FULL].runs:
        monkeypatch.setitem(run.held_out, "kjv", 99.0)
    flipped = _claim(result, "full FT learns more")
    assert not flipped.holds and "full FT 99.000" in flipped.detail
    for run in result.fair["LoRA r=1"].runs:
        monkeypatch.setitem(run.held_out, "austen", 0.5)
    least = _claim(result, "forgets least")
    assert least.holds and least.statement.startswith("LoRA r=1 forgets least") and "LoRA r=1 0.500" in least.detail
    monkeypatch.setattr(TextResult, "energy_ranks",
                        lambda self, energy=0.9: {"blocks.0.mlp.fc1": ((HIDDEN, D), 1, 1.0, 12)})
    low = _claim(result, "not low-rank")
    assert not low.holds and "blocks.0.mlp.fc1 1 of 16" in low.detail
    assert _claim(result, "nor is it random").holds
    monkeypatch.setattr(TextResult, "energy_ranks",
                        lambda self, energy=0.9: {"blocks.0.mlp.fc1": ((HIDDEN, D), 13, 1.0, 12)})
    assert not _claim(result, "nor is it random").holds


def test_the_grid_claim_reads_where_each_rate_was_chosen(result, monkeypatch):
    o = result.fair[FULL]
    grid = {1e-4: o.best, 1e-3: o.best, 1e-2: o.best}
    monkeypatch.setattr(o, "grid", grid)
    monkeypatch.setattr(o, "lr", 1e-3)
    claim = _claim(result, "inside its grid")
    assert claim.holds and claim.detail == "1 of 1 methods"
    monkeypatch.setattr(o, "lr", 1e-2)
    claim = _claim(result, "inside its grid")
    assert not claim.holds and claim.detail == "0 of 1 methods; at an end: full FT"


def test_equal_learning_reads_full_fts_curve(result, monkeypatch):
    monkeypatch.setattr(TextResult, "full_curve", lambda self: [(0, 2.0, 1.0), (10, 1.8, 1.2), (20, 1.6, 1.3)])
    assert austen_on_full_curve(result, 1.9) == (pytest.approx(1.1), True)
    assert austen_on_full_curve(result, 1.7) == (pytest.approx(1.25), True)
    assert austen_on_full_curve(result, 1.5) == (1.3, False)          # beyond the run: its last point
    assert austen_on_full_curve(result, 2.5) == (1.0, False)

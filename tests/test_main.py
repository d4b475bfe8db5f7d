"""``python -m lora_np``: options, the printed table and claims, the exit status, where the
figures go (never over the committed ones unless it is the default run), and no matplotlib
with --no-figures.

The tests that write figures run in a temporary folder (``monkeypatch.chdir``), so they never
touch the repository's figures/.
"""

import pathlib
import struct
import subprocess
import sys
import textwrap

import pytest

import lora_np.__main__ as cli
from lora_np.__main__ import main
from lora_np.experiments import DEFAULT_RANKS, SweepSettings

REPO = pathlib.Path(__file__).resolve().parent.parent


def _figure_names():
    from lora_np.plots import FIGURE_NAMES
    return list(FIGURE_NAMES.values())


def _claims(out):
    return [line for line in out.splitlines() if line[:1] in ("✓", "✗")]


def _png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    return struct.unpack(">II", pathlib.Path(path).read_bytes()[16:24])


def _pngs(folder):
    return sorted(p.name for p in pathlib.Path(folder).glob("*.png"))


@pytest.fixture
def fake_figures(monkeypatch):
    """Replace the drawing by empty files with the figures' names (the tests that use it check
    where the figures go, not what they show)."""
    import lora_np.plots

    def save_figures(result, out_dir, prefix=""):
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {key: out / (prefix + name) for key, name in lora_np.plots.FIGURE_NAMES.items()}
        for path in paths.values():
            path.write_bytes(b"")
        return paths
    monkeypatch.setattr(lora_np.plots, "save_figures", save_figures)


# --------------------------------------------------------------------------- output and exit status


def test_quick_run_prints_only_passing_claims_and_writes_to_scratch(tmp_path, monkeypatch, capsys):
    """`--quick` used to overwrite the committed figures/sweep_*.png: now figures/scratch/."""
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for word in ("trainable", "% of full", "val loss", "old-task loss", "ms/step", "state bytes"):
        assert word in lines[header]
    assert lines[header + 2].startswith("full FT") and "100.0%" in lines[header + 2]
    assert lines[header + 4].startswith("LoRA r=2") and " 256 " in lines[header + 4]
    assert "L₀" in out and "300 Adam steps" in out
    claims = _claims(out)
    assert len(claims) == 5 and all(c.startswith("✓") for c in claims), "\n".join(claims)
    assert _pngs(tmp_path / "figures") == []
    assert _pngs(tmp_path / "figures" / "scratch") == sorted(_figure_names())
    assert "figures written to figures/scratch/" in out


def test_a_failed_claim_exits_1(monkeypatch, capsys):
    """A ✗ used to exit 0. 20 steps are far too few to reach the noise floor: claim 1 fails."""
    monkeypatch.setattr(cli, "QUICK_STEPS", 20)
    assert main(["--quick", "--ranks", "1,4", "--no-figures", "--quiet"]) == cli.EXIT_CLAIM_FAILED == 1
    captured = capsys.readouterr()
    assert "✗ full FT and LoRA r ≥ 4 end at ≤ 0.01·L₀" in captured.out
    assert "claims failed" in captured.err


def test_out_is_used_for_any_run(tmp_path, monkeypatch, capsys, fake_figures):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "QUICK_STEPS", 20)
    main(["--quick", "--ranks", "2", "--out", "mine", "--quiet"])
    assert _pngs(tmp_path / "mine") == sorted(_figure_names())
    assert not (tmp_path / "figures").exists()
    assert "figures written to mine/" in capsys.readouterr().out


def test_progress_on_stderr_unless_quiet(capsys, monkeypatch):
    monkeypatch.setattr(cli, "QUICK_STEPS", 20)
    main(["--quick", "--ranks", "1", "--no-figures"])
    captured = capsys.readouterr()
    assert "full FT" in captured.err and "LoRA r=1" in captured.err and "20/20" in captured.err
    assert "figures" not in captured.out
    main(["--quick", "--ranks", "1", "--no-figures", "--quiet"])
    assert capsys.readouterr().err.count("LoRA r=1") == 0


# --------------------------------------------------------------------------- which run writes where


@pytest.mark.parametrize("argv, default", [
    ([], True),
    (["--quiet"], True),
    (["--ranks", "64,32,16,8,4,2,1", "--seed", "0", "--true-rank", "4"], True),   # the same run
    (["--quick"], False),
    (["--ranks", "1,4,16"], False),
    (["--seed", "1"], False),
    (["--true-rank", "2"], False),
    (["--model", "attention"], False),
])
def test_only_the_default_run_is_the_default_run(argv, default):
    args = cli.parser().parse_args(argv)
    ranks = args.ranks or (cli.QUICK_RANKS if args.quick else DEFAULT_RANKS)
    steps = cli.QUICK_STEPS if args.quick else cli.DEFAULT_STEPS
    assert cli.is_default_run(args.model, ranks, args.true_rank, args.seed, steps) is default
    folder = cli.figure_folder(args.out, default)
    assert folder == (pathlib.Path("figures") if default else pathlib.Path("figures/scratch"))


def test_default_run_rewrites_the_committed_figures(default_sweep, tmp_path, monkeypatch, capsys):
    """The default run (the session's default sweep stands in for the training) writes
    figures/, in the current folder, with the committed files' names and sizes."""
    def fake_rank_sweep(ranks, true_rank, seed, settings, verbose):
        assert (tuple(ranks), true_rank, seed, settings) == (DEFAULT_RANKS, 4, 0, SweepSettings())
        return default_sweep
    monkeypatch.setattr(cli, "rank_sweep", fake_rank_sweep)
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(c.startswith("✓") for c in _claims(out)) and len(_claims(out)) == 5
    names = _figure_names()
    assert _pngs(tmp_path / "figures") == sorted(names)
    assert not (tmp_path / "figures" / "scratch").exists()
    for name in names:
        assert _png_size(tmp_path / "figures" / name) == _png_size(REPO / "figures" / name), name


def test_attention_run_passes_its_claims_and_writes_to_scratch(default_attention_sweep, tmp_path,
                                                                monkeypatch, capsys, fake_figures):
    """`--model attention` printed a ✗ and exited 0 (and wrote over figures/ too)."""
    def fake_attention_sweep(ranks, true_rank, seed, settings, verbose):
        assert (tuple(ranks), true_rank, seed) == (DEFAULT_RANKS, 4, 0)
        assert settings == SweepSettings(batch_size=64)
        return default_attention_sweep
    monkeypatch.setattr(cli, "attention_sweep", fake_attention_sweep)
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "attention", "--quiet"]) == 0
    out = capsys.readouterr().out
    claims = _claims(out)
    assert len(claims) == 5 and all(c.startswith("✓") for c in claims), "\n".join(claims)
    assert "read through W_qᵀW_k, W_oW_v" in out
    assert _pngs(tmp_path / "figures") == []
    assert _pngs(tmp_path / "figures" / "scratch") == sorted("attention_" + n for n in _figure_names())


def test_no_figures_does_not_import_matplotlib():
    code = textwrap.dedent("""
        import sys
        import lora_np.__main__ as cli
        cli.QUICK_STEPS = 5
        status = cli.main(["--no-figures", "--quick", "--ranks", "1", "--quiet"])
        print(status, "matplotlib" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "1 False"       # 5 steps: the claims fail; no matplotlib


# --------------------------------------------------------------------------- options


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--ranks", "--seed", "--out", "--quick", "--true-rank", "--model", "--no-figures",
                   "--quiet", "--task", "--workers"):
        assert option in text
    assert "figures/scratch/" in text


@pytest.mark.parametrize("argv", [["--ranks", "a,b"], ["--ranks", "0"], ["--model", "cnn"]])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_rank_too_large_is_a_clear_error(capsys):
    assert main(["--ranks", "65", "--quiet", "--no-figures"]) == cli.EXIT_BAD_ARGUMENT == 2
    assert "rank 65 is larger than min(d_in, d_out) = 64" in capsys.readouterr().err


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "lora_np", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "python -m lora_np" in done.stdout


def test_restarts_with_one_blas_thread_unless_the_user_chose(monkeypatch):
    from lora_np import machine
    calls = []
    monkeypatch.setattr(machine.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(machine.sys, "argv", ["lora_np", "--quick"])
    for v in machine.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    machine.restart_with_one_blas_thread("lora_np")
    (path, argv, env), = calls
    assert path == sys.executable and argv == [sys.executable, "-m", "lora_np", "--quick"]
    assert all(env[v] == "1" for v in machine.BLAS_THREAD_VARIABLES)
    calls.clear()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    machine.restart_with_one_blas_thread("lora_np")
    assert calls == []


# --------------------------------------------------------------------------- --task text


def _text_args(argv):
    return cli._text_settings(cli.parser().parse_args(argv))


@pytest.mark.parametrize("argv, default", [
    (["--task", "text"], True),
    (["--task", "text", "--quiet", "--workers", "1"], True),          # workers do not change results
    (["--task", "text", "--ranks", "64,32,16,8,4,2,1"], True),
    (["--task", "text", "--quick"], False),
    (["--task", "text", "--ranks", "1,8"], False),
    (["--task", "text", "--seed", "1"], False),
])
def test_only_the_default_text_run_is_the_default_text_run(argv, default):
    assert cli.is_default_text_run(_text_args(argv)) is default


def test_text_options_shape_the_settings():
    from lora_np.text_experiment import QUICK_SETTINGS, TextSettings
    s = _text_args(["--task", "text", "--ranks", "2,8,64", "--seed", "5", "--workers", "3"])
    assert s.ranks == (2, 8, 64) and s.seeds == (5, 6, 7) and s.workers == 3
    assert s.headline_ranks == () and s.sample_ranks == (8, 64) and s.similarity_ranks == (8, 64)
    assert _text_args(["--task", "text", "--ranks", "1,4"]).similarity_ranks == (1, 4)
    assert _text_args(["--task", "text", "--quick", "--workers", "1"]) == \
        __import__("dataclasses").replace(QUICK_SETTINGS, workers=1)
    assert _text_args(["--task", "text"]).steps == TextSettings().steps


@pytest.mark.parametrize("argv, match", [
    (["--task", "text", "--model", "attention"], "--model and --true-rank belong to --task synthetic"),
    (["--task", "text", "--true-rank", "2"], "--model and --true-rank belong to --task synthetic"),
    (["--task", "text", "--workers", "0"], "workers must be >= 1"),
])
def test_text_bad_arguments_exit_2(argv, match, capsys):
    assert main(argv + ["--quiet", "--no-figures"]) == cli.EXIT_BAD_ARGUMENT
    assert match in capsys.readouterr().err


def test_text_missing_weights_exit_2(monkeypatch, tmp_path, capsys):
    import dataclasses

    import lora_np.text_experiment as te
    monkeypatch.setattr(te, "QUICK_SETTINGS", dataclasses.replace(te.QUICK_SETTINGS, checkpoint=str(tmp_path / "x.npz")))
    assert main(["--task", "text", "--quick", "--quiet", "--no-figures"]) == 2
    assert "x.npz is missing; `python -m lora_np.pretrain` writes it" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_text_result(tmp_path_factory):
    """The text experiment on a tiny random model (the real one runs in test_text_quick_run)."""
    import dataclasses

    import numpy as np

    from lora_np.text.checkpoint import save_lm
    from lora_np.text.corpus import corpus_tokenizer
    from lora_np.text.model import LanguageModel
    from lora_np.text_experiment import QUICK_SETTINGS, run_text_experiment
    tok = corpus_tokenizer()
    path = tmp_path_factory.mktemp("lm") / "tiny.npz"
    save_lm(path, LanguageModel(tok.vocab_size, d_model=16, n_heads=2, n_layers=2, d_hidden=32, context=16,
                                rng=0, dtype=np.float32), tok, {})
    return run_text_experiment(dataclasses.replace(QUICK_SETTINGS, steps=2, batch_size=2, checkpoint=str(path),
                                                   workers=1, val_windows=2, test_windows=2, sample_chars=5))


def test_default_text_run_writes_the_committed_figures_and_results(tiny_text_result, tmp_path, monkeypatch, capsys):
    import lora_np.text_experiment as te
    from lora_np.plots import TEXT_FIGURE_NAMES

    def fake_run(settings, verbose):
        assert cli.is_default_text_run(settings) and verbose is False
        return tiny_text_result
    monkeypatch.setattr(te, "run_text_experiment", fake_run)
    monkeypatch.chdir(tmp_path)
    status = main(["--task", "text", "--quiet"])
    out = capsys.readouterr().out
    assert status == (0 if all(c.startswith("✓") for c in _claims(out)) else 1) and _claims(out)
    assert _pngs(tmp_path / "figures") == sorted(TEXT_FIGURE_NAMES.values())
    md = (tmp_path / "figures" / "text_results.md").read_text(encoding="utf-8")
    assert "Written by `python -m lora_np --task text --quiet`" in md
    assert not (tmp_path / "figures" / "scratch").exists()
    assert "figures and results written to figures/:" in out
    for word in ("KJV held-out", "Austen held-out", "validation metric at each lr", "90 % energy rank",
                 "Samples, prompt"):
        assert word in out


def test_other_text_runs_write_to_scratch_or_out(tiny_text_result, tmp_path, monkeypatch, capsys):
    import lora_np.text_experiment as te
    monkeypatch.setattr(te, "run_text_experiment", lambda settings, verbose: tiny_text_result)
    monkeypatch.chdir(tmp_path)
    main(["--task", "text", "--quick", "--quiet"])
    assert "text_results.md" in {p.name for p in (tmp_path / "figures" / "scratch").iterdir()}
    assert _pngs(tmp_path / "figures") == []
    assert "figures and results written to figures/scratch/ (not to figures/" in capsys.readouterr().out
    main(["--task", "text", "--quick", "--quiet", "--out", "mine"])
    assert len(_pngs(tmp_path / "mine")) == 4 and (tmp_path / "mine" / "text_results.md").exists()
    (tmp_path / "none").mkdir()
    monkeypatch.chdir(tmp_path / "none")
    main(["--task", "text", "--quick", "--quiet", "--no-figures"])
    assert list((tmp_path / "none").iterdir()) == []


def test_text_quick_run(tmp_path):
    """`python -m lora_np --task text --quick` on the committed pretrained model: ≤ 60 s, every
    claim ✓, the figures and results page in --out, progress on stderr."""
    done = subprocess.run([sys.executable, "-m", "lora_np", "--task", "text", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    claims = _claims(done.stdout)
    assert claims and all(c.startswith("✓") for c in claims), "\n".join(claims)
    total = float(done.stdout.strip().splitlines()[-1].split()[1])
    assert total <= 60, f"--quick took {total:.1f} s"
    from lora_np.plots import TEXT_FIGURE_NAMES
    assert _pngs(tmp_path) == sorted(TEXT_FIGURE_NAMES.values()) and (tmp_path / "text_results.md").exists()
    assert "fair [" in done.stderr and "left]" in done.stderr

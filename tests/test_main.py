"""``python -m lora_np``: options, the printed table and claims, the figures it writes."""

import subprocess
import sys

import pytest

from lora_np.__main__ import main
from lora_np.plots import FIGURE_NAMES


def test_quick_run_prints_the_table_and_claims_and_writes_figures(tmp_path, capsys):
    out_dir = tmp_path / "figs"
    assert main(["--quick", "--ranks", "2,4", "--out", str(out_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for word in ("trainable", "% of full", "val loss", "old-task loss", "ms/step", "state bytes"):
        assert word in lines[header]
    assert lines[header + 2].startswith("full FT") and "100.0%" in lines[header + 2]
    assert lines[header + 3].startswith("LoRA r=2") and " 256 " in lines[header + 3]
    assert lines[header + 4].startswith("LoRA r=4") and " 512 " in lines[header + 4]
    assert "L₀" in out and "300 Adam steps" in out
    claims = [line for line in lines if line[:1] in ("✓", "✗")]
    assert len(claims) == 7 and all(c.startswith("✓") for c in claims), "\n".join(claims)
    for name in FIGURE_NAMES.values():
        assert (out_dir / name).stat().st_size > 10_000, f"{name} missing or empty"


def test_no_figures_and_progress_on_stderr(tmp_path, capsys, monkeypatch):
    import lora_np.__main__ as cli
    monkeypatch.setattr(cli, "QUICK_STEPS", 20)
    assert main(["--quick", "--ranks", "1", "--out", str(tmp_path), "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert "step 20/20" in captured.err           # one line per run: stderr is not a terminal here
    assert captured.err.count("step 20/20") == 2 and "\r" not in captured.err
    assert "figures:" not in captured.out
    assert list(tmp_path.iterdir()) == []


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--ranks", "--seed", "--out", "--quick", "--true-rank", "--model", "--no-figures",
                   "--quiet"):
        assert option in text


@pytest.mark.parametrize("argv", [["--ranks", "a,b"], ["--ranks", "0"], ["--model", "cnn"]])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_rank_too_large_is_a_clear_error(capsys):
    assert main(["--ranks", "65", "--quiet", "--no-figures"]) == 2
    assert "rank 65 is larger than min(d_in, d_out) = 64" in capsys.readouterr().err


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "lora_np", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "python -m lora_np" in done.stdout


def test_restarts_with_one_blas_thread_unless_the_user_chose(monkeypatch):
    import lora_np.__main__ as cli
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(cli.sys, "argv", ["lora_np", "--quick"])
    for v in cli.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    cli._restart_with_one_blas_thread()
    (path, argv, env), = calls
    assert path == sys.executable and argv == [sys.executable, "-m", "lora_np", "--quick"]
    assert all(env[v] == "1" for v in cli.BLAS_THREAD_VARIABLES)
    calls.clear()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    cli._restart_with_one_blas_thread()
    assert calls == []

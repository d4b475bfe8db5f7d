"""Every notebook in ``notebooks/`` runs top to bottom, and is committed executed and clean.

Two kinds of test:

* ``test_notebook_executes`` runs each notebook (found by glob, so a new notebook is tested
  as soon as it is added) in a fresh Jupyter kernel whose working directory is the notebook's
  own folder — exactly what ``jupyter lab notebooks/`` does — and fails on the first cell that
  raises, showing that cell's traceback. The worked solutions in ``notebooks/solutions/`` are
  executed too: a solution that no longer runs is a wrong solution. Running a notebook
  rewrites its figures under ``figures/`` (byte for byte the same: the figures carry no
  timestamps). Each notebook runs in its own process (``tests/_execute_notebook.py``), two at
  a time on a machine with two or more cores: every kernel uses one BLAS thread, so two
  kernels fill two cores and the notebook tests take half the wall time. Set
  ``LORA_NP_NOTEBOOK_JOBS=1`` to run them one after another (for clean per-notebook timings).
  The end of the module prints each notebook's runtime, their sum and the wall time.
* ``test_committed_notebook_is_executed_and_clean`` reads the committed file without running
  it: every code cell has been executed, in order, there are outputs, no error outputs, and no
  absolute path of the machine that executed it (so the notebooks read well on the web).

Why nbclient: it is Jupyter's own notebook executor (the engine behind
``jupyter nbconvert --execute``) and is installed with jupyter already, so it adds no
dependency. nbmake would add a pytest plugin on top of the same engine for nothing we need
here; a plain parametrized test keeps the behaviour visible in this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
# The assignments' student versions (notebooks/assignments/release/) are deliberately unexecuted
# and raise NotImplementedError at each TODO: tests/test_assignments.py checks them. Their
# reference versions (assignments/source/) are executed here like every other notebook.
RELEASE_DIR = NB_DIR / "assignments" / "release"
NOTEBOOKS = sorted(p for p in NB_DIR.rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts and RELEASE_DIR not in p.parents)
RUNNER = pathlib.Path(__file__).resolve().parent / "_execute_notebook.py"
TIMEOUT_PER_NOTEBOOK = 600      # seconds; a notebook should take well under 30 s
JOBS = int(os.environ.get("LORA_NP_NOTEBOOK_JOBS", min(2, os.cpu_count() or 1)))

# Absolute paths that must never appear in a committed notebook: the usual roots of this
# kind of machine, plus the actual location of this checkout and the home directory.
_FORBIDDEN = sorted({"/work/", "/root/", "/tmp/", "/home/", "/Users/",
                     str(ROOT) + "/", str(pathlib.Path.home()) + "/"})

_runtimes: dict[str, float] = {}
_wall: dict[str, float] = {}


def _kernel_env() -> dict:
    """The kernel's environment: ours, with one BLAS thread unless the caller chose otherwise.

    The notebooks multiply small matrices, for which extra BLAS threads only add overhead; on
    a busy 2-core machine OpenBLAS's spinning threads made one notebook cell 50x slower
    (7 s instead of 0.15 s). One thread also keeps the summation order, and so every printed
    digit, the same from run to run. An explicit OPENBLAS_NUM_THREADS etc. is respected.
    """
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def _id(path: pathlib.Path) -> str:
    return str(path.relative_to(NB_DIR))


@pytest.fixture(scope="module", autouse=True)
def _report_runtimes(request):
    """After the module: one line per executed notebook with its runtime, their sum and the wall time."""
    yield
    if not _runtimes:
        return
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None:
        return
    lines = [f"  {name:<52} {sec:6.1f} s" for name, sec in sorted(_runtimes.items())]
    lines.append(f"  {'sum of the runtimes':<52} {sum(_runtimes.values()):6.1f} s")
    if "wall" in _wall:
        lines.append(f"  {f'wall time, {JOBS} at a time':<52} {_wall['wall']:6.1f} s")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write("\n")
        reporter.write_line("notebook runtimes (kernel start to last cell):")
        for line in lines:
            reporter.write_line(line)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found under {NB_DIR.name}/"


def _execute(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), str(path)], env=_kernel_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_PER_NOTEBOOK)


@pytest.fixture(scope="module")
def notebook_runs(request):
    """Start executing every notebook that this pytest run selected, ``JOBS`` at a time; each
    ``test_notebook_executes`` then waits for its own. (Selected: ``pytest -k 04`` starts only
    notebook 04.)"""
    selected = [item.callspec.params["path"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_notebook_executes"]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(JOBS, 1)) as pool:
        futures = {path: pool.submit(_execute, path) for path in selected}
        yield futures
        for future in futures.values():
            future.cancel()
    _wall["wall"] = time.perf_counter() - start


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_notebook_executes(path, notebook_runs):
    result = notebook_runs[path].result()
    assert result.returncode == 0, f"{_id(path)} failed:\n{result.stderr[-4000:]}"
    _runtimes[_id(path)] = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def _texts(nb):
    """Every piece of text a reader sees: cell sources and text outputs (images excluded,
    since base64 data may contain any short string by chance)."""
    for i, cell in enumerate(nb.cells):
        yield f"cell {i} source", cell.source
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                yield f"cell {i} {out.name}", out.text
            elif out.output_type in ("execute_result", "display_data"):
                for mime, data in out.get("data", {}).items():
                    if mime.startswith("text/") or mime.endswith("json"):
                        yield f"cell {i} {mime}", data if isinstance(data, str) else json.dumps(data)
            elif out.output_type == "error":
                yield f"cell {i} error", "\n".join(out.traceback)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_committed_notebook_is_executed_and_clean(path):
    nb = nbformat.read(path, as_version=4)
    name = _id(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name}: no code cells"
    empty = [i for i, c in enumerate(code) if not c.source.strip()]
    assert not empty, f"{name}: empty code cells {empty} (remove them)"

    counts = [c.execution_count for c in code]
    assert None not in counts, f"{name}: code cell {counts.index(None)} was never executed; " \
                               "commit the notebook executed"
    assert counts == list(range(1, len(code) + 1)), \
        f"{name}: execution counts {counts} are not 1..{len(code)}: run it top to bottom in a fresh kernel"
    assert sum(len(c.outputs) for c in code) > 0, f"{name}: committed without outputs"

    for c in code:
        for out in c.outputs:
            assert out.output_type != "error", \
                f"{name}: committed with an error output: {out.ename}: {out.evalue}"
            if out.output_type == "stream" and out.name == "stderr":
                assert not re.search(r"Traceback|Warning", out.text), \
                    f"{name}: a warning or traceback on stderr: {out.text[:200]!r}"

    for where, text in _texts(nb):
        for bad in _FORBIDDEN:
            assert bad not in text, f"{name}: {where} contains the absolute path fragment {bad!r}"

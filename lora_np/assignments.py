"""``python -m lora_np.assignments build``: write the student notebooks from the reference ones.

The assignments live in nbgrader's course layout, so a teacher who uses nbgrader can take the
folder as it is::

    notebooks/assignments/source/<assignment>/<assignment>.ipynb    reference, with the solutions
    notebooks/assignments/release/<assignment>/<assignment>.ipynb   student version (built here)

The reference notebooks mark what a student writes with nbgrader's delimiters, and this command
does what ``nbgrader generate_assignment`` does to them (without nbgrader, which is not a
dependency):

* in a code cell, the lines from ``### BEGIN SOLUTION`` to ``### END SOLUTION`` become
  nbgrader's stub ``# YOUR CODE HERE`` / ``raise NotImplementedError()``, indented like the
  ``BEGIN`` line; in a markdown cell they become ``YOUR ANSWER HERE``;
* the lines from ``### BEGIN HIDDEN TESTS`` to ``### END HIDDEN TESTS`` are removed;
* every output, execution count and execution timestamp is cleared.

Cell ids and the ``nbgrader`` cell metadata (grade ids, points, locked cells) are kept. What it
does not do: nbgrader's own ``generate_assignment`` also writes checksums of the grade cells
into the release and records the assignment in its gradebook; a teacher grading with nbgrader
runs it on ``source/`` instead (notebooks/assignments/README.md).

This command is the only way the student versions are made. ``--check`` writes nothing and
exits 1 if a committed student version differs from a fresh build (the test suite runs it).

``python -m lora_np.assignments grade <student's notebook>`` grades without nbgrader, the way
``nbgrader autograde`` does: the check cells are restored from ``source/`` with their hidden
tests, the notebook runs in a fresh kernel, and each check cell that runs without an error
earns its points; the written answers are listed for reading by hand. Exit status 2 for an
unknown option.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSIGNMENTS = ROOT / "notebooks" / "assignments"

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")      # nbgrader's defaults
TEXT_STUB = "YOUR ANSWER HERE"

__all__ = ["build_notebook", "solution_regions", "source_notebooks", "release_path", "build", "grade",
           "format_grades", "CellGrade", "main", "CODE_STUB", "TEXT_STUB"]


def _regions(lines, begin, end, where):
    """(start, stop) line indices of each begin..end region (both delimiter lines included)."""
    out, start = [], None
    for i, line in enumerate(lines):
        s = line.strip()
        if s == begin:
            if start is not None:
                raise ValueError(f"{where}: {begin!r} at line {i + 1} inside another region (opened at "
                                 f"line {start + 1}); close it with {end!r} first")
            start = i
        elif s == end:
            if start is None:
                raise ValueError(f"{where}: {end!r} at line {i + 1} without a {begin!r} before it")
            out.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"{where}: {begin!r} at line {start + 1} is never closed by {end!r}")
    return out


def solution_regions(nb):
    """Every solution region of a notebook, in order: (cell index, start line, stop line)."""
    out = []
    for ci, cell in enumerate(nb.cells):
        lines = cell.source.split("\n")
        for a, b in _regions(lines, BEGIN_SOLUTION, END_SOLUTION, f"cell {cell.get('id', ci)}"):
            out.append((ci, a, b))
    return out


def build_notebook(nb, only_region: int | None = None):
    """The student version of the reference notebook ``nb`` (an nbformat NotebookNode; not changed).

    ``only_region=k`` stubs only the k-th solution region (``solution_regions`` order) and keeps
    the others' solutions — what the tests use to check that each TODO raises on its own.
    """
    nb = copy.deepcopy(nb)
    k = 0
    for ci, cell in enumerate(nb.cells):
        where = f"cell {cell.get('id', ci)}"
        lines = cell.source.split("\n")
        out, pos = [], 0
        for a, b in _regions(lines, BEGIN_SOLUTION, END_SOLUTION, where):
            out += lines[pos:a]
            if only_region is None or only_region == k:
                indent = lines[a][: len(lines[a]) - len(lines[a].lstrip())]
                out += [indent + s for s in CODE_STUB] if cell.cell_type == "code" else [indent + TEXT_STUB]
            else:
                out += lines[a + 1:b]
            pos, k = b + 1, k + 1
        out += lines[pos:]
        lines, out, pos = out, [], 0
        for a, b in _regions(lines, BEGIN_HIDDEN, END_HIDDEN, where):
            out += lines[pos:a]
            pos = b + 1
        out += lines[pos:]
        cell.source = "\n".join(out).rstrip("\n")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    return nb


def source_notebooks(root: pathlib.Path = ASSIGNMENTS):
    """The reference notebooks ``source/<assignment>/<assignment>.ipynb``, sorted."""
    return sorted(p for p in (root / "source").glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def release_path(source: pathlib.Path, root: pathlib.Path = ASSIGNMENTS) -> pathlib.Path:
    return root / "release" / source.relative_to(root / "source")


def _release_text(source: pathlib.Path) -> str:
    import nbformat
    text = nbformat.writes(build_notebook(nbformat.read(source, as_version=4)))
    return text if text.endswith("\n") else text + "\n"       # as nbformat.write ends a file


def build(root: pathlib.Path = ASSIGNMENTS, check: bool = False, out=sys.stdout) -> list[pathlib.Path]:
    """Write (or, with ``check``, only compare) every student version. Returns the release files
    that were (or would be) changed."""
    sources = source_notebooks(root)
    if not sources:
        raise FileNotFoundError(f"no reference notebooks under {root / 'source'}/<assignment>/")
    changed = []
    for src in sources:
        dst = release_path(src, root)
        text = _release_text(src)
        if dst.exists() and dst.read_text(encoding="utf-8") == text:
            print(f"up to date  {dst.relative_to(root)}", file=out)
            continue
        changed.append(dst)
        if check:
            print(f"DIFFERS     {dst.relative_to(root)} (run: python -m lora_np.assignments build)", file=out)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text, encoding="utf-8")
            print(f"wrote       {dst.relative_to(root)}", file=out)
    return changed


class CellGrade(NamedTuple):
    cell_id: str
    kind: str              # "auto" (a check cell) or "written" (a derivation, read by hand)
    points: float
    earned: float | None   # None for a written answer
    error: str = ""        # the check cell's error (ename: evalue), "" when it passed


def _is_test_cell(cell) -> bool:
    m = cell.metadata.get("nbgrader", {})
    return bool(m.get("grade")) and not m.get("solution")


def _with_hidden_tests(cell_source: str) -> str:
    lines = [ln for ln in cell_source.split("\n") if ln.strip() not in (BEGIN_HIDDEN, END_HIDDEN)]
    return "\n".join(lines)


def grade(path, source=None, hidden=True, timeout=120) -> list[CellGrade]:
    """Grade a student's filled-in notebook without nbgrader, as ``nbgrader autograde`` does.

    Every autograded check cell is first restored from the reference notebook ``source``
    (default: ``source/<name>/<name>.ipynb`` for a notebook called ``<name>.ipynb``), with its
    hidden tests when ``hidden`` — so an edited or deleted check counts as the original —, then
    the notebook runs top to bottom in a fresh kernel in its own folder, going on after an error.
    A check cell earns its points when it runs without an error. Written answers are listed
    with their points, to be read by hand. The student's file is not changed.
    """
    import nbclient
    import nbformat
    path = pathlib.Path(path).resolve()
    source = pathlib.Path(source) if source is not None else ASSIGNMENTS / "source" / path.stem / path.name
    if not source.exists():
        raise FileNotFoundError(f"no reference notebook {source} for {path.name}; pass source=")
    ref = nbformat.read(source, as_version=4)
    nb = nbformat.read(path, as_version=4)
    tests = {c.id: c for c in ref.cells if _is_test_cell(c)}
    have = {c.get("id") for c in nb.cells}
    missing = sorted(set(tests) - have)
    if missing:
        raise ValueError(f"{path.name} lacks the check cells {missing} of {source.name}; grade a notebook "
                         "made from the release version")
    for cell in nb.cells:
        if cell.get("id") in tests:
            ref_src = tests[cell.id].source
            cell.source = _with_hidden_tests(ref_src) if hidden else build_notebook(
                nbformat.v4.new_notebook(cells=[tests[cell.id]])).cells[0].source
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    out = []
    for cell in nb.cells:
        m = cell.metadata.get("nbgrader", {})
        if not m.get("grade"):
            continue
        pts = float(m.get("points") or 0)
        if m.get("solution"):
            out.append(CellGrade(cell.id, "written", pts, None))
            continue
        errs = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        err = f"{errs[0].ename}: {errs[0].evalue}"[:200] if errs else ""
        out.append(CellGrade(cell.id, "auto", pts, 0.0 if errs else pts, err))
    return out


def format_grades(name: str, grades: list[CellGrade]) -> str:
    auto = [g for g in grades if g.kind == "auto"]
    written = [g for g in grades if g.kind == "written"]
    lines = [f"{name}: autograded {sum(g.earned for g in auto):g} of {sum(g.points for g in auto):g} points; "
             f"written answers {sum(g.points for g in written):g} points, to read by hand"]
    for g in grades:
        if g.kind == "auto":
            status = g.error or "ok"
            lines.append(f"  {g.cell_id:<8} check    {g.earned:g}/{g.points:g}  {status}")
        else:
            lines.append(f"  {g.cell_id:<8} written  ?/{g.points:g}  (compare with the reference in source/)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_np.assignments",
                                description="Build the student notebooks of notebooks/assignments/release/ "
                                            "from the reference notebooks in source/ (nbgrader's markers).")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write release/<assignment>/<assignment>.ipynb from source/",
                       description="Write the student versions (solutions stubbed, hidden tests removed, "
                                   "outputs cleared).")
    b.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if a committed student version differs from a fresh build")
    g = sub.add_parser("grade", help="run a student's filled-in notebook and score its check cells",
                       description="Grade a filled-in notebook without nbgrader: restore the check cells "
                                   "(with the hidden tests) from source/, run it in a fresh kernel, score "
                                   "each check cell that runs without an error, list the written answers.")
    g.add_argument("notebook", nargs="+", help="a student's <assignment>.ipynb")
    g.add_argument("--no-hidden", action="store_true", help="run the visible checks only")
    args = p.parse_args(argv)
    if args.command == "grade":
        for nb in args.notebook:
            print(format_grades(pathlib.Path(nb).name, grade(nb, hidden=not args.no_hidden)))
        return 0
    changed = build(check=args.check)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())

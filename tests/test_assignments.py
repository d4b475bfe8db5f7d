"""The assignments (notebooks/assignments/): the committed student versions equal a fresh build,
and they raise NotImplementedError at each TODO and nowhere else.

The student versions are deliberately unexecuted, so tests/test_notebooks.py skips them; here
their code cells run in-process, one namespace per notebook, in the notebook's own folder (the
assignments use no IPython magics), which takes a fraction of a second per notebook.
"""

import io
import shutil
import traceback

import pytest

nbformat = pytest.importorskip("nbformat")

from lora_np import assignments as AS  # noqa: E402

SOURCES = AS.source_notebooks()
IDS = [p.parent.name for p in SOURCES]


def _read(path):
    return nbformat.read(path, as_version=4)


def _stub_lines(nb):
    """(cell index, 1-based line) of every ``raise NotImplementedError()`` stub in a built notebook."""
    out = set()
    for ci, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.strip() == AS.CODE_STUB[1] and i and lines[i - 1].strip() == AS.CODE_STUB[0]:
                out.add((ci, i + 1))
    return out


def _run_in_process(nb, folder, monkeypatch):
    """Run every code cell (on after an error, as nbclient's allow_errors does); returns
    [(cell index, exception, (cell index, line) where it was raised)]."""
    monkeypatch.chdir(folder)
    ns = {"__name__": "__main__"}
    errors = []
    for ci, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            exec(compile(cell.source, f"<cell {ci}>", "exec"), ns)
        except Exception as e:          # noqa: BLE001 — what a student would see in that cell
            frame = traceback.extract_tb(e.__traceback__)[-1]
            at = (int(frame.filename[6:-1]), frame.lineno) if frame.filename.startswith("<cell ") else \
                (frame.filename, frame.lineno)
            errors.append((ci, e, at))
    return errors


def test_there_are_at_least_three_assignments_in_nbgraders_layout():
    assert len(SOURCES) >= 3, SOURCES
    for src in SOURCES:
        assert src.stem == src.parent.name, f"{src}: nbgrader wants source/<assignment>/<assignment>.ipynb"
        assert AS.release_path(src).exists(), f"no student version of {src.parent.name}"
    release = AS.ASSIGNMENTS / "release"
    released = sorted(p.relative_to(release) for p in release.glob("*/*.ipynb"))
    assert released == sorted(p.relative_to(AS.ASSIGNMENTS / "source") for p in SOURCES), \
        "a student version without a reference notebook"


def test_committed_student_versions_equal_a_fresh_build():
    out = io.StringIO()
    assert AS.build(check=True, out=out) == [], out.getvalue()
    assert AS.main(["build", "--check"]) == 0


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_student_version_has_no_solution_hidden_test_or_output(src):
    ref, rel = _read(src), _read(AS.release_path(src))
    assert [c.id for c in ref.cells] == [c.id for c in rel.cells]
    text = "\n".join(c.source for c in rel.cells)
    for marker in (AS.BEGIN_SOLUTION, AS.END_SOLUTION, AS.BEGIN_HIDDEN, AS.END_HIDDEN):
        assert marker not in text
    assert AS.BEGIN_HIDDEN in "\n".join(c.source for c in ref.cells), f"{src.name}: no hidden tests"
    for c in rel.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
        assert "execution" not in c.metadata
    regions = AS.solution_regions(ref)
    code_regions = [r for r in regions if ref.cells[r[0]].cell_type == "code"]
    assert len(_stub_lines(rel)) == len(code_regions) >= 2
    answers = sum(c.source.count(AS.TEXT_STUB) for c in rel.cells if c.cell_type == "markdown")
    assert answers == len(regions) - len(code_regions) >= 2, "derivation prompts need answer cells"


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_cells_carry_nbgrader_metadata(src):
    nb = _read(src)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells]
    assert len(set(ids)) == len(ids)
    with_solution = {ci for ci, _, _ in AS.solution_regions(nb)}
    for ci, c in enumerate(nb.cells):
        m = c.metadata["nbgrader"]
        assert m["solution"] == (ci in with_solution), f"cell {c.id}: solution flag vs markers"
        if AS.BEGIN_HIDDEN in c.source:
            assert m["grade"] and m["points"] > 0 and m["locked"], \
                f"cell {c.id}: hidden tests in a non-grade cell"
    assert sum(c.metadata["nbgrader"].get("points") or 0 for c in nb.cells) > 0


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_reference_runs_without_error(src, monkeypatch):
    assert _run_in_process(_read(src), src.parent, monkeypatch) == []


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_student_version_raises_not_implemented_only_at_todos(src, monkeypatch):
    rel_path = AS.release_path(src)
    rel = _read(rel_path)
    stubs = _stub_lines(rel)
    errors = _run_in_process(rel, rel_path.parent, monkeypatch)
    assert errors, "the student version ran without reaching a TODO"
    for ci, e, at in errors:
        assert type(e) is NotImplementedError, f"cell {rel.cells[ci].id} raised {type(e).__name__}: {e}"
        assert at in stubs, f"cell {rel.cells[ci].id}: NotImplementedError raised at {at}, not at a TODO"


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_each_todo_raises_on_its_own(src, monkeypatch):
    """With every other solution in place, each TODO alone raises NotImplementedError — from its
    own stub and nowhere else (so no TODO is dead code, and nothing else depends on a stub)."""
    ref = _read(src)
    for k, (ci, _, _) in enumerate(AS.solution_regions(ref)):
        if ref.cells[ci].cell_type != "code":
            continue
        nb = AS.build_notebook(ref, only_region=k)
        (stub,) = _stub_lines(nb)
        errors = _run_in_process(nb, src.parent, monkeypatch)
        assert errors, f"TODO in cell {ref.cells[ci].id} is never reached"
        for cj, e, at in errors:
            assert type(e) is NotImplementedError and at == stub, \
                f"with only cell {ref.cells[ci].id} stubbed, cell {nb.cells[cj].id} raised {e!r} at {at}"


# ------------------------------------------------------------------------ the builder


def _nb(*sources, kind="code"):
    new = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cells = [new(s) for s in sources]
    return nbformat.v4.new_notebook(cells=cells)


def test_build_notebook_stubs_keep_indentation_and_drop_hidden_tests():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    test = "assert f(1) == 2\n### BEGIN HIDDEN TESTS\nassert f(2) == 3\n### END HIDDEN TESTS"
    nb = _nb(src, test)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="x")]
    nb.cells[0].execution_count = 3
    out = AS.build_notebook(nb)
    assert out.cells[0].source == ("def f(x):\n    y = 1\n"
                                   "    # YOUR CODE HERE\n    raise NotImplementedError()")
    assert out.cells[1].source == "assert f(1) == 2"
    assert out.cells[0].outputs == [] and out.cells[0].execution_count is None
    assert nb.cells[0].execution_count == 3 and "return x + y" in nb.cells[0].source   # input unchanged
    md = AS.build_notebook(_nb("Answer:\n### BEGIN SOLUTION\n$x = 1$\n### END SOLUTION", kind="md"))
    assert md.cells[0].source == "Answer:\nYOUR ANSWER HERE"


def test_build_notebook_only_region_keeps_the_other_solutions():
    nb = _nb("### BEGIN SOLUTION\na = 1\n### END SOLUTION", "### BEGIN SOLUTION\nb = 2\n### END SOLUTION")
    out = AS.build_notebook(nb, only_region=1)
    assert out.cells[0].source == "a = 1" and "raise NotImplementedError()" in out.cells[1].source


@pytest.mark.parametrize("src,match", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_unbalanced_markers_are_refused(src, match):
    with pytest.raises(ValueError, match=match):
        AS.build_notebook(_nb(src))


def test_build_writes_and_check_detects_a_stale_release(tmp_path):
    root = tmp_path / "assignments"
    shutil.copytree(AS.ASSIGNMENTS / "source", root / "source")
    out = io.StringIO()
    written = AS.build(root, out=out)
    assert len(written) == len(SOURCES) and all(p.exists() for p in written)
    assert AS.build(root, check=True, out=out) == []
    stale = written[0]
    stale.write_text(stale.read_text(encoding="utf-8").replace("YOUR CODE HERE", "done"), encoding="utf-8")
    assert AS.build(root, check=True, out=out) == [stale]
    assert "DIFFERS" in out.getvalue()
    with pytest.raises(FileNotFoundError):
        AS.build(tmp_path / "empty")


def test_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        AS.main(["--help"])
    assert e.value.code == 0 and "build" in capsys.readouterr().out
    for argv in (["build", "--bogus"], ["--bogus"], [], ["publish"]):
        with pytest.raises(SystemExit) as e:
            AS.main(argv)
        assert e.value.code == 2


# ------------------------------------------------------------- grading without nbgrader


def test_grade_restores_the_checks_and_scores_each(tmp_path):
    """A student who did the forward but not the backward, and "fixed" the backward's check
    cell by deleting its assert, gets the forward's points only: the check cells are restored
    from source/ (with the hidden tests) before the notebook runs."""
    src = AS.ASSIGNMENTS / "source" / "03_lora_embedding" / "03_lora_embedding.ipynb"
    ref = _read(src)
    regions = AS.solution_regions(ref)
    backward = next(k for k, (ci, _, _) in enumerate(regions)
                    if "def lora_embedding_backward" in ref.cells[ci].source)
    nb = AS.build_notebook(ref, only_region=backward)
    call = "check_lora_embedding(lora_embedding_forward, lora_embedding_backward)"
    check = next(c for c in nb.cells if call in c.source)
    check.source = "pass"
    student = tmp_path / src.name
    nbformat.write(nb, student)
    grades = AS.grade(student, source=src)
    auto = [g for g in grades if g.kind == "auto"]
    assert [(g.earned, g.points) for g in auto] == [(2.0, 2.0), (0.0, 4.0)], grades
    assert auto[1].error.startswith("NotImplementedError")
    assert {g.kind for g in grades} == {"auto", "written"}
    text = AS.format_grades(student.name, grades)
    assert "autograded 2 of 6 points" in text and "written answers 6 points" in text
    assert _read(student).cells[nb.cells.index(check)].source == "pass"   # the student's file is unchanged
    with pytest.raises(FileNotFoundError):
        AS.grade(tmp_path / "unknown.ipynb")


def test_readme_table_matches_the_points_in_the_notebooks():
    import re
    text = (AS.ASSIGNMENTS / "README.md").read_text(encoding="utf-8")
    rows = {m[0]: (float(m[1]), float(m[2]), float(m[3]))
            for m in re.findall(r"^\| `(\w+)` \|[^|]*\| (\d+) \((\d+) \+ (\d+)\) \|", text, re.M)}
    assert sorted(rows) == IDS
    for src in SOURCES:
        nb = _read(src)
        pts = [(c.metadata["nbgrader"].get("points") or 0, c.cell_type) for c in nb.cells]
        written = sum(p for p, t in pts if t == "markdown")
        auto = sum(p for p, t in pts if t == "code")
        assert rows[src.parent.name] == (written + auto, written, auto), src.name

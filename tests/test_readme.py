"""The README's ten-line example is a test: run it and compare what it prints with its comments."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _example_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Ten lines of LoRA", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _expected_lines(code: str) -> list[str]:
    """Each printing line's comment, split at ' / ' into the lines it prints."""
    out = []
    for line in code.splitlines():
        if "print(" in line and "#" in line:
            out += [part.strip() for part in line.split("#", 1)[1].split(" / ")]
    return out


def test_readme_example_prints_what_its_comments_say():
    code = _example_block()
    expected = _expected_lines(code)
    assert len(expected) == 5, f"expected 5 commented outputs in the README example, found {expected}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README example", "exec"), {"__name__": "readme_example"})
    assert buf.getvalue().split("\n")[:-1] == expected


def _strip_timing(table: str) -> list[list[str]]:
    """Rows of a results table, split into columns, without the ms/step column (wall time)."""
    lines = [l for l in table.strip().splitlines() if l.strip() and not set(l) <= {"-"}]
    header = lines[0].split("  ")
    header = [h.strip() for h in header if h.strip()]
    col = header.index("ms/step")
    rows = []
    for l in lines[1:]:
        cells = l.replace("full FT", "full_FT").replace("LoRA r=", "LoRA_r=").split()
        assert len(cells) == len(header), f"cannot split README table row {l!r}"
        rows.append(cells[:col] + cells[col + 1:])
    return rows


def test_readme_main_command_table_is_what_the_sweep_prints(default_sweep):
    """The table in 'The main command' section is the output of `python -m lora_np` (same task,
    same seed), every column but ms/step; and so is the paragraph of claims under it."""
    from lora_np.experiments import check_claims, format_claims, format_table

    text = README.read_text(encoding="utf-8")
    section = text.split("## The main command", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```text\n(.*?)```", section, re.S)
    assert len(blocks) == 2, f"expected the table and the claims as two text blocks, found {len(blocks)}"
    readme_table = blocks[0].split("\n\n", 1)[1]          # below the task description and L₀ lines
    assert _strip_timing(readme_table) == _strip_timing(format_table(default_sweep))
    assert f"L₀ (pretrained model's validation loss on task B) = {default_sweep.initial_val_loss:.4e}" in blocks[0]
    assert default_sweep.task.describe() in blocks[0]
    printed_claims = blocks[1].strip().split("\n", 1)[1]       # below the "Claims (...)" heading
    assert printed_claims == format_claims(check_claims(default_sweep)).strip()


def test_readme_lists_every_notebook_once_in_order():
    """'Notebooks' has one line per notebook in notebooks/, in numbered order, and every file
    and figure the README links to exists."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(\d\d_\w+\.ipynb)`", section, re.M)
    on_disk = sorted(p.name for p in (README.parent / "notebooks").glob("*.ipynb"))
    assert listed == on_disk
    for link in re.findall(r"\]\(((?:figures|notebooks)/[^)#]+)\)", text):
        assert (README.parent / link).exists(), f"README links to {link}, which does not exist"


def test_readme_text_table_is_what_the_text_experiment_wrote():
    """The real-text section's table rows are copied from figures/text_results.md, which only
    ``python -m lora_np --task text`` writes."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## LoRA on real text", 1)[1].split("\n## ", 1)[0]
    rows = [l for l in section.splitlines() if l.startswith("| ")]
    assert len(rows) >= 10, f"expected the results table in the README's real-text section, got {rows}"
    results = (README.parent / "figures" / "text_results.md").read_text(encoding="utf-8")
    missing = [r for r in rows if r not in results.splitlines()]
    assert not missing, f"README rows not in figures/text_results.md: {missing}"
    samples = section.split("```text\n", 1)[1].split("```", 1)[0]
    assert samples in results, "the README's samples are not the ones figures/text_results.md holds"

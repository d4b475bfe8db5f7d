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

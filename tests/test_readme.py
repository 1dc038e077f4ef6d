"""The README's example runs as a user copies it, on the embedded default model."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    match = re.search(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert match, "the README has a python example"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_example_runs_on_the_default_model(capsys):
    from smollm2 import gguf_path

    gguf_path()  # skips without the embedded model's package
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith(("verdicts: [", "no review: ")), out
    assert re.fullmatch(r"cache hit rate: \d+%", lines[-1]), out

"""Run the documentation's examples: every ```python block of docs/*.md whose first line is
``# test: scripted``. Blocks with top-level ``await`` (notebook style) run under
``anyio.run`` on asyncio and trio; blocks without it are scripts and run as they are."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import anyio
import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
MARKER = "# test: scripted"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def examples() -> list[tuple[pathlib.Path, int, str]]:
    found = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            code = match.group(1)
            if code.lstrip().startswith(MARKER):
                found.append((path, text.count("\n", 0, match.start()) + 2, code))
    return found


def compile_example(path: pathlib.Path, line: int, code: str):
    # Padded so that tracebacks point at the line of the markdown file.
    return compile("\n" * (line - 1) + code, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def runs() -> list[pytest.param]:
    """Notebook-style examples on both event loops; scripts once (they pick their own)."""
    params = []
    for path, line, code in examples():
        is_async = compile_example(path, line, code).co_flags & inspect.CO_COROUTINE
        for loop in ("asyncio", "trio") if is_async else ("script",):
            params.append(pytest.param(path, line, code, loop, id=f"{path.name}:{line}-{loop}"))
    return params


def test_docs_have_runnable_examples():
    names = {path.name for path, _, _ in examples()}
    assert {"getting-started.md", "language.md"} <= names


@pytest.mark.parametrize(("path", "line", "code", "loop"), runs())
def test_doc_example_runs(path, line, code, loop):
    compiled = compile_example(path, line, code)
    namespace = {"__name__": "__doc_example__"}
    if loop == "script":
        exec(compiled, namespace)
        return

    async def main():
        await eval(compiled, namespace)

    anyio.run(main, backend=loop)

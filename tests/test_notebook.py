"""The engine in a real headless Jupyter notebook (nbclient + ipykernel) on a busy machine:
as fast as the same code run as a script, and quiet at start.

A kernel runs the embedded SmolLM2 with top-level ``await``, and a subprocess runs the same
code under ``asyncio.run``, one after the other, while one spinning process per core keeps
every core busy. Each times a 24-token generation (the best of three, after a warm-up).
The engine sizes its own torch thread pool (usable cores minus one), so the kernel's extra
threads and the busy cores must not slow it down much more than the script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from smollm2 import gguf_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow

PROMPT = "Write a short story about a lighthouse keeper."
# The notebook's cells; the script runs the same lines inside ``async def main()``.
CELLS = [
    """\
import json
import time

import aiolm

start = time.perf_counter()
engine = aiolm.Engine()
await engine.start()
start_s = time.perf_counter() - start
await engine.generate("Hello", max_tokens=4)""",
    f"""\
generate_s = []
for _ in range(3):
    start = time.perf_counter()
    completion = await engine.generate({PROMPT!r}, max_tokens=24, ignore_eos=True)
    generate_s.append(time.perf_counter() - start)
await engine.aclose()
print("RESULT", json.dumps({{"start_s": start_s, "generate_s": generate_s,
                            "tokens": completion.usage.completion_tokens}}))""",
]
SCRIPT = ("import asyncio\n\nasync def main():\n"
          + "\n".join(textwrap.indent(cell, "    ") for cell in CELLS)
          + "\n\nasyncio.run(main())\n")


def run_env(tmp_path) -> dict[str, str]:
    """The environment both run in: the user's, without the test suite's debug checks."""
    env = {k: v for k, v in os.environ.items() if k != "AIOLM_DEBUG_CHECKS"}
    env["IPYTHONDIR"] = str(tmp_path / "ipython")   # no profile or history of the user's
    return env


@contextmanager
def busy_cores() -> Iterator[None]:
    """One process spinning on each core for the duration."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


def result_of(text: str) -> dict:
    line = next(line for line in text.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def run_notebook(tmp_path) -> tuple[dict, list[str]]:
    """Execute the cells in a fresh kernel: the result, and every stderr text of the start
    cell."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in CELLS]
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=run_env(tmp_path))
    start_errors = [out.get("text", "") for out in nb.cells[0].outputs
                    if out.get("name") == "stderr"]
    printed = "".join(out.get("text", "") for out in nb.cells[1].outputs
                      if out.get("name") == "stdout")
    return result_of(printed), start_errors


def run_script(tmp_path) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=run_env(tmp_path), cwd=tmp_path, timeout=600, check=True)
    return result_of(done.stdout)


def test_a_notebook_is_about_as_fast_as_a_script_on_a_busy_machine(tmp_path):
    gguf_path()   # skips without the embedded model
    with busy_cores():
        script = run_script(tmp_path)
        notebook, start_errors = run_notebook(tmp_path)
    print(f"\nunder load: script {script}, notebook {notebook}")
    assert script["tokens"] == notebook["tokens"] == 24
    # The best of three: the other processes of a shared machine come and go.
    assert min(notebook["generate_s"]) <= 2 * min(script["generate_s"]), (notebook, script)
    assert not any("IProgress" in text for text in start_errors), start_errors

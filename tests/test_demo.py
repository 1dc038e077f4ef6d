"""`aiolm demo` (the README's main command) runs its program on the embedded model."""

import anyio
import pytest

from aiolm.demo import run_demo


@pytest.mark.slow
def test_demo_program_runs_on_the_embedded_model(capsys):
    anyio.run(run_demo, None, "cpu")
    out = capsys.readouterr().out
    assert "capital:    Paris" in out
    assert out.count("tip (") == 3
    assert "served from the radix cache" in out

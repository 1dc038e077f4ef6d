"""Messages a new user meets in the first hour say what to do (issue 19's list)."""

from __future__ import annotations

import pytest

from aiolm.backends.engine import Engine, LoadedModel

pytestmark = pytest.mark.anyio


async def test_start_after_aclose_says_the_engine_was_closed():
    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    engine = Engine(loaded, max_total_tokens=256)
    await engine.start()
    await engine.aclose()
    with pytest.raises(RuntimeError, match="this engine was closed; create a new Engine"):
        await engine.start()


async def test_a_hub_id_says_aiolm_never_downloads_weights():
    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face hub id: aiolm never "
                                                "downloads weights"):
        await Engine("HuggingFaceTB/SmolLM2-135M-Instruct").start()


def test_cuda_without_a_gpu_fails_when_the_engine_is_made():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but CUDA is not available"):
        Engine("tiny-llama", load_format="dummy", device="cuda")


def test_aiolm_version_and_help(capsys):
    from aiolm.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("aiolm ")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "serve" in out and "bench" in out
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_python_dash_m_aiolm_is_the_aiolm_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "aiolm", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("aiolm ")


async def test_the_server_refuses_a_temperature_openai_refuses():
    import httpx

    from aiolm.backends import ScriptedBackend
    from aiolm.server import create_app

    app = create_app(ScriptedBackend())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1") as http:
        bad = await http.post("/v1/completions", json={
            "model": ScriptedBackend().model_name, "prompt": "Hi", "temperature": 5})
        good = await http.post("/v1/completions", json={
            "model": ScriptedBackend().model_name, "prompt": "Hi", "temperature": 2,
            "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    assert good.status_code == 200

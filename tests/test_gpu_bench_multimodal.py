"""The multimodal benchmark workloads on the 7B geometries with random weights, on a GPU:
``aiolm bench image-qa image-qa-fork --dummy llava-1.5-7b`` and ``aiolm bench video-qa
--dummy qwen2.5-vl-7b`` at tiny size, with the radix ablation and the transformers peer
(bf16, CUDA events timing the vision tower). The same code path as
tests/test_bench_multimodal.py's tiny models on the CPU, at the real size.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.mark.parametrize("model,workloads", [
    ("llava-1.5-7b", ["image-qa", "image-qa-fork"]),
    ("qwen2.5-vl-7b", ["video-qa", "image-qa"]),
])
def test_multimodal_workloads_run_on_the_7b_geometry(model, workloads, tmp_path):
    from aiolm.bench.cli import bench_main

    out = tmp_path / "r.json"
    code = bench_main([*workloads, "--dummy", model, "--device", "cuda", "--size", "tiny",
                       "--ablate", "radix", "--peer", "hf", "--no-progress", "--out", str(out)])
    records = json.loads(out.read_text())["workloads"]
    assert code == 0, [r["errors"] for r in records]
    assert [r["name"] for r in records] == workloads
    for r in records:
        on, off, hf = r["runs"]["aiolm"], r["runs"]["radix-off"], r["runs"]["hf"]
        assert on["cache_hit_rate"] > off["cache_hit_rate"] == 0.0
        assert 0 < on["vision_images"] < hf["vision_images"]
        assert on["vision_s"] > 0 and hf["vision_s"] > 0

"""The multimodal benchmark workloads (image-qa, image-qa-fork, video-qa) at tiny size on
the CPU: tiny-llava and tiny-qwen2.5-vl with dummy weights and the bench tokenizer, the
radix ablation and the transformers peer (its ``...ForConditionalGeneration`` over the
engine's very tensors), the vision-tower figures, and the command line.

``--dummy llava-1.5-7b`` / ``qwen2.5-vl-7b`` on a GPU take the same code path with the 7B
geometry (named configs, the same processors built from the config, the same peer).
"""

from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from aiolm import UnsupportedFeature, assistant, gen, image, program, user, video  # noqa: E402
from aiolm.bench import ALL_WORKLOADS, MULTIMODAL_WORKLOADS, WORKLOADS  # noqa: E402
from aiolm.bench.cli import bench_main  # noqa: E402
from aiolm.bench.harness import plan, run_plan  # noqa: E402
from aiolm.bench.image_qa import synthetic_image  # noqa: E402
from aiolm.bench.targets import EngineTarget, HFTarget  # noqa: E402
from aiolm.bench.video_qa import synthetic_clip  # noqa: E402

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 8192}


@pytest.fixture(scope="module")
def llava():
    from aiolm.bench.models import load_for_bench

    return load_for_bench("tiny-llava", load_format="dummy", device="cpu")


@pytest.fixture(scope="module")
def qwen_vl():
    from aiolm.bench.models import load_for_bench

    return load_for_bench("tiny-qwen2.5-vl", load_format="dummy", device="cpu")


def test_questions_about_one_image_share_its_bytes_and_interleave():
    inputs = MULTIMODAL_WORKLOADS["image-qa"].make_inputs("tiny", 0)
    shape = MULTIMODAL_WORKLOADS["image-qa"].shape("tiny")
    pictures = [i["picture"] for i in inputs]
    assert len(inputs) == shape.images * shape.questions_per_image
    assert len(set(pictures)) == shape.images
    assert pictures[0] != pictures[1]                    # neighbours ask about different images
    assert pictures[0] == pictures[shape.images]
    clips = MULTIMODAL_WORKLOADS["video-qa"].make_inputs("tiny", 0)
    clip_shape = MULTIMODAL_WORKLOADS["video-qa"].shape("tiny")
    assert clips[0]["frames"] is clips[clip_shape.clips]["frames"]
    assert len(clips[0]["frames"]) == clip_shape.frames


def test_the_suites_run_only_the_text_workloads():
    assert set(MULTIMODAL_WORKLOADS).isdisjoint(WORKLOADS)
    assert set(ALL_WORKLOADS) == set(WORKLOADS) | set(MULTIMODAL_WORKLOADS)


def _check_records(results, names, shapes_of):
    """Every variant ran every program; radix on hits the cache, radix off never does; the
    engine runs the vision tower at least once per image and less often than the peer,
    which runs it in every call."""
    assert [r["name"] for r in results] == names
    for r in results:
        assert r["errors"] == {}, r["name"]
        assert list(r["runs"]) == ["aiolm", "radix-off", "hf"]
        w = MULTIMODAL_WORKLOADS[r["name"]]
        programs = len(w.make_inputs("tiny", 0))
        on, off, hf = r["runs"]["aiolm"], r["runs"]["radix-off"], r["runs"]["hf"]
        for figures in (on, off, hf):
            assert figures["programs"] == programs
            assert figures["completion_tokens"] > 0
            assert figures["vision_s"] > 0
        assert on["cache_hit_rate"] > off["cache_hit_rate"] == 0.0
        assert hf["vision_calls"] == hf["vision_images"] == hf["requests"]  # one image a call
        assert shapes_of(w.shape("tiny")) <= on["vision_images"] < hf["vision_images"]
        assert on["vision_calls"] <= on["vision_images"]    # a pass's images in one call
        assert on["vision_ms_per_call"] == pytest.approx(1000 * on["vision_s"] / on["vision_calls"])
        assert on["vision_ms_per_image"] == pytest.approx(
            1000 * on["vision_s"] / on["vision_images"])
        assert set(r["ratios"]) == {"aiolm/radix-off", "aiolm/hf"}


@pytest.mark.anyio
async def test_image_qa_and_its_fork_variant_run_with_the_radix_ablation_and_the_peer(llava):
    target = EngineTarget(llava, **ENGINE_KWARGS)
    peer = HFTarget(target)
    names = ["image-qa", "image-qa-fork"]
    steps = plan([ALL_WORKLOADS[n] for n in names], target, size="tiny", ablations=["radix"],
                 peer=peer)
    try:
        results = await run_plan(steps, size="tiny")
    finally:
        await target.aclose()
        await peer.aclose()
    _check_records(results, names, lambda shape: shape.images)
    fork = results[1]["runs"]
    shape = ALL_WORKLOADS["image-qa-fork"].shape("tiny")
    # A caption, then one branch per question, for every image.
    assert fork["aiolm"]["requests"] == shape.images * (1 + shape.questions_per_image)


@pytest.mark.anyio
async def test_video_qa_runs_with_the_radix_ablation_and_the_peer(qwen_vl):
    target = EngineTarget(qwen_vl, **ENGINE_KWARGS)
    peer = HFTarget(target)
    steps = plan([ALL_WORKLOADS["video-qa"]], target, size="tiny", ablations=["radix"], peer=peer)
    try:
        results = await run_plan(steps, size="tiny")
    finally:
        await target.aclose()
        await peer.aclose()
    _check_records(results, ["video-qa"], lambda shape: shape.clips)


@program
async def _ask_image(s, picture, question):
    s += user(image(picture) + question)
    s += assistant(gen("answer", max_tokens=10, temperature=0, ignore_eos=True))


@program
async def _ask_video(s, frames, question):
    s += user(video(frames, num_frames=4) + question)
    s += assistant(gen("answer", max_tokens=10, temperature=0, ignore_eos=True))


@pytest.mark.anyio
@pytest.mark.parametrize("model", ["llava", "qwen_vl"])
async def test_the_peer_answers_what_the_engine_answers(model, request):
    from aiolm.backends.engine import Engine
    from aiolm.bench.hf_backend import HFBackend

    loaded = request.getfixturevalue(model)
    rng = random.Random(5)
    picture, _ = synthetic_image(rng, (64, 48))
    frames, _ = synthetic_clip(rng, 8, (56, 42))
    cases = [(_ask_image, picture)] + ([(_ask_video, frames)] if model == "qwen_vl" else [])
    peer = HFBackend(loaded)
    async with Engine(loaded, device="cpu") as engine:
        for ask, visual in cases:
            ours = await ask.run(visual, "What is in it?", backend=engine)
            theirs = await ask.run(visual, "What is in it?", backend=peer)
            assert theirs["answer"] == ours["answer"]


def test_the_peer_shares_the_engines_tensors(llava, qwen_vl):
    from aiolm.bench.models import to_transformers

    for loaded in (llava, qwen_vl):
        hf = to_transformers(loaded)
        ours = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
        theirs = {p.untyped_storage().data_ptr() for p in hf.parameters()}
        assert theirs == ours          # every weight, the vision tower's too, is one of ours
        assert type(hf).__name__ == type(loaded.model).__name__


@pytest.mark.anyio
async def test_the_peer_of_an_image_model_refuses_video(llava):
    from aiolm.bench.hf_backend import HFBackend

    peer = HFBackend(llava)
    assert peer.capabilities.images and not peer.capabilities.video
    frames, _ = synthetic_clip(random.Random(0), 4, (56, 42))
    with pytest.raises(UnsupportedFeature, match="does not take video"):
        await _ask_video.run(frames, "What moves?", backend=peer)


@pytest.mark.anyio
async def test_a_text_model_records_a_clear_error():
    from aiolm.bench.models import load_for_bench

    text_only = load_for_bench("tiny-llama", load_format="dummy", device="cpu")
    target = EngineTarget(text_only, **ENGINE_KWARGS)
    try:
        results = await run_plan(plan([ALL_WORKLOADS["image-qa"]], target, size="tiny"),
                                 size="tiny")
    finally:
        await target.aclose()
    assert "does not take images" in results[0]["errors"]["aiolm"]


def test_the_command_line_runs_a_multimodal_workload(tmp_path):
    out = tmp_path / "r.json"
    code = bench_main(["image-qa", "--dummy", "tiny-llava", "--device", "cpu", "--size", "tiny",
                       "--ablate", "radix", "--no-progress", "--out", str(out)])
    assert code == 0
    (record,) = json.loads(out.read_text())["workloads"]
    assert list(record["runs"]) == ["aiolm", "radix-off"]
    assert record["runs"]["aiolm"]["vision_images"] >= ALL_WORKLOADS["image-qa"].shape("tiny").images
    assert record["runs"]["radix-off"]["cache_hit_rate"] == 0.0

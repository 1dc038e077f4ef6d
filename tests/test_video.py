"""``aiolm.video``: frames sampled from a file (written here with PyAV) or given as frames,
the errors for bad sources before any token, and the program layer's refusal on backends
that take no video."""

from __future__ import annotations

import wave

import pytest

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")
PIL = pytest.importorskip("PIL.Image")

import aiolm  # noqa: E402
from aiolm import assistant, gen, user  # noqa: E402
from aiolm._program.videos import load_video, sample_indices  # noqa: E402
from aiolm.backends import ScriptedBackend  # noqa: E402
from aiolm.values import VideoData  # noqa: E402

pytestmark = pytest.mark.anyio

W, H, N, RATE = 64, 48, 20, 10


def _color(i: int) -> tuple[int, int, int]:
    return (12 * i, 255 - 12 * i, (40 * i) % 256)


def _write_clip(path, frames: int = N) -> None:
    """A ``frames``-frame clip at RATE fps: frame i is one colour, ``_color(i)``."""
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            pixels = np.full((H, W, 3), _color(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_clip(path)
    return path


def _mean_color(video: VideoData, k: int) -> np.ndarray:
    frame = np.frombuffer(video.frames[k], dtype=np.uint8).reshape(video.height, video.width, 3)
    return frame.reshape(-1, 3).mean(0)


def test_sample_indices_spread_evenly_from_first_to_last():
    assert sample_indices(20, 5) == [0, 5, 10, 14, 19]
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(7, 1) == [0]
    assert sample_indices(0, 4) == []


async def test_frames_are_sampled_uniformly_from_a_file(clip):
    video = await load_video(clip, 5)
    assert (video.num_frames, video.width, video.height) == (5, W, H)
    for k, index in enumerate([0, 5, 10, 14, 19]):
        np.testing.assert_allclose(_mean_color(video, k), _color(index), atol=6)
    # 5 frames over 1.9 s of the clip: about 2.1 frames a second.
    assert video.fps == pytest.approx(4 / 1.9)


async def test_a_file_given_as_bytes_samples_the_same_frames(clip):
    from_path = await load_video(clip, None)
    from_bytes = await load_video(clip.read_bytes(), None)
    assert from_path.num_frames == 8  # the default
    assert from_bytes.digest == from_path.digest


async def test_frames_given_as_images_or_arrays_are_taken_as_they_are():
    images = [PIL.new("RGB", (W, H), _color(i)) for i in range(6)]
    arrays = [np.asarray(im) for im in images]
    a = await load_video(images, None)
    b = await load_video(arrays, None)
    assert a.num_frames == 6 and a.fps is None
    assert a.digest == b.digest
    c = await load_video(images, 3)
    assert c.frames == (a.frames[0], a.frames[2], a.frames[5])
    assert c.digest != a.digest


def test_zero_frames_and_bad_arguments_fail_when_the_expr_is_built():
    with pytest.raises(ValueError, match="no frames"):
        aiolm.video([])
    with pytest.raises(ValueError, match="empty path"):
        aiolm.video("")
    with pytest.raises(ValueError, match="num_frames"):
        aiolm.video("clip.mp4", num_frames=0)
    with pytest.raises(TypeError, match="frame 1"):
        aiolm.video([PIL.new("RGB", (4, 4)), "not a frame"])
    with pytest.raises(TypeError, match="expected a path"):
        aiolm.video(42)
    with pytest.raises(ValueError, match="no frames"):
        VideoData(frames=(), width=4, height=4)


async def test_an_unreadable_or_missing_video_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        await load_video(b"this is not a video file", None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        await load_video(tmp_path / "missing.mp4", None)
    with pytest.raises(ValueError, match="frames of different sizes"):
        await load_video([PIL.new("RGB", (4, 4)), PIL.new("RGB", (8, 4))], None)


async def test_a_file_without_video_frames_fails_clearly(tmp_path):
    path = tmp_path / "sound.wav"   # a readable media file, but audio only
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x00" * 800)
    with pytest.raises(ValueError, match="has no video stream"):
        await load_video(path, None)


async def test_a_backend_without_video_refuses_it_before_any_token(clip):
    seen: list[str] = []

    def reply(prompt: str) -> str:
        seen.append(prompt)
        return "ok"

    @aiolm.program
    async def describe(s):
        s += user(aiolm.video(clip) + "What happens?")
        s += assistant(gen("answer", max_tokens=4))

    with pytest.raises(aiolm.UnsupportedFeature, match="does not take video"):
        await describe.run(backend=ScriptedBackend(reply))
    assert seen == []


async def test_a_video_outside_a_turn_is_a_program_error(clip):
    @aiolm.program
    async def bad(s):
        s += aiolm.video(clip)

    with pytest.raises(aiolm.ProgramError, match="inside a turn"):
        await bad.run(backend=ScriptedBackend())

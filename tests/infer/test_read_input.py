"""File inputs for inference: animated GIFs (Pillow) and video files through ffmpeg when it is
on PATH. The ffmpeg path is checked against stand-in ffmpeg/ffprobe executables that emit known
frames, so the plumbing (probe, raw rgb24 frames, reshape, errors) is tested on every machine."""

import os
import stat

import numpy as np
import pytest
from PIL import Image

from generalist.infer.generalist import read_input


def test_gif_frames_round_trip(tmp_path, gen):
    import torch

    frames = (torch.rand(4, 10, 12, 3, generator=gen) * 255).to(torch.uint8).numpy()
    frames[..., :] = frames[..., :1]  # grey, so the GIF palette holds every value exactly
    frames = (frames // 32) * 32
    path = tmp_path / "clip.gif"
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=50, loop=0, optimize=False, disposal=1)
    got = read_input("video", str(path))
    assert got.shape == (4, 10, 12, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, frames)


def _fake_tools(bin_dir, width, height, payload: bytes, probe_fails=False):
    bin_dir.mkdir()
    (bin_dir / "frames.bin").write_bytes(payload)
    scripts = {
        "ffprobe": "echo 'no stream' >&2; exit 1" if probe_fails else f"echo {width},{height}",
        "ffmpeg": f"cat {bin_dir / 'frames.bin'}",
    }
    for name, body in scripts.items():
        exe = bin_dir / name
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_mp4_through_ffmpeg(tmp_path, monkeypatch, gen):
    import torch

    frames = (torch.rand(3, 6, 5, 3, generator=gen) * 255).to(torch.uint8).numpy()
    _fake_tools(tmp_path / "bin", 5, 6, frames.tobytes())
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really an mp4")
    np.testing.assert_array_equal(read_input("video", str(video)), frames)


def test_video_errors_are_one_line(tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs ffmpeg and ffprobe on PATH"):
        read_input("video", str(video))
    _fake_tools(tmp_path / "bin", 5, 6, b"\x00" * 7)  # not a whole number of frames
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match="cannot decode"):
        read_input("video", str(video))
    _fake_tools(tmp_path / "bin2", 5, 6, b"", probe_fails=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin2") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match="cannot read .*no stream"):
        read_input("video", str(video))
    bad = tmp_path / "bad.gif"
    bad.write_bytes(b"GIF89a broken")
    with pytest.raises(ValueError, match="cannot read"):
        read_input("video", str(bad))
    with pytest.raises(ValueError, match="unsupported file type '.flv'"):
        flv = tmp_path / "clip.flv"
        flv.write_bytes(b"x")
        read_input("video", str(flv))


def test_long_text_is_the_text():
    """A text too long to be a file name is the text itself, not an OSError from looking for the file."""
    text = "Men have become the tools of their tools. " * 7
    assert read_input("text", text) == text


@pytest.mark.parametrize("modality, value", [("image", "x" * 300 + ".png"), ("text", "x" * 300 + ".txt")],
                         ids=["image", "txt"])
def test_overlong_file_name_is_one_line(modality, value):
    with pytest.raises(ValueError, match=f"--{modality}: cannot read x+"):
        read_input(modality, value)


def _wav_bytes(path, frames=1600):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(frames, "<i2").tobytes())
    return path.read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:44 + 200], "truncated: its header promises 1600 frames, but only 100 are present"),
    (lambda b: b[:24] + bytes(8) + b[32:], "has a frame rate of 0"),
    (lambda b: b[:18] + b"\x89" + b[19:], "cannot read"),  # the fmt chunk's size runs past the file
], ids=["cut_short", "rate_0", "chunk_size"])
def test_damaged_wav_is_refused(tmp_path, damage, message):
    path = tmp_path / "a.wav"
    path.write_bytes(damage(_wav_bytes(path)))
    with pytest.raises(ValueError, match=message) as info:
        read_input("audio", str(path))
    assert str(info.value).startswith("--audio: ") and "a.wav" in str(info.value)


def test_damaged_npy_header_is_one_line(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((8, 8), np.float32))
    path.write_bytes(path.read_bytes().replace(b"}", b" ", 1))
    with pytest.raises(ValueError, match="--table: cannot read .*a.npy as a .npy array"):
        read_input("table", str(path))


def _gif_bytes(path):
    frames = [Image.fromarray((np.random.default_rng(i).random((16, 16)) * 255).astype(np.uint8)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path.read_bytes()


def test_every_cut_gif_is_read_or_refused(tmp_path):
    """A GIF cut short anywhere gives frames or one ValueError (Pillow raises IndexError, struct.error)."""
    data = _gif_bytes(tmp_path / "clip.gif")
    path = tmp_path / "cut.gif"
    for end in range(1, len(data), 2):
        path.write_bytes(data[:end])
        try:
            read_input("video", str(path))
        except ValueError as error:
            assert "--video: cannot read" in str(error) and "cut.gif" in str(error)


def test_gif_bomb_video_is_one_line(tmp_path):
    data = bytearray(_gif_bytes(tmp_path / "clip.gif"))
    data[6:10] = (15000).to_bytes(2, "little") * 2  # a 15000 x 15000 canvas
    path = tmp_path / "bomb.gif"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="--video: cannot read .*bomb.gif.*decompression bomb"):
        read_input("video", str(path))

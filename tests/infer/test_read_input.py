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

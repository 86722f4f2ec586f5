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


def _ppm(frame) -> bytes:
    return b"P6\n%d %d\n255\n" % (frame.shape[1], frame.shape[0]) + frame.tobytes()


def _fake_ffmpeg(bin_dir, payload: bytes, fails=False):
    bin_dir.mkdir()
    (bin_dir / "frames.bin").write_bytes(payload)
    exe = bin_dir / "ffmpeg"
    body = "echo 'Invalid data found when processing input' >&2; exit 1" if fails else f"cat {bin_dir / 'frames.bin'}"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_mp4_through_ffmpeg(tmp_path, monkeypatch, gen):
    """ffmpeg writes PPM frames, each naming its size: a portrait clip stored sideways (which
    ffmpeg turns upright) comes back in the size ffmpeg gives, not the size the file stores."""
    import torch

    frames = (torch.rand(3, 6, 5, 3, generator=gen) * 255).to(torch.uint8).numpy()
    _fake_ffmpeg(tmp_path / "bin", b"".join(_ppm(f) for f in frames))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really an mp4")
    np.testing.assert_array_equal(read_input("video", str(video)), frames)


def test_ppm_headers_may_use_any_whitespace(gen):
    import torch

    from generalist.infer.generalist import ppm_frames

    frames = (torch.rand(2, 3, 4, 3, generator=gen) * 255).to(torch.uint8).numpy()
    data = b"P6 4\t3\r\n255\n" + frames[0].tobytes() + b"P6\n4 3 255 " + frames[1].tobytes()
    np.testing.assert_array_equal(ppm_frames(data), frames)


@pytest.mark.parametrize("payload, message", [
    (_ppm(np.zeros((6, 5, 3), np.uint8))[:-1], r"frame 0 \(5x6\) is cut short"),
    (_ppm(np.zeros((6, 5, 3), np.uint8)) + b"P6\n5", "frame 1 is cut short in its header"),
    (_ppm(np.zeros((6, 5, 3), np.uint8)) + _ppm(np.zeros((5, 6, 3), np.uint8)),
     "frame 1 is 6x5, frame 0 5x6; the frames of a clip share one size"),
    (b"P5\n5 6\n255\n" + bytes(30), "frame 0 is not an 8-bit binary PPM picture"),
    (b"P6\n5 6\n65535\n" + bytes(180), "frame 0 is not an 8-bit binary PPM picture"),
], ids=["cut", "cut_header", "sizes_differ", "grey", "16_bit"])
def test_bad_ffmpeg_output_is_refused(tmp_path, monkeypatch, payload, message):
    _fake_ffmpeg(tmp_path / "bin", payload)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    with pytest.raises(ValueError, match=f"--video: cannot decode .*clip.mp4: {message}"):
        read_input("video", str(video))


def test_video_errors_are_one_line(tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="needs ffmpeg on PATH"):
        read_input("video", str(video))
    _fake_ffmpeg(tmp_path / "bin", b"", fails=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match="cannot decode .*: Invalid data found"):
        read_input("video", str(video))
    _fake_ffmpeg(tmp_path / "bin2", b"")
    monkeypatch.setenv("PATH", str(tmp_path / "bin2") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match="cannot decode .*: no video in it"):
        read_input("video", str(video))
    bad = tmp_path / "bad.gif"
    bad.write_bytes(b"GIF89a broken")
    with pytest.raises(ValueError, match="cannot read"):
        read_input("video", str(bad))
    with pytest.raises(ValueError, match="unsupported file type '.flv'"):
        flv = tmp_path / "clip.flv"
        flv.write_bytes(b"x")
        read_input("video", str(flv))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG ramps from black to white; a plain RGB conversion clips it all to white."""
    ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    got = read_input("image", str(tmp_path / "deep.png"))
    assert got.shape == (16, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.repeat(np.rint(ramp / 257).astype(np.uint8)[..., None], 3, -1))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_lands_on_white(tmp_path, mode):
    """Training pictures are composited onto white; so is a transparent input (not onto black)."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (200, 40, 40, 255)  # an opaque square on a fully transparent field
    im = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":
        im = im.quantize(colors=4, method=Image.Quantize.FASTOCTREE)
    im.save(tmp_path / "t.png")
    got = read_input("image", str(tmp_path / "t.png"))
    assert (got[0, 0] == 255).all() and (got[7, 7] == 255).all()
    assert got[3, 3].max() < 255


def test_gif_frames_with_transparency_land_on_white(tmp_path):
    frame = Image.new("P", (6, 6), 0)
    frame.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    second = frame.copy()
    frame.paste(1, (2, 2, 4, 4))
    second.paste(1, (3, 3, 5, 5))
    frame.save(tmp_path / "t.gif", save_all=True, append_images=[second], transparency=0, disposal=2)
    got = read_input("video", str(tmp_path / "t.gif"))
    assert got.shape == (2, 6, 6, 3)
    assert (got[:, 0, 0] == 255).all() and (got[:, 3, 3] == (255, 0, 0)).all()
    assert (got[0, 5, 5] == 255).all() and (got[1, 2, 2] == 255).all()


def test_jpeg_exif_orientation_is_applied(tmp_path):
    """A camera's portrait photo is stored sideways with an EXIF orientation; it is read upright."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :8] = 255  # the stored picture's left quarter is white
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored picture is to be turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "p.jpg", exif=exif, quality=95)
    got = read_input("image", str(tmp_path / "p.jpg"))
    assert got.shape == (32, 16, 3)
    assert got[:8].mean() > 200 and got[12:].mean() < 50  # its left became its top


def test_text_file_drops_byte_order_mark_and_last_line_break(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes("\ufeffwhat is a koala?\r\n".encode("utf-8"))
    assert read_input("text", str(path)) == "what is a koala?"
    path.write_bytes(b"two\nlines\n\n")
    assert read_input("text", str(path)) == "two\nlines\n"
    path.write_bytes(b"\xef\xbb\xbfab\xffcd")  # the bad byte's offset counts the byte-order mark
    with pytest.raises(ValueError, match="is not UTF-8 text .* at byte 5"):
        read_input("text", str(path))


def test_sixteen_bit_grey_transparency_lands_on_white(tmp_path):
    grey = np.full((4, 4), 30000, np.uint16)
    grey[0, 0] = 0  # the transparent value
    Image.fromarray(grey).save(tmp_path / "t.png", transparency=0)
    got = read_input("image", str(tmp_path / "t.png"))
    assert (got[0, 0] == 255).all() and (got[1, 1] == round(30000 / 257)).all()


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
    """A GIF cut short anywhere gives frames (1 to 3 whole 16x16 ones) or one ValueError (Pillow
    raises IndexError, struct.error); both happen, and the whole file reads as its 3 frames."""
    data = _gif_bytes(tmp_path / "clip.gif")
    assert read_input("video", str(tmp_path / "clip.gif")).shape == (3, 16, 16, 3)
    path = tmp_path / "cut.gif"
    outcomes = {"frames": 0, "refused": 0}
    for end in range(1, len(data), 2):
        path.write_bytes(data[:end])
        try:
            clip = read_input("video", str(path))
        except ValueError as error:
            assert "--video: cannot read" in str(error) and "cut.gif" in str(error)
            outcomes["refused"] += 1
        else:
            assert clip.dtype == np.uint8 and clip.shape[1:] == (16, 16, 3) and 1 <= clip.shape[0] <= 3, clip.shape
            outcomes["frames"] += 1
    assert outcomes["frames"] and outcomes["refused"], outcomes


def test_gif_bomb_video_is_one_line(tmp_path):
    data = bytearray(_gif_bytes(tmp_path / "clip.gif"))
    data[6:10] = (15000).to_bytes(2, "little") * 2  # a 15000 x 15000 canvas
    path = tmp_path / "bomb.gif"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="--video: cannot read .*bomb.gif.*decompression bomb"):
        read_input("video", str(path))


def _wav(tag, bits, channels, rate, payload: bytes, extensible=False, chunks=b"", data_size=None):
    """A WAV file by hand: RIFF header, optional chunks before the data, fmt (or extensible fmt)."""
    import struct

    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, sub-format GUID (its first two bytes: the tag)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + bytes(14)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + chunks
    body += b"data" + struct.pack("<I", len(payload) if data_size is None else data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


_SAMPLES = np.array([[0.5, -0.25], [-1.0, 0.75], [0.0, 0.125]])  # 3 frames of 2 channels, exact in every format


@pytest.mark.parametrize("tag, bits, encode", [
    (1, 8, lambda x: (x * 128 + 128).clip(0, 255).astype(np.uint8).tobytes()),
    (1, 16, lambda x: (x * 32768).astype("<i2").tobytes()),
    (1, 24, lambda x: b"".join(int(v).to_bytes(3, "little", signed=True) for v in (x * 2 ** 23).ravel())),
    (1, 32, lambda x: (x * 2 ** 31).astype("<i4").tobytes()),
    (3, 32, lambda x: x.astype("<f4").tobytes()),
    (3, 64, lambda x: x.astype("<f8").tobytes()),
], ids=["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"])
@pytest.mark.parametrize("extensible", [False, True], ids=["plain", "extensible"])
def test_wav_formats_are_read_to_mono_floats(tmp_path, tag, bits, encode, extensible):
    path = tmp_path / "a.wav"
    list_chunk = b"LIST" + (5).to_bytes(4, "little") + b"INFO!" + b"\x00"  # an odd size, padded
    path.write_bytes(_wav(tag, bits, 2, 22050, encode(_SAMPLES), extensible, chunks=list_chunk))
    waveform, rate = read_input("audio", str(path))
    assert rate == 22050 and waveform.dtype == np.float32
    np.testing.assert_allclose(waveform, _SAMPLES.mean(axis=1), atol=1e-6)


def test_a_streamed_wav_is_read_to_its_end(tmp_path):
    """espeak-ng --stdout and ffmpeg writing to a pipe leave a placeholder data size; the samples
    then run to the end of the file. A smaller size that runs past the end is a cut file."""
    payload = (_SAMPLES[:, :1] * 32768).astype("<i2").tobytes()
    path = tmp_path / "s.wav"
    for placeholder in (0x7FFFF000, 0xFFFFFFFF):
        path.write_bytes(_wav(1, 16, 1, 16000, payload, data_size=placeholder))
        np.testing.assert_allclose(read_input("audio", str(path))[0], _SAMPLES[:, 0])
    path.write_bytes(_wav(1, 16, 1, 16000, payload, data_size=100))
    with pytest.raises(ValueError, match="truncated: its header promises 50 frames, but only 3 are present"):
        read_input("audio", str(path))


@pytest.mark.parametrize("tag, bits, message", [
    (6, 8, "format tag 6 with 8 bits per sample is not read here"),  # A-law
    (3, 16, "float with 16 bits per sample is not read here"),
    (1, 12, "integer PCM with 12 bits per sample is not read here"),
])
def test_unsupported_wav_formats_are_named(tmp_path, tag, bits, message):
    path = tmp_path / "a.wav"
    path.write_bytes(_wav(tag, bits, 1, 8000, bytes(12)))
    with pytest.raises(ValueError, match=f"--audio: cannot read .*a.wav: {message}"):
        read_input("audio", str(path))


@pytest.mark.parametrize("data, message", [
    (b"OggS" + bytes(40), r"not a WAV file \(no RIFF/WAVE header\)"),
    (b"RIFF\x04\x00\x00\x00WAVE", "the file ends early"),
    (b"RIFF\x10\x00\x00\x00WAVEdata\x00\x00\x00\x00", "no format chunk before the samples"),
])
def test_files_that_are_no_wav_are_named(tmp_path, data, message):
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"--audio: cannot read .*a.wav: {message}"):
        read_input("audio", str(path))


def test_every_cut_wav_is_read_or_refused(tmp_path):
    data = _wav(1, 24, 2, 8000, bytes(6 * 50), extensible=True)
    path = tmp_path / "cut.wav"
    for end in range(0, len(data)):  # every cut, in the header or in the samples, is refused
        path.write_bytes(data[:end])
        with pytest.raises(ValueError, match="--audio: cannot read .*cut.wav"):
            read_input("audio", str(path))


def test_compressed_audio_through_ffmpeg(tmp_path, monkeypatch):
    """An .mp3 (or .flac, .ogg, a video's soundtrack) is decoded by ffmpeg to a WAV on its
    stdout, a streamed one (placeholder sizes), and read like a WAV file."""
    payload = (_SAMPLES * 32768).astype("<i2").tobytes()
    _fake_ffmpeg(tmp_path / "bin", _wav(1, 16, 2, 44100, payload, data_size=0xFFFFFFFF))
    song = tmp_path / "song.mp3"
    song.write_bytes(b"ID3 not really an mp3")
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"--audio: reading .mp3 files needs ffmpeg on PATH .*or pass a WAV file"):
        read_input("audio", str(song))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{path}")
    for name in ("song.mp3", "song.flac", "clip.mp4"):
        (tmp_path / name).write_bytes(b"x")
        waveform, rate = read_input("audio", str(tmp_path / name))
        assert rate == 44100
        np.testing.assert_allclose(waveform, _SAMPLES.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("suffix", [".webp", ".tiff"])
def test_more_image_formats(tmp_path, suffix):
    pixels = np.zeros((6, 5, 3), np.uint8)
    pixels[:, :, 0] = 200
    Image.fromarray(pixels).save(tmp_path / f"a{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(read_input("image", str(tmp_path / f"a{suffix}")), pixels)


def _recording_ffmpeg(bin_dir, payload: bytes = b"", stderr: str = ""):
    """A stand-in ffmpeg that writes its arguments to args.txt, `stderr` to its stderr, and
    `payload` to its stdout (failing when there is none)."""
    bin_dir.mkdir()
    (bin_dir / "out.bin").write_bytes(payload)
    (bin_dir / "err.txt").write_text(stderr)
    exe = bin_dir / "ffmpeg"
    exe.write_text(f'#!/bin/sh\necho "$@" > {bin_dir / "args.txt"}\ncat {bin_dir / "err.txt"} >&2\n'
                   f'cat {bin_dir / "out.bin"}\n[ -s {bin_dir / "out.bin"} ]\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir / "args.txt"


def test_large_files_are_refused_before_they_are_decoded(tmp_path, monkeypatch):
    """With the embedder's config, a picture or clip beyond its max_size / max_frames is refused
    from the file's header (Pillow) or from ffmpeg stopped one frame past max_frames, never
    decoded whole: a phone's video would take gigabytes."""
    import generalist.infer.generalist as infer
    from generalist.modalities import AudioConfig, ImageConfig, VideoConfig

    def never(*args):
        raise AssertionError("decoded")

    Image.new("L", (300, 40)).save(tmp_path / "wide.png")
    monkeypatch.setattr(infer, "picture_rgb", never)
    with pytest.raises(ValueError, match=r"^--image: .*wide.png is 300x40, and the model reads at most 64 pixels a "
                                         r"side \(max_size\)"):
        read_input("image", str(tmp_path / "wide.png"), ImageConfig(max_size=64))
    frames = [Image.new("L", (16, 16), color=i * 10) for i in range(5)]
    frames[0].save(tmp_path / "long.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"long.gif has 5 frames, and the model reads at most 4 \(max_frames\)"):
        read_input("video", str(tmp_path / "long.gif"), VideoConfig(max_frames=4, tubelet_time=2))
    monkeypatch.undo()
    assert read_input("video", str(tmp_path / "long.gif"), VideoConfig(max_frames=8)).shape == (5, 16, 16, 3)
    assert read_input("image", str(tmp_path / "wide.png")).shape == (40, 300, 3)  # no config: no limit

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    args = _recording_ffmpeg(tmp_path / "bin", b"".join(_ppm(np.zeros((8, 8, 3), np.uint8)) for _ in range(5)))
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match=r"clip.mp4 has more than 4 frames, and the model reads at most 4"):
        read_input("video", str(video), VideoConfig(max_frames=4, tubelet_time=2))
    assert "-frames:v 5" in args.read_text()  # ffmpeg stops one frame past the limit
    assert read_input("video", str(video), VideoConfig(max_frames=8, max_size=8, patch=4)).shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match=r"clip.mp4 is 8x8, and the model reads at most 4 pixels a side"):
        read_input("video", str(video), VideoConfig(max_frames=8, max_size=4, patch=4))
    assert "-frames:v" not in (read_input("video", str(video)), args.read_text())[1]  # no config: every frame

    sound = tmp_path / "a.mp3"
    sound.write_bytes(b"x")
    args = _recording_ffmpeg(tmp_path / "bin2", _wav_bytes(tmp_path / "long.wav", frames=16000 * 3))
    monkeypatch.setenv("PATH", str(tmp_path / "bin2") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match=r"a.mp3 lasts more than 3.0 s; the model hears at most 2 s"):
        read_input("audio", str(sound), AudioConfig(max_seconds=2.0))
    assert "-t 3" in args.read_text()  # ffmpeg stops a second past the limit
    with pytest.raises(ValueError, match=r"long.wav lasts 3.0 s; the model hears at most 2 s"):
        read_input("audio", str(tmp_path / "long.wav"), AudioConfig(max_seconds=2.0))
    assert read_input("audio", str(tmp_path / "long.wav"), AudioConfig(max_seconds=3.0))[1] == 16000


@pytest.mark.parametrize("stderr, modality, message", [
    ("[mov,mp4 @ 0x55] moov atom not found\n{path}: Invalid data found when processing input\n", "video",
     r"cannot decode .*clip.mp4: Invalid data found when processing input$"),
    ("Stream map '0:a:0' matches no streams.\nTo ignore this, add a trailing '?' to the map.\n", "audio",
     r"cannot decode .*clip.mp4: it has no sound stream$"),
    ("Stream map '0:v:0' matches no streams.\nTo ignore this, add a trailing '?' to the map.\n", "video",
     r"cannot decode .*clip.mp4: it has no video stream$"),
], ids=["damaged", "no_sound", "no_picture"])
def test_ffmpeg_failures_are_one_line(tmp_path, monkeypatch, stderr, modality, message):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x")
    _recording_ffmpeg(tmp_path / "bin", stderr=stderr.format(path=video))
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(ValueError, match=message) as info:
        read_input(modality, str(video))
    assert "\n" not in str(info.value)


def test_empty_inputs_are_refused(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    with pytest.raises(ValueError, match=r"--text: .*blank.txt holds no text"):
        read_input("text", str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="--image is empty: give a file"):
        read_input("image", "")

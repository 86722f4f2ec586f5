"""Audio: resampling, the log-mel spectrogram, AudioEmbed patches and positions, errors."""

import math

import numpy as np
import pytest
import torch

from generalist.modalities import AudioConfig, AudioEmbed, build_embedders, log_mel, resample
from generalist.modalities import Prepared
from generalist.modalities.audio import LOG_EPS, mel_filterbank, warp_frequencies


def _tone(freq, sr, seconds=1.0, phase=0.0):
    t = torch.arange(int(round(seconds * sr)), dtype=torch.float64) / sr
    return torch.sin(2 * math.pi * freq * t + phase)


def _direct_resample(x, orig, new, n, zero_crossings=32, rolloff=0.9, beta=8.6):
    """Output sample n from the formula in `resample`'s docstring, in numpy float64."""
    x = np.asarray(x, np.float64)
    cutoff = rolloff * min(1.0, new / orig)
    half = math.ceil(zero_crossings / cutoff)
    t = n * orig / new
    j = np.arange(math.floor(t) - half + 1, math.floor(t) + half + 1)
    d = t - j
    window = np.i0(beta * np.sqrt(np.clip(1 - (d / half) ** 2, 0, None))) / np.i0(beta)
    h = cutoff * np.sinc(cutoff * d) * window
    inside = (j >= 0) & (j < len(x))
    return float((h[inside] * x[j[inside]]).sum())


@pytest.mark.parametrize("orig,new", [(44100, 16000), (8000, 16000), (16000, 22050), (16001, 16000)])
def test_resample_matches_the_formula(gen, orig, new):
    # (16001, 16000) has 16000 phases and takes the per-sample gather path, the others conv1d.
    x = torch.randn(3000, generator=gen, dtype=torch.float64)
    y = resample(x, orig, new)
    assert y.shape == (math.ceil(3000 * new / orig),) and y.dtype == torch.float64
    for n in [0, 1, 2, 37, len(y) // 2, len(y) - 2, len(y) - 1]:
        assert y[n].item() == pytest.approx(_direct_resample(x, orig, new, n), abs=1e-9)


def test_a_rate_equal_as_a_fraction_is_not_filtered(gen):
    """16000.0000001 Hz is 16 kHz to the resampler (rates are read as fractions): the samples come
    back unchanged, not low-passed at 0.9 of Nyquist."""
    x = torch.randn(4000, generator=gen)
    assert torch.equal(resample(x, 16000.0000001, 16000), x)
    assert torch.equal(log_mel(x, 16000.0000001), log_mel(x, 16000))


@pytest.mark.parametrize("mid", [8000, 22050, 44100])
def test_resample_round_trip_of_band_limited_signal(mid):
    sr = 16000
    x = (_tone(300, sr) + _tone(1100, sr, phase=1.0) + _tone(2700, sr, phase=2.0)).float() / 3
    back = resample(resample(x, sr, mid), mid, sr)
    assert back.shape == x.shape
    # Away from the ends (zero beyond them), the signal survives within 1e-3.
    torch.testing.assert_close(back[800:-800], x[800:-800], atol=1e-3, rtol=0)


def test_mel_filterbank_is_htk_triangles():
    cfg = AudioConfig()
    fb_SM = mel_filterbank(cfg)
    assert fb_SM.shape == (201, 64)
    assert (fb_SM >= 0).all() and (fb_SM <= 1).all() and (fb_SM.sum(0) > 0).all()
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    edges_hz = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, mel(8000), 66)]
    bins_hz = np.arange(201) * 40.0
    for m in (0, 1, 10, 40, 63):
        lo, centre, hi = edges_hz[m:m + 3]
        expect = np.clip(np.minimum((bins_hz - lo) / (centre - lo), (hi - bins_hz) / (hi - centre)), 0, None)
        np.testing.assert_allclose(fb_SM[:, m].numpy(), expect, atol=1e-6)
        assert abs(int(fb_SM[:, m].argmax()) * 40 - centre) < 40


@pytest.mark.parametrize("n_fft", [400, 401, 255])
def test_mel_filters_sit_on_the_stft_bins(n_fft):
    """STFT bin k is at k * sample_rate / n_fft, for odd n_fft too (its last bin is below Nyquist)."""
    cfg = AudioConfig(n_fft=n_fft, n_mels=16, patch_freq=16)
    fb_SM = mel_filterbank(cfg)
    assert fb_SM.shape == (n_fft // 2 + 1, 16)
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    edges_hz = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, mel(8000), 18)]
    bins_hz = np.arange(n_fft // 2 + 1) * 16000 / n_fft
    for m in (0, 7, 15):
        lo, centre, hi = edges_hz[m:m + 3]
        expect = np.clip(np.minimum((bins_hz - lo) / (centre - lo), (hi - bins_hz) / (hi - centre)), 0, None)
        np.testing.assert_allclose(fb_SM[:, m].numpy(), expect, atol=1e-6)


def test_loud_but_plausible_waveforms_are_accepted(gen):
    _embed(gen)((torch.randn(1600, generator=gen).clamp(-9.9, 9.9), 16000))
    _embed(gen)((np.random.default_rng(0).uniform(-1, 1, 1600)[::-1].astype(">f4"), 16000))


@pytest.mark.parametrize("sr", [8000, 22050, 44100])
def test_sine_peaks_in_the_same_mel_bin_at_any_rate(sr):
    ref_bin = int(log_mel(_tone(1000, 16000), 16000).mean(0).argmax())
    fb_SM = mel_filterbank(AudioConfig())
    assert abs(int(fb_SM[:, ref_bin].argmax()) * 40 - 1000) <= 40  # the bin holds 1 kHz
    spec_TM = log_mel(_tone(1000, sr).float(), sr)
    assert spec_TM.shape == (101, 64) and spec_TM.dtype == torch.float32
    assert int(spec_TM[5:-5].mean(0).argmax()) == ref_bin


def test_log_mel_frame_by_hand(gen):
    cfg = AudioConfig()
    x = torch.randn(4000, generator=gen, dtype=torch.float64)
    spec_TM = log_mel(x, 16000, cfg)
    assert spec_TM.shape == (1 + 4000 // 160, 64)
    xp = np.pad(x.numpy(), 200, mode="reflect")
    n = np.arange(400)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 400)  # periodic hann
    for i in (0, 7, 25):
        power = np.abs(np.fft.rfft(xp[i * 160:i * 160 + 400] * window)) ** 2
        expect = np.log(power @ mel_filterbank(cfg).double().numpy() + LOG_EPS)
        np.testing.assert_allclose(spec_TM[i].numpy(), expect, rtol=1e-9, atol=1e-9)
    silence = log_mel(torch.zeros(1600), 16000)
    assert torch.equal(silence, torch.full_like(silence, math.log(LOG_EPS)))


def _embed(gen, d=8, **cfg):
    torch.manual_seed(gen.initial_seed())
    return AudioEmbed(AudioConfig(**cfg), d)


def test_patches_positions_and_tokens_by_hand(gen):
    embed = _embed(gen)
    wave = torch.randn(8000, generator=gen) * 0.1  # 0.5 s -> 51 frames -> 13 time patches
    tokens_LD, positions_L3 = embed((wave, 16000))
    assert tokens_LD.shape == (13 * 4, 8) and tokens_LD.dtype == torch.float32
    assert positions_L3.dtype == torch.int64
    assert positions_L3.tolist() == [[a, b, 0] for a in range(13) for b in range(4)]
    spec_TM = log_mel(wave, 16000)
    spec_TM = torch.cat([spec_TM, torch.full((1, 64), math.log(LOG_EPS))])  # pad 51 -> 52
    W, bias = embed.proj.weight, embed.proj.bias
    for k, (a, b, _) in enumerate(positions_L3.tolist()):
        patch = spec_TM[4 * a:4 * a + 4, 16 * b:16 * b + 16].reshape(-1)  # (pt, pf) order
        torch.testing.assert_close(tokens_LD[k], W @ patch + bias)


def test_inputs_at_other_rates_and_numpy(gen):
    embed = _embed(gen)
    wave = _tone(440, 44100, seconds=0.25)
    tokens_LD, positions_L3 = embed((wave.numpy(), 44100.0))
    # 11025 samples at 44.1 kHz -> 4000 at 16 kHz -> 26 frames -> 7 time patches of 4 frames
    assert tokens_LD.shape == (7 * 4, 8)
    assert positions_L3[-1].tolist() == [6, 3, 0]
    torch.testing.assert_close(embed((wave.float(), 44100))[0], tokens_LD, atol=1e-3, rtol=1e-3)


def test_gradients_reach_parameters(gen):
    embed = _embed(gen)
    tokens_LD, _ = embed((torch.randn(1600, generator=gen), 16000))
    tokens_LD.square().sum().backward()
    for name, p in embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("data,match", [
    ((torch.zeros(0), 16000), "waveform is empty"),
    ((torch.zeros(100), 16000), r"too short: 100 samples at 16000 Hz; need at least one STFT window \(400"),
    ((torch.zeros(150), 8000), "too short: 150 samples at 8000 Hz"),
    ((torch.tensor([0.0, float("nan")] * 500), 16000), "waveform contains NaN or inf"),
    ((torch.tensor([0.0, float("inf")] * 500), 16000), "waveform contains NaN or inf"),
    ((torch.zeros(2, 16000), 16000), r"1-D mono \(N,\); got shape \(2, 16000\).*average the channels"),
    ((torch.zeros(16000), 0), "sample_rate must be a positive number; got 0"),
    ((torch.zeros(16000), -8000), "sample_rate must be a positive number; got -8000"),
    ((torch.zeros(16000), float("nan")), "sample_rate must be a positive number"),
    ((torch.zeros(16000), "16k"), "sample_rate must be a positive number"),
    ((torch.zeros(16000, dtype=torch.int16), 16000), "floating point .*; got torch.int16"),
    ((torch.zeros(48000), 16000), r"waveform lasts 3.000 s; max_seconds is 2.0"),
    (torch.zeros(16000), r"audio input must be a pair \(waveform, sample_rate\)"),
    (([0.0] * 1000, 16000), "waveform must be a torch.Tensor or numpy array; got list"),
    ((torch.linspace(-20000, 30000, 1600), 16000), r"samples must be in \[-1, 1\]; its peak is 30000 .*divide by 32768"),
    ((torch.linspace(-20, 300, 1600), 16000), r"its peak is 300 \(scale it to \[-1, 1\]\)$"),  # no 16-bit scale
])
def test_bad_inputs_raise(gen, data, match):
    with pytest.raises(ValueError, match=match):
        _embed(gen, max_seconds=2.0)(data)


@pytest.mark.parametrize("cfg,match", [
    (dict(n_mels=60), r"n_mels \(60\) must be a multiple of patch_freq \(16\)"),
    (dict(hop=0), "hop must be >= 1"),
    (dict(max_seconds=0.01), "shorter than one STFT window"),
    (dict(f_max=9000.0), "f_max <= sample_rate / 2"),
])
def test_bad_config_raises(cfg, match):
    with pytest.raises(ValueError, match=match):
        AudioConfig(**cfg)


def test_max_positions_bound_the_longest_clip(gen):
    embed = build_embedders(8, 300, {"audio": AudioConfig(max_seconds=1.0)})["audio"]
    assert embed.max_positions == (26, 4, 1)  # 1 + 16000 // 160 = 101 frames -> 26 patches
    _, positions_L3 = embed((torch.randn(44100, generator=gen), 44100))
    assert tuple(int(m) + 1 for m in positions_L3.max(0).values) == embed.max_positions


@pytest.mark.parametrize("hz,alpha", [(1000, 1.2), (2000, 0.85), (600, 1.1), (3000, 0.9)])
def test_warp_moves_a_tone_to_alpha_times_its_frequency(hz, alpha):
    cfg = AudioConfig()
    warped = warp_frequencies(log_mel(_tone(hz, 16000), 16000), alpha, cfg)
    target = log_mel(_tone(hz * alpha, 16000), 16000)
    moved = int(warped[5:-5].mean(0).argmax())
    assert moved != int(log_mel(_tone(hz, 16000), 16000)[5:-5].mean(0).argmax())
    assert abs(moved - int(target[5:-5].mean(0).argmax())) <= 1


def test_warp_frequencies_by_hand(gen):
    """Bin m reads the spectrogram at mel(hz(center m) / alpha) by linear interpolation between
    bin centers, clamped at the first and last (numpy's interp)."""
    cfg = AudioConfig(n_mels=32, patch_freq=16, f_min=50.0, f_max=7000.0)
    spec_TM = torch.randn(7, 32, generator=gen)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    centers = np.linspace(mel(50), mel(7000), 34)[1:-1]
    for alpha in (0.8, 0.93, 1.0001, 1.17, 2.5):
        expect = np.stack([np.interp(mel(hz(centers) / alpha), centers, row) for row in spec_TM.double().numpy()])
        got = warp_frequencies(spec_TM, alpha, cfg)
        assert got.shape == spec_TM.shape and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expect, atol=1e-5)
    assert warp_frequencies(spec_TM, 1.0, cfg) is spec_TM
    for bad in (0, -1.1, float("nan"), float("inf"), "1.1", None, True):
        with pytest.raises(ValueError, match="alpha must be a positive number"):
            warp_frequencies(spec_TM, bad, cfg)
    for shape in ((7, 64), (7, 31), (32,)):
        with pytest.raises(ValueError, match=r"the spectrogram must be \(T, 32\) \(n_mels\); got"):
            warp_frequencies(torch.zeros(shape), 1.1, cfg)


def test_embed_warp_round_trips_the_patches(gen):
    embed = _embed(gen)
    wave = torch.randn(5000, generator=gen) * 0.1  # 32 frames: 8 whole time patches
    prepared = Prepared(*embed.prepare((wave, 16000)))
    spec_TM = embed.spectrogram(prepared.features)
    assert torch.equal(spec_TM, log_mel(wave, 16000))
    assert torch.equal(embed.patches(spec_TM)[0], prepared.features)
    for alpha in (0.87, 1.13):
        warped = embed.warp(prepared, alpha)
        assert warped.positions is prepared.positions
        torch.testing.assert_close(embed.spectrogram(warped.features), warp_frequencies(spec_TM, alpha, embed.cfg))
        assert not torch.allclose(warped.features, prepared.features)
    assert torch.equal(embed.warp(prepared, 1.0).features, prepared.features)
    # a clip whose last time patch is padded (35 frames in 9 patches of 4): the padding stays silence
    wave = torch.randn(5500, generator=gen) * 0.1
    prepared = Prepared(*embed.prepare((wave, 16000)))
    floor = torch.full((1, 64), math.log(LOG_EPS))
    assert torch.equal(embed.spectrogram(prepared.features), torch.cat([log_mel(wave, 16000), floor]))
    torch.testing.assert_close(embed.spectrogram(embed.warp(prepared, 0.9).features),
                               torch.cat([warp_frequencies(log_mel(wave, 16000), 0.9, embed.cfg), floor]))
    for bad in (torch.zeros(6, 64), torch.zeros(8, 63), torch.zeros(8)):
        with pytest.raises(ValueError, match=r"audio patches must be \(L, 64\) with L a multiple of 4"):
            embed.spectrogram(bad)

"""Audio: a log-mel spectrogram computed with torch, cut into time-frequency patches.

Shapes: N waveform samples, O output samples of one resampling chunk, K filter taps, T
spectrogram frames, M mel bins, S STFT bins (n_fft // 2 + 1), pt / pf patch time / frequency
size, A = ceil(T / pt) time patches, B = M // pf frequency patches, L = A * B tokens,
Q = pt * pf values per patch, D d_model; in `resample`, b filter phases, J conv kernel width,
G groups of b output samples.

Pipeline: a mono float waveform at any sample rate is resampled to `AudioConfig.sample_rate`
with a Kaiser-windowed sinc (band-limited interpolation, any rate ratio, anti-aliasing cutoff
just below the lower Nyquist frequency); then STFT (hann window, centered, reflect padding),
power spectrum, an HTK-mel triangular filterbank, and log(mel + 1e-6). No torchaudio.

Token order is time-major: all frequency patches of time patch 0 (low to high frequency), then
time patch 1, ... Token k covers frames [a*pt, (a+1)*pt) and mel bins [b*pf, (b+1)*pf) with
a, b = divmod(k, B); its position is (a, b, 0). The patch is flattened in (pt, pf) order. The
last time patch is padded with log(1e-6), the spectrogram's floor, i.e. silence.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .image import PatchEmbed, check_finite, grid_positions, to_tensor

if TYPE_CHECKING:
    from . import Prepared

LOG_EPS = 1e-6


@dataclass
class AudioConfig:
    """The target sample rate and STFT / mel settings, the patch size and the longest clip.
    f_max None means sample_rate / 2."""

    sample_rate: int = 16000
    n_mels: int = 64
    n_fft: int = 400
    hop: int = 160
    patch_time: int = 4
    patch_freq: int = 16
    max_seconds: float = 30.0
    f_min: float = 0.0
    f_max: float | None = None

    def __post_init__(self):
        for name in ("sample_rate", "n_mels", "n_fft", "hop", "patch_time", "patch_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"AudioConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.n_mels % self.patch_freq:
            raise ValueError(f"AudioConfig.n_mels ({self.n_mels}) must be a multiple of "
                             f"patch_freq ({self.patch_freq})")
        if not self.max_seconds * self.sample_rate >= self.n_fft:
            raise ValueError(f"AudioConfig.max_seconds ({self.max_seconds}) is shorter than one "
                             f"STFT window of {self.n_fft} samples")
        f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not 0 <= self.f_min < f_max <= self.sample_rate / 2:
            raise ValueError(f"AudioConfig needs 0 <= f_min < f_max <= sample_rate / 2; got "
                             f"f_min {self.f_min}, f_max {f_max}")

    @property
    def max_frames(self) -> int:
        """Frames of the longest clip: centered STFT of ceil(max_seconds * sample_rate) samples."""
        return 1 + math.ceil(self.max_seconds * self.sample_rate) // self.hop


def _sinc_taps(frac_O: Tensor, half: int, cutoff: float, beta: float) -> Tensor:
    """(O,) fractional input times in [0, 1) -> (O, K) float64 filter taps, K = 2 * half, for
    the input samples at offsets -half + 1 .. half from floor(t)."""
    k_K = torch.arange(-half + 1, half + 1, dtype=torch.float64, device=frac_O.device)
    x_OK = frac_O[:, None] - k_K  # distance to each tap in input samples, in [-half, half)
    window_OK = torch.special.i0(beta * torch.sqrt((1 - (x_OK / half) ** 2).clamp(min=0)))
    window_OK = window_OK / torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    return cutoff * torch.sinc(cutoff * x_OK) * window_OK


def resample(waveform_N: Tensor, orig_sr: float, new_sr: float, *, zero_crossings: int = 32,
             rolloff: float = 0.9, beta: float = 8.6, chunk: int = 16384) -> Tensor:
    """(N,) at orig_sr -> (ceil(N * new_sr / orig_sr),) at new_sr, band-limited interpolation.

    Output sample n sits at input time t = n * orig_sr / new_sr and is sum_j x[j] h(t - j), with
    h a sinc low-pass at `rolloff` times the lower of the two Nyquist frequencies, windowed by a
    Kaiser window (`beta`) that spans `zero_crossings` zeros of the sinc on each side. Samples
    beyond the ends count as zero. Any rate ratio works (rates are read as fractions with
    denominators up to 1000) and time is kept in exact integer arithmetic.

    For a ratio a / b in lowest terms the filter has b phases. Common ratios (44.1 kHz -> 16 kHz
    is 441 / 160) run as one strided conv1d with b output channels, one per phase; awkward ones
    (16.001 kHz -> 16 kHz) gather taps per output sample in chunks of `chunk` samples.
    """
    step = Fraction(orig_sr).limit_denominator(1000) / Fraction(new_sr).limit_denominator(1000)
    a, b = step.numerator, step.denominator  # output n sits at input time n * a / b
    if a == b:  # the same rate as fractions read it (16000.0000001 Hz too): no filter
        return waveform_N
    n_in, dtype, device = waveform_N.shape[0], waveform_N.dtype, waveform_N.device
    n_out = -(-n_in * b // a)
    cutoff = rolloff * min(1.0, b / a)  # fraction of the input Nyquist frequency
    half = math.ceil(zero_crossings / cutoff)  # filter half-width in input samples
    # Output n = m * b + r reads padded input [m * a + base_r + 1, m * a + base_r + 2 * half].
    base_b = torch.arange(b, device=device) * a // b
    width = 2 * half + int(base_b[-1]) + 1
    if b * width <= 1 << 22:
        table_bK = _sinc_taps(torch.arange(b, dtype=torch.float64, device=device) * a % b / b,
                              half, cutoff, beta)
        cols_bK = base_b[:, None] + 1 + torch.arange(2 * half, device=device)
        weight_bJ = torch.zeros(b, width, dtype=torch.float64, device=device)
        weight_bJ.scatter_(1, cols_bK, table_bK)
        n_groups = -(-n_out // b)
        right = max(0, (n_groups - 1) * a + width - n_in - half)
        padded = F.pad(waveform_N, (half, right))
        out_bG = F.conv1d(padded[None, None], weight_bJ.to(dtype)[:, None], stride=a)[0]
        return out_bG[:, :n_groups].transpose(0, 1).reshape(-1)[:n_out]
    table_bK = None
    if b <= n_out:  # tabulate the phases once; otherwise compute each sample's taps directly
        table_bK = _sinc_taps(torch.arange(b, dtype=torch.float64, device=device) / b,
                              half, cutoff, beta).to(dtype)
    padded = F.pad(waveform_N, (half, half))
    offsets_K = torch.arange(1, 2 * half + 1, device=device)
    out = []
    for start in range(0, n_out, chunk):
        num_O = torch.arange(start, min(start + chunk, n_out), device=device) * a
        base_O, phase_O = num_O // b, num_O % b
        if table_bK is not None:
            h_OK = table_bK[phase_O]
        else:
            h_OK = _sinc_taps(phase_O.double() / b, half, cutoff, beta).to(dtype)
        out.append((h_OK * padded[base_O[:, None] + offsets_K]).sum(-1))
    return torch.cat(out)


def _to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_edges(cfg: AudioConfig) -> Tensor:
    """(M + 2,) float64 mel values of the filterbank's edges, evenly spaced: filter m rises from
    edge m, peaks at edge m + 1 (its center) and falls to edge m + 2."""
    f_max = cfg.sample_rate / 2 if cfg.f_max is None else cfg.f_max
    lo, hi = _to_mel(torch.tensor([cfg.f_min, f_max], dtype=torch.float64)).tolist()
    return torch.linspace(lo, hi, cfg.n_mels + 2, dtype=torch.float64)


def mel_filterbank(cfg: AudioConfig, device: torch.device | None = None) -> Tensor:
    """(S, M) float32 triangular filters on the HTK mel scale, mel = 2595 log10(1 + f / 700)."""
    hz_P = _to_hz(mel_edges(cfg))  # the M + 2 filter edges
    freqs_S = torch.arange(cfg.n_fft // 2 + 1, dtype=torch.float64) * (cfg.sample_rate / cfg.n_fft)  # the STFT bins
    lo, mid, hi = hz_P[:-2], hz_P[1:-1], hz_P[2:]
    up_SM = (freqs_S[:, None] - lo) / (mid - lo)
    down_SM = (hi - freqs_S[:, None]) / (hi - mid)
    return torch.minimum(up_SM, down_SM).clamp(min=0).to(torch.float32).to(device)


# The loudest sample accepted. Full scale is 1.0; a louder float signal still has a spectrum
# (gain only shifts the log-mel), but far beyond it the samples are on another scale, e.g. 16-bit
# integers (peaks in the hundreds or thousands), and would be heard as a much louder sound.
MAX_PEAK = 10.0


def _check_waveform(waveform: Any, sample_rate: Any, cfg: AudioConfig) -> Tensor:
    x = to_tensor(waveform, "waveform")
    if not x.is_floating_point():
        raise ValueError(f"waveform must be floating point (samples in [-1, 1]); got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"waveform must be 1-D mono (N,); got shape {tuple(x.shape)} "
                         f"(for stereo, average the channels first)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) \
            or not math.isfinite(sample_rate) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number; got {sample_rate!r}")
    if x.shape[0] == 0:
        raise ValueError("waveform is empty")
    check_finite(x, "waveform")
    peak = float(x.abs().max())
    if peak > MAX_PEAK:
        hint = "16-bit samples: divide by 32768" if 1000 < peak <= 32768 else "scale it to [-1, 1]"
        raise ValueError(f"waveform samples must be in [-1, 1]; its peak is {peak:g} ({hint})")
    seconds = x.shape[0] / sample_rate
    if seconds > cfg.max_seconds:
        raise ValueError(f"waveform lasts {seconds:.3f} s; max_seconds is {cfg.max_seconds}")
    if math.ceil(x.shape[0] * cfg.sample_rate / sample_rate) < cfg.n_fft:
        raise ValueError(f"waveform is too short: {x.shape[0]} samples at {sample_rate} Hz; "
                         f"need at least one STFT window ({cfg.n_fft} samples at "
                         f"{cfg.sample_rate} Hz)")
    return x


def log_mel(waveform_N: Any, sample_rate: float, cfg: AudioConfig | None = None) -> Tensor:
    """Mono waveform (N,) at `sample_rate` -> log-mel spectrogram (T, M) at cfg.sample_rate,
    T = 1 + (N' + 2 (n_fft // 2) - n_fft) // hop frames for N' resampled samples (1 + N' // hop
    for an even n_fft); values >= log(1e-6)."""
    cfg = AudioConfig() if cfg is None else cfg
    x_N = _check_waveform(waveform_N, sample_rate, cfg)
    if not x_N.dtype == torch.float64:
        x_N = x_N.float()
    x_N = resample(x_N, float(sample_rate), cfg.sample_rate)
    window = torch.hann_window(cfg.n_fft, dtype=x_N.dtype, device=x_N.device)
    spec_ST = torch.stft(x_N, cfg.n_fft, hop_length=cfg.hop, window=window, center=True,
                         pad_mode="reflect", return_complex=True)
    power_TS = spec_ST.abs().square().transpose(0, 1)
    mel_TM = power_TS @ mel_filterbank(cfg, x_N.device).to(x_N.dtype)
    return torch.log(mel_TM + LOG_EPS)


def warp_frequencies(spec_TM: Tensor, alpha: float, cfg: AudioConfig) -> Tensor:
    """The log-mel spectrogram (T, M) of the same sound with every frequency f moved to alpha * f:
    vocal tract length perturbation (Jaitly & Hinton 2013), which makes a voice sound as from a
    vocal tract 1 / alpha as long. Bin m takes the value at its center frequency / alpha, read
    on the mel axis by linear interpolation between the two nearest bin centers; below the first
    center and above the last the nearest bin's value is taken. alpha 1 gives `spec_TM` back."""
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"warp_frequencies: alpha must be a positive number; got {alpha!r}")
    if spec_TM.dim() != 2 or spec_TM.shape[1] != cfg.n_mels:
        raise ValueError(f"warp_frequencies: the spectrogram must be (T, {cfg.n_mels}) (n_mels); got "
                         f"{tuple(spec_TM.shape)}")
    if alpha == 1:
        return spec_TM
    edges_P = mel_edges(cfg)  # (float64, on the host: some devices have no float64)
    step = float(edges_P[1] - edges_P[0])
    source_M = _to_mel(_to_hz(edges_P[1:-1]) / alpha)  # where each bin center's value comes from
    pos_M = ((source_M - edges_P[1]) / step).clamp(0, cfg.n_mels - 1)
    lo_M = pos_M.floor().long()
    hi_M = (lo_M + 1).clamp(max=cfg.n_mels - 1)
    w_M = (pos_M - lo_M).to(device=spec_TM.device, dtype=spec_TM.dtype)
    lo_M, hi_M = lo_M.to(spec_TM.device), hi_M.to(spec_TM.device)
    return spec_TM[:, lo_M] * (1 - w_M) + spec_TM[:, hi_M] * w_M


class AudioEmbed(PatchEmbed):
    """(waveform, sample_rate) -> (tokens_LD, positions_L3); see the module docstring."""

    modality = "audio"

    def __init__(self, cfg: AudioConfig, d_model: int):
        super().__init__(cfg.patch_time * cfg.patch_freq, d_model)
        self.cfg = cfg

    @property
    def max_positions(self) -> tuple[int, int, int]:
        """Exclusive bounds of (time patch, frequency patch, -)."""
        c = self.cfg
        return (math.ceil(c.max_frames / c.patch_time), c.n_mels // c.patch_freq, 1)

    def prepare(self, data: Any) -> tuple[Tensor, Tensor]:
        """data: (waveform (N,) float tensor/array, sample_rate) -> patches (L, Q) float,
        positions (L, 3) int64, both where the waveform is (the spectrogram is computed there):
        the checks and the features, no parameters."""
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError("audio input must be a pair (waveform, sample_rate)")
        return self.patches(log_mel(data[0], data[1], self.cfg))

    def patches(self, spec_TM: Tensor) -> tuple[Tensor, Tensor]:
        """A log-mel spectrogram (T, M) -> patches (L, Q), positions (L, 3): the last time patch
        padded with the floor."""
        c = self.cfg
        T = spec_TM.shape[0]
        A, B = math.ceil(T / c.patch_time), c.n_mels // c.patch_freq
        assert A <= self.max_positions[0]
        spec_TM = F.pad(spec_TM, (0, 0, 0, A * c.patch_time - T), value=math.log(LOG_EPS))
        patches_LQ = (spec_TM.reshape(A, c.patch_time, B, c.patch_freq).permute(0, 2, 1, 3)
                      .reshape(A * B, c.patch_time * c.patch_freq))
        return patches_LQ, grid_positions(A, B, 1, device=spec_TM.device)

    def spectrogram(self, patches_LQ: Tensor) -> Tensor:
        """`patches`' inverse: patches (L, Q) -> the spectrogram (A * pt, M), padding included."""
        c = self.cfg
        B = c.n_mels // c.patch_freq
        if patches_LQ.dim() != 2 or patches_LQ.shape[0] % B or patches_LQ.shape[1] != c.patch_time * c.patch_freq:
            raise ValueError(f"audio patches must be (L, {c.patch_time * c.patch_freq}) with L a multiple of {B}; "
                             f"got {tuple(patches_LQ.shape)}")
        A = patches_LQ.shape[0] // B
        return (patches_LQ.reshape(A, B, c.patch_time, c.patch_freq).permute(0, 2, 1, 3)
                .reshape(A * c.patch_time, c.n_mels))

    def warp(self, prepared: Prepared, alpha: float) -> Prepared:
        """A prepared clip with its frequencies moved by `alpha` (`warp_frequencies`), its
        positions unchanged: the training-time augmentation (TrainConfig.freq_warp)."""
        from . import Prepared  # (defined beside the embedders, which this module is one of)

        spec_TM = warp_frequencies(self.spectrogram(prepared.features), alpha, self.cfg)
        return Prepared(self.patches(spec_TM)[0], prepared.positions)

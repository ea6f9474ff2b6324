"""Signal baselines for the evaluation (see docs/evaluation.md): FLAC costs (in memory; the
external coders are in `coders`), level entropy, SNR, and the copy / best-gain /
least-squares-FIR predictors of one channel from the other. Pure numpy.

Units: samples are int16 values (or floats in int16 units); SNR is 10 log10(signal energy /
error energy) with both energies clamped at 1, as the training logs' SNR is, so a perfect int16
prediction reports 10 log10(signal energy) instead of inf.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import soundfile as sf

__all__ = [
    "FLAC_COMPRESSION_LEVEL",
    "CoderCost",
    "best_gain",
    "copy_snr",
    "fir_apply",
    "fir_lags",
    "flac_bits",
    "flac_bytes",
    "lagged",
    "level_entropy",
    "ls_fir",
    "snr_db",
    "snr_from_energies",
    "to_int16",
]

# soundfile's 0..1 scale, which libsndfile 1.2 maps to FLAC presets 0..8 (rounded 8 x level):
# 1.0 is `flac -8`, the smallest files. Checked here: on a 32768-frame stereo excerpt the
# preset-8 file is 0.5 % smaller than libsndfile's default (preset 5).
FLAC_COMPRESSION_LEVEL = 1.0


def flac_bytes(
    samples: np.ndarray, sample_rate: int, compression_level: float = FLAC_COMPRESSION_LEVEL
) -> int:
    """Bytes of the FLAC file (16-bit, encoded in memory) of int16 `samples`.

    Args:
        samples: int16 `[frames]` (mono) or `[frames, channels]`.
        sample_rate: written in the header only; it does not change the size.
        compression_level: soundfile's 0..1 scale (1.0 = FLAC preset 8).
    """
    data = np.ascontiguousarray(samples, dtype=np.int16)
    buffer = io.BytesIO()
    sf.write(
        buffer,
        data,
        sample_rate,
        format="FLAC",
        subtype="PCM_16",
        compression_level=compression_level,
    )
    return len(buffer.getvalue())


@dataclass(frozen=True)
class CoderCost:
    """A lossless coder's file sizes on whole stereo segments; costs are bits per target sample.

    The cost given the input, (stereo - mono input) x 8 / frames, slightly favours a coder that
    also predicts the input from the target's past: its stereo file saves on the input too.
    """

    stereo_bytes: int
    input_bytes: int
    target_bytes: int | None  # the target channel alone; None where not measured
    frames: int

    @property
    def given_input(self) -> float:
        """The coder's cost of the target given the input: (stereo - mono input) x 8 / frames."""
        return (self.stereo_bytes - self.input_bytes) * 8 / max(self.frames, 1)

    @property
    def alone(self) -> float | None:
        """The coder's cost of the target channel on its own: mono target x 8 / frames."""
        return None if self.target_bytes is None else self.target_bytes * 8 / max(self.frames, 1)

    def __add__(self, other: CoderCost) -> CoderCost:
        both = self.target_bytes is not None and other.target_bytes is not None
        return CoderCost(
            self.stereo_bytes + other.stereo_bytes,
            self.input_bytes + other.input_bytes,
            self.target_bytes + other.target_bytes if both else None,
            self.frames + other.frames,
        )


def flac_bits(
    chunk: np.ndarray,
    sample_rate: int,
    input_channel: int = 0,
    compression_level: float = FLAC_COMPRESSION_LEVEL,
) -> CoderCost:
    """FLAC sizes of whole stereo audio, of its input channel and of its target channel.

    Args:
        chunk: int16 `[2, frames]` (left, right) as the shards hold it (minus 32768): a chunk
            or a segment of contiguous chunks.
        input_channel: 0 when the left channel predicts the right (l2r), 1 for r2l.
    """
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or chunk.shape[0] != 2:
        raise ValueError(f"flac_bits needs int16 [2, frames], got shape {chunk.shape}")
    return CoderCost(
        stereo_bytes=flac_bytes(chunk.T, sample_rate, compression_level),
        input_bytes=flac_bytes(chunk[input_channel], sample_rate, compression_level),
        target_bytes=flac_bytes(chunk[1 - input_channel], sample_rate, compression_level),
        frames=chunk.shape[1],
    )


def level_entropy(counts: np.ndarray) -> float:
    """Empirical entropy in bits per sample of a histogram of levels (zero bins ignored)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def snr_from_energies(signal: float, error: float) -> float:
    """10 log10(signal / error) in dB, both clamped at 1 (int16 units squared)."""
    return 10.0 * math.log10(max(signal, 1.0) / max(error, 1.0))


def snr_db(truth: np.ndarray, pred: np.ndarray) -> float:
    """SNR of `pred` against `truth` in dB (int16 units, see the module docstring)."""
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    return snr_from_energies(float(np.square(truth).sum()), float(np.square(truth - pred).sum()))


def copy_snr(x: np.ndarray, y: np.ndarray) -> float:
    """SNR of predicting the target `y` as a copy of the input `x`."""
    return snr_db(y, x)


def best_gain(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares gain g minimising |y - g x|^2 (0 for an all-zero input)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    power = float(np.dot(x, x))
    return float(np.dot(x, y)) / power if power > 0 else 0.0


def fir_lags(taps: int, causal: bool = False) -> np.ndarray:
    """Input offsets of the taps: y[t] = sum_j h[j] x[t - lags[j]].

    Causal: lags 0..taps-1 (past and present input only). Two-sided (default): lags
    -(taps // 2)..taps - taps // 2 - 1, i.e. -16..15 for 32 taps, so future input samples count
    too, as they do for the model, whose encoder sees the whole input window.
    """
    if taps < 1:
        raise ValueError(f"taps must be >= 1, got {taps}")
    first = 0 if causal else -(taps // 2)
    return np.arange(first, first + taps)


def lagged(x: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """`[n, taps]` with column j = x delayed by lags[j] (zeros outside the window)."""
    n = len(x)
    out = np.zeros((n, len(lags)), dtype=np.float64)
    for j, lag in enumerate(int(v) for v in lags):
        if abs(lag) >= n:
            continue
        if lag >= 0:
            out[lag:, j] = x[: n - lag]
        else:
            out[: n + lag, j] = x[-lag:]
    return out


def ls_fir(x: np.ndarray, y: np.ndarray, taps: int = 32, causal: bool = False) -> np.ndarray:
    """Least-squares FIR `h` (float64 `[taps]`) minimising |y - fir_apply(x, h)|^2.

    Fitted on the very signal it is scored on, it is an oracle: an upper bound for any linear
    time-invariant predictor of `taps` taps over that window, not a deployable predictor.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"ls_fir needs two equal 1-D signals, got {x.shape} and {y.shape}")
    design = lagged(x, fir_lags(taps, causal))
    h, *_ = np.linalg.lstsq(design, y, rcond=None)
    return h


def fir_apply(x: np.ndarray, h: np.ndarray, causal: bool = False) -> np.ndarray:
    """y[t] = sum_j h[j] x[t - lags[j]] (float64, zeros outside the window)."""
    x = np.asarray(x, dtype=np.float64)
    return lagged(x, fir_lags(len(h), causal)) @ np.asarray(h, dtype=np.float64)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Round half to even and clip to int16: what a decoder writing 16-bit audio outputs."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64)), -32768, 32767).astype(np.int16)

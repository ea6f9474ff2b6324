"""Train-time augmentation of stereo windows, before the task and the codec (design §6).

Each augmentation has its own probability; all randomness comes from the window's seed, so a
run is reproducible and resumable. Works on uint16 windows `[B, 2, N]` (int16 + 32768).

- gain: a random gain in `gain_db`, lowered where needed so the peak never passes full scale
  (a louder window must not clip, and int16 must never wrap);
- polarity: both channels inverted (the mix sounds the same, the sample values do not);
- swap: left and right exchanged (a mirrored mix, so both directions see both sides);
- noise: white noise on both channels at a random SNR in `noise_snr_db`;
- speed: resampled by a random factor in `speed` (pitch and tempo together, soxr); the loader
  reads `read_frames(N)` frames so that a speed-up still fills N after cropping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import soxr

from pipeline.codec import int16_to_pcm16, pcm16_to_int16


@dataclass(frozen=True)
class Augment:
    gain_p: float = 0.0
    gain_db: tuple[float, float] = (-12.0, 6.0)
    polarity_p: float = 0.0
    swap_p: float = 0.0
    noise_p: float = 0.0
    noise_snr_db: tuple[float, float] = (20.0, 60.0)
    speed_p: float = 0.0
    speed: tuple[float, float] = (0.9, 1.1)

    @property
    def active(self) -> bool:
        return any((self.gain_p, self.polarity_p, self.swap_p, self.noise_p, self.speed_p))

    def read_frames(self, frames: int) -> int:
        """Frames to read so that the fastest speed-up still yields `frames`."""
        return math.ceil(frames * self.speed[1]) + 1 if self.speed_p else frames

    def __call__(self, windows: np.ndarray, seeds: np.ndarray, frames: int) -> np.ndarray:
        """uint16 `[B, 2, M]` -> augmented uint16 `[B, 2, frames]` (M = read_frames(frames))."""
        out = np.empty((len(windows), 2, frames), np.uint16)
        for row, (window, seed) in enumerate(zip(windows, seeds, strict=True)):
            rng = np.random.default_rng([int(seed), 1])  # apart from the task's own draws
            out[row] = int16_to_pcm16(self.one(pcm16_to_int16(window), rng, frames))
        return out

    def one(self, x: np.ndarray, rng: np.random.Generator, frames: int) -> np.ndarray:
        """int16 `[2, M]` -> int16 `[2, frames]`."""
        y = x.astype(np.float64)
        draws = rng.random(5)  # one per augmentation, drawn whether it fires or not
        if draws[0] < self.speed_p:
            y = change_speed(y, rng.uniform(*self.speed))
        y = y[:, :frames]
        if draws[1] < self.gain_p:
            y = y * safe_gain(y, rng.uniform(*self.gain_db))
        if draws[2] < self.polarity_p:
            y = -y
        if draws[3] < self.swap_p:
            y = y[::-1]
        if draws[4] < self.noise_p:
            power = max(float(np.mean(y * y)), 1.0)
            snr = rng.uniform(*self.noise_snr_db)
            y = y + rng.standard_normal(y.shape) * math.sqrt(power / 10 ** (snr / 10))
        return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


def safe_gain(x: np.ndarray, db: float) -> float:
    """10^(db/20), lowered so that the peak of x stays within int16."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    gain = 10 ** (db / 20)
    return min(gain, 32767 / peak) if peak > 0 else gain


def change_speed(x: np.ndarray, factor: float) -> np.ndarray:
    """`[2, M]` played `factor` times faster: about M / factor frames (soxr, high quality)."""
    return soxr.resample(x.T, factor * 48000, 48000, quality="HQ").T

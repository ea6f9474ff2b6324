"""Train-time augmentation of stereo windows, before the task and the codec (design §6).

Each augmentation has its own probability; all randomness comes from the window's seed, so a
run is reproducible and resumable. Works on uint16 windows `[B, 2, N]` (int16 + 32768).

- gain: a random gain in `gain_db`, lowered where needed so the peak never passes full scale
  (a louder window must not clip, and int16 must never wrap);
- polarity: both channels inverted (the mix sounds the same, the sample values do not);
- swap: left and right exchanged (a mirrored mix, so both directions see both sides);
- noise: white noise on both channels at a random SNR in `noise_snr_db`;
- speed: resampled by a random factor in `speed`, one factor per batch (pitch and tempo
  together, soxr); the loader reads `read_frames(N)` frames so that a speed-up still fills N
  after cropping.
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
        """uint16 `[B, 2, M]` -> augmented uint16 `[B, 2, frames]` (M = read_frames(frames)).

        One generator per batch, seeded by its windows' seeds (apart from the task's draws):
        as reproducible as one per window, and every draw is vectorized over the batch.
        """
        rng = np.random.default_rng([1, *(int(seed) for seed in seeds)])
        return int16_to_pcm16(self.batch(pcm16_to_int16(windows), rng, frames))

    def one(self, x: np.ndarray, rng: np.random.Generator, frames: int) -> np.ndarray:
        """int16 `[2, M]` -> int16 `[2, frames]`."""
        return self.batch(x[None], rng, frames)[0]

    def batch(self, x: np.ndarray, rng: np.random.Generator, frames: int) -> np.ndarray:
        """int16 `[B, 2, M]` -> int16 `[B, 2, frames]`."""
        rows = len(x)
        draws = rng.random((rows, 5))  # one per augmentation, drawn whether it fires or not
        y = x[:, :, :frames].astype(np.float32)
        faster = draws[:, 0] < self.speed_p
        if faster.any():
            # One factor per batch: the chosen windows go through soxr as the channels of one
            # signal (a soxr call designs its filter anew for each ratio: ~0.5 ms).
            chosen = x[faster].astype(np.float32)
            changed = change_speed(chosen.reshape(-1, chosen.shape[-1]), rng.uniform(*self.speed))
            y[faster] = changed.reshape(len(chosen), 2, -1)[:, :, :frames]
        gains = rng.uniform(*self.gain_db, size=rows)
        chosen = draws[:, 1] < self.gain_p
        if chosen.any():
            peaks = np.maximum(np.abs(y[chosen]).max(axis=(1, 2)), 1.0)
            y[chosen] *= np.minimum(10 ** (gains[chosen] / 20), 32767 / peaks)[:, None, None]
        y[draws[:, 2] < self.polarity_p] *= -1
        swap = draws[:, 3] < self.swap_p
        y[swap] = y[swap][:, ::-1]
        snr = rng.uniform(*self.noise_snr_db, size=rows)
        noisy = draws[:, 4] < self.noise_p
        if noisy.any():
            power = np.maximum(np.mean(y[noisy] ** 2, axis=(1, 2)), 1.0)
            scale = np.sqrt(power / 10 ** (snr[noisy] / 10))[:, None, None]
            y[noisy] += rng.standard_normal(y[noisy].shape, dtype=np.float32) * scale
        return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


def change_speed(x: np.ndarray, factor: float) -> np.ndarray:
    """`[C, M]` played `factor` times faster: about M / factor frames (soxr, high quality)."""
    return soxr.resample(x.T, factor * 48000, 48000, quality="HQ").T

"""Train-time augmentation of stereo windows, before the task and the codec (see docs/data.md).

Each augmentation has its own probability; all randomness comes from the window's seed, so a
run is reproducible and resumable. Works on uint16 windows `[B, 2, N]` (int16 + 32768).

- gain: a random gain in `gain_db`, lowered where needed so the peak never passes full scale
  (a louder window must not clip, and int16 must never wrap);
- polarity: both channels inverted (the mix sounds the same, the sample values do not);
- swap: left and right exchanged (a mirrored mix, so both directions see both sides);
- noise: white noise on both channels at a random SNR in `noise_snr_db`;
- speed: resampled by a random factor in `speed` (rounded to a multiple of 1/200), one factor
  per batch (pitch and tempo together, soxr); the loader reads `read_frames(N)` frames so that
  a speed-up still fills N after cropping.

Cost: a batch must stay cheap next to the channel task, which only slices (the numbers:
docs/benchmarks.md). The draws are the seeded hashes of `trainer.data.draws` (another stream
than the task's); a batch where nothing fires comes back as it is, and an augmentation that
fires for no window costs nothing; the noise is the tasks' fixed table of standard normals from
a random offset (`trainer.data.tasks.noise`). The speed change dominates, and soxr's cost
depends on how it is called: its set-up per channel outweighs the filtering on signals this
short, so all the chosen windows go through one call as one mono signal (`change_speed`), and
a ratio of small integers (a factor on the 1/200 grid) resamples faster than an arbitrary one.
What is left is soxr's own filtering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import soxr

from pipeline.codec import int16_to_pcm16, pcm16_to_int16
from trainer.data.draws import uniforms
from trainer.data.tasks import noise, noise_level, powers, to_pcm16

__all__ = ["GAP", "SPEED_GRID", "Augment", "change_speed"]

GAP = 128  # silent frames after each row in change_speed: more than soxr's reach (~90 frames)
SPEED_GRID = 200  # speed factors are multiples of 1/200: soxr resamples such ratios faster


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
        return any(self._odds)

    @property
    def _odds(self) -> list[float]:
        return [self.speed_p, self.gain_p, self.polarity_p, self.swap_p, self.noise_p]

    def read_frames(self, frames: int) -> int:
        """Frames to read so that the fastest speed-up still yields `frames` (its factor may be
        rounded up by half a grid step)."""
        fastest = self.speed[1] + 0.5 / SPEED_GRID
        return math.ceil(frames * fastest) + 1 if self.speed_p else frames

    def __call__(
        self, windows: np.ndarray, seeds: np.ndarray | list[int], frames: int
    ) -> np.ndarray:
        """uint16 `[B, 2, M]` -> augmented uint16 `[B, 2, frames]` (M = read_frames(frames))."""
        draws = uniforms(seeds, 9, stream=1)  # 5 coins, speed, gain, SNR, noise offset
        fire = draws[:, :5] < self._odds
        fired = fire.any(axis=0).tolist()  # which augmentations fire for some window
        if not any(fired):
            return windows[:, :, :frames]
        faster, gain, flip, swap, noisy = fire.T
        y = windows[:, :, :frames].astype(np.float32)
        y -= 32768
        if fired[0]:  # one speed factor per batch, the first window's draw
            factor = self.speed[0] + draws[0, 5] * (self.speed[1] - self.speed[0])
            chosen = pcm16_to_int16(windows[faster])
            changed = change_speed(chosen.reshape(-1, chosen.shape[-1]), factor, frames)
            y[faster] = changed.reshape(-1, 2, frames)
        if fired[1] or fired[2]:
            scale = np.where(flip, -1.0, 1.0)
            if fired[1]:
                peaks = np.maximum(y.max(axis=(1, 2)), -y.min(axis=(1, 2)))[gain]
                db = self.gain_db[0] + draws[gain, 6] * (self.gain_db[1] - self.gain_db[0])
                scale[gain] *= np.minimum(10 ** (db / 20), 32767 / np.maximum(peaks, 1.0))
            y *= scale.astype(np.float32)[:, None, None]
        if fired[3]:
            y[swap] = y[swap, ::-1]
        if fired[4]:
            chosen = y[noisy]
            rows = len(chosen)
            low, high = self.noise_snr_db
            snrs = (low + draws[noisy, 7] * (high - low)).tolist()
            signal = powers(chosen.reshape(rows, -1))
            levels = [noise_level(p, snr) for p, snr in zip(signal, snrs, strict=True)]
            hiss = noise(draws[0, 8], 2 * rows, frames).reshape(rows, 2, frames)
            chosen += hiss * np.array(levels, np.float32)[:, None, None]
            y[noisy] = chosen
        return to_pcm16(y)

    def one(self, x: np.ndarray, seed: int, frames: int) -> np.ndarray:
        """int16 `[2, M]` -> int16 `[2, frames]`: the augmentation of a window with this seed."""
        return pcm16_to_int16(self(int16_to_pcm16(x)[None], [seed], frames)[0])


def change_speed(x: np.ndarray, factor: float, frames: int | None = None) -> np.ndarray:
    """`[K, M]` rows, each played `factor` times faster -> float32 `[K, frames]` (default: all
    M / factor frames). The factor is rounded to a multiple of 1 / SPEED_GRID.

    The rows go through soxr as one mono signal, each in a segment followed by silence longer
    than the filter's reach (so no row hears another), the segment a multiple of the ratio's
    numerator (so every segment starts on an output sample): each row comes out as if resampled
    alone. With `frames`, only the input those output frames hear (and GAP more) is resampled.
    """
    ratio = Fraction(round(factor * SPEED_GRID), SPEED_GRID)
    step, out_step = ratio.numerator, ratio.denominator  # `step` frames in, `out_step` out
    rows, length = x.shape
    if frames is None:
        frames = length * out_step // step
    else:
        length = min(length, math.ceil(frames * ratio) + GAP)
    segment = -(-(length + GAP) // step) * step
    line = np.zeros((rows, segment), np.float32)
    line[:, :length] = x[:, :length]
    y = soxr.resample(line.reshape(-1), step, out_step, quality="HQ")
    return y[: rows * segment // step * out_step].reshape(rows, -1)[:, :frames]

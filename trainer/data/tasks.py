"""What a window becomes: the task's input and label frames (see docs/data.md).

Runs in the loader's workers on uint16 windows `[B, 2, N]` (int16 + 32768), before the codec.
The channel `c` a single-channel task works on is the direction's source channel (left for l2r).

- `channel`: input = channel c, label = the other channel (the original trainer's task).
- `continuation`: input = the first `seq_len` frames of c, label = the `target_len` after them.
- `denoise`: input = c + white noise at a random SNR in `snr_db`, label = c.
- `bitdepth`: input = c requantized to k bits, k random in `bits` (rounded half up, saturating
  at the top k-bit level: 2**k levels exactly), label = c.
- `codec`: input = c after a cheap stand-in for a lossy codec: a low-pass whose -3 dB point is a
  random fraction of Nyquist in `cutoff`, then an 8-bit mu-law round trip, label = c. A real MP3
  or Vorbis round trip through libsndfile per window would make this task far slower than the
  others; the stand-in keeps the two artefacts that dominate at low bit rates, lost bandwidth
  and signal-dependent quantization noise. (Real encodes belong at shard time, as an extra
  member, if they are ever needed.)

Cost: the channel task only slices, so a degradation must cost no more than a few numpy calls
and passes over the batch to keep the loader's rate (the numbers: docs/benchmarks.md):

- draws are the seeded hashes of `trainer.data.draws` (a few per window; per-window numbers
  such as SNR and bits are Python floats): reproducible, resumable, far cheaper than seeding a
  numpy Generator per window;
- denoise adds consecutive stretches of one fixed table of 2**20 standard normals (generated
  once from a fixed seed) from a random offset per batch, a view: fresh normals per batch would
  cost more than the rest of the task;
- bitdepth is three integer operations on the uint16 samples, no float;
- codec draws one cutoff per batch (one per window would need a Python loop over the rows)
  and low-passes with a centered moving average of odd width 2m + 1, the width whose -3 dB
  point (~0.886 / width of Nyquist) is nearest the cutoff (m = 0 keeps the whole band): a crude
  low-pass (sidelobes 13 dB down) that costs a few integer additions over the batch as one
  flat signal, far cheaper than the FFT brick-wall low-pass it replaced; the mu-law round trip
  is one lookup in a 65536-entry table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from pipeline.codec import get_codec
from trainer.data.batch import DataError
from trainer.data.draws import draws, uniform

__all__ = ["TASKS", "Task", "moving_sums", "noise", "noise_level", "powers", "to_pcm16"]

TASKS = ("channel", "continuation", "denoise", "bitdepth", "codec")
NOISE_TABLE = 1 << 20  # standard normals shared by every window (4 MiB of float32)


@dataclass(frozen=True)
class Task:
    name: str = "channel"
    seq_len: int = 2048
    target_len: int | None = None  # continuation only (default: seq_len)
    snr_db: tuple[float, float] = (0.0, 30.0)
    bits: tuple[int, int] = (4, 12)
    cutoff: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise DataError(f"task {self.name!r}: use one of {', '.join(TASKS)}")
        if not 1 <= self.bits[0] <= self.bits[1] <= 16:
            raise DataError(f"bits {self.bits}: need 1 <= low <= high <= 16")
        if not 0.001 <= self.cutoff[0] <= self.cutoff[1] <= 1:
            raise DataError(f"cutoff {self.cutoff}: need 0.001 <= low <= high <= 1")

    @property
    def split_at(self) -> int | None:
        """Where the label starts inside a window (continuation), else None."""
        return self.seq_len if self.name == "continuation" else None

    @property
    def window(self) -> int:
        """Frames read per window."""
        if self.name == "continuation":
            return self.seq_len + (self.target_len or self.seq_len)
        return self.seq_len

    @property
    def random(self) -> bool:
        return self.name in ("denoise", "bitdepth", "codec")

    def pairs(
        self, windows: np.ndarray, directions: np.ndarray, seeds: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint16 `[B, 2, N]`, directions `[B]`, seeds `[B]` -> uint16 inputs and labels."""
        rows = np.arange(len(windows))
        source = windows[rows, directions]
        if self.name == "channel":
            return source, windows[rows, 1 - directions]
        if self.name == "continuation":
            return source[:, : self.seq_len], source[:, self.seq_len :]
        if seeds is None:
            raise DataError(f"task {self.name!r} needs a seed per window")
        seeds = np.asarray(seeds).tolist()
        if self.name == "denoise":
            return self._denoise(source, seeds), source
        if self.name == "bitdepth":
            return self._bitdepth(source, seeds), source
        return self._codec(source, uniform(seeds[0])), source  # one cutoff per batch

    def _denoise(self, source: np.ndarray, seeds: list[int]) -> np.ndarray:
        x = source.astype(np.float32)
        x -= 32768
        low, high = self.snr_db
        snrs = [low + draw * (high - low) for draw in draws(seeds)]
        levels = [noise_level(power, snr) for power, snr in zip(powers(x), snrs, strict=True)]
        x += noise(uniform(seeds[0], 0, 1), *x.shape) * np.array(levels, np.float32)[:, None]
        return to_pcm16(x)

    def _bitdepth(self, source: np.ndarray, seeds: list[int]) -> np.ndarray:
        low, high = self.bits
        bits = [min(low + int(draw * (high - low + 1)), high) for draw in draws(seeds)]
        step = np.array([1 << 16 - k for k in bits], np.uint16)[:, None]
        half = step >> 1
        # Round half up to a multiple of step; 32768 is one, so this is also the int16 rounding.
        # Clamping first keeps the sum inside uint16 and saturates at the top level.
        return (np.minimum(source, 65535 - half) + half) & ~(step - 1)

    def _codec(self, source: np.ndarray, draw: float) -> np.ndarray:
        cutoff = self.cutoff[0] + draw * (self.cutoff[1] - self.cutoff[0])
        m = max(round((0.886 / cutoff - 1) / 2), 0)  # the average of source[n - m : n + m + 1]
        rows, frames = source.shape
        padded = np.empty((rows, frames + 2 * m), np.int32)  # edges held
        padded[:, m : m + frames] = source
        padded[:, :m] = source[:, :1]
        padded[:, m + frames :] = source[:, -1:]
        # One flat signal: 1-D operations are several times faster than row slices, and the
        # sums that straddle two rows land in the padding, which is dropped.
        sums = moving_sums(padded.ravel(), 2 * m + 1)
        if m:
            sums += m
            sums //= 2 * m + 1  # the rounded mean (an odd width never ties)
        out = np.empty(padded.size, np.uint16)
        _mulaw_round_trip().take(sums, out=out[: len(sums)])
        return out.reshape(rows, -1)[:, :frames]


def moving_sums(x: np.ndarray, width: int) -> np.ndarray:
    """1-D `x` -> the sums of its runs of `width` samples (len(x) - width + 1 of them), by
    doubling: at most 2 log2(width) additions, each cheaper than numpy's (serial) cumsum."""
    total, done, power, span = x, 0, x, 1  # total: sums of `done` samples; power: of `span`
    while True:
        if width & span:
            total = power if done == 0 else total[: len(power) - done] + power[done:]
            done += span
        if 2 * span > width:
            return total
        power = power[:-span] + power[span:]
        span *= 2


def noise(draw: float, rows: int, frames: int) -> np.ndarray:
    """Read-only float32 `[rows, frames]` unit white noise: consecutive stretches of one fixed
    table of standard normals, from an offset `draw` in [0, 1) picks (a view: no copy)."""
    table = _noise_table(max(NOISE_TABLE, 4 * rows * frames))
    start = int(draw * (len(table) - rows * frames + 1))
    return table[start : start + rows * frames].reshape(rows, frames)


def powers(x: np.ndarray) -> list[float]:
    """float32 `[K, N]` -> the mean square of each row (a batched dot product: no temporary)."""
    return [s / x.shape[1] for s in np.matmul(x[:, None], x[:, :, None]).ravel().tolist()]


def noise_level(power: float, snr_db: float) -> float:
    """The standard deviation of white noise `snr_db` below `power` (floored at 1, so that
    silence still gets some noise)."""
    return math.sqrt(max(power, 1.0) / 10 ** (snr_db / 10))


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float32 int16-scaled samples -> uint16, rounded half up and clipped (x is overwritten)."""
    x += 32768.5
    x.clip(0, 65535, out=x)
    return x.astype(np.uint16)  # truncation of values >= 0: the floor


@functools.cache
def _noise_table(size: int) -> np.ndarray:
    table = np.random.default_rng(0x5EED).standard_normal(size, dtype=np.float32)
    table = (table - table.mean()) / table.std()
    table.setflags(write=False)
    return table


@functools.cache
def _mulaw_round_trip() -> np.ndarray:
    """uint16 `[65536]`: every sample after an 8-bit mu-law encode and decode."""
    mulaw = get_codec("mulaw8")
    table = mulaw.decode_table()[mulaw.encode_table()]
    table.setflags(write=False)
    return table

"""What a window becomes: the task's input and label frames (design §6).

Runs in the loader's workers on uint16 windows `[B, 2, N]` (int16 + 32768), before the codec.
Every random choice comes from a per-window seed drawn by the stream, so runs are reproducible
and resumable. The channel `c` a single-channel task works on is the direction's source channel
(left for l2r).

- `channel`: input = channel c, label = the other channel (the original trainer's task).
- `continuation`: input = the first `seq_len` frames of c, label = the `target_len` after them.
- `denoise`: input = c + white noise at a random SNR in `snr_db`, label = c.
- `bitdepth`: input = c requantized to k bits, k random in `bits`, label = c.
- `codec`: input = c after a cheap stand-in for a lossy codec: a low-pass at a random cutoff
  (a fraction of Nyquist in `cutoff`) and an 8-bit mu-law round trip, label = c. A real MP3 or
  Vorbis round trip through libsndfile costs milliseconds per window, which would make this
  task ~100x slower than the others; the stand-in keeps the two artefacts that dominate at low
  bit rates, lost bandwidth and signal-dependent quantization noise. (Real encodes belong at
  shard time, as an extra member, if they are ever needed.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.codec import get_codec, int16_to_pcm16, pcm16_to_int16
from pipeline.errors import PipelineError

TASKS = ("channel", "continuation", "denoise", "bitdepth", "codec")


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
            raise PipelineError(f"task {self.name!r}: use one of {', '.join(TASKS)}")
        if not 1 <= self.bits[0] <= self.bits[1] <= 16:
            raise PipelineError(f"bits {self.bits}: need 1 <= low <= high <= 16")

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
        clean = pcm16_to_int16(source).astype(np.float64)
        # One generator per batch, seeded by its windows' seeds: as reproducible as one per
        # window, and every draw is vectorized over the batch.
        rng = np.random.default_rng([int(seed) for seed in seeds])
        return int16_to_pcm16(_to_int16(self._degrade(clean, rng))), source

    def _degrade(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float64 int16-scaled `[B, N]` -> the degraded input of the task."""
        rows, frames = x.shape
        if self.name == "denoise":
            snr = rng.uniform(*self.snr_db, size=rows)
            power = np.maximum(np.mean(x * x, axis=1), 1.0)
            noise = rng.standard_normal((rows, frames), dtype=np.float32)
            return x + noise * np.sqrt(power / 10 ** (snr / 10))[:, None]
        if self.name == "bitdepth":
            bits = rng.integers(self.bits[0], self.bits[1], size=rows, endpoint=True)
            step = (2.0 ** (16 - bits))[:, None]
            return np.round(x / step) * step
        spectrum = np.fft.rfft(x, axis=1)
        cut = (rng.uniform(*self.cutoff, size=rows) * spectrum.shape[1]).astype(np.int64)
        spectrum[np.arange(spectrum.shape[1])[None, :] >= cut[:, None]] = 0
        lowpassed = int16_to_pcm16(_to_int16(np.fft.irfft(spectrum, frames, axis=1)))
        mulaw = get_codec("mulaw8")
        return pcm16_to_int16(mulaw.decode(mulaw.encode(lowpassed))).astype(np.float64)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)

"""The one rule for covering N frames with windows of length L (evaluation and predict).

Consecutive windows from frame 0; when L does not divide N, one more window ends at the last
frame, overlapping the one before it, and only its frames after that overlap are new. So every
frame is scored (or written) exactly once, and every window but a file shorter than L holds L
real frames. See docs/data.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Cover", "cover", "eval_windows"]


class Cover(NamedTuple):
    """One window of a cover: it reads frames [start, start + L), and the frames
    [start + keep_from, min(start + L, N)) are its own (scored, written)."""

    start: int
    keep_from: int


def cover(frames: int, length: int) -> list[Cover]:
    """The windows of `length` covering `frames` frames, in order (see the module docstring).

    Fewer frames than one window: a single window (0, 0) that runs past the end (pad it, and
    keep its first `frames` frames).
    """
    if frames <= 0 or length <= 0:
        raise ValueError(f"cover({frames}, {length}): frames and length must be positive")
    if frames < length:
        return [Cover(0, 0)]
    windows = [Cover(start, 0) for start in range(0, frames - length + 1, length)]
    if frames % length:
        windows.append(Cover(frames - length, length - frames % length))
    return windows


def eval_windows(chunk_frames: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Window starts covering a chunk and a `[windows, L]` mask scoring every frame once."""
    windows = cover(chunk_frames, seq_len)
    starts = np.array([w.start for w in windows])
    offsets = np.arange(seq_len)
    keep_from = np.array([w.keep_from for w in windows])[:, None]
    mask = (offsets >= keep_from) & (starts[:, None] + offsets < chunk_frames)
    return starts, mask

"""Gaps in a target channel, as frame ranges [start, end): from `--gaps START:END,...`, from a
file of such ranges, from detection of dead stretches (digital silence or a flat line in the
target while the input moves), or drawn at random for the evaluation; and the seam measure
that says whether a repair meets the known target without a step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.evaluation import EvaluationError

__all__ = [
    "DETECT_MIN_S",
    "SEAM_SPAN_S",
    "GapOptions",
    "detect_gaps",
    "draw_gaps",
    "merge_gaps",
    "parse_gaps",
    "read_gaps_file",
    "seam_steps",
]

DETECT_MIN_S = 0.01  # a dead stretch shorter than this is left alone
SEAM_SPAN_S = 0.1  # the truth around a seam whose steps bound the output's step there


def _range(text: str, rate: int, where: str) -> tuple[int, int]:
    parts = text.replace(":", " ").split()
    try:
        start, end = (float(p) for p in parts)
    except ValueError:
        raise EvaluationError(
            f"{where}: {text!r} is not START:END in seconds (e.g. 12.5:13.1)"
        ) from None
    if not 0 <= start < end:
        raise EvaluationError(f"{where}: gap {text!r} needs 0 <= START < END (seconds)")
    return round(start * rate), round(end * rate)


def parse_gaps(spec: str, rate: int) -> list[tuple[int, int]]:
    """`START:END,...` in seconds -> frame ranges (unmerged)."""
    return [_range(part, rate, "--gaps") for part in spec.split(",") if part.strip()]


def read_gaps_file(path: str | Path, rate: int) -> list[tuple[int, int]]:
    """A text file of gaps, one `START END` or `START:END` (seconds) per line; `#` starts a
    comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{path}: cannot read the gaps file ({exc})") from None
    gaps = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            gaps.append(_range(text, rate, f"{path}:{number}"))
    return gaps


def merge_gaps(gaps: Iterable[tuple[int, int]], frames: int) -> list[tuple[int, int]]:
    """Sorted, overlapping or touching ranges merged, cut to [0, frames).

    Raises:
        EvaluationError: a gap starts at or past the end of the track.
    """
    merged: list[list[int]] = []
    for start, end in sorted(gaps):
        if start >= frames:
            raise EvaluationError(
                f"a gap starts at frame {start}, past the track's {frames} frames: check --gaps"
            )
        end = min(end, frames)
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _runs(flat: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [a, b) where `flat` is True."""
    edges = np.flatnonzero(np.diff(np.r_[0, flat.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def detect_gaps(x: np.ndarray, y: np.ndarray, rate: int) -> list[tuple[int, int]]:
    """Stretches of at least DETECT_MIN_S where the target y holds one value (digital silence
    or a flat line) while the input x does not: the frames of each such run after its first
    (which may be a true sample)."""
    min_frames = max(2, round(DETECT_MIN_S * rate))
    y_still = np.r_[False, np.diff(y.astype(np.int32)) == 0]
    x_still = np.r_[False, np.diff(x.astype(np.int32)) == 0]
    gaps = []
    for a, b in _runs(y_still):
        if b - a + 1 >= min_frames and not x_still[a:b].all():
            gaps.append((a, b))
    return gaps


def draw_gaps(
    frames: int, rate: int, count: int, rng: np.random.Generator, low_s: float, high_s: float
) -> list[tuple[int, int]]:
    """Up to `count` disjoint gaps of `low_s`..`high_s` seconds (shorter where the track is too
    short for them), one in each equal slot of the track with half a longest gap kept clear at
    both ends, in order: the evaluation's. Fewer where slots would be under 2 x `low_s`."""
    low, high = round(low_s * rate), round(high_s * rate)
    margin = high // 2
    usable = frames - 2 * margin
    count = min(count, max(0, usable // (2 * low))) if low > 0 else 0
    if count < 1:
        return []
    slot = usable // count
    gaps = []
    for k in range(count):
        size = int(rng.integers(low, min(high, slot // 2) + 1))
        start = margin + k * slot + int(rng.integers(0, slot - size + 1))
        gaps.append((start, start + size))
    return gaps


def seam_steps(
    out: np.ndarray, truth: np.ndarray, gaps: Sequence[tuple[int, int]], rate: int
) -> list[tuple[float, float]]:
    """At each seam (a gap's first frame and the frame after its end): the output's step
    |out[s] - out[s - 1]| and the 99th percentile of the truth's steps within SEAM_SPAN_S
    around it; a repair is continuous where the first is at most the second."""
    half = round(SEAM_SPAN_S * rate / 2)
    diffs = np.abs(np.diff(truth.astype(np.float64)))
    steps = []
    for a, b in gaps:
        for s in (a, b):
            if 0 < s < len(out):
                near = diffs[max(0, s - half) : s + half]
                step = abs(float(out[s]) - float(out[s - 1]))
                steps.append((step, float(np.percentile(near, 99))))
    return steps


@dataclass(frozen=True)
class GapOptions:
    """Where a target is damaged, as `predict` is told: `--gaps`, `--gaps-file`,
    `--detect-gaps` (any together)."""

    spec: str | None = None
    file: str | None = None
    detect: bool = False

    @property
    def given(self) -> bool:
        return bool(self.spec or self.file or self.detect)

    def frames(self, x: np.ndarray, y: np.ndarray, rate: int) -> list[tuple[int, int]]:
        """The gaps of one track (input x, target y) in frames, unmerged."""
        gaps = parse_gaps(self.spec, rate) if self.spec else []
        if self.file:
            gaps += read_gaps_file(self.file, rate)
        if self.detect:
            gaps += detect_gaps(x, y, rate)
        return gaps

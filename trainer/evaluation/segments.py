"""The scored audio as contiguous per-source segments: what the lossless coders code (`coders`)
and what `--context run` scores with the head's state carried (`runs`).

Chunks of one source sit in different shards on purpose (docs/data.md), so they are grouped by
source and sorted by start; chunks whose starts are exactly one chunk apart join, and a gap
starts a new segment. An adaptive coder is never run chunk by chunk: Sac's long filters need
seconds of audio to converge, so a chunk-by-chunk figure would be its warm-up cost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.codec import pcm16_to_int16

__all__ = ["Piece", "Segment", "join_chunks"]


class Piece(NamedTuple):
    """One scored chunk: where it starts in its source and its uint16 `[2, C]` (left, right)."""

    source: str
    start: int
    samples: np.ndarray


@dataclass(frozen=True)
class Segment:
    """Contiguous chunks of one source, in order: frames [start, start + frames)."""

    source: str
    start: int
    chunks: tuple[np.ndarray, ...]  # uint16 [2, C] each (left, right)

    @property
    def frames(self) -> int:
        return sum(chunk.shape[1] for chunk in self.chunks)

    def samples(self) -> np.ndarray:
        """int16 `[2, frames]` (left, right): the audio a coder codes."""
        return pcm16_to_int16(np.concatenate(self.chunks, axis=1))


def join_chunks(pieces: Iterable[Piece]) -> list[Segment]:
    """The pieces as segments, sorted by source then start (see the module docstring).

    Raises:
        ValueError: two pieces of one source overlap (a frame would be coded twice).
    """
    by_source: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_source[piece.source].append(piece)
    segments = []
    for source in sorted(by_source):
        ordered = sorted(by_source[source], key=lambda piece: piece.start)
        groups = [[ordered[0]]]
        for piece in ordered[1:]:
            last = groups[-1][-1]
            end = last.start + last.samples.shape[1]
            if piece.start < end:
                raise ValueError(f"{source}: chunks at {last.start} and {piece.start} overlap")
            if piece.start > end:  # a gap: a new segment
                groups.append([])
            groups[-1].append(piece)
        segments += [Segment(source, g[0].start, tuple(p.samples for p in g)) for g in groups]
    return segments

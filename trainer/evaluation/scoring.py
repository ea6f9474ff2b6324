"""The teacher-forced pass: every frame of a split's chunks scored once, as exact sums pooled and
per source (`Sums`), keeping the scored chunks themselves so that the coders code exactly those
samples (`segments`, `coders`). `score_split` scores the eval stream's windows (`--context
window`, or whole chunks under `chunk`); `runs.score_runs` carries the head's state over runs of
chunks. See docs/evaluation.md."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.codec import Codec, pcm16_to_int16
from trainer.data.batch import IGNORE, tokenize
from trainer.data.eval_stream import EvalStream
from trainer.evaluation.segments import Piece, Segment, join_chunks
from trainer.model import Scored, StereoT5

__all__ = [
    "SourceSums",
    "SplitScore",
    "Sums",
    "limit_chunks",
    "score_split",
    "split_score",
]


@dataclass
class SourceSums:
    """The model's sums over one source's scored frames."""

    nll: float = 0.0
    untrained_nll: float | None = None  # None while the model returns no per-position baseline
    count: int = 0


class Sums:
    """Exact sums of a teacher-forced pass (nats, counts, int16 energies, the target's level
    histogram), pooled and per source, added batch by batch whatever the context."""

    def __init__(self, codec: Codec) -> None:
        self.nll = self.tf_signal = self.tf_error = 0.0
        self.untrained_nll: float | None = None  # the head's parameter-free baseline, if any
        self.count = self.correct = 0
        self.levels = torch.zeros(codec.levels, dtype=torch.int64)
        self.per_source: dict[str, SourceSums] = {}
        self._int16_of_token = torch.as_tensor(codec.decode_table().astype(np.int64) - 32768)

    def add(
        self, scored: Scored, labels: torch.Tensor, targets: np.ndarray, sources: Sequence[str]
    ) -> None:
        """One scored batch: `labels` [B, L] (CPU, IGNORE where not scored), `targets` the
        uint16 target samples [B, L], `sources` the source of each row."""
        self.nll += float(scored["nll_sum"])
        if scored["untrained_nll_sum"] is not None:
            self.untrained_nll = (self.untrained_nll or 0.0) + float(scored["untrained_nll_sum"])
        self.count += int(scored["count"])
        self.correct += int(scored["correct"])
        keep = labels != IGNORE
        self.levels += torch.bincount(labels[keep], minlength=len(self.levels))
        # teacher-forced argmax against the original int16 target (not its codec round trip)
        target = torch.from_numpy(pcm16_to_int16(targets)).double()
        pred = self._int16_of_token[scored["pred"].cpu()].double()
        self.tf_signal += float(torch.where(keep, target.square(), 0.0).sum())
        self.tf_error += float(torch.where(keep, (target - pred).square(), 0.0).sum())
        untrained = scored["untrained_nll"]  # per position; None when the head has no baseline
        row_nll = scored["nll"].double().sum(dim=1).cpu().tolist()
        row_untrained = None if untrained is None else untrained.double().sum(dim=1).cpu().tolist()
        for row, (source, count) in enumerate(zip(sources, keep.sum(dim=1).tolist(), strict=True)):
            if count == 0:
                continue  # a padding row
            sums = self.per_source.setdefault(source, SourceSums())
            sums.nll += row_nll[row]
            sums.count += count
            if row_untrained is not None:
                sums.untrained_nll = (sums.untrained_nll or 0.0) + row_untrained[row]


@dataclass
class SplitScore:
    """A scored split: its sums, the scored chunks (manifest order) and their segments."""

    sums: Sums
    pieces: list[Piece]
    segments: list[Segment]
    windows: int  # rows scored: windows, or whole chunks under --context chunk and run
    seconds: float

    @property
    def chunks(self) -> int:
        return len(self.pieces)


def split_score(
    sums: Sums, pieces: list[Piece], segments: list[Segment], windows: int, started: float
) -> SplitScore:
    """The pass's result, once every frame of every scored chunk is known to be scored once."""
    frames = sum(piece.samples.shape[1] for piece in pieces)
    assert sums.count == frames, "every frame of every chunk is scored once"
    per_source = {source: s.count for source, s in sums.per_source.items()}
    coded: dict[str, int] = {}
    for segment in segments:
        coded[segment.source] = coded.get(segment.source, 0) + segment.frames
    assert per_source == coded, "the coders code exactly the frames scored, per source"
    return SplitScore(sums, pieces, segments, windows, time.perf_counter() - started)


def limit_chunks(samples: list[int], max_chunks: int | None) -> list[int]:
    """Per-shard sample counts cut to the first `max_chunks` chunks in manifest order."""
    if max_chunks is None:
        return list(samples)
    out, left = [], max_chunks
    for n in samples:
        take = min(n, left)
        if take == 0:
            break
        out.append(take)
        left -= take
    return out


def score_split(
    model: StereoT5, stream: EvalStream, codec: Codec, direction: int, progress: bool
) -> SplitScore:
    """Score every window of `stream` once (`direction` is the input channel, 0: l2r), putting
    each chunk together again from its windows: the coders code exactly what was scored."""
    device = next(model.parameters()).device
    per_chunk, length = len(stream.starts), stream.seq_len
    sums, pieces, window = Sums(codec), [], 0
    chunk = np.zeros((2, stream.split.chunk_frames), np.uint16)
    where = ("", 0)  # (source, start) of the chunk being put together
    started = time.perf_counter()
    bar = tqdm(total=len(stream), desc="score", unit="batch", disable=not progress)
    with torch.inference_mode():
        for raw in stream:
            bar.update(1)
            real = raw["mask"].any(axis=1)
            if not real.any():
                continue  # a padding batch (only under several ranks or workers)
            batch = tokenize(raw, codec)
            scored = model.score(batch["input_ids"].to(device), batch["labels"].to(device))
            sums.add(scored, batch["labels"], raw["targets"], [m[0] for m in raw["meta"]])
            # the channel task's stereo windows again: input channel `direction`, target other
            windows = np.stack([raw["inputs"], raw["targets"]], axis=1)[
                :, [direction, 1 - direction]
            ]
            for row in np.flatnonzero(real):
                k = window % per_chunk
                start = int(stream.starts[k])
                if k == 0:  # the first window starts at the chunk's first frame
                    where = raw["meta"][row]
                chunk[:, start : start + length] = windows[row]
                if k == per_chunk - 1:
                    pieces.append(Piece(where[0], int(where[1]), chunk.copy()))
                window += 1
    bar.close()
    return split_score(sums, pieces, join_chunks(pieces), window, started)

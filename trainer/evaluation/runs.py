"""`--context run`: each contiguous run of one source's chunks (a `segments.Segment`) scored
chunk after chunk with the head's state carried from one call to the next, so an adaptive
predictor starts warm at every chunk but a run's first. See docs/evaluation.md.

Batch rows are different runs in parallel, the longest runs first so that rows end close
together; a run that has ended gets a padding row (input pad, labels all IGNORE) whose results
are discarded, and each group of rows starts with no state. Each frame is scored once.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from tqdm import tqdm

from pipeline.codec import Codec
from trainer.data.batch import to_batch
from trainer.data.shards import ShardSplit
from trainer.evaluation.scoring import SplitScore, Sums, split_score
from trainer.evaluation.segments import Piece, Segment, join_chunks
from trainer.model import StereoT5

__all__ = ["read_pieces", "score_runs"]


def read_pieces(split: ShardSplit) -> list[Piece]:
    """The split's chunks with their (source, start) in manifest order, read once, in memory
    (a one-hour corpus's test split is about 70 MB of uint16)."""
    chunks = itertools.islice(split.chunks(split.urls, 0, want_meta=True), sum(split.samples))
    return [Piece(*meta, chunk) for chunk, meta in chunks]  # meta: (source, start), asked for


def _ahead(
    group: list[Segment], step: int, direction: int, model: StereoT5, codec: Codec
) -> torch.Tensor | None:
    """[B, model.lookahead] input tokens that follow chunk `step` of each run, on the model's
    device: the next chunk's first ones where the run goes on, pad where it does not (None
    when the head looks at none)."""
    if not model.lookahead:
        return None
    ahead = np.full((len(group), model.lookahead), model.pad_id, np.int64)
    for row, run in enumerate(group):
        if step + 1 < len(run.chunks):
            following = run.chunks[step + 1][direction, : model.lookahead]
            ahead[row, : len(following)] = codec.encode(following)
    return torch.from_numpy(ahead).to(next(model.parameters()).device)


def score_runs(
    model: StereoT5,
    split: ShardSplit,
    codec: Codec,
    direction: int,
    batch_size: int,
    progress: bool,
) -> SplitScore:
    """Score the split's runs with the state carried (`direction` is the input channel)."""
    device = next(model.parameters()).device
    pieces = read_pieces(split)
    segments = join_chunks(pieces)
    runs = sorted(segments, key=lambda run: -len(run.chunks))
    groups = [runs[first : first + batch_size] for first in range(0, len(runs), batch_size)]
    frames = split.chunk_frames
    sums, rows_scored = Sums(codec), 0
    started = time.perf_counter()
    bar = tqdm(total=len(pieces), desc="score", unit="chunk", disable=not progress)
    with torch.inference_mode():
        for group in groups:
            state = None  # each group of runs starts cold
            for step in range(len(group[0].chunks)):
                live = np.array([step < len(run.chunks) for run in group])
                stereo = np.zeros((len(group), 2, frames), np.uint16)
                for row in np.flatnonzero(live):
                    stereo[row] = group[row].chunks[step]
                inputs, targets = stereo[:, direction], stereo[:, 1 - direction]
                mask = np.repeat(live[:, None], frames, axis=1)
                directions = np.full(len(group), direction)
                batch = to_batch(inputs, targets, directions, codec, mask)
                scored = model.score(
                    batch["input_ids"].to(device),
                    batch["labels"].to(device),
                    state=state,
                    ahead=_ahead(group, step, direction, model, codec),
                )
                state = scored["state"]
                sources = [run.source if on else "" for run, on in zip(group, live, strict=True)]
                sums.add(scored, batch["labels"], targets, sources)
                rows_scored += int(live.sum())
                bar.update(int(live.sum()))
    bar.close()
    return split_score(sums, pieces, segments, rows_scored, started)

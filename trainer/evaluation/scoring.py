"""The teacher-forced pass: every frame of a split's chunks scored once (the EvalStream's windows
and masks) as exact sums, with, on the same whole chunks, FLAC's cost of the target and the
histogram of its codec levels; it also keeps the windows picked for generation. See
docs/evaluation.md."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.codec import Codec, pcm16_to_int16
from trainer.data.batch import IGNORE, tokenize
from trainer.data.eval_stream import EvalStream
from trainer.evaluation.baselines import FlacCost, flac_bits
from trainer.model import StereoT5

__all__ = ["SplitScore", "limit_chunks", "score_split"]


@dataclass
class SplitScore:
    """Exact sums over the split (nats, counts, int16 energies) and what was kept for later."""

    nll: float
    untrained_nll: float | None  # the head's parameter-free baseline; None if it has none
    count: int
    correct: int
    tf_signal: float  # energy of the int16 target, scored positions
    tf_error: float  # energy of target - teacher-forced argmax, same positions
    levels: np.ndarray  # histogram of target tokens
    flac: FlacCost
    chunks: int
    windows: int
    picked: list[np.ndarray]  # uint16 [2, L] windows (input, target channel) to generate
    picked_meta: list[tuple[str, int]]  # (source, start) of each picked window
    seconds: float


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
    model: StereoT5,
    stream: EvalStream,
    codec: Codec,
    sample_rate: int,
    direction: int,
    generate: int,
    progress: bool,
) -> SplitScore:
    """Score every window of `stream` once; pick `generate` windows spread evenly over it.

    `direction` is the input channel (0: l2r). Each chunk is put together again from its windows
    so that FLAC is measured on whole chunks, as a file would be compressed.
    """
    device = next(model.parameters()).device
    per_chunk, length = len(stream.starts), stream.seq_len
    total_windows = sum(stream.split.samples) * per_chunk
    picks = min(generate, total_windows)
    pick = set(np.linspace(0, total_windows - 1, picks).round().astype(int).tolist())
    nll = tf_signal = tf_error = 0.0
    untrained_nll: float | None = None
    count = correct = window = chunks = 0
    hist = torch.zeros(codec.levels, dtype=torch.int64)
    flac = FlacCost(0, 0, 0, 0)
    chunk = np.zeros((2, stream.split.chunk_frames), np.uint16)
    picked: list[np.ndarray] = []
    picked_meta: list[tuple[str, int]] = []
    int16_of_token = torch.as_tensor(codec.decode_table().astype(np.int64) - 32768)
    start_time = time.perf_counter()
    bar = tqdm(total=len(stream), desc="score", unit="batch", disable=not progress)
    with torch.inference_mode():
        for raw in stream:
            bar.update(1)
            real = raw["mask"].any(axis=1)
            if not real.any():
                continue  # a padding batch (only under several ranks or workers)
            batch = tokenize(raw, codec)
            labels = batch["labels"]
            scored = model.score(batch["input_ids"].to(device), labels.to(device))
            nll += float(scored["nll_sum"])
            if scored["untrained_nll_sum"] is not None:
                untrained_nll = (untrained_nll or 0.0) + float(scored["untrained_nll_sum"])
            count += int(scored["count"])
            keep = labels != IGNORE
            correct += int(scored["correct"])
            hist += torch.bincount(labels[keep], minlength=codec.levels)
            # teacher-forced argmax against the original int16 target (not its codec round trip)
            target = torch.from_numpy(pcm16_to_int16(raw["targets"])).double()
            pred = int16_of_token[scored["pred"].cpu()].double()
            tf_signal += float(torch.where(keep, target.square(), 0.0).sum())
            tf_error += float(torch.where(keep, (target - pred).square(), 0.0).sum())
            # the channel task's stereo windows again: input channel `direction`, target other
            windows = np.stack([raw["inputs"], raw["targets"]], axis=1)[
                :, [direction, 1 - direction]
            ]
            for row in np.flatnonzero(real):
                k = window % per_chunk
                start = int(stream.starts[k])
                chunk[:, start : start + length] = windows[row]
                if k == per_chunk - 1:  # the chunk is whole again: FLAC on the whole chunk
                    flac = flac + flac_bits(pcm16_to_int16(chunk), sample_rate, direction)
                    chunks += 1
                if window in pick:
                    picked.append(windows[row].copy())
                    picked_meta.append(tuple(raw["meta"][row]))
                window += 1
    bar.close()
    assert count == chunks * stream.split.chunk_frames, "every frame of every chunk is scored once"
    return SplitScore(
        nll=nll,
        untrained_nll=untrained_nll,
        count=count,
        correct=correct,
        tf_signal=tf_signal,
        tf_error=tf_error,
        levels=hist.numpy(),
        flac=flac,
        chunks=chunks,
        windows=window,
        picked=picked,
        picked_meta=picked_meta,
        seconds=time.perf_counter() - start_time,
    )

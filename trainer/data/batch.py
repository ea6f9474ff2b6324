"""The batch format every loader here yields, and the loader's user error (see docs/data.md).

A stream sends a `RawBatch` (uint16 frames, not tokens) out of its worker; the loader turns it
into a `Batch` of token tensors with the codec, in the main process.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import numpy as np
import torch

from pipeline.codec import Codec
from pipeline.errors import UserError

__all__ = [
    "DIRECTIONS",
    "IGNORE",
    "Batch",
    "DataError",
    "RawBatch",
    "parse_direction",
    "raw_batch",
    "to_batch",
    "tokenize",
]

DIRECTIONS = {"l2r": 0, "r2l": 1}  # the source channel of each fixed direction
IGNORE = -100  # a label that is not scored (the loss's ignore_index)


class DataError(UserError):
    """A user error of the trainer's data: bad loader options, a shard set it cannot use."""


class Batch(TypedDict):
    """Token tensors: `input_ids [B, L]`, `labels [B, T]` (IGNORE where not scored),
    `direction [B]`; with `return_meta`, each row's `source` file and `start` frame."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    direction: torch.Tensor
    source: NotRequired[list[str]]
    start: NotRequired[torch.Tensor]


class RawBatch(TypedDict):
    """What a stream yields: uint16 `inputs [B, L]`, `targets [B, T]`, `directions [B]`, and
    optionally the scored-label `mask [B, T]` and `(source, start)` per row."""

    inputs: np.ndarray
    targets: np.ndarray
    directions: np.ndarray
    mask: NotRequired[np.ndarray]
    meta: NotRequired[list[tuple[str, int]]]
    skipped: NotRequired[list[tuple[str, str]]]  # (shard url, why) newly skipped by the stream


def parse_direction(direction: str) -> str:
    if direction not in ("l2r", "r2l", "random"):
        raise DataError(
            f"direction {direction!r}: use l2r, r2l or random (`L->R` would be a shell redirect)"
        )
    return direction


def to_batch(
    inputs: np.ndarray,
    targets: np.ndarray,
    directions: np.ndarray,
    codec: Codec,
    mask: np.ndarray | None = None,
    meta: list[tuple[str, int]] | None = None,
) -> Batch:
    """A batch of the structure every loader here yields, from uint16 inputs `[B, L]` and
    targets `[B, T]`; `mask` `[B, T]` marks the label positions scored."""
    input_ids, labels = codec.encode(inputs), codec.encode(targets)
    if mask is not None:
        labels = np.where(mask, labels, IGNORE)
        input_ids = np.where(mask.any(axis=1, keepdims=True), input_ids, codec.levels)
    batch: Batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "direction": torch.from_numpy(directions.astype(np.int64)),
    }
    if meta is not None:
        batch["source"] = [m[0] for m in meta]
        batch["start"] = torch.tensor([m[1] for m in meta], dtype=torch.int64)
    return batch


def raw_batch(
    inputs: np.ndarray,
    targets: np.ndarray,
    directions: np.ndarray,
    mask: np.ndarray | None = None,
    meta: list[tuple[str, int]] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> RawBatch:
    """What a stream yields: uint16 inputs and targets, not tokens. A few numpy arrays cross
    from a worker far faster than int64 tensors (one shared-memory segment per tensor), so the
    loader applies the codec in the main process. `skipped` is drained: the shards skipped
    since the last batch ride with this one, so the loader reports them."""
    raw: RawBatch = {"inputs": inputs, "targets": targets, "directions": directions}
    if mask is not None:
        raw["mask"] = mask
    if meta is not None:
        raw["meta"] = meta
    if skipped:
        raw["skipped"] = list(skipped)
        skipped.clear()
    return raw


def tokenize(raw: RawBatch, codec: Codec) -> Batch:
    """The `Batch` of a stream's `RawBatch`."""
    return to_batch(
        raw["inputs"], raw["targets"], raw["directions"], codec, raw.get("mask"), raw.get("meta")
    )

"""Token arithmetic shared by the body and the heads: the decoder's shifted input, the
residual (difference) coding of levels, and the range check of a batch's tokens. Levels are
``0..V-1``, ``V`` is pad and decoder start, ``IGNORE`` marks label positions not scored."""

from __future__ import annotations

import torch

from pipeline.codec import Codec
from trainer.data.batch import IGNORE
from trainer.model.errors import ModelError


def shift_right(labels: torch.Tensor, start: int) -> torch.Tensor:
    """Decoder input: ``start`` then labels[:-1], ``IGNORE`` replaced by ``start`` (the pad)."""
    shifted = torch.full_like(labels, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, start)


def level_or_mid(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Audio levels as they are; pad, ``IGNORE`` or any other out-of-range token -> V/2."""
    return torch.where((tokens >= 0) & (tokens < levels), tokens, levels // 2)


def to_residual(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels ``0..V-1`` -> each one's difference from the level before it, plus V/2, mod V
    (the first from V/2); pad (V) and ignored positions stay as they are, and a level after one
    of them is taken relative to V/2. A bijection on the valid positions, so a likelihood over
    residuals is exactly the likelihood over levels."""
    mid = levels // 2
    valid = (tokens >= 0) & (tokens < levels)
    prev = level_or_mid(shift_right(tokens, IGNORE), levels)
    return torch.where(valid, (tokens - prev + mid) % levels, tokens)


def from_residual(residuals: torch.Tensor, prev: torch.Tensor, levels: int) -> torch.Tensor:
    """Residual tokens and the levels before them (out of range: V/2) -> levels."""
    return (residuals + level_or_mid(prev, levels) - levels // 2) % levels


def cumulative_levels(residuals: torch.Tensor, levels: int) -> torch.Tensor:
    """Generated residuals [B, L] -> levels: V/2 + running sum of (residual - V/2), mod V."""
    mid = levels // 2
    return (mid + torch.cumsum(residuals - mid, 1)) % levels


def check_tokens(codec: Codec, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Out-of-range tokens are a codec mismatch between loader and model: say so."""
    levels = codec.levels
    checks = [("input_ids", input_ids, 0, levels)]  # V: the pad
    if labels is not None:
        checks.append(("labels", labels[labels != IGNORE], 0, levels - 1))
    for name, x, lo, hi in checks:
        if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
            raise ModelError(
                f"{name} hold tokens in {int(x.min())}..{int(x.max())}, outside {lo}..{hi} "
                f"of codec {codec.name} ({levels} levels, pad {levels}): "
                "give the loader the model's codec"
            )

"""``full`` and ``chunked``: one ``Linear(d, V)`` over all levels and a cross-entropy.

``chunked`` computes the loss ``chunk`` positions at a time, each chunk under activation
checkpointing, so the [B, L, V] logits never exist at once: the same FLOPs plus one recomputed
chunk forward, for much less memory (docs/benchmarks.md). Both use the same parameter names, so
a checkpoint moves between them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.data.batch import IGNORE
from trainer.model.errors import ModelError
from trainer.model.heads.base import Head, HeadOptions, HeadOutput, Stepper, pick


class SoftmaxHead(Head):
    """Logits for every level from one Linear; ``chunk``: positions per checkpointed chunk
    (None: all at once)."""

    def __init__(self, width: int, levels: int, chunk: int | None = None) -> None:
        super().__init__()
        self.levels = levels
        self.chunk = chunk
        self.proj = nn.Linear(width, levels)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        nn.init.zeros_(self.proj.bias)

    def _nll_pred(self, hidden: torch.Tensor, targets: torch.Tensor):
        logits = self.proj(hidden).float()
        nll = F.cross_entropy(
            logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view_as(targets)
        return nll, logits.detach().argmax(-1)

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, state: Any = None
    ) -> HeadOutput:
        if self.chunk is None:
            return HeadOutput(*self._nll_pred(hidden, targets))
        nlls, preds = [], []
        for start in range(0, hidden.shape[1], self.chunk):
            h, t = hidden[:, start : start + self.chunk], targets[:, start : start + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                # Only the chunk's inputs are kept; its [B, chunk, V] logits are rebuilt in
                # backward. Without the checkpoint autograd keeps every chunk's logits.
                nll, pred = checkpoint(self._nll_pred, h, t, use_reentrant=False)
            else:
                nll, pred = self._nll_pred(h, t)
            nlls.append(nll)
            preds.append(pred)
        return HeadOutput(torch.cat(nlls, 1), torch.cat(preds, 1))

    def stepper(self, inputs, temperature, generator=None, state=None) -> Stepper:
        return lambda hidden: pick(self.proj(hidden), temperature, generator)


class FullOptions(HeadOptions):
    """``head: full``: one softmax over all V levels (small vocabularies)."""

    name = "full"
    module = SoftmaxHead

    def build(self, width: int, levels: int) -> Head:
        return SoftmaxHead(width, levels)


class ChunkedOptions(HeadOptions):
    """``head: chunked``: the full softmax, its loss ``chunk`` positions at a time."""

    name = "chunked"
    module = SoftmaxHead

    def __init__(self, chunk: int = 256) -> None:
        if chunk < 1:
            raise ModelError(f"head chunked: chunk must be >= 1, got {chunk}")
        self.chunk = chunk

    def build(self, width: int, levels: int) -> Head:
        return SoftmaxHead(width, levels, self.chunk)

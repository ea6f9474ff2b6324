"""Validation and test sums over mixed shard sets: one loader per set (trainer/data/mixing.py),
each set's own sums and the pooled ones, every set's batches added (never a mean of the sets'
ratios). With one loader the pooled sums are all there is, logged under the names they always
had."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.model.metrics import SumMetrics

__all__ = ["EvalSums"]


class EvalSums(nn.Module):
    """Pooled `SumMetrics` and, with several eval loaders, one per loader, named by its set."""

    def __init__(self, extras: tuple[str, ...] = (), estimate: bool = False) -> None:
        super().__init__()
        self.extras, self.estimate = extras, estimate
        self.pooled = SumMetrics(extras, estimate)
        self.sets = nn.ModuleList()
        self.names: list[str] = []

    def start(self, loaders: Any) -> None:
        """Before a validation or test run: one sum per loader when there are several (the
        trainer's list of them), named by their `name` (else their number)."""
        several = isinstance(loaders, list | tuple) and len(loaders) > 1
        names = [getattr(x, "name", "") or str(i) for i, x in enumerate(loaders)] if several else []
        if names != self.names:
            metrics = [SumMetrics(self.extras, self.estimate) for _ in names]
            self.sets = nn.ModuleList(metrics).to(self.pooled.device)
            self.names = names

    def update(self, sums: dict[str, torch.Tensor], loader: int = 0) -> None:
        """One batch's sums, from eval loader number `loader`."""
        self.pooled.update(sums)
        if self.names:
            self.sets[loader].update(sums)

    def compute(self) -> dict[str, torch.Tensor]:
        """The pooled values under their own names, each set's under `<set>/<name>`; then the
        sums start again."""
        values = self.pooled.compute()
        for name, metric in zip(self.names, self.sets, strict=True):
            values |= {f"{name}/{key}": value for key, value in metric.compute().items()}
            metric.reset()
        self.pooled.reset()
        return values

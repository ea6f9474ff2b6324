"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def lr_factor(step: int, warmup: int, total: int | None) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 down to 0.1 at step ``total``
    (constant after warmup when the run length is unknown)."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay; biases, norms and embeddings do not.
    A parameter shared by two modules (T5's ``shared`` is also each stack's embed_tokens) is
    listed once."""
    decay, no_decay, seen = [], [], set()
    for sub in module.modules():
        no_wd_module = isinstance(sub, nn.Embedding) or "Norm" in type(sub).__name__
        for param in sub.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if no_wd_module or param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def total_steps(max_steps: int | None, trainer: Any) -> int | None:
    """The schedule's length: the model's ``max_steps``, else the Trainer's, else its estimate."""
    if max_steps:
        return int(max_steps)
    if trainer is None:
        return None
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else None

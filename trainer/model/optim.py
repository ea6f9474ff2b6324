"""AdamW with decoupled weight decay on matrices only, the learning-rate schedule, and gradient
clipping that keeps a part's gradients apart from the rest's."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
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


def param_groups(
    module: nn.Module, weight_decay: float, own_lr: tuple[nn.Module, float] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay; biases, norms and embeddings do not.
    A parameter shared by two modules (T5's ``shared`` is also each stack's embed_tokens) is
    listed once. ``own_lr`` (a submodule, its learning rate) puts that submodule's parameters
    in two more groups of their own, after those two."""
    special = {id(p) for p in own_lr[0].parameters()} if own_lr else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (True, False): [],
        (False, False): [],
    }
    seen = set()
    for sub in module.modules():
        no_wd_module = isinstance(sub, nn.Embedding) or "Norm" in type(sub).__name__
        for param in sub.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decays = not (no_wd_module or param.ndim < 2)
            groups.setdefault((decays, id(param) in special), []).append(param)
    out = []
    for (decays, own), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if own:
            group["lr"] = own_lr[1]
        out.append(group)
    return out


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


def configure_adamw(
    module: nn.Module, hparams: Any, groups: list[dict[str, Any]], trainer: Any
) -> dict[str, Any]:
    """AdamW over `groups` at ``hparams.lr``, warmup then cosine, stepped every step."""
    optimizer = torch.optim.AdamW(groups, lr=hparams.lr)
    total = total_steps(hparams.max_steps, trainer)
    schedule = functools.partial(lr_factor, warmup=hparams.warmup_steps, total=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def clip_apart(
    module: nn.Module, parts: list[nn.Module], value: float | None, algorithm: str | None
) -> None:
    """Clip the gradients of each of `parts`, and of the rest of `module`, each on its own
    (by norm, or by value with ``algorithm == "value"``): a part's large gradients never
    shrink the rest's. Nothing when `value` is None or 0."""
    if not value:
        return
    own = {id(p) for part in parts for p in part.parameters()}
    rest = [p for p in module.parameters() if id(p) not in own and p.grad is not None]
    for params in (rest, *([p for p in part.parameters() if p.grad is not None] for part in parts)):
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, value)
        else:
            torch.nn.utils.clip_grad_norm_(params, value)

"""The one interface every output head implements, and the options object a user sets for it.

A head turns decoder states into a distribution over the codec's V levels. Teacher-forced, it
returns a ``HeadOutput`` whose ``nll`` is the training loss per position; in generation its
``stepper`` picks one level per call. The model never asks which head it has: what differs
between heads (whether they work on patches or residuals, which reference scores they report)
is declared here as class attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

# hidden [B, d] -> (token [B], log-prob [B]); called once per target position, in order
Stepper = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class HeadOutput:
    """A teacher-forced head's result for one window.

    Attributes:
        nll: [B, L] nats per target position, 0 where the label is ignored: the loss is
            ``nll.sum() / count``.
        prediction: [B, L] the head's point prediction (argmax or mode), tokens 0..V-1.
        extras: per-position nats of reference scores the head computes on the same
            positions, keyed by name (``untrained``: the same head at step 0, its
            parameter-free part alone); the model logs ``bits_per_sample_<name>`` for each.
        state: what the head carries to the next window of the same stream (None: nothing).
    """

    nll: torch.Tensor
    prediction: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None


class Head(nn.Module):
    """Base of every head; subclasses implement ``forward`` and ``stepper``.

    Class attributes declare what the model must check: ``patch_refusal`` / ``residual_refusal``
    (None, or why the head cannot run on patches / on residual tokens: the error's text) and
    ``extra_names`` (the keys of ``HeadOutput.extras``).
    """

    patch_refusal: ClassVar[str | None] = None
    residual_refusal: ClassVar[str | None] = None
    extra_names: ClassVar[tuple[str, ...]] = ()

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        state: Any = None,
    ) -> HeadOutput:
        """hidden [B, L, d], targets [B, L] (ignored: -100), inputs [B, L] (pad: V), the state
        the previous window of this stream left (None at a stream's start)."""
        raise NotImplementedError

    def stepper(
        self,
        inputs: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        state: Any = None,
    ) -> Stepper:
        """Generation over the window of ``inputs`` [B, L]: greedy at temperature 0, else
        sampled; each call returns the chosen token and the model's (temperature 1)
        log-probability of it."""
        raise NotImplementedError


def pick(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax (temperature 0) or a sample from softmax(logits / T); returns the index and the
    model's log-probability of it (at temperature 1, the likelihood the evaluation reports)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if temperature > 0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        idx = logp.argmax(-1)
    return idx, logp.gather(-1, idx[..., None]).squeeze(-1)


class HeadOptions:
    """A head's options as the user sets them (``__init__``'s keyword arguments), which build
    the module once the width of the states and the codec's level count are known.

    In a config: ``head: {class_path: trainer.model.heads.LogisticOptions, init_args: {...}}``,
    or ``head: logistic`` for its defaults; an option another head owns is an error. Stored in
    hyperparameters as that dict (``to_dict``), so checkpoints hold no custom objects.
    """

    name: ClassVar[str]
    module: ClassVar[type[Head]]  # heads of one module class share their weights' layout

    def build(self, width: int, levels: int) -> Head:
        raise NotImplementedError

    def init_args(self) -> dict[str, Any]:
        return dict(vars(self))

    def to_dict(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"

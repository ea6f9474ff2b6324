"""The output heads and their registry: the one place a head is chosen by name.

``head:`` in a config is a name (``full``, ``chunked``, ``coarse_fine``, ``logistic``, or
``auto``: full up to 4096 levels, else coarse_fine), or a ``class_path`` of one of the options
classes below with its ``init_args``.
"""

from __future__ import annotations

import inspect
from typing import Any

import yaml

from trainer.model.errors import ModelError
from trainer.model.heads.base import Head, HeadOptions, HeadOutput, Stepper, pick
from trainer.model.heads.coarse_fine import CoarseFineHead, CoarseFineOptions
from trainer.model.heads.logistic import LogisticHead, LogisticOptions
from trainer.model.heads.softmax import ChunkedOptions, FullOptions, SoftmaxHead

__all__ = [
    "OPTIONS",
    "ChunkedOptions",
    "CoarseFineHead",
    "CoarseFineOptions",
    "FullOptions",
    "Head",
    "HeadOptions",
    "HeadOutput",
    "LogisticHead",
    "LogisticOptions",
    "SoftmaxHead",
    "Stepper",
    "pick",
    "resolve_head",
]

OPTIONS: dict[str, type[HeadOptions]] = {
    cls.name: cls for cls in (FullOptions, ChunkedOptions, CoarseFineOptions, LogisticOptions)
}
FULL_HEAD_MAX_LEVELS = 4096  # auto: full up to 4096 levels (16 MB of fp32 logits per 1k tokens)


def resolve_head(spec: str | dict[str, Any] | HeadOptions, levels: int) -> HeadOptions:
    """A head's options from a name (``auto`` resolved by the level count), a stored
    ``{"class_path", "init_args"}`` dict, or options as they are."""
    if isinstance(spec, HeadOptions):
        return spec
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        # a class_path dict given on the command line: the parser leaves it a string when its
        # options do not fit, so check them here, with the head's own message
        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError:
            raise ModelError(
                f"head {spec!r} is not a YAML dict: write {{class_path: X, init_args: {{...}}}}"
            ) from None
    if isinstance(spec, str):
        name = spec
        if name == "auto":
            name = "full" if levels <= FULL_HEAD_MAX_LEVELS else "coarse_fine"
        if name not in OPTIONS:
            raise ModelError(f"unknown head {spec!r}: use one of auto, {', '.join(OPTIONS)}")
        return OPTIONS[name]()
    if isinstance(spec, dict) and "class_path" in spec:
        path = str(spec["class_path"])
        name = path.rsplit(".", 1)[-1]  # trainer.model.heads.X or trainer.model.heads.x.X
        found = [c for c in OPTIONS.values() if c.__name__ == name]
        if not found:
            raise ModelError(
                f"head class_path {path!r} is none of {[c.__name__ for c in OPTIONS.values()]}"
            )
        cls, args = found[0], dict(spec.get("init_args") or {})
        known = list(inspect.signature(cls).parameters)
        wrong = sorted(set(args) - set(known))
        if wrong:
            raise ModelError(
                f"head {cls.name} has no option {', '.join(wrong)}: its options are "
                f"{', '.join(known) or 'none'}"
            )
        return cls(**args)
    raise ModelError(f"head {spec!r}: give a head name or {{class_path, init_args}}")

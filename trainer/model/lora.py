"""LoRA adapters on the T5 body (peft), and the body with them merged for export."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import T5Model

from trainer.model.errors import ModelError

# every T5 attention and FFN matrix; gated FFNs (gated-gelu) have wi_0/wi_1 and no `wi`
LORA_TARGETS = ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]
LORA_KEYS = {"r", "alpha", "dropout"}


def wrap_lora(body: T5Model, lora: dict[str, Any]) -> nn.Module:
    """The body with LoRA adapters injected (``{"r": 8, "alpha": 16, "dropout": 0.0}``)."""
    import peft

    unknown = set(lora) - LORA_KEYS
    if unknown:
        raise ModelError(f"lora keys are r, alpha, dropout; got unknown {sorted(unknown)}")
    rank = int(lora.get("r", 8))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=float(lora.get("alpha", 2 * rank)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=LORA_TARGETS,
    )
    return peft.get_peft_model(body, config)


def base_body(t5: nn.Module) -> T5Model:
    """The T5Model (under LoRA: the base model with the adapters injected)."""
    get_base = getattr(t5, "get_base_model", None)
    return get_base() if get_base is not None else t5


def merged_body(t5: nn.Module) -> T5Model:
    """The body with any LoRA adapters merged (a merged copy: training can go on)."""
    if hasattr(t5, "merge_and_unload"):
        return copy.deepcopy(t5).merge_and_unload()
    return t5

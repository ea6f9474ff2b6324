"""Block-wise attention for the T5 body: O(L) activation memory instead of O(L^2).

T5 adds its learned relative position bias to the attention scores. That bias is a float mask
that needs a gradient, so torch's sdpa runs its math kernel and every attention layer keeps
[B, H, L, L] scores for backward; at long windows those, not the output head, fill memory.
Here the query rows are split into blocks of ``config.attn_block`` and each block runs under
activation checkpointing: a layer keeps only its inputs and output, and one block's
[B, H, block, L] scores exist at a time, in forward and in backward (which recomputes them).
The cost is one more pass of the score matrix products. Results equal sdpa's up to float
rounding (``tests/test_attention.py``).

The function is registered with transformers under ``BLOCKWISE``, with sdpa's mask builder,
so the model's causal and padding masks arrive in the same form sdpa gets them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BLOCKWISE = "stereot5_blockwise"


def _rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """The query rows start:stop of a [.., Lq, Lk] mask (a mask broadcast over rows as is)."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def _block(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    first_row: int | None,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """Attention of one block of query rows; first_row set: causal, rows first_row.. of Lq."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if bias is not None:
        scores = scores + bias
    lowest = torch.finfo(scores.dtype).min
    if mask is not None:
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else scores + mask
    if first_row is not None:
        rows = torch.arange(first_row, first_row + query.shape[-2], device=query.device)
        cols = torch.arange(key.shape[-2], device=query.device)
        scores = scores.masked_fill(cols[None, :] > rows[:, None], lowest)
    weights = nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
    if dropout > 0:
        weights = nn.functional.dropout(weights, p=dropout)
    return torch.matmul(weights, value)


def blockwise_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, Lq, D], key/value [B, H, Lk, D]
    -> (output [B, Lq, H, D], None)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = attention_mask is None and getattr(module, "is_causal", False) and q_len > 1
    if causal and q_len != k_len:
        raise ValueError(f"causal block-wise attention needs Lq == Lk, got {q_len} and {k_len}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    block = module.config.attn_block
    keep_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, position_bias)
    )
    outputs = []
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        run = functools.partial(
            _block, first_row=start if causal else None, scaling=scaling, dropout=dropout
        )
        args = (
            query[..., start:stop, :],
            key,
            value,
            _rows(position_bias, start, stop),
            _rows(attention_mask, start, stop),
        )
        outputs.append(checkpoint(run, *args, use_reentrant=False) if keep_grad else run(*args))
    return torch.cat(outputs, -2).transpose(1, 2).contiguous(), None


AttentionInterface.register(BLOCKWISE, blockwise_attention)
AttentionMaskInterface.register(BLOCKWISE, sdpa_mask)

"""Tiled attention for the T5 body: O(L) activation memory instead of O(L^2).

T5 adds its learned relative position bias to the attention scores. That bias is a float mask
that needs a gradient, so torch's sdpa runs its math kernel and every attention layer keeps
[B, H, L, L] scores for backward; at long windows those, not the output head, fill memory.
Here the query rows are split into tiles of ``config.attn_tile``: a layer keeps its q, k, v,
output and one log-sum-exp per row, and one tile's [B, H, tile, L] scores exist at a time, in
forward and in backward (which recomputes them: one more pass of the score products). Results
and gradients equal sdpa's up to float rounding (``tests/test_attention.py``).

The function is registered with transformers under ``TILED``, with sdpa's mask builder,
so the model's causal and padding masks arrive in the same form sdpa gets them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TILED = "stereot5_tiled"


def _rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """The query rows start:stop of a [.., Lq, Lk] mask (a mask broadcast over rows as is)."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def _scores(
    query: torch.Tensor,
    key: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    causal_from: int | None,
    scaling: float,
) -> torch.Tensor:
    """Masked scores [.., rows, keys] of one tile, in fp32 or wider (a new tensor, updated in
    place). causal_from set: the tile's rows are causal_from.. and its keys end at its last
    row, so only the square over columns causal_from.. needs the causal mask."""
    exact = torch.promote_types(query.dtype, torch.float32)  # bf16: softmax in fp32
    scores = torch.matmul(query, key.transpose(-1, -2)).to(exact)
    if scaling != 1.0:
        scores.mul_(scaling)
    if bias is not None:
        scores.add_(bias)
    lowest = torch.finfo(exact).min
    if mask is not None:
        scores.masked_fill_(~mask, lowest) if mask.dtype == torch.bool else scores.add_(mask)
    if causal_from is not None:
        rows = query.shape[-2]
        above = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
        scores[..., causal_from:].masked_fill_(above, lowest)
    return scores


class _Tiled(torch.autograd.Function):
    """softmax(q k^T * scaling + bias + mask) v, one tile of query rows at a time.

    Forward keeps q, k, v, the output and each row's log-sum-exp; backward recomputes each
    tile's probabilities from them and writes the gradients of q, k, v and the bias tile by
    tile into tensors of their own size (the flash-attention backward, without a kernel).
    Causal tiles skip the keys after their last row.
    """

    @staticmethod
    def _tiles(ctx, rows: int):
        """(rows slice, keys slice, causal_from) per tile."""
        for start in range(0, rows, ctx.tile):
            stop = min(start + ctx.tile, rows)
            keys = slice(0, stop) if ctx.causal else slice(None)
            yield slice(start, stop), keys, start if ctx.causal else None

    @staticmethod
    def _offsets(query, key, rows, keys) -> torch.Tensor:
        """Index into an offset bias [.., Lq + Lk - 1] of each (row, key) of a tile."""
        cols = torch.arange(key.shape[-2], device=key.device)[keys]
        lines = torch.arange(rows.start, rows.stop, device=key.device)
        return cols[None, :] - lines[:, None] + (query.shape[-2] - 1)

    @staticmethod
    def _tile_scores(ctx, query, key, bias, mask, rows, keys, causal_from):
        if bias is not None:
            if bias.ndim == 3:  # by offset (position_bias.offset_bias): expanded one tile at a time
                bias = bias[..., _Tiled._offsets(query, key, rows, keys)]
            else:
                bias = _rows(bias, rows.start, rows.stop)[..., keys]
        mask = _rows(mask, rows.start, rows.stop)
        return _scores(query[..., rows, :], key[..., keys, :], bias, mask, causal_from, ctx.scaling)

    @staticmethod
    def forward(ctx, query, key, value, bias, mask, causal: bool, scaling: float, tile: int):
        ctx.causal, ctx.scaling, ctx.tile = causal, scaling, tile
        out = torch.empty_like(query)
        exact = torch.promote_types(query.dtype, torch.float32)
        lse = torch.empty(query.shape[:-1], dtype=exact, device=query.device)
        for rows, keys, causal_from in _Tiled._tiles(ctx, query.shape[-2]):
            probs = _Tiled._tile_scores(ctx, query, key, bias, mask, rows, keys, causal_from)
            row_max = probs.amax(-1, keepdim=True)
            probs.sub_(row_max).exp_()
            total = probs.sum(-1, keepdim=True)
            probs.div_(total)
            out[..., rows, :] = torch.matmul(probs.to(value.dtype), value[..., keys, :])
            lse[..., rows] = (row_max + total.log()).squeeze(-1)
        ctx.save_for_backward(query, key, value, bias, mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, bias, mask, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = (torch.zeros_like(t) for t in (query, key, value))
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        grad_bias = torch.zeros_like(bias) if bias_grad else None
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
        for rows, keys, causal_from in _Tiled._tiles(ctx, query.shape[-2]):
            probs = _Tiled._tile_scores(ctx, query, key, bias, mask, rows, keys, causal_from)
            probs.sub_(lse[..., rows, None]).exp_()
            g = grad_out[..., rows, :]
            grad_v[..., keys, :] += torch.matmul(probs.to(value.dtype).transpose(-1, -2), g)
            grad_s = torch.matmul(g, value[..., keys, :].transpose(-1, -2)).to(probs.dtype)
            grad_s.sub_(delta[..., rows, :]).mul_(probs)
            if bias_grad and bias.ndim == 3:
                heads = grad_s.sum_to_size(*bias.shape[:-1], *grad_s.shape[-2:]).flatten(-2)
                offsets = _Tiled._offsets(query, key, rows, keys).flatten()
                grad_bias.index_add_(-1, offsets, heads.to(grad_bias.dtype))
            elif bias_grad:
                rows_grad = _rows(grad_bias, rows.start, rows.stop)[..., keys]
                rows_grad += grad_s.sum_to_size(rows_grad.shape).to(rows_grad.dtype)
            if ctx.scaling != 1.0:
                grad_s.mul_(ctx.scaling)
            grad_s = grad_s.to(query.dtype)
            grad_q[..., rows, :] = torch.matmul(grad_s, key[..., keys, :])
            grad_k[..., keys, :] += torch.matmul(grad_s.transpose(-1, -2), query[..., rows, :])
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None


def tiled_attention(
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
    -> (output [B, Lq, H, D], None). Attention dropout is not supported (a clear error)."""
    if dropout > 0:
        raise ValueError("tiled attention has no attention dropout: use dropout 0")
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = attention_mask is None and getattr(module, "is_causal", False) and q_len > 1
    if causal and q_len != k_len:
        raise ValueError(f"causal tiled attention needs Lq == Lk, got {q_len} and {k_len}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _Tiled.apply(
        query, key, value, position_bias, attention_mask, causal, scaling, module.config.attn_tile
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TILED, tiled_attention)
AttentionMaskInterface.register(TILED, sdpa_mask)

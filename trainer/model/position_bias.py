"""T5's relative position bias from offsets and a cached table of buckets.

T5Attention.compute_bias buckets an [Lq, Lk] matrix of relative positions on every forward (at
L = 2048 that bucketing was over a quarter of a teacher-forced scoring pass) and then gathers one
embedding row per (query, key) pair, whose backward scatters L^2 rows into the few bucket
weights. The bias only depends on the offset j - i, of which there are Lq + Lk - 1: here each
stack's bias layer buckets offsets once into a table it keeps (integers: no gradient, reused by
every forward, in training and under inference mode alike), looks up the Lq + Lk - 1 biases
and spreads them over the rows as windows of one strided view (one copy), so the gradient
still reaches ``relative_attention_bias`` and its backward sums diagonals instead of scattering
L^2 rows. Results equal T5's own (``tests/test_position_bias.py``).
"""

from __future__ import annotations

import types

import torch
from torch import nn

_TABLE = "_stereot5_bucket_table"  # (key, radius, buckets of offsets -radius..radius)


def offset_buckets(module: nn.Module, low: int, high: int, device: torch.device) -> torch.Tensor:
    """T5's bucket of every relative position low..high (key minus query), as a slice of the
    table ``module`` keeps. The table spans at least +-max_distance (the training window); it is
    rebuilt when the settings or device change and at least doubled when a wider range is
    asked for, so decoding step by step builds it O(log L) times, not L times."""
    bidirectional = not module.is_decoder
    buckets = module.relative_attention_num_buckets
    max_distance = module.relative_attention_max_distance
    key = (bidirectional, buckets, max_distance, torch.device(device))
    needed = max(-low, high, 0)
    cached = module.__dict__.get(_TABLE)
    if cached is None or cached[0] != key or cached[1] < needed:
        grown = 2 * cached[1] if cached and cached[0] == key else 0
        radius = max(needed, grown, max_distance)  # one build covers the training window
        # a normal tensor even under inference mode: embedding saves its indices for backward
        with torch.inference_mode(False):
            relative = torch.arange(-radius, radius + 1, device=device)
            table = module._relative_position_bucket(
                relative,
                bidirectional=bidirectional,
                num_buckets=buckets,
                max_distance=max_distance,
            )
        cached = module.__dict__[_TABLE] = (key, radius, table)
    _, radius, table = cached
    return table[low + radius : high + radius + 1]


def offset_bias(
    self: nn.Module,
    query_length: int,
    key_length: int,
    device: torch.device | None = None,
    past_seen_tokens: int | torch.Tensor = 0,
) -> torch.Tensor:
    """T5Attention.compute_bias by offset: [1, H, Lq + Lk - 1], entry k holding the bias of
    key j for query row i where j - i = k - (Lq - 1). T5's own [1, H, Lq, Lk] tensor (and its
    gradient) is O(L^2) per stack; tiled_attention expands this one tile at a time."""
    device = device if device is not None else self.relative_attention_bias.weight.device
    seen = int(past_seen_tokens)
    buckets = offset_buckets(self, -(seen + query_length - 1), key_length - seen - 1, device)
    return self.relative_attention_bias(buckets).T.unsqueeze(0)


def dense_bias(
    self: nn.Module,
    query_length: int,
    key_length: int,
    device: torch.device | None = None,
    past_seen_tokens: int | torch.Tensor = 0,
) -> torch.Tensor:
    """T5Attention.compute_bias, the same [1, H, Lq, Lk] values (query rows after
    ``past_seen_tokens`` cached keys, as in KV-cached decoding), built from ``offset_bias``:
    row i is the window of offsets starting at Lq - 1 - i. One contiguous copy (index_select;
    flip keeps the windows' odd strides when Lq < Lk), so sdpa's mask builder copies no more."""
    by_offset = offset_bias(self, query_length, key_length, device, past_seen_tokens)
    windows = by_offset.contiguous().unfold(-1, key_length, 1)  # [1, H, Lq, Lk], rows reversed
    rows = torch.arange(query_length - 1, -1, -1, device=windows.device)
    return windows.index_select(-2, rows)


def use_cached_bias(model: nn.Module, by_offset: bool) -> None:
    """Make every T5 attention layer that owns the relative position bias build it from its
    bucket table: by offset (``offset_bias``: only tiled_attention reads that form) or as
    T5's dense tensor (``dense_bias``: every attention function)."""
    method = offset_bias if by_offset else dense_bias
    for module in model.modules():
        if getattr(module, "has_relative_attention_bias", False):
            module.compute_bias = types.MethodType(method, module)

"""Sample embeddings shared by the per-sample and the patched model."""

from __future__ import annotations

import torch
from torch import nn


class ValueEmbedding(nn.Module):
    """The token's level as a number: [x, sin(2^k pi x), cos(2^k pi x)] for x in (-1, 1),
    projected to d_model and added to the token's own embedding.

    A 65536-level vocabulary gives each level its own embedding row, which a small run updates
    a handful of times; neighbouring levels, nearly the same sound, share nothing. This feature
    tells the model from the first step that level 30000 lies between 29999 and 30001. The pad
    token gets a flag of its own and no value.
    """

    def __init__(self, levels: int, d_model: int, octaves: int = 8) -> None:
        super().__init__()
        self.levels = levels
        self.register_buffer(
            "freqs", torch.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32), persistent=False
        )
        self.proj = nn.Linear(2 + 2 * octaves, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = (tokens >= self.levels).unsqueeze(-1)
        x = ((tokens.clamp(max=self.levels - 1).float() + 0.5) / self.levels * 2 - 1).unsqueeze(-1)
        angles = x * self.freqs
        feats = torch.cat([x, angles.sin(), angles.cos()], -1).masked_fill(pad, 0.0)
        feats = torch.cat([feats, pad.float()], -1)
        return self.proj(feats.to(self.proj.weight.dtype))

"""Patches of P samples for StereoT5: a patched encoder and a two-level decoder (MegaByte).

One token per sample makes T5's attention O(L^2); here P consecutive samples are one position
of the T5 body, so its encoder, decoder and cross-attention run over L / P positions, and a
small local model restores per-sample resolution (Yu et al. 2023, "MEGABYTE"):

- encoder position k = a learned projection of the embeddings of input samples k*P .. k*P+P-1;
- global decoder position k = a projection of the true target samples of patch k-1 (patch 0:
  pad), plus, with ``align``, a projection of input patch k;
- local model: for target sample j of patch k, a causal transformer over the P positions of the
  patch whose input at j is a per-position projection of global output k plus the embedding of
  sample j-1 of the same patch (j = 0: pad).

So sample (k, j) is predicted from the whole input, every target sample of patches < k and
samples < j of patch k: the chain rule over samples, and the head's NLL is the exact
log-likelihood per sample in the same bits/sample as the per-sample model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.data.batch import IGNORE
from trainer.model.embeddings import ValueEmbedding


class TwoLevel(nn.Module):
    """Sample embedding, patch projections and the local model (the T5 body is the caller's).

    Args:
        levels: codec levels V; V is the pad token.
        patch: P, samples per patch.
        d_model: width of the T5 body.
        local_d: width of sample embeddings and of the local model (its output feeds the head).
        local_layers, local_heads: the local transformer's depth and heads.
        dropout: dropout of the local transformer.
        value_embed: add the level as a number to each sample embedding (see ValueEmbedding).
        align: the global decoder also sees input patch k at position k.
    """

    def __init__(
        self,
        levels: int,
        patch: int,
        d_model: int,
        local_d: int,
        local_layers: int,
        local_heads: int,
        dropout: float,
        value_embed: bool,
        align: bool,
    ) -> None:
        super().__init__()
        self.levels, self.patch, self.local_d = levels, patch, local_d
        self.embed_tokens = nn.Embedding(levels + 1, local_d)
        nn.init.normal_(self.embed_tokens.weight, std=1.0)
        self.value = ValueEmbedding(levels, local_d) if value_embed else None
        width = patch * local_d
        self.encoder_in = nn.Linear(width, d_model)
        self.decoder_in = nn.Linear(width, d_model)
        self.align_in = nn.Linear(width, d_model) if align else None
        self.to_local = nn.Linear(d_model, width)
        layer = nn.TransformerEncoderLayer(
            local_d,
            local_heads,
            4 * local_d,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.local = nn.TransformerEncoder(layer, local_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(local_d)
        mask = nn.Transformer.generate_square_subsequent_mask(patch)
        self.register_buffer("causal", mask, persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., n] tokens 0..V -> [..., n, local_d]."""
        emb = self.embed_tokens(tokens)
        if self.value is not None:
            emb = emb + self.value(tokens).to(emb.dtype)
        return emb

    def _patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, K*P] tokens -> [B, K, P*local_d] concatenated sample embeddings."""
        batch, length = tokens.shape
        return self.embed(tokens).reshape(batch, length // self.patch, -1)

    def encoder_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, K*P] input tokens -> encoder inputs [B, K, d]."""
        return self.encoder_in(self._patches(input_ids))

    def global_inputs(
        self, input_ids: torch.Tensor, labels: torch.Tensor, pad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder inputs [B, K, d] and teacher-forced global decoder inputs [B, K, d]."""
        targets = labels.masked_fill(labels == IGNORE, pad)
        previous = torch.cat([torch.full_like(targets[:, : self.patch], pad), targets], 1)
        input_patches = self._patches(input_ids)
        decoder = self.decoder_in(self._patches(previous[:, : targets.shape[1]]))
        return self.encoder_in(input_patches), self._align(decoder, input_patches)

    def decoder_step(
        self, previous_patch: torch.Tensor, input_ids: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Generation: global decoder input [B, 1, d] for patch k from patch k-1's tokens."""
        decoder = self.decoder_in(self._patches(previous_patch))
        span = input_ids[:, k * self.patch : (k + 1) * self.patch]
        return self._align(decoder, self._patches(span) if self.align_in is not None else None)

    def _align(self, decoder: torch.Tensor, input_patches: torch.Tensor | None) -> torch.Tensor:
        if self.align_in is None:
            return decoder
        return decoder + self.align_in(input_patches)

    def context(self, global_out: torch.Tensor) -> torch.Tensor:
        """[B, K, d] global outputs -> [B, K, P, local_d] per-position local inputs."""
        batch, patches, _ = global_out.shape
        return self.to_local(global_out).view(batch, patches, self.patch, self.local_d)

    def run_local(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n <= P, local_d] local inputs -> [N, n, local_d] (causal within the patch)."""
        n = x.shape[1]
        return self.norm(self.local(x, mask=self.causal[:n, :n], is_causal=True))

    def local_hidden(self, global_out: torch.Tensor, labels: torch.Tensor, pad: int):
        """Teacher-forced per-sample states [B, L, local_d] for the head."""
        batch, length = labels.shape
        targets = labels.masked_fill(labels == IGNORE, pad).view(batch, -1, self.patch)
        previous = torch.cat([torch.full_like(targets[..., :1], pad), targets[..., :-1]], -1)
        x = self.context(global_out) + self.embed(previous)
        return self.run_local(x.flatten(0, 1)).view(batch, length, self.local_d)

    def generate_patch(
        self,
        global_out: torch.Tensor,
        pick: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        pad: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation: global output [B, d] of patch k -> its P tokens [B, P] and their
        log-probabilities, one local step at a time (``pick``: hidden -> token, log-prob).

        Each step reruns the local model over the patch so far: P^2 / 2 local positions per
        patch instead of P, on a model far smaller than the body, and no second cache."""
        context = self.context(global_out[:, None])[:, 0]
        batch = global_out.shape[0]
        tokens = torch.full((batch, self.patch), pad, dtype=torch.long, device=global_out.device)
        log_probs = torch.empty((batch, self.patch), device=global_out.device)
        previous = tokens.clone()  # position j holds sample j - 1 (pad at 0)
        for j in range(self.patch):
            x = context[:, : j + 1] + self.embed(previous[:, : j + 1])
            tokens[:, j], log_probs[:, j] = pick(self.run_local(x)[:, -1])
            if j + 1 < self.patch:
                previous[:, j + 1] = tokens[:, j]
        return tokens, log_probs

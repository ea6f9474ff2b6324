"""Autoregressive decoding with the decoder's KV cache: one position per step (patched: one
patch per global step, its samples from the local model), the head's stepper choosing each
sample."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

if TYPE_CHECKING:
    from trainer.model.module import StereoT5


def decode(
    model: StereoT5,
    input_ids: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, L] and their log-probabilities, decoded from input tokens [B, L] (the model in
    eval mode; residual tokens in and out when the model is residual)."""
    body = model.body
    batch, length = input_ids.shape
    step = model.patch_size  # samples per decoder position
    patch = model.patch
    enc_in = model.embed(input_ids) if patch is None else patch.encoder_inputs(input_ids)
    enc = body.encoder(inputs_embeds=enc_in).last_hidden_state
    dec_cfg = body.decoder.config
    cache = EncoderDecoderCache(DynamicCache(config=dec_cfg), DynamicCache(config=dec_cfg))
    tokens = input_ids.new_full((batch, length), model.pad_id)
    log_probs = torch.empty((batch, length), device=input_ids.device)
    pick = model.head.stepper(input_ids, temperature, generator)
    for start in range(0, length, step):
        # the decoder input: the step before's tokens (pad at the start)
        previous = tokens[:, start - step : start] if start else tokens[:, :step]
        if model.patch is None:
            emb = model.embed(previous)
            if model.align_embed is not None:
                emb = emb + model.align_embed(input_ids[:, start : start + 1])
        else:
            emb = model.patch.decoder_step(previous, input_ids, start // step)
        out = body.decoder(
            inputs_embeds=emb, encoder_hidden_states=enc, cache=cache, use_cache=True
        )
        cache = out.cache
        hidden = out.last_hidden_state[:, -1]
        if model.patch is None:
            tokens[:, start], log_probs[:, start] = pick(hidden)
        else:
            span = slice(start, start + step)
            tokens[:, span], log_probs[:, span] = model.patch.generate_patch(
                hidden, pick, model.pad_id
            )
    return tokens, log_probs

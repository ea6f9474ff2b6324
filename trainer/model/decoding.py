"""Autoregressive decoding with the decoder's KV cache: one position per step (patched: one
patch per global step, its samples from the local model), the head's stepper choosing each
sample. With a body window the body starts afresh (encoder, cache) at each window, as in
teacher forcing, while the head's stepper runs over the whole sequence."""

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
    window = model.body_window or length  # the body attends within windows of this length
    tokens = input_ids.new_full((batch, length), model.pad_id)
    log_probs = torch.empty((batch, length), device=input_ids.device)
    pick = model.head.stepper(input_ids, temperature, generator)
    dec_cfg = body.decoder.config
    start_tokens = input_ids.new_full((batch, step), model.pad_id)
    for first in range(0, length, window):
        part = input_ids[:, first : first + window]
        enc_in = model.embed(part) if patch is None else patch.encoder_inputs(part)
        enc = body.encoder(inputs_embeds=enc_in).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(config=dec_cfg), DynamicCache(config=dec_cfg))
        for start in range(first, min(first + window, length), step):
            # the decoder input: the step before's tokens (pad at the window's start)
            previous = tokens[:, start - step : start] if start > first else start_tokens
            if patch is None:
                emb = model.embed(previous)
                if model.align_embed is not None:
                    emb = emb + model.align_embed(input_ids[:, start : start + 1])
            else:
                emb = patch.decoder_step(previous, input_ids, start // step)
            out = body.decoder(
                inputs_embeds=emb, encoder_hidden_states=enc, cache=cache, use_cache=True
            )
            cache = out.cache
            hidden = out.last_hidden_state[:, -1]
            if patch is None:
                tokens[:, start], log_probs[:, start] = pick(hidden)
            else:
                span = slice(start, start + step)
                tokens[:, span], log_probs[:, span] = patch.generate_patch(
                    hidden, pick, model.pad_id
                )
    return tokens, log_probs

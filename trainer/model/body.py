"""The T5 body: its config from the model's settings, and the settings that cannot work."""

from __future__ import annotations

from typing import Any

from transformers import T5Config, T5Model

from trainer.model.attention import TILED
from trainer.model.errors import ModelError
from trainer.model.heads import HeadOptions
from trainer.model.position_bias import use_cached_bias


def check_settings(
    head: HeadOptions, dropout: float, attn_tile: int, max_len: int, patch_size: int, residual: bool
) -> None:
    """One-line errors for settings that cannot work together, before anything is built."""
    if attn_tile < 0:
        raise ModelError(f"attn_tile must be >= 0 (0: dense attention), got {attn_tile}")
    if attn_tile and dropout > 0:
        raise ModelError("attn_tile has no attention dropout: use dropout 0 or attn_tile 0")
    if patch_size < 1 or max_len % patch_size:
        raise ModelError(
            f"seq_len (max_len) {max_len} is not a multiple of patch_size {patch_size}: "
            f"use a seq_len divisible by {patch_size}"
        )
    module = type(head).module
    if residual and module.residual_refusal:
        raise ModelError(module.residual_refusal)
    if patch_size > 1 and module.patch_refusal:
        raise ModelError(f"{module.patch_refusal} (got {patch_size})")


def body_config(
    levels: int, max_len: int, patch_size: int, attn_tile: int, dropout: float, **t5: Any
) -> T5Config:
    """T5Config of the body: V + 1 token rows (pad V is also the decoder start; a patched
    body gets its inputs as embeddings), no LM head, relative attention over the window.
    ``t5``: d_model, d_ff, num_layers, num_decoder_layers, num_heads, d_kv, feed_forward_proj,
    relative_attention_num_buckets."""
    patched = patch_size > 1
    config = T5Config(
        vocab_size=1 if patched else levels + 1,
        dropout_rate=dropout,
        relative_attention_max_distance=max_len // patch_size,
        pad_token_id=0 if patched else levels,
        decoder_start_token_id=0 if patched else levels,
        eos_token_id=None,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=TILED if attn_tile else "sdpa",
        attn_tile=attn_tile,
        **t5,
    )
    if config.dense_act_fn == "gelu_new":
        # the same tanh-GELU (equal to 1e-15) in one fused op: autograd keeps its input only,
        # where gelu_new's five elementwise steps keep five [B, L, d_ff] tensors per layer
        config.dense_act_fn = "gelu_pytorch_tanh"
    return config


def build_body(config: T5Config, checkpoint_body: bool) -> T5Model:
    """The T5Model; its position bias comes from a bucket table each stack keeps, not from
    bucketing an L x L matrix per forward (with tiled attention: by offset), and with
    ``checkpoint_body`` every layer is recomputed in backward."""
    body = T5Model(config)
    use_cached_bias(body, by_offset=bool(config.attn_tile))
    if checkpoint_body:
        body.gradient_checkpointing_enable({"use_reentrant": False})
    return body

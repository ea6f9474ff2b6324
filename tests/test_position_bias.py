"""The position bias from each stack's bucket table (trainer/model/position_bias.py) equals T5's
own compute_bias: the same values, the same body outputs and gradients (dense, tiled, with
activation checkpointing, under LoRA), the same KV-cached decoding; and a second forward
buckets nothing.

Tolerances: bias values, body outputs and decoding are compared exactly (rtol = atol = 0: the
same bias values enter the same attention arithmetic); gradients with rtol 0 and atol 1e-5 of
the largest |gradient| of each parameter, because the bias weights' gradient is now a sum over
diagonals instead of a scatter of L^2 rows, fp32 sums in another order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL
from transformers import T5Model
from transformers.models.t5.modeling_t5 import T5Attention

from trainer.model import StereoT5
from trainer.model.body import body_config, build_body
from trainer.model.lora import wrap_lora
from trainer.model.position_bias import dense_bias

LEVELS = 255
# 8 buckets over max distance 24: windows of 40 reach the log-spaced and the clamped buckets
BODY = dict(TINY_MODEL, num_layers=2, num_decoder_layers=2, relative_attention_num_buckets=8)
TINY = dict(codec="pcm16", **BODY, max_len=24, head="coarse_fine", align=True, warmup_steps=0)


def _t5_bias(model: torch.nn.Module) -> None:
    """Back to T5's own compute_bias (drop the per-instance method build_body installs)."""
    for module in model.modules():
        module.__dict__.pop("compute_bias", None)


@pytest.fixture
def bucket_calls(monkeypatch) -> list[int]:
    """Sizes of every T5Attention._relative_position_bucket call, T5's and the table's."""
    calls: list[int] = []
    original = T5Attention._relative_position_bucket

    def counted(relative_position, *args, **kwargs):
        calls.append(relative_position.numel())
        return original(relative_position, *args, **kwargs)

    monkeypatch.setattr(T5Attention, "_relative_position_bucket", staticmethod(counted))
    return calls


def _bodies(attn_tile: int, checkpoint_body: bool, lora: bool) -> tuple[torch.nn.Module, ...]:
    """(the body as build_body makes it, the same weights with T5's own compute_bias)."""
    torch.manual_seed(0)
    config = body_config(LEVELS, 24, 1, attn_tile, 0.0, **BODY)
    ours, theirs = build_body(config, checkpoint_body), T5Model(config)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():  # a bias far from zero, so a wrong row would show
        for body in (ours, theirs):
            for module in body.modules():
                if getattr(module, "has_relative_attention_bias", False):
                    weight = module.relative_attention_bias.weight
                    weight.copy_(torch.linspace(-3, 3, weight.numel()).view_as(weight))
    if lora:
        ours, theirs = (wrap_lora(body, {"r": 4, "alpha": 8}) for body in (ours, theirs))
        theirs.load_state_dict(ours.state_dict())  # the same random lora_A
    return ours.train(), theirs.train()


def _loss(states: torch.Tensor, seed: int) -> torch.Tensor:
    """A random projection of a stack's output (its sum of squares would not do: T5's final
    RMS norm makes that nearly constant, its gradient rounding noise)."""
    g = torch.Generator().manual_seed(seed)
    return (states * torch.randn(states.shape, generator=g)).sum()


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize(
    ("q_len", "k_len", "seen"), [(40, 40, 0), (1, 1, 0), (1, 17, 16), (3, 20, 17), (7, 30, 0)]
)
def test_dense_bias_equals_t5s_compute_bias(decoder: bool, q_len: int, k_len: int, seen: int):
    config = body_config(LEVELS, 24, 1, 0, 0.0, **BODY)
    config.is_decoder = decoder
    attention = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    torch.nn.init.normal_(attention.relative_attention_bias.weight)
    want = attention.compute_bias(q_len, k_len, past_seen_tokens=seen)
    got = dense_bias(attention, q_len, k_len, past_seen_tokens=seen)
    assert got.shape == want.shape == (1, 2, q_len, k_len) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_buckets_equal_t5s_at_the_demo_window(bucket_calls):
    config = body_config(65536, 2048, 1, 0, 0.0, num_heads=2)
    for decoder in (False, True):
        config.is_decoder = decoder
        attention = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
        torch.nn.init.normal_(attention.relative_attention_bias.weight)
        torch.testing.assert_close(
            dense_bias(attention, 2048, 2048), attention.compute_bias(2048, 2048), rtol=0, atol=0
        )
    # the table's offsets -2048..2048 (its span: max_distance) against T5's L x L matrix
    assert sorted(bucket_calls) == [4097, 4097, 2048**2, 2048**2]


@pytest.mark.parametrize(
    ("attn_tile", "checkpoint_body", "lora"),
    [(0, False, False), (0, True, False), (16, False, False), (16, True, False), (0, False, True)],
)
def test_body_outputs_and_gradients_equal_t5s(attn_tile, checkpoint_body, lora, bucket_calls):
    ours, theirs = _bodies(attn_tile, checkpoint_body, lora)
    g = torch.Generator().manual_seed(1)
    enc_in, dec_in = torch.randn(2, 2, 40, 32, generator=g)
    outs = []
    for body in (ours, theirs):
        out = body(inputs_embeds=enc_in, decoder_inputs_embeds=dec_in)
        (_loss(out.last_hidden_state, 4) + _loss(out.encoder_last_hidden_state, 5)).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].encoder_last_hidden_state, outs[1].encoder_last_hidden_state)
    torch.testing.assert_close(outs[0].last_hidden_state, outs[1].last_hidden_state)
    named = dict(theirs.named_parameters())
    checked = 0
    for name, param in ours.named_parameters():
        if param.grad is None:
            assert named[name].grad is None, name
            continue
        scale = float(named[name].grad.abs().max())
        torch.testing.assert_close(param.grad, named[name].grad, rtol=0, atol=1e-5 * scale)
        checked += "relative_attention_bias" in name
    assert checked == (0 if lora else 2)  # LoRA freezes the bias weights; else both stacks'

    bucket_calls.clear()
    _loss(ours(inputs_embeds=enc_in, decoder_inputs_embeds=dec_in).last_hidden_state, 4).backward()
    ours(inputs_embeds=enc_in[:, :9], decoder_inputs_embeds=dec_in[:, :9])  # a shorter window
    assert bucket_calls == []  # both stacks' buckets came from their tables


def test_bias_weights_get_their_gradient_and_a_step_changes_the_bias():
    ours, _ = _bodies(0, False, False)
    emb = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(2))
    before = ours(inputs_embeds=emb, decoder_inputs_embeds=emb).last_hidden_state
    weight = ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    _loss(before, 4).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with torch.no_grad():
        weight.add_(weight.grad, alpha=-1.0)  # an optimizer step, in place
    after = ours(inputs_embeds=emb, decoder_inputs_embeds=emb).last_hidden_state
    assert not torch.allclose(before, after)  # the new weights, not a stale bias


@pytest.mark.parametrize("attn_tile", [0, 16])
def test_kv_cached_generation_equals_t5s_and_the_full_decoder(attn_tile: int, bucket_calls):
    torch.manual_seed(0)
    ours = StereoT5(**TINY, attn_tile=attn_tile).eval()
    theirs = StereoT5(**TINY, attn_tile=attn_tile).eval()
    theirs.load_state_dict(ours.state_dict())
    _t5_bias(theirs)
    steps = torch.randint(-300, 301, (2, 40), generator=torch.Generator().manual_seed(3))
    inputs = (32768 + steps.cumsum(-1)).clamp(0, 65535)
    bucket_calls.clear()
    tokens, log_probs = ours.generate(inputs)
    # the encoder's table once; the decoder's at step 0 (offsets up to max_distance 24) and,
    # doubled, at step 25: not one bucketing per step
    assert bucket_calls == [79, 49, 97]
    bucket_calls.clear()
    assert torch.equal(ours.generate(inputs)[0], tokens) and bucket_calls == []
    want_tokens, want_log_probs = theirs.generate(inputs)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(log_probs, want_log_probs, rtol=0, atol=0)

    # teacher-forced on the decoded tokens, the whole decoder at once gives the same states
    # as the cached steps did: each step got its own bias row
    with torch.inference_mode():
        _, full = ours.hidden(inputs, tokens)
        scored = ours.head(full, tokens, inputs)
    torch.testing.assert_close(-scored.nll, log_probs, rtol=1e-5, atol=1e-4)


def test_table_built_under_inference_mode_serves_training(bucket_calls):
    torch.manual_seed(0)
    ours, theirs = StereoT5(**TINY), StereoT5(**TINY)
    theirs.load_state_dict(ours.state_dict())
    _t5_bias(theirs)
    inputs, labels = torch.randint(0, 65536, (2, 2, 24))
    with torch.inference_mode():
        ours.score(inputs, labels)
    calls = len(bucket_calls)
    scored = ours.score(inputs, labels)
    scored["nll_sum"].backward()  # embedding saves the table's slice for backward
    assert len(bucket_calls) == calls  # the tables from inference mode, no new bucketing
    torch.testing.assert_close(scored["nll"], theirs.score(inputs, labels)["nll"], rtol=0, atol=0)

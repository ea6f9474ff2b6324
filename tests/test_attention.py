"""Tiled attention (`attn_tile`): the same function as sdpa, one tile of query rows at a time,
with T5's position bias given whole or by offset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.model import ModelError, StereoT5
from trainer.model.attention import tiled_attention

TINY = dict(
    codec="pcm16",
    d_model=32,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    d_kv=16,
    max_len=100,
    warmup_steps=0,
)


class _Module(torch.nn.Module):
    """What the attention function reads from T5Attention: `is_causal` and `config.attn_tile`."""

    def __init__(self, is_causal: bool, block: int) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.config = type("Config", (), {"attn_tile": block})()


def _qkv(q_len: int, k_len: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
        for n in (q_len, k_len, k_len)
    )


def _assert_matches_sdpa(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], mask) -> None:
    """out equals sdpa (scale 0.125) under `mask`, and so do the gradients of q, k, v and the
    bias (inputs[3], from which the mask was built)."""
    q, k, v, _ = inputs
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("block", [1, 7, 64])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float"])
def test_function_equals_sdpa_values_and_gradients(block: int, mask_kind: str) -> None:
    q, k, v = _qkv(20, 20)
    bias = torch.randn(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every row attends somewhere
    mask = {"bool": keep, "float": torch.where(keep, 0.0, -1e9).double()}.get(mask_kind)
    causal = mask_kind == "causal"
    out, weights = tiled_attention(
        _Module(causal, block), q, k, v, mask, scaling=0.125, position_bias=bias
    )
    assert weights is None and out.shape == (2, 20, 3, 8)

    full_mask = bias
    if causal:
        full_mask = bias.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    elif mask_kind == "bool":
        full_mask = bias.masked_fill(~keep, float("-inf"))
    elif mask_kind == "float":
        full_mask = bias + mask
    _assert_matches_sdpa(out, (q, k, v, bias), full_mask)


@pytest.mark.parametrize("causal", [False, True])
def test_bias_by_offset_equals_the_expanded_bias(causal: bool) -> None:
    q, k, v = _qkv(20, 20)
    by_offset = torch.randn(1, 3, 39, dtype=torch.float64, requires_grad=True)
    offsets = torch.arange(20)[None, :] - torch.arange(20)[:, None] + 19  # key j - row i + Lq-1
    out, _ = tiled_attention(
        _Module(causal, 7), q, k, v, None, scaling=0.125, position_bias=by_offset
    )
    mask = by_offset[..., offsets]
    if causal:
        mask = mask.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    _assert_matches_sdpa(out, (q, k, v, by_offset), mask)


def test_causal_needs_square_scores() -> None:
    q, k, v = _qkv(4, 6)
    with pytest.raises(ValueError, match="Lq == Lk"):
        tiled_attention(_Module(True, 2), q, k, v, None)


@pytest.mark.parametrize("align", [False, True])
def test_model_scores_gradients_and_generation_equal_dense(align: bool) -> None:
    torch.manual_seed(0)
    dense = StereoT5(**TINY, head="coarse_fine", align=align)
    blocks = StereoT5(**TINY, head="coarse_fine", align=align, attn_tile=48)  # 100 = 48+48+4
    blocks.load_state_dict(dense.state_dict())
    inputs = torch.randint(0, 65536, (2, 100))
    labels = torch.randint(0, 65536, (2, 100))
    scored = [model.score(inputs, labels) for model in (dense, blocks)]
    torch.testing.assert_close(scored[1]["nll"], scored[0]["nll"], rtol=1e-5, atol=1e-5)
    for s in scored:
        s["nll_sum"].backward()
    for (name, a), b in zip(dense.named_parameters(), blocks.parameters(), strict=True):
        if a.grad is not None:
            scale = float(a.grad.abs().max())  # fp32 sums in another order: relative to max
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-5 * scale, msg=name)
    (tok_a, lp_a), (tok_b, lp_b) = (m.generate(inputs[:, :32]) for m in (dense, blocks))
    assert torch.equal(tok_a, tok_b)
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-5, atol=1e-5)


def test_patched_model_runs_tiled() -> None:
    torch.manual_seed(0)
    kw = dict(TINY, max_len=96, patch_size=8, local_d=16, local_layers=1, local_heads=2)
    dense, blocks = StereoT5(**kw), StereoT5(**kw, attn_tile=5)
    blocks.load_state_dict(dense.state_dict())
    inputs, labels = torch.randint(0, 65536, (2, 2, 96))
    torch.testing.assert_close(
        blocks.score(inputs, labels)["nll"], dense.score(inputs, labels)["nll"]
    )


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ModelError, match="attn_tile must be >= 0"):
        StereoT5(**TINY, attn_tile=-1)
    with pytest.raises(ModelError, match="no attention dropout"):
        StereoT5(**TINY, attn_tile=64, dropout=0.1)
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="no attention dropout"):
        tiled_attention(_Module(False, 2), q, k, v, None, dropout=0.1)

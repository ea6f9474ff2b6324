"""T5 LightningModule: token layout, output heads, LoRA, exact metrics, export (design §7, §10).

Token layout: codec levels ``0..V-1`` are audio, ``V`` is pad and decoder start (never an audio
value, never predicted: every head outputs V classes, or 2 x sqrt(V) for ``coarse_fine``), and
``-100`` marks ignored label positions. Decoder input = labels shifted right with ``V`` first.

Body: ``transformers.T5Model`` (no LM head): ``T5ForConditionalGeneration.forward`` always builds
``[B, L, V + 1]`` float logits, 1.07 GB per 4096 tokens at V = 65536. Heads, all returning the
per-position NLL in nats (0 where ignored) and an argmax prediction:

- ``full``: ``Linear(d, V)`` and one cross-entropy (small vocabularies).
- ``chunked``: the same Linear (same parameter names as ``full``: a checkpoint moves between the
  two), loss over ``head_chunk`` positions at a time, each chunk under activation checkpointing,
  so ``[B, L, V]`` logits never exist at once. Same FLOPs as ``full`` plus one recomputed chunk
  forward: it saves memory, not time (§10).
- ``coarse_fine``: V = 2**bits split into a high part (``token >> low_bits``) and a low part
  (``token & (2**low_bits - 1)``), 256 + 256 for pcm16. ``-log p(token) = -log p(high) -
  log p(low | high)``: the same likelihood by the chain rule. The low head sees the true high
  part in training (teacher forcing) and the argmax/sampled one in generation.
- ``logistic`` (``trainer.logistic``): a discretized logistic mixture over the V levels (exact
  per-level probabilities from CDF differences) whose means follow a backward-adaptive linear
  predictor of the target from its own past and the input around t, and whose scales and
  weights the network sets from the recent error level and the decoder state. Per-position NLL in
  nats like the others; the prediction is the mixture's mode. Needs patch_size 1, no residual.

Metrics are exact over any number of batches: every step reduces to sums (NLL, target count,
correct argmaxes, signal and error energy in int16 units) and the reported values are ratios of
sums, never means of batch means; an all-padding batch adds zero count and no NaN.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric
from transformers import T5Config, T5Model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from pipeline.codec import Codec, get_codec
from pipeline.errors import PipelineError
from trainer.attention import BLOCKWISE, use_offset_bias
from trainer.embeddings import ValueEmbedding
from trainer.logistic import LogisticHead
from trainer.patched import TwoLevel

__all__ = [
    "HEADS",
    "CoarseFineHead",
    "ModelError",
    "SoftmaxHead",
    "StereoT5",
    "SumMetrics",
    "lr_factor",
    "summarize",
]

IGNORE = -100
HEADS = ("full", "chunked", "coarse_fine", "logistic")
FULL_HEAD_MAX_LEVELS = 4096  # head="auto": full up to 4096 levels (16 MB of fp32 logits/1k tokens)
LORA_TARGETS = ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]  # §10: gated FFNs have no `wi`
EXPORT_FORMAT = "stereo-t5/1"
META_NAME = "stereo_t5.json"
HEADS_NAME = "heads.safetensors"
AUDIO_SECONDS = 4.0  # per W&B audio example
LN2 = math.log(2.0)


class ModelError(PipelineError, ValueError):
    """A user error about a model file or a batch: one line naming the file and the fix (the
    project's error type, so the CLI prints it without a traceback; also a ValueError)."""


# ----------------------------------------------------------------------------- heads


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    """argmax (temperature 0) or a sample from softmax(logits / T); returns the index and the
    model's log-probability of it (at temperature 1, the likelihood the evaluation reports)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if temperature > 0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        idx = logp.argmax(-1)
    return idx, logp.gather(-1, idx[..., None]).squeeze(-1)


class SoftmaxHead(nn.Module):
    """One ``Linear(d, V)`` over all levels: ``full`` (chunk=None) or ``chunked``."""

    def __init__(self, d_model: int, levels: int, chunk: int | None = None) -> None:
        super().__init__()
        self.levels = levels
        self.chunk = chunk
        self.proj = nn.Linear(d_model, levels)
        nn.init.normal_(self.proj.weight, std=d_model**-0.5)
        nn.init.zeros_(self.proj.bias)

    def _nll_pred(self, hidden: torch.Tensor, targets: torch.Tensor):
        logits = self.proj(hidden).float()
        nll = F.cross_entropy(
            logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view_as(targets)
        return nll, logits.detach().argmax(-1)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor):
        """hidden [B, L, d], targets [B, L] (-100 ignored) -> (nll [B, L] nats, pred [B, L])."""
        if self.chunk is None:
            return self._nll_pred(hidden, targets)
        nlls, preds = [], []
        for start in range(0, hidden.shape[1], self.chunk):
            h, t = hidden[:, start : start + self.chunk], targets[:, start : start + self.chunk]
            if torch.is_grad_enabled() and h.requires_grad:
                # Only the chunk's inputs are kept; its [B, chunk, V] logits are rebuilt in
                # backward. Without the checkpoint autograd keeps every chunk's logits (§10).
                nll, pred = checkpoint(self._nll_pred, h, t, use_reentrant=False)
            else:
                nll, pred = self._nll_pred(h, t)
            nlls.append(nll)
            preds.append(pred)
        return torch.cat(nlls, 1), torch.cat(preds, 1)

    def step(self, hidden: torch.Tensor, temperature: float, generator=None):
        """One generation step: hidden [B, d] -> (token [B], log-prob [B])."""
        return _pick(self.proj(hidden), temperature, generator)


class CoarseFineHead(nn.Module):
    """High part then low part given the high part: two sqrt(V)-way softmaxes (256 + 256 for
    pcm16) instead of one V-way.

    The low head is a one-hidden-layer MLP over ``[hidden ; embedding(high)]`` rather than a
    single Linear: with a Linear the high part only adds a per-high bias to the low logits, so it
    cannot say "low near 0xFF if high is 0x12, near 0x00 if it is 0x13", which is exactly the
    case of a sharp prediction near a high-part boundary. It costs 3 d^2 + 256 d MACs per
    position, under 2 % of a d 256, 2+2-layer body.
    """

    def __init__(self, d_model: int, levels: int) -> None:
        super().__init__()
        bits = levels.bit_length() - 1
        if levels != 1 << bits or bits < 2:
            raise ModelError(f"coarse_fine needs a power-of-two level count, got {levels}")
        self.levels = levels
        self.low_bits = bits // 2
        self.n_low = 1 << self.low_bits
        self.n_high = levels >> self.low_bits
        self.high = nn.Linear(d_model, self.n_high)
        self.high_embed = nn.Embedding(self.n_high, d_model)
        self.low = nn.Sequential(
            nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Linear(d_model, self.n_low)
        )
        for linear in (self.high, self.low[0], self.low[2]):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
            nn.init.zeros_(linear.bias)

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens in 0..V-1 -> (high, low)."""
        return tokens >> self.low_bits, tokens & (self.n_low - 1)

    def low_logits(self, hidden: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.low(torch.cat([hidden, self.high_embed(high).to(hidden.dtype)], -1))

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor):
        """hidden [B, L, d], targets [B, L] (-100 ignored) -> (nll [B, L] nats, pred [B, L])."""
        keep = targets != IGNORE
        high, low = self.split(targets.clamp(min=0))
        high_logits = self.high(hidden).float()
        low_logits = self.low_logits(hidden, high).float()
        nll = F.cross_entropy(
            high_logits.flatten(0, -2), high.flatten(), reduction="none"
        ) + F.cross_entropy(low_logits.flatten(0, -2), low.flatten(), reduction="none")
        nll = torch.where(keep, nll.view_as(targets), 0.0)
        with torch.no_grad():
            pred_high = high_logits.argmax(-1)
            pred_low = self.low_logits(hidden, pred_high).argmax(-1)
        return nll, (pred_high << self.low_bits) | pred_low

    def step(self, hidden: torch.Tensor, temperature: float, generator=None):
        """One generation step: hidden [B, d] -> (token [B], log-prob [B])."""
        high, lp_high = _pick(self.high(hidden), temperature, generator)
        low, lp_low = _pick(self.low_logits(hidden, high), temperature, generator)
        return (high << self.low_bits) | low, lp_high + lp_low


# ----------------------------------------------------------------------------- metrics

SUM_FIELDS = ("nll", "count", "correct", "signal", "error")


class SumMetrics(Metric):
    """float64 sums of NLL (nats), target count, correct argmaxes, target energy and error energy
    (int16 units squared) and, with ``untrained``, the NLL of the logistic head at step 0;
    reduced by summing across processes."""

    full_state_update = False

    def __init__(self, untrained: bool = False) -> None:
        super().__init__()
        self.fields = (*SUM_FIELDS, "untrained") if untrained else SUM_FIELDS
        for name in self.fields:
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: dict[str, torch.Tensor]) -> None:
        for name in self.fields:
            setattr(self, name, getattr(self, name) + sums[name].detach().to(torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        return summarize({name: getattr(self, name) for name in self.fields})


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums -> loss (nats/sample), bits_per_sample, accuracy, snr_db; zero count gives 0, not NaN.

    Error energy is a sum of squared int16 differences, so it is 0 or >= 1: clamping both
    energies at 1 only changes the 0/0 and x/0 cases (a perfect prediction reports 10 log10 of
    the signal energy instead of inf).
    """
    count = sums["count"].clamp(min=1)
    loss = sums["nll"] / count
    out = {"loss": loss, "bits_per_sample": loss / LN2, "accuracy": sums["correct"] / count}
    if "untrained" in sums:
        out["bits_per_sample_untrained"] = sums["untrained"] / count / LN2
    if "signal" in sums:
        ratio = sums["signal"].clamp(min=1) / sums["error"].clamp(min=1)
        out["snr_db"] = 10 * torch.log10(ratio)
    return out


# ----------------------------------------------------------------------------- module


def lr_factor(step: int, warmup: int, total: int | None) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 down to 0.1 at step ``total``
    (constant after warmup when the run length is unknown)."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def to_residual(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels ``0..V-1`` -> each one's difference from the level before it, plus V/2, mod V
    (the first from V/2); pad (V) and ignored (-100) positions stay as they are, and a level
    after one of them is taken relative to V/2. A bijection on the valid positions, so a
    likelihood over residuals is exactly the likelihood over levels."""
    mid = levels // 2
    valid = (tokens >= 0) & (tokens < levels)
    prev = _level_or_mid(_shift_right(tokens, IGNORE), levels)
    return torch.where(valid, (tokens - prev + mid) % levels, tokens)


def from_residual(residuals: torch.Tensor, prev: torch.Tensor, levels: int) -> torch.Tensor:
    """Residual tokens and the levels before them (out of range: V/2) -> levels."""
    return (residuals + _level_or_mid(prev, levels) - levels // 2) % levels


def _level_or_mid(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Audio levels as they are; pad, -100 or any other out-of-range token -> V/2."""
    return torch.where((tokens >= 0) & (tokens < levels), tokens, levels // 2)


def _shift_right(labels: torch.Tensor, start: int) -> torch.Tensor:
    """Decoder input: ``start`` then labels[:-1], with -100 replaced by ``start`` (the pad)."""
    shifted = torch.full_like(labels, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, start)


class StereoT5(pl.LightningModule):
    """T5 that predicts the target channel's tokens from the input channel's, time-aligned.

    Batches: ``dict(input_ids=[B, L], labels=[B, L], direction=[B])`` (direction is not used by
    the model); tokens ``0..V-1``, input pad ``V``, ignored labels ``-100``.

    Args:
        codec: codec spec (``pipeline.codec.get_codec``); fixes V = levels.
        d_model, d_ff, num_layers, num_decoder_layers, num_heads, d_kv, dropout,
        relative_attention_num_buckets: the ``T5Config`` fields of the same names
            (dropout = ``dropout_rate``).
        feed_forward_proj: ``gated-gelu`` (T5 v1.1: lower loss per FLOP than ``relu`` in the
            GLU-variants study; 3 FFN matrices instead of 2) or ``relu`` (original T5).
        max_len: training window; T5's ``relative_attention_max_distance`` (its default 128
            puts every offset above 128 samples, 3 ms at 44.1 kHz, into one bucket).
        head: ``full``, ``chunked``, ``coarse_fine``, ``logistic`` or ``auto`` (full up to
            4096 levels, else coarse_fine). ``logistic`` (``trainer.logistic``): a discretized
            logistic mixture over the levels around a backward-adaptive linear predictor of
            the target from its past and the input around t; needs patch_size 1 and no
            residual.
        mixtures, lpc_order, lpc_taps, lpc_block, lpc_forget: the logistic head's components,
            past target samples, input samples each side of t, samples per predictor refit
            and per-block weight of older blocks in the refit (unused by other heads).
        head_chunk: sequence positions per chunk for ``chunked``.
        align: add a learned embedding of input token t to decoder input t (cross-attention has
            no positions, so without it the decoder must find its input sample by content).
        residual: model each sample as its difference from the sample before it (``to_residual``;
            the input channel too). Exact: the same likelihood of the same levels, in the same
            bits/sample. Music moves little from one sample to the next, so the residuals use a
            few hundred levels near V/2 and a small model learns them quickly, the way FLAC's
            fixed predictors do; the model still sees everything before t.
        patch_size: P = 1: one T5 position per sample. P >= 2: the patched encoder and
            two-level decoder of ``trainer.patched`` (the body runs over max_len / P positions,
            a local transformer of ``local_layers`` x ``local_d`` with ``local_heads`` heads
            predicts the P samples of each patch; max_len must be a multiple of P).
        local_d, local_layers, local_heads: the local model of P >= 2 (unused for P = 1).
        checkpoint_body: activation checkpointing of every T5 block (recomputed in backward):
            about 1/3 more compute for much less activation memory at long windows.
        attn_block: 0: the body's attention is torch's sdpa, which with T5's learned position
            bias keeps [B, H, L, L] scores per layer. N > 0: block-wise attention
            (``trainer.attention``) over N query rows at a time, recomputed in backward: one
            block's scores at a time, for one more pass of the score products; T5's position
            bias is then built by offset, not as an L x L tensor.
        lr, weight_decay, warmup_steps: AdamW with linear warmup, then cosine decay to 10 % of
            lr at ``max_steps`` (None: the Trainer's max_steps or estimated stepping batches).
        compile: ``torch.compile`` the body's training forward (in ``configure_model``).
        lora: ``{"r": 8, "alpha": 16, "dropout": 0.0}`` to train LoRA adapters on the body
            (q, k, v, o and the FFN matrices) of the ``init_from`` weights; the base weights,
            the heads and the align embedding are frozen.
        init_from: a Lightning ``.ckpt`` of this module or a ``save_pretrained`` folder; its
            codec and architecture must match.
        log_audio_every: with a ``WandbLogger``, log 4 s of input, target and teacher-forced
            prediction audio every N validation runs (0: never).
    """

    def __init__(
        self,
        codec: str = "pcm16",
        d_model: int = 256,
        d_ff: int = 1024,
        num_layers: int = 2,
        num_decoder_layers: int = 2,
        num_heads: int = 4,
        d_kv: int = 64,
        dropout: float = 0.0,
        feed_forward_proj: str = "gated-gelu",
        relative_attention_num_buckets: int = 32,
        max_len: int = 2048,
        head: str = "auto",
        head_chunk: int = 256,
        mixtures: int = 4,
        lpc_order: int = 16,
        lpc_taps: int = 16,
        lpc_block: int = 16,
        lpc_forget: float = 0.8,
        align: bool = False,
        value_embed: bool = True,
        residual: bool = False,
        checkpoint_body: bool = False,
        attn_block: int = 0,
        patch_size: int = 1,
        local_d: int = 128,
        local_layers: int = 2,
        local_heads: int = 4,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        compile: bool = False,
        lora: dict[str, Any] | None = None,
        init_from: str | None = None,
        log_audio_every: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.codec: Codec = get_codec(codec)
        levels = self.codec.levels
        self.levels = levels
        self.pad_id = levels  # also the decoder start token
        if head == "auto":
            head = "full" if levels <= FULL_HEAD_MAX_LEVELS else "coarse_fine"
        if head not in HEADS:
            raise ModelError(f"unknown head {head!r}: use one of auto, {', '.join(HEADS)}")
        if attn_block < 0:
            raise ModelError(f"attn_block must be >= 0 (0: dense attention), got {attn_block}")
        if attn_block and dropout > 0:
            raise ModelError("attn_block has no attention dropout: use dropout 0 or attn_block 0")
        if head_chunk < 1:
            raise ModelError(f"head_chunk must be >= 1, got {head_chunk}")
        if patch_size < 1 or max_len % patch_size:
            raise ModelError(
                f"seq_len (max_len) {max_len} is not a multiple of patch_size {patch_size}: "
                f"use a seq_len divisible by {patch_size}"
            )
        self.patch_size = patch_size
        patched = patch_size > 1
        if head == "logistic" and residual:
            raise ModelError(
                "head logistic models the levels themselves (its predictor is the residual "
                "coder): set residual: false"
            )
        if head == "logistic" and patched:
            raise ModelError(
                f"head logistic predicts one sample per decoder position: set patch_size: 1 "
                f"(got {patch_size})"
            )
        self.head_kind = head

        self.config = T5Config(
            vocab_size=1 if patched else levels + 1,  # patched: samples embed in self.patch
            d_model=d_model,
            d_ff=d_ff,
            num_layers=num_layers,
            num_decoder_layers=num_decoder_layers,
            num_heads=num_heads,
            d_kv=d_kv,
            dropout_rate=dropout,
            feed_forward_proj=feed_forward_proj,
            relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=max_len // patch_size,
            pad_token_id=0 if patched else self.pad_id,  # patched: inputs come as embeddings
            decoder_start_token_id=0 if patched else self.pad_id,
            eos_token_id=None,
            tie_word_embeddings=False,
            use_cache=False,
            attn_implementation=BLOCKWISE if attn_block else "sdpa",
            attn_block=attn_block,
        )
        if self.config.dense_act_fn == "gelu_new":
            # the same tanh-GELU (equal to 1e-15) in one fused op: autograd keeps its input only,
            # where gelu_new's five elementwise steps keep five [B, L, d_ff] tensors per layer
            self.config.dense_act_fn = "gelu_pytorch_tanh"
        self.t5: nn.Module = T5Model(self.config)
        if attn_block:
            use_offset_bias(self.t5)
        if checkpoint_body:
            self.t5.gradient_checkpointing_enable({"use_reentrant": False})
        self.residual = residual
        self.patch = (
            TwoLevel(
                levels,
                patch_size,
                d_model,
                local_d,
                local_layers,
                local_heads,
                dropout,
                value_embed,
                align,
            )
            if patched
            else None
        )
        if patched:
            self.t5.shared.requires_grad_(False)  # a 1-row placeholder: never used
        head_in = local_d if patched else d_model
        if head == "coarse_fine":
            self.head: nn.Module = CoarseFineHead(head_in, levels)
        elif head == "logistic":
            try:
                self.head = LogisticHead(
                    head_in, levels, mixtures, lpc_order, lpc_taps, lpc_block, lpc_forget
                )
            except ValueError as exc:
                raise ModelError(str(exc)) from None
        else:
            self.head = SoftmaxHead(head_in, levels, head_chunk if head == "chunked" else None)
        per_sample = not patched
        self.value_embed = ValueEmbedding(levels, d_model) if value_embed and per_sample else None
        self.align_embed = nn.Embedding(levels + 1, d_model) if align and per_sample else None
        if self.align_embed is not None:
            nn.init.normal_(self.align_embed.weight, std=1.0)  # the scale T5 gives `shared`

        # token -> int16 sample value, for SNR without per-batch range checks (host syncs)
        table = torch.as_tensor(self.codec.decode_table().astype("int64")) - 32768
        self.register_buffer("int16_of_token", table, persistent=False)

        self.val_sums = SumMetrics(untrained=head == "logistic")
        self.test_sums = SumMetrics(untrained=head == "logistic")
        self._hidden_fn: Callable[..., torch.Tensor] = self.hidden
        self._checked = False
        self._audio: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._val_runs = 0

        if init_from:
            self.load_weights(init_from)
        if lora:
            self._wrap_lora(lora)

    # ---------------------------------------------------------------- body and scoring

    @property
    def body(self) -> T5Model:
        """The T5Model (under LoRA: the base model with adapters injected)."""
        get_base = getattr(self.t5, "get_base_model", None)
        return get_base() if get_base is not None else self.t5

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding (T5's `shared`) plus, with value_embed, the level as a number."""
        emb = self.body.shared(tokens)
        if self.value_embed is not None:
            emb = emb + self.value_embed(tokens).to(emb.dtype)
        return emb

    def hidden(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder states [B, L, d] (patched: the local model's [B, L, local_d]):
        position t has seen labels < t and, with align, input token t (patched: input patch
        k of its sample)."""
        body = self.body
        if self.patch is not None:
            self._check_window(labels.shape[1])
            enc_in, dec_in = self.patch.global_inputs(input_ids, labels, self.pad_id)
            enc = body.encoder(inputs_embeds=enc_in).last_hidden_state
            out = body.decoder(inputs_embeds=dec_in, encoder_hidden_states=enc).last_hidden_state
            return self.patch.local_hidden(out, labels, self.pad_id)
        enc = body.encoder(inputs_embeds=self.embed(input_ids)).last_hidden_state
        dec_in = self.embed(_shift_right(labels, self.pad_id))
        if self.align_embed is not None:
            dec_in = dec_in + self.align_embed(input_ids)
        return body.decoder(inputs_embeds=dec_in, encoder_hidden_states=enc).last_hidden_state

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._hidden_fn(input_ids, labels)

    def score(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced scoring.

        Returns:
            ``nll_sum`` (nats, summed over target positions), ``count`` (labels != -100),
            ``correct`` (argmax == label), ``pred`` [B, L] argmax tokens (0..V-1 everywhere,
            meaningful where labels != -100), ``nll`` [B, L] per-position nats (0 if ignored);
            with the logistic head also ``untrained_nll_sum``: what the same head scores at
            step 0 (its adaptive predictor alone), the bar that shows what the network learned.
        """
        extra = {}
        if self.residual:
            inputs, targets = to_residual(input_ids, self.levels), to_residual(labels, self.levels)
            nll, pred = self.head(self(inputs, targets), targets)
            pred = from_residual(pred, _shift_right(labels, IGNORE), self.levels)
        elif self.head_kind == "logistic":
            nll, pred, untrained = self.head(self(input_ids, labels), labels, input_ids)
            extra["untrained_nll_sum"] = untrained.sum()
        else:
            nll, pred = self.head(self(input_ids, labels), labels)
        keep = labels != IGNORE
        return {
            "nll_sum": nll.sum(),
            "count": keep.sum(),
            "correct": (keep & (pred == labels)).sum(),
            "pred": pred,
            "nll": nll,
            **extra,
        }

    def _sums(self, labels: torch.Tensor, scored: dict[str, torch.Tensor]) -> dict:
        keep = labels != IGNORE
        target = self.int16_of_token[labels.clamp(min=0)].double()
        pred = self.int16_of_token[scored["pred"]].double()
        sums = {
            "nll": scored["nll_sum"],
            "count": scored["count"],
            "correct": scored["correct"],
            "signal": torch.where(keep, target.square(), 0.0).sum(),
            "error": torch.where(keep, (target - pred).square(), 0.0).sum(),
        }
        if "untrained_nll_sum" in scored:
            sums["untrained"] = scored["untrained_nll_sum"]
        return sums

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the target autoregressively with the decoder KV cache, batched.

        Args:
            input_ids: [B, L] input-channel tokens (0..V, V = pad).
            temperature: 0 = argmax; > 0 samples from softmax(logits / temperature) (for
                coarse_fine: the high part, then the low part given the sampled high part;
                logistic: greedy is the mixture's mode, sampling picks a component from
                softmax(logits / T), then a logistic of T times its scale).
            generator: torch RNG for sampling.

        Returns:
            tokens [B, L] (0..V-1) and log_probs [B, L] float32: the model's (temperature 1)
            natural-log probability of each chosen token given the tokens before it.
        """
        self._check_tokens(input_ids, None)
        if self.residual:
            input_ids = to_residual(input_ids, self.levels)
        was_training = self.training
        self.eval()
        try:
            body = self.body
            batch, length = input_ids.shape
            step = self.patch_size  # samples per decoder position
            self._check_window(length)
            if self.patch is None:
                enc_in = self.embed(input_ids)
            else:
                enc_in = self.patch.encoder_inputs(input_ids)
            enc = body.encoder(inputs_embeds=enc_in).last_hidden_state
            dec_cfg = body.decoder.config
            cache = EncoderDecoderCache(DynamicCache(config=dec_cfg), DynamicCache(config=dec_cfg))
            tokens = input_ids.new_full((batch, length), self.pad_id)
            log_probs = torch.empty((batch, length), device=input_ids.device)
            if self.head_kind == "logistic":
                pick = self.head.stepper(input_ids, temperature, generator)
            else:
                pick = functools.partial(
                    self.head.step, temperature=temperature, generator=generator
                )
            for start in range(0, length, step):
                # the decoder input: the step before's tokens (pad at the start)
                previous = tokens[:, start - step : start] if start else tokens[:, :step]
                if self.patch is None:
                    emb = self.embed(previous)
                    if self.align_embed is not None:
                        emb = emb + self.align_embed(input_ids[:, start : start + 1])
                else:
                    emb = self.patch.decoder_step(previous, input_ids, start // step)
                out = body.decoder(
                    inputs_embeds=emb, encoder_hidden_states=enc, cache=cache, use_cache=True
                )
                cache = out.cache
                hidden = out.last_hidden_state[:, -1]
                span = slice(start, start + step)
                if self.patch is None:
                    tokens[:, start], log_probs[:, start] = pick(hidden)
                else:
                    tokens[:, span], log_probs[:, span] = self.patch.generate_patch(
                        hidden, pick, self.pad_id
                    )
        finally:
            self.train(was_training)
        if self.residual:  # levels = V/2 + running sum of (residual - V/2), mod V
            mid = self.levels // 2
            tokens = (mid + torch.cumsum(tokens - mid, 1)) % self.levels
        return tokens, log_probs

    def _check_window(self, length: int) -> None:
        if length % self.patch_size:
            raise ModelError(
                f"window of {length} samples is not a multiple of patch_size "
                f"{self.patch_size}: use a seq_len divisible by it"
            )

    def _check_tokens(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Out-of-range tokens are a codec mismatch between loader and model: say so."""
        checks = [("input_ids", input_ids, 0, self.pad_id)]
        if labels is not None:
            checks.append(("labels", labels[labels != IGNORE], 0, self.levels - 1))
        for name, x, lo, hi in checks:
            if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
                raise ModelError(
                    f"{name} hold tokens in {int(x.min())}..{int(x.max())}, outside {lo}..{hi} "
                    f"of codec {self.codec.name} ({self.levels} levels, pad {self.pad_id}): "
                    "give the loader the model's codec"
                )

    # ---------------------------------------------------------------- Lightning steps

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        # On an accelerator the check is a host sync: do it for the first batch of each
        # fit/validate/test run (a codec mismatch shows there); on CPU for every batch.
        if not self._checked or batch["labels"].device.type == "cpu":
            self._check_tokens(batch["input_ids"], batch["labels"])
            self._checked = True

    def on_train_start(self) -> None:
        self._checked = False

    def on_validation_start(self) -> None:
        self._checked = False

    def on_test_start(self) -> None:
        self._checked = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        scored = self.score(batch["input_ids"], batch["labels"])
        stats = summarize(
            {"nll": scored["nll_sum"], "count": scored["count"], "correct": scored["correct"]}
        )
        for name in ("loss", "bits_per_sample", "accuracy"):
            self.log(f"train/{name}", stats[name].detach(), prog_bar=name == "bits_per_sample")
        return stats["loss"]

    def _eval_step(self, batch: dict[str, torch.Tensor], sums: SumMetrics) -> None:
        self._check_batch(batch)
        labels = batch["labels"]
        scored = self.score(batch["input_ids"], labels)
        sums.update(self._sums(labels, scored))
        if self._audio is not None:
            self._collect_audio(batch["input_ids"], labels, scored["pred"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_sums)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_sums)

    def _log_epoch(self, stage: str, sums: SumMetrics) -> dict[str, torch.Tensor]:
        values = sums.compute()  # already reduced over processes: identical on every rank
        sums.reset()
        for name, value in values.items():
            self.log(f"{stage}/{name}", value.float(), prog_bar=name == "bits_per_sample")
        return values

    def on_validation_epoch_start(self) -> None:
        # Count validation runs, not epochs: with val_check_interval in steps an epoch may
        # hold several (or, with iterable loaders, all) of them.
        every = self.hparams.log_audio_every
        if self.trainer.sanity_checking or every <= 0:
            self._audio = None
            return
        self._val_runs += 1
        due = self._val_runs % every == 0 and _wandb_logger(self.loggers) is not None
        self._audio = [] if due else None

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_sums)
        if self._audio is not None:
            self._log_audio()
            self._audio = None

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_sums)

    # ---------------------------------------------------------------- W&B audio

    def _sample_rate(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        return int(getattr(datamodule, "sample_rate", None) or 44100)

    def _collect_audio(self, input_ids, labels, pred) -> None:
        limit = int(AUDIO_SECONDS * self._sample_rate())
        have = sum(x[0].numel() for x in self._audio)
        for row in range(labels.shape[0]):
            keep = labels[row] != IGNORE
            if have >= limit or not bool(keep.any()):
                continue
            inp = input_ids[row][keep].clamp(max=self.levels - 1)
            parts = (inp, labels[row][keep], pred[row][keep])
            self._audio.append(tuple(self.int16_of_token[x].cpu() for x in parts))
            have += int(keep.sum())

    def _log_audio(self) -> None:
        if not self._audio:
            return
        rate = self._sample_rate()
        limit = int(AUDIO_SECONDS * rate)
        names = ["input", "target", "prediction (teacher-forced argmax)"]
        clips = [(torch.cat([x[i] for x in self._audio])[:limit].float() / 32768) for i in range(3)]
        _wandb_logger(self.loggers).log_audio(
            "val/audio",
            [clip.numpy() for clip in clips],
            step=self.global_step,
            caption=names,
            sample_rate=[rate] * 3,
        )

    # ---------------------------------------------------------------- optimizer

    def _total_steps(self) -> int | None:
        if self.hparams.max_steps:
            return int(self.hparams.max_steps)
        trainer = self._trainer
        if trainer is None:
            return None
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        estimate = trainer.estimated_stepping_batches
        return int(estimate) if math.isfinite(estimate) else None

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay, seen = [], [], set()
        for module in self.modules():
            no_wd_module = isinstance(module, nn.Embedding) or "Norm" in type(module).__name__
            for param in module.parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue  # `shared` is also encoder/decoder.embed_tokens: list it once
                seen.add(id(param))
                (no_decay if no_wd_module or param.ndim < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        schedule = functools.partial(
            lr_factor, warmup=self.hparams.warmup_steps, total=self._total_steps()
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def configure_model(self) -> None:
        if self.hparams.compile and self._hidden_fn == self.hidden:
            # A compiled function, not a wrapped module: parameter names stay the same, so
            # checkpoints load with or without compile.
            self._hidden_fn = torch.compile(self.hidden)

    # ---------------------------------------------------------------- LoRA

    def _wrap_lora(self, lora: dict[str, Any]) -> None:
        import peft

        unknown = set(lora) - {"r", "alpha", "dropout"}
        if unknown:
            raise ModelError(f"lora keys are r, alpha, dropout; got unknown {sorted(unknown)}")
        config = peft.LoraConfig(
            r=int(lora.get("r", 8)),
            lora_alpha=float(lora.get("alpha", 2 * int(lora.get("r", 8)))),
            lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=LORA_TARGETS,
        )
        # The heads and the align embedding are frozen on purpose: adaptation lives in the
        # adapters only, so the merged export is the base model plus low-rank updates.
        for param in self.parameters():
            param.requires_grad_(False)
        self.t5 = peft.get_peft_model(self.t5, config)

    # ---------------------------------------------------------------- weights and export

    def _plain_body(self) -> T5Model:
        """The body with any LoRA adapters merged (a merged copy: training can go on)."""
        if hasattr(self.t5, "merge_and_unload"):
            return copy.deepcopy(self.t5).merge_and_unload()
        return self.t5

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights, LoRA merged: keys ``t5.*`` (a T5Model), ``head.*``, ``align_embed.*``,
        ``value_embed.*``, ``patch.*``."""
        state = {f"t5.{k}": v for k, v in self._plain_body().state_dict().items()}
        state.update(self._head_state())
        return state

    def _head_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for prefix in _EXTRA_PARTS:
            module = getattr(self, prefix)
            if module is not None:
                state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        return state

    def _meta(self) -> dict[str, Any]:
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        hparams.update(head=self.head_kind, lora=None, init_from=None, compile=False)
        return {
            "format": EXPORT_FORMAT,
            "codec": self.codec.name,
            "levels": self.levels,
            "pad_token_id": self.pad_id,
            "decoder_start_token_id": self.pad_id,
            "head": self.head_kind,
            "align": bool(self.hparams.align),
            "frontend": "patch" if self.patch is not None else "sample",
            "patch_size": self.patch_size,
            "hparams": hparams,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder`` (replaced as a whole, never half-written):
        ``config.json`` + ``model.safetensors`` (the T5Model body, LoRA merged),
        ``heads.safetensors`` (``head.*``, ``align_embed.*``, ``value_embed.*``, ``patch.*``)
        and ``stereo_t5.json`` (format, codec, levels, pad/decoder-start token, head, align,
        frontend, patch_size, hparams)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        heads = {k: v.detach().cpu().contiguous() for k, v in self._head_state().items()}
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self._plain_body().save_pretrained(tmp)
            save_file(heads, tmp / HEADS_NAME)
            (tmp / META_NAME).write_text(json.dumps(self._meta(), indent=2, sort_keys=True))
            # mkdtemp makes 0700 and safetensors writes 0600: make it an ordinary folder
            tmp.chmod(0o755)
            for path in tmp.iterdir():
                path.chmod(0o644)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> StereoT5:
        """Rebuild a module from a ``save_pretrained`` folder (no Lightning checkpoint needed);
        ``overrides`` replace hyperparameters that do not change shapes (lr, dropout, ...)."""
        meta = _read_meta(Path(folder))
        model = cls(**{**meta["hparams"], **overrides, "init_from": None, "lora": None})
        model.load_weights(folder)
        return model.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a ``.ckpt`` of this module or a ``save_pretrained`` folder into the plain
        (not yet LoRA-wrapped) module, after checking codec and shapes."""
        path = Path(path)
        if not path.exists():
            raise ModelError(f"{path}: init_from does not exist")
        if path.is_dir():
            meta = _read_meta(path)
            codec, head = meta["codec"], meta["head"]
            self._check_source(path, codec, head, bool(meta["hparams"].get("residual")))
            body = T5Model.from_pretrained(path)
            state = {f"t5.{k}": v for k, v in body.state_dict().items()}
            state.update(load_file(path / HEADS_NAME))
        else:
            state, codec, head, residual = _read_checkpoint(path)
            self._check_source(path, codec, head, residual)
        own = {k: v for k, v in self.state_dict().items() if k.split(".")[0] in _WEIGHT_PARTS}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(k for k in state if k.split(".")[0] in _WEIGHT_PARTS and k not in own)
        shapes = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            first = (shapes + missing + unexpected)[0]
            raise ModelError(
                f"{path}: weights do not fit this model ({len(shapes)} shape mismatches, "
                f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. {first}): "
                "use the d_model/layers/heads/align/patch_size it was trained with"
            )
        self.load_state_dict({k: state[k] for k in own}, strict=False)

    def _check_source(self, path: Path, codec: str, head: str, residual: bool) -> None:
        source = get_codec(codec)
        if source.name != self.codec.name:
            raise ModelError(
                f"{path}: trained with codec {source.name} ({source.levels} levels), this model "
                f"uses {self.codec.name} ({self.levels} levels): set codec: {source.name}"
            )
        family = {"chunked": "full"}  # the same Linear: a checkpoint moves between the two
        if family.get(head, head) != family.get(self.head_kind, self.head_kind):
            raise ModelError(
                f"{path}: has a {head} head, this model a {self.head_kind} head: set head: {head}"
            )
        if residual != self.residual:
            # Same shapes, other meaning: the weights would load and predict nonsense.
            raise ModelError(
                f"{path}: trained with residual: {str(residual).lower()}, this model has "
                f"residual: {str(self.residual).lower()}: set residual: {str(residual).lower()}"
            )

    # ---------------------------------------------------------------- export at the end

    def on_fit_end(self) -> None:
        trainer = self.trainer
        # every rank: `log_dir` broadcasts from rank 0 under DDP
        root = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.save_pretrained(root / "export")
        trainer.strategy.barrier("stereo_t5_export")


_EXTRA_PARTS = ("head", "align_embed", "value_embed", "patch")  # saved in heads.safetensors
_WEIGHT_PARTS = ("t5", *_EXTRA_PARTS)


def _wandb_logger(loggers: list[Any]) -> Any:
    """The first WandbLogger among the trainer's loggers, or None (audio is W&B only)."""
    from pytorch_lightning.loggers import WandbLogger

    return next((x for x in loggers if isinstance(x, WandbLogger)), None)


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise ModelError(f"{folder}: no {META_NAME}: not a StereoT5.save_pretrained folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{meta_path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT}")
    return meta


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str, str, bool]:
    """A Lightning checkpoint of StereoT5 -> (plain state dict, codec, head kind, residual)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning may pickle hyperparameter objects: our own files only
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "codec" not in hparams or "state_dict" not in ckpt:
        raise ModelError(f"{path}: not a StereoT5 Lightning checkpoint (no codec hyperparameter)")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if hparams.get("lora"):
        # An adapted checkpoint: rebuild it, load it, merge the adapters.
        source = StereoT5(**{**hparams, "init_from": None, "compile": False})
        source.load_state_dict(ckpt["state_dict"])
        state, head = source.plain_state_dict(), source.head_kind
    else:
        state = ckpt["state_dict"]
        head = hparams.get("head", "auto")
        if head == "auto":
            levels = get_codec(hparams["codec"]).levels
            head = "full" if levels <= FULL_HEAD_MAX_LEVELS else "coarse_fine"
    return state, hparams["codec"], head, bool(hparams.get("residual"))

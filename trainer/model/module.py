"""StereoT5: the T5 LightningModule that predicts one channel's tokens from the other's.

Token layout: codec levels ``0..V-1`` are audio, ``V`` is pad and decoder start (never an audio
value, never predicted), ``IGNORE`` (-100) marks label positions that are not scored. The body is
``transformers.T5Model`` without its LM head (``T5ForConditionalGeneration`` always builds
[B, L, V + 1] float logits); a head from ``trainer.model.heads`` turns the decoder states into a
distribution over the V levels and returns the per-position NLL, which is the loss. See
docs/architecture.md and docs/training.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Model

from pipeline.codec import Codec, get_codec
from trainer.data.batch import IGNORE, Batch
from trainer.model import weights
from trainer.model.body import body_config, build_body, check_settings
from trainer.model.decoding import decode
from trainer.model.embeddings import ValueEmbedding
from trainer.model.errors import ModelError
from trainer.model.estimator import Estimate, EstimateLoss, Estimator, estimate, unit_samples
from trainer.model.eval_sums import EvalSums
from trainer.model.heads import HeadOptions, resolve_head
from trainer.model.lora import base_body, wrap_lora
from trainer.model.metrics import LN2, energy_sums
from trainer.model.optim import clip_apart, configure_adamw, param_groups
from trainer.model.patched import TwoLevel
from trainer.model.tokens import (
    check_tokens,
    cumulative_levels,
    from_residual,
    shift_right,
    to_residual,
)


class Scored(TypedDict):
    """A teacher-forced pass: sums over the scored positions and per-position results."""

    nll_sum: torch.Tensor  # nats over target positions: the loss is nll_sum / count
    count: torch.Tensor  # labels != IGNORE
    correct: torch.Tensor  # prediction == label
    pred: torch.Tensor  # [B, L] the head's point prediction, 0..V-1 everywhere
    nll: torch.Tensor  # [B, L] nats, 0 where ignored
    untrained_nll_sum: torch.Tensor | None  # the same head at step 0, when it has that baseline
    untrained_nll: torch.Tensor | None  # [B, L] its nats per position, 0 where ignored
    estimate: EstimateLoss | None  # the estimate head's sums, when the model has one
    state: Any  # the head's state after the window (None: nothing to carry, see ``score``)


class StereoT5(pl.LightningModule):
    """T5 that predicts the target channel's tokens from the input channel's, time-aligned.

    Batches (``trainer.data.batch.Batch``): ``input_ids`` [B, L] (pad V), ``labels`` [B, L]
    (ignored -100), ``direction`` [B] (not used by the model).

    Args (docs/training.md has each in full):
        codec: codec spec (``pipeline.codec.get_codec``); fixes V = levels.
        d_model, d_ff, num_layers, num_decoder_layers, num_heads, d_kv, dropout,
        relative_attention_num_buckets, feed_forward_proj: the ``T5Config`` fields.
        max_len: the training sequence; T5's ``relative_attention_max_distance`` unless
            ``body_window`` is set.
        body_window: 0: the body attends over the whole sequence; N > 0: over consecutive
            windows of N samples (the last one padded), while the head's predictor runs over
            the whole sequence: context beyond the window at the cost of windows of N.
        head: a head name (``auto``, ``full``, ``chunked``, ``coarse_fine``, ``logistic``) or
            its options (``trainer.model.heads.*Options``: a ``class_path`` with
            ``init_args`` in a config).
        estimate: ``{"taps", "smooth", "hidden", "weight", "lr"}``: add the estimate head
            (``trainer.model.estimator``) on the encoder's states (detached), trained beside
            the teacher-forced loss with ``weight`` times its own, at learning rate ``lr``
            (default: the model's); None: no estimate head.
        align: add a learned embedding of input token t to decoder input t.
        value_embed: add the level as a number to each token embedding.
        residual: model each sample as its difference from the one before (exact).
        patch_size, local_d, local_layers, local_heads: P >= 2 puts P samples at one body
            position, with a local model per patch (``trainer.model.patched``).
        checkpoint_body: recompute every T5 layer in backward (less memory, more compute).
        attn_tile: 0: sdpa; N > 0: tiled attention over N query rows at a time.
        lr, weight_decay, warmup_steps, max_steps: AdamW, warmup, cosine to 10 % of lr.
        compile: ``torch.compile`` the body's forward.
        lora: ``{"r", "alpha", "dropout"}``: train LoRA adapters on the ``init_from`` body.
        init_from: a Lightning ``.ckpt`` or an export folder to start from.
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
        body_window: int = 0,
        head: HeadOptions | str = "auto",
        estimate: dict[str, Any] | None = None,
        align: bool = False,
        value_embed: bool = True,
        residual: bool = False,
        checkpoint_body: bool = False,
        attn_tile: int = 0,
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
    ) -> None:
        super().__init__()
        self.codec: Codec = get_codec(codec)
        levels = self.levels = self.codec.levels
        self.head_options = resolve_head(head, levels)
        head = self.head_options.to_dict()  # hyperparameters hold plain values only
        self.save_hyperparameters()
        self.head_kind = self.head_options.name
        self.pad_id = levels  # also the decoder start token
        check_settings(self.head_options, dropout, attn_tile, max_len, patch_size, residual)
        if body_window < 0 or (body_window and patch_size > 1):
            raise ModelError(
                f"body_window {body_window}: use 0 (attend over the whole sequence) or, with "
                "patch_size 1, a window of N > 0 samples"
            )
        self.patch_size, self.residual, self.body_window = patch_size, residual, body_window
        patched = patch_size > 1
        self.config = body_config(
            levels, body_window or max_len, patch_size, attn_tile, dropout, d_model=d_model,
            d_ff=d_ff,
            num_layers=num_layers, num_decoder_layers=num_decoder_layers, num_heads=num_heads,
            d_kv=d_kv, feed_forward_proj=feed_forward_proj,
            relative_attention_num_buckets=relative_attention_num_buckets,
        )  # fmt: skip
        self.t5: nn.Module = build_body(self.config, checkpoint_body)
        self.patch = None
        if patched:
            local = (local_d, local_layers, local_heads, dropout)
            self.patch = TwoLevel(levels, patch_size, d_model, *local, value_embed, align)
            self.t5.shared.requires_grad_(False)  # a 1-row placeholder: never used
        self.head = self.head_options.build(local_d if patched else d_model, levels)
        options = dict(estimate or {})
        self.estimate_weight = float(options.pop("weight", 1.0))
        self.estimate_lr: float | None = options.pop("lr", None)
        self.estimator = Estimator(d_model, **options) if estimate is not None else None
        # input samples the head reads past a window's end (its predictor's lookahead), and
        # whether it has a state worth carrying from one window of a stream to the next
        self.lookahead: int = getattr(self.head, "lookahead", 0)
        self.carries_state: bool = self.lookahead > 0
        self.value_embed = ValueEmbedding(levels, d_model) if value_embed and not patched else None
        self.align_embed = nn.Embedding(levels + 1, d_model) if align and not patched else None
        if self.align_embed is not None:
            nn.init.normal_(self.align_embed.weight, std=1.0)  # the scale T5 gives `shared`

        # token -> int16 sample value, for SNR without per-batch range checks (host syncs)
        table = torch.as_tensor(self.codec.decode_table().astype("int64")) - 32768
        self.register_buffer("int16_of_token", table, persistent=False)
        estimates = self.estimator is not None
        self.val_sums = EvalSums(self.head.extra_names, estimates)  # per mixed set and pooled
        self.test_sums = EvalSums(self.head.extra_names, estimates)
        self._hidden_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self.hidden

        if init_from:
            weights.load_weights(self, init_from)
        if lora:
            # Adaptation lives in the adapters only (heads and align embedding frozen), so the
            # merged export is the base model plus low-rank updates.
            for param in self.parameters():
                param.requires_grad_(False)
            self.t5 = wrap_lora(self.t5, lora)

    # ---------------------------------------------------------------- body and scoring

    @property
    def body(self) -> T5Model:
        """The T5Model (under LoRA: the base model with adapters injected)."""
        return base_body(self.t5)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding (T5's `shared`) plus, with value_embed, the level as a number."""
        emb = self.body.shared(tokens)
        if self.value_embed is not None:
            emb = emb + self.value_embed(tokens).to(emb.dtype)
        return emb

    def hidden(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced states: the encoder's [B, L, d_model] (patched: its patch's, per
        sample) and the decoder's [B, L, d] (patched: the local model's [B, L, local_d]; None
        without labels, the encoder alone). Position t of the decoder has seen labels < t of
        its body window and, with align, input token t (patched: input patch k of its
        sample)."""
        window = self.body_window
        batch, length = input_ids.shape
        if window and length > window:
            pad = -length % window
            ids = F.pad(input_ids, (0, pad), value=self.pad_id).view(-1, window)
            if labels is not None:
                labels = F.pad(labels, (0, pad), value=IGNORE).view(-1, window)
            enc, dec = self._hidden(ids, labels)
            enc = enc.reshape(batch, length + pad, -1)[:, :length]
            if dec is not None:
                dec = dec.reshape(batch, length + pad, -1)[:, :length]
            return enc, dec
        return self._hidden(input_ids, labels)

    def _hidden(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        body = self.body
        if self.patch is not None:
            self._check_window(input_ids.shape[1])
            if labels is None:
                enc_in = self.patch.encoder_inputs(input_ids)
            else:
                enc_in, dec_in = self.patch.global_inputs(input_ids, labels, self.pad_id)
            enc = body.encoder(inputs_embeds=enc_in).last_hidden_state
            per_sample = enc.repeat_interleave(self.patch_size, dim=1)
            if labels is None:
                return per_sample, None
            out = body.decoder(inputs_embeds=dec_in, encoder_hidden_states=enc).last_hidden_state
            return per_sample, self.patch.local_hidden(out, labels, self.pad_id)
        enc = body.encoder(inputs_embeds=self.embed(input_ids)).last_hidden_state
        if labels is None:
            return enc, None
        dec_in = self.embed(shift_right(labels, self.pad_id))
        if self.align_embed is not None:
            dec_in = dec_in + self.align_embed(input_ids)
        dec = body.decoder(inputs_embeds=dec_in, encoder_hidden_states=enc).last_hidden_state
        return enc, dec

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._hidden_fn(input_ids, labels)

    def estimate(self, input_ids: torch.Tensor) -> Estimate:
        """The estimate head on input tokens [B, L], in int16 units (``estimator.estimate``)."""
        return estimate(self, input_ids)

    def score(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        state: Any = None,
        ahead: torch.Tensor | None = None,
    ) -> Scored:
        """Teacher-forced scoring of one batch of windows: the head's NLL is the loss.

        ``state`` (what ``score`` returned for the window before, row by row) continues each
        row's stream; ``ahead`` [B, A] are the input tokens after the window (pad where
        unknown), which the head reads up to ``lookahead`` of. The returned state is None when
        the head carries nothing, or the window's length cannot be continued.
        """
        length = labels.shape[1]
        if ahead is not None and self.lookahead:  # the head reads them, the body does not
            input_ids = torch.cat([input_ids, ahead[:, : self.lookahead]], 1)
        inputs, targets = input_ids, labels
        if self.residual:
            inputs, targets = to_residual(input_ids, self.levels), to_residual(labels, self.levels)
        enc, hidden = self(inputs[:, :length], targets)
        out = self.head(hidden, targets, inputs, state)
        estimated = None
        if self.estimator is not None:
            x = unit_samples(input_ids[:, :length], self.int16_of_token)
            y = unit_samples(labels, self.int16_of_token)
            estimated = Estimator.loss(self.estimator(enc, x), y, labels != IGNORE)
            if self.training:
                self.estimator.observe(x, y, labels != IGNORE)
        pred = out.prediction
        if self.residual:
            pred = from_residual(pred, shift_right(labels, IGNORE), self.levels)
        keep = labels != IGNORE
        untrained = out.extras.get("untrained")
        return Scored(
            nll_sum=out.nll.sum(),
            count=keep.sum(),
            correct=(keep & (pred == labels)).sum(),
            pred=pred,
            nll=out.nll,
            untrained_nll_sum=None if untrained is None else untrained.sum(),
            untrained_nll=untrained,
            estimate=estimated,
            state=out.state,
        )

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
            temperature: 0 = the head's greedy choice; > 0 samples (the head's ``stepper``
                says how).
            generator: torch RNG for sampling.

        Returns:
            tokens [B, L] (0..V-1) and log_probs [B, L] float32: the model's (temperature 1)
            natural-log probability of each chosen token given the tokens before it.
        """
        check_tokens(self.codec, input_ids, None)
        if self.residual:
            input_ids = to_residual(input_ids, self.levels)
        was_training = self.training
        self.eval()
        try:
            self._check_window(input_ids.shape[1])
            tokens, log_probs = decode(self, input_ids, temperature, generator)
        finally:
            self.train(was_training)
        if self.residual:
            tokens = cumulative_levels(tokens, self.levels)
        return tokens, log_probs

    def _check_window(self, length: int) -> None:
        if length % self.patch_size:
            raise ModelError(
                f"window of {length} samples is not a multiple of patch_size "
                f"{self.patch_size}: use a seq_len divisible by it"
            )

    # ---------------------------------------------------------------- Lightning steps

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Every batch's tokens are range-checked here, on the host before the transfer: in a
        step on an accelerator the check would be a host sync (a codec mismatch shows here)."""
        self._check_batch(batch)
        return batch

    def _check_batch(self, batch: Batch) -> None:
        check_tokens(self.codec, batch["input_ids"], batch["labels"])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        scored = self.score(batch["input_ids"], batch["labels"])
        count = scored["count"].clamp(min=1)
        loss = scored["nll_sum"] / count  # nats per scored target sample
        self.log("train/loss", loss.detach())
        self.log("train/bits_per_sample", loss.detach() / LN2, prog_bar=True)
        self.log("train/accuracy", (scored["correct"] / count).detach())
        est = scored["estimate"]
        if est is None:
            return loss
        ratio = (est.error / est.signal.clamp(min=1.0)).detach()
        self.log("train/estimate_snr_db", -10 * torch.log10(ratio.clamp(min=1e-12)))
        return loss + self.estimate_weight * est.loss()

    def metric_sums(self, labels: torch.Tensor, scored: Scored) -> dict[str, torch.Tensor]:
        """The sums ``SumMetrics`` adds up for one scored batch."""
        sums = {
            "nll": scored["nll_sum"],
            "count": scored["count"],
            "correct": scored["correct"],
            **energy_sums(labels, scored["pred"], self.int16_of_token),
        }
        if scored["untrained_nll_sum"] is not None:
            sums["untrained"] = scored["untrained_nll_sum"]
        if scored["estimate"] is not None:
            est = scored["estimate"]
            sums["estimate_error"] = est.error
            sums["estimate_cross"] = est.correction_cross
            sums["estimate_correction"] = est.correction_energy
        return sums

    def _eval_step(self, batch: Batch, sums: EvalSums, loader: int) -> torch.Tensor:
        scored = self.score(batch["input_ids"], batch["labels"])
        sums.update(self.metric_sums(batch["labels"], scored), loader)
        return scored["pred"]  # for callbacks (trainer.callbacks.AudioExamples)

    def validation_step(
        self, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        return self._eval_step(batch, self.val_sums, dataloader_idx)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._eval_step(batch, self.test_sums, dataloader_idx)

    def on_validation_start(self) -> None:
        self.val_sums.start(self.trainer.val_dataloaders)  # one loader per mixed set

    def on_test_start(self) -> None:
        self.test_sums.start(self.trainer.test_dataloaders)

    def _log_epoch(self, stage: str, sums: EvalSums) -> dict[str, torch.Tensor]:
        values = sums.compute()  # already reduced over processes: identical on every rank
        for name, value in values.items():
            self.log(f"{stage}/{name}", value.float(), prog_bar=name == "bits_per_sample")
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val", self.val_sums)
        if self.estimator is not None:  # the correction's weight, from held-out windows
            self.estimator.blend.copy_(values["estimate_blend"])

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_sums)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        own = (self.estimator, self.estimate_lr) if self.estimate_lr else None
        return configure_adamw(self, hp, param_groups(self, hp.weight_decay, own), self._trainer)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """The estimate head's gradients are clipped apart from the rest, so that the rest
        trains as it would without the head."""
        parts = [self.estimator] if self.estimator is not None else []
        clip_apart(self, parts, gradient_clip_val, gradient_clip_algorithm)

    def configure_model(self) -> None:
        if self.hparams.compile and self._hidden_fn == self.hidden:
            # A compiled function, not a wrapped module: parameter names stay the same, so
            # checkpoints load with or without compile.
            self._hidden_fn = torch.compile(self.hidden)

    # ---------------------------------------------------------------- weights

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights, LoRA merged (``trainer.model.weights.plain_state_dict``)."""
        return weights.plain_state_dict(self)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write an export folder (``trainer.model.weights.save_pretrained``)."""
        return weights.save_pretrained(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> StereoT5:
        """Rebuild a module from an export folder (no Lightning checkpoint needed);
        ``overrides`` replace hyperparameters that do not change shapes (lr, dropout, ...)."""
        hparams = weights.current_hparams(weights.read_meta(Path(folder))["hparams"])
        args = weights.constructor_args(cls, {**hparams, **overrides})
        model = cls(**{**args, "init_from": None, "lora": None})
        weights.load_weights(model, folder)
        return model.eval()

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a ``.ckpt`` or an export folder (``trainer.model.weights.load_weights``)."""
        weights.load_weights(self, path)

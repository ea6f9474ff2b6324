"""The estimate head: a point estimate of the target channel, and the spread of its error, from
the encoder's states, which see the input channel and nothing of the target.

Teacher-forced heads lean on the target's past, so their "mean" is no estimate when nothing of
the target is known, and generating from them feeds their errors back. This head is
non-autoregressive: its estimate at t is a two-sided FIR over the input around t,

    mean[t] = sum_j (h[j] + c[t, j]) x[t - lag_j]      (lags -taps//2 .. taps - taps//2 - 1)

where ``h`` is the least-squares filter over every training window seen so far (running sums, no
gradient: the linear estimator a user could fit on the training split) and ``c`` a learned,
time-smoothed correction from the encoder state (read detached) and the input's taps (zero at
initialisation, so the untrained head is that filter). ``log_scale`` is the log of the error's
spread, learned relative to the input's local level; `render` samples around the mean with it.
Units: int16 / 32768.

What the correction learns need not hold on music it did not train on, so the estimate the
model gives (`estimate`) takes it at a weight ``blend`` in [0, 1]: the least-squares weight on
the validation split (`correction_weight`, set at the end of each validation), 0 where the
correction does not beat the static filter on held-out windows, and the estimate is then that
filter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.model.errors import ModelError
from trainer.model.tokens import check_tokens, to_residual

if TYPE_CHECKING:
    from trainer.model.module import StereoT5

__all__ = [
    "Estimate",
    "EstimateLoss",
    "Estimator",
    "correction_weight",
    "estimate",
    "unit_samples",
]

LEVEL_SPAN = 255  # samples over which the input's local level (for the spread) is averaged
LEVEL_FLOOR = 1e-5  # about a third of one int16 step


class Estimate(NamedTuple):
    """Per position [B, L]: the estimate, the log of its error's spread, and the estimate of
    the static filter alone (what the head is before training moves ``c``)."""

    mean: torch.Tensor
    log_scale: torch.Tensor
    linear: torch.Tensor


class EstimateLoss(NamedTuple):
    """Sums over the scored positions: squared error of the mean, target energy (both in int16
    units squared), and the spread's Gaussian NLL (nats, summed), with the count; and, for
    `Estimator.settle`, the correction's correlation with the static filter's error and its
    energy (int16 units squared)."""

    error: torch.Tensor
    signal: torch.Tensor
    spread_nll: torch.Tensor
    count: torch.Tensor
    correction_cross: torch.Tensor
    correction_energy: torch.Tensor

    def loss(self) -> torch.Tensor:
        """error / signal (the SNR's inverse, scale-free) plus the spread's mean NLL."""
        return self.error / self.signal.clamp(min=1.0) + self.spread_nll / self.count.clamp(min=1)


def correction_weight(cross: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """From held-out sums (`EstimateLoss`): the weight w in [0, 1] that minimises the error of
    linear + w x correction there; 1 while the correction is zero (nothing to weigh)."""
    weight = torch.where(energy > 0, cross / energy.clamp(min=1e-30), torch.ones_like(cross))
    return weight.clamp(0.0, 1.0)


def lagged(x: torch.Tensor, taps: int) -> torch.Tensor:
    """[B, L] -> [B, L, taps]: column j is x[t - lag_j], lags -(taps // 2) .. taps - taps // 2
    - 1 as in `trainer.evaluation.baselines.fir_lags` (zeros outside the window)."""
    first = -(taps // 2)
    last = first + taps - 1
    padded = F.pad(x, (last, -first))  # padded[i] = x[i - last]
    # window t holds x[t - last .. t - first]: column c has lag last - c, so reverse them
    return padded.unfold(-1, taps, 1).flip(-1)


class Estimator(nn.Module):
    """The estimate head over encoder states of width ``width`` (see the module docstring).

    The encoder's states are read detached, so the body and the teacher-forced head train as
    they would without this head; its own layer (``hidden`` wide, GELU) over those states and
    the input's taps gives it the nonlinearity the correction needs.

    Args:
        taps: the FIR's length (two-sided, as the evaluation's least-squares baseline).
        smooth: the learned coefficients are averaged over this many samples (odd), so they
            move smoothly across the body's window boundaries.
    """

    def __init__(self, width: int, taps: int = 32, smooth: int = 31, hidden: int = 64) -> None:
        super().__init__()
        if taps < 1 or smooth < 1 or smooth % 2 == 0:
            raise ValueError(f"estimate: taps >= 1 and an odd smooth >= 1, got {taps}, {smooth}")
        self.taps, self.smooth = taps, smooth
        with torch.random.fork_rng(devices=[]):  # leave the seed's draws to the rest
            self.features = nn.Sequential(nn.Linear(width + taps, hidden), nn.GELU())
            self.coef = nn.Linear(hidden, taps)
            self.spread = nn.Linear(hidden, 1)
        for layer in (self.coef, self.spread):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("gram", torch.zeros(taps, taps, dtype=torch.float64))
        self.register_buffer("cross", torch.zeros(taps, dtype=torch.float64))
        self.register_buffer("blend", torch.ones((), dtype=torch.float64))

    @staticmethod
    def fill_defaults(state: dict, prefix: str) -> None:
        """Checkpoints from before ``blend`` existed took the correction whole: 1."""
        state.setdefault(prefix + "blend", torch.ones((), dtype=torch.float64))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        self.fill_defaults(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def linear_filter(self) -> torch.Tensor:
        """The static filter h [taps] (float32): least squares over the windows observed (a
        ridge of 1e-9 of the mean diagonal keeps it defined); zeros before any."""
        scale = self.gram.diagonal().mean()
        seen = scale > 0  # a tensor, never read back: the step does not wait for the device
        eye = torch.eye(self.taps, dtype=self.gram.dtype, device=self.gram.device)
        ridge = torch.where(seen, 1e-9 * scale, torch.ones_like(scale))
        solved = torch.linalg.solve_ex(self.gram + ridge * eye, self.cross, check_errors=False)
        return torch.where(seen, solved.result, torch.zeros_like(solved.result)).float()

    @torch.no_grad()
    def observe(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        """Add a training batch's normal equations (input x, target y [B, L], scored where
        ``keep``) to the static filter's sums, summed over processes when distributed."""
        # unscored positions zeroed rather than dropped: a boolean index waits for the device
        design = (lagged(x.double(), self.taps) * keep[..., None]).flatten(0, 1)
        target = (y.double() * keep).flatten()
        gram, cross = design.T @ design, design.T @ target
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(gram)
            dist.all_reduce(cross)
        self.gram += gram
        self.cross += cross

    def forward(self, enc: torch.Tensor, x: torch.Tensor) -> Estimate:
        """enc [B, L, d] encoder states, x [B, L] the input (int16 / 32768) -> `Estimate`."""

        design = lagged(x.float(), self.taps)
        features = self.features(torch.cat([enc.detach().float(), design], -1))
        static = self.linear_filter().to(design.device)
        half = self.smooth // 2
        coef = self.coef(features).transpose(1, 2)  # [B, taps, L]
        coef = F.avg_pool1d(coef, self.smooth, 1, half, count_include_pad=False).transpose(1, 2)
        linear = design @ static
        mean = linear + (design * coef).sum(-1)
        power = F.avg_pool1d(
            x.float().square()[:, None], LEVEL_SPAN, 1, LEVEL_SPAN // 2, count_include_pad=False
        )[:, 0]
        log_scale = self.spread(features)[..., 0] + torch.log(power.sqrt() + LEVEL_FLOOR)
        return Estimate(mean, log_scale, linear)

    @staticmethod
    def loss(est: Estimate, y: torch.Tensor, keep: torch.Tensor) -> EstimateLoss:
        """The training sums for target y [B, L] (int16 / 32768) where ``keep``; the spread is
        fitted to the error of the mean as it stands (no gradient into the mean through it)."""
        k = keep.float()
        resid = y - est.mean
        z = (y - est.mean.detach()) * torch.exp(-est.log_scale)
        nll = (est.log_scale + 0.5 * z.square()) * k
        correction = ((est.mean - est.linear) * k).detach().double()
        scale2 = 32768.0**2
        return EstimateLoss(
            error=(resid.square() * k).sum() * scale2,
            signal=(y.square() * k).sum() * scale2,
            spread_nll=nll.sum(),
            count=k.sum(),
            correction_cross=(correction * (y - est.linear).detach()).sum() * scale2,
            correction_energy=correction.square().sum() * scale2,
        )


def unit_samples(tokens: torch.Tensor, int16_of_token: torch.Tensor) -> torch.Tensor:
    """Tokens [B, L] -> samples as int16 / 32768 (0 at pad and ignored positions)."""
    levels = len(int16_of_token)
    audio = (tokens >= 0) & (tokens < levels)
    values = int16_of_token[tokens.clamp(0, levels - 1)].float() / 32768.0
    return torch.where(audio, values, 0.0)


@torch.no_grad()
def estimate(model: StereoT5, input_ids: torch.Tensor) -> Estimate:
    """The model's estimate head on input tokens [B, L] (in eval mode): `Estimate` in int16
    units (mean and linear; log_scale of the spread in them), from the input alone; the mean
    takes the learned correction at the head's validated weight ``blend``.

    Raises:
        ModelError: the model has no estimate head.
    """
    if model.estimator is None:
        raise ModelError(
            "this model has no estimate head (trained without --model.estimate): retrain or "
            "fine-tune with `estimate: {weight: 1.0}` in the model's config"
        )
    check_tokens(model.codec, input_ids, None)
    was_training = model.training
    model.eval()
    try:
        tokens = to_residual(input_ids, model.levels) if model.residual else input_ids
        enc, _ = model(tokens, None)
        est = model.estimator(enc, unit_samples(input_ids, model.int16_of_token))
    finally:
        model.train(was_training)
    scale = 32768.0
    blend = model.estimator.blend.to(est.mean.dtype)
    mean = est.linear + blend * (est.mean - est.linear)
    return Estimate(mean * scale, est.log_scale + math.log(scale), est.linear * scale)

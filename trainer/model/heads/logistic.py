"""``head: logistic``: a discretized logistic mixture over the V levels around a linear predictor.

The categorical heads must learn, level by level, that audio moves smoothly; a small model trained
for minutes cannot (the demo's 16-bit synthetic mixes cost 9-11 bits/sample that way, FLAC 6.4).
This head says it by construction, the way lossless audio coders do:

- **Predictor** (no parameters; the same arithmetic in training and generation): at sample t, a
  linear prediction ``lpc_t = w_k . phi_t`` from the regressors ``phi_t`` = the ``order`` target
  samples before t and the input samples ``t - taps .. t + taps`` (the input channel is known
  whole, so two-sided is allowed). ``w_k`` is refitted every ``refit_every`` samples (one refit
  interval) by ridge least squares on the window's samples before interval k, older intervals
  weighted down by ``forget`` each (a recursive least squares updated once per interval,
  backward adaptive: nothing is transmitted, so it is causal), shrunk towards the fixed
  second-order predictor ``2 x[t-1] - x[t-2]``, which is also what it is with no history (the
  window's first interval).
- **Loudness**: causal averages of the predictor's past absolute errors at a few time constants
  (unknown past errors count as ``V / 64``), and two-sided loudness of the input channel.
- **Mixture**: an MLP on those features plus a linear map of the decoder state at t give, per
  component k, a mixture logit, a log-scale relative to the recent error level and a mean
  offset in units of it: ``mean_k = lpc_t + c_k * base_t``, ``scale_k = base_t * exp(d_k)``.
  At step 0 it is the classical coder: the adaptive predictor with a scale that follows the
  recent errors.

Likelihood: exact per level. With ``a = (y - 1/2 - mean) / s`` and ``b = (y + 1/2 - mean) / s``
(y = level - V/2), ``P(y) = sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b))``,
computed as ``logsigmoid(b) + logsigmoid(-a) + log(-expm1(-1/s))`` in float64: no cancellation
for any bin width (1/32768 of the range at 16 bits); level 0 takes the lower tail
(``logsigmoid(b)``), level V-1 the upper (``logsigmoid(-a)``), so the V probabilities sum to 1.
The NLL is in nats like every head's: bits/sample compare with FLAC as before.

Generation: greedy is the mode of the mixture (the mean of the most probable component,
rounded, clipped to 0..V-1); sampled picks a component, then a logistic of scale ``T * s``.
The log-probability returned is the model's (temperature 1) likelihood of the chosen level.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.batch import IGNORE
from trainer.model.errors import ModelError
from trainer.model.heads.base import Head, HeadOptions, HeadOutput, Stepper

EMA_DECAYS = (0.5, 0.8, 0.93, 0.98)
BASE_DECAY = 1  # index into EMA_DECAYS of the error level the scales are relative to
EMA_LEN = 128  # samples each causal average looks back
INPUT_SPANS = ((-8, 8), (0, 16), (-16, 0))  # two-sided loudness of the input channel
MIN_LOG_SCALE, MAX_LOG_SCALE = math.log(0.05), math.log(65536.0)
RIDGE = 1e-9  # relative to the mean diagonal (demo test split: 1e-7 6.34, 1e-8 6.11, 1e-9 6.08 b/s)
RIDGE_FLOOR = 1.0  # absolute, in squared levels: no history gives the fixed predictor


def initial_output(mixtures: int) -> torch.Tensor:
    """The network's output at step 0 [3, K] (logits, log-scales, offsets): equal weights, no
    offset, logistic scales 0.72 x the recent mean |error| (the Laplace-like fit), spread to
    break the components' symmetry."""
    out = torch.zeros(3, mixtures)
    spread = torch.linspace(-0.3, 0.3, mixtures) if mixtures > 1 else torch.zeros(1)
    out[1] = math.log(0.72) + spread
    return out


def _shift(x: torch.Tensor, j: int) -> torch.Tensor:
    """y[..., t] = x[..., t - j] (zero where out of range); j < 0 looks ahead."""
    if j == 0:
        return x
    out = torch.zeros_like(x)
    if j > 0:
        out[..., j:] = x[..., :-j]
    else:
        out[..., :j] = x[..., -j:]
    return out


class LogisticHead(Head):
    """Discretized logistic mixture over V levels whose means follow an adaptive predictor.

    Args:
        d_model: width of the decoder states.
        levels: V; the head's distribution covers levels 0..V-1.
        options: mixtures, order, taps, refit_every, forget (``LogisticOptions``; its
            defaults when None).
    """

    patch_refusal = "head logistic predicts one sample per decoder position: set patch_size: 1"
    residual_refusal = (
        "head logistic models the levels themselves (its predictor is the residual coder): set "
        "residual: false"
    )
    extra_names = ("untrained",)

    def __init__(self, d_model: int, levels: int, options: LogisticOptions | None = None) -> None:
        super().__init__()
        if levels < 2:
            raise ModelError(f"head logistic needs >= 2 levels, got {levels}")
        options = options or LogisticOptions()
        mixtures, order, taps = options.mixtures, options.order, options.taps
        self.levels, self.mid = levels, levels // 2
        self.mixtures, self.order, self.taps = mixtures, order, taps
        self.refit_every, self.forget = options.refit_every, options.forget
        self.unknown_error = levels / 64.0
        fixed = torch.zeros(order + 2 * taps + 1, dtype=torch.float64)
        fixed[0], fixed[1] = 2.0, -1.0
        self.register_buffer("fixed", fixed, persistent=False)
        lags = torch.arange(1, EMA_LEN + 1, dtype=torch.float64)
        kernels = torch.stack([(1 - d) * d ** (lags - 1) for d in EMA_DECAYS])
        self.register_buffer("kernels", kernels, persistent=False)  # [n, EMA_LEN], lag 1 first
        n_feats = 2 * len(EMA_DECAYS) + len(INPUT_SPANS)
        self.net = nn.Sequential(
            nn.Linear(n_feats, d_model), nn.GELU(), nn.Linear(d_model, 3 * mixtures)
        )
        nn.init.normal_(self.net[0].weight, std=n_feats**-0.5)
        nn.init.zeros_(self.net[0].bias)
        # The decoder state enters through its own linear map, not the MLP: an untrained body's
        # state is noise that moves as the body learns, and as MLP input it slowed what the MLP
        # learns from the signal features (the head alone with random states, 200 steps on real
        # music: 0.050 bits/sample gained that way, 0.071 this way). Both last layers start at
        # zero, so at step 0 the output is the bias, whatever the input.
        self.from_state = nn.Linear(d_model, 3 * mixtures, bias=False)
        nn.init.zeros_(self.from_state.weight)
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.copy_(initial_output(mixtures).flatten())

    # ------------------------------------------------------------------ signal features

    def values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (centred float64 levels, 0 where not audio; known mask)."""
        known = (tokens >= 0) & (tokens < self.levels)
        return torch.where(known, tokens - self.mid, 0).double(), known

    def regressors(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[B, L] centred target and input -> phi [B, L, order + 2 taps + 1]."""
        cols = [_shift(x, j) for j in range(1, self.order + 1)]
        cols += [_shift(u, i) for i in range(-self.taps, self.taps + 1)]
        return torch.stack(cols, -1)

    def regressors_at(self, x: torch.Tensor, u: torch.Tensor, t: int) -> torch.Tensor:
        """regressors() at position t only: [B, D] (zero where out of range)."""
        length = x.shape[1]
        past = torch.zeros((x.shape[0], self.order), dtype=x.dtype, device=x.device)
        n = min(self.order, t)
        if n:
            past[:, :n] = x[:, t - n : t].flip(-1)
        near = torch.zeros((u.shape[0], 2 * self.taps + 1), dtype=u.dtype, device=u.device)
        lo, hi = max(0, t - self.taps), min(length, t + self.taps + 1)
        near[:, t + self.taps - hi + 1 : t + self.taps - lo + 1] = u[:, lo:hi].flip(-1)
        return torch.cat([past, near], -1)

    def interval_stats(self, phi: torch.Tensor, x: torch.Tensor, known: torch.Tensor):
        """Per-interval sums phi phi^T and phi x over known target samples: [B, n, D, D],
        [B, n, D] (the last interval may be partial)."""
        batch, length, dims = phi.shape
        nb = -(-length // self.refit_every)
        pad = nb * self.refit_every - length
        weight = known.double()
        if pad:
            phi = F.pad(phi, (0, 0, 0, pad))
            x, weight = F.pad(x, (0, pad)), F.pad(weight, (0, pad))
        phi = phi.view(batch, nb, self.refit_every, dims)
        wphi = phi * weight.view(batch, nb, self.refit_every, 1)
        cov = wphi.transpose(-1, -2) @ phi
        cross = (wphi * x.view(batch, nb, self.refit_every, 1)).sum(2)
        return cov, cross

    def solve(self, cov: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Ridge solution shrunk towards the fixed predictor: [..., D, D], [..., D] -> [..., D]."""
        dims = cov.shape[-1]
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        reg = (RIDGE * trace / dims + RIDGE_FLOOR)[..., None]
        eye = torch.eye(dims, dtype=cov.dtype, device=cov.device)
        rhs = cross + reg * self.fixed
        return torch.linalg.solve(cov + reg[..., None] * eye, rhs.unsqueeze(-1)).squeeze(-1)

    def coefficients(self, cov: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Interval statistics [B, n, ...] -> predictor of each interval [B, n, D] from the
        intervals before it (older ones weighted forget^age)."""
        acc_cov, acc_cross = torch.zeros_like(cov[:, 0]), torch.zeros_like(cross[:, 0])
        covs, crosses = [], []
        for k in range(cov.shape[1]):
            covs.append(acc_cov)
            crosses.append(acc_cross)
            acc_cov = self.forget * acc_cov + cov[:, k]
            acc_cross = self.forget * acc_cross + cross[:, k]
        return self.solve(torch.stack(covs, 1), torch.stack(crosses, 1))

    def input_features(self, u: torch.Tensor, u_known: torch.Tensor) -> torch.Tensor:
        """Two-sided input loudness [B, L, len(INPUT_SPANS)]: log1p of mean |second difference|
        over each span around t."""
        d2 = (u - 2 * _shift(u, 1) + _shift(u, 2)).abs() * (
            u_known & _shift(u_known.double(), 1).bool() & _shift(u_known.double(), 2).bool()
        )
        csum = F.pad(d2.cumsum(-1), (1, 0))  # csum[t] = sum of d2[< t]
        length = u.shape[-1]
        idx = torch.arange(length, device=u.device)
        feats = []
        for lo, hi in INPUT_SPANS:
            a = (idx + lo).clamp(0, length)
            b = (idx + hi + 1).clamp(0, length)
            total = csum[..., b] - csum[..., a]
            feats.append(torch.log1p(total / (b - a).clamp(min=1)))
        return torch.stack(feats, -1)

    def error_features(self, err: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Causal loudness of the predictor's errors [B, L, n + 1]: per time constant the
        average |error| before t (unknown errors count as V / 64) as log1p, then the known
        fraction, then the base error level (not log) used for the scales: last column."""
        abs_err = (err.abs() * known).unsqueeze(1)  # [B, 1, L]
        kernel = self.kernels.flip(-1).unsqueeze(1)  # conv weights: oldest lag first
        padded = F.pad(torch.cat([abs_err, known.double().unsqueeze(1)], 0), (EMA_LEN, 0))
        sums = F.conv1d(padded[..., :-1], kernel)  # position t sees lags 1..EMA_LEN
        batch = err.shape[0]
        level, mass = sums[:batch], sums[batch:]  # [B, n, L]
        total = self.kernels.sum(-1)[:, None]
        level = level + (total - mass) * self.unknown_error
        return self._pack(level, mass / total)

    def _pack(self, level: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        """level, known fraction [B, n, L] -> [B, L, 2 n + 1] (log1p levels, fractions, base)."""
        return torch.cat([torch.log1p(level), frac, level[:, BASE_DECAY : BASE_DECAY + 1]], 1).mT

    def error_features_at(self, abs_err: torch.Tensor, known: torch.Tensor, t: int) -> torch.Tensor:
        """error_features at position t only, from [B, >= t] buffers: [B, 1, n + 1]."""
        lo = max(0, t - EMA_LEN)
        span = t - lo
        kernel = self.kernels[:, :span].flip(-1)  # lags span..1
        level = abs_err[:, lo:t] @ kernel.T  # [B, n]
        mass = known[:, lo:t].double() @ kernel.T
        total = self.kernels.sum(-1)
        level = level + (total - mass) * self.unknown_error
        return self._pack(level.unsqueeze(-1), (mass / total).unsqueeze(-1))

    # ------------------------------------------------------------------ mixture

    def mixture(self, hidden: torch.Tensor, lpc: torch.Tensor, feats: torch.Tensor):
        """(logits, means, scales) [..., K] float64 from states [..., d], predictions [...] and
        features [..., F] (the last error column is the base level)."""
        out = self.net(feats[..., :-1].to(hidden.dtype)) + self.from_state(hidden)
        return self._mixture(out.double().unflatten(-1, (3, self.mixtures)), lpc, feats)

    def _mixture(self, out: torch.Tensor, lpc: torch.Tensor, feats: torch.Tensor):
        """mixture() from the network's output [..., 3, K]."""
        base = feats[..., -1] + 0.5  # >= 0.5 level
        logits, log_scale, offset = out.unbind(-2)
        log_scale = (log_scale + base.log()[..., None]).clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
        means = lpc[..., None] + offset * base[..., None]
        return torch.log_softmax(logits, -1), means, log_scale.exp()

    def log_prob(self, logits, means, scales, y: torch.Tensor) -> torch.Tensor:
        """log P(level) for centred levels y [...] under the mixture [..., K]: exact bins."""
        y = y.double()[..., None]
        inv = 1.0 / scales
        a = (y - 0.5 - means) * inv
        b = (y + 0.5 - means) * inv
        interior = F.logsigmoid(b) + F.logsigmoid(-a) + torch.log(-torch.expm1(-inv))
        low = y <= -self.mid
        high = y >= self.levels - 1 - self.mid
        comp = torch.where(low, F.logsigmoid(b), torch.where(high, F.logsigmoid(-a), interior))
        return torch.logsumexp(logits + comp, -1)

    def mode(self, logits, means) -> torch.Tensor:
        """Mean of the most probable component, rounded and clipped: a token 0..V-1."""
        best = means.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
        return self._token(best)

    def _token(self, centred: torch.Tensor) -> torch.Tensor:
        return (centred.round() + self.mid).clamp(0, self.levels - 1).long()

    # ------------------------------------------------------------------ teacher forcing

    def predictor(self, targets: torch.Tensor, inputs: torch.Tensor):
        """Teacher-forced predictions [B, L] and features [B, L, F] (no parameters)."""
        x, known = self.values(targets)
        u, u_known = self.values(inputs)
        phi = self.regressors(x, u)
        coef = self.coefficients(*self.interval_stats(phi, x, known))  # [B, n, D]
        coef = coef.repeat_interleave(self.refit_every, 1)[:, : x.shape[1]]
        lpc = (phi * coef).sum(-1)
        feats = torch.cat(
            [self.input_features(u, u_known), self.error_features(x - lpc, known)], -1
        )
        return lpc, feats

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, state: Any = None
    ) -> HeadOutput:
        """The mixture's NLL and mode, and in ``extras["untrained"]`` the NLL this head gives
        at step 0, whatever its weights: the adaptive predictor alone, no gradient."""
        keep = targets != IGNORE
        y, _ = self.values(targets)
        with torch.no_grad():
            lpc, feats = self.predictor(targets, inputs)
            start = initial_output(self.mixtures).to(lpc).expand(*lpc.shape, 3, self.mixtures)
            untrained = -self.log_prob(*self._mixture(start, lpc, feats), y)
        logits, means, scales = self.mixture(hidden, lpc, feats)
        nll = -self.log_prob(logits, means, scales, y)
        nll = torch.where(keep, nll, 0.0).float()
        untrained = torch.where(keep, untrained, 0.0).float()
        mode = self.mode(logits.detach(), means.detach())
        return HeadOutput(nll, mode, {"untrained": untrained})

    # ------------------------------------------------------------------ generation

    def stepper(self, inputs, temperature, generator=None, state=None) -> Stepper:
        """Generation: greedy is the mixture's mode; sampling picks a component from
        softmax(logits / T), then a logistic of T times its scale. The stepper keeps the tokens
        chosen so far and refits the predictor on them as ``forward`` does."""
        batch, length = inputs.shape
        u, u_known = self.values(inputs)
        in_feats = self.input_features(u, u_known)
        device = inputs.device
        x = torch.zeros((batch, length), dtype=torch.float64, device=device)
        known = torch.zeros((batch, length), dtype=torch.bool, device=device)
        abs_err = torch.zeros_like(x)
        dims = self.order + 2 * self.taps + 1
        state = {
            "t": 0,
            "cov": torch.zeros((batch, dims, dims), dtype=torch.float64, device=device),
            "cross": torch.zeros((batch, dims), dtype=torch.float64, device=device),
            "coef": None,
        }

        def step(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = state["t"]
            if t % self.refit_every == 0:
                if t:  # add the interval just finished, as coefficients() does
                    lo = t - self.refit_every
                    # the regressors of lo..t-1 reach back order (x) and taps (u) samples only
                    first = max(0, lo - max(self.order, self.taps))
                    span = slice(first, t + self.taps)
                    phi = self.regressors(x[:, span], u[:, span])[:, lo - first : t - first]
                    cov, cross = self.interval_stats(phi, x[:, lo:t], known[:, lo:t])
                    state["cov"] = self.forget * state["cov"] + cov[:, 0]
                    state["cross"] = self.forget * state["cross"] + cross[:, 0]
                state["coef"] = self.solve(state["cov"], state["cross"])
            phi_t = self.regressors_at(x, u, t)
            lpc = (phi_t * state["coef"]).sum(-1)
            feats = torch.cat([in_feats[:, t], self.error_features_at(abs_err, known, t)[:, 0]], -1)
            logits, means, scales = self.mixture(hidden, lpc, feats)
            if temperature > 0:
                comp = torch.multinomial(
                    torch.softmax(logits / temperature, -1).float(), 1, generator=generator
                )
                mean = means.gather(-1, comp).squeeze(-1)
                scale = scales.gather(-1, comp).squeeze(-1)
                uniform = torch.rand(
                    mean.shape, generator=generator, dtype=torch.float64, device=device
                ).clamp(1e-12, 1 - 1e-12)
                token = self._token(mean + temperature * scale * torch.logit(uniform))
            else:
                token = self.mode(logits, means)
            y = (token - self.mid).double()
            log_prob = self.log_prob(logits, means, scales, y).float()
            x[:, t], known[:, t] = y, True
            abs_err[:, t] = (y - lpc).abs()
            state["t"] = t + 1
            return token, log_prob

        return step


def check_options(mixtures: int, order: int, taps: int, refit_every: int, forget: float) -> None:
    if mixtures < 1 or order < 2 or taps < 0 or refit_every < 1:
        raise ModelError(
            "head logistic: mixtures >= 1, order >= 2, taps >= 0, refit_every >= 1; got "
            f"{mixtures}, {order}, {taps}, {refit_every}"
        )
    if not 0.0 < forget <= 1.0:
        raise ModelError(f"head logistic: forget must be in (0, 1], got {forget}")


class LogisticOptions(HeadOptions):
    """``head: logistic``: the discretized logistic mixture around the adaptive predictor.

    Args:
        mixtures: components of the mixture.
        order: past target samples the predictor uses.
        taps: input samples on each side of t the predictor uses.
        refit_every: samples per refit of the predictor (the refit interval).
        forget: weight per interval of older intervals in the refit.
    """

    name = "logistic"
    module = LogisticHead

    def __init__(
        self,
        mixtures: int = 4,
        order: int = 16,
        taps: int = 16,
        refit_every: int = 16,
        forget: float = 0.8,
    ) -> None:
        check_options(mixtures, order, taps, refit_every, forget)
        self.mixtures, self.order, self.taps = mixtures, order, taps
        self.refit_every, self.forget = refit_every, forget

    def build(self, width: int, levels: int) -> Head:
        return LogisticHead(width, levels, self)

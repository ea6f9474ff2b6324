"""``head: logistic``: a discretized logistic mixture over the V levels around a linear predictor.

The categorical heads must learn, level by level, that audio moves smoothly; a small model trained
for minutes cannot (the demo's 16-bit synthetic mixes cost 9-11 bits/sample that way, FLAC 6.4).
This head says it by construction, the way lossless audio coders do:

- **Predictor** (no parameters; ``trainer.model.heads.predictor``): a least-squares stage over
  the target's past and the input around t, then a cascade of NLMS stages on its residual, all
  running over everything before t: the whole sequence of a call, and across calls through the
  state ``forward`` returns (the T5 body may attend within shorter windows meanwhile). It also
  gives the loudness features: causal averages of the final residual's size at a few time
  constants, and two-sided loudness of the input channel.
- **Mixture**: an MLP on those features plus a linear map of the decoder state at t give, per
  component k, a mixture logit, a log-scale relative to the recent error level, a mean offset
  in units of it and (``mix``) a weight per candidate (each earlier stage's prediction):
  ``mean_k = final_t + sum_j a_kj (cand_j - final_t) + c_k * base_t``,
  ``scale_k = base_t * exp(d_k)``. At step 0 every weight is 0: the classical coder, the final
  prediction with a scale that follows the recent errors.

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

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.batch import IGNORE
from trainer.model.errors import ModelError
from trainer.model.heads.base import Head, HeadOptions, HeadOutput, Stepper
from trainer.model.heads.predictor import Predictor, PredictorState, Track

MIN_LOG_SCALE, MAX_LOG_SCALE = math.log(0.05), math.log(65536.0)


def initial_output(mixtures: int) -> torch.Tensor:
    """The network's output at step 0 [3, K] (logits, log-scales, offsets): equal weights, no
    offset, logistic scales 0.72 x the recent mean |error| (the Laplace-like fit), spread to
    break the components' symmetry."""
    out = torch.zeros(3, mixtures)
    spread = torch.linspace(-0.3, 0.3, mixtures) if mixtures > 1 else torch.zeros(1)
    out[1] = math.log(0.72) + spread
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
        mixtures = self.mixtures = options.mixtures
        self.levels, self.mid = levels, levels // 2
        self.predictor = Predictor(
            levels, options.order, options.taps, options.refit_every, options.forget,
            tuple(options.cascade), tuple(options.cascade_mu), tuple(options.slow_forgets),
        )  # fmt: skip
        self.lookahead = self.predictor.lookahead
        # mix: the network moves each component's mean towards the candidates (the earlier
        # stages' predictions), one weight per component and candidate, and sees where they are
        self.mixed = self.predictor.candidates if options.mix else 0
        n_feats = self.predictor.n_features - 1 + self.mixed
        n_out = (3 + self.mixed) * mixtures
        self.net = nn.Sequential(nn.Linear(n_feats, d_model), nn.GELU(), nn.Linear(d_model, n_out))
        nn.init.normal_(self.net[0].weight, std=n_feats**-0.5)
        nn.init.zeros_(self.net[0].bias)
        # The decoder state enters through its own linear map, not the MLP: an untrained body's
        # state is noise that moves as the body learns, and as MLP input it slowed what the MLP
        # learns from the signal features (the head alone with random states, 200 steps on real
        # music: 0.050 bits/sample gained that way, 0.071 this way). Both last layers start at
        # zero, so at step 0 the output is the bias, whatever the input.
        self.from_state = nn.Linear(d_model, n_out, bias=False)
        nn.init.zeros_(self.from_state.weight)
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.copy_(self.initial_output().flatten())
        # the untrained baseline's output, on the module's device (no copy from the host)
        self.register_buffer("start", self.initial_output(), persistent=False)

    def initial_output(self) -> torch.Tensor:
        """The network's output at step 0 [3 + J, K]: ``initial_output`` and no mixing."""
        start = initial_output(self.mixtures)
        return torch.cat([start, start.new_zeros(self.mixed, self.mixtures)])

    # ------------------------------------------------------------------ mixture

    def _spread(self, track: Track) -> torch.Tensor:
        """Each mixed candidate's offset from the final prediction [..., J]."""
        return track.candidates[..., : self.mixed] - track.final[..., None]

    def mixture(self, hidden: torch.Tensor, track: Track):
        """(logits, means, scales) [..., K] float64 from states [..., d] and the predictor's
        track at the same positions. The network sees the signal features (the base level
        aside) and, with mix, where each candidate is in units of the base level."""
        spread = self._spread(track)
        base = track.features[..., -1:] + 0.5  # >= 0.5 level
        feats = torch.cat([track.features[..., :-1], torch.asinh(spread / base)], -1)
        out = self.net(feats.to(hidden.dtype)) + self.from_state(hidden)
        out = out.double().unflatten(-1, (3 + self.mixed, self.mixtures))
        return self._mixture(out, track, spread)

    def _mixture(self, out: torch.Tensor, track: Track, spread: torch.Tensor):
        """mixture() from the network's output [..., 3 + J, K] and ``_spread(track)``."""
        base = track.features[..., -1] + 0.5
        logits, log_scale, offset = out[..., :3, :].unbind(-2)
        log_scale = (log_scale + base.log()[..., None]).clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
        means = track.final[..., None] + offset * base[..., None]
        if self.mixed:
            means = means + (spread[..., :, None] * out[..., 3:, :]).sum(-2)
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

    def values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (centred float64 levels, 0 where not audio; known mask)."""
        known = (tokens >= 0) & (tokens < self.levels)
        return torch.where(known, tokens - self.mid, 0).double(), known

    def track(
        self, targets: torch.Tensor, inputs: torch.Tensor, state: PredictorState | None = None
    ) -> tuple[Track, PredictorState | None]:
        """The predictor over targets [B, L] and inputs [B, L + lookahead] (no parameters)."""
        with torch.no_grad():
            return self.predictor.run(*self.values(targets), *self.values(inputs), state)

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        state: PredictorState | None = None,
    ) -> HeadOutput:
        """The mixture's NLL and mode, and in ``extras["untrained"]`` the NLL this head gives
        at step 0, whatever its weights: the predictor alone, no gradient. ``inputs`` may run
        past the targets (the input channel's continuation: the predictor's lookahead)."""
        keep = targets != IGNORE
        y, _ = self.values(targets)
        track, state = self.track(targets, inputs, state)
        with torch.no_grad():
            start = self.start.to(track.final.dtype)
            start = start.expand(*track.final.shape, *start.shape)
            untrained = -self.log_prob(*self._mixture(start, track, self._spread(track)), y)
        logits, means, scales = self.mixture(hidden, track)
        nll = -self.log_prob(logits, means, scales, y)
        nll = torch.where(keep, nll, 0.0).float()
        untrained = torch.where(keep, untrained, 0.0).float()
        mode = self.mode(logits.detach(), means.detach())
        return HeadOutput(nll, mode, {"untrained": untrained}, state)

    # ------------------------------------------------------------------ generation

    def stepper(self, inputs, temperature, generator=None, state=None) -> Stepper:
        """Generation: greedy is the mixture's mode; sampling picks a component from
        softmax(logits / T), then a logistic of T times its scale. Each step runs the
        teacher-forced predictor over the refit interval so far (the sample being chosen
        unknown), so generation and teacher forcing share their arithmetic; ``state``
        continues a stream as in ``forward``."""
        batch, length = inputs.shape[0], inputs.shape[1]
        every, ahead = self.predictor.refit_every, self.lookahead
        targets = inputs.new_full((batch, length), IGNORE)
        step_state = {"t": 0, "state": state}

        def step(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = step_state["t"]
            lo = t - t % every
            track, _ = self.track(
                targets[:, lo : t + 1], inputs[:, lo : t + 1 + ahead], step_state["state"]
            )
            here = Track(track.final[:, -1], track.candidates[:, -1], track.features[:, -1])
            logits, means, scales = self.mixture(hidden, here)
            if temperature > 0:
                comp = torch.multinomial(
                    torch.softmax(logits / temperature, -1).float(), 1, generator=generator
                )
                mean = means.gather(-1, comp).squeeze(-1)
                scale = scales.gather(-1, comp).squeeze(-1)
                uniform = torch.rand(
                    mean.shape, generator=generator, dtype=torch.float64, device=inputs.device
                ).clamp(1e-12, 1 - 1e-12)
                token = self._token(mean + temperature * scale * torch.logit(uniform))
            else:
                token = self.mode(logits, means)
            log_prob = self.log_prob(logits, means, scales, (token - self.mid).double()).float()
            targets[:, t] = token
            if (t + 1) % every == 0:  # the interval is whole: its statistics join the state
                _, step_state["state"] = self.track(
                    targets[:, lo : t + 1], inputs[:, lo : t + 1 + ahead], step_state["state"]
                )
            step_state["t"] = t + 1
            return token, log_prob

        return step


def check_options(options: LogisticOptions) -> None:
    o = options
    if o.mixtures < 1 or o.order < 2 or o.taps < 0 or o.refit_every < 1:
        raise ModelError(
            "head logistic: mixtures >= 1, order >= 2, taps >= 0, refit_every >= 1; got "
            f"{o.mixtures}, {o.order}, {o.taps}, {o.refit_every}"
        )
    if any(not 0.0 < f <= 1.0 for f in (o.forget, *o.slow_forgets)):
        raise ModelError(
            f"head logistic: forget and slow_forgets must be in (0, 1], got {o.forget} and "
            f"{o.slow_forgets}"
        )
    if len(o.cascade) != len(o.cascade_mu) or any(n < 1 for n in o.cascade):
        raise ModelError(
            f"head logistic: cascade (taps per stage, each >= 1) and cascade_mu (a step per "
            f"stage) must have one entry per stage; got {o.cascade} and {o.cascade_mu}"
        )
    if any(not 0.0 < mu < 2.0 for mu in o.cascade_mu):
        raise ModelError(f"head logistic: each cascade_mu must be in (0, 2), got {o.cascade_mu}")


class LogisticOptions(HeadOptions):
    """``head: logistic``: the discretized logistic mixture around the adaptive predictor.

    Args:
        mixtures: components of the mixture.
        order: past target samples the least-squares stage uses.
        taps: input samples on each side of t the least-squares stage uses.
        refit_every: samples per refit interval (least squares refit, cascade update).
        forget: weight per interval of older intervals in the least-squares refit.
        cascade: taps of each NLMS stage on the residual, in order ([]: none).
        cascade_mu: the step of each NLMS stage.
        slow_forgets: the forgets of further least-squares predictors over the same
            regressors (longer memories), candidates for the mixing only.
        mix: the network also moves each component's mean towards the earlier stages'
            predictions.
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
        cascade: list[int] | tuple[int, ...] = (256, 32),
        cascade_mu: list[float] | tuple[float, ...] = (0.02, 0.05),
        slow_forgets: list[float] | tuple[float, ...] = (),
        mix: bool = True,
    ) -> None:
        self.mixtures, self.order, self.taps = mixtures, order, taps
        self.refit_every, self.forget = refit_every, forget
        # lists, not tuples: hyperparameters go to YAML, which safe-loads no tuples
        self.cascade, self.cascade_mu = [int(n) for n in cascade], [float(m) for m in cascade_mu]
        self.slow_forgets = [float(f) for f in slow_forgets]
        self.mix = mix
        check_options(self)

    def build(self, width: int, levels: int) -> Head:
        return LogisticHead(width, levels, self)

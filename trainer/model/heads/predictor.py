"""The logistic head's parameter-free predictor: stages that see everything before t, in one call
and across calls (its state), the way lossless audio coders predict a channel.

Stages, each predicting what the ones before it left (all backward adaptive: computed from the
target's past and the input channel only, so nothing is transmitted and it is causal):

1. **Least squares**: ``lpc_t = w_k . phi_t`` over the ``order`` target samples before t and the
   input samples ``t - taps .. t + taps`` (the input channel is known whole). ``w_k`` is refitted
   every ``refit_every`` samples (one refit interval) by ridge least squares on every interval
   before k, older ones weighted down by ``forget`` each, shrunk towards the fixed second-order
   predictor ``2 x[t-1] - x[t-2]`` (what it is with no history).
2. **NLMS cascade** (``cascade``: taps per stage): stage j predicts the residual its input
   signal still has (the LS residual for the first stage, then what the stage before left) from
   that signal's own ``n_j`` past values; its weights move once per refit interval by the
   interval's normalized gradient, ``mu_j sum_t e_t h_t / (1 + |h_t|^2)``.

The output per sample: the final prediction (LS plus every stage), the candidates (the
prediction after each earlier stage, and least-squares predictors of longer memory, the
``slow_forgets``), and the features the mixture is set from: two-sided input loudness, how each
candidate has done lately against the final prediction, and causal averages of the final
residual's size.

State: the LS statistics, the stage weights, and the last ``history`` samples of every signal,
so a stream scored call by call gives what one call over all of it gives; the calls' lengths
must be multiples of ``refit_every`` (the interval grid starts at the stream's start). The input
channel is read ``lookahead`` samples past the call's end when the caller has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EMA_DECAYS = (0.5, 0.8, 0.93, 0.98)
BASE_DECAY = 1  # index into EMA_DECAYS of the error level the scales are relative to
CANDIDATE_DECAY = 2  # index into EMA_DECAYS of the candidates' recent errors
EMA_LEN = 128  # samples each causal average looks back
INPUT_SPANS = ((-8, 8), (0, 16), (-16, 0))  # two-sided loudness of the input channel
INPUT_REACH = 16  # the spans' reach on either side of t
RIDGE = 1e-9  # relative to the mean diagonal (demo test split: 1e-7 6.34, 1e-8 6.11, 1e-9 6.08 b/s)
RIDGE_FLOOR = 1.0  # absolute, in squared levels: no history gives the fixed predictor
SCAN = 32  # refit intervals per step of the statistics scan

__all__ = ["EMA_DECAYS", "INPUT_SPANS", "Predictor", "PredictorState", "Track"]


@dataclass
class Track:
    """The predictor over one call's samples."""

    final: torch.Tensor  # [B, L] float64: the prediction after every stage
    candidates: torch.Tensor  # [B, L, J]: the prediction after each earlier stage
    features: torch.Tensor  # [B, L, F]: input loudness, error levels; last column the base level


@dataclass
class PredictorState:
    """What the next call of the same streams needs (batched by row)."""

    x: torch.Tensor  # [B, H] the last H centred target samples (0 where unknown)
    known: torch.Tensor  # [B, H] bool
    u: torch.Tensor  # [B, H] the last H centred input samples
    u_known: torch.Tensor  # [B, H] bool
    abs_err: torch.Tensor  # [B, H] |final residual| (0 where unknown)
    cand_err: torch.Tensor  # [B, J, H] |residual| of each candidate (0 where unknown)
    signals: list[torch.Tensor]  # per cascade stage [B, H]: its input signal
    weights: list[torch.Tensor]  # per cascade stage [B, n_j]
    stats: list[torch.Tensor]  # per forget [B, D * D + D]: LS sums phi phi^T, phi x so far


class Predictor:
    """The stages for one head's options; ``run`` is the teacher-forced pass (and, on a
    prefix of one refit interval, the generation step)."""

    def __init__(
        self,
        levels: int,
        order: int,
        taps: int,
        refit_every: int,
        forget: float,
        cascade: tuple[int, ...],
        cascade_mu: tuple[float, ...],
        slow_forgets: tuple[float, ...] = (),
    ) -> None:
        self.levels, self.order, self.taps = levels, order, taps
        self.refit_every, self.forget = refit_every, forget
        self.forgets = (forget, *slow_forgets)  # the first feeds the cascade
        self.cascade, self.cascade_mu = tuple(cascade), tuple(cascade_mu)
        self.unknown_error = levels / 64.0
        self.dims = order + 2 * taps + 1
        self.lookahead = max(taps, INPUT_REACH)
        self.history = max(order, taps, INPUT_REACH + 2, EMA_LEN, *self.cascade)
        self.candidates = len(self.cascade) + len(slow_forgets)
        self.n_features = 2 * len(EMA_DECAYS) + len(INPUT_SPANS) + self.candidates + 1
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed predictor (2 x[t-1] - x[t-2]) [D] and the causal averages' kernels
        [len(EMA_DECAYS), EMA_LEN] (lag 1 first), built on ``device`` once: a copy from host
        memory in every call would be a host sync on a GPU."""
        if device not in self._constants:
            fixed = torch.zeros(self.dims, dtype=torch.float64, device=device)
            fixed[0], fixed[1] = 2.0, -1.0
            lags = torch.arange(1, EMA_LEN + 1, dtype=torch.float64, device=device)
            kernels = torch.stack([(1 - d) * d ** (lags - 1) for d in EMA_DECAYS])
            self._constants[device] = (fixed, kernels)
        return self._constants[device]

    def initial_state(self, batch: int, device: torch.device) -> PredictorState:
        """A stream's start: no history (unknown), no statistics, zero stage weights."""
        h = self.history

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        unknown = torch.zeros((batch, h), dtype=torch.bool, device=device)
        return PredictorState(
            zeros(batch, h), unknown, zeros(batch, h), unknown.clone(), zeros(batch, h),
            zeros(batch, self.candidates, h),
            [zeros(batch, h) for _ in self.cascade], [zeros(batch, n) for n in self.cascade],
            [zeros(batch, self.dims * (self.dims + 1)) for _ in self.forgets],
        )  # fmt: skip

    # ------------------------------------------------------------------ the pass

    def run(
        self,
        x: torch.Tensor,
        known: torch.Tensor,
        u: torch.Tensor,
        u_known: torch.Tensor,
        state: PredictorState | None = None,
    ) -> tuple[Track, PredictorState | None]:
        """Centred target x [B, L] (known mask), centred input u [B, L + a] (a >= 0 samples of
        lookahead; more than ``lookahead`` are ignored) -> the track and the state after it
        (None when L is no multiple of ``refit_every``: such a call cannot be continued)."""
        batch, length = x.shape
        h, ahead = self.history, self.lookahead
        if state is None:
            state = self.initial_state(batch, x.device)
        u, u_known = u[:, : length + ahead], u_known[:, : length + ahead]
        missing = length + ahead - u.shape[1]
        xe = torch.cat([state.x, x], 1)
        ke = torch.cat([state.known, known], 1)
        ue = F.pad(torch.cat([state.u, u], 1), (0, missing))
        uke = F.pad(torch.cat([state.u_known, u_known], 1), (0, missing))

        def lag(ext: torch.Tensor, j: int) -> torch.Tensor:  # ext[t - j] for the call's t
            return ext[:, h - j : h - j + length]

        cols = [lag(xe, j) for j in range(1, self.order + 1)]
        cols += [lag(ue, i) for i in range(-self.taps, self.taps + 1)]
        phi = torch.stack(cols, -1)
        coefs, stats = self._least_squares(phi, x, known, state)
        lpc, *slow = ((phi * coef).sum(-1) for coef in coefs)
        signals, weights, stage_preds = self._cascade(x - lpc, known, state)
        preds = [lpc]
        for p in stage_preds:
            preds.append(preds[-1] + p)
        final = preds[-1]
        abs_err = torch.cat([state.abs_err, (x - final).abs() * known], 1)
        others = [*preds[:-1], *slow]
        candidates = torch.stack(others, -1) if others else final.new_zeros(*final.shape, 0)
        cand_err = torch.cat(
            [state.cand_err, (x[:, None] - candidates.mT).abs() * known[:, None]], -1
        )
        features = torch.cat(
            [
                self._input_features(ue, uke, length),
                self._candidate_features(cand_err, abs_err, length),
                self._error_features(abs_err, ke, length),
            ],
            -1,
        )
        track = Track(final, candidates, features)
        if length % self.refit_every:
            return track, None
        tail = slice(length, length + h)
        return track, PredictorState(
            xe[:, tail], ke[:, tail], ue[:, tail], uke[:, tail], abs_err[:, tail],
            cand_err[..., tail], [s[:, tail] for s in signals], weights, stats,
        )  # fmt: skip

    def _least_squares(
        self, phi: torch.Tensor, x: torch.Tensor, known: torch.Tensor, state: PredictorState
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per forget, per-sample LS coefficients [B, L, D] and the sums after the call's
        intervals (the intervals' sums are shared: only their weighting differs)."""
        batch, length, dims = phi.shape
        every = self.refit_every
        nb = -(-length // every)
        pad = nb * every - length
        weight = known.double()
        if pad:
            phi, x, weight = F.pad(phi, (0, 0, 0, pad)), F.pad(x, (0, pad)), F.pad(weight, (0, pad))
        blocks = phi.view(batch, nb, every, dims)
        wphi = blocks * weight.view(batch, nb, every, 1)
        cov = wphi.transpose(-1, -2) @ blocks
        cross = (wphi * x.view(batch, nb, every, 1)).sum(2)
        sums = torch.cat([cov.flatten(2), cross], -1)  # [B, nb, D * D + D]
        coefs, stats, split = [], [], dims * dims
        for forget, start in zip(self.forgets, state.stats, strict=True):
            before, after = self._decayed_sums(sums, start, forget)
            coef = self.solve(before[..., :split].unflatten(-1, (dims, dims)), before[..., split:])
            coefs.append(coef.repeat_interleave(every, 1)[:, :length])
            stats.append(after)
        return coefs, stats

    @staticmethod
    def _decayed_sums(
        sums: torch.Tensor, start: torch.Tensor, forget: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """acc_k = forget^k start + sum_{j<k} forget^(k-1-j) sums_j for each interval k (what
        its refit sees), and acc after the last: a scan over groups of SCAN intervals, one
        matrix product per group (forget^SCAN stays far from underflow)."""
        nb = sums.shape[1]
        steps = torch.arange(SCAN, dtype=sums.dtype, device=sums.device)
        lag = steps[:, None] - 1 - steps[None, :]  # row k, column j: k - 1 - j
        decay = torch.where(lag >= 0, forget ** lag.clamp(min=0), 0.0)  # [SCAN, SCAN]
        powers = forget**steps  # forget^k, k = 0..SCAN-1
        before, acc = [], start
        for lo in range(0, nb, SCAN):
            group = sums[:, lo : lo + SCAN]
            n = group.shape[1]
            local = decay[:n, :n] @ group  # [B, n, S]
            before.append(powers[:n, None] * acc[:, None] + local)
            last = forget ** (n - 1 - steps[:n])  # the group's weights in acc after it
            acc = forget**n * acc + (last[:, None] * group).sum(1)
        return torch.cat(before, 1), acc

    def solve(self, cov: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Ridge solution shrunk towards the fixed predictor: [..., D, D], [..., D] -> [..., D]."""
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        reg = (RIDGE * trace / self.dims + RIDGE_FLOOR)[..., None]
        eye = torch.eye(self.dims, dtype=cov.dtype, device=cov.device)
        rhs = cross + reg * self.constants(cov.device)[0]
        # cov + reg I is positive definite (reg >= RIDGE_FLOOR), so the solve cannot fail:
        # solve_ex without its error check, which reads the status back (a host sync)
        a = cov + reg[..., None] * eye
        return torch.linalg.solve_ex(a, rhs.unsqueeze(-1), check_errors=False)[0].squeeze(-1)

    def _cascade(
        self, residual: torch.Tensor, known: torch.Tensor, state: PredictorState
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The NLMS stages over the LS residual: each stage's input signal with its history
        [B, H + L], its weights after the call, and its predictions [B, L]."""
        if not self.cascade:
            return [], [], []
        h, length, every = self.history, residual.shape[1], self.refit_every
        signals = [torch.cat([s, torch.zeros_like(residual)], 1) for s in state.signals]
        signals[0][:, h:] = residual * known
        weights = [w.unsqueeze(-1).clone() for w in state.weights]  # [B, n, 1]: updated in place
        preds = [torch.zeros_like(residual) for _ in self.cascade]
        views = [s.unfold(1, n, 1) for s, n in zip(signals, self.cascade, strict=True)]
        mask = known.double()
        last = len(self.cascade) - 1
        for lo in range(0, length, every):
            hi = min(lo + every, length)
            for j, (n, mu) in enumerate(zip(self.cascade, self.cascade_mu, strict=True)):
                hist = views[j][:, h + lo - n : h + hi - n]  # [B, rows, n]: s[t-n .. t-1]
                pred = torch.bmm(hist, weights[j]).squeeze(-1)
                preds[j][:, lo:hi] = pred
                err = (signals[j][:, h + lo : h + hi] - pred).mul_(mask[:, lo:hi])
                if j < last:
                    signals[j + 1][:, h + lo : h + hi] = err
                gain = err.div_(hist.square().sum(-1).add_(1.0)).unsqueeze(-1)
                weights[j].baddbmm_(hist.mT, gain, alpha=mu)
        return signals, [w.squeeze(-1) for w in weights], preds

    # ------------------------------------------------------------------ features

    def _input_features(self, ue: torch.Tensor, uke: torch.Tensor, length: int) -> torch.Tensor:
        """Two-sided input loudness [B, L, len(INPUT_SPANS)]: log1p of the mean |second
        difference| over the known input samples of each span around t."""
        ok = uke[:, 2:] & uke[:, 1:-1] & uke[:, :-2]
        d2 = F.pad((ue[:, 2:] - 2 * ue[:, 1:-1] + ue[:, :-2]).abs() * ok, (2, 0))
        ok = F.pad(ok, (2, 0)).double()
        csum, ccount = F.pad(d2.cumsum(-1), (1, 0)), F.pad(ok.cumsum(-1), (1, 0))
        idx = torch.arange(length, device=ue.device) + self.history
        feats = []
        for lo, hi in INPUT_SPANS:
            total = csum[:, idx + hi + 1] - csum[:, idx + lo]
            count = ccount[:, idx + hi + 1] - ccount[:, idx + lo]
            feats.append(torch.log1p(total / count.clamp(min=1)))
        return torch.stack(feats, -1)

    def _candidate_features(
        self, cand_err: torch.Tensor, abs_err: torch.Tensor, length: int
    ) -> torch.Tensor:
        """How each candidate has done lately against the final prediction [B, L, J]: the log
        ratio of their causal averages of |error| (time constant CANDIDATE_DECAY), which is
        what a coder's stage mixing weighs its stages by."""
        window = slice(self.history - EMA_LEN, self.history + length - 1)
        kernel = self.constants(abs_err.device)[1][CANDIDATE_DECAY].flip(-1).view(1, 1, -1)
        both = torch.cat([cand_err[..., window], abs_err[:, None, window]], 1)
        levels = F.conv1d(both.flatten(0, 1).unsqueeze(1), kernel).view(*both.shape[:2], length)
        return torch.log((levels[:, :-1] + 1.0) / (levels[:, -1:] + 1.0)).mT

    def _error_features(self, abs_err: torch.Tensor, ke: torch.Tensor, length: int) -> torch.Tensor:
        """Causal loudness of the final residual [B, L, 2 n + 1]: per time constant the average
        |error| before t (unknown errors count as V / 64) as log1p, then the known fraction,
        then the base error level (not log) the scales are relative to."""
        window = slice(self.history - EMA_LEN, self.history + length - 1)
        span, mass_in = abs_err[:, window], ke[:, window].double()  # t sees lags 1..EMA_LEN
        kernels = self.constants(abs_err.device)[1]
        kernel = kernels.flip(-1).unsqueeze(1)  # oldest lag first
        sums = F.conv1d(torch.stack([span, mass_in], 0).flatten(0, 1).unsqueeze(1), kernel)
        level, mass = sums.view(2, abs_err.shape[0], len(EMA_DECAYS), length).unbind(0)
        total = kernels.sum(-1)[:, None]
        level = level + (total - mass) * self.unknown_error
        frac = mass / total
        base = level[:, BASE_DECAY : BASE_DECAY + 1]
        return torch.cat([torch.log1p(level), frac, base], 1).mT

"""The three ways to restore a target channel from the input channel (docs/evaluation.md):

- **estimate**: the model's estimate head (`trainer.model.estimator`) over windows of the
  input on a fixed grid (window k starts at k x hop), joined by a raised-cosine crossfade over
  their overlap; non-autoregressive, so nothing it outputs is fed back.
- **render**: the estimate plus noise at the head's predicted spread times a temperature, from
  a seeded generator: a rendition whose level follows the truth's (the spread is the error's,
  so mean^2 + spread^2 is the truth's energy at temperature 1), never a feedback loop.
- **repair**: the known target stays bit for bit; each gap is filled by a least-squares fit,
  on the known target around it, of the input's 32 two-sided taps and the model's estimate;
  the known residual at each end of the gap decays into it (`SEAM_DECAY_S`), and over the
  first and last `SEAM_BLEND_S` the fill is crossfaded with the known target's own linear
  prediction (forward from before the gap, backward from after it), so the output meets the
  known target the way the target itself moves.

Every function works on int16 arrays of one track; window results depend on the input only, so
a range of frames computed alone equals the same frames of the whole (`estimate_range`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.codec import Codec, int16_to_pcm16
from trainer.evaluation.baselines import fir_lags, lagged, to_int16
from trainer.model import StereoT5

__all__ = [
    "CONTEXT_S",
    "MODES",
    "SEAM_DECAY_S",
    "GapFit",
    "Restored",
    "default_overlap",
    "estimate_range",
    "fit_gap",
    "render",
    "repair",
]

MODES = ("estimate", "repair", "render")
NOISE_LIMIT = 2.5  # render's noise, in standard deviations (its variance 2 % below the normal's)
CONTEXT_S = 1.0  # known target on each side of a gap that its fit reads
SEAM_DECAY_S = 0.002  # time constant of the known residual's decay into a gap
SEAM_BLEND_S = 0.001  # at each end of a gap, the fill is crossfaded with the target's own AR
AR_ORDER = 32  # of that prediction, fitted on the known target next to the gap
AR_FIT_S = 0.05  # how much known target it is fitted on
GAP_TAPS = 32  # the input's taps in a gap's fit (two-sided, as the baselines' filter)


@dataclass(frozen=True)
class Restored:
    """The estimate over frames [first, stop) of a track: float64 int16 units each."""

    mean: np.ndarray
    scale: np.ndarray  # the spread of the estimate's error
    linear: np.ndarray  # the estimate head's static filter alone


def default_overlap(length: int) -> int:
    """Frames two neighbouring windows share: a quarter of the window, at most 2048."""
    return max(1, min(length // 4, 2048))


def _fade(length: int, overlap: int) -> np.ndarray:
    """Weights [length]: raised-cosine ramps over `overlap` frames at both ends, 1 between;
    never 0, so a frame covered by one window keeps that window's value."""
    ramp = np.sin(0.5 * math.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
    weights = np.ones(length)
    weights[:overlap] = np.minimum(weights[:overlap], ramp)
    weights[length - overlap :] = np.minimum(weights[length - overlap :], ramp[::-1])
    return weights


def estimate_range(
    model: StereoT5,
    codec: Codec,
    x: np.ndarray,
    length: int,
    overlap: int,
    batch_size: int,
    first: int = 0,
    stop: int | None = None,
    offset: int = 0,
) -> Restored:
    """The estimate of frames [first, stop) of a track from its input channel.

    Args:
        x: int16 input frames of the track from frame `offset` on: it must hold every window
            that covers [first, stop) (from the start of the first such window, or the
            track's start, to the end of the last, or the track's end).
        length, overlap: the windows and what neighbours share (the grid's hop is their
            difference).
    """
    end = offset + len(x)
    stop = end if stop is None else stop
    hop = length - overlap
    if not 0 < overlap < length:
        raise ValueError(f"overlap must be in 1..{length - 1}, got {overlap}")
    starts = range(max(0, (first - length) // hop + 1) * hop, stop, hop)
    fade = _fade(length, overlap)
    total = np.zeros((3, stop - first))
    weight = np.zeros(stop - first)
    device = next(model.parameters()).device
    for group in range(0, len(starts), batch_size):
        batch = starts[group : group + batch_size]
        ids = np.full((len(batch), length), model.pad_id, np.int64)
        for row, start in enumerate(batch):
            part = x[start - offset : min(start + length, end) - offset]
            if start < offset or (start + length < end and len(part) < length):
                raise ValueError(f"frames {start}..{start + length} are not all in x")
            ids[row, : len(part)] = codec.encode(int16_to_pcm16(part))
        est = model.estimate(torch.from_numpy(ids).to(device))
        values = torch.stack([est.mean, est.log_scale.exp(), est.linear], 1)
        values = values.double().cpu().numpy()  # [rows, 3, length]
        for row, start in enumerate(batch):
            lo, hi = max(start, first), min(start + length, stop)
            total[:, lo - first : hi - first] += (
                values[row, :, lo - start : hi - start] * fade[lo - start : hi - start]
            )
            weight[lo - first : hi - first] += fade[lo - start : hi - start]
    total /= weight
    return Restored(mean=total[0], scale=total[1], linear=total[2])


def render(restored: Restored, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """int16 frames: the estimate plus Gaussian noise at temperature x the predicted spread,
    cut at NOISE_LIMIT standard deviations (a rendition has no business with the tails: they
    are where it would clip)."""
    noise = np.clip(rng.standard_normal(len(restored.mean)), -NOISE_LIMIT, NOISE_LIMIT)
    return to_int16(restored.mean + temperature * restored.scale * noise)


def _known_context(frames: int, gap: tuple[int, int], missing: np.ndarray, rate: int) -> np.ndarray:
    """Indices of known target frames within CONTEXT_S of the gap on either side."""
    span = round(CONTEXT_S * rate)
    a, b = gap
    idx = np.r_[max(0, a - span) : a, b : min(frames, b + span)]
    return idx[~missing[idx]]


@dataclass(frozen=True)
class GapFit:
    """A gap's least-squares prediction (float64): over the gap, and at the frame before and
    the frame after it (None at the track's ends), where the known target shows its error."""

    inside: np.ndarray
    before: float | None
    after: float | None


def fit_gap(
    x: np.ndarray,
    y: np.ndarray,
    gap: tuple[int, int],
    missing: np.ndarray,
    rate: int,
    extra: Sequence[np.ndarray] = (),
) -> GapFit | None:
    """The least-squares prediction of y over the gap [a, b) and its two neighbouring frames
    from the input's GAP_TAPS two-sided taps and the `extra` regressors, fitted on the known
    target around the gap; None when no known frame is near."""
    frames = len(x)
    a, b = gap
    context = _known_context(frames, gap, missing, rate)
    if len(context) == 0:
        return None
    span = np.r_[context, max(0, a - 1) : min(frames, b + 1)]
    # the taps read up to GAP_TAPS frames beyond the span: the design covers them too
    lo = max(0, int(span.min()) - GAP_TAPS)
    hi = min(frames, int(span.max()) + 1 + GAP_TAPS)
    design = lagged(x[lo:hi].astype(np.float64), fir_lags(GAP_TAPS))
    if extra:
        design = np.column_stack([design, *(e[lo:hi] for e in extra)])
    coef, *_ = np.linalg.lstsq(design[context - lo], y[context].astype(np.float64), rcond=None)
    fitted = design[max(0, a - 1) - lo : min(frames, b + 1) - lo] @ coef
    before = float(fitted[0]) if a > 0 else None
    after = float(fitted[-1]) if b < frames else None
    return GapFit(fitted[int(a > 0) :][: b - a], before, after)


def _extrapolate(history: np.ndarray, steps: int) -> np.ndarray | None:
    """The next `steps` samples of `history` (its last is the newest) by iterating its
    least-squares AR(AR_ORDER) prediction; None when there is too little history or the
    prediction leaves twice the history's peak (an unstable fit)."""
    h = history.astype(np.float64)
    if len(h) < 4 * AR_ORDER or not h.any():
        return None
    design = lagged(h, np.arange(1, AR_ORDER + 1))[AR_ORDER:]  # column j: h[t - 1 - j]
    coef, *_ = np.linalg.lstsq(design, h[AR_ORDER:], rcond=None)
    recent = list(h[-AR_ORDER:][::-1])  # newest first
    out = np.empty(steps)
    for t in range(steps):
        out[t] = float(np.dot(coef, recent))
        recent = [out[t], *recent[:-1]]
    return out if np.abs(out).max() <= 2 * np.abs(h).max() else None


def _blend_ends(
    fill: np.ndarray, y: np.ndarray, gap: tuple[int, int], missing: np.ndarray, rate: int
) -> np.ndarray:
    """`fill` of gap [a, b) crossfaded, over SEAM_BLEND_S at each end (at most half the gap),
    with the target's forward prediction from before the gap and its backward one from after."""
    a, b = gap
    size = b - a
    blend = min(round(SEAM_BLEND_S * rate), size // 2)
    span = round(AR_FIT_S * rate)
    if blend < 1:
        return fill
    ramp = np.cos(0.5 * np.pi * np.arange(blend) / blend) ** 2  # 1 at the seam, towards 0
    out = fill.copy()
    before = y[max(0, a - span) : a]
    if len(before) and not missing[max(0, a - span) : a].any():
        ahead = _extrapolate(before, blend)
        if ahead is not None:
            out[:blend] = ramp * ahead + (1 - ramp) * out[:blend]
    after = y[b : b + span]
    if len(after) and not missing[b : b + span].any():
        behind = _extrapolate(after[::-1], blend)
        if behind is not None:
            out[size - blend :] = (ramp * behind)[::-1] + (1 - ramp[::-1]) * out[size - blend :]
    return out


def repair(
    x: np.ndarray,
    y: np.ndarray,
    gaps: Sequence[tuple[int, int]],
    estimate: np.ndarray,
    rate: int,
) -> np.ndarray:
    """int16 target with every gap [a, b) filled (see the module docstring); every other frame
    is y's, bit for bit. `estimate` is the model's (float, int16 units) over the track."""
    out = np.array(y, dtype=np.int16, copy=True)
    missing = np.zeros(len(y), bool)
    for a, b in gaps:
        missing[a:b] = True
    decay = SEAM_DECAY_S * rate
    for a, b in gaps:
        fit = fit_gap(x, y, (a, b), missing, rate, (estimate,))
        if fit is None:  # nothing known near: the estimate alone
            out[a:b] = to_int16(estimate[a:b])
            continue
        inside = fit.inside.copy()
        t = np.arange(b - a)
        if fit.before is not None and not missing[a - 1]:
            inside += (float(y[a - 1]) - fit.before) * np.exp(-(t + 1) / decay)
        if fit.after is not None and not missing[b]:
            inside += (float(y[b]) - fit.after) * np.exp(-(b - a - t) / decay)
        out[a:b] = to_int16(_blend_ends(inside, y, (a, b), missing, rate))
    return out

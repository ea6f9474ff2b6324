"""The evaluation's restoration section: the three modes of `restore` on each scored source,
beside the baselines a user could deploy without the model (docs/evaluation.md).

Estimate and render run over each source's contiguous segments (cut to `chunks` chunks each);
the baselines are copy input, one gain and a 32-tap two-sided least-squares filter, both fitted
on a capped, seeded sample of training chunks, and the filter fitted on each window itself (an
oracle: an upper bound, not a deployable predictor). Repair is scored on gaps drawn at random
(seeded, 0.1 to 1 s) in each segment, beside the same least-squares filter fitted on the known
target around each gap. SNRs pool energies over sources, and again over the sources whose
inter-channel correlation is below and at or above `CORRELATION_SPLIT` (a source panned away
from the input cannot be estimated by anything).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.codec import Codec
from trainer.data.shards import ShardSplit
from trainer.evaluation.baselines import (
    best_gain,
    fir_apply,
    ls_fir,
    snr_from_energies,
    to_int16,
)
from trainer.evaluation.gaps import draw_gaps, seam_steps
from trainer.evaluation.restore import default_overlap, estimate_range, fit_gap, render, repair
from trainer.evaluation.segments import Segment
from trainer.model import StereoT5

__all__ = [
    "CORRELATION_SPLIT",
    "ESTIMATE_ROWS",
    "REPAIR_ROWS",
    "Restoration",
    "SourceRestoration",
    "TrainFit",
    "fit_on_train",
    "restore_sources",
]

FIR_TAPS = 32
CORRELATION_SPLIT = 0.5
GAP_SECONDS = (0.1, 1.0)
LEVEL_FLOOR_DBFS = -50.0  # render's level is checked on windows whose truth is above it
LEVEL_TOLERANCE_DB = 3.0
INT16_PEAK = 32767
# rows of the estimate table, in order: the model's, its linear part, the baselines, the bound
ESTIMATE_ROWS = ("estimate", "render", "linear_part", "copy", "train_gain", "train_fir", "oracle")
REPAIR_ROWS = ("repair", "gap_fir")


@dataclass(frozen=True)
class TrainFit:
    """The training-split baselines and what they were fitted on."""

    gain: float
    fir: list[float]
    chunks: int  # training chunks read (a seeded sample, at most the cap)
    of_chunks: int  # in the training split
    seed: int


def fit_on_train(split: ShardSplit, direction: int, cap: int, seed: int) -> TrainFit:
    """Fit one gain and the 32-tap two-sided filter on up to `cap` training chunks, drawn with
    `seed` (`direction` is the input channel)."""
    total = sum(split.samples)
    chosen = set(np.random.default_rng(seed).permutation(total)[:cap].tolist())
    xs, ys = [], []
    chunks = itertools.islice(split.chunks(split.urls, 0, want_meta=False), total)
    for number, (chunk, _) in enumerate(chunks):
        if number in chosen:
            audio = chunk.astype(np.int32) - 32768
            xs.append(audio[direction])
            ys.append(audio[1 - direction])
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)
    fir = ls_fir(x, y, FIR_TAPS)
    return TrainFit(best_gain(x, y), fir.tolist(), len(chosen), total, seed)


@dataclass
class _Energy:
    signal: float = 0.0
    error: float = 0.0

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        truth = truth.astype(np.float64)
        self.signal += float(np.square(truth).sum())
        self.error += float(np.square(truth - pred.astype(np.float64)).sum())


@dataclass
class SourceRestoration:
    """One source: SNR (dB) per row, render's level check, repair's gaps and seams."""

    source: str
    frames: int
    correlation: float
    snr_db: dict[str, float | None]
    gap_snr_db: dict[str, float | None]
    gaps: list[list[int]]  # [start, end) frames, in the source's scored audio
    level_windows: int  # render windows checked (truth above LEVEL_FLOOR_DBFS)
    level_within: int  # of those, render's RMS within LEVEL_TOLERANCE_DB of the truth's
    level_worst_db: float | None  # the largest |render dB - truth dB| among them
    clipped: int  # estimate samples at full scale where the truth is not
    seams: int
    seams_within: int  # seams whose step is within the truth's 99th percentile nearby
    energies: dict[str, list[float]] = field(repr=False)  # row -> [signal, error] (pooling)


@dataclass
class Restoration:
    """The whole section, as report.json holds it."""

    train: TrainFit
    chunks_per_segment: int
    temperature: float
    seed: int
    per_source: list[SourceRestoration]
    pooled: dict[str, float | None]
    pooled_by_correlation: dict[str, dict[str, float | None]]
    seconds: dict[str, float]  # per mode, per second of audio
    blend: float  # the weight of the estimate head's learned correction (chosen on val)
    example: dict[str, list[int]] = field(repr=False)  # one window and one gap for the picture

    def to_json(self) -> dict:
        data = asdict(self)
        for row in data["per_source"]:
            row.pop("energies")
        data.pop("example")
        return data


def _level_check(truth: np.ndarray, out: np.ndarray, length: int) -> tuple[int, int, float | None]:
    """Over windows of `length`: those whose truth is above the floor, those within the
    tolerance, and the worst level difference (dB)."""
    checked, within, worst = 0, 0, None
    floor = (10 ** (LEVEL_FLOOR_DBFS / 20) * 32768) ** 2
    for start in range(0, len(truth) - length + 1, length):
        t = np.square(truth[start : start + length].astype(np.float64)).mean()
        if t <= floor:
            continue
        o = max(np.square(out[start : start + length].astype(np.float64)).mean(), 1e-12)
        diff = abs(10 * np.log10(o / t))
        checked += 1
        within += int(diff <= LEVEL_TOLERANCE_DB)
        worst = float(diff) if worst is None else max(worst, float(diff))
    return checked, within, worst


def _oracle(x: np.ndarray, y: np.ndarray, length: int) -> np.ndarray:
    """The filter fitted on each window of `length` itself, applied to it (a bound)."""
    out = np.zeros(len(x))
    for start in range(0, len(x), length):
        part = slice(start, start + length)
        out[part] = fir_apply(x[part], ls_fir(x[part], y[part], FIR_TAPS))
    return out


@dataclass
class _Segment:
    """One segment's results: energies per row (whole, and over its gaps) and its checks."""

    rows: dict[str, _Energy]
    gap_rows: dict[str, _Energy]
    gaps: list[tuple[int, int]]
    level: tuple[int, int, float | None]
    clipped: int
    seams: list[tuple[float, float]]
    audio: dict[str, np.ndarray]  # input, truth and each mode's output, int16
    correlation_sums: tuple[float, float, float]  # x.y, x.x, y.y


def _restore_segment(
    model: StereoT5,
    codec: Codec,
    x: np.ndarray,
    y: np.ndarray,
    fit: TrainFit,
    cfg: _Config,
    seconds: dict[str, float],
) -> _Segment:
    length, rate = cfg.length, cfg.rate
    started = time.perf_counter()
    restored = estimate_range(model, codec, x, length, default_overlap(length), cfg.batch)
    seconds["estimate"] += time.perf_counter() - started
    started = time.perf_counter()
    rendered = render(restored, cfg.temperature, cfg.rng)
    seconds["noise"] += time.perf_counter() - started
    estimate = to_int16(restored.mean)
    preds = {
        "estimate": estimate,
        "render": rendered,
        "linear_part": to_int16(restored.linear),
        "copy": x,
        "train_gain": to_int16(fit.gain * x.astype(np.float64)),
        "train_fir": to_int16(fir_apply(x, np.asarray(fit.fir))),
        "oracle": to_int16(_oracle(x, y, length)),
    }
    rows = {name: _Energy() for name in ESTIMATE_ROWS}
    for name, pred in preds.items():
        rows[name].add(y, pred)
    gaps = draw_gaps(len(x), rate, cfg.gaps, cfg.rng, *GAP_SECONDS)
    missing = np.zeros(len(x), bool)
    for a, b in gaps:
        missing[a:b] = True
    started = time.perf_counter()
    repaired = repair(x, y, gaps, restored.mean, rate)
    seconds["repair"] += time.perf_counter() - started
    gap_rows = {name: _Energy() for name in REPAIR_ROWS}
    for a, b in gaps:
        gap_rows["repair"].add(y[a:b], repaired[a:b])
        fit = fit_gap(x, y, (a, b), missing, rate)
        gap_rows["gap_fir"].add(y[a:b], to_int16(np.zeros(b - a) if fit is None else fit.inside))
    at_peak = np.abs(estimate.astype(np.int32)) >= INT16_PEAK
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    return _Segment(
        rows=rows,
        gap_rows=gap_rows,
        gaps=gaps,
        level=_level_check(y, rendered, length),
        clipped=int((at_peak & (np.abs(y.astype(np.int32)) < INT16_PEAK)).sum()),
        seams=seam_steps(repaired, y, gaps, rate),
        audio={
            "input": x,
            "truth": y,
            "estimate": estimate,
            "render": rendered,
            "repaired": repaired,
        },
        correlation_sums=(float(xf @ yf), float(xf @ xf), float(yf @ yf)),
    )


def _source(source: str, parts: list[_Segment]) -> SourceRestoration:
    """A source's figures over its segments (energies summed)."""
    rows = [{**p.rows, **p.gap_rows} for p in parts]
    energies = {
        name: [sum(r[name].signal for r in rows), sum(r[name].error for r in rows)]
        for name in (*ESTIMATE_ROWS, *REPAIR_ROWS)
    }
    xy, xx, yy = (sum(p.correlation_sums[k] for p in parts) for k in range(3))
    worst = [p.level[2] for p in parts if p.level[2] is not None]
    return SourceRestoration(
        source=source,
        frames=sum(len(p.audio["input"]) for p in parts),
        correlation=xy / max(float(np.sqrt(xx * yy)), 1.0),
        snr_db={name: snr_from_energies(*energies[name]) for name in ESTIMATE_ROWS},
        gap_snr_db={
            name: snr_from_energies(*energies[name]) if energies[name][0] else None
            for name in REPAIR_ROWS
        },
        gaps=[list(g) for p in parts for g in p.gaps],
        level_windows=sum(p.level[0] for p in parts),
        level_within=sum(p.level[1] for p in parts),
        level_worst_db=max(worst) if worst else None,
        clipped=sum(p.clipped for p in parts),
        seams=sum(len(p.seams) for p in parts),
        seams_within=sum(int(step <= bound) for p in parts for step, bound in p.seams),
        energies=energies,
    )


def _pool(sources: list[SourceRestoration]) -> dict[str, float | None]:
    """SNR per row (estimate rows, then repair's gap rows) over the sources' summed energies."""
    names = (*ESTIMATE_ROWS, *REPAIR_ROWS)
    if not sources:
        return dict.fromkeys(names)
    pooled = {}
    for name in names:
        signal = sum(s.energies[name][0] for s in sources)
        pooled[name] = snr_from_energies(signal, sum(s.energies[name][1] for s in sources))
    return pooled


def _example(part: _Segment, length: int) -> dict[str, list[int]]:
    """The segment's first window, and its first gap with a quarter of its length either side."""
    audio = part.audio
    out = {f"window_{k}": v[:length].tolist() for k, v in audio.items() if k != "repaired"}
    if part.gaps:
        a, b = part.gaps[0]
        lo, hi = max(0, a - (b - a) // 4), b + (b - a) // 4
        out["gap_truth"] = audio["truth"][lo:hi].tolist()
        out["gap_repaired"] = audio["repaired"][lo:hi].tolist()
        out["gap_span"] = [a - lo, b - lo]
    return out


@dataclass(frozen=True)
class _Config:
    length: int
    rate: int
    batch: int
    temperature: float
    rng: np.random.Generator
    gaps: int


def restore_sources(
    model: StereoT5,
    codec: Codec,
    segments: list[Segment],
    direction: int,
    fit: TrainFit,
    chunks: int,
    length: int,
    rate: int,
    batch_size: int,
    temperature: float,
    seed: int,
    gaps_per_segment: int = 4,
) -> Restoration:
    """Run the three modes on the first `chunks` chunks of each segment (`direction`: the
    input channel) and score them beside the baselines."""
    rng = np.random.default_rng(seed)
    cfg = _Config(length, rate, batch_size, temperature, rng, gaps_per_segment)
    seconds = {"estimate": 0.0, "noise": 0.0, "repair": 0.0}
    by_source: dict[str, list[_Segment]] = {}
    for segment in segments:
        audio = Segment(segment.source, segment.start, segment.chunks[:chunks]).samples()
        x, y = audio[direction], audio[1 - direction]
        part = _restore_segment(model, codec, x, y, fit, cfg, seconds)
        by_source.setdefault(segment.source, []).append(part)
    per_source = [_source(source, parts) for source, parts in by_source.items()]
    first = next(iter(by_source.values()), [None])[0]
    audio_s = sum(s.frames for s in per_source) / rate
    per_mode = {
        "estimate": seconds["estimate"],
        "render": seconds["estimate"] + seconds["noise"],
        "repair": seconds["estimate"] + seconds["repair"],
    }
    low = [s for s in per_source if s.correlation < CORRELATION_SPLIT]
    high = [s for s in per_source if s.correlation >= CORRELATION_SPLIT]
    return Restoration(
        train=fit,
        chunks_per_segment=chunks,
        temperature=temperature,
        seed=seed,
        per_source=per_source,
        pooled=_pool(per_source),
        pooled_by_correlation={
            f"correlation < {CORRELATION_SPLIT}": _pool(low),
            f"correlation >= {CORRELATION_SPLIT}": _pool(high),
        },
        seconds={k: v / audio_s if audio_s else 0.0 for k, v in per_mode.items()},
        blend=float(model.estimator.blend),
        example=_example(first, length) if first is not None else {},
    )


_COLUMNS = {
    "estimate": "estimate",
    "render": "render",
    "linear_part": "its linear part",
    "copy": "copy",
    "train_gain": "train gain",
    "train_fir": "train FIR",
    "oracle": "FIR per window (bound)",
    "repair": "repair (gaps)",
    "gap_fir": "FIR around gap",
}


def _cells(values: dict[str, float | None]) -> str:
    return " | ".join("-" if values.get(k) is None else f"{values[k]:.2f}" for k in _COLUMNS)


def _blend_text(blend: float) -> str:
    if blend == 0:
        return (
            "The estimate falls back to its linear part: the head's learned correction did not "
            "beat it on the validation split (weight 0)."
        )
    return (
        f"The head's learned correction enters at weight {blend:.2f}, chosen on the "
        "validation split."
    )


def restoration_markdown(r: Restoration, split: str) -> list[str]:
    """The per-source SNR table of the three modes beside the baselines, and its checks."""
    seconds = r.per_source and sum(s.frames for s in r.per_source)
    head = " | ".join(_COLUMNS.values())
    lines = [
        f"Restored target, {split} split, SNR dB (first {r.chunks_per_segment} chunks of each "
        f"segment): the model's estimate, render (T = {r.temperature:g}) and repair beside copy "
        f"input, one gain (g = {r.train.gain:.3f}) and a {FIR_TAPS}-tap two-sided least-squares "
        f"filter fitted on {r.train.chunks} of {r.train.of_chunks} training chunks (seed "
        f"{r.train.seed}); repair's columns are over its gaps only ({GAP_SECONDS[0]:g} to "
        f"{GAP_SECONDS[1]:g} s, drawn with seed {r.seed}), beside the same filter fitted on the "
        "known target around each gap. The linear part is the estimate head's static filter "
        "(the least-squares filter over the training windows it saw); the per-window FIR is "
        "fitted on the answer: an upper bound, not a predictor. " + _blend_text(r.blend),
        "",
        f"| source | corr. | {head} |",
        "|---|---:|" + "---:|" * len(_COLUMNS),
    ]
    for s in r.per_source:
        values = {**s.snr_db, **s.gap_snr_db}
        lines.append(f"| {s.source} | {s.correlation:.2f} | {_cells(values)} |")
    lines.append(f"| **pooled** | | {_cells(r.pooled)} |")
    for group, values in r.pooled_by_correlation.items():
        lines.append(f"| pooled, {group} | | {_cells(values)} |")
    checked = sum(s.level_windows for s in r.per_source)
    within = sum(s.level_within for s in r.per_source)
    worst = [s.level_worst_db for s in r.per_source if s.level_worst_db is not None]
    seams = sum(s.seams for s in r.per_source)
    seams_within = sum(s.seams_within for s in r.per_source)
    clipped = sum(s.clipped for s in r.per_source)
    worst_text = f" (worst {max(worst):.2f} dB)" if worst else ""
    lines += [
        "",
        f"- render's level within {LEVEL_TOLERANCE_DB:g} dB of the truth's: {within} of "
        f"{checked} windows above {LEVEL_FLOOR_DBFS:g} dBFS{worst_text}",
        f"- repair's seams within the truth's 99th-percentile step nearby: {seams_within} of "
        f"{seams}",
        f"- estimate samples at full scale where the truth is not: {clipped} of {seconds}",
        "- seconds per second of audio: "
        + ", ".join(f"{mode} {value:.3f}" for mode, value in r.seconds.items()),
    ]
    return lines

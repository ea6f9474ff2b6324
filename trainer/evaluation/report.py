"""The evaluation report as typed records: `Report.to_json()` is what report.json holds, and the
markdown (report.md), the checks the demo gates on and the picture read its fields. See
docs/evaluation.md for what each figure measures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Generic, TypeVar

from trainer.evaluation.baselines import CoderCost
from trainer.evaluation.restoration import Restoration, restoration_markdown

__all__ = [
    "CODERS",
    "CONTEXTS",
    "REPORT_FORMAT",
    "Bits",
    "Check",
    "CoderRow",
    "CoderRows",
    "Counts",
    "ModelInfo",
    "Report",
    "ReportFiles",
    "RunConfig",
    "SourceBits",
    "TeacherForced",
    "Timing",
    "learning_checks",
    "render_markdown",
]

REPORT_FORMAT = "stereo-eval/3"
T = TypeVar("T")
# what one scoring call sees (docs/evaluation.md): a window of --seq-len, a whole chunk, or a
# chunk of a contiguous run with the head's state carried from the chunk before
CONTEXTS = ("window", "chunk", "run")


@dataclass(frozen=True)
class CoderRows(Generic[T]):
    """One value per lossless coder, each run on the scored samples as per-source segments."""

    flac: T
    wavpack: T
    sac: T


CODERS = tuple(f.name for f in fields(CoderRows))


@dataclass(frozen=True)
class CoderRow:
    """One coder on the scored segments: its sizes pooled and per source, or why it was not
    run (its binary is not on PATH, or it failed)."""

    label: str  # as the tables name it: "WavPack -hhx6"
    command: str
    version: str | None
    skipped: str | None
    cost: CoderCost | None  # pooled over every segment; None when skipped
    per_source: dict[str, CoderCost]


@dataclass(frozen=True)
class Bits:
    """Bits per target sample: the model's teacher-forced cost beside its baselines."""

    model: float
    model_untrained: float | None  # the same head's parameter-free baseline, if it has one
    given_input: CoderRows[float | None]  # each coder's cost of the target given the input
    flac_target_alone: float
    level_entropy: float


@dataclass(frozen=True)
class SourceBits:
    """The bits of one source (track): the model's, its untrained head's and each coder's."""

    source: str
    segments: int
    frames: int
    model: float
    model_untrained: float | None
    given_input: CoderRows[float | None]


@dataclass(frozen=True)
class Check:
    """One check the demo's gate requires, passed by a margin of `by` `unit`."""

    check: str
    by: float
    passed: bool
    unit: str = "bits/sample"


@dataclass(frozen=True)
class ModelInfo:
    head: str
    patch_size: int  # 1: one position per sample; > 1: two-level
    max_len: int
    parameters: int
    train_sample_rate: int | None
    train_sample_rate_source: str
    train_seq_len: int | None
    hparams: dict[str, Any]


@dataclass(frozen=True)
class RunConfig:
    max_chunks: int | None
    context: str  # one of CONTEXTS
    score_len: int  # frames per scoring call: seq_len (window) or chunk_frames (chunk, run)
    generate: int
    temperature: float
    seed: int
    batch_size: int
    seq_len: int  # the window: of scoring under `window`, of restoration always
    train_chunks: int  # the cap on training chunks the restoration's baselines are fitted on
    device: str
    flac_compression_level: float
    fir_taps: int  # of the least-squares baselines, two-sided
    snr_truth: str


@dataclass(frozen=True)
class Counts:
    shards: int
    chunks: int
    chunk_frames: int
    segments: int  # contiguous runs of chunks of one source (what the coders code)
    windows: int  # rows scored: windows (window), chunks (chunk, run)
    samples_scored: int


@dataclass(frozen=True)
class TeacherForced:
    nll_nats: float
    count: int
    accuracy: float
    snr_db: float  # of the teacher-forced argmax against the original int16 target


@dataclass(frozen=True)
class Timing:
    score_s: float
    score_samples_per_s: float | None
    coders_s: float
    restore_s: float


@dataclass(frozen=True)
class ReportFiles:
    json: str
    md: str
    png: str


@dataclass(frozen=True)
class Report:
    """Every figure of one evaluation; field names are report.json's keys."""

    format: str
    ckpt: str
    ckpt_kind: str
    shards: str
    split: str
    codec: str
    codec_exact: bool
    bits_comparable_to_flac: bool  # pcm16 (or linear16, the same tokens)
    direction: str
    sample_rate: int
    model: ModelInfo
    config: RunConfig
    counts: Counts
    bits_per_sample: Bits
    checks: list[Check]
    per_source: list[SourceBits]
    coders: CoderRows[CoderRow]
    teacher_forced: TeacherForced
    restoration: Restoration | None  # None: --generate 0, or a model without an estimate head
    training_curve: str | None
    timing: Timing
    warnings: list[str]
    files: ReportFiles

    def to_json(self) -> dict[str, Any]:
        """What report.json holds (JSON types only: a tuple in the hyperparameters is a list)."""
        return json.loads(self.dumps())

    def dumps(self) -> str:
        """The text of report.json."""
        data = asdict(replace(self, restoration=None))  # not a deep copy of its audio
        if self.restoration is not None:
            data["restoration"] = self.restoration.to_json()
        return json.dumps(data, indent=1) + "\n"


def learning_checks(
    bits: Bits, comparable_to_flac: bool, restoration: Restoration | None
) -> list[Check]:
    """The demo's gate (see docs/evaluation.md), as checks on the teacher-forced bits/sample:
    below FLAC of the target alone (pcm16 only: other codecs' bits are of a lossy signal), and,
    for a head with a parameter-free baseline, below the same head untrained. The logistic
    head's adaptive predictor alone already beats FLAC, so for it only the second check fails a
    model that learned nothing. With a restoration section: the pooled estimate at least as
    good as the least-squares filter fitted on the training split."""
    checks = []
    if restoration is not None:
        pooled = restoration.pooled
        if pooled["estimate"] is not None and pooled["train_fir"] is not None:
            margin = pooled["estimate"] - pooled["train_fir"]
            checks.append(
                Check(
                    "estimate at least as good as the training-split least-squares filter",
                    margin,
                    margin >= 0,
                    "dB",
                )
            )
    if comparable_to_flac:
        margin = bits.flac_target_alone - bits.model
        checks.append(Check("below FLAC of target alone", margin, margin > 0))
    if bits.model_untrained is not None:
        margin = bits.model_untrained - bits.model
        checks.append(Check("below the same head untrained", margin, margin > 0))
    return checks


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _model_kind(model: ModelInfo) -> str:
    patch = model.patch_size
    kind = "per-sample" if patch == 1 else f"patches of {patch}, two-level decoder"
    return f"{kind}, {model.head} head, {model.parameters / 1e6:.2f} M parameters"


def _coder_value(report: Report, key: str, value: float | None) -> str:
    skipped = getattr(report.coders, key).skipped
    return f"skipped: {skipped}" if skipped else _fmt(value, 3)


def _bits_table(report: Report) -> list[str]:
    bits, codec, coders = report.bits_per_sample, report.codec, report.coders
    if report.bits_comparable_to_flac:
        model_row = "model (teacher-forced)"
    else:
        model_row = (
            f"model (teacher-forced; bits of the lossy {codec} signal, not comparable to FLAC)"
        )
    untrained_row = (
        []
        if bits.model_untrained is None
        else [f"| same head untrained (its predictor alone) | {bits.model_untrained:.3f} |"]
    )
    return [
        "| target channel | bits / sample |",
        "|---|---:|",
        f"| {model_row} | {_fmt(bits.model, 3)} |",
        *untrained_row,
        *(
            f"| {getattr(coders, key).label} of target given input "
            f"| {_coder_value(report, key, getattr(bits.given_input, key))} |"
            for key in CODERS
        ),
        f"| {coders.flac.label} of target alone | {_fmt(bits.flac_target_alone, 3)} |",
        f"| level entropy of target ({codec}) | {_fmt(bits.level_entropy, 3)} |",
    ]


def _source_table(report: Report) -> list[str]:
    """Bits per sample per source (track), then pooled: the model beside each coder."""
    bits, counts = report.bits_per_sample, report.counts
    labels = [getattr(report.coders, key).label for key in CODERS]
    rows = [
        (s.source, s.frames, s.segments, s.model, s.model_untrained, s.given_input)
        for s in report.per_source
    ]
    pooled = (bits.model, bits.model_untrained, bits.given_input)
    rows.append(("all (pooled)", counts.samples_scored, counts.segments, *pooled))
    return [
        f"| source | frames | segments | model | untrained | {' | '.join(labels)} |",
        f"|---|---:|---:|---:|---:|{'---:|' * len(labels)}",
        *(
            f"| {source} | {frames} | {segments} | {_fmt(model, 3)} | {_fmt(untrained, 3)} | "
            + " | ".join(_fmt(getattr(given, key), 3) for key in CODERS)
            + " |"
            for source, frames, segments, model, untrained, given in rows
        ),
    ]


def _context(report: Report) -> str:
    cfg, counts = report.config, report.counts
    if cfg.context == "window":
        return f"context window: windows of {cfg.seq_len}, each scored on its own"
    if cfg.context == "chunk":
        return f"context chunk: each chunk of {counts.chunk_frames} scored whole in one call"
    return (
        f"context run: {counts.segments} contiguous runs of one source's chunks, scored chunk "
        "after chunk with the head's state carried"
    )


def _coders_note(report: Report) -> str:
    level = report.config.flac_compression_level
    versions = "; ".join(
        f"{row.label}: {row.version or 'version unknown'}"
        for row in (getattr(report.coders, key) for key in CODERS)
        if not row.skipped
    )
    return (
        f"Coders: on exactly the scored samples, as {report.counts.segments} contiguous "
        "per-source segments, never chunk by chunk. A coder's cost of the target given the "
        "input is (its stereo file - its file of the input alone) x 8 / frames, which slightly "
        "favours coders that also predict the input from the target's past. FLAC: libsndfile "
        f"compression level {level:g} (FLAC preset {round(8 * level)}). {versions}."
    )


def render_markdown(report: Report) -> str:
    """The tables of report.md, readable in ten seconds: bits, bits per source, restoration."""
    counts = report.counts
    lines = [
        f"# Evaluation: {report.split} split",
        "",
        f"- checkpoint: `{report.ckpt}` ({_model_kind(report.model)})",
        f"- shards: `{report.shards}`",
        f"- codec {report.codec}, direction {report.direction}, {report.sample_rate} Hz, "
        f"{counts.chunks} chunks x {counts.chunk_frames} frames "
        f"({counts.samples_scored} target samples scored)",
        f"- {_context(report)}",
        "",
        *_bits_table(report),
        "",
        *(
            f"- model {c.check}: {'yes' if c.passed else 'NO'}, by {c.by:.3f} {c.unit}"
            for c in report.checks
        ),
        *([""] if report.checks else []),
        *_source_table(report),
        "",
        *(restoration_markdown(report.restoration, report.split) if report.restoration else []),
        "",
        _coders_note(report),
    ]
    lines += [f"\nwarning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"

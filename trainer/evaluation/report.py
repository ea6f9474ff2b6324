"""The evaluation report as typed records: `Report.to_json()` is what report.json holds, and the
markdown (report.md), the checks the demo gates on and the picture read its fields. See
docs/evaluation.md for what each figure measures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Generic, TypeVar

from trainer.evaluation.baselines import FlacCost

__all__ = [
    "METHODS",
    "REPORT_FORMAT",
    "Bits",
    "Check",
    "Counts",
    "GeneratedWindow",
    "ModelInfo",
    "Report",
    "ReportFiles",
    "RunConfig",
    "SnrRows",
    "TeacherForced",
    "Timing",
    "learning_checks",
    "render_markdown",
]

REPORT_FORMAT = "stereo-eval/1"
T = TypeVar("T")


@dataclass(frozen=True)
class Bits:
    """Bits per target sample: the model's teacher-forced cost beside its baselines."""

    model: float
    model_untrained: float | None  # the same head's parameter-free baseline, if it has one
    flac_given_input: float
    flac_target_alone: float
    level_entropy: float


@dataclass(frozen=True)
class Check:
    """One check the demo's gate requires: `by` is the margin in bits per sample."""

    check: str
    by: float
    passed: bool


@dataclass(frozen=True)
class SnrRows(Generic[T]):
    """One value per way of predicting the target channel of the generated windows."""

    model_greedy: T
    model_sampled: T
    copy: T
    best_gain: T
    ls_fir: T
    codec_round_trip: T


METHODS = tuple(f.name for f in fields(SnrRows))


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
    generate: int
    temperature: float
    seed: int
    batch_size: int
    seq_len: int
    device: str
    flac_compression_level: float
    fir_taps: int
    fir_causal: bool
    snr_truth: str


@dataclass(frozen=True)
class Counts:
    shards: int
    chunks: int
    chunk_frames: int
    windows: int
    samples_scored: int
    generated_windows: int
    generated_samples: int


@dataclass(frozen=True)
class TeacherForced:
    nll_nats: float
    count: int
    accuracy: float
    snr_db: float  # of the teacher-forced argmax against the original int16 target


@dataclass(frozen=True)
class GeneratedWindow:
    source: str
    start: int


@dataclass(frozen=True)
class Timing:
    score_s: float
    score_samples_per_s: float | None
    generate_s: float
    generate_samples_per_s: float | None


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
    teacher_forced: TeacherForced
    flac: FlacCost
    snr_db: SnrRows[float | None]
    snr_db_per_window: SnrRows[list[float]]
    best_gains: list[float]
    generated_windows: list[GeneratedWindow]
    training_curve: str | None
    timing: Timing
    warnings: list[str]
    files: ReportFiles

    def to_json(self) -> dict[str, Any]:
        """What report.json holds (JSON types only: a tuple in the hyperparameters is a list)."""
        return json.loads(self.dumps())

    def dumps(self) -> str:
        """The text of report.json."""
        return json.dumps(asdict(self), indent=1) + "\n"


def learning_checks(bits: Bits, comparable_to_flac: bool) -> list[Check]:
    """The demo's gate (see docs/evaluation.md), as checks on the teacher-forced bits/sample:
    below FLAC of the target alone (pcm16 only: other codecs' bits are of a lossy signal), and,
    for a head with a parameter-free baseline, below the same head untrained. The logistic
    head's adaptive predictor alone already beats FLAC, so for it only the second check fails a
    model that learned nothing."""
    checks = []
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


def _bits_table(report: Report) -> list[str]:
    bits, codec = report.bits_per_sample, report.codec
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
        f"| FLAC of target given input | {_fmt(bits.flac_given_input, 3)} |",
        f"| FLAC of target alone | {_fmt(bits.flac_target_alone, 3)} |",
        f"| level entropy of target ({codec}) | {_fmt(bits.level_entropy, 3)} |",
    ]


def _snr_table(report: Report) -> list[str]:
    snr, cfg = report.snr_db, report.config
    side = "two-sided" if not cfg.fir_causal else "causal"
    lines = [
        f"| generated target, {report.counts.generated_windows} windows x {cfg.seq_len} | SNR dB |",
        "|---|---:|",
        f"| model greedy | {_fmt(snr.model_greedy, 2)} |",
        f"| model sampled (T = {cfg.temperature:g}) | {_fmt(snr.model_sampled, 2)} |",
        f"| copy input | {_fmt(snr.copy, 2)} |",
        f"| best gain | {_fmt(snr.best_gain, 2)} |",
        f"| LS FIR, {cfg.fir_taps} taps {side}, fitted per window (oracle) "
        f"| {_fmt(snr.ls_fir, 2)} |",
    ]
    if not report.codec_exact:
        lines.append(
            f"| {report.codec} round trip of the truth (ceiling) "
            f"| {_fmt(snr.codec_round_trip, 2)} |"
        )
    return lines


def render_markdown(report: Report) -> str:
    """The two tables of report.md, readable in ten seconds."""
    counts, cfg = report.counts, report.config
    level = cfg.flac_compression_level
    lines = [
        f"# Evaluation: {report.split} split",
        "",
        f"- checkpoint: `{report.ckpt}` ({_model_kind(report.model)})",
        f"- shards: `{report.shards}`",
        f"- codec {report.codec}, direction {report.direction}, {report.sample_rate} Hz, "
        f"{counts.chunks} chunks x {counts.chunk_frames} frames "
        f"({counts.samples_scored} target samples scored), windows of {cfg.seq_len}",
        "",
        *_bits_table(report),
        "",
        *(
            f"- model {c.check}: {'yes' if c.passed else 'NO'}, by {c.by:.3f} bits/sample"
            for c in report.checks
        ),
        *([""] if report.checks else []),
        *_snr_table(report),
        "",
        f"FLAC: whole chunks, libsndfile compression level {level:g} (FLAC preset "
        f"{round(8 * level)}). SNR: against the original 16-bit target, energies summed over "
        "windows.",
    ]
    lines += [f"\nwarning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"

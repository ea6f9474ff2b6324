"""The report's figures from a scored split and the coders' rows: bits per sample pooled and
per source, counts, the teacher-forced figures, timing, what the model is (see
docs/evaluation.md)."""

from __future__ import annotations

import math

from trainer.data.eval_stream import EvalStream
from trainer.evaluation.baselines import level_entropy, snr_from_energies
from trainer.evaluation.loading import LoadedModel
from trainer.evaluation.report import (
    CODERS,
    Bits,
    CoderRow,
    CoderRows,
    Counts,
    ModelInfo,
    SourceBits,
    TeacherForced,
    Timing,
)
from trainer.evaluation.scoring import SourceSums, SplitScore, Sums

__all__ = ["bits", "counts", "model_info", "per_source", "teacher_forced", "timing"]

LN2 = math.log(2.0)


def model_info(loaded: LoadedModel) -> ModelInfo:
    model = loaded.model
    return ModelInfo(
        head=model.head_kind,
        patch_size=model.patch_size,
        max_len=loaded.max_len,
        parameters=sum(p.numel() for p in model.parameters()),
        train_sample_rate=loaded.sample_rate,
        train_sample_rate_source=loaded.sample_rate_source,
        train_seq_len=loaded.train_seq_len,
        hparams={k: v for k, v in model.hparams.items() if not k.startswith("_")},
    )


def _per_sample(nats: float, count: int) -> float:
    return nats / max(count, 1) / LN2


def _untrained(sums: Sums | SourceSums) -> float | None:
    """The untrained head's bits per sample; None without that baseline."""
    return None if sums.untrained_nll is None else _per_sample(sums.untrained_nll, sums.count)


def _given_input(coders: CoderRows[CoderRow], source: str | None) -> CoderRows[float | None]:
    """Each coder's bits given the input, pooled (`source` None) or of one source."""
    rows: dict[str, float | None] = {}
    for key in CODERS:
        row = getattr(coders, key)
        cost = row.cost if source is None else row.per_source.get(source)
        rows[key] = None if cost is None else cost.given_input
    return CoderRows(**rows)


def bits(scored: SplitScore, coders: CoderRows[CoderRow]) -> Bits:
    sums, flac = scored.sums, coders.flac.cost
    assert flac is not None and flac.alone is not None, "FLAC is never skipped"
    return Bits(
        model=_per_sample(sums.nll, sums.count),
        model_untrained=_untrained(sums),
        given_input=_given_input(coders, None),
        flac_target_alone=flac.alone,
        level_entropy=level_entropy(sums.levels.numpy()),
    )


def per_source(scored: SplitScore, coders: CoderRows[CoderRow]) -> list[SourceBits]:
    """One row per source (track), sorted by name."""
    rows = []
    for source, sums in sorted(scored.sums.per_source.items()):
        rows.append(
            SourceBits(
                source=source,
                segments=sum(s.source == source for s in scored.segments),
                frames=sums.count,
                model=_per_sample(sums.nll, sums.count),
                model_untrained=_untrained(sums),
                given_input=_given_input(coders, source),
            )
        )
    return rows


def counts(stream: EvalStream, scored: SplitScore) -> Counts:
    return Counts(
        shards=len(stream.split.samples),
        chunks=scored.chunks,
        chunk_frames=stream.split.chunk_frames,
        segments=len(scored.segments),
        windows=scored.windows,
        samples_scored=scored.sums.count,
    )


def teacher_forced(scored: SplitScore) -> TeacherForced:
    sums = scored.sums
    return TeacherForced(
        nll_nats=sums.nll,
        count=sums.count,
        accuracy=sums.correct / max(sums.count, 1),
        snr_db=snr_from_energies(sums.tf_signal, sums.tf_error),
    )


def timing(scored: SplitScore, coders_s: float, restore_s: float) -> Timing:
    return Timing(
        score_s=scored.seconds,
        score_samples_per_s=scored.sums.count / scored.seconds if scored.seconds else None,
        coders_s=coders_s,
        restore_s=restore_s,
    )

"""`python -m trainer evaluate`: a checkpoint on a shard split, beside baselines (see
docs/evaluation.md).

Two measures of one target channel (the right one for l2r), each next to what a signal-processing
baseline achieves on the same audio:

- Teacher-forced bits per sample over every frame of the split's chunks, scored once
  (`scoring`; `--context window|chunk|run`: windows, whole chunks, or runs of chunks with the
  head's state carried, `runs`), as exact sums, pooled and per source: NLL / count / ln 2.
  Beside it, on exactly the scored samples as contiguous per-source segments (`segments`,
  `coders`): FLAC -8, WavPack -hhx6 and Sac --normal's cost of the target given the input
  ((stereo file - file of the input) x 8 / frames; a missing coder is a skipped row), FLAC of
  the target alone, and the entropy of the target's codec levels. Under mulaw/linear codecs the
  model's bits are those of a lossy signal and are labelled so.
- The restored target (`restoration`): the model's estimate, render and repair of each
  source (its first N chunks per segment) against the original int16 target, per source and
  pooled, beside copy input, a gain and a 32-tap least-squares filter fitted on a seeded sample
  of training chunks, the filter fitted around each repaired gap, and the filter fitted on each
  window itself (an oracle bound, not a deployable predictor).

Writes `report.json` (every figure), `report.md` (small tables) and `report.png`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.codec import Codec
from pipeline.errors import run_cli
from pipeline.fsutil import atomic_write_text, check_writable
from pipeline.records import SPLITS, Manifest
from trainer.data import ShardDataModule
from trainer.data.batch import DIRECTIONS
from trainer.data.eval_stream import EvalStream
from trainer.data.shards import ShardSplit
from trainer.evaluation import EvaluationError, summary
from trainer.evaluation.baselines import FLAC_COMPRESSION_LEVEL
from trainer.evaluation.coders import measure_coders
from trainer.evaluation.curve import find_metrics_csv, read_curve
from trainer.evaluation.loading import (
    LoadedModel,
    add_runtime_options,
    apply_runtime_options,
    load_model,
    resolve_seq_len,
)
from trainer.evaluation.plot import plot_report
from trainer.evaluation.report import (
    CONTEXTS,
    REPORT_FORMAT,
    Report,
    ReportFiles,
    RunConfig,
    learning_checks,
    render_markdown,
)
from trainer.evaluation.restoration import FIR_TAPS, Restoration, fit_on_train, restore_sources
from trainer.evaluation.runs import score_runs
from trainer.evaluation.scoring import SplitScore, limit_chunks, score_split
from trainer.model import StereoT5

__all__ = ["default_out", "evaluate", "main"]


def default_out(ckpt: str | Path, split: str) -> Path:
    """`<folder holding the checkpoint>/eval-<split>`: beside a .ckpt, and beside an export
    folder rather than inside it (save_pretrained replaces that folder as a whole)."""
    return Path(ckpt).parent / f"eval-{split}"


def _check_arguments(
    split: str,
    direction: str,
    context: str,
    max_chunks: int | None,
    generate: int,
    batch_size: int,
    train_chunks: int,
) -> None:
    if split not in SPLITS:
        raise EvaluationError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    if direction not in DIRECTIONS:
        raise EvaluationError(f"direction {direction!r}: evaluate takes l2r or r2l")
    if context not in CONTEXTS:
        raise EvaluationError(f"context {context!r}: use one of {', '.join(CONTEXTS)}")
    if max_chunks is not None and max_chunks < 1:
        raise EvaluationError(f"max_chunks must be >= 1, got {max_chunks}")
    if generate < 0 or batch_size < 1 or train_chunks < 1:
        raise EvaluationError("generate must be >= 0, batch_size and train_chunks >= 1")


def _check_context(loaded: LoadedModel, context: str, chunk_frames: int) -> None:
    """Refuse, before any scoring, a context the model cannot score: `run` without a state to
    carry, and whole chunks through a body that would attend over all of one (its attention is
    O(L^2): a 32768-frame chunk takes tens of GB) beyond the max_len it was built for."""
    model = loaded.model
    if context == "run" and not model.carries_state:
        raise EvaluationError(
            f"{loaded.path}: --context run carries the head's state from chunk to chunk and "
            f"this model's {model.head_kind} head carries none: use --context window or chunk"
        )
    span = model.body_window or chunk_frames  # what the body attends over at once
    if context != "window" and span > loaded.max_len:
        raise EvaluationError(
            f"{loaded.path}: --context {context} scores whole chunks of {chunk_frames} frames "
            f"through a body that attends over {span} at once (body_window "
            f"{model.body_window}), above its max_len {loaded.max_len}: use --context window, "
            f"or a model trained with --model.body_window {loaded.max_len} or less"
        )


def _data(
    shards: str | Path, length: int, batch_size: int, codec: str, direction: str
) -> ShardDataModule:
    return ShardDataModule(
        str(shards),
        seq_len=length,
        batch_size=batch_size,
        num_workers=0,
        codec=codec,
        direction=direction,
        return_meta=True,
    )


def _stream(
    shards: str | Path,
    split: str,
    length: int,
    batch_size: int,
    codec: str,
    direction: str,
    max_chunks: int | None,
) -> EvalStream:
    """The split's eval stream on one rank, cut to its first `max_chunks` chunks."""
    data = _data(shards, length, batch_size, codec, direction)
    full = data.eval_stream(split, rank=0, world_size=1).split
    samples = limit_chunks(full.samples, max_chunks)
    return EvalStream(
        ShardSplit(full.urls[: len(samples)], samples, full.chunk_frames),
        length,
        batch_size,
        direction,
        return_meta=True,
    )


def _score(
    model: StereoT5,
    stream: EvalStream,
    codec: Codec,
    context: str,
    direction: int,
    progress: bool,
) -> SplitScore:
    """The teacher-forced pass under `context` (the stream's windows are whole chunks unless
    `window`; `run` reads the stream's chunks itself)."""
    if context == "run":
        return score_runs(model, stream.split, codec, direction, stream.batch_size, progress)
    return score_split(model, stream, codec, direction, progress)


def _restore(
    loaded: LoadedModel,
    shards: str | Path,
    scored: SplitScore,
    direction: str,
    options: dict,
    warnings: list[str],
) -> Restoration | None:
    """The restoration section, or None (and why, in `warnings`) when it is not run."""
    model, codec = loaded.model, loaded.codec
    if not options["generate"]:
        return None
    if model.estimator is None:
        warnings.append(
            "no restoration section: the model has no estimate head (train with `estimate:` "
            "under `model:`)"
        )
        return None
    data = _data(shards, options["length"], options["batch_size"], codec.name, direction)
    train = data.eval_stream("train", rank=0, world_size=1).split
    d = DIRECTIONS[direction]
    fit = fit_on_train(train, d, options["train_chunks"], options["seed"])
    return restore_sources(
        model, codec, scored.segments, d, fit, options["generate"], options["length"],
        options["rate"], options["batch_size"], options["temperature"], options["seed"],
    )  # fmt: skip


def evaluate(
    ckpt: str | Path,
    shards: str | Path,
    split: str = "test",
    context: str = "window",
    max_chunks: int | None = None,
    generate: int = 8,
    out: str | Path | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    train_chunks: int = 256,
    seq_len: int | None = None,
    direction: str = "l2r",
    codec: str | None = None,
    device: str | None = None,
    progress: bool = True,
    gate: bool = False,
) -> Report:
    """Evaluate a checkpoint on a split of a shard set and write report.{json,md,png}.

    Args:
        ckpt: a Lightning ``.ckpt`` of StereoT5 or a ``save_pretrained`` folder.
        shards: a shard set's folder or its manifest.json.
        split: ``train``, ``val`` or ``test``.
        context: what one scoring call sees: ``window`` (windows of ``seq_len``), ``chunk``
            (a whole chunk) or ``run`` (a chunk, the head's state carried from the chunk
            before in the same source; refused for a head that carries none).
        max_chunks: score only the first N chunks of the split (manifest order); all if None.
        generate: chunks of each scored segment that the three restoration modes run on (0:
            no restoration section).
        out: output folder (default ``<checkpoint's folder>/eval-<split>``).
        temperature: render's.
        seed: of render's noise, of the repaired gaps and of the training chunks drawn.
        batch_size: windows per forward pass (scoring and restoration).
        train_chunks: at most this many training chunks fit the restoration's baselines.
        seq_len: window length of scoring under ``window`` and of restoration (default: the
            training window, at most max_len and a chunk).
        direction: ``l2r`` (target = right) or ``r2l``.
        codec: only checked: it must be the checkpoint's codec.
        device: torch device (default: cuda if available, else cpu).
        gate: only checked: the caller gates on the report's checks, which need a pcm16
            checkpoint (refused before any scoring otherwise).

    Returns:
        The report; ``report.to_json()`` is what report.json holds.

    Raises:
        UserError (EvaluationError, ModelError, DiskError, ...): bad arguments, missing or
            unreadable shards or checkpoint, a codec or window the checkpoint was not built
            for, an output folder that takes no file (checked before scoring) or a full disk.
    """
    _check_arguments(split, direction, context, max_chunks, generate, batch_size, train_chunks)
    if not Path(shards).exists():
        raise EvaluationError(
            f"{shards}: missing: no such shard set; pass the folder `python -m pipeline shard` "
            "wrote (or its manifest.json)"
        )
    manifest = Manifest.load(Path(shards))
    chunk_frames = manifest.config.chunk_frames
    loaded = load_model(ckpt, device)
    out_dir = Path(out) if out is not None else default_out(loaded.path, split)
    check_writable(out_dir)  # now, not after the scoring
    model, model_codec = loaded.model, loaded.codec
    length = resolve_seq_len(loaded, seq_len, codec, chunk_frames)
    if gate and not model_codec.exact:
        raise EvaluationError(
            f"{ckpt}: the gate compares bits with FLAC, which needs a pcm16 checkpoint, not "
            f"{model_codec.name}: drop --gate"
        )
    _check_context(loaded, context, chunk_frames)
    warnings = []
    rate = int(manifest.config.sample_rate)
    if loaded.sample_rate is not None and loaded.sample_rate != rate:
        warnings.append(
            f"the model was trained on {loaded.sample_rate} Hz shards, these are {rate} Hz"
        )
    score_len = length if context == "window" else chunk_frames
    stream = _stream(shards, split, score_len, batch_size, model_codec.name, direction, max_chunks)
    d = DIRECTIONS[direction]
    scored = _score(model, stream, model_codec, context, d, progress)
    started = time.perf_counter()
    coders = measure_coders(scored.segments, rate, d)
    coders_s = time.perf_counter() - started
    started = time.perf_counter()
    options = dict(generate=generate, length=length, batch_size=batch_size, rate=rate,
                   train_chunks=train_chunks, seed=seed, temperature=temperature)  # fmt: skip
    restoration = _restore(loaded, shards, scored, direction, options, warnings)
    restore_s = time.perf_counter() - started
    metrics_csv = find_metrics_csv(loaded.path)
    exact = model_codec.exact
    bits = summary.bits(scored, coders)
    files = ReportFiles(*(str(out_dir / f"report.{name}") for name in ("json", "md", "png")))
    report = Report(
        format=REPORT_FORMAT,
        ckpt=str(loaded.path),
        ckpt_kind=loaded.kind,
        shards=str(shards),
        split=split,
        codec=model_codec.name,
        codec_exact=exact,
        bits_comparable_to_flac=exact,
        direction=direction,
        sample_rate=rate,
        model=summary.model_info(loaded),
        config=RunConfig(
            max_chunks=max_chunks,
            context=context,
            score_len=score_len,
            generate=generate,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            seq_len=length,
            train_chunks=train_chunks,
            device=str(next(model.parameters()).device),
            flac_compression_level=FLAC_COMPRESSION_LEVEL,
            fir_taps=FIR_TAPS,
            snr_truth="original int16 target",
        ),
        counts=summary.counts(stream, scored),
        bits_per_sample=bits,
        checks=learning_checks(bits, exact, restoration),
        per_source=summary.per_source(scored, coders),
        coders=coders,
        teacher_forced=summary.teacher_forced(scored),
        restoration=restoration,
        training_curve=str(metrics_csv) if metrics_csv else None,
        timing=summary.timing(scored, coders_s, restore_s),
        warnings=warnings,
        files=files,
    )
    atomic_write_text(Path(files.json), report.dumps())
    atomic_write_text(Path(files.md), render_markdown(report))
    curve = read_curve(metrics_csv) if metrics_csv else {}
    plot_report(report, curve, Path(files.png))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer evaluate",
        description="Teacher-forced bits/sample and generated SNR of a checkpoint on a shard "
        "split, beside FLAC and signal baselines; writes report.json, report.md, report.png.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or save_pretrained folder")
    parser.add_argument("--shards", required=True, help="shard set folder (or its manifest.json)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument(
        "--context",
        default="window",
        choices=CONTEXTS,
        help="what one scoring call sees: a window of --seq-len, a whole chunk, or a chunk with "
        "the head's state carried from the one before in its source (default: window)",
    )
    parser.add_argument("--max-chunks", type=int, default=None, help="first N chunks only")
    parser.add_argument(
        "--generate",
        type=int,
        default=8,
        help="chunks of each scored segment the restoration modes run on (0: none)",
    )
    parser.add_argument(
        "--train-chunks", type=int, default=256, help="cap on training chunks for the baselines"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: <ckpt dir>/eval-SPLIT)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="render's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the training window")
    parser.add_argument("--direction", default="l2r", choices=("l2r", "r2l"))
    parser.add_argument("--codec", default=None, help="must match the checkpoint's codec")
    parser.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 unless the model passes every check (the demo's gate; pcm16 only)",
    )
    add_runtime_options(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    apply_runtime_options(args)
    report = evaluate(
        args.ckpt,
        args.shards,
        split=args.split,
        context=args.context,
        max_chunks=args.max_chunks,
        generate=args.generate,
        out=args.out,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        train_chunks=args.train_chunks,
        seq_len=args.seq_len,
        direction=args.direction,
        codec=args.codec,
        device=args.device,
        progress=not args.no_progress,
        gate=args.gate,
    )
    print(render_markdown(report))
    print(f"report: {report.files.md} (+ report.json, report.png)")
    if not args.gate:
        return 0
    failed = [c.check for c in report.checks if not c.passed]
    if failed:
        print(f"gate: failed: the model is not {' and not '.join(failed)}", file=sys.stderr)
        return 1
    print(f"gate: passed ({len(report.checks)} checks)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer evaluate --ckpt C --shards DIR [--split test] ...`; returns the exit
    code (1: the gate failed; 2: a user error, printed as one `error:` line)."""
    args = _parser().parse_args(argv)
    return run_cli(lambda: _run(args))

"""`python -m trainer evaluate`: a checkpoint on a shard split, beside baselines (design §8, §10).

Two measures of one target channel (the right one for l2r), each next to what a signal-processing
baseline achieves on the same audio:

- Teacher-forced bits per sample over every frame of the split's chunks, scored once (the
  EvalStream's windows and masks), as exact sums: NLL / count / ln 2. Beside it, on the same
  whole chunks (§10): FLAC's cost of the target given the input ((stereo FLAC - mono FLAC of the
  input) x 8 / frames), FLAC of the target alone, and the entropy of the target's codec levels.
  Under mulaw/linear codecs the model's bits are those of a lossy signal and are labelled so.
- Generated SNR: N windows spread evenly over the split, decoded autoregressively (greedy and
  sampled), against the original int16 target; beside it copy-input, best-gain and a 32-tap
  least-squares FIR fitted on each window itself (an oracle bound, not a deployable predictor).

Writes `report.json` (every figure), `report.md` (two small tables) and `report.png`
(`trainer.report`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.codec import Codec, pcm16_to_int16
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_text
from pipeline.records import SPLITS, Manifest
from trainer.baselines import (
    FLAC_COMPRESSION_LEVEL,
    FlacCost,
    best_gain,
    fir_apply,
    flac_bits,
    level_entropy,
    ls_fir,
    snr_from_energies,
    to_int16,
)
from trainer.checkpoint import (
    add_runtime_options,
    apply_runtime_options,
    load_model,
    resolve_seq_len,
)
from trainer.data import DIRECTIONS, IGNORE, EvalStream, ShardDataModule, ShardSplit, tokenize
from trainer.model import StereoT5
from trainer.report import (
    find_metrics_csv,
    learning_checks,
    plot_report,
    read_curve,
    render_markdown,
)

__all__ = ["evaluate", "generate_windows", "main"]

REPORT_FORMAT = "stereo-eval/1"
FIR_TAPS = 32
FIR_CAUSAL = False  # two-sided: the model's encoder sees the whole input window too
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Scoring pass


@dataclass
class _Scored:
    nll: float
    untrained_nll: float | None  # the logistic head at step 0 (its predictor alone); else None
    count: int
    correct: int
    tf_signal: float
    tf_error: float
    levels: np.ndarray  # histogram of target tokens
    flac: FlacCost
    chunks: int
    windows: int
    picked: list[np.ndarray]  # uint16 [2, L] windows to generate
    picked_meta: list[tuple[str, int]]
    seconds: float


def _limit(samples: list[int], max_chunks: int | None) -> list[int]:
    """Per-shard sample counts cut to the first `max_chunks` chunks in manifest order."""
    if max_chunks is None:
        return list(samples)
    out, left = [], max_chunks
    for n in samples:
        take = min(n, left)
        if take == 0:
            break
        out.append(take)
        left -= take
    return out


def _score(
    model: StereoT5,
    stream: EvalStream,
    codec: Codec,
    sample_rate: int,
    direction: int,
    generate: int,
    progress: bool,
) -> _Scored:
    device = next(model.parameters()).device
    per_chunk, length = len(stream.starts), stream.seq_len
    total_windows = sum(stream.split.samples) * per_chunk
    picks = min(generate, total_windows)
    pick = set(np.linspace(0, total_windows - 1, picks).round().astype(int).tolist())
    nll = tf_signal = tf_error = 0.0
    untrained_nll = 0.0 if model.head_kind == "logistic" else None
    count = correct = window = chunks = 0
    hist = torch.zeros(codec.levels, dtype=torch.int64)
    flac = FlacCost(0, 0, 0, 0)
    chunk = np.zeros((2, stream.split.chunk_frames), np.uint16)
    picked: list[np.ndarray] = []
    picked_meta: list[tuple[str, int]] = []
    int16_of_token = torch.as_tensor(codec.decode_table().astype(np.int64) - 32768)
    start_time = time.perf_counter()
    bar = tqdm(total=len(stream), desc="score", unit="batch", disable=not progress)
    with torch.inference_mode():
        for raw in stream:
            bar.update(1)
            real = raw["mask"].any(axis=1)
            if not real.any():
                continue  # a padding batch (only under several ranks or workers)
            batch = tokenize(raw, codec)
            labels = batch["labels"]
            scored = model.score(batch["input_ids"].to(device), labels.to(device))
            nll += float(scored["nll_sum"])
            if untrained_nll is not None:
                untrained_nll += float(scored["untrained_nll_sum"])
            count += int(scored["count"])
            keep = labels != IGNORE
            correct += int(scored["correct"])
            hist += torch.bincount(labels[keep], minlength=codec.levels)
            # teacher-forced argmax against the original int16 target (not its codec round trip)
            # the channel task's stereo windows again: input channel `direction`, target other
            windows = np.stack([raw["inputs"], raw["targets"]], axis=1)[
                :, [direction, 1 - direction]
            ]
            target = torch.from_numpy(pcm16_to_int16(raw["targets"])).double()
            pred = int16_of_token[scored["pred"].cpu()].double()
            tf_signal += float(torch.where(keep, target.square(), 0.0).sum())
            tf_error += float(torch.where(keep, (target - pred).square(), 0.0).sum())
            for row in np.flatnonzero(real):
                k = window % per_chunk
                start = int(stream.starts[k])
                chunk[:, start : start + length] = windows[row]
                if k == per_chunk - 1:  # the chunk is whole again: FLAC on the whole chunk
                    flac = flac + flac_bits(pcm16_to_int16(chunk), sample_rate, direction)
                    chunks += 1
                if window in pick:
                    picked.append(windows[row].copy())
                    picked_meta.append(tuple(raw["meta"][row]))
                window += 1
    bar.close()
    assert count == chunks * stream.split.chunk_frames, "every frame of every chunk is scored once"
    return _Scored(
        nll,
        untrained_nll,
        count,
        correct,
        tf_signal,
        tf_error,
        hist.numpy(),
        flac,
        chunks,
        window,
        picked,
        picked_meta,
        time.perf_counter() - start_time,
    )


# ---------------------------------------------------------------------------------------------
# Generation and signal baselines


def generate_windows(
    model: StereoT5,
    inputs: np.ndarray,
    codec: Codec,
    batch_size: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """uint16 input-channel windows [N, L] -> int16 generated target [N, L], `batch_size`
    windows per `StereoT5.generate` call (greedy at temperature 0)."""
    device = next(model.parameters()).device
    out = []
    for first in range(0, len(inputs), batch_size):
        ids = torch.from_numpy(codec.encode(inputs[first : first + batch_size])).to(device)
        tokens, _ = model.generate(ids, temperature=temperature, generator=generator)
        out.append(pcm16_to_int16(codec.decode(tokens.cpu().numpy())))
    return np.concatenate(out) if out else np.zeros((0, inputs.shape[-1]), np.int16)


def _energy(x: np.ndarray) -> float:
    return float(np.square(np.asarray(x, dtype=np.float64)).sum())


def _snr_rows(truth: np.ndarray, preds: dict[str, np.ndarray | None]) -> tuple[dict, dict]:
    """Aggregate SNR (ratio of energy sums over windows) and per-window SNR per method."""
    total, per_window = {}, {}
    signal = [_energy(t) for t in truth]
    for name, pred in preds.items():
        if pred is None:
            total[name], per_window[name] = None, []
            continue
        errors = [_energy(t.astype(np.float64) - p) for t, p in zip(truth, pred, strict=True)]
        total[name] = snr_from_energies(sum(signal), sum(errors))
        per_window[name] = [snr_from_energies(s, e) for s, e in zip(signal, errors, strict=True)]
    return total, per_window


METHODS = ("model_greedy", "model_sampled", "copy", "best_gain", "ls_fir", "codec_round_trip")


def _generated(
    model: StereoT5,
    windows: list[np.ndarray],
    codec: Codec,
    direction: int,
    batch_size: int,
    temperature: float,
    seed: int,
) -> dict:
    """Generate the target of each window (greedy, and sampled when temperature > 0) and score
    it and the signal baselines against the original int16 target."""
    if not windows:
        return {
            "snr_db": dict.fromkeys(METHODS),
            "per_window": {name: [] for name in METHODS},
            "gains": [],
            "seconds": 0.0,
            "samples_per_s": None,
            "example": None,
        }
    stack = np.stack(windows)
    inputs_u16, target_u16 = stack[:, direction], stack[:, 1 - direction]
    x, truth = pcm16_to_int16(inputs_u16), pcm16_to_int16(target_u16)
    start = time.perf_counter()
    greedy = generate_windows(model, inputs_u16, codec, batch_size, 0.0, None)
    sampled = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        sampled = generate_windows(model, inputs_u16, codec, batch_size, temperature, generator)
    seconds = time.perf_counter() - start
    gains = [best_gain(a, b) for a, b in zip(x, truth, strict=True)]
    fir = [
        fir_apply(a, ls_fir(a, b, FIR_TAPS, FIR_CAUSAL), FIR_CAUSAL)
        for a, b in zip(x, truth, strict=True)
    ]
    preds = {
        "model_greedy": greedy,
        "model_sampled": sampled,
        "copy": x,
        "best_gain": to_int16(np.asarray(gains)[:, None] * x),
        "ls_fir": to_int16(np.stack(fir)),
        "codec_round_trip": pcm16_to_int16(codec.decode(codec.encode(target_u16))),
    }
    total, per_window = _snr_rows(truth, preds)
    generated = greedy.size + (sampled.size if sampled is not None else 0)
    return {
        "snr_db": total,
        "per_window": per_window,
        "gains": gains,
        "seconds": seconds,
        "samples_per_s": generated / seconds if seconds > 0 else None,
        "example": {"input": x[0], "truth": truth[0], "greedy": greedy[0]},
    }


# ---------------------------------------------------------------------------------------------
# The evaluation


def default_out(ckpt: str | Path, split: str) -> Path:
    """`<folder holding the checkpoint>/eval-<split>`: beside a .ckpt, and beside an export
    folder rather than inside it (save_pretrained replaces that folder as a whole)."""
    return Path(ckpt).parent / f"eval-{split}"


def evaluate(
    ckpt: str | Path,
    shards: str | Path,
    split: str = "test",
    max_chunks: int | None = None,
    generate: int = 8,
    out: str | Path | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    seq_len: int | None = None,
    direction: str = "l2r",
    codec: str | None = None,
    device: str | None = None,
    progress: bool = True,
    gate: bool = False,
) -> dict:
    """Evaluate a checkpoint on a split of a shard set and write report.{json,md,png}.

    Args:
        ckpt: a Lightning ``.ckpt`` of StereoT5 or a ``save_pretrained`` folder.
        shards: a shard set's folder or its manifest.json.
        split: ``train``, ``val`` or ``test``.
        max_chunks: score only the first N chunks of the split (manifest order); all if None.
        generate: windows decoded autoregressively for the SNR rows (0: none).
        out: output folder (default ``<checkpoint's folder>/eval-<split>``).
        temperature: of the sampled generation (<= 0: no sampled row).
        seed: of the sampled generation.
        batch_size: windows per forward pass (scoring and generation).
        seq_len: window length (default: the training window, at most max_len and a chunk).
        direction: ``l2r`` (target = right) or ``r2l``.
        codec: only checked: it must be the checkpoint's codec.
        device: torch device (default: cuda if available, else cpu).
        gate: only checked: the caller gates on the report's checks, which need a pcm16
            checkpoint (refused before any scoring otherwise).

    Returns:
        The report (what report.json holds).

    Raises:
        PipelineError / ModelError: bad arguments, unreadable shards or checkpoint, a codec or
            window the checkpoint was not built for.
    """
    if split not in SPLITS:
        raise PipelineError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    if direction not in DIRECTIONS:
        raise PipelineError(f"direction {direction!r}: evaluate takes l2r or r2l")
    if max_chunks is not None and max_chunks < 1:
        raise PipelineError(f"max_chunks must be >= 1, got {max_chunks}")
    if generate < 0 or batch_size < 1:
        raise PipelineError("generate must be >= 0 and batch_size >= 1")
    manifest = Manifest.load(Path(shards))
    loaded = load_model(ckpt, device)
    model, model_codec = loaded.model, loaded.codec
    length = resolve_seq_len(loaded, seq_len, codec, manifest.config.chunk_frames)
    if gate and not model_codec.exact:
        raise PipelineError(
            f"{ckpt}: the gate compares bits with FLAC, which needs a pcm16 checkpoint, not "
            f"{model_codec.name}: drop --gate"
        )
    warnings = []
    rate = int(manifest.config.sample_rate)
    if loaded.sample_rate is not None and loaded.sample_rate != rate:
        warnings.append(
            f"the model was trained on {loaded.sample_rate} Hz shards, these are {rate} Hz"
        )
    data = ShardDataModule(
        str(shards),
        seq_len=length,
        batch_size=batch_size,
        num_workers=0,
        codec=model_codec.name,
        direction=direction,
        return_meta=True,
    )
    full = data.eval_stream(split, rank=0, world_size=1).split
    samples = _limit(full.samples, max_chunks)
    stream = EvalStream(
        ShardSplit(full.urls[: len(samples)], samples, full.chunk_frames),
        length,
        batch_size,
        direction,
        return_meta=True,
    )
    d = DIRECTIONS[direction]
    scored = _score(model, stream, model_codec, rate, d, generate, progress)
    gen = _generated(model, scored.picked, model_codec, d, batch_size, temperature, seed)
    out_dir = Path(out) if out is not None else default_out(loaded.path, split)
    metrics_csv = find_metrics_csv(loaded.path)
    curve = read_curve(metrics_csv) if metrics_csv else {}

    exact = model_codec.exact
    bits = {
        "model": scored.nll / max(scored.count, 1) / LN2,
        "model_untrained": (
            None
            if scored.untrained_nll is None
            else scored.untrained_nll / max(scored.count, 1) / LN2
        ),
        "flac_given_input": scored.flac.given_input,
        "flac_target_alone": scored.flac.alone,
        "level_entropy": level_entropy(scored.levels),
    }
    files = {name: str(out_dir / f"report.{name}") for name in ("json", "md", "png")}
    report = {
        "format": REPORT_FORMAT,
        "ckpt": str(loaded.path),
        "ckpt_kind": loaded.kind,
        "shards": str(shards),
        "split": split,
        "codec": model_codec.name,
        "codec_exact": exact,
        "bits_comparable_to_flac": exact,  # pcm16 (or linear16, the same tokens)
        "direction": direction,
        "sample_rate": rate,
        "model": {
            "head": model.head_kind,
            "patch_size": model.patch_size,  # 1: one position per sample; > 1: two-level
            "max_len": loaded.max_len,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_sample_rate": loaded.sample_rate,
            "train_sample_rate_source": loaded.sample_rate_source,
            "train_seq_len": loaded.train_seq_len,
            "hparams": {k: v for k, v in model.hparams.items() if not k.startswith("_")},
        },
        "config": {
            "max_chunks": max_chunks,
            "generate": generate,
            "temperature": temperature,
            "seed": seed,
            "batch_size": batch_size,
            "seq_len": length,
            "device": str(next(model.parameters()).device),
            "flac_compression_level": FLAC_COMPRESSION_LEVEL,
            "fir_taps": FIR_TAPS,
            "fir_causal": FIR_CAUSAL,
            "snr_truth": "original int16 target",
        },
        "counts": {
            "shards": len(samples),
            "chunks": scored.chunks,
            "chunk_frames": stream.split.chunk_frames,
            "windows": scored.windows,
            "samples_scored": scored.count,
            "generated_windows": len(scored.picked),
            "generated_samples": len(scored.picked) * length,
        },
        "bits_per_sample": bits,
        "checks": learning_checks(bits, exact),
        "teacher_forced": {
            "nll_nats": scored.nll,
            "count": scored.count,
            "accuracy": scored.correct / max(scored.count, 1),
            "snr_db": snr_from_energies(scored.tf_signal, scored.tf_error),
        },
        "flac": {
            "stereo_bytes": scored.flac.stereo_bytes,
            "input_bytes": scored.flac.input_bytes,
            "target_bytes": scored.flac.target_bytes,
            "frames": scored.flac.frames,
        },
        "snr_db": gen["snr_db"],
        "snr_db_per_window": gen["per_window"],
        "best_gains": gen["gains"],
        "generated_windows": [{"source": s, "start": int(t)} for s, t in scored.picked_meta],
        "training_curve": str(metrics_csv) if metrics_csv else None,
        "timing": {
            "score_s": scored.seconds,
            "score_samples_per_s": scored.count / scored.seconds if scored.seconds else None,
            "generate_s": gen["seconds"],
            "generate_samples_per_s": gen["samples_per_s"],
        },
        "warnings": warnings,
        "files": files,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(files["json"]), json.dumps(report, indent=1) + "\n")
    atomic_write_text(Path(files["md"]), render_markdown(report))
    plot_report(report, gen["example"], curve, Path(files["png"]))
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer evaluate --ckpt C --shards DIR [--split test] ...`; returns the exit
    code (2 for a user error, printed as one `error:` line)."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer evaluate",
        description="Teacher-forced bits/sample and generated SNR of a checkpoint on a shard "
        "split, beside FLAC and signal baselines; writes report.json, report.md, report.png.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or save_pretrained folder")
    parser.add_argument("--shards", required=True, help="shard set folder (or its manifest.json)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--max-chunks", type=int, default=None, help="first N chunks only")
    parser.add_argument("--generate", type=int, default=8, help="windows to generate (0: none)")
    parser.add_argument(
        "--out", default=None, help="output folder (default: <ckpt dir>/eval-SPLIT)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="of the sampled row")
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
    args = parser.parse_args(argv)
    apply_runtime_options(args)
    try:
        report = evaluate(
            args.ckpt,
            args.shards,
            split=args.split,
            max_chunks=args.max_chunks,
            generate=args.generate,
            out=args.out,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            direction=args.direction,
            codec=args.codec,
            device=args.device,
            progress=not args.no_progress,
            gate=args.gate,
        )
    except PipelineError as exc:  # ModelError and CodecError are PipelineErrors too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    print(f"report: {report['files']['md']} (+ report.json, report.png)")
    if not args.gate:
        return 0
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    if failed:
        print(f"gate: failed: the model is not {' and not '.join(failed)}", file=sys.stderr)
        return 1
    print(f"gate: passed ({len(report['checks'])} checks)")
    return 0

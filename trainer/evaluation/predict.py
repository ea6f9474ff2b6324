"""`python -m trainer predict IN OUT.wav --ckpt C`: rebuild one channel of a file (see
docs/evaluation.md).

The file is read with `pipeline.audio` (channel policy `stereo`: mono duplicated, more channels
cut to the first two) at the model's sample rate when the checkpoint leads to one, else at its
own rate. The input channel goes to the output untouched (bit-identical to what
`pipeline.audio.read` gives at the output rate); the other channel is generated window by window
(consecutive windows of `seq_len`, `batch_size` at a time, the model's KV-cached `generate`).
Windows are independent: the decoder starts afresh at each boundary. They follow the
evaluation's rule (`trainer.data.windows.cover`): the last window is the file's last `seq_len`
frames, overlapping the one before it, and only its new frames are kept; a file shorter than one
window is padded with silence. The file streams through in blocks, so memory stays bounded
whatever its length; the output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TypedDict

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from pipeline.audio import AudioReader
from pipeline.codec import Codec, int16_to_pcm16
from pipeline.errors import AudioError, run_cli
from pipeline.fsutil import atomic_path
from trainer.data.batch import DIRECTIONS
from trainer.data.windows import cover
from trainer.evaluation import EvaluationError
from trainer.evaluation.generation import generate_windows
from trainer.evaluation.loading import (
    add_runtime_options,
    apply_runtime_options,
    load_model,
    resolve_seq_len,
)
from trainer.model import StereoT5

__all__ = ["Prediction", "main", "predict"]

_FORMATS = {".wav": "WAV", ".flac": "FLAC"}


class Prediction(TypedDict):
    """What `predict` wrote: the output file, its length and rate, and how fast it went."""

    out: str
    frames: int
    sample_rate: int
    rate_source: str
    direction: str
    seq_len: int
    windows: int
    seconds: float
    samples_per_s: float | None


def _windows(
    history: np.ndarray, inputs: np.ndarray, length: int
) -> tuple[list[np.ndarray], list[slice]]:
    """The shared rule's windows over `history` (input frames already written) then `inputs`,
    those holding frames of `inputs`: int16 windows [L] (padded with silence past the end) and,
    for each, the slice of it that is kept; the slices cover `inputs` once, in order."""
    context = np.concatenate([history, inputs])
    frames, done = len(context), len(history)
    if not frames:
        return [], []
    padded = np.pad(context, (0, max(0, length - frames)))
    windows, kept = [], []
    for window in cover(frames, length):
        first = max(window.start + window.keep_from, done)
        stop = min(window.start + length, frames)
        if first < stop:
            windows.append(padded[window.start : window.start + length])
            kept.append(slice(first - window.start, stop - window.start))
    return windows, kept


class _TargetChannel:
    """Generates the target channel of a file's consecutive input frames, window by window."""

    def __init__(
        self,
        model: StereoT5,
        codec: Codec,
        length: int,
        batch_size: int,
        temperature: float,
        seed: int,
    ) -> None:
        self.model, self.codec, self.length = model, codec, length
        self.batch_size, self.temperature = batch_size, temperature
        self.generator = None
        if temperature > 0:
            device = next(model.parameters()).device
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.history = np.zeros(0, np.int16)  # the last `length` input samples already done
        self.windows = 0

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """int16 input frames [n] that follow the ones before -> int16 target frames [n]."""
        windows, kept = _windows(self.history, inputs, self.length)
        self.history = np.concatenate([self.history, inputs])[-self.length :]
        if not windows:
            return np.zeros(0, np.int16)
        self.windows += len(windows)
        pred = generate_windows(
            self.model,
            int16_to_pcm16(np.stack(windows)),
            self.codec,
            self.batch_size,
            self.temperature,
            self.generator,
        )
        return np.concatenate([row[part] for row, part in zip(pred, kept, strict=True)])


def _check_arguments(inp: str | Path, out: Path, direction: str, batch_size: int) -> str:
    """The output's soundfile format, once the arguments are known to be usable."""
    if direction not in DIRECTIONS:
        raise EvaluationError(f"direction {direction!r}: predict takes l2r or r2l")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    fmt = _FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise EvaluationError(f"{out}: the output must end in .wav or .flac")
    if out.exists() and out.resolve() == Path(inp).resolve():
        raise EvaluationError(f"{out}: the output would replace the input; choose another path")
    return fmt


def _with_path(exc: AudioError, inp: str | Path) -> AudioError:
    """The reader's error naming the file: its messages are the index's reasons, without it."""
    return exc if str(inp) in str(exc) else AudioError(f"{inp}: {exc}")


def _write(
    reader: AudioReader,
    out: Path,
    fmt: str,
    src: int,
    target: _TargetChannel,
    progress: bool,
) -> int:
    """Stream the file into `out` (under a temporary name until complete): its input channel
    `src` as read, the other generated, `batch_size` windows at a time; the frames written."""
    written = 0
    group = target.batch_size * target.length  # frames of one round of batch_size windows
    bar = tqdm(
        total=reader.frames, unit="sample", unit_scale=True, desc="predict", disable=not progress
    )
    with (
        bar,
        atomic_path(out) as tmp,
        sf.SoundFile(
            tmp, "w", samplerate=reader.sample_rate, channels=2, subtype="PCM_16", format=fmt
        ) as f,
    ):

        def write(frames: np.ndarray) -> None:
            nonlocal written
            stereo = np.empty((frames.shape[1], 2), np.int16)
            stereo[:, src] = frames[src]
            stereo[:, 1 - src] = target(frames[src])
            f.write(stereo)
            written += frames.shape[1]
            bar.update(frames.shape[1])

        pending = np.zeros((2, 0), np.int16)
        for block in reader.blocks():
            pending = np.concatenate([pending, block], axis=1)
            while pending.shape[1] >= group:
                write(pending[:, :group])
                pending = pending[:, group:]
        if pending.shape[1]:
            write(pending)  # whole windows, then a last one overlapping the one before
    return written


def predict(
    inp: str | Path,
    out: str | Path,
    ckpt: str | Path,
    direction: str = "l2r",
    seq_len: int | None = None,
    batch_size: int = 8,
    temperature: float = 0.0,
    sample_rate: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> Prediction:
    """Write `out`: stereo 16-bit, the input channel of `inp` and the model's other channel.

    Args:
        inp: any file `pipeline.audio` reads.
        out: `.wav` (or `.flac`) path; same length as the input at the output rate.
        ckpt: a Lightning `.ckpt` or a `save_pretrained` folder.
        direction: `l2r` (keep left, predict right) or `r2l`.
        seq_len: window length (default: the training window, at most the model's max_len).
        temperature: 0 = greedy; > 0 samples (seeded by `seed`).
        sample_rate: output rate; default the training shards' rate when the checkpoint leads
            to it, else the file's own rate.

    Raises:
        UserError (EvaluationError, AudioError naming `inp`, ModelError): bad arguments, an
            unreadable input or checkpoint.
    """
    out = Path(out)
    fmt = _check_arguments(inp, out, direction, batch_size)
    loaded = load_model(ckpt, device)
    length = resolve_seq_len(loaded, seq_len)
    if sample_rate:
        rate_source = "--sample-rate"
    elif loaded.sample_rate:
        sample_rate, rate_source = loaded.sample_rate, loaded.sample_rate_source
    else:
        rate_source = f"the input's own rate (no training rate known: {loaded.sample_rate_source})"
    src = DIRECTIONS[direction]
    target = _TargetChannel(loaded.model, loaded.codec, length, batch_size, temperature, seed)
    start_time = time.perf_counter()
    try:
        with AudioReader(inp, "stereo", sample_rate=sample_rate) as reader:
            if reader.frames <= 0:
                raise EvaluationError(f"{inp}: no audio frames to predict from")
            rate = reader.sample_rate
            written = _write(reader, out, fmt, src, target, progress)
    except AudioError as exc:
        raise _with_path(exc, inp) from None
    seconds = time.perf_counter() - start_time
    return Prediction(
        out=str(out),
        frames=written,
        sample_rate=rate,
        rate_source=rate_source,
        direction=direction,
        seq_len=length,
        windows=target.windows,
        seconds=seconds,
        samples_per_s=written / seconds if seconds > 0 else None,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer predict",
        description="Rebuild one channel of an audio file with a checkpoint; write stereo 16-bit.",
    )
    parser.add_argument("inp", metavar="IN", help="any audio file pipeline.audio reads")
    parser.add_argument("out", metavar="OUT", help="output .wav (or .flac)")
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or save_pretrained folder")
    parser.add_argument("--direction", default="l2r", choices=("l2r", "r2l"))
    parser.add_argument("--seq-len", type=int, default=None, help="default: the training window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-rate", type=int, default=None, help="default: the model's")
    add_runtime_options(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    apply_runtime_options(args)
    result = predict(
        args.inp,
        args.out,
        args.ckpt,
        direction=args.direction,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        temperature=args.temperature,
        sample_rate=args.sample_rate,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    print(
        f"wrote {result['out']}: {result['frames']} frames at {result['sample_rate']} Hz "
        f"({result['rate_source']}), {result['windows']} windows of {result['seq_len']}, "
        f"{result['samples_per_s']:.0f} samples/s"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer predict IN OUT.wav --ckpt C [--direction l2r|r2l]`; returns the exit
    code (2 for a user error, printed as one `error:` line)."""
    args = _parser().parse_args(argv)
    return run_cli(lambda: _run(args))

"""`python -m trainer predict IN OUT.wav --ckpt C [--mode M]`: restore one channel of a file
(see docs/evaluation.md).

The file is read with `pipeline.audio` (channel policy `stereo`: mono duplicated, more channels
cut to the first two) at the model's sample rate when the checkpoint leads to one, else at its
own rate. The input channel goes to the output untouched (bit-identical to what
`pipeline.audio.read` gives at the output rate); the other is restored by one of
`trainer.evaluation.restore`'s modes: `estimate` (default) and `render` from the input alone,
over windows of `seq_len` on a fixed grid joined by a crossfade, streaming in blocks so memory
stays bounded whatever the file's length; `repair` keeps the file's own target and fills its
gaps, holding the file in memory. The output is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypedDict

import numpy as np
import soundfile as sf
from tqdm import tqdm

from pipeline.audio import AudioReader, probe
from pipeline.codec import Codec
from pipeline.errors import AudioError, run_cli
from pipeline.fsutil import atomic_path, check_writable
from trainer.data.batch import DIRECTIONS
from trainer.evaluation import EvaluationError
from trainer.evaluation.baselines import to_int16
from trainer.evaluation.gaps import GapOptions, merge_gaps
from trainer.evaluation.loading import (
    add_runtime_options,
    apply_runtime_options,
    load_model,
    resolve_seq_len,
)
from trainer.evaluation.restore import (
    CONTEXT_S,
    MODES,
    default_overlap,
    estimate_range,
    render,
    repair,
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
    mode: str
    gaps: int  # repaired (repair only)
    seq_len: int
    seconds: float
    seconds_per_audio_second: float | None


class _Stream:
    """Estimate (or render) of the target channel of a file's consecutive input frames: each
    call takes the frames that follow the ones before and returns the target of those frames
    whose windows are complete (all of them at `finish`), so memory stays at about a window
    whatever the file's length."""

    def __init__(
        self,
        model: StereoT5,
        codec: Codec,
        length: int,
        batch_size: int,
        temperature: float | None,
        seed: int,
    ) -> None:
        self.model, self.codec, self.length, self.batch_size = model, codec, length, batch_size
        self.overlap = default_overlap(length)
        self.temperature = temperature  # None: the estimate; else render at it
        self.rng = np.random.default_rng(seed)
        self.buffer = np.zeros(0, np.int16)
        self.offset = 0  # the frame buffer[0] holds
        self.done = 0  # frames returned so far

    def _emit(self, stop: int) -> np.ndarray:
        if stop <= self.done:
            return np.zeros(0, np.int16)
        restored = estimate_range(
            self.model, self.codec, self.buffer, self.length, self.overlap, self.batch_size,
            first=self.done, stop=stop, offset=self.offset,
        )  # fmt: skip
        hop = self.length - self.overlap
        self.done = stop
        keep = max(0, ((stop - self.length) // hop + 1) * hop)  # first window still needed
        self.buffer = self.buffer[keep - self.offset :]
        self.offset = keep
        if self.temperature is None:
            return to_int16(restored.mean)
        return render(restored, self.temperature, self.rng)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """int16 input frames that follow the ones before -> the next int16 target frames."""
        self.buffer = np.concatenate([self.buffer, inputs])
        ready = self.offset + len(self.buffer) - self.length  # their windows are all read
        if ready - self.done < self.batch_size * (self.length - self.overlap):
            return np.zeros(0, np.int16)  # wait for a batch's worth
        return self._emit(ready)

    def finish(self) -> np.ndarray:
        return self._emit(self.offset + len(self.buffer))


def _check_arguments(
    inp: str | Path, out: Path, direction: str, batch_size: int, mode: str, gaps: GapOptions
) -> str:
    """The output's soundfile format, once the arguments are known to be usable."""
    if direction not in DIRECTIONS:
        raise EvaluationError(f"direction {direction!r}: predict takes l2r or r2l")
    if mode not in MODES:
        raise EvaluationError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if (mode == "repair") != gaps.given:
        raise EvaluationError(
            "--mode repair needs --gaps, --gaps-file or --detect-gaps, and they go with repair only"
        )
    fmt = _FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise EvaluationError(f"{out}: the output must end in .wav or .flac")
    if out.exists() and out.resolve() == Path(inp).resolve():
        raise EvaluationError(f"{out}: the output would replace the input; choose another path")
    return fmt


def _with_path(exc: AudioError, inp: str | Path) -> AudioError:
    """The reader's error naming the file: its messages are the index's reasons, without it."""
    return exc if str(inp) in str(exc) else AudioError(f"{inp}: {exc}")


def _check_files(inp: str | Path, out: Path, gaps: GapOptions) -> None:
    """Refuse, before the model loads, an input that does not open as audio, a gaps file that is
    not there and an output folder that takes no file (a full disk shows when written)."""
    try:
        probe(inp)
    except AudioError as exc:
        raise _with_path(exc, inp) from None
    if gaps.file and not Path(gaps.file).exists():
        raise EvaluationError(f"{gaps.file}: missing: no such gaps file; check --gaps-file")
    check_writable(out.parent)


class _Sink:
    """The output file as libsndfile writes it, through Python: a write the disk refuses returns
    short (an exception would cross C and print a traceback) and its OSError is kept for
    `check`, which raises it in place of what libsndfile makes of the short write (`System
    error.`, or soundfile's bare assert), so that atomic_path can name the reason."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.seek, self.tell, self.read = f.seek, f.tell, f.read
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            return 0

    def check(self) -> None:
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _output(tmp: Path, rate: int, fmt: str) -> Iterator[Callable[[np.ndarray], None]]:
    """`write(frames)` of a stereo 16-bit `fmt` file at `tmp`: a write the disk refuses (the
    header's, at the end, too) raises its OSError."""
    with open(tmp, "wb") as raw:
        sink = _Sink(raw)
        try:
            with sf.SoundFile(
                sink, "w", samplerate=rate, channels=2, subtype="PCM_16", format=fmt
            ) as f:

                def write(frames: np.ndarray) -> None:
                    try:
                        f.write(frames)
                    finally:
                        sink.check()

                yield write
        finally:
            sink.check()


class _Writer:
    """The output file's frames in order: the input channel as read, the target as restored."""

    def __init__(self, out: Callable[[np.ndarray], None], src: int, bar: tqdm) -> None:
        self.out, self.src, self.bar = out, src, bar
        self.pending = np.zeros((2, 0), np.int16)  # read, target not restored yet
        self.written = 0

    def read(self, frames: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, frames], axis=1)

    def write(self, target: np.ndarray) -> None:
        """Write the next len(target) pending frames with this target channel."""
        n = len(target)
        stereo = np.empty((n, 2), np.int16)
        stereo[:, self.src] = self.pending[self.src, :n]
        stereo[:, 1 - self.src] = target
        self.out(stereo)
        self.pending = self.pending[:, n:]
        self.written += n
        self.bar.update(n)


def _restore(
    reader: AudioReader,
    writer: _Writer,
    model: StereoT5,
    codec: Codec,
    length: int,
    batch_size: int,
    mode: str,
    temperature: float,
    seed: int,
    gaps: GapOptions,
) -> int:
    """Run `mode` over the file into `writer`; the number of gaps repaired (0 otherwise).
    Estimate and render stream; repair holds the file (it reads the known target around each
    gap, and its fit needs the estimate there)."""
    src = writer.src
    if mode != "repair":
        stream = _Stream(
            model, codec, length, batch_size, temperature if mode == "render" else None, seed
        )
        for block in reader.blocks():
            writer.read(block)
            writer.write(stream(block[src]))
        writer.write(stream.finish())
        return 0
    for block in reader.blocks():
        writer.read(block)
    x, y = writer.pending[src], writer.pending[1 - src]
    found = merge_gaps(gaps.frames(x, y, reader.sample_rate), len(x))
    if not found:
        raise EvaluationError(f"{reader.path}: no gaps to repair (none given, none detected)")
    lo, hi = found[0][0], found[-1][1]  # the estimate is needed around the gaps only
    span = round(CONTEXT_S * reader.sample_rate) + length
    first, stop = max(0, lo - span), min(len(x), hi + span)
    estimate = np.zeros(len(x))
    restored = estimate_range(
        model, codec, x, length, default_overlap(length), batch_size, first=first, stop=stop
    )
    estimate[first:stop] = restored.mean
    writer.write(repair(x, y, found, estimate, reader.sample_rate))
    return len(found)


def predict(
    inp: str | Path,
    out: str | Path,
    ckpt: str | Path,
    direction: str = "l2r",
    mode: str = "estimate",
    gaps: GapOptions | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    temperature: float = 1.0,
    sample_rate: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> Prediction:
    """Write `out`: stereo 16-bit, the input channel of `inp` and the restored other channel.

    Args:
        inp: any file `pipeline.audio` reads.
        out: `.wav` (or `.flac`) path; same length as the input at the output rate.
        ckpt: a Lightning `.ckpt` or a `save_pretrained` folder with an estimate head.
        direction: `l2r` (keep left, restore right) or `r2l`.
        mode: `estimate` (the target from the input alone), `repair` (the file's own target,
            its gaps filled) or `render` (the estimate plus noise at the predicted spread).
        gaps: where the target is damaged (repair only).
        seq_len: window length (default: the training window, at most the model's max_len).
        temperature: render's, times the predicted spread (seeded by `seed`).
        sample_rate: output rate; default the training shards' rate when the checkpoint leads
            to it, else the file's own rate.

    Raises:
        UserError (EvaluationError, AudioError naming `inp`, ModelError, DiskError): bad
            arguments, a missing or unreadable input or gaps file, an output folder that takes
            no file (these before the model loads), an unreadable checkpoint, a model without
            an estimate head, a full disk.
    """
    out = Path(out)
    gaps = gaps or GapOptions()
    fmt = _check_arguments(inp, out, direction, batch_size, mode, gaps)
    _check_files(inp, out, gaps)
    loaded = load_model(ckpt, device)
    if loaded.model.estimator is None:
        raise EvaluationError(
            f"{loaded.path}: this model has no estimate head, which every mode uses: train one "
            "with `estimate: {weight: 1.0}` under `model:` (configs/cpu.yaml has it)"
        )
    length = resolve_seq_len(loaded, seq_len)
    if sample_rate:
        rate_source = "--sample-rate"
    elif loaded.sample_rate:
        sample_rate, rate_source = loaded.sample_rate, loaded.sample_rate_source
    else:
        rate_source = f"the input's own rate (no training rate known: {loaded.sample_rate_source})"
    src = DIRECTIONS[direction]
    start_time = time.perf_counter()
    try:
        with AudioReader(inp, "stereo", sample_rate=sample_rate) as reader:
            if reader.frames <= 0:
                raise EvaluationError(f"{inp}: no audio frames to predict from")
            rate = reader.sample_rate
            bar = tqdm(
                total=reader.frames, unit="sample", unit_scale=True, desc=mode,
                disable=not progress,
            )  # fmt: skip
            with bar, atomic_path(out) as tmp, _output(tmp, rate, fmt) as write:
                writer = _Writer(write, src, bar)
                repaired = _restore(
                    reader, writer, loaded.model, loaded.codec, length, batch_size, mode,
                    temperature, seed, gaps,
                )  # fmt: skip
    except AudioError as exc:
        raise _with_path(exc, inp) from None
    seconds = time.perf_counter() - start_time
    written = writer.written
    return Prediction(
        out=str(out),
        frames=written,
        sample_rate=rate,
        rate_source=rate_source,
        direction=direction,
        mode=mode,
        gaps=repaired,
        seq_len=length,
        seconds=seconds,
        seconds_per_audio_second=seconds / (written / rate) if written else None,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer predict",
        description="Restore one channel of an audio file with a checkpoint (estimate it from "
        "the other, repair its gaps, or render it); write stereo 16-bit.",
    )
    parser.add_argument("inp", metavar="IN", help="any audio file pipeline.audio reads")
    parser.add_argument("out", metavar="OUT", help="output .wav (or .flac)")
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or save_pretrained folder")
    parser.add_argument("--direction", default="l2r", choices=("l2r", "r2l"))
    parser.add_argument("--mode", default="estimate", choices=MODES)
    parser.add_argument("--gaps", default=None, help="repair: START:END,... in seconds")
    parser.add_argument("--gaps-file", default=None, help="repair: a file of START END lines")
    parser.add_argument(
        "--detect-gaps",
        action="store_true",
        help="repair: also stretches where the target is flat (digital silence, a flat line) "
        "while the input moves",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="default: the training window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0, help="render's")
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
        mode=args.mode,
        gaps=GapOptions(args.gaps, args.gaps_file, args.detect_gaps),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        temperature=args.temperature,
        sample_rate=args.sample_rate,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    repaired = f", {result['gaps']} gaps repaired" if result["mode"] == "repair" else ""
    print(
        f"wrote {result['out']}: {result['frames']} frames at {result['sample_rate']} Hz "
        f"({result['rate_source']}), {result['mode']} over windows of {result['seq_len']}"
        f"{repaired}, {result['seconds_per_audio_second']:.3f} s per second of audio"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer predict IN OUT.wav --ckpt C [--mode estimate|repair|render]`;
    returns the exit code (2 for a user error, printed as one `error:` line)."""
    args = _parser().parse_args(argv)
    return run_cli(lambda: _run(args))

"""`python -m trainer predict IN OUT.wav --ckpt C`: rebuild one channel of a file (design §8).

The file is read with `pipeline.audio` (channel policy `stereo`: mono duplicated, more channels
cut to the first two) at the model's sample rate when the checkpoint leads to one, else at its
own rate. The input channel goes to the output untouched (bit-identical to what
`pipeline.audio.read` gives at the output rate); the other channel is generated window by window
(consecutive windows of `seq_len`, `batch_size` at a time, the model's KV-cached `generate`).
Windows are independent: the decoder starts afresh at each boundary. The last window is the
file's last `seq_len` frames, overlapping the one before it, and only its new frames are kept,
as the evaluation's windows do; a file shorter than one window is padded with silence. The file
streams through in blocks, so memory stays bounded whatever its length; the output is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from pipeline.audio import AudioReader
from pipeline.codec import Codec, int16_to_pcm16
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path
from trainer.checkpoint import (
    add_runtime_options,
    apply_runtime_options,
    load_model,
    resolve_seq_len,
)
from trainer.data import DIRECTIONS
from trainer.evaluate import generate_windows
from trainer.model import StereoT5

__all__ = ["main", "predict"]

_FORMATS = {".wav": "WAV", ".flac": "FLAC"}


def _generate(
    model: StereoT5,
    codec: Codec,
    inputs: np.ndarray,
    batch_size: int,
    temperature: float,
    generator: torch.Generator | None,
) -> np.ndarray:
    """int16 input windows [N, L] -> int16 generated target [N, L]."""
    return generate_windows(
        model, int16_to_pcm16(inputs), codec, batch_size, temperature, generator
    )


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
) -> dict:
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

    Returns:
        out, frames, sample_rate, rate_source, seq_len, windows, seconds, samples_per_s.
    """
    if direction not in DIRECTIONS:
        raise PipelineError(f"direction {direction!r}: predict takes l2r or r2l")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    fmt = _FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise PipelineError(f"{out}: the output must end in .wav or .flac")
    if out.exists() and out.resolve() == Path(inp).resolve():
        raise PipelineError(f"{out}: the output would replace the input; choose another path")
    loaded = load_model(ckpt, device)
    model, codec = loaded.model, loaded.codec
    length = resolve_seq_len(loaded, seq_len)
    if sample_rate:
        rate_source = "--sample-rate"
    elif loaded.sample_rate:
        sample_rate, rate_source = loaded.sample_rate, loaded.sample_rate_source
    else:
        rate_source = f"the input's own rate (no training rate known: {loaded.sample_rate_source})"
    src = DIRECTIONS[direction]
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    with AudioReader(inp, "stereo", sample_rate=sample_rate) as reader:
        rate, total = reader.sample_rate, reader.frames
        if total <= 0:
            raise PipelineError(f"{inp}: no audio frames to predict from")
        group = batch_size * length
        written = windows = 0
        history = np.zeros(0, np.int16)  # the last `length` input samples already written
        start_time = time.perf_counter()
        with (
            atomic_path(out) as tmp,
            sf.SoundFile(tmp, "w", samplerate=rate, channels=2, subtype="PCM_16", format=fmt) as f,
            tqdm(
                total=total, unit="sample", unit_scale=True, desc="predict", disable=not progress
            ) as bar,
        ):

            def write(frames: np.ndarray, pred: np.ndarray) -> None:
                nonlocal written, history
                stereo = np.empty((frames.shape[1], 2), np.int16)
                stereo[:, src] = frames[src]
                stereo[:, 1 - src] = pred
                f.write(stereo)
                written += frames.shape[1]
                history = np.concatenate([history, frames[src]])[-length:]
                bar.update(frames.shape[1])

            pending = np.zeros((2, 0), np.int16)
            for block in reader.blocks():
                pending = np.concatenate([pending, block], axis=1)
                while pending.shape[1] >= group:
                    part, pending = pending[:, :group], pending[:, group:]
                    pred = _generate(
                        model,
                        codec,
                        part[src].reshape(-1, length),
                        batch_size,
                        temperature,
                        generator,
                    )
                    windows += batch_size
                    write(part, pred.reshape(-1))
            # The rest: whole windows, then a tail of q < length frames.
            rest = pending.shape[1]
            full, tail = divmod(rest, length)
            inputs = [pending[src, i * length : (i + 1) * length] for i in range(full)]
            if tail:
                context = np.concatenate([history, pending[src]])
                if len(context) >= length:  # overlap the previous window: keep its new frames
                    inputs.append(context[-length:])
                else:  # the whole file is shorter than a window: pad with silence
                    inputs.append(np.pad(context, (0, length - len(context))))
            if inputs:
                pred = _generate(model, codec, np.stack(inputs), batch_size, temperature, generator)
                windows += len(inputs)
                kept = [pred[:full].reshape(-1)]
                if tail:
                    last = pred[full]
                    kept.append(last[length - tail :] if len(context) >= length else last[:tail])
                write(pending, np.concatenate(kept))
    seconds = time.perf_counter() - start_time
    return {
        "out": str(out),
        "frames": written,
        "sample_rate": rate,
        "rate_source": rate_source,
        "direction": direction,
        "seq_len": length,
        "windows": windows,
        "seconds": seconds,
        "samples_per_s": written / seconds if seconds > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer predict IN OUT.wav --ckpt C [--direction l2r|r2l]`; returns the exit
    code (2 for a user error, printed as one `error:` line)."""
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
    args = parser.parse_args(argv)
    apply_runtime_options(args)
    try:
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
    except PipelineError as exc:  # ModelError, AudioError and CodecError are PipelineErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = result["samples_per_s"]
    print(
        f"wrote {result['out']}: {result['frames']} frames at {result['sample_rate']} Hz "
        f"({result['rate_source']}), {result['windows']} windows of {result['seq_len']}, "
        f"{rate:.0f} samples/s"
    )
    return 0

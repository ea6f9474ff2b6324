"""Shard benchmark: audio seconds per second for `shard` (1 and all cores), for decoding the same
sources only, and for reading their bytes (`cat`), measured side by side in one run.

    python bench/shard_bench.py [--tracks 24] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.audio import AudioReader
from pipeline.index import build_index
from pipeline.shard import write_shards
from pipeline.synth import synth_mixture

RATE = 44100


def make_corpus(root: Path, tracks: int, seconds: float) -> list[Path]:
    """Half 16-bit WAV, half 16-bit FLAC, MUSDB layout."""
    paths = []
    for k in range(tracks):
        audio = synth_mixture(np.random.default_rng([1, k]), int(seconds * RATE), RATE)
        ext = "wav" if k % 2 == 0 else "flac"
        path = root / "train" / f"Track {k:03d}" / f"mixture.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio, RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def cat(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def decode(paths: list[Path]) -> None:
    for path in paths:
        for _ in AudioReader(path).blocks():
            pass


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--shard-bytes", default="8MB", help="small, so the cores get work")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "audio"
        paths = make_corpus(root, args.tracks, args.seconds)
        index = Path(tmp) / "index.json"
        build_index(root, index, progress=False)
        audio_seconds = args.tracks * args.seconds
        cat(paths)  # warm the page cache for every contender alike

        def shard(jobs: int) -> None:
            out = Path(tmp) / f"shards-{jobs}"
            shutil.rmtree(out, ignore_errors=True)
            write_shards(
                index,
                out,
                jobs=jobs,
                progress=False,
                val=0.0,
                test=0.0,
                shard_bytes=args.shard_bytes,
            )

        rows = [
            ("cat of the source bytes", timed(lambda: cat(paths))),
            ("decode only (1 process)", timed(lambda: decode(paths))),
            ("shard --jobs 1", timed(lambda: shard(1))),
            (f"shard --jobs {cores}", timed(lambda: shard(cores))),
        ]
    decode_t = rows[1][1]
    print(
        f"shard benchmark: {args.tracks} tracks x {args.seconds:g} s = "
        f"{audio_seconds / 60:.1f} min of 16-bit 44.1 kHz stereo, half WAV half FLAC, "
        f"{cores} cores"
    )
    print(f"{'contender':<28}{'seconds':>9}{'audio s/s':>12}{'time / decode':>15}")
    for name, t in rows:
        print(f"{name:<28}{t:>9.3f}{audio_seconds / t:>12.0f}{t / decode_t:>14.2f}x")
    print(
        f"shard --jobs 1 takes {rows[2][1] / decode_t:.2f}x the time of decoding alone, "
        f"--jobs {cores} {rows[3][1] / decode_t:.2f}x (goal <= 2x)"
    )


if __name__ == "__main__":
    main()

"""Index benchmark: first index (all cores) vs re-index of the unchanged tree vs a serial
`soundfile.info` loop, on a generated tree of short files. Prints ratios from one run, the
floor of any re-index (stat every file, parse the index) beside it, and how much faster `jobs`
processes ran plain Python than one just after: on a shared machine, the parallel ceiling.
With PyAV, a `.stem.mp4` row: files/s of the index over 5-stream AAC files beside FLAC files
of the same audio, and the reader's decode cost per second of audio, AAC over FLAC.

    python bench/index_bench.py [--files 2000] [--seconds 0.5] [--jobs N] [--stem-files 40]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.audio import AudioReader, is_audio_path
from pipeline.index import build_index

FORMATS = [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("wav", "WAV", "PCM_24")]


STEMS = ["mixture", "drums", "bass", "other", "vocals"]


def make_tree(root: Path, files: int, seconds: float, rate: int = 44100) -> None:
    """MUSDB-like: album/track/<stem>.<ext>, lengths varying around `seconds` like real files."""
    rng = np.random.default_rng(0)
    for i in range(files):
        ext, fmt, subtype = FORMATS[i % len(FORMATS)]
        folder = root / f"album{i // 100:03d}" / f"track{i // len(STEMS):05d}"
        folder.mkdir(parents=True, exist_ok=True)
        frames = int(seconds * rate * rng.uniform(0.5, 1.5))
        data = rng.uniform(-0.3, 0.3, (frames, 2))
        sf.write(folder / f"{STEMS[i % len(STEMS)]}.{ext}", data, rate, format=fmt, subtype=subtype)


def make_stem_tree(root: Path, files: int, seconds: float, rate: int = 44100) -> None:
    """`files` 5-stream AAC `.stem.mp4` songs in root/stem; their mixtures as FLAC in root/flac."""
    import av

    rng = np.random.default_rng(1)
    for i in range(files):
        frames = int(seconds * rate)
        streams = [rng.uniform(-0.3, 0.3, (frames, 2)).astype(np.float32) for _ in STEMS]
        (root / "flac").mkdir(parents=True, exist_ok=True)
        (root / "stem").mkdir(parents=True, exist_ok=True)
        sf.write(root / "flac" / f"song{i:04d}.flac", streams[0], rate, subtype="PCM_16")
        with av.open(str(root / "stem" / f"song{i:04d}.stem.mp4"), "w", format="mp4") as out:
            outs = [out.add_stream("aac", rate=rate, layout="stereo") for _ in streams]
            for pos in range(0, frames, 1024):
                for stream, data in zip(outs, streams, strict=True):
                    block = np.ascontiguousarray(data[pos : pos + 1024].T)
                    frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
                    frame.sample_rate, frame.pts = rate, pos
                    out.mux(stream.encode(frame))
            for stream in outs:
                out.mux(stream.encode(None))


def read_all(folder: Path) -> float:
    """Seconds of audio read through AudioReader (stream 0 of a `.stem.mp4`)."""
    seconds = 0.0
    for path in sorted(folder.iterdir()):
        with AudioReader(path) as reader:
            seconds += reader.read().shape[1] / reader.sample_rate
    return seconds


def stem_rows(files: int, seconds: float, jobs: int) -> None:
    """Index files/s of `.stem.mp4` beside FLAC, and decode cost per audio second, one run."""
    try:
        import av  # noqa: F401
    except ImportError:
        print('.stem.mp4 rows: skipped, PyAV is not installed (pip install -e ".[av]")')
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_stem_tree(root, files, seconds)
        t_flac, _ = timed(lambda: build_index(root / "flac", root / "f.json", jobs, progress=False))
        t_stem, _ = timed(lambda: build_index(root / "stem", root / "s.json", jobs, progress=False))
        t_read_flac, s_flac = timed(lambda: read_all(root / "flac"))
        t_read_stem, s_stem = timed(lambda: read_all(root / "stem"))
    print(f"{'first index, FLAC':<34}{t_flac:>9.3f}{files / t_flac:>11.0f}")
    print(f"{'first index, .stem.mp4 (5 AAC)':<34}{t_stem:>9.3f}{files / t_stem:>11.0f}")
    print(
        f".stem.mp4 indexes at {t_flac / t_stem:.2f}x FLAC's files/s; decoding its mixture costs "
        f"{(t_read_stem / s_stem) / (t_read_flac / s_flac):.2f}x FLAC's time per second of audio"
    )


def serial_info_loop(root: Path) -> int:
    frames = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if is_audio_path(name):
                frames += sf.info(os.path.join(dirpath, name)).frames
    return frames


def reindex_floor(root: Path, index: Path) -> int:
    """What any re-index must do: stat every audio file (size, mtime) and parse the index."""
    stats = [
        os.stat(os.path.join(dirpath, name))
        for dirpath, _, names in os.walk(root)
        for name in names
        if is_audio_path(name)
    ]
    return len(stats) + len(json.loads(index.read_bytes())["files"])


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallel_capacity(jobs: int, n: int = 1_500_000) -> float:
    """How much faster `jobs` processes ran pure-Python work than one, just now: the most any
    parallel contender can gain here (a shared or oversubscribed machine gives less than jobs)."""
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_spin, [1] * jobs))  # workers started
        t_one, _ = timed(lambda: [_spin(n) for _ in range(jobs)])
        t_all, _ = timed(lambda: list(pool.map(_spin, [n] * jobs)))
    return t_one / t_all


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--stem-files", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "tree", Path(tmp) / "index.json"
        make_tree(root, args.files, args.seconds)
        serial_info_loop(root)  # warm the page cache for every contender alike
        t_serial, serial_frames = timed(lambda: serial_info_loop(root))
        t_first, first = timed(lambda: build_index(root, out, args.jobs, progress=False))
        t_again, again = timed(lambda: build_index(root, out, args.jobs, progress=False))
        t_floor, _ = timed(lambda: reindex_floor(root, out))
        capacity = parallel_capacity(args.jobs) if args.jobs > 1 else 1.0
    assert first.opened == args.files and again.opened == 0
    assert sum(e.frames for e in first.index.files.values()) == serial_frames
    n = args.files
    print(
        f"index benchmark: {n} files x {args.seconds:g} s, jobs={args.jobs}, cores={os.cpu_count()}"
    )
    print(f"{'contender':<34}{'seconds':>9}{'files/s':>11}{'vs first index':>16}")
    rows = [
        ("serial soundfile.info loop", t_serial),
        (f"first index (--jobs {args.jobs})", t_first),
        ("re-index, unchanged tree", t_again),
        ("  its floor: os.walk+stat+json", t_floor),
    ]
    for name, t in rows:
        print(f"{name:<34}{t:>9.3f}{n / t:>11.0f}{t_first / t:>15.2f}x")
    print(f"re-index is {t_first / t_again:.1f}x faster than the first index (goal >= 50x)")
    print(
        f"first index is {t_serial / t_first:.2f}x the speed of the serial info loop "
        "(goal > 1x; the index also decodes the last frame of every compressed file)"
    )
    print(
        f"this machine ran {args.jobs} processes of pure Python {capacity:.2f}x as fast as one "
        "just after (the ceiling of any parallel speed-up here)"
    )
    stem_rows(args.stem_files, max(args.seconds, 5.0), args.jobs)


if __name__ == "__main__":
    main()

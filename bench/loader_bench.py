"""Loader benchmark: tokens/s delivered by the shard train loader (0 and 2 workers, batch 8),
by the original random-access dataset on WAV and on FLAC copies, by vanilla webdataset merely
iterating the same shards, the shard loader streaming the same set from an S3 server on
127.0.0.1 (moto's, when moto[server] and s3fs are installed), and the raw read rate of the shard
bytes; bytes read per token; and the time a resume takes to skip 1000 batches. One run, one
corpus, printed side by side.

    python bench/loader_bench.py [--tracks 16] [--seconds 60] [--batches 300]

A token is one frame of one channel of a delivered window: a batch of 8 windows of L frames
delivers 8 L input tokens (and as many labels).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds
from torch.utils.data import DataLoader

from pipeline.index import build_index
from pipeline.records import Manifest
from pipeline.shard import write_shards
from pipeline.synth import synth_mixture
from trainer.data import ShardDataModule
from trainer.data.seed_style import StereoWavChunkDataset
from trainer.data.tasks import TASKS

RATE = 44100
BATCH = 8
S3_ROUNDS = 3


def make_corpus(root: Path, tracks: int, seconds: float) -> dict[str, dict[str, int]]:
    """16-bit WAV tracks and FLAC copies; the lengths JSON of each."""
    lengths: dict[str, dict[str, int]] = {"wav": {}, "flac": {}}
    for k in range(tracks):
        audio = synth_mixture(np.random.default_rng([2, k]), int(seconds * RATE), RATE)
        for ext in lengths:
            path = root / ext / "train" / f"Track {k:03d}" / f"mixture.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, audio, RATE, subtype="PCM_16")
            lengths[ext][str(path)] = len(audio)
    return lengths


def rate(loader, batches: int, tokens_per_batch: int) -> float:
    """Tokens/s over `batches` batches, after the first (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * tokens_per_batch / (time.perf_counter() - start)


def vanilla_wds(urls: list[str], chunk_frames: int) -> float:
    """Vanilla webdataset over the same shards, decoding .npy: the ceiling of any wds loader."""
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    start, n = time.perf_counter(), 0
    for sample in ds:
        assert sample["npy"].dtype == np.uint16
        n += 1
    return n * chunk_frames / (time.perf_counter() - start)


def raw_read(urls: list[str], frames: int) -> float:
    start = time.perf_counter()
    for url in urls:
        with open(url, "rb") as f:
            while f.read(1 << 22):
                pass
    return frames / (time.perf_counter() - start)


@contextlib.contextmanager
def s3_copy(folder: Path) -> Iterator[tuple[str, dict] | None]:
    """The shard set uploaded to moto's S3 server, started on a free port of 127.0.0.1:
    (its s3:// URL, storage_options); None when moto[server] or s3fs is not installed."""
    try:
        import moto.server  # noqa: F401
        import s3fs
    except ImportError:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "bench")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        while True:
            try:
                urllib.request.urlopen(options["endpoint_url"], timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("moto.server did not start") from None
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench-shards")
        fs.put(f"{folder}/", "bench-shards/set", recursive=True)
        yield "s3://bench-shards/set", options
    finally:
        server.kill()
        server.wait()


def s3_rates(folder: Path, s3: tuple[str, dict], seq_len: int, batches: int) -> tuple[float, float]:
    """Tokens/s of the 0-worker loader on the local set and on its S3 copy, each the best of
    `S3_ROUNDS` runs, the rounds interleaved (other load only ever slows a run down)."""
    modules = [
        ShardDataModule(str(folder), seq_len=seq_len, batch_size=BATCH, num_workers=0),
        ShardDataModule(
            s3[0], seq_len=seq_len, batch_size=BATCH, num_workers=0, storage_options=s3[1]
        ),
    ]
    best = [0.0, 0.0]
    for _ in range(S3_ROUNDS):
        for n, dm in enumerate(modules):
            best[n] = max(best[n], rate(dm.train_dataloader(), batches, BATCH * seq_len))
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        lengths = make_corpus(root / "audio", args.tracks, args.seconds)
        build_index(root / "audio" / "wav", root / "index.json", progress=False)
        write_shards(
            root / "index.json",
            root / "shards",
            progress=False,
            val=0.0,
            test=0.0,
            shard_bytes="16MB",
        )
        manifest = Manifest.load(root / "shards")
        urls = [str(root / "shards" / s.path) for s in manifest.shards["train"]]
        chunk = manifest.config.chunk_frames
        total_frames = manifest.samples("train") * chunk
        shard_bytes = sum(s.bytes for s in manifest.shards["train"])
        for path in urls:  # warm the page cache for every contender alike
            Path(path).read_bytes()
        ceiling = vanilla_wds(urls, chunk)
        raw = raw_read(urls, total_frames)
        s3 = stack.enter_context(s3_copy(root / "shards"))
        print(
            f"loader benchmark: {args.tracks} tracks x {args.seconds:g} s of 16-bit 44.1 kHz "
            f"stereo, {len(urls)} shards of {chunk}-frame chunks, batch {BATCH}, "
            f"{os.cpu_count()} cores"
        )
        print(
            f"{'contender':<42}{'L':>6}{'M tokens/s':>12}{'vs baseline FLAC':>18}"
            f"{'vs baseline WAV':>17}{'vs vanilla wds':>16}"
        )
        for seq_len in (2048, 8192):
            per_batch = BATCH * seq_len
            base = {}
            for ext in ("wav", "flac"):
                ds = StereoWavChunkDataset(lengths[ext], seq_len, items=10**6, seed=0)
                base[ext] = rate(DataLoader(ds, batch_size=BATCH), args.batches // 3, per_batch)
            rows = [(f"random-access baseline, {ext.upper()}", base[ext]) for ext in base]
            for workers in (0, 2):
                dm = ShardDataModule(
                    str(root / "shards"), seq_len=seq_len, batch_size=BATCH, num_workers=workers
                )
                rows.append(
                    (
                        f"shard loader, {workers} workers",
                        rate(dm.train_dataloader(), args.batches, per_batch),
                    )
                )
            if s3 is not None:
                local, remote = s3_rates(root / "shards", s3, seq_len, args.batches)
                rows.append(("shard loader, 0 workers, S3 on 127.0.0.1", remote))
            rows += [
                ("vanilla webdataset iterating the shards", ceiling),
                ("raw read of the shard bytes", raw),
            ]
            for name, value in rows:
                print(
                    f"{name:<42}{seq_len:>6}{value / 1e6:>12.1f}{value / base['flac']:>17.1f}x"
                    f"{value / base['wav']:>16.1f}x{value / ceiling:>15.2f}x"
                )
            if s3 is None:
                print("  S3 row skipped: moto[server] and s3fs are not installed")
            else:
                print(
                    f"  L={seq_len}: S3 on 127.0.0.1 / local files, 0 workers, best of "
                    f"{S3_ROUNDS} interleaved: {remote / local:.2f}x"
                )
            dm = ShardDataModule(
                str(root / "shards"), seq_len=seq_len, batch_size=BATCH, num_workers=0
            )
            stream = dm.train_stream()
            groups = [stream._windows(0).group(0, g) for g in range(20)]
            windows_per_chunk = sum(len(g.order) for g in groups) / (20 * stream.group_chunks)
            read_per_chunk = shard_bytes / manifest.samples("train")
            # a window delivers L input and L label tokens of 2 bytes (uint16) each
            print(
                f"  L={seq_len}: shard bytes read / bytes of tokens delivered = "
                f"{read_per_chunk / (windows_per_chunk * 4 * seq_len):.3f} "
                f"({windows_per_chunk:.2f} windows per {chunk}-frame chunk)"
            )
            start = time.perf_counter()
            next(iter(stream.batches(0, 0, 1000)))
            skip = time.perf_counter() - start
            start = time.perf_counter()
            next(iter(stream.batches(0, 0, 0)))
            first = time.perf_counter() - start
            print(
                f"  resume: first batch after skipping 1000 batches {skip:.3f} s "
                f"(first batch of a fresh epoch {first:.3f} s)"
            )
        task_rates(root / "shards", args.batches // 3)


def task_rates(folder: Path, batches: int, rounds: int = 15) -> None:
    """Tokens/s of every task, and of the channel task with every augmentation, at L = 2048.

    Each contender's best of `rounds` runs, the rounds interleaved: other processes on the
    machine only ever slow a run down, and they should not decide the ratios.
    """
    print(
        f"tasks and augmentation (0 workers, L=2048, batch {BATCH}, best of {rounds}), "
        "as ratios to the channel task:"
    )
    every = {"gain_p": 0.5, "polarity_p": 0.5, "swap_p": 0.5, "noise_p": 0.5, "speed_p": 0.5}
    options = {task: {"task": task} for task in TASKS}
    options["channel + all augmentations"] = {"augment": every}
    modules = {
        name: ShardDataModule(
            str(folder),
            seq_len=2048,
            batch_size=BATCH,
            num_workers=0,
            batches_per_epoch=10**6,
            **option,
        )
        for name, option in options.items()
    }
    best = dict.fromkeys(modules, 0.0)
    for _ in range(rounds):
        for name, dm in modules.items():
            best[name] = max(best[name], rate(dm.train_dataloader(), batches, BATCH * 2048))
    for name, value in best.items():
        print(f"  {name:<30}{value / 1e6:>8.1f} M tokens/s {value / best['channel']:>6.2f}x")


if __name__ == "__main__":
    main()

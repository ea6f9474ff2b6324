"""Loader memory soak: does iterating the training loader for many epochs grow memory?

A training run iterates the same train DataLoader epoch after epoch, its workers persistent in
the GPU recipes; anything a worker or the main process keeps per epoch, per shard or per batch
(a list that is appended to, a cache, an object re-created and still referenced) shows up only
after thousands of batches. This builds the loader as training does (`ShardDataModule` ->
`train_dataloader()`), tells it every epoch which epoch it is as Lightning does (through the
`trainer` that `ShardDataModule._where` reads), iterates `--batches` batches over many short
epochs, and samples the proportional set size (PSS, `/proc/PID/smaps_rollup`) of the main
process and of each worker (its children) half-way through the epoch that holds batch
`--warmup`, then through the one that holds each multiple of `--every` batches. PSS
splits every shared page among the processes that map it, so the main process and the workers
add up to what the loader costs, with nothing counted twice; its anonymous part (`Pss_Anon`) is
printed beside it, as the part that a leak grows.

    python bench/soak_bench.py [--shards DIR] [--config configs/cpu.yaml] [--batches 20000]
        [--batches-per-epoch 250] [--workers N] [--persistent | --no-persistent]

Without `--shards` it makes a synthetic shard set in a temporary folder; without `--config` the
loader is batch 8 of 2048 frames, 2 persistent workers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from loader_bench import BATCH, make_corpus

from pipeline.index import build_index
from pipeline.shard import write_shards
from trainer.data import ShardDataModule
from trainer.data.batch import tokenize
from trainer.data.datamodule import ShardLoader

DEFAULT_LOADER = {
    "seq_len": 2048,
    "batch_size": BATCH,
    "num_workers": 2,
    "persistent_workers": True,
}


@dataclass(frozen=True)
class Pss:
    """A process's proportional set size in MiB, and its anonymous part (heap and other private
    allocations: where a leak grows; the rest is mapped files, mostly shared libraries, whose
    PSS moves whenever another process on the machine maps or drops the same pages)."""

    total: float
    anon: float


@dataclass
class Sample:
    """PSS at one point of the run, of the main process and of each worker (by pid)."""

    batches: int
    epoch: int
    main: Pss
    workers: dict[int, Pss]

    def worker_sum(self) -> Pss:
        return Pss(
            sum(w.total for w in self.workers.values()), sum(w.anon for w in self.workers.values())
        )


def pss(pid: int) -> Pss:
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name] = int(value) / 1024
    return Pss(fields["Pss:"], fields["Pss_Anon:"])


def sample(batches: int, epoch: int) -> Sample:
    """The main process and its children: the DataLoader's workers are its only children."""
    main = os.getpid()
    children = [
        int(pid)
        for task in Path(f"/proc/{main}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    return Sample(batches, epoch, pss(main), {pid: pss(pid) for pid in sorted(children)})


def synthetic_shards(root: Path, tracks: int, seconds: float) -> Path:
    """loader_bench's WAV corpus in 4 MB shards, so every epoch of a stream opens new shards."""
    make_corpus(root / "audio", tracks, seconds)
    build_index(root / "audio" / "wav", root / "index.json", progress=False)
    write_shards(
        root / "index.json", root / "shards", progress=False, val=0.0, test=0.0, shard_bytes="4MB"
    )
    return root / "shards"


def loader_options(args: argparse.Namespace) -> dict:
    """The training config's loader (`data.init_args`, its manifest aside) or the default one."""
    if args.config is None:
        options = dict(DEFAULT_LOADER)
    else:
        options = yaml.safe_load(args.config.read_text())["data"]["init_args"]
        options.pop("manifest", None)
    if args.workers is not None:
        options["num_workers"] = args.workers
    if args.persistent is not None:
        options["persistent_workers"] = args.persistent
    options["batches_per_epoch"] = args.batches_per_epoch
    return options


def mid_epoch(batch: int, per_epoch: int) -> int:
    """The batch half-way through the epoch that holds `batch` (numbered from 1). Samples are
    taken there: mid-epoch a worker holds its stream's open shard and shuffle group, and at an
    epoch's end, its pass over, it has let go of both."""
    return (batch - 1) // per_epoch * per_epoch + max(1, per_epoch // 2)


def fake_trainer() -> SimpleNamespace:
    """What `ShardDataModule._where` reads of a Lightning Trainer at the start of an epoch: the
    epoch, and the batches of it already done (0: no resume)."""
    current = SimpleNamespace(ready=0)
    epoch_loop = SimpleNamespace(batch_progress=SimpleNamespace(current=current))
    return SimpleNamespace(current_epoch=0, fit_loop=SimpleNamespace(epoch_loop=epoch_loop))


def check_epoch(
    loader: ShardLoader, epoch: int, opening: torch.Tensor, zeroth: torch.Tensor
) -> None:
    """`opening`, the first batch the workers delivered in `epoch`, is the stream's first batch
    of that epoch (worker 0, stream 0, batch 0) and not epoch 0's: the epoch reached them."""
    expected = loader.dataset.batches(epoch, 0, 0)
    ids = tokenize(next(expected), loader.codec)["input_ids"]
    expected.close()
    if not torch.equal(opening, ids) or torch.equal(opening, zeroth):
        raise SystemExit(f"epoch {epoch}: the workers did not deliver epoch {epoch}'s batches")


def soak(
    loader: ShardLoader, trainer: SimpleNamespace, batches: int, points: set[int]
) -> tuple[list[Sample], list[float]]:
    """Iterate epoch after epoch as Lightning's fit loop does, `trainer.current_epoch` moving
    on after each; the samples and the time of each."""
    samples: list[Sample] = []
    times: list[float] = []
    done = 0
    while done < batches:
        opening = None
        for batch in loader:
            if opening is None:
                opening = batch["input_ids"]
            done += 1
            if done in points:
                times.append(time.perf_counter())
                samples.append(sample(done, trainer.current_epoch))
            if done == batches:
                break
        if trainer.current_epoch == 0:
            zeroth = opening
        elif trainer.current_epoch == 1:
            check_epoch(loader, 1, opening, zeroth)
        trainer.current_epoch += 1
    check_epoch(loader, trainer.current_epoch - 1, opening, zeroth)
    return samples, times


def growth(name: str, start: Pss, end: Pss) -> str:
    def change(a: float, b: float) -> str:
        return f"{b - a:+.1f} MiB ({100 * (b / a - 1):+.1f} %)"

    return (
        f"  {name:<18}PSS {change(start.total, end.total):<22}anon {change(start.anon, end.anon)}"
    )


def report(samples: list[Sample], times: list[float]) -> None:
    print(
        f"{'batches':>8}{'epoch':>7}{'main MiB':>10}{'anon':>8}{'workers':>9}{'workers MiB':>13}"
        f"{'anon':>8}{'max worker':>12}{'all MiB':>9}"
    )
    for s in samples:
        workers = s.worker_sum()
        largest = max((w.total for w in s.workers.values()), default=0.0)
        print(
            f"{s.batches:>8}{s.epoch:>7}{s.main.total:>10.1f}{s.main.anon:>8.1f}"
            f"{len(s.workers):>9}{workers.total:>13.1f}{workers.anon:>8.1f}{largest:>12.1f}"
            f"{s.main.total + workers.total:>9.1f}"
        )
    first, last = samples[0], samples[-1]
    print(f"growth from batch {first.batches} to {last.batches} (PSS, and its anonymous part):")
    print(growth("main", first.main, last.main))
    if first.workers:
        print(growth("workers", first.worker_sum(), last.worker_sum()))
        both = first.workers.keys() & last.workers.keys()
        if both:
            pid = max(both, key=lambda p: last.workers[p].anon - first.workers[p].anon)
            print(growth("most-grown worker", first.workers[pid], last.workers[pid]))
        else:
            print("  no worker lived through the run (workers not persistent)")
    rate = (last.batches - first.batches) / (times[-1] - times[0])
    print(f"{rate:.0f} batches/s after the warm-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="a shard set (default: a synthetic one)")
    parser.add_argument("--config", type=Path, help="a training config whose loader to use")
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--batches-per-epoch", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=1000, help="batches before the first sample")
    parser.add_argument("--every", type=int, default=2000, help="batches between samples")
    parser.add_argument("--workers", type=int, help="override the loader's num_workers")
    parser.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--tracks", type=int, default=8, help="synthetic corpus: tracks")
    parser.add_argument("--seconds", type=float, default=30.0, help="synthetic corpus: seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or synthetic_shards(Path(tmp), args.tracks, args.seconds)
        options = loader_options(args)
        dm = ShardDataModule(str(shards), **options)
        dm.trainer = fake_trainer()
        loader = dm.train_dataloader()
        hp, stream = dm.hparams, loader.dataset
        print(
            f"soak: {shards if args.shards else 'synthetic shards'} ({len(stream.split.urls)} "
            f"train shards of {stream.chunk_frames}-frame chunks), "
            f"{args.config or 'default loader'}: seq_len {hp.seq_len}, batch {hp.batch_size}, "
            f"{hp.num_workers} workers, persistent {hp.persistent_workers}, "
            f"shuffle_buffer {hp.shuffle_buffer}; {args.batches} batches in epochs of "
            f"{hp.batches_per_epoch}, {os.cpu_count()} cores"
        )
        every = range(args.every, args.batches + 1, args.every)
        targets = {args.warmup, args.batches, *(p for p in every if p > args.warmup)}
        points = {mid_epoch(p, args.batches_per_epoch) for p in targets}
        samples, times = soak(loader, dm.trainer, args.batches, points)
        epochs = dm.trainer.current_epoch
        print(f"{epochs} epochs; epochs 1 and {epochs - 1} delivered their own batches")
        report(samples, times)


if __name__ == "__main__":
    main()

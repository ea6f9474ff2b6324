"""GPU training benchmark: tokens/s, MFU and the loader's wait for configs/small.yaml per head
at L = 2048 and configs/small_patch.yaml at L = 16384, compile beside eager, side by side in
one run through the real loader and Lightning's fit (docs/benchmarks.md).

    python bench/gpu_bench.py [--steps 10] [--compile | --no-compile] [--peak-flops F]

Each row fits the config's model and data module (with the row's head) on a synthetic shard
set made first, for 1 + 2 x steps steps: the first step (compilation, allocator and kernel
warm-up; its seconds are "warm-up s"), a window of `steps` warm steps, then the timed window of
`steps`, measured by trainer.callbacks.ThroughputMonitor (one device sync per window; on a CPU
its window is one step, so there the figures are the last step's). On a GPU
the rows run under bf16-mixed and the timed steps under
``torch.cuda.set_sync_debug_mode("error")``: a host sync in a step fails it, the row says so
and is run again without the check. "f64 solve" is the share of the timed window spent in the
logistic head's float64 least-squares solve (``Predictor.solve``), "predictor" in its whole
float64 predictor (``Predictor.run``), timed with CUDA events on a GPU. Without a GPU it runs a
tiny variant of both configs as a smoke test (seconds in all): its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml

from pipeline.index import build_index
from pipeline.shard import write_shards
from pipeline.synth import make_corpus
from trainer.callbacks import ThroughputMonitor
from trainer.cli import trainer_defaults
from trainer.data import ShardDataModule
from trainer.model import StereoT5

ROOT = Path(__file__).resolve().parents[1]
CHUNK_FRAMES = 16384  # the patched config's window: one per chunk
# the CPU smoke: the configs' structure on a tiny body, short windows, batch 2, in-process loading
SMOKE_MODEL = dict(d_model=64, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=32)
SMOKE_PATCH = dict(local_d=32, local_layers=1, local_heads=2)
SMOKE_DATA = dict(batch_size=2, num_workers=0, pin_memory=False, persistent_workers=False)
SMOKE_LEN = {"small": 256, "small_patch": 2048}


@dataclass(frozen=True)
class Row:
    """One fit: a config, the head it trains with, and whether the body is compiled."""

    label: str
    config: str
    head: str
    compile: bool = False


ROWS = [
    Row("full", "small", "full"),
    Row("chunked", "small", "chunked"),
    Row("coarse_fine", "small", "coarse_fine"),
    Row("logistic", "small", "logistic"),
    Row("patched P=16", "small_patch", "coarse_fine"),
]
COMPILE_ROW = Row("coarse_fine+compile", "small", "coarse_fine", compile=True)
BASELINE = "coarse_fine"  # small.yaml's own head: the ratios' reference
# what Lightning says about every fit of this setup (a sized IterableDataset, the module's own
# on_before_batch_transfer, a deprecation inside Lightning): not about the row
QUIET = ("`IterableDataset` has `__len__`", "overridden `on_before_batch_transfer`", "LeafSpec")


class RegionTimer:
    """Seconds spent inside methods of objects while ``active``: CUDA events on a GPU (no host
    sync; read once the device is done, by ``seconds``), the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.active = False
        self._events: dict[str, list[tuple[Any, Any]]] = {}
        self._host: dict[str, float] = {}

    def wrap(self, owner: object, method: str, name: str) -> None:
        """Replace ``owner.method`` by a timed call of it, accounted under ``name``."""
        inner: Callable[..., Any] = getattr(owner, method)
        self._events[name], self._host[name] = [], 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return inner(*args, **kwargs)
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                out = inner(*args, **kwargs)
                end.record()
                self._events[name].append((start, end))
                return out
            began = time.perf_counter()
            out = inner(*args, **kwargs)
            self._host[name] += time.perf_counter() - began
            return out

        setattr(owner, method, timed)

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self._events.items()}
        return dict(self._host)


class TimedWindow(pl.Callback):
    """Times the first step (warm-up) and, on the timed window's steps, turns the region timer
    and (on a GPU) the sync check on. Placed before ThroughputMonitor, so that the check is off
    again before the monitor's own sync at a window's end."""

    def __init__(self, first_timed: int, timer: RegionTimer, check_syncs: bool) -> None:
        self.first_timed, self.timer, self.check_syncs = first_timed, timer, check_syncs
        self.warmup_s = self.timed_s = 0.0  # the first step; the timed steps, start to end
        self._began = self._timed_began = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self._began = time.perf_counter()
        if batch_idx == self.first_timed:
            self._timed_began = time.perf_counter()
        if batch_idx >= self.first_timed:
            self.timer.active = True
            if self.check_syncs:
                torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.check_syncs:
            torch.cuda.set_sync_debug_mode("default")
        self.timer.active = False
        if batch_idx == 0 or batch_idx == trainer.max_steps - 1:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            if batch_idx == 0:
                self.warmup_s = time.perf_counter() - self._began
            else:
                self.timed_s = time.perf_counter() - self._timed_began


@contextmanager
def shard_set() -> Iterator[Path]:
    """A synthetic corpus (pipeline.synth) indexed and sharded in chunks of CHUNK_FRAMES: the
    loader cycles over it, so a small set feeds any number of steps."""
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        root = Path(tmp)
        make_corpus(root / "audio", tracks=4, seconds=4.0, seed=0)
        build_index(root / "audio", root / "index.json", progress=False)
        index, shards = root / "index.json", root / "shards"
        write_shards(index, shards, chunk_frames=CHUNK_FRAMES, progress=False)
        yield shards


def row_parts(row: Row, smoke: bool) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """The row's model arguments, data-module arguments and gradient clip from its config,
    shrunk to the smoke variant without a GPU."""
    config = yaml.safe_load((ROOT / "configs" / f"{row.config}.yaml").read_text())
    model = {**config["model"], "head": row.head, "compile": row.compile}
    data = dict(config["data"]["init_args"])
    if smoke:
        model.update(SMOKE_MODEL, **(SMOKE_PATCH if "patch_size" in model else {}))
        data.update(SMOKE_DATA, seq_len=SMOKE_LEN[row.config])
    model.update(codec=data["codec"], max_len=data["seq_len"])  # what the CLI links
    return model, data, config["trainer"].get("gradient_clip_val")


def fit_row(row: Row, shards: Path, args: argparse.Namespace, check_syncs: bool) -> dict:
    """Fit one row for 1 + 2 x steps steps; its timed window's figures."""
    smoke = not torch.cuda.is_available()
    model_args, data_args, clip = row_parts(row, smoke)
    steps = args.steps or (2 if smoke else 10)
    total = 1 + 2 * steps
    data_args.update(manifest=str(shards), batches_per_epoch=total)
    pl.seed_everything(0, verbose=False)
    model = StereoT5(**model_args)
    device = torch.device("cuda" if not smoke else "cpu")
    timer = RegionTimer(device)
    if row.head == "logistic":
        timer.wrap(model.head.predictor, "solve", "solve")
        timer.wrap(model.head.predictor, "run", "predictor")
    window = TimedWindow(1 + steps, timer, check_syncs)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision=trainer_defaults()["precision"],
        max_steps=total, gradient_clip_val=clip, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, log_every_n_steps=1,
        callbacks=[window, ThroughputMonitor(sync_every=steps, peak_flops=args.peak_flops)],
    )  # fmt: skip
    trainer.fit(model, ShardDataModule(**data_args))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tokens = data_args["batch_size"] * data_args["seq_len"]
    window_s = steps * tokens / metrics["train/tokens_per_s"]
    return {
        "L": data_args["seq_len"],
        "P": model_args.get("patch_size", 1),
        "batch": data_args["batch_size"],
        "s_per_step": window_s / steps,
        "tokens_per_s": metrics["train/tokens_per_s"],
        "mfu": metrics.get("train/mfu"),
        "data_wait": metrics["train/data_wait_frac"],
        "warmup_s": window.warmup_s,
        "shares": {k: v / window.timed_s for k, v in timer.seconds().items()},
    }


def run_row(row: Row, shards: Path, args: argparse.Namespace) -> dict:
    """A row with the sync check on a GPU; a step that syncs fails it, and the row is then run
    again without the check so that its figures still come."""
    if not torch.cuda.is_available():
        return {**fit_row(row, shards, args, check_syncs=False), "syncs": "n/a (CPU)"}
    try:
        return {**fit_row(row, shards, args, check_syncs=True), "syncs": "none"}
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        torch.cuda.set_sync_debug_mode("default")
        print(f"{row.label}: a host sync in a timed step: {str(exc).splitlines()[0]}")
        return {**fit_row(row, shards, args, check_syncs=False), "syncs": "SYNCS"}
    finally:
        torch.cuda.empty_cache()


def print_table(results: dict[str, dict]) -> None:
    base = results[BASELINE]
    print(
        f"{'row':<21}{'L':>6}{'P':>3}{'batch':>6}{'s/step':>9}{'tokens/s':>11}"
        f"{'vs ' + BASELINE:>16}{'MFU':>7}{'data wait':>10}{'f64 solve':>10}{'predictor':>10}"
        f"{'warm-up s':>10}  host syncs"
    )
    for label, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        solve, predictor = (
            f"{r['shares'][k]:.1%}" if k in r["shares"] else "-" for k in ("solve", "predictor")
        )
        print(
            f"{label:<21}{r['L']:>6}{r['P']:>3}{r['batch']:>6}{r['s_per_step']:>9.3f}"
            f"{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / base['tokens_per_s']:>15.2f}x"
            f"{mfu:>7}{r['data_wait']:>10.1%}{solve:>10}{predictor:>10}{r['warmup_s']:>10.1f}"
            f"  {r['syncs']}"
        )
    if COMPILE_ROW.label in results:
        compiled = results[COMPILE_ROW.label]
        print(
            f"compile: a steady step {base['s_per_step'] / compiled['s_per_step']:.2f}x eager's "
            f"speed; its first step {compiled['warmup_s']:.1f} s against eager's "
            f"{base['warmup_s']:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="steps per window (default: GPU 10, CPU 2)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="add the compile row (default: on a GPU only; the CPU's first step is minutes)",
    )
    parser.add_argument("--peak-flops", type=float, help="the device's bf16 peak, for MFU")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    for message in QUIET:
        warnings.filterwarnings("ignore", message=f".*{message}")
    gpu = torch.cuda.is_available()
    rows = ROWS + ([COMPILE_ROW] if (gpu if args.compile is None else args.compile) else [])
    if gpu:
        device = f"GPU {torch.cuda.get_device_name()}, {trainer_defaults()['precision']}"
    else:
        device = (
            f"no GPU: the CPU smoke test ({torch.get_num_threads()} threads, fp32, a tiny "
            f"body {SMOKE_MODEL}, batch {SMOKE_DATA['batch_size']}, in-process loading): "
            "these are not GPU figures"
        )
    print(f"gpu bench: {device}; configs small.yaml per head and small_patch.yaml")
    began = time.perf_counter()
    with shard_set() as shards:
        results = {row.label: run_row(row, shards, args) for row in rows}
    print_table(results)
    print(
        f"total {time.perf_counter() - began:.0f} s; 1-min load average at the end "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()

"""Loading a StereoT5 checkpoint to run it: a Lightning ``.ckpt`` (read by the one checkpoint
reader, `trainer.model.weights.model_from_checkpoint`) or a ``save_pretrained`` folder, what it
says about the data it was trained on (sample rate, window), and the runtime options (device,
threads) that `evaluate` and `predict` share."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from pipeline.codec import Codec, get_codec
from pipeline.errors import PipelineError
from pipeline.records import Manifest
from trainer.model import ModelError, StereoT5
from trainer.model.weights import META_NAME, model_from_checkpoint

__all__ = [
    "LoadedModel",
    "add_runtime_options",
    "apply_runtime_options",
    "load_model",
    "resolve_seq_len",
]


@dataclass
class LoadedModel:
    """A StereoT5 in eval mode and what its checkpoint says about how it was trained.

    Attributes:
        kind: ``lightning`` (a ``.ckpt``) or ``export`` (a ``save_pretrained`` folder).
        sample_rate: the training shards' rate when the checkpoint leads to it, else None.
        sample_rate_source: where ``sample_rate`` came from, or why it is unknown.
        train_seq_len: the training window when the checkpoint records the data config.
    """

    path: Path
    kind: str
    model: StereoT5
    sample_rate: int | None
    sample_rate_source: str
    train_seq_len: int | None

    @property
    def codec(self) -> Codec:
        return self.model.codec

    @property
    def max_len(self) -> int:
        return int(self.model.hparams.max_len)


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _manifest_rate(manifest: Any, what: str) -> tuple[int | None, str]:
    """The rate of the recorded training shards: one set's path, or the first of a mixture's
    `[{path, weight}]` (mixed sets share their rate, trainer/data/mixing.py)."""
    if isinstance(manifest, list) and manifest and isinstance(manifest[0], dict):
        manifest = manifest[0].get("path")
    if not manifest:
        return None, f"{what}: no shard manifest recorded"
    try:
        rate = Manifest.load(Path(manifest)).config.sample_rate
    except PipelineError:
        return None, f"the training shards {manifest} (from the {what}) are not readable here"
    return int(rate), f"training shards {manifest} (from the {what})"


def _export_data_config(folder: Path) -> tuple[dict, str]:
    """The `data.init_args` of the LightningCLI config.yaml beside an export folder (on_fit_end
    exports into the run's log_dir, where LightningCLI saves config.yaml), and what was read."""
    config = folder.parent / "config.yaml"
    if not config.is_file():
        return {}, f"no config.yaml beside the export folder {folder.name}"
    try:
        import yaml

        data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    except Exception:
        return {}, f"{config} (not readable)"
    init_args = data.get("init_args") if isinstance(data, dict) else None
    return dict(init_args or {}), str(config)


def load_model(ckpt: str | Path, device: str | None = None) -> LoadedModel:
    """A Lightning ``.ckpt`` of StereoT5 or a ``save_pretrained`` folder -> model in eval mode.

    Raises:
        ModelError: a missing path, a file that is not a StereoT5 checkpoint, a folder without
            ``stereo_t5.json``, weights that do not fit.
    """
    path = Path(ckpt)
    if not path.exists():
        raise ModelError(
            f"{path}: missing: no checkpoint here; pass a .ckpt file or an export folder"
        )
    if path.is_dir():
        if not (path / META_NAME).is_file():
            raise ModelError(
                f"{path}: a folder without {META_NAME}: pass a .ckpt or a folder written by "
                "StereoT5.save_pretrained (the run's export/)"
            )
        model = StereoT5.from_pretrained(path)
        data, what = _export_data_config(path)
        kind = "export"
    else:
        model, data = model_from_checkpoint(path)
        what = (
            "checkpoint's datamodule hyperparameters"
            if data
            else "no data config in the checkpoint"
        )
        kind = "lightning"
    if model.hparams.get("sample_rate"):  # a future model that records its rate itself
        rate, source = int(model.hparams["sample_rate"]), "the model's hyperparameters"
    elif data.get("sample_rate"):
        rate, source = int(data["sample_rate"]), what
    elif data:
        rate, source = _manifest_rate(data.get("manifest"), what)
    else:
        rate, source = None, what
    seq_len = data.get("seq_len")
    model = model.to(_device(device)).eval()
    return LoadedModel(path, kind, model, rate, source, int(seq_len) if seq_len else None)


def resolve_seq_len(
    loaded: LoadedModel,
    seq_len: int | None,
    codec: str | None = None,
    chunk_frames: int | None = None,
) -> int:
    """Check what the user asks against the checkpoint; return the window length to use.

    The shards hold uint16 PCM, so any codec could be applied to them: the checkpoint's codec is
    the one that must be. Default window: the training window (else max_len), at most a chunk.

    Raises:
        ModelError: ``codec`` differs from the checkpoint's, or ``seq_len`` exceeds its max_len
            (the relative-attention span it was built for), is < 1 or is not a multiple of its
            patch_size.
    """
    if codec is not None and get_codec(codec).name != loaded.codec.name:
        raise ModelError(
            f"{loaded.path}: trained with codec {loaded.codec.name}, asked for "
            f"{get_codec(codec).name}; the shards hold 16-bit PCM and take the checkpoint's "
            f"codec: drop --codec or pass --codec {loaded.codec.name}"
        )
    patch = loaded.model.patch_size
    if seq_len is None:
        seq_len = min(loaded.train_seq_len or loaded.max_len, loaded.max_len)
        if chunk_frames:
            seq_len = min(seq_len, chunk_frames)
        seq_len -= seq_len % patch  # a patched model reads whole patches
    if seq_len < 1:
        raise ModelError(f"seq_len must be >= 1, got {seq_len}")
    if seq_len % patch:
        raise ModelError(
            f"{loaded.path}: seq_len {seq_len} is not a multiple of the model's patch_size "
            f"{patch}: use --seq-len {max(patch, seq_len - seq_len % patch)}"
        )
    if seq_len > loaded.max_len:
        raise ModelError(
            f"{loaded.path}: seq_len {seq_len} is above the checkpoint's max_len "
            f"{loaded.max_len} (the window its relative attention was built for): use "
            f"--seq-len {loaded.max_len} or less"
        )
    return seq_len


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options `evaluate` and `predict` share: where and how fast the model runs."""
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is often fastest for small models, "
        "which decode one sample per step",
    )
    parser.add_argument("--no-progress", action="store_true")


def apply_runtime_options(args: argparse.Namespace) -> None:
    transformers_logging.disable_progress_bar()  # "Loading weights" of an export folder
    if args.threads:
        torch.set_num_threads(args.threads)

"""`python -m trainer fit|validate|test --config configs/tiny.yaml` (LightningCLI).

YAML keys are the constructor arguments of `trainer.model.StereoT5` (`model:`), of a DataModule
(`data:` with a `class_path`: `trainer.data.ShardDataModule` or `SeedStereoDataModule`) and of
the Lightning Trainer (`trainer:`). `python -m trainer fit --help` lists them all. Errors, the
parser's included, reach the user as one `error:` line (`pipeline.errors.run_cli`).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentError
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from pipeline.errors import UserError, run_cli
from pipeline.fsutil import atomic_path
from trainer.callbacks import ExportOnFitEnd, ThroughputMonitor
from trainer.model import StereoT5
from trainer.model.weights import SAFE_GLOBALS, read_checkpoint


def wandb_mode_default() -> None:
    """W&B stays offline unless the user chose a mode or logged in (key in env or netrc)."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


class RunCheckpoint(ModelCheckpoint):
    """Checkpoints in `<default_root_dir>/checkpoints`, not in a logger's version folder, so
    `--ckpt_path last` finds the last one whichever logger versions the run; and `last.ckpt`
    at every validation (Lightning writes it only with a new best, so a killed run would go
    back to its best step, not to its last validation)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        written = self._last_global_step_saved == trainer.global_step
        if self.save_last and not written and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def place(self, trainer: pl.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.place(trainer)
        if trainer.is_global_zero and os.path.isdir(self.dirpath):
            remove_partial_checkpoints(Path(self.dirpath))
        super().setup(trainer, pl_module, stage)


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete the temporary files of checkpoint saves a killed run left (`SafeCheckpointIO`
    writes `.NAME.ckpt.XXXX.tmp` beside `NAME.ckpt`); the paths removed."""
    stale = sorted(folder.glob(".*.ckpt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with every load through ``read_checkpoint`` (weights_only and
    the allow-list), whatever ``weights_only`` Lightning passes (``fit --ckpt_path`` gives
    None, which Lightning turns into a full unpickle); and local saves written beside their
    target and renamed onto it. (Lightning's own save goes through a temporary file in the
    system's temp folder, which is a copy, not a rename, on another filesystem: a kill in
    the copy leaves a partial checkpoint under the final name.)"""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # serialized first: a refused write then keeps its errno
        torch.save(checkpoint, buffer)
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())


def trainer_defaults() -> dict:
    """bf16-mixed on a GPU (T5 overflows in fp16), fp32 on CPU; checkpoints last + best; the
    export at the end of fit."""
    return {
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "callbacks": [
            RunCheckpoint(
                monitor="val/bits_per_sample",
                enable_version_counter=False,  # a resumed run overwrites last.ckpt
                mode="min",
                save_last=True,
                filename="best-step{step}-bps{val/bits_per_sample:.4f}",
                auto_insert_metric_name=False,
            ),
            ThroughputMonitor(),
            ExportOnFitEnd(),
        ],
    }


def default_loggers(root: str) -> list:
    """CSV always, W&B beside it (offline unless the user chose otherwise): both in `root`."""
    name = Path(root).resolve().name
    return [CSVLogger(root, name="csv"), WandbLogger(project="stereotok", save_dir=root, name=name)]


class StereoCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """Without `trainer.logger` in the config, log to CSV and W&B under default_root_dir
        (a YAML logger list cannot follow a --trainer.default_root_dir given on the command
        line); `logger: false` still turns logging off. Checkpoints are read by
        `SafeCheckpointIO` unless the config names a checkpoint IO of its own."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not the user's own
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, RunCheckpoint):  # now: `--ckpt_path last` is resolved
                callback.place(trainer)  # before any callback's setup runs
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        # one codec and one window length for the data and the model
        parser.link_arguments(
            "data", "model.codec", apply_on="instantiate", compute_fn=lambda dm: dm.hparams.codec
        )
        parser.link_arguments(
            "data",
            "model.max_len",
            apply_on="instantiate",
            compute_fn=lambda dm: dm.hparams.seq_len,
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters into the config before anything
        is built (``weights_only=True``): give its load the same allow-list, and when it fails,
        let ``read_checkpoint`` say why in one line (the file is read once when it is fine)."""
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                super()._parse_ckpt_path()
        except Exception:
            subcommand = self.config.get("subcommand")
            path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if path:
                read_checkpoint(path)
            raise

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` is ours (trainer.evaluation.predict), not LightningCLI's
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}


class ParserError(UserError):
    """A bad command line or config, as the parser saw it."""


def _run(args: list[str] | None) -> None:
    try:
        StereoCLI(
            StereoT5,
            pl.LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults(),
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except ArgumentError as exc:
        raise ParserError(f"{one_line(str(exc))}; see python -m trainer fit --help") from None


_STRUCTURE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class")


def one_line(message: str) -> str:
    """jsonargparse's nested message on one line: the key, then the lines that say what is
    wrong (a union's "tried these types" scaffolding dropped), whitespace folded."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    said = [line.lstrip("- ") for line in lines[1:] if not line.startswith(_STRUCTURE)]
    return " ".join(" ".join([lines[0], *said]).split())


def main(args: list[str] | None = None) -> int:
    """Run the command; 0 when it finished. A user error exits 2 after its one `error:` line
    (SystemExit, as argparse does, also when called in-process)."""
    wandb_mode_default()
    # Our IterableDatasets know their per-rank length and split work per worker themselves.
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
    # `python -m trainer fit ...` hands its own argv on as `args`, which LightningCLI warns of
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # StereoT5 checks tokens in its own on_before_batch_transfer, on purpose (no host sync)
    warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer`")
    code = run_cli(lambda: _run(args))
    if code:
        raise SystemExit(code)
    return 0

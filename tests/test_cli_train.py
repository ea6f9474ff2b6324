"""`python -m trainer` (LightningCLI), in-process: configs, logging, resume, clear errors."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from trainer.cli import main

REPO = Path(__file__).parent.parent


def _args(shard_dir, root: Path, *extra: str, config: str = "tiny") -> list[str]:
    """A tiny body on the fixture shards, 3 steps; `extra` overrides any of it."""
    options = {
        "--config": str(REPO / "configs" / f"{config}.yaml"),
        "--data.init_args.manifest": str(shard_dir),
        "--data.init_args.num_workers": "0",
        "--data.init_args.batches_per_epoch": "4",
        "--data.init_args.seq_len": "256",
        "--model.d_model": "32",
        "--model.d_ff": "64",
        "--model.num_heads": "2",
        "--model.num_layers": "1",
        "--model.num_decoder_layers": "1",
        "--trainer.max_steps": "3",
        "--trainer.val_check_interval": "3",
        "--trainer.limit_val_batches": "2",
        "--trainer.default_root_dir": str(root),
        "--trainer.enable_progress_bar": "false",
    }
    return ["fit", *(item for pair in options.items() for item in pair), *extra]


def test_fit_logs_csv_and_offline_wandb_then_resumes_from_last(shard_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(_args(shard_dir, tmp_path))
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and "val/bits_per_sample" in metrics[0].read_text()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    main(_args(shard_dir, tmp_path, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
    with open(tmp_path / "csv" / "version_1" / "metrics.csv") as f:
        steps = {int(row["step"]) for row in csv.DictReader(f)}
    assert steps == {5}  # validated at step 6 only: it went on from step 3, it did not restart


def test_seq_len_above_the_chunk_fails_before_training(shard_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(shard_dir, tmp_path, "--data.init_args.seq_len", "999999"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seq_len 999999 is larger than the shards' chunk" in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("task", ["continuation", "denoise", "bitdepth", "codec"])
def test_every_task_config_trains_a_few_steps(shard_dir, tmp_path, task):
    main(
        _args(
            shard_dir,
            tmp_path,
            "--trainer.max_steps",
            "2",
            "--trainer.logger",
            "false",
            config=f"tiny_{task}",
        )
    )
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2


@pytest.mark.parametrize("config", ["cpu", "gpu"])
def test_the_context_recipes_train_with_the_body_window_inside_the_sequence(
    shard_dir, tmp_path, config
):
    """cpu.yaml and gpu.yaml (here on the CPU, gpu.yaml's bf16 autocast included): the body
    attends within windows of 64 of each 256-sample sequence, the predictor over all of it."""
    extra = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.callbacks", "[]"]
    extra += ["--model.body_window", "64", "--trainer.logger", "false"]
    extra += ["--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2"]
    main(_args(shard_dir, tmp_path, *extra, "--data.init_args.persistent_workers", "false",
               "--data.init_args.pin_memory", "false", config=config))  # fmt: skip
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert last["hyper_parameters"]["body_window"] == 64
    assert last["hyper_parameters"]["head"]["init_args"]["cascade"] == [1024, 256, 32]


def test_patched_config_trains_and_a_window_off_the_patch_fails_first(shard_dir, tmp_path, capsys):
    main(_args(shard_dir, tmp_path, "--trainer.logger", "false", config="tiny_patch"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3 and last["hyper_parameters"]["patch_size"] == 16
    other = tmp_path / "other"
    with pytest.raises(SystemExit) as exit_info:
        main(_args(shard_dir, other, "--data.init_args.seq_len", "250", config="tiny_patch"))
    assert exit_info.value.code == 2
    assert "seq_len (max_len) 250 is not a multiple of patch_size 16" in capsys.readouterr().err
    assert not list(other.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            ("--model.head", "{class_path: CoarseFineOptions, init_args: {chunk: 3}}"),
            "head coarse_fine has no option chunk: its options are none",
        ),
        (("--model.d_model", "abc"), 'Parser key "model.d_model": Expected a'),
        (("--model.no_such_option", "1"), "unrecognized arguments: --model.no_such_option"),
    ],
)
def test_parser_errors_are_one_line_and_exit_2(shard_dir, tmp_path, capsys, extra, says):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(shard_dir, tmp_path, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_last_checkpoint_is_written_at_every_validation_not_only_at_a_new_best(shard_dir, tmp_path):
    # lr 0: every validation scores the same, so only the first one is a new best
    main(_args(shard_dir, tmp_path, "--trainer.max_steps", "6", "--trainer.val_check_interval",
               "2", "--model.lr", "0", "--trainer.logger", "false"))  # fmt: skip
    folder = tmp_path / "checkpoints"
    assert [p.name.split("-bps")[0] for p in folder.glob("best-*")] == ["best-step2"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6


def test_just_train_passes_a_yaml_list_and_a_path_with_a_space_as_one_argument_each():
    """`just` recipes hand their arguments on word for word: the mixing form of `manifest`
    (braces, commas, spaces) reaches LightningCLI whole, not split and brace-expanded."""
    manifest = "[{path: shards/demo, weight: 3}, {path: my sets/b, weight: 1}]"
    done = subprocess.run(
        ["just", "train", "configs/tiny.yaml", "--print_config", "--data.init_args.manifest",
         manifest],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)["data"]["init_args"]["manifest"]
    assert data == [{"path": "shards/demo", "weight": 3}, {"path": "my sets/b", "weight": 1}]

"""The one checkpoint reader: a pickle that would run code is refused, unread, by every command
that opens a checkpoint, and an ordinary resume still works through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import TINY_MODEL
from test_cli_train import _args

import trainer.cli
from trainer.cli import main as fit_main
from trainer.evaluation import evaluate, predict
from trainer.model import ModelError, StereoT5


class _WritesAFile:
    """Unpickling this runs `exec`, which writes `marker`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _hostile_checkpoint(folder: Path, marker: Path) -> Path:
    model = StereoT5(codec="mulaw8", max_len=64, **TINY_MODEL)
    path = folder / "hostile.ckpt"
    hparams = {**dict(model.hparams), "note": _WritesAFile(marker)}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    return path


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = _hostile_checkpoint(tmp_path, marker)
    # the file is what it claims: loaded the unsafe way, it runs (on a copy with its own marker)
    probe = tmp_path / "probe"
    probe.mkdir()
    torch.load(_hostile_checkpoint(probe, probe / "marker"), weights_only=False)
    assert (probe / "marker").read_text() == "ran"
    return path, marker


def _one_error_line(err: str, path: Path) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0] and "refused unread" in lines[0], err


def test_init_from_refuses_it(hostile):
    path, marker = hostile
    with pytest.raises(ModelError, match="refused unread") as error:
        StereoT5(codec="mulaw8", max_len=64, init_from=str(path), **TINY_MODEL)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_evaluate_refuses_it(hostile, shard_dir, capsys):
    path, marker = hostile
    assert evaluate.main(["--ckpt", str(path), "--shards", str(shard_dir), "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, path)
    assert not marker.exists()


def test_predict_refuses_it(hostile, tmp_path, capsys):
    path, marker = hostile
    wav = tmp_path / "in.wav"
    sf.write(wav, torch.zeros(400, 2).numpy(), 16000, subtype="PCM_16")
    code = predict.main([str(wav), str(tmp_path / "out.wav"), "--ckpt", str(path)])
    assert code == 2
    _one_error_line(capsys.readouterr().err, path)
    assert not marker.exists() and not (tmp_path / "out.wav").exists()


def test_fit_ckpt_path_refuses_it_and_an_ordinary_resume_goes_through_the_same_reader(
    hostile, shard_dir, tmp_path, capsys, monkeypatch
):
    path, marker = hostile
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        fit_main(_args(shard_dir, root, "--trainer.logger", "false", "--ckpt_path", str(path)))
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, path)
    assert not marker.exists()

    fit_main(_args(shard_dir, root, "--trainer.logger", "false"))
    read, original = [], trainer.cli.read_checkpoint
    monkeypatch.setattr(trainer.cli, "read_checkpoint", lambda p: read.append(p) or original(p))
    steps = ("--trainer.max_steps", "6", "--ckpt_path", "last")
    fit_main(_args(shard_dir, root, "--trainer.logger", "false", *steps))
    last = root / "checkpoints" / "last.ckpt"
    assert [Path(p) for p in read] == [last]
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_a_checkpoint_with_the_flat_head_options_of_earlier_releases_loads_with_them(tmp_path):
    from trainer.model.heads import LogisticOptions
    from trainer.model.weights import model_from_checkpoint

    # what such a release built: no cascade, no learned mixing (options it did not have)
    options = LogisticOptions(2, 4, 1, 8, 0.9, cascade=[], cascade_mu=[], mix=False)
    model = StereoT5(codec="mulaw8", max_len=64, head=options, attn_tile=16, **TINY_MODEL)
    hparams = {k: v for k, v in dict(model.hparams).items() if k not in ("head", "attn_tile")}
    flat = dict(head="logistic", mixtures=2, lpc_order=4, lpc_taps=1, lpc_block=8, lpc_forget=0.9)
    old = {**hparams, **flat, "attn_block": 16, "head_chunk": 256, "log_audio_every": 0}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": old}, path)
    loaded, data = model_from_checkpoint(path)
    assert loaded.head_options == options and loaded.hparams.attn_tile == 16 and data == {}
    batch = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        a, b = model.eval().score(batch, batch), loaded.score(batch, batch)
    assert torch.equal(a["nll"], b["nll"])

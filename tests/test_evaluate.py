"""Evaluation, prediction and signal baselines on the fixture shards with tiny models."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile as sf
import torch
from conftest import TINY_MODEL
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from pipeline.audio import read
from pipeline.records import Manifest
from trainer.callbacks import ExportOnFitEnd
from trainer.data import ShardDataModule
from trainer.evaluation import evaluate as evaluate_module
from trainer.evaluation import predict as predict_module
from trainer.evaluation.baselines import (
    best_gain,
    copy_snr,
    fir_apply,
    flac_bits,
    level_entropy,
    ls_fir,
    snr_db,
    to_int16,
)
from trainer.evaluation.evaluate import evaluate
from trainer.evaluation.loading import load_model
from trainer.evaluation.predict import predict
from trainer.evaluation.report import Bits, CoderRows, learning_checks
from trainer.evaluation.restore import default_overlap, estimate_range
from trainer.evaluation.runs import read_pieces
from trainer.evaluation.segments import join_chunks
from trainer.model import ModelError, StereoT5

TINY = dict(**TINY_MODEL, max_len=256, warmup_steps=1)
SEQ = 64  # evaluation/prediction window
RATE = 16000  # the fixture shards' rate
REPORT_KEYS = {
    *("format", "ckpt", "ckpt_kind", "shards", "split", "direction", "sample_rate", "files"),
    *("codec", "codec_exact", "bits_comparable_to_flac", "model", "config", "counts"),
    *("bits_per_sample", "per_source", "coders", "teacher_forced"),
    *("restoration", "training_curve", "timing", "warnings", "checks"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run small ops: several intra-op threads contending for a few cores make
    them many times slower than one thread (docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(shard_dir, tmp_path_factory) -> Path:
    """A 2-step fit on the fixture shards: checkpoints/, csv/version_0/{metrics.csv,export}."""
    root = tmp_path_factory.mktemp("run")
    data = ShardDataModule(
        str(shard_dir), seq_len=256, batch_size=4, num_workers=0, batches_per_epoch=2, seed=0
    )
    model = StereoT5(codec="pcm16", head="coarse_fine", estimate={"weight": 1.0}, **TINY)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=CSVLogger(root, name="csv"),
        callbacks=[
            ModelCheckpoint(dirpath=root / "checkpoints", save_last=True),
            ExportOnFitEnd(),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers and small-batch advice
        trainer.fit(model, data)
    return root


@pytest.fixture(scope="module")
def ckpt(run) -> Path:
    return run / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------ baselines


def test_copy_of_an_identical_channel_has_very_high_snr():
    x = np.random.default_rng(0).integers(-20000, 20000, 4096).astype(np.int16)
    assert copy_snr(x, x.copy()) > 90  # error 0: 10 log10 of the signal energy (~127 dB)
    assert copy_snr(x, (x // 2).astype(np.int16)) < 10


def test_best_gain_recovers_the_scale_of_a_scaled_channel():
    x = np.random.default_rng(1).normal(0, 3000, 4096)
    assert best_gain(x, -0.37 * x) == pytest.approx(-0.37, rel=1e-12)
    assert best_gain(np.zeros(8), np.ones(8)) == 0.0


@pytest.mark.parametrize("causal", [False, True])
def test_least_squares_fir_recovers_a_known_short_filter_on_noiseless_data(causal):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1000, 2048)
    h = np.array([0.5, -0.25, 0.125, 0.8, -0.1])
    y = np.convolve(x, h)[: len(x)]  # causal FIR, zero initial state
    fitted = ls_fir(x, y, taps=32, causal=causal)
    at = 0 if causal else 16  # two-sided taps are lags -16..15: lag 0 sits at index 16
    expected = np.zeros(32)
    expected[at : at + len(h)] = h
    np.testing.assert_allclose(fitted, expected, atol=1e-9)
    np.testing.assert_allclose(fir_apply(x, fitted, causal), y, atol=1e-6)
    assert snr_db(y, fir_apply(x, fitted, causal)) > 90


def test_flac_of_a_duplicated_channel_costs_almost_nothing_given_the_input():
    x = np.random.default_rng(3).integers(-8000, 8000, 4096).astype(np.int16)
    cost = flac_bits(np.stack([x, x]), RATE)
    assert cost.alone > 10  # white noise: about 14 bits
    assert cost.given_input < 0.5  # FLAC's side channel is all zeros


def test_level_entropy_of_a_uniform_histogram_is_log2_of_its_levels():
    assert level_entropy(np.array([5, 5, 5, 5, 0, 0])) == pytest.approx(2.0)
    assert level_entropy(np.zeros(4)) == 0.0


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_writes_json_markdown_and_png_with_every_field(ckpt, shard_dir, run):
    report = evaluate(
        ckpt, shard_dir, generate=3, seq_len=SEQ, batch_size=8, progress=False
    ).to_json()
    out = ckpt.parent / "eval-test"  # the default: beside the checkpoint
    data = json.loads((out / "report.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert set(data) >= REPORT_KEYS, REPORT_KEYS - set(data)
    assert data["ckpt_kind"] == "lightning" and data["codec"] == "pcm16"
    assert data["model"]["train_sample_rate"] == RATE  # found through the datamodule's manifest
    bits = data["bits_per_sample"]
    assert bits.pop("model_untrained") is None  # only the logistic head has one
    given = bits.pop("given_input")
    assert set(given) == {"flac", "wavpack", "sac"} and math.isfinite(given["flac"])
    assert set(bits) == {"model", "flac_target_alone", "level_entropy"}
    assert all(math.isfinite(v) for v in bits.values())
    flac_margin = bits["flac_target_alone"] - bits["model"]
    restoration = data["restoration"]
    pooled = restoration["pooled"]
    estimate_margin = pooled["estimate"] - pooled["train_fir"]
    assert data["checks"] == [
        {
            "check": "estimate at least as good as the training-split least-squares filter",
            "by": estimate_margin,
            "passed": estimate_margin >= 0,
            "unit": "dB",
        },
        {
            "check": "below FLAC of target alone",
            "by": flac_margin,
            "passed": flac_margin > 0,
            "unit": "bits/sample",
        },
    ]
    counts = data["counts"]
    manifest = Manifest.load(shard_dir)
    test_chunks = manifest.samples("test")
    assert counts["chunks"] == test_chunks
    assert counts["samples_scored"] == test_chunks * 4096  # every frame once
    assert data["training_curve"] == str(run / "csv" / "version_0" / "metrics.csv")
    # the modes and baselines ran on the first 3 chunks of each scored segment, no more
    segments = join_chunks(read_pieces(_split(shard_dir, "test")))
    want = {}
    for segment in segments:
        want[segment.source] = want.get(segment.source, 0) + min(3, len(segment.chunks)) * 4096
    assert {s["source"]: s["frames"] for s in restoration["per_source"]} == want
    assert restoration["train"]["chunks"] == manifest.samples("train")  # all: under the cap
    # the oracle filter is fitted on each window: no 32-tap filter does better there, copy and
    # the training split's filter included
    for row in (*restoration["per_source"], {"snr_db": pooled}):
        snr = row["snr_db"]
        assert snr["oracle"] >= max(snr["copy"], snr["train_fir"], snr["train_gain"]) - 0.05

    # the model's bits are the exact sum over the split, as the test loop computes them
    loader = ShardDataModule(
        str(shard_dir), seq_len=SEQ, batch_size=8, num_workers=0, codec="pcm16", direction="l2r"
    ).test_dataloader()
    model = load_model(ckpt).model
    nll = count = 0.0
    with torch.no_grad():
        for batch in loader:
            scored = model.score(batch["input_ids"], batch["labels"])
            nll += float(scored["nll_sum"])
            count += int(scored["count"])
    assert data["bits_per_sample"]["model"] == pytest.approx(nll / count / math.log(2), rel=1e-6)

    md = (out / "report.md").read_text()
    for row in (
        "| model (teacher-forced) |",
        "| FLAC -8 of target given input |",
        "| FLAC -8 of target alone |",
        "| source | frames | segments | model | untrained | FLAC -8 | WavPack -hhx6 |",
        "- context window: windows of 64, each scored on its own",
        "| level entropy of target (pcm16) |",
        "| source | corr. | estimate | render | its linear part | copy | train gain |",
        "| **pooled** | |",
        "| pooled, correlation >= 0.5 | |",
        "- render's level within 3 dB of the truth's: ",
        "- repair's seams within the truth's 99th-percentile step nearby: ",
    ):
        assert row in md, row
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_report_round_trips_through_report_json(ckpt, shard_dir, tmp_path):
    report = evaluate(
        ckpt, shard_dir, max_chunks=1, generate=1, seq_len=SEQ, out=tmp_path, progress=False
    )
    data = json.loads(Path(report.files.json).read_text())
    assert report.to_json() == data
    assert set(data) >= REPORT_KEYS, REPORT_KEYS - set(data)
    assert report.bits_per_sample.model == data["bits_per_sample"]["model"]
    assert report.counts.chunks == 1 == data["counts"]["chunks"]
    assert report.restoration.pooled["estimate"] == data["restoration"]["pooled"]["estimate"]
    assert [c.check for c in report.checks] == [c["check"] for c in data["checks"]]
    assert Path(report.files.md).read_text().startswith("# Evaluation: test split")


def test_a_lossy_codec_export_folder_labels_its_bits_as_lossy(shard_dir, tmp_path, capsys):
    folder = StereoT5(codec="mulaw8", head="full", **TINY).save_pretrained(tmp_path / "export")
    code = evaluate_module.main(
        [
            "--ckpt",
            str(folder),
            "--shards",
            str(shard_dir),
            "--split",
            "val",
            "--generate",
            "1",
            "--seq-len",
            str(SEQ),
            "--direction",
            "r2l",
            "--max-chunks",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits of the lossy mulaw8 signal, not comparable to FLAC" in printed
    assert "no restoration section: the model has no estimate head" in printed
    report = json.loads((tmp_path / "eval-val" / "report.json").read_text())  # beside the export
    assert report["ckpt_kind"] == "export" and report["bits_comparable_to_flac"] is False
    assert report["direction"] == "r2l" and report["counts"]["chunks"] == 1
    assert report["training_curve"] is None
    assert (tmp_path / "eval-val" / "report.png").is_file()


def test_a_codec_or_window_the_checkpoint_was_not_built_for_is_a_clear_error(
    ckpt, shard_dir, tmp_path, capsys
):
    out = tmp_path / "never"
    with pytest.raises(ModelError, match="trained with codec pcm16, asked for mulaw8"):
        evaluate(ckpt, shard_dir, codec="mulaw", out=out, progress=False)
    with pytest.raises(ModelError, match="above the checkpoint's max_len 256"):
        evaluate(ckpt, shard_dir, seq_len=512, out=out, progress=False)
    args = ["--ckpt", str(ckpt), "--shards", str(shard_dir), "--out", str(out)]
    assert evaluate_module.main([*args, "--codec", "linear8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--codec pcm16" in err
    missing = ["--ckpt", str(tmp_path / "missing.ckpt"), "--shards", str(shard_dir)]
    assert evaluate_module.main(missing) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    assert not out.exists()


def test_a_checkpoint_whose_weights_do_not_fit_its_model_is_one_clear_line(
    ckpt, shard_dir, tmp_path, capsys
):
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    dropped = sorted(k for k in saved["state_dict"] if k.startswith("head."))[0]
    del saved["state_dict"][dropped]  # as if written by a version without that layer
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    args = ["--ckpt", str(old), "--shards", str(shard_dir), "--out", str(tmp_path / "never")]
    assert evaluate_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {old}: weights do not fit") and err.count("\n") == 1
    assert f'Missing key(s) in state_dict: "{dropped}"' in err and "train again" in err
    assert not (tmp_path / "never").exists()


def test_learning_checks_compare_with_flac_and_with_the_untrained_head():
    bits = Bits(
        model=5.0,
        model_untrained=5.5,
        given_input=CoderRows(flac=3.0, wavpack=None, sac=None),
        flac_target_alone=6.25,
        level_entropy=7.0,
    )
    checks = [asdict(c) for c in learning_checks(bits, True, None)]
    assert [(c["check"], c["by"], c["passed"]) for c in checks] == [
        ("below FLAC of target alone", 1.25, True),
        ("below the same head untrained", 0.5, True),
    ]
    bits = replace(bits, model=5.5)  # no better than before training: fails, even below FLAC
    checks = [asdict(c) for c in learning_checks(bits, False, None)]
    assert [(c["check"], c["by"], c["passed"]) for c in checks] == [
        ("below the same head untrained", 0.0, False)
    ]


def test_the_gate_fails_an_untrained_logistic_model_and_refuses_a_lossy_codec(
    shard_dir, tmp_path, capsys
):
    logistic = {"class_path": "LogisticOptions", "init_args": {"order": 4, "taps": 2}}
    model = StereoT5(codec="pcm16", head=logistic, **TINY)
    folder = model.save_pretrained(tmp_path / "export")
    args = ["--shards", str(shard_dir), "--seq-len", str(SEQ), "--max-chunks", "1"]
    args += ["--generate", "0", "--no-progress", "--gate", "--out", str(tmp_path / "eval")]
    assert evaluate_module.main(["--ckpt", str(folder), *args]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("gate: failed: ") and err.count("\n") == 1
    assert err.endswith("not below the same head untrained\n")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["bits_per_sample"]["model_untrained"] == report["bits_per_sample"]["model"]
    assert "| same head untrained (its predictor alone) |" in out
    assert "- model below the same head untrained: NO, by 0.000 bits/sample" in out

    lossy = StereoT5(codec="mulaw8", head="full", **TINY).save_pretrained(tmp_path / "lossy")
    never = ["--out", str(tmp_path / "never")]
    assert evaluate_module.main(["--ckpt", str(lossy), *args, *never]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "drop --gate" in err
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------ predict


def _write(path: Path, frames: int, rate: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, rng.uniform(-0.4, 0.4, (frames, 2)), rate, subtype="PCM_16")
    return path


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_predict_keeps_the_length_and_the_input_channel_bit_for_bit(
    ckpt, tmp_path, direction, capsys
):
    inp = _write(tmp_path / "in.wav", 5 * SEQ + 17, RATE)  # a tail shorter than a window
    out = tmp_path / "out.wav"
    code = predict_module.main(
        [
            str(inp),
            str(out),
            "--ckpt",
            str(ckpt),
            "--direction",
            direction,
            "--seq-len",
            str(SEQ),
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0 and "s per second of audio" in capsys.readouterr().out
    info = sf.info(out)
    assert (info.channels, info.samplerate, info.subtype) == (2, RATE, "PCM_16")
    written, _ = sf.read(out, dtype="int16")
    original = read(inp)
    assert written.shape == (original.shape[1], 2)
    keep = 0 if direction == "l2r" else 1
    assert np.array_equal(written[:, keep], original[keep])
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


@pytest.mark.parametrize("frames", [4 * SEQ, 4 * SEQ + 1, 40 * SEQ + 3])
def test_predict_streams_the_same_estimate_as_the_whole_file_at_once(ckpt, tmp_path, frames):
    inp = _write(tmp_path / "in.wav", frames, RATE)
    result = predict(inp, tmp_path / "out.wav", ckpt, seq_len=SEQ, batch_size=4, progress=False)
    assert result["frames"] == frames and result["mode"] == "estimate"
    written, _ = sf.read(tmp_path / "out.wav", dtype="int16")
    x = read(inp)[0]
    assert np.array_equal(written[:, 0], x)
    loaded = load_model(ckpt)
    whole = estimate_range(loaded.model, loaded.codec, x, SEQ, default_overlap(SEQ), 4)
    assert np.array_equal(written[:, 1], to_int16(whole.mean))


def test_predict_repairs_the_given_and_detected_gaps_and_keeps_every_known_sample(
    ckpt, tmp_path, capsys
):
    rng = np.random.default_rng(5)
    stereo = (rng.uniform(-0.4, 0.4, (RATE, 2)) * 32767).astype(np.int16)
    stereo[8000:8400, 1] = 0  # a dropout: digital silence in the target, the input moving
    sf.write(tmp_path / "in.wav", stereo, RATE, subtype="PCM_16")
    (tmp_path / "gaps.txt").write_text("# one damaged stretch\n0.1 0.15\n")
    out = tmp_path / "out.wav"
    args = [str(tmp_path / "in.wav"), str(out), "--ckpt", str(ckpt), "--mode", "repair"]
    args += ["--gaps", "0.8:0.82", "--gaps-file", str(tmp_path / "gaps.txt"), "--detect-gaps"]
    assert predict_module.main([*args, "--seq-len", str(SEQ), "--no-progress"]) == 0
    assert "3 gaps repaired" in capsys.readouterr().out
    written, _ = sf.read(out, dtype="int16")
    known = np.ones(RATE, bool)
    for a, b in ((1600, 2400), (8001, 8400), (12800, 13120)):
        known[a:b] = False
    assert np.array_equal(written[known], stereo[known])
    assert np.array_equal(written[:, 0], stereo[:, 0])
    assert not np.array_equal(written[8001:8400, 1], stereo[8001:8400, 1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "repair"], "--mode repair needs --gaps"),
        (["--gaps", "1:2"], "they go with repair only"),
        (["--mode", "repair", "--gaps", "2:1"], "gap '2:1' needs 0 <= START < END"),
        (["--mode", "repair", "--gaps", "a:b"], "'a:b' is not START:END in seconds"),
        (["--mode", "repair", "--gaps", "9:10"], "past the track's"),
    ],
)
def test_predict_refuses_bad_gaps_in_one_line(ckpt, tmp_path, capsys, extra, message):
    inp = _write(tmp_path / "in.wav", 2 * SEQ, RATE)
    out = tmp_path / "out.wav"
    args = [str(inp), str(out), "--ckpt", str(ckpt), "--seq-len", str(SEQ), "--no-progress"]
    assert predict_module.main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_predict_with_a_model_without_an_estimate_head_says_how_to_get_one(tmp_path, capsys):
    folder = StereoT5(codec="pcm16", head="full", **TINY).save_pretrained(tmp_path / "export")
    inp = _write(tmp_path / "in.wav", 2 * SEQ, RATE)
    assert predict_module.main([str(inp), str(tmp_path / "o.wav"), "--ckpt", str(folder)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {folder}: this model has no estimate head") and "estimate:" in err
    )


@pytest.mark.parametrize("content", [None, b"", b"<!DOCTYPE html><html>not audio</html>"])
def test_predict_on_a_file_that_is_not_audio_names_it_in_one_line(ckpt, tmp_path, content, capsys):
    inp = tmp_path / "song.wav"
    if content is not None:
        inp.write_bytes(content)
    out = tmp_path / "out.wav"
    assert predict_module.main([str(inp), str(out), "--ckpt", str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {inp}: ") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_predict_resamples_to_the_training_rate_and_pads_a_file_shorter_than_a_window(
    ckpt, tmp_path
):
    inp = tmp_path / "low.flac"
    sf.write(inp, np.random.default_rng(4).uniform(-0.3, 0.3, (20, 2)), 8000, subtype="PCM_24")
    result = predict(inp, tmp_path / "out.wav", ckpt, seq_len=SEQ, progress=False)
    assert result["sample_rate"] == RATE and "training shards" in result["rate_source"]
    written, rate = sf.read(tmp_path / "out.wav", dtype="int16")
    expected = read(inp, sample_rate=RATE)  # pipeline.audio at the output rate
    assert rate == RATE and written.shape == (expected.shape[1], 2)
    assert np.array_equal(written[:, 0], expected[0])


def test_predict_from_an_export_folder_keeps_the_native_rate(run, tmp_path):
    inp = _write(tmp_path / "in.wav", 2 * SEQ, 22050)
    result = predict(
        inp,
        tmp_path / "out.wav",
        run / "csv" / "version_0" / "export",
        seq_len=SEQ,
        progress=False,
    )
    assert result["sample_rate"] == 22050 and "input's own rate" in result["rate_source"]
    assert sf.info(tmp_path / "out.wav").frames == 2 * SEQ


def test_evaluate_and_predict_work_with_a_patched_model(shard_dir, tmp_path):
    patched = StereoT5(
        codec="pcm16", patch_size=8, local_d=16, local_layers=1, local_heads=2, align=True,
        estimate={}, **TINY,
    )  # fmt: skip
    folder = patched.save_pretrained(tmp_path / "export")
    report = evaluate(
        folder,
        shard_dir,
        seq_len=SEQ,
        max_chunks=1,
        generate=1,
        out=tmp_path / "eval",
        progress=False,
    ).to_json()
    assert report["model"]["patch_size"] == 8 and report["config"]["seq_len"] == SEQ
    assert math.isfinite(report["bits_per_sample"]["model"])
    assert "patches of 8, two-level decoder" in (tmp_path / "eval" / "report.md").read_text()
    assert report["restoration"]["per_source"][0]["frames"] == 4096
    with pytest.raises(ModelError, match="not a multiple of the model's patch_size 8"):
        evaluate(folder, shard_dir, seq_len=SEQ - 4, out=tmp_path / "never", progress=False)
    inp = _write(tmp_path / "in.wav", 3 * SEQ + 5, RATE)
    result = predict(inp, tmp_path / "out.wav", folder, seq_len=SEQ, progress=False)
    written, _ = sf.read(tmp_path / "out.wav", dtype="int16")
    assert written.shape == (3 * SEQ + 5, 2) and result["seq_len"] == SEQ
    assert np.array_equal(written[:, 0], read(inp)[0])


def _split(shard_dir: Path, split: str):
    data = ShardDataModule(str(shard_dir), seq_len=SEQ, batch_size=1, num_workers=0)
    return data.eval_stream(split, rank=0, world_size=1).split

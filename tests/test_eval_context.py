"""`evaluate --context window|chunk|run`: what one scoring call sees, every frame scored once.

The state-carrying model is a tiny logistic head (its adaptive predictor's statistics are the
state) whose body attends within windows of 64 samples, so scoring a run chunk after chunk with
the state carried must give what scoring the whole run in one call gives.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from pipeline.codec import get_codec
from pipeline.records import Manifest
from trainer.data.shards import ShardSplit, shard_url
from trainer.evaluation import evaluate as evaluate_module
from trainer.evaluation.evaluate import evaluate
from trainer.evaluation.runs import score_runs
from trainer.model import StereoT5

SEQ = 64
CHUNK = 4096  # the fixture shards' chunk
LOGISTIC = {"class_path": "LogisticOptions", "init_args": {"order": 4, "taps": 2}}


@pytest.fixture(scope="module")
def stateful(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = StereoT5(codec="pcm16", head=LOGISTIC, max_len=256, body_window=SEQ, **TINY_MODEL)
    assert model.carries_state and model.lookahead > 0
    return model.save_pretrained(tmp_path_factory.mktemp("context") / "export")


def _split(shard_dir: Path, name: str) -> ShardSplit:
    manifest = Manifest.load(shard_dir)
    shards = manifest.shards[name]
    urls = [shard_url(str(shard_dir), info) for info in shards]
    return ShardSplit(urls, [info.samples for info in shards], manifest.config.chunk_frames)


def _chunks(shard_dir: Path, name: str) -> list[np.ndarray]:
    split = _split(shard_dir, name)
    return [chunk for chunk, _ in split.chunks(split.urls, 0, want_meta=False)]


def test_run_context_scores_every_frame_once_and_the_coders_code_the_same_frames(
    stateful, shard_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))  # FLAC alone: the external coders are skipped
    report = evaluate(
        stateful, shard_dir, split="train", context="run", generate=2, batch_size=2,
        seq_len=SEQ, out=tmp_path / "eval", progress=False,
    )  # fmt: skip
    counts, chunks = report.counts, Manifest.load(shard_dir).samples("train")
    assert counts.chunks == counts.windows == chunks  # one call per chunk
    assert counts.samples_scored == chunks * CHUNK
    assert counts.segments == 5  # Amber, Cinder, Six, and Quiet twice (a gap)
    flac = report.coders.flac.per_source
    assert {s.source: s.frames for s in report.per_source} == {
        source: cost.frames for source, cost in flac.items()
    }
    assert sum(s.frames for s in report.per_source) == counts.samples_scored
    assert all(s.model_untrained is not None for s in report.per_source)
    assert report.config.context == "run" and report.config.score_len == CHUNK
    assert report.config.seq_len == SEQ
    md = Path(report.files.md).read_text()
    assert "- context run: 5 contiguous runs of one source's chunks" in md


def test_run_context_sums_equal_scoring_each_run_whole(stateful, shard_dir):
    model = StereoT5.from_pretrained(stateful)
    codec = get_codec("pcm16")
    # batch 2 over runs of 7, 7, 4, 2 and 1 chunks: the runs that end first get padding rows
    scored = score_runs(model, _split(shard_dir, "train"), codec, 0, 2, progress=False)
    whole: dict[str, list[float]] = {}  # source -> [nll, untrained nll, count]
    with torch.inference_mode():
        for run in scored.segments:
            stereo = np.concatenate(run.chunks, axis=1)
            labels = torch.from_numpy(codec.encode(stereo[None, 1]))
            one = model.score(torch.from_numpy(codec.encode(stereo[None, 0])), labels)
            sums = whole.setdefault(run.source, [0.0, 0.0, 0])
            sums[0] += float(one["nll"].double().sum())
            sums[1] += float(one["untrained_nll"].double().sum())
            sums[2] += int(one["count"])
    per_source = scored.sums.per_source
    assert set(per_source) == set(whole) and len(whole) == 4
    for source, (nll, untrained, count) in whole.items():
        assert per_source[source].nll == pytest.approx(nll, rel=1e-6)
        assert per_source[source].untrained_nll == pytest.approx(untrained, rel=1e-6)
        assert per_source[source].count == count
    assert scored.sums.nll == pytest.approx(sum(w[0] for w in whole.values()), rel=1e-6)
    assert scored.sums.count == scored.chunks * CHUNK


def test_chunk_context_scores_each_chunk_whole_in_one_call(stateful, shard_dir, tmp_path):
    report = evaluate(
        stateful, shard_dir, split="val", context="chunk", generate=1, seq_len=SEQ,
        out=tmp_path / "eval", progress=False,
    )  # fmt: skip
    counts = report.counts
    assert counts.windows == counts.chunks == 3 and counts.samples_scored == 3 * CHUNK
    assert report.config.score_len == CHUNK
    model = StereoT5.from_pretrained(stateful)
    codec = get_codec("pcm16")
    nll = 0.0
    with torch.inference_mode():
        for chunk in _chunks(shard_dir, "val"):
            ids = torch.from_numpy(codec.encode(chunk[None, 0]))
            scored = model.score(ids, torch.from_numpy(codec.encode(chunk[None, 1])))
            nll += float(scored["nll_sum"])
    assert report.teacher_forced.nll_nats == pytest.approx(nll, rel=1e-6)
    assert math.isfinite(report.bits_per_sample.model)
    md = Path(report.files.md).read_text()
    assert f"- context chunk: each chunk of {CHUNK} scored whole in one call" in md


def test_run_context_with_a_head_that_carries_no_state_is_one_line(shard_dir, tmp_path, capsys):
    model = StereoT5(codec="pcm16", head="coarse_fine", max_len=256, **TINY_MODEL)
    folder = model.save_pretrained(tmp_path / "export")
    capsys.readouterr()  # the export's own progress
    out = tmp_path / "never"
    args = ["--ckpt", str(folder), "--shards", str(shard_dir), "--context", "run"]
    assert evaluate_module.main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}: --context run carries") and err.count("\n") == 1
    assert "coarse_fine head carries none: use --context window or chunk" in err
    assert not out.exists()


def test_whole_chunks_through_a_body_without_a_window_are_refused(shard_dir, tmp_path, capsys):
    """Its attention would span a whole chunk, beyond its max_len (and O(L^2) in memory)."""
    torch.manual_seed(0)
    model = StereoT5(codec="pcm16", head=LOGISTIC, max_len=256, **TINY_MODEL)
    folder = model.save_pretrained(tmp_path / "export")
    capsys.readouterr()
    out = tmp_path / "never"
    for context in ("chunk", "run"):
        args = ["--ckpt", str(folder), "--shards", str(shard_dir), "--context", context]
        assert evaluate_module.main([*args, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder}: --context {context} scores whole chunks of 4096")
        assert err.endswith("--model.body_window 256 or less\n") and err.count("\n") == 1
    assert not out.exists()

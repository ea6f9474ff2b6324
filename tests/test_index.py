"""pipeline.index: exact frame counts, bad files rejected with a reason, incremental, atomic."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import index as index_mod
from pipeline import parallel
from pipeline.errors import PipelineError
from pipeline.records import AudioIndex

RATE = 8000


def _write(path: Path, frames: int, channels: int = 2, subtype: str = "PCM_16", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(frames)
    sf.write(path, rng.uniform(-0.5, 0.5, (frames, channels)), RATE, subtype=subtype, **kw)
    return path


@pytest.fixture
def good_tree(tmp_path) -> Path:
    root = tmp_path / "music"
    _write(root / "train" / "Song A" / "mixture.wav", 1000)
    _write(root / "train" / "Song B" / "mixture.flac", 2000, channels=1)
    _write(root / "test" / "Song C" / "mixture.AIFF", 1500, channels=6, format="AIFF")
    _write(root / "extra" / "x.WAV", 700, subtype="PCM_24")
    return root


def test_index_lists_every_file_with_exact_frames(good_tree, tmp_path):
    result = index_mod.build_index(good_tree, tmp_path / "i.json", jobs=1, progress=False)
    files = result.index.files
    assert {k: (v.frames, v.channels) for k, v in files.items()} == {
        "train/Song A/mixture.wav": (1000, 2),
        "train/Song B/mixture.flac": (2000, 1),
        "test/Song C/mixture.AIFF": (1500, 6),
        "extra/x.WAV": (700, 2),
    }
    entry = files["extra/x.WAV"]
    assert (entry.sample_rate, entry.subtype, entry.format) == (RATE, "PCM_24", "WAV")
    assert entry.bytes == (good_tree / "extra/x.WAV").stat().st_size
    assert entry.sha256 is None and result.index.rejected == {}  # no other file of its size
    saved = json.loads((tmp_path / "i.json").read_text())
    assert saved["format"] == "audio-index/1" and saved["root"] == str(good_tree.resolve())
    assert list(saved["files"]) == sorted(saved["files"])


def test_bad_files_are_rejected_with_a_reason_and_the_run_continues(good_tree, tmp_path):
    bad = good_tree / "junk"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    _write(bad / "header_only.wav", 0)
    (bad / "page.wav").write_text("<!doctype html><html><body>404</body></html>")
    (bad / "folder.wav").mkdir()
    os.symlink(bad / "nowhere.wav", bad / "dangling.wav")
    cut = _write(bad / "cut.wav", 1000)  # 44-byte header + 4000 bytes of frames
    with open(cut, "r+b") as f:
        f.truncate(44 + 2001)
    flac = _write(bad / "cut.flac", 40000)
    with open(flac, "r+b") as f:
        f.truncate(flac.stat().st_size // 2)

    result = index_mod.build_index(good_tree, tmp_path / "i.json", jobs=1, progress=False)
    reasons = {k: v.reason for k, v in result.index.rejected.items()}
    assert reasons["junk/empty.wav"] == "empty file (0 bytes)"
    assert reasons["junk/header_only.wav"] == "no audio frames"
    assert reasons["junk/page.wav"].startswith("not readable as audio")
    assert reasons["junk/dangling.wav"].startswith("broken symlink")
    assert "junk/folder.wav" not in reasons and "junk/folder.wav" not in result.index.files
    files = result.index.files
    assert files["junk/cut.wav"].frames == 500  # what the data holds, not the header's 1000
    flac_entry = files["junk/cut.flac"]
    assert flac_entry.header_frames == 40000 and 0 < flac_entry.frames < 40000
    with sf.SoundFile(flac) as f:  # every frame the index promises really decodes
        assert len(f.read(flac_entry.frames, dtype="int16")) == flac_entry.frames
    assert len(files) == 6


def test_copies_get_equal_fingerprints_unique_sizes_none(good_tree, tmp_path):
    song = good_tree / "train" / "Song A" / "mixture.wav"
    (good_tree / "copy").mkdir()
    (good_tree / "copy" / "same.wav").write_bytes(song.read_bytes())
    same_size = bytearray(song.read_bytes())
    same_size[-1] ^= 1
    (good_tree / "copy" / "edited.wav").write_bytes(bytes(same_size))
    files = index_mod.build_index(good_tree, tmp_path / "i.json", progress=False).index.files
    digest = hashlib.sha256(song.read_bytes()).hexdigest()
    assert files["copy/same.wav"].sha256 == files["train/Song A/mixture.wav"].sha256 == digest
    assert files["copy/edited.wav"].sha256 == hashlib.sha256(same_size).hexdigest()
    assert files["extra/x.WAV"].sha256 is None


def test_a_copy_added_later_fingerprints_the_reused_original(good_tree, tmp_path):
    out = tmp_path / "i.json"
    song = good_tree / "train" / "Song A" / "mixture.wav"
    assert (
        index_mod.build_index(good_tree, out, progress=False)
        .index.files["train/Song A/mixture.wav"]
        .sha256
        is None
    )
    shutil.copy(song, good_tree / "extra" / "copy.wav")
    again = index_mod.build_index(good_tree, out, progress=False)
    assert (again.opened, again.reused) == (1, 4)
    digest = hashlib.sha256(song.read_bytes()).hexdigest()
    files = AudioIndex.load(out).files
    assert files["train/Song A/mixture.wav"].sha256 == files["extra/copy.wav"].sha256 == digest


def test_reindex_opens_nothing_then_only_the_touched_file(good_tree, tmp_path):
    out = tmp_path / "i.json"
    (good_tree / "bad.wav").write_text("not audio")
    first = index_mod.build_index(good_tree, out, jobs=1, progress=False)
    assert (first.opened, first.reused) == (5, 0)
    written = out.stat().st_mtime_ns
    again = index_mod.build_index(good_tree, out, jobs=1, progress=False)
    assert (again.opened, again.reused) == (0, 5)
    assert again.index.to_dict() == first.index.to_dict()
    assert out.stat().st_mtime_ns == written  # an unchanged index is not rewritten

    touched = good_tree / "train" / "Song A" / "mixture.wav"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = index_mod.build_index(good_tree, out, jobs=1, progress=False)
    assert (third.opened, third.reused) == (1, 4)


def test_parallel_index_equals_serial(good_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "POOL_AFTER_S", 0.0)  # workers even for this small tree
    for i in range(140):  # this process takes the first batch, a worker others
        _write(good_tree / "many" / f"f{i:03d}.{('wav', 'flac')[i % 2]}", 100 + i)
    cut = _write(good_tree / "many" / "cut.flac", 40000)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    shutil.copy(cut, good_tree / "many" / "copy.flac")  # same size: hashed by the workers
    results, saved = {}, set()
    for jobs in (1, 2, 3):  # this process alone, then with worker processes
        out = tmp_path / f"{jobs}.json"
        results[jobs] = index_mod.build_index(good_tree, out, jobs=jobs, progress=False)
        saved.add(out.read_bytes())
    assert len(saved) == 1
    assert {r.opened for r in results.values()} == {146}
    files = results[1].index.files
    assert files["many/cut.flac"].header_frames == 40000
    assert files["many/cut.flac"].sha256 == files["many/copy.flac"].sha256 is not None


def test_interrupted_write_leaves_previous_index_intact(good_tree, tmp_path, monkeypatch):
    out = tmp_path / "i.json"
    index_mod.build_index(good_tree, out, jobs=1, progress=False)
    before = out.read_bytes()
    _write(good_tree / "new" / "n.wav", 300)

    def half_write(self, text, encoding=None):
        with open(self, "w", encoding=encoding) as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_write)
    with pytest.raises(KeyboardInterrupt):
        index_mod.build_index(good_tree, out, jobs=1, progress=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["i.json"]


def test_symlinked_file_is_indexed_once_with_its_alias(good_tree, tmp_path):
    os.symlink(good_tree / "train", good_tree / "linked")
    result = index_mod.build_index(good_tree, tmp_path / "i.json", jobs=1, progress=False)
    entry = result.index.files["linked/Song A/mixture.wav"]
    assert entry.aliases == ["train/Song A/mixture.wav"]
    assert "train/Song A/mixture.wav" not in result.index.files
    assert len(result.index.files) == 4


def test_lengths_json_is_the_seed_format(good_tree, tmp_path):
    lengths = tmp_path / "musdbstereo_lengths.json"
    index_mod.build_index(
        good_tree, tmp_path / "i.json", jobs=1, lengths_json=lengths, progress=False
    )
    root = good_tree.resolve()
    assert json.loads(lengths.read_text()) == {
        str(root / "train/Song A/mixture.wav"): 1000,
        str(root / "train/Song B/mixture.flac"): 2000,
        str(root / "test/Song C/mixture.AIFF"): 1500,
        str(root / "extra/x.WAV"): 700,
    }


def test_missing_root_and_empty_tree_are_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="no such directory"):
        index_mod.build_index(tmp_path / "nope", tmp_path / "i.json", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no audio files"):
        index_mod.build_index(tmp_path / "empty", tmp_path / "i.json", progress=False)


def test_cli_index_runs_without_torch_and_reports_one_line_errors(good_tree, tmp_path):
    out = tmp_path / "i.json"
    code = (
        "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'pipeline imported torch'; raise SystemExit(rc)"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "index", str(good_tree), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "4 accepted" in ok.stdout and "0 rejected" in ok.stdout
    assert (
        AudioIndex.load(out).files.keys()
        == index_mod.build_index(good_tree, out, progress=False).index.files.keys()
    )
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "index", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no such directory" in bad.stderr


def _pids(batch: list[int]) -> list[int]:
    time.sleep(0.005)
    return [os.getpid()] * len(batch)


def _threads(batch: list[int]) -> list[int]:
    time.sleep(0.002)  # the GIL is free meanwhile, as in a libsndfile or hashlib call
    return [threading.get_ident()] * len(batch)


def test_map_batches_shares_the_work_with_workers_and_loses_nothing(monkeypatch):
    monkeypatch.setattr(parallel, "POOL_AFTER_S", 0.0)
    pairs = list(parallel.map_batches(_pids, range(400), 3, "test", progress=False, batch=10))
    assert sorted(item for item, _ in pairs) == list(range(400))
    pids = {pid for _, pid in pairs}
    assert os.getpid() in pids and len(pids) > 1
    threaded = list(parallel.map_batches(_threads, range(400), 2, "t", False, 10, threads=True))
    assert sorted(item for item, _ in threaded) == list(range(400))
    assert threading.get_ident() in {ident for _, ident in threaded}
    assert len({ident for _, ident in threaded}) == 2
    monkeypatch.setattr(parallel, "POOL_AFTER_S", 60.0)  # little work: no pool at all
    assert {pid for _, pid in parallel.map_batches(_pids, range(30), 3, "t", False)} == {
        os.getpid()
    }

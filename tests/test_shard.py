"""pipeline.shard / verify / stats: exact chunks, splits, determinism, atomicity, partitions."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import CHUNK, SHARD_OPTIONS, make_tree

from pipeline import shard as shard_mod
from pipeline.codec import pcm16_to_int16
from pipeline.errors import PipelineError
from pipeline.index import build_index
from pipeline.merge import merge_manifests
from pipeline.records import AudioIndex, Manifest
from pipeline.splits import draw
from pipeline.stats import shard_stats
from pipeline.synth import make_corpus
from pipeline.tario import iter_members, load_npy
from pipeline.verify import verify


def _samples(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (uint16 [2, CHUNK], meta) over every shard of the manifest."""
    out = {}
    for infos in Manifest.load(folder).shards.values():
        for info in infos:
            members = dict(iter_members(folder / info.path))
            for name in members:
                if name.endswith(".npy"):
                    key = name[:-4]
                    out[key] = (load_npy(members[name]), json.loads(members[key + ".json"]))
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.tar"))
    } | {"manifest.json": hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()}


def test_every_chunk_equals_its_source_frames_bit_for_bit(tree, shard_dir):
    index = AudioIndex.load(tree.index)
    assert all(e.subtype == "PCM_16" for e in index.files.values())
    for tokens, meta in _samples(shard_dir).values():
        raw, _ = sf.read(
            tree.root / meta["source"],
            dtype="int16",
            always_2d=True,
            start=meta["start"],
            frames=CHUNK,
        )
        expected = np.repeat(raw.T, 2, axis=0) if raw.shape[1] == 1 else raw.T[:2]
        np.testing.assert_array_equal(pcm16_to_int16(tokens), expected)
        assert tokens.dtype == np.uint16 and tokens.shape == (2, CHUNK)
        assert (
            meta["sample_rate"] == 16000
            and meta["channels"] == index.files[meta["source"]].channels
        )


def test_chunk_counts_are_whole_chunks_minus_silent_ones(tree, shard_dir):
    index = AudioIndex.load(tree.index)
    m = Manifest.load(shard_dir)
    samples = _samples(shard_dir)
    per_file = Counter(meta["source"] for _, meta in samples.values())
    expected = {rel: e.frames // CHUNK for rel, e in index.files.items()}
    expected["extra/Quiet/quiet.wav"] -= 2
    assert per_file == Counter({k: v for k, v in expected.items() if v})
    assert sum(m.samples(s) for s in m.shards) == len(samples) == sum(expected.values())
    assert sum(i.silent_chunks for v in m.shards.values() for i in v) == 2
    assert m.dropped_tail_frames == sum(e.frames % CHUNK for e in index.files.values())
    starts = sorted(
        meta["start"] for _, meta in samples.values() if meta["source"] == "extra/Quiet/quiet.wav"
    )
    assert starts == [0, 3 * CHUNK, 4 * CHUNK]


def test_splits_keep_track_folders_whole_and_test_folder_in_test(shard_dir):
    splits_of_folder = defaultdict(set)
    for _, meta in _samples(shard_dir).values():
        splits_of_folder[str(Path(meta["source"]).parent)].add(meta["split"])
        if meta["source"].startswith("test/"):
            assert meta["split"] == "test"
    assert all(len(s) == 1 for s in splits_of_folder.values())
    assert {s for v in splits_of_folder.values() for s in v} >= {"train", "test"}


def test_shards_mix_files(shard_dir):
    m = Manifest.load(shard_dir)
    biggest = max(m.shards["train"], key=lambda s: s.samples)
    sources = {n.split("_")[0] for n, _ in iter_members(shard_dir / biggest.path)}
    assert len(sources) >= 2


def test_same_inputs_give_identical_bytes_whatever_jobs(tree, shard_dir, tmp_path):
    shard_mod.write_shards(tree.index, tmp_path, jobs=2, progress=False, **SHARD_OPTIONS)
    assert _digests(tmp_path) == _digests(shard_dir)


def test_injected_failure_leaves_nothing_half_written_and_rerun_completes(
    tree, shard_dir, tmp_path, monkeypatch
):
    real_write, calls = shard_mod._write_shard, []

    def failing(job):
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        calls.append(job.path)
        return real_write(job)

    monkeypatch.setattr(shard_mod, "_write_shard", failing)
    with pytest.raises(RuntimeError, match="injected"):
        shard_mod.write_shards(tree.index, tmp_path, jobs=1, progress=False, **SHARD_OPTIONS)
    assert not (tmp_path / "manifest.json").exists()
    finals = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tar"))
    assert finals == sorted(calls)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(shard_mod, "_write_shard", real_write)
    shard_mod.write_shards(tree.index, tmp_path, jobs=1, progress=False, **SHARD_OPTIONS)
    assert _digests(tmp_path) == _digests(shard_dir)


def test_partitions_merged_hold_exactly_the_chunks_of_one_run(tree, shard_dir, tmp_path):
    for part in ("0/2", "1/2"):
        shard_mod.write_shards(
            tree.index, tmp_path, partition=part, jobs=1, progress=False, **SHARD_OPTIONS
        )
    assert not (tmp_path / "manifest.json").exists()
    merge_manifests([tmp_path])
    assert _samples(tmp_path).keys() == _samples(shard_dir).keys()
    assert _digests(tmp_path) == _digests(shard_dir)


def test_verify_passes_against_source_on_a_clean_set(shard_dir):
    assert verify(shard_dir, against_source=True, progress=False) == []


def _corrupt_copy(shard_dir: Path, tmp_path: Path) -> tuple[Path, Manifest]:
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    return copy, Manifest.load(copy)


def _rewrite_first_shard(copy: Path, m: Manifest, extra: list[tuple[str, bytes]]) -> None:
    path = copy / m.shards["train"][0].path
    members = list(iter_members(path)) + extra
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_verify_catches_a_flipped_byte(shard_dir, tmp_path):
    copy, m = _corrupt_copy(shard_dir, tmp_path)
    path = copy / m.shards["train"][0].path
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x10  # inside the first .npy payload
    path.write_bytes(bytes(data))
    problems = verify(copy, against_source=True, progress=False)
    assert any("sha256" in p for p in problems)
    assert any("differs from" in p for p in problems)


def test_verify_catches_a_missing_shard(shard_dir, tmp_path):
    copy, m = _corrupt_copy(shard_dir, tmp_path)
    (copy / m.shards["val"][0].path).unlink()
    assert any("missing" in p for p in verify(copy, progress=False))


def test_verify_catches_extra_and_pickle_members(shard_dir, tmp_path):
    copy, m = _corrupt_copy(shard_dir, tmp_path)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _rewrite_first_shard(
        copy,
        m,
        [
            ("evil.pkl", b"\x80\x04K\x01."),
            ("zz_000001.npy", pickled.getvalue()),
            ("zz_000001.json", b"{}"),
        ],
    )
    problems = verify(copy, progress=False)
    assert any("'evil.pkl' is not a .npy/.json" in p for p in problems)
    assert any("zz_000001 does not decode" in p for p in problems)


def test_verify_catches_a_count_that_disagrees(shard_dir, tmp_path):
    copy, m = _corrupt_copy(shard_dir, tmp_path)
    m.shards["test"][0].samples += 1
    m.save(copy / "manifest.json")
    assert any("the manifest says" in p for p in verify(copy, progress=False))


def test_stats_reports_splits_and_levels(shard_dir):
    text = shard_stats(shard_dir, progress=False)
    m = Manifest.load(shard_dir)
    assert f"{m.samples('train')}" in text and "token levels" in text
    assert "full scale (clipped)" in text


def test_missing_source_file_is_one_clear_error(tmp_path):
    copied = make_tree(tmp_path / "again")
    (copied.root / "extra" / "Six" / "six.wav").unlink()
    with pytest.raises(PipelineError, match=r"missing or changed .*six.wav \(missing\)"):
        shard_mod.write_shards(copied.index, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_options_are_clear_errors(tree, tmp_path):
    with pytest.raises(PipelineError, match="--chunk-frames 0"):
        shard_mod.write_shards(tree.index, tmp_path, chunk_frames=0, progress=False)
    with pytest.raises(PipelineError, match="train split is empty"):
        shard_mod.write_shards(tree.index, tmp_path, chunk_frames=10**7, progress=False)
    with pytest.raises(PipelineError, match="no indexed file matches"):
        shard_mod.write_shards(tree.index, tmp_path, include=["*.mp3"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_another_shard_set_is_refused_untouched(tree, shard_dir, tmp_path):
    before = _digests(shard_dir)
    options = {**SHARD_OPTIONS, "chunk_frames": 2048}
    with pytest.raises(PipelineError, match=r"another config .*chunk_frames"):
        shard_mod.write_shards(tree.index, shard_dir, jobs=1, progress=False, **options)
    assert _digests(shard_dir) == before


def test_channel_policies_in_shards(tree, tmp_path):
    shard_mod.write_shards(
        tree.index,
        tmp_path,
        jobs=1,
        progress=False,
        channels="skip-mono",
        include=["extra/*"],
        **{k: v for k, v in SHARD_OPTIONS.items()},
    )
    m = Manifest.load(tmp_path)
    assert m.rejected["extra/Mono Song/mono.wav"] == "mono file skipped by channel policy skip-mono"
    sources = {meta["source"] for _, meta in _samples(tmp_path).values()}
    assert sources == {"extra/Six/six.wav", "extra/Quiet/quiet.wav"}


def test_cli_index_and_shard_never_import_torch(tmp_path):
    code = (
        "import sys; from pipeline.cli import main\n"
        "from pipeline.synth import make_corpus\n"
        f"make_corpus({str(tmp_path / 'a')!r}, tracks=2, seconds=1.0, sample_rate=8000)\n"
        f"assert main(['index', {str(tmp_path / 'a')!r}, '--out', {str(tmp_path / 'i.json')!r},"
        " '--quiet']) == 0\n"
        f"assert main(['shard', {str(tmp_path / 'i.json')!r}, '--chunk-frames', '1024',"
        " '--quiet']) == 0\n"
        "assert 'torch' not in sys.modules, 'pipeline imported torch'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "manifest.json").exists()


def _cli_shard(index: Path, out: Path, *flag: str) -> None:
    from pipeline.cli import main

    args = ["--chunk-frames", str(CHUNK), "--shard-bytes", "60000", "--seed", "0", "--val", "0.3"]
    assert (
        main(["shard", str(index), "--out", str(out), *args, *flag, "--jobs", "1", "--quiet"]) == 0
    )


def test_old_window_flag_is_an_alias_of_interleave_with_identical_bytes(tree, shard_dir, tmp_path):
    _cli_shard(tree.index, tmp_path / "old", "--window", "4")
    _cli_shard(tree.index, tmp_path / "new", "--interleave", "4")
    assert _digests(tmp_path / "old") == _digests(tmp_path / "new") == _digests(shard_dir)
    _cli_shard(tree.index, tmp_path / "other", "--interleave", "2")
    assert _digests(tmp_path / "other") != _digests(shard_dir)


def test_a_set_stored_with_the_window_key_resumes_and_verifies(tree, shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    stored = json.loads((copy / "manifest.json").read_text())["config"]
    assert stored["window"] == 4 and "interleave" not in stored  # the format is unchanged
    assert json.loads((copy / shard_mod.CONFIG_STAMP).read_text())["window"] == 4
    assert Manifest.load(copy).config.window == 4
    shard_mod.write_shards(tree.index, copy, jobs=1, progress=False, **SHARD_OPTIONS)  # resumes
    assert _digests(copy) == _digests(shard_dir)
    assert verify(copy, progress=False) == []


# A small MUSDB-like tree: 13 train and 4 test tracks. At seed 4 no train track draws below 0.151
# (train/Synth 007 - Glacier), so the draw alone gives the default --val 0.1 no group.
SMALL = dict(chunk_frames=1024, seed=4, jobs=1, progress=False)
NEAREST = "train/Synth 007 - Glacier"
SHORT = "train/Intro 18"  # draws 0.148, nearer still, but holds no chunk
ADDED = "train/New Song 02"  # draws 0.1475: a later run without the record would force it


def _wav(path: Path, frames: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(frames).uniform(-0.5, 0.5, (frames, 2)), 8000)


def _small_tree(root: Path, index: Path) -> Path:
    make_corpus(root, tracks=17, seconds=0.4, seed=0, sample_rate=8000)
    _wav(root / SHORT / "intro.wav", 500)
    build_index(root, index, jobs=1, progress=False)
    return index


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    return _small_tree(folder / "music", folder / "index.json")


def _groups_of(folder: Path, split: str) -> set[str]:
    return {
        str(Path(meta["source"]).parent)
        for _, meta in _samples(folder).values()
        if meta["split"] == split
    }


def test_a_small_tree_forces_its_nearest_train_group_into_an_empty_val(
    small_index, tmp_path, capsys
):
    groups = {str(Path(rel).parent) for rel in AudioIndex.load(small_index).files}
    draws = {group: draw(4, group) for group in groups if group.startswith("train/")}
    assert len(draws) == 14 and min(draws.values()) >= 0.1  # the draw alone: val is empty
    assert sorted(draws, key=draws.get)[:2] == [SHORT, NEAREST]
    m = shard_mod.write_shards(small_index, tmp_path / "a", **SMALL)
    assert m.config.val == 0.1 and m.config.test == 0.0
    assert (m.tracks["train"], m.tracks["val"], m.tracks["test"]) == (12, 1, 4)
    assert m.config.forced_splits == {NEAREST: "val"}
    assert Manifest.load(tmp_path / "a").config.forced_splits == {NEAREST: "val"}
    assert _groups_of(tmp_path / "a", "val") == {NEAREST}
    err = capsys.readouterr().err
    assert f"note: the val split drew no group; {NEAREST} goes to val" in err
    assert "warning: the val split is empty" not in err
    shard_mod.write_shards(small_index, tmp_path / "b", **{**SMALL, "jobs": 2})
    assert _digests(tmp_path / "b") == _digests(tmp_path / "a")


def test_added_files_keep_the_forced_group_where_it_was(small_index, tmp_path):
    root, index = tmp_path / "music", tmp_path / "index.json"
    shutil.copytree(AudioIndex.load(small_index).root, root)
    build_index(root, index, jobs=1, progress=False)
    shard_mod.write_shards(index, tmp_path / "a", **SMALL)
    before = _digests(tmp_path / "a")
    _wav(root / ADDED / "song.wav", 3 * 1024)
    build_index(root, index, jobs=1, progress=False)
    assert draw(4, "train/Synth 011 - Kestrel") > draw(4, NEAREST) > draw(4, ADDED) > 0.1
    refused = (
        rf"differs in: index_sha256\); .*--splits-from {re.escape(str(tmp_path / 'a'))} to keep"
    )
    with pytest.raises(PipelineError, match=refused):
        shard_mod.write_shards(index, tmp_path / "a", **SMALL)
    assert _digests(tmp_path / "a") == before
    m = shard_mod.write_shards(
        index, tmp_path / "b", splits_from=tmp_path / "a/manifest.json", **SMALL
    )
    assert m.config.forced_splits == {NEAREST: "val"}
    assert _groups_of(tmp_path / "b", "val") == {NEAREST}
    assert ADDED in _groups_of(tmp_path / "b", "train")
    unkept = shard_mod.write_shards(index, tmp_path / "c", **SMALL)
    assert unkept.config.forced_splits == {ADDED: "val"}  # what keeping the record prevents
    after = _digests(tmp_path / "b")
    shard_mod.write_shards(index, tmp_path / "b", **SMALL)  # the set in --out: resumes
    (tmp_path / "b" / "manifest.json").unlink()  # as if stopped before the manifest
    shard_mod.write_shards(index, tmp_path / "b", **SMALL)  # the config stamp: resumes
    assert _digests(tmp_path / "b") == after


def test_val_0_or_a_single_hash_split_group_forces_nothing(small_index, tmp_path, capsys):
    m = shard_mod.write_shards(small_index, tmp_path / "a", **{**SMALL, "val": 0.0})
    assert m.config.forced_splits == {} and m.tracks["val"] == 0
    assert "forced_splits" not in json.loads((tmp_path / "a" / shard_mod.CONFIG_STAMP).read_text())
    one = ["train/Synth 001*", f"{SHORT}/*", "test/*"]  # one train group with chunks, one without
    m = shard_mod.write_shards(small_index, tmp_path / "b", include=one, **SMALL)
    assert m.config.forced_splits == {} and m.config.val == 0.1
    assert (m.tracks["train"], m.tracks["val"]) == (1, 0)
    err = capsys.readouterr().err
    assert "note:" not in err and "warning: the val split is empty" in err


@pytest.mark.parametrize(
    "include, forced, tracks",
    [
        # no test folder, so --test 0.1 too: Glacier draws val (0.151), test takes the nearest
        (["train/*"], {"train/Synth 011 - Kestrel": "test"}, (11, 1, 1)),
        # two groups: val first, and train keeps the other
        (["train/Synth 011*", "train/Synth 009*"], {"train/Synth 011 - Kestrel": "val"}, (1, 1, 0)),
    ],
)
def test_a_tree_without_test_folder_forces_val_then_test(
    small_index, tmp_path, include, forced, tracks
):
    m = shard_mod.write_shards(small_index, tmp_path, include=include, **SMALL)
    assert m.config.test == 0.1 and m.config.forced_splits == forced
    assert (m.tracks["train"], m.tracks["val"], m.tracks["test"]) == tracks

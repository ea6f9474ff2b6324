"""pipeline.append (`shard --append`): a grown tree's new files become a new generation of shards;
earlier shards stay byte for byte and earlier groups keep their splits."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import CHUNK, RATE, SHARD_OPTIONS, make_tree
from test_shard import NEAREST, SMALL, _digests, _groups_of, _samples, _small_tree, _wav

from pipeline.append import append_shards
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.index import build_index
from pipeline.merge import merge_manifests
from pipeline.records import Generation, Manifest, ShardInfo
from pipeline.shard import write_shards
from pipeline.splits import draw
from pipeline.tario import iter_members
from pipeline.verify import verify
from trainer.data import ShardDataModule

QUIET = dict(progress=False, **SHARD_OPTIONS)
OLD_GROUP = "extra/Mono Song"  # val in the fixture set (its draw)
ADDED_TO_OLD = f"{OLD_GROUP}/second.wav"
NEW_GROUP = "extra/New Band"
ADDED_NEW = f"{NEW_GROUP}/new.wav"


@dataclass(frozen=True)
class Grown:
    root: Path
    index: Path
    out: Path
    first: dict[str, str]  # the first generation's files' sha256 (tars and manifest)
    first_index: Path  # a copy of the index the first generation was planned from


def _stereo(path: Path, chunks: int, seed: int) -> None:
    """A noise file of `chunks` whole chunks and a short tail (no chunk is silent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, (chunks * CHUNK + 77, 2))
    sf.write(path, noise, RATE, subtype="PCM_16")


def _grow(tmp: Path) -> Grown:
    """A fixture tree sharded, then grown by a file of an old group and a new group, re-indexed."""
    tree = make_tree(tmp / "music")
    out = tmp / "set"
    write_shards(tree.index, out, jobs=1, **QUIET)
    first_index = tmp / "first-index.json"
    shutil.copy(tree.index, first_index)
    first = _digests(out)
    _stereo(tree.root / ADDED_TO_OLD, 2, 1)
    _stereo(tree.root / ADDED_NEW, 3, 2)
    build_index(tree.root, tree.index, jobs=1, progress=False)
    return Grown(tree.root, tree.index, out, first, first_index)


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Grown:
    """The grown set, appended to once with one job."""
    g = _grow(tmp_path_factory.mktemp("grown"))
    assert append_shards(g.index, g.out, jobs=1, **QUIET) is not None
    return g


def _tar_digests(folder: Path) -> dict[str, str]:
    return {k: v for k, v in _digests(folder).items() if k.endswith(".tar")}


CLI_OPTIONS = ["--chunk-frames", str(CHUNK), "--shard-bytes", "60000", "--val", "0.3"]


def _cli_append(g: Grown, *flags: str) -> int:
    args = ["shard", str(g.index), "--out", str(g.out), "--append", "--jobs", "1", "--quiet"]
    return main([*args, *CLI_OPTIONS, "--interleave", "4", *flags])


def _sources(folder: Path, paths: list[str]) -> Counter[str]:
    """How many chunks of each source file the shards at `paths` hold."""
    return Counter(
        json.loads(data)["source"]
        for path in paths
        for name, data in iter_members(folder / path)
        if name.endswith(".json")
    )


def test_earlier_shards_stay_byte_for_byte_and_new_shards_hold_the_new_files(grown):
    after = _tar_digests(grown.out)
    first = {k: v for k, v in grown.first.items() if k.endswith(".tar")}
    assert {k: after[k] for k in first} == first
    new = sorted(set(after) - set(first))
    assert new and all("-g001-" in p for p in new)
    m = Manifest.load(grown.out)
    assert [sorted(p for ps in g.shards.values() for p in ps) for g in m.generations] == [
        sorted(first),
        new,
    ]
    for split, infos in m.shards.items():  # what the loader reads: every generation, in order
        assert [s.path for s in infos] == [p for g in m.generations for p in g.shards[split]]
    assert _sources(grown.out, new) == Counter({ADDED_TO_OLD: 2, ADDED_NEW: 3})
    assert set(m.generations[1].files) == {ADDED_TO_OLD, ADDED_NEW}


def test_a_new_file_of_an_old_group_joins_its_split_and_a_new_group_draws(grown):
    m = Manifest.load(grown.out)
    added = m.generations[1].files
    assert m.generations[0].files[f"{OLD_GROUP}/mono.wav"].split == "val"
    assert draw(0, OLD_GROUP) < 0.3 < draw(0, NEW_GROUP)  # --val 0.3, and no --test: a test folder
    assert (added[ADDED_TO_OLD].split, added[ADDED_NEW].split) == ("val", "train")
    splits = {meta["source"]: meta["split"] for _, meta in _samples(grown.out).values()}
    assert (splits[ADDED_TO_OLD], splits[ADDED_NEW]) == ("val", "train")
    first = m.generations[0]
    assert first.index_sha256 == hashlib.sha256(grown.first_index.read_bytes()).hexdigest()
    assert m.config.index_sha256 == m.generations[1].index_sha256 != first.index_sha256
    assert m.config.index_sha256 == hashlib.sha256(grown.index.read_bytes()).hexdigest()
    assert (m.files, m.tracks) == (
        {"train": 5, "val": 2, "test": 1},
        {"train": 5, "val": 1, "test": 1},
    )


def test_verify_and_the_loader_see_every_generation(grown):
    assert verify(grown.out, against_source=True, progress=False) == []
    m = Manifest.load(grown.out)
    data = ShardDataModule(str(grown.out), seq_len=1024, num_workers=0)
    sources: Counter[str] = Counter()
    for split in ("train", "val", "test"):
        shards = data._split(split, data.sets[0])
        chunks = list(shards.chunks(shards.urls, 0, want_meta=True))
        assert len(chunks) == sum(shards.samples) == m.samples(split)
        sources.update(source for _, (source, _start) in chunks)
    assert sources[ADDED_TO_OLD] == 2 and sources[ADDED_NEW] == 3
    assert sources == _sources(grown.out, [s.path for s in _shard_infos(m)])


def _shard_infos(m: Manifest) -> list[ShardInfo]:
    return [info for infos in m.shards.values() for info in infos]


def test_the_same_append_gives_the_same_bytes_whatever_jobs_and_a_rerun_is_a_no_op(
    grown, tmp_path, capsys
):
    g = _grow(tmp_path)
    assert append_shards(g.index, g.out, jobs=2, **QUIET) is not None
    assert _tar_digests(g.out) == _tar_digests(grown.out)
    before = _digests(g.out)
    assert _cli_append(g) == 0
    assert f"nothing new in {g.index}; {g.out} is unchanged" in capsys.readouterr().out
    assert _digests(g.out) == before
    assert verify(g.out, progress=False) == []


def test_an_interrupted_append_resumes_from_its_journal(tmp_path, monkeypatch):
    from pipeline import shard as shard_mod

    g = _grow(tmp_path)
    real_write, written = shard_mod._write_shard, []

    def failing(job):
        if written:
            raise RuntimeError("injected failure")
        written.append(job.path)
        return real_write(job)

    monkeypatch.setattr(shard_mod, "_write_shard", failing)
    with pytest.raises(RuntimeError, match="injected"):
        append_shards(g.index, g.out, jobs=1, **QUIET)
    assert len(Manifest.load(g.out).generations) == 1  # the manifest is still the first write's
    late = g.root / "extra" / "Late Band" / "late.wav"
    _stereo(late, 1, 3)
    build_index(g.root, g.index, jobs=1, progress=False)
    with pytest.raises(PipelineError, match=r"shard-config-g001.json: an append planned with "):
        append_shards(g.index, g.out, jobs=1, **QUIET)  # the index it stopped with is another
    late.unlink()
    build_index(g.root, g.index, jobs=1, progress=False)

    def never_twice(job):
        assert job.path not in written, f"{job.path} was finished, and is written again"
        return real_write(job)

    monkeypatch.setattr(shard_mod, "_write_shard", never_twice)
    m = append_shards(g.index, g.out, jobs=1, **QUIET)
    assert len(m.generations) == 2 and verify(g.out, progress=False) == []


def test_options_that_differ_from_the_set_are_one_line_naming_them(tmp_path, capsys):
    g = _grow(tmp_path)
    before = _digests(g.out)
    args = ["shard", str(g.index), "--out", str(g.out), "--append", "--quiet"]
    assert main([*args, *CLI_OPTIONS]) == 2  # --interleave left at its default 16
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {g.out}: --append takes the set's options, and these differ: --interleave "
        "(the set has 4, given 16); pass the set's values (see its manifest's config)"
    )
    with pytest.raises(PipelineError, match=r"--seed \(the set has 0, given 1\); --val"):
        append_shards(g.index, g.out, **{**QUIET, "seed": 1, "val": 0.2})
    with pytest.raises(PipelineError, match="--append writes one generation in one process"):
        append_shards(g.index, g.out, partition="0/2", **QUIET)
    assert _cli_append(g, "--splits-from", str(g.out)) == 2
    assert main(["shard", str(g.index), "--out", str(g.out), "--prune", "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --splits-from: not with --append, which keeps the splits of the set in --out",
        "error: --prune: only with --append (it records files an append lost)",
    ]
    assert _digests(g.out) == before


def test_a_changed_file_is_one_clear_error(tmp_path):
    g = _grow(tmp_path)
    before = _digests(g.out)
    _stereo(g.root / "extra" / "Six" / "six.wav", 4, 9)  # rewritten: another size and mtime
    build_index(g.root, g.index, jobs=1, progress=False)
    with pytest.raises(
        PipelineError,
        match=r"1 files it sharded changed since \(first: extra/Six/six.wav \(size, mtime "
        r"or sha256 differ\)\); restore them, or shard the tree into a new folder with "
        r"--splits-from",
    ):
        append_shards(g.index, g.out, jobs=1, **QUIET)
    assert _digests(g.out) == before


def test_a_vanished_file_is_an_error_and_prune_records_it(tmp_path, capsys):
    g = _grow(tmp_path)
    before = _digests(g.out)
    (g.root / "extra" / "Six" / "six.wav").unlink()
    build_index(g.root, g.index, jobs=1, progress=False)
    assert _cli_append(g) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {g.out}: 1 files it sharded are gone from the tree (first: "
        "extra/Six/six.wav); restore them, or pass --prune to record them as gone (their chunks "
        "stay in the set)"
    )
    assert _digests(g.out) == before
    assert _cli_append(g, "--prune") == 0
    assert "records 1 gone (--prune)" in capsys.readouterr().out
    m = Manifest.load(g.out)
    assert m.generations[1].pruned == ["extra/Six/six.wav"]
    assert m.files == {"train": 5, "val": 2, "test": 1}  # six.wav's chunks are still held
    assert {k: v for k, v in _tar_digests(g.out).items() if k in before} == {
        k: v for k, v in before.items() if k.endswith(".tar")
    }
    assert verify(g.out, progress=False) == []  # its chunks stay, intact
    assert _cli_append(g) == 0  # recorded: no longer an error, and nothing new
    assert "nothing new" in capsys.readouterr().out


def test_a_forced_split_is_kept_for_new_files_of_its_group(tmp_path):
    root, index = tmp_path / "music", tmp_path / "index.json"
    _small_tree(root, index)
    first = write_shards(index, tmp_path / "a", **SMALL)
    assert first.config.forced_splits == {NEAREST: "val"}
    tars = _tar_digests(tmp_path / "a")
    _wav(root / NEAREST / "coda.wav", 2 * 1024 + 9)
    _wav(root / "train/New Song 02" / "song.wav", 3 * 1024)  # draws nearer val than NEAREST
    build_index(root, index, jobs=1, progress=False)
    m = append_shards(index, tmp_path / "a", **SMALL)
    assert m.config.forced_splits == {NEAREST: "val"}
    assert m.generations[1].files[f"{NEAREST}/coda.wav"].split == "val"
    assert m.generations[1].files["train/New Song 02/song.wav"].split == "train"
    assert _groups_of(tmp_path / "a", "val") == {NEAREST}
    assert {k: v for k, v in _tar_digests(tmp_path / "a").items() if k in tars} == tars
    assert verify(tmp_path / "a", progress=False) == []


def test_a_plain_shard_or_merge_into_a_grown_set_is_refused(grown, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(grown.out, copy)
    before = _digests(copy)
    with pytest.raises(PipelineError, match="grown by `shard --append`; a plain `shard` into it"):
        write_shards(grown.first_index, copy, jobs=1, **QUIET)
    with pytest.raises(PipelineError, match="grown by `shard --append`; merging the parts"):
        merge_manifests([copy])
    assert _digests(copy) == before


def test_a_manifest_without_generations_loads_as_one_and_is_not_appended_to(grown, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(grown.out, copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["generations"]
    (copy / "manifest.json").write_text(json.dumps(data))
    m = Manifest.load(copy)
    paths = {split: [s.path for s in infos] for split, infos in m.shards.items()}
    assert m.generations == [Generation(data["config"]["index_sha256"], None, paths)]
    with pytest.raises(PipelineError, match="written before shard sets recorded their files"):
        append_shards(grown.index, copy, **QUIET)


def test_a_first_write_records_generation_0_and_merge_keeps_it(tmp_path):
    tree = make_tree(tmp_path / "music")
    whole = write_shards(tree.index, tmp_path / "whole", jobs=1, **QUIET)
    for part in ("0/2", "1/2"):
        write_shards(tree.index, tmp_path / "parts", partition=part, jobs=1, **QUIET)
    merged = merge_manifests([tmp_path / "parts"])
    assert merged.generations == whole.generations
    (only,) = whole.generations
    assert only.files["extra/Six/six.wav"].chunks == 4 and only.pruned == []
    assert (tmp_path / "parts/manifest.json").read_bytes() == (
        tmp_path / "whole/manifest.json"
    ).read_bytes()


def test_no_earlier_group_is_forced_into_a_split_the_set_lacks(tmp_path):
    """One train group drew no val and could not be forced there (train would be empty). A new
    group with a larger draw arrives: the usual rule would force the old, nearer one into val,
    but its chunks are train shards already, so nothing is forced."""
    root, index = tmp_path / "music", tmp_path / "index.json"
    _wav(root / "train/Gamma/a.wav", 3 * 1024 + 1)
    _wav(root / "test/Omega/b.wav", 3 * 1024 + 2)
    build_index(root, index, jobs=1, progress=False)
    first = write_shards(index, tmp_path / "a", **SMALL)
    assert first.config.forced_splits == {} and first.tracks["val"] == 0
    assert 0.1 < draw(4, "train/Gamma") < draw(4, "train/Delta")
    _wav(root / "train/Delta/c.wav", 3 * 1024 + 3)
    build_index(root, index, jobs=1, progress=False)
    m = append_shards(index, tmp_path / "a", **SMALL)
    assert m.config.forced_splits == {}
    assert m.generations[1].files["train/Delta/c.wav"].split == "train"
    assert (m.tracks, m.files) == ({"train": 2, "val": 0, "test": 1},) * 2


def test_a_new_copy_of_a_sharded_file_is_a_duplicate_not_new(tmp_path):
    g = _grow(tmp_path)
    append_shards(g.index, g.out, jobs=1, **QUIET)
    copy = g.root / "extra" / "Aaa" / "six.wav"  # before the original in index order
    copy.parent.mkdir()
    shutil.copy2(g.root / "extra" / "Six" / "six.wav", copy)
    build_index(g.root, g.index, jobs=1, progress=False)
    before = _digests(g.out)
    assert append_shards(g.index, g.out, jobs=1, **QUIET) is None
    assert _digests(g.out) == before


def test_an_append_to_object_storage_is_refused_in_one_line(tree):
    with pytest.raises(PipelineError, match="s3://b/set: shard --append writes local folders only"):
        append_shards(tree.index, "s3://b/set")

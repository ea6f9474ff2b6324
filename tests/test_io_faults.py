"""Faults of the files around a command, each one `error:` line that names the path, exit 2,
and nothing half-written left under a final name: a missing, empty or non-audio input, a
missing checkpoint, shard set or gaps file; a disk that refuses writes (a real file size limit,
`RLIMIT_FSIZE`, in a subprocess; a full disk raised inside atomic_path) and a read-only
folder."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RATE, SHARD_OPTIONS, Tree
from test_evaluate import SEQ, _write
from test_evaluate import ckpt as ckpt  # a fixture, and the `run` it needs
from test_evaluate import run as run

from pipeline.errors import DiskError
from pipeline.fsutil import atomic_path
from trainer.evaluation import evaluate as evaluate_module
from trainer.evaluation import predict as predict_module

REPO = Path(__file__).resolve().parents[1]
FILE_SIZE_LIMIT = 1000  # bytes: under the fixture index, a shard and a second of output
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _one_error_line(err: str, *words: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def _no_temp_files(folder: Path) -> None:
    assert not list(folder.rglob(".*.tmp")), list(folder.rglob(".*.tmp"))


# ------------------------------------------------------------------ missing and unreadable files


@pytest.mark.parametrize("which", ["IN", "--ckpt", "--gaps-file"])
def test_predict_names_a_missing_file_and_says_it_is_missing(ckpt, tmp_path, capsys, which):
    gaps, out, missing = tmp_path / "gaps.txt", tmp_path / "out.wav", tmp_path / "nothere.wav"
    gaps.write_text("0.001 0.002\n")
    files = {"IN": _write(tmp_path / "in.wav", 2 * SEQ, RATE), "--ckpt": ckpt, "--gaps-file": gaps}
    files[which] = missing
    argv = [str(files["IN"]), str(out), "--ckpt", str(files["--ckpt"]), "--mode", "repair"]
    assert predict_module.main([*argv, "--gaps-file", str(files["--gaps-file"])]) == 2
    _one_error_line(capsys.readouterr().err, f"error: {missing}: missing: ")
    assert not out.exists()
    _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("make", "says"),
    [(Path.touch, "empty file (0 bytes)"), (Path.mkdir, "a folder, not an audio file")],
)
def test_predict_names_an_empty_file_or_a_folder_given_as_input_and_says_which(
    ckpt, tmp_path, capsys, make, says
):
    """(A file that is not audio is test_evaluate's: `not readable as audio: Format not ...`.)"""
    inp, out = tmp_path / "song.wav", tmp_path / "out.wav"
    make(inp)
    assert predict_module.main([str(inp), str(out), "--ckpt", str(ckpt), "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, f"error: {inp}: {says}")
    assert not out.exists()
    _no_temp_files(tmp_path)


def test_a_web_page_saved_as_a_checkpoint_is_not_a_checkpoint(tmp_path, capsys):
    page, inp, out = (
        tmp_path / "model.ckpt",
        _write(tmp_path / "in.wav", SEQ, RATE),
        tmp_path / "o.wav",
    )
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>\n")
    assert predict_module.main([str(inp), str(out), "--ckpt", str(page), "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, f"error: {page}: not a checkpoint (torch.save writes")


@pytest.mark.parametrize("which", ["--ckpt", "--shards"])
def test_evaluate_names_a_missing_checkpoint_or_shard_set(ckpt, shard_dir, tmp_path, capsys, which):
    missing = tmp_path / "nothere"
    files = {"--ckpt": ckpt, "--shards": shard_dir, which: missing}
    argv = ["--ckpt", str(files["--ckpt"]), "--shards", str(files["--shards"])]
    assert evaluate_module.main([*argv, "--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, f"error: {missing}: missing: ")
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------ a disk that refuses writes


def test_a_full_disk_inside_atomic_path_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    final = tmp_path / "out" / "report.json"
    full = rf"^{final}: cannot write: the disk is full: free space"
    with pytest.raises(DiskError, match=full), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(final.parent.iterdir()) == []


def _file_size_limit(limit: int) -> Callable[[], None]:
    """What makes a child's writes past `limit` bytes fail with EFBIG."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # or the limit kills instead of EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


def _drop_root_override() -> None:
    """Root writes into a 0o555 folder anyway: a child without the capabilities that let it (the
    bounding set applies at exec) meets the folder's permissions like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _command(
    name: str, folder: Path, tree: Tree, shard_dir: Path, ckpt: Path, tmp_path: Path
) -> tuple[list[str], Path]:
    """`python -m ...` of `name` writing under `folder`, and what it writes there."""
    if name == "index":
        out = folder / "index.json"
        return ["pipeline", "index", str(tree.root), "--out", str(out), "--quiet"], out
    if name == "shard":
        out = folder / "shards"
        options = [f"--{key.replace('_', '-')}={value}" for key, value in SHARD_OPTIONS.items()]
        # two jobs: the shards are written by a worker process, whose error crosses the pool
        return ["pipeline", "shard", str(tree.index), "--out", str(out), "--jobs", "2",
                "--quiet", *options], out  # fmt: skip
    if name == "predict":
        inp, out = _write(tmp_path / "in.wav", RATE, RATE), folder / "out.wav"
        return ["trainer", "predict", str(inp), str(out), "--ckpt", str(ckpt),
                "--seq-len", str(SEQ), "--no-progress"], out  # fmt: skip
    out = folder / "eval"  # evaluate
    return ["trainer", "evaluate", "--ckpt", str(ckpt), "--shards", str(shard_dir),
            "--out", str(out), "--max-chunks", "1", "--no-progress"], out  # fmt: skip


def _run(argv: list[str], preexec: Callable[[], None] | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("name", ["index", "shard", "predict"])
def test_a_file_size_limit_stops_the_command_in_one_line_and_leaves_nothing_half_written(
    tree, shard_dir, ckpt, tmp_path, name
):
    folder = tmp_path / "out"
    argv, out = _command(name, folder, tree, shard_dir, ckpt, tmp_path)
    done = _run(argv, _file_size_limit(FILE_SIZE_LIMIT))
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, str(out), "file size limit")
    assert not out.exists() if name != "shard" else not list(out.rglob("*.tar"))
    assert not (out / "manifest.json").exists()
    _no_temp_files(folder)


def test_a_shard_refused_at_its_end_of_archive_blocks_is_one_line_too(tree, shard_dir, tmp_path):
    argv, out = _command("shard", tmp_path, tree, shard_dir, Path(), tmp_path)
    largest = max(path.stat().st_size for path in shard_dir.rglob("*.tar"))
    done = _run(argv, _file_size_limit(largest - 100))  # within its last 1024 bytes of zeros
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, str(out), "file size limit")
    for tar in out.rglob("*.tar"):  # those under the limit, complete
        assert tar.read_bytes() == (shard_dir / tar.relative_to(out)).read_bytes()
    _no_temp_files(out)


@pytest.fixture
def read_only(tmp_path) -> Iterator[Callable[[], None] | None]:
    """A 0o555 folder at tmp_path/ro, and what makes a child meet its permissions (None: an
    ordinary user does); skipped where it cannot be made to (root without CAP_SETPCAP)."""
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    preexec = _drop_root_override if os.geteuid() == 0 else None
    probe = [sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"]
    try:
        writes = subprocess.run(probe, preexec_fn=preexec, capture_output=True).returncode == 0
    except subprocess.SubprocessError:
        writes = True
    if writes:
        pytest.skip("root here may not drop CAP_DAC_OVERRIDE: a 0o555 folder stops no write")
    yield preexec
    folder.chmod(0o755)


@pytest.mark.parametrize("name", ["index", "shard", "predict", "evaluate"])
def test_a_read_only_folder_stops_the_command_in_one_line_before_any_work(
    tree, shard_dir, ckpt, tmp_path, read_only, name
):
    folder = tmp_path / "ro"
    argv, _ = _command(name, folder, tree, shard_dir, ckpt, tmp_path)
    done = _run(argv, read_only)
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, f"error: {folder}", "permission denied")
    assert list(folder.iterdir()) == []

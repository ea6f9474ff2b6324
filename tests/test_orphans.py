"""No orphans: a killed or interrupted `shard` leaves no worker process and no temporary file.

Each test starts `python -m pipeline shard --jobs 2` on a corpus that takes it several seconds
(resampling 16 kHz to 48 kHz), waits until both workers are writing a shard, then kills or
interrupts it. Workers are found through /proc (Linux), as the children of the main process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.index import build_index
from pipeline.synth import make_corpus

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

JOBS = 2
DEADLINE_S = 10.0  # for every wait; a pass takes a fraction of it


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """The index of 4 tracks of 30 s at 16 kHz: several seconds of sharding at 48 kHz."""
    root = tmp_path_factory.mktemp("orphans") / "music"
    make_corpus(root, tracks=4, seconds=30.0, seed=0, sample_rate=16000)
    path = root.parent / "index.json"
    build_index(root, path, jobs=1, progress=False)
    return path


def _shard(index: Path, out: Path) -> subprocess.Popen[str]:
    """`shard` in a session of its own, so that its process group is its own too."""
    options = ["--jobs", str(JOBS), "--quiet", "--chunk-frames", "4096", "--sample-rate", "48000"]
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "shard", str(index), "--out", str(out), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None when PID is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children(parent: int) -> set[int]:
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return {pid for pid in pids if (stat := _stat(pid)) and int(stat[1]) == parent}


def _alive(pid: int) -> bool:
    """A zombie is dead: an orphan's new parent (PID 1 of a container) may never reap it."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in "ZX"


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < end, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.02)


def _tmp_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tmp"))


@pytest.fixture
def busy_shard(index, tmp_path) -> Iterator[tuple[subprocess.Popen[str], set[int], Path]]:
    """A running `shard`, its workers and its output folder, once each worker writes a shard;
    kills whatever is left of them afterwards, so a failing test leaves no orphans either."""
    out = tmp_path / "shards"
    proc = _shard(index, out)
    workers: set[int] = set()
    try:

        def busy() -> bool:
            assert proc.poll() is None, f"shard ended early: {proc.communicate()[1]}"
            workers.update(_children(proc.pid))
            return len(workers) >= JOBS and len(list(out.rglob("*.tar.*.tmp"))) >= JOBS

        _wait_for(busy, f"{JOBS} workers writing shards")
        assert not list(out.rglob("*.tar")), "a shard was finished before the test acted"
        yield proc, workers, out
    finally:
        for pid in {proc.pid} | workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_of_shard_leaves_no_worker_alive(busy_shard):
    proc, workers, out = busy_shard
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    _wait_for(lambda: not any(_alive(pid) for pid in workers), "orphaned workers exit")
    assert _tmp_files(out) == []  # the workers' interrupted writes removed their files


def _assert_stopped_mid_shard(proc: subprocess.Popen[str], workers: set[int], out: Path) -> str:
    """Exited 130 with its workers, no temporary file left and no shard finished after the
    interrupt (none was before it); its stderr."""
    _, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 130, err
    _wait_for(lambda: not any(_alive(pid) for pid in workers), "workers exit")
    assert _tmp_files(out) == []
    assert not list(out.rglob("*.tar")), "workers went on writing shards after the interrupt"
    return err


def test_ctrl_c_of_shard_exits_130_leaving_no_file_and_no_worker(busy_shard):
    proc, workers, out = busy_shard
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    err = _assert_stopped_mid_shard(proc, workers, out)
    assert len(err.splitlines()) == 1 and err.startswith("interrupted; "), err


def test_interrupting_the_main_process_alone_stops_its_workers_mid_shard(busy_shard):
    """As `kill -INT` of the main process: it stops its workers rather than awaiting them."""
    proc, workers, out = busy_shard
    os.kill(proc.pid, signal.SIGINT)
    _assert_stopped_mid_shard(proc, workers, out)

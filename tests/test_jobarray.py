"""pipeline.jobarray: the part a job array's task writes, and shard run as an array end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARD_OPTIONS
from test_shard import _digests

from pipeline.errors import PipelineError
from pipeline.jobarray import VARIABLES, resolve_partition

REPO = Path(__file__).resolve().parent.parent
SLURM_5_OF_1_TO_7_STEP_2 = {  # sbatch --array=1-7:2, the task numbered 5
    "SLURM_ARRAY_TASK_ID": "5",
    "SLURM_ARRAY_TASK_COUNT": "4",
    "SLURM_ARRAY_TASK_MIN": "1",
    "SLURM_ARRAY_TASK_MAX": "7",
    "SLURM_ARRAY_TASK_STEP": "2",
}


@pytest.mark.parametrize(
    ("environ", "part"),
    [
        ({}, None),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),
        (  # sbatch --array=1-8: numbered from 1
            {
                "SLURM_ARRAY_TASK_ID": "8",
                "SLURM_ARRAY_TASK_COUNT": "8",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "8",
                "SLURM_ARRAY_TASK_STEP": "1",
            },
            (7, 8),
        ),
        (SLURM_5_OF_1_TO_7_STEP_2, (2, 4)),
        (  # qsub -t 2-10:2 (tasks 2, 4, 6, 8, 10), the task numbered 6
            {
                "SGE_TASK_ID": "6",
                "SGE_TASK_FIRST": "2",
                "SGE_TASK_LAST": "10",
                "SGE_TASK_STEPSIZE": "2",
            },
            (2, 5),
        ),
        (  # an SGE job that is not an array
            {
                "SGE_TASK_ID": "undefined",
                "SGE_TASK_FIRST": "undefined",
                "SGE_TASK_LAST": "undefined",
                "SGE_TASK_STEPSIZE": "undefined",
            },
            None,
        ),
        (  # the generic pair wins over a scheduler's variables
            {"STEREOTOK_PART_INDEX": "1", "STEREOTOK_PART_COUNT": "3"} | SLURM_5_OF_1_TO_7_STEP_2,
            (1, 3),
        ),
    ],
)
def test_the_part_is_read_from_the_environment(environ, part):
    assert resolve_partition(None, environ) == part


def test_the_part_read_is_said_in_one_line_on_stderr(capsys):
    resolve_partition(None, SLURM_5_OF_1_TO_7_STEP_2)
    assert capsys.readouterr().err == (
        "note: --partition 2/4 from SLURM_ARRAY_TASK_ID=5, SLURM_ARRAY_TASK_COUNT=4, "
        "SLURM_ARRAY_TASK_MIN=1, SLURM_ARRAY_TASK_MAX=7, SLURM_ARRAY_TASK_STEP=2\n"
    )


@pytest.mark.parametrize(("spec", "part"), [("1/2", (1, 2)), ("none", None), ("NONE", None)])
def test_an_explicit_partition_wins_over_the_environment(spec, part, capsys):
    assert resolve_partition(spec, SLURM_5_OF_1_TO_7_STEP_2) == part
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"SLURM_ARRAY_TASK_ID": "3"},
            "SLURM_ARRAY_TASK_ID=3 is set but not SLURM_ARRAY_TASK_COUNT",
        ),
        ({"SLURM_ARRAY_TASK_COUNT": "8"}, "is set but not SLURM_ARRAY_TASK_ID"),
        ({"STEREOTOK_PART_INDEX": "0"}, "is set but not STEREOTOK_PART_COUNT"),
        ({"SGE_TASK_ID": "4"}, "is set but not SGE_TASK_FIRST, SGE_TASK_LAST"),
        ({"PBS_ARRAY_INDEX": "2"}, "PBS_ARRAY_INDEX=2 names this array task but not how many"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "'x' is not a whole number"),
        ({"STEREOTOK_PART_INDEX": "3", "STEREOTOK_PART_COUNT": "3"}, "not one task of an array"),
        (  # sbatch --array=1,2,9: listed numbers, no range
            {
                "SLURM_ARRAY_TASK_ID": "9",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "9",
                "SLURM_ARRAY_TASK_STEP": "1",
            },
            "not one task of an array 1, 2, ... of 3 tasks",
        ),
    ],
)
def test_a_half_set_or_irregular_environment_is_one_clear_error(environ, message):
    with pytest.raises(PipelineError, match=message) as error:
        resolve_partition(None, environ)
    assert "pass --partition I/N" in str(error.value) and "\n" not in str(error.value)


def test_a_bad_explicit_partition_is_one_clear_error():
    with pytest.raises(PipelineError, match="expected I/N with 0 <= I < N"):
        resolve_partition("2/2", {})


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGS` with no job-array variable but those in `env`."""
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=clean | (env or {}),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def _array_task(tree, out: Path, task: int, count: int) -> str:
    """`shard` as task `task` of a SLURM array of `count` (no --partition); its stderr."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in SHARD_OPTIONS.items()]
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count)}
    run = _run(
        "shard", str(tree.index), "--out", str(out), *options, "--jobs=1", "--quiet", env=env
    )
    assert run.returncode == 0, run.stderr
    return run.stderr


def _shard_files(out: Path) -> dict[str, tuple[int, int]]:
    """Every shard -> (inode, mtime): an atomic rewrite gives it a new inode."""
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.tar")
    }


def test_an_array_of_two_tasks_merged_equals_one_run_byte_for_byte(tree, shard_dir, tmp_path):
    note = _array_task(tree, tmp_path, 0, 2)
    assert "note: --partition 0/2 from SLURM_ARRAY_TASK_ID=0, SLURM_ARRAY_TASK_COUNT=2\n" in note
    assert [p.name for p in tmp_path.glob("manifest*.json")] == ["manifest.part-0-of-2.json"]

    early = _run("merge", str(tmp_path))
    assert early.returncode == 2
    assert early.stderr.startswith("error: merge: parts [1] of 2 are missing")
    assert not (tmp_path / "manifest.json").exists()

    first = _shard_files(tmp_path)
    _array_task(tree, tmp_path, 1, 2)
    assert first.items() <= _shard_files(tmp_path).items()  # part 1 wrote none of part 0's
    assert _run("merge", str(tmp_path)).returncode == 0
    assert _digests(tmp_path) == _digests(shard_dir)

    finished = _shard_files(tmp_path)
    _array_task(tree, tmp_path, 0, 2)  # a relaunch of a finished task: the journal skips all
    assert _shard_files(tmp_path) == finished
    assert _digests(tmp_path) == _digests(shard_dir)

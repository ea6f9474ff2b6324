"""Which part of a shard set this process writes: `--partition I/N`, or a job array's task number.

A job array runs one command N times with the task's number in the environment. Reading it here
lets one `shard` line serve every task of an array: task k writes part k of N, and `merge` joins
the parts. The variables read, in this order, and how `--partition` overrides them, are in
docs/cluster.md.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import PipelineError

NO_PARTITION = "none"  # `--partition none`: the whole set, whatever the environment says
UNSET = ("", "undefined")  # SGE sets its task variables to `undefined` outside an array


@dataclass(frozen=True)
class Scheduler:
    """The variables in which a scheduler names a task: `task` counts from `first` in steps of
    `step` (defaults 0 and 1), up to `count` tasks or up to `last`, whichever it provides."""

    task: str
    count: str | None = None
    first: str | None = None
    last: str | None = None
    step: str | None = None

    @property
    def variables(self) -> tuple[str, ...]:
        names = (self.task, self.count, self.first, self.last, self.step)
        return tuple(n for n in names if n is not None)

    @property
    def required(self) -> tuple[str, ...]:
        """The task number and what tells how many tasks there are."""
        ends = (self.count,) if self.count is not None else (self.first, self.last)
        return (self.task, *(n for n in ends if n is not None))


GENERIC = Scheduler("STEREOTOK_PART_INDEX", count="STEREOTOK_PART_COUNT")
SCHEDULERS = (
    GENERIC,
    Scheduler(
        "SLURM_ARRAY_TASK_ID",
        count="SLURM_ARRAY_TASK_COUNT",
        first="SLURM_ARRAY_TASK_MIN",
        last="SLURM_ARRAY_TASK_MAX",
        step="SLURM_ARRAY_TASK_STEP",
    ),
    Scheduler(
        "SGE_TASK_ID",
        first="SGE_TASK_FIRST",
        last="SGE_TASK_LAST",
        step="SGE_TASK_STEPSIZE",
    ),
)
# PBS Pro and Torque name the task but not how many there are; were they ignored, every task
# would write the whole set into one folder, so their number alone is refused with the fix
INDEX_ONLY = ("PBS_ARRAY_INDEX", "PBS_ARRAYID")
VARIABLES = tuple(n for s in SCHEDULERS for n in s.variables) + INDEX_ONLY
FIX = (
    f"pass --partition I/N (I counted from 0), or set {GENERIC.task} and {GENERIC.count}; "
    f"--partition {NO_PARTITION} writes the whole set (see docs/cluster.md)"
)


@dataclass(frozen=True)
class ArrayTask:
    """The part an array task writes, and the variables it was read from (for the note)."""

    part: tuple[int, int]
    read: dict[str, str]

    def note(self) -> str:
        return f"note: --partition {self.part[0]}/{self.part[1]} from {_listed(self.read)}"


def parse_partition(spec: str | None) -> tuple[int, int] | None:
    """`I/N` -> (I, N); None -> None."""
    if spec is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not match or not int(match[1]) < int(match[2]):
        raise PipelineError(
            f"--partition {spec!r}: expected I/N with 0 <= I < N, e.g. 0/4, "
            f"or {NO_PARTITION} for the whole set"
        )
    return int(match[1]), int(match[2])


def _listed(read: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in read.items())


def _whole(read: Mapping[str, str], name: str | None, default: int) -> int:
    if name is None or name not in read:
        return default
    try:
        return int(read[name])
    except ValueError:
        raise PipelineError(f"{name}={read[name]!r} is not a whole number; {FIX}") from None


def _task_of(scheduler: Scheduler, environ: Mapping[str, str]) -> ArrayTask | None:
    read = {n: environ[n] for n in scheduler.variables if environ.get(n, "") not in UNSET}
    if not read:
        return None
    missing = [n for n in scheduler.required if n not in read]
    if missing:
        raise PipelineError(
            f"{_listed(read)} is set but not {', '.join(missing)}, so the number of parts is "
            f"unknown; set it, or {FIX}"
        )
    first = _whole(read, scheduler.first, 0)
    step = max(_whole(read, scheduler.step, 1), 1)
    if scheduler.count is not None:
        count = _whole(read, scheduler.count, 0)
        last = first + step * (count - 1)
        on_grid = _whole(read, scheduler.last, last) == last  # not so for a list: --array=1,2,9
    else:
        count = (_whole(read, scheduler.last, first) - first) // step + 1
        on_grid = True
    offset = _whole(read, scheduler.task, 0) - first
    if not (on_grid and 0 <= offset < step * count and offset % step == 0):
        raise PipelineError(
            f"{_listed(read)}: not one task of an array {first}, {first + step}, ... of {count} "
            f"tasks (an array of listed numbers, e.g. --array=1,2,9, is none); {FIX}"
        )
    return ArrayTask((offset // step, count), read)


def array_task(environ: Mapping[str, str]) -> ArrayTask | None:
    """This process's part from the first scheduler whose variables are set; None outside an
    array. A task number without its count is an error, not the whole set."""
    for scheduler in SCHEDULERS:
        task = _task_of(scheduler, environ)
        if task is not None:
            return task
    for name in INDEX_ONLY:
        if environ.get(name, "") not in UNSET:
            raise PipelineError(
                f"{name}={environ[name]} names this array task but not how many there are; {FIX}"
            )
    return None


def resolve_partition(
    spec: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[int, int] | None:
    """The part to write: `--partition I/N` as given; `none`: the whole set; not given: the job
    array's task, said in one line on stderr, or the whole set outside an array."""
    if spec is not None:
        return None if spec.lower() == NO_PARTITION else parse_partition(spec)
    task = array_task(environ)
    if task is None:
        return None
    print(task.note(), file=sys.stderr)
    return task.part

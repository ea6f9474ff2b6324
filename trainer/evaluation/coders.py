"""The lossless coders the model is compared with, each on exactly the scored samples as
contiguous per-source segments (`segments`): FLAC -8 in memory (libsndfile), and, when their
binaries are on PATH, WavPack -hhx6 and Sac --normal through a temporary 16-bit WAV.

A missing binary, or one that fails, gives a skipped row with its reason, never an error: they
are baselines, not dependencies (Sac is on neither PyPI nor Debian). Each coder's cost of the
target given the input is (its stereo file - its file of the input alone) x 8 / frames, summed
over segments (`CoderCost`). See docs/evaluation.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from trainer.evaluation.baselines import FLAC_COMPRESSION_LEVEL, CoderCost, flac_bits
from trainer.evaluation.report import CODERS, CoderRow, CoderRows
from trainer.evaluation.segments import Segment

__all__ = ["SAC", "WAVPACK", "Coder", "CoderFailed", "Program", "find_coders", "measure_coders"]

# int16 [2, frames] (left, right), sample rate, input channel -> the sizes of one segment
CostFn = Callable[[np.ndarray, int, int], CoderCost]


class CoderFailed(RuntimeError):
    """An external coder exited with an error or wrote no file: its row is skipped."""


@dataclass(frozen=True)
class Program:
    """An external coder: `args` name the WAV and the output file as {wav} and {out}."""

    binary: str
    args: tuple[str, ...]
    suffix: str  # of the output file
    version_args: tuple[str, ...]  # a call that prints a line starting with the binary's name
    install: str  # how to get the binary, for the skipped row

    def command(self) -> str:
        return " ".join([self.binary, *self.args]).format(wav="in.wav", out=f"out{self.suffix}")


WAVPACK = Program(
    "wavpack",
    ("-hhx6", "-q", "-y", "{wav}", "-o", "{out}"),
    ".wv",
    ("--version",),
    "apt-get install wavpack",
)
SAC = Program(
    "sac",
    ("--encode", "--normal", "{wav}", "{out}"),
    ".sac",
    (),  # run bare, sac prints its banner ("Sac v0.7.25 - ...") and its usage
    "build it from https://github.com/slmdev/sac and put it on PATH",
)


@dataclass(frozen=True)
class Coder:
    """One coder as evaluate runs it: `cost` sizes a segment; None when the coder is skipped."""

    label: str
    command: str
    version: str | None
    skipped: str | None
    cost: CostFn | None


def _file_bytes(path: str, program: Program, samples: np.ndarray, rate: int) -> int:
    """Bytes of `program`'s file of int16 `samples` ([frames] mono or [frames, 2])."""
    with tempfile.TemporaryDirectory(prefix="stereotok-coder-") as tmp:
        wav, out = Path(tmp) / "in.wav", Path(tmp) / f"out{program.suffix}"
        sf.write(wav, samples, rate, subtype="PCM_16")
        args = [arg.format(wav=wav, out=out) for arg in program.args]
        done = subprocess.run([path, *args], capture_output=True, text=True, errors="replace")
        if done.returncode != 0 or not out.is_file():
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
            raise CoderFailed(f"{path} exited {done.returncode}: {''.join(said) or 'no file'}")
        return out.stat().st_size


def _version(path: str, program: Program) -> str | None:
    """The first line of the program's output that starts with its name, if any."""
    try:
        call = [path, *program.version_args]
        done = subprocess.run(call, capture_output=True, text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout + "\n" + done.stderr).splitlines()
    name = program.binary.lower()
    return next((line.strip() for line in lines if line.lower().startswith(name)), None)


def _external(label: str, program: Program) -> Coder:
    path = shutil.which(program.binary)
    if path is None:
        reason = f"{program.binary} not on PATH ({program.install})"
        return Coder(label, program.command(), None, reason, None)

    def cost(samples: np.ndarray, rate: int, input_channel: int) -> CoderCost:
        return CoderCost(
            stereo_bytes=_file_bytes(path, program, samples.T, rate),
            input_bytes=_file_bytes(path, program, samples[input_channel], rate),
            target_bytes=None,
            frames=samples.shape[1],
        )

    return Coder(label, program.command(), _version(path, program), None, cost)


def find_coders() -> CoderRows[Coder]:
    """FLAC always; WavPack and Sac when their binaries are on PATH (skipped rows otherwise)."""
    flac = Coder(
        "FLAC -8",
        f"libsndfile FLAC in memory, compression level {FLAC_COMPRESSION_LEVEL:g}",
        f"libsndfile {sf.__libsndfile_version__}",
        None,
        flac_bits,
    )
    return CoderRows(flac, _external("WavPack -hhx6", WAVPACK), _external("Sac --normal", SAC))


def _row(coder: Coder, segments: Sequence[Segment], costs: list[CoderCost | str]) -> CoderRow:
    """The coder's row from its segments' costs (a string: why one failed)."""
    failed = next((c for c in costs if isinstance(c, str)), None)
    skipped = coder.skipped or (None if failed is None else f"failed: {failed}")
    per_source: dict[str, CoderCost] = {}
    if skipped is None:
        for segment, cost in zip(segments, costs, strict=True):
            known = per_source.get(segment.source)
            per_source[segment.source] = cost if known is None else known + cost
    pooled = sum(per_source.values(), start=CoderCost(0, 0, 0, 0)) if per_source else None
    return CoderRow(coder.label, coder.command, coder.version, skipped, pooled, per_source)


def measure_coders(
    segments: Sequence[Segment],
    rate: int,
    input_channel: int,
    coders: CoderRows[Coder] | None = None,
) -> CoderRows[CoderRow]:
    """Every available coder on every segment, in parallel over the CPU cores (the external
    coders are processes; libsndfile runs outside the GIL), the longest segments first."""
    coders = coders or find_coders()

    def run(cost: CostFn, segment: Segment) -> CoderCost | str:
        try:
            return cost(segment.samples(), rate, input_channel)
        except CoderFailed as failure:
            return str(failure)

    jobs = [
        (key, number, coder.cost)
        for key in CODERS
        if (coder := getattr(coders, key)).cost is not None
        for number in sorted(range(len(segments)), key=lambda n: -segments[n].frames)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {(key, n): pool.submit(run, cost, segments[n]) for key, n, cost in jobs}
    rows = {}
    for key in CODERS:
        coder = getattr(coders, key)
        costs = [futures[key, n].result() for n in range(len(segments))] if coder.cost else []
        rows[key] = _row(coder, segments, costs)
    return CoderRows(**rows)

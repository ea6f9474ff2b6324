"""The training curve beside a checkpoint: the CSVLogger `metrics.csv` of its run, read into the
bits-per-sample series that the report's picture draws."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["METRIC_NAMES", "Curve", "find_metrics_csv", "read_curve"]

METRIC_NAMES = ("train/bits_per_sample", "val/bits_per_sample", "val/bits_per_sample_untrained")

Curve = dict[str, tuple[list[int], list[float]]]
"""{metric: (steps, values)}, only the metrics the file holds."""


def find_metrics_csv(ckpt: str | Path, levels_up: int = 1) -> Path | None:
    """The newest `metrics.csv` (Lightning's CSVLogger) at most 3 folders below the checkpoint's
    folder or one of its `levels_up` parents, nearest first; None if there is none.

    One level up covers both layouts of a run: `ROOT/checkpoints/last.ckpt` beside
    `ROOT/csv/version_N/metrics.csv`, and `ROOT/csv/version_N/export/` inside the version folder.
    Going further would pick up other runs' curves, and the bounded depth keeps a checkpoint
    lying in a home folder from walking the whole disk.
    """
    path = Path(ckpt).resolve()
    start = path if path.is_dir() else path.parent
    for folder in [start, *list(start.parents)[:levels_up]]:
        found = [
            p
            for pattern in ("metrics.csv", "*/metrics.csv", "*/*/metrics.csv", "*/*/*/metrics.csv")
            for p in folder.glob(pattern)
            if p.is_file()
        ]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def read_curve(path: Path) -> Curve:
    """Train/val bits per sample (and the val bits of a head untrained, where the head has such a
    baseline) from a CSVLogger metrics.csv; {} when the file is not readable."""
    curve: Curve = {name: ([], []) for name in METRIC_NAMES}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for name in METRIC_NAMES:
                    value, step = row.get(name), row.get("step")
                    if value not in (None, "") and step not in (None, ""):
                        curve[name][0].append(int(float(step)))
                        curve[name][1].append(float(value))
    except (OSError, ValueError, csv.Error):
        return {}
    return {k: v for k, v in curve.items() if v[0]}

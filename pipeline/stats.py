"""`stats DIR`: what a shard set holds, per split, and how its token levels are spread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.records import Manifest
from pipeline.verify import decode_sample, iter_samples

# Bands of |sample| in dBFS for the level histogram; 0 and full scale get rows of their own.
_BANDS_DB = [-90, -60, -40, -20, -10, -3, 0]


def level_histogram(manifest: Manifest, folder: Path, progress: bool = True) -> np.ndarray:
    """Count of every uint16 token value over all shards (65536 bins)."""
    counts = np.zeros(65536, dtype=np.int64)
    problems: list[str] = []
    infos = [info for infos in manifest.shards.values() for info in infos]
    for info in tqdm(infos, desc="stats", unit="shard", disable=not progress):
        for key, members in iter_samples(folder / info.path, problems):
            decoded = decode_sample(
                folder / info.path, key, members, manifest.config.chunk_frames, problems
            )
            if decoded is not None:
                counts += np.bincount(decoded[0].ravel(), minlength=65536)
    return counts


def _level_rows(counts: np.ndarray) -> list[str]:
    magnitude = np.abs(np.arange(65536) - 32768)
    total = max(int(counts.sum()), 1)
    edges = [0.0] + [32768 * 10 ** (db / 20) for db in _BANDS_DB]
    rows = [("0 (digital silence)", counts[magnitude == 0].sum())]
    for lo, hi, db_lo, db_hi in zip(
        edges[:-1], edges[1:], [None, *_BANDS_DB[:-1]], _BANDS_DB, strict=True
    ):
        band = (magnitude > lo) & (magnitude <= hi) & (magnitude < 32767)
        label = f"< {db_hi} dBFS" if db_lo is None else f"{db_lo} .. {db_hi} dBFS"
        rows.append((label, counts[band].sum()))
    rows.append(("full scale (clipped)", counts[magnitude >= 32767].sum()))
    return [
        f"  {label:<22}{n:>14} {100 * n / total:6.2f}% {'#' * round(50 * n / total)}"
        for label, n in rows
    ]


def shard_stats(folder: Path | str, progress: bool = True) -> str:
    """A table of the shard set in `folder` and the histogram of its token levels."""
    folder = Path(folder)
    m = Manifest.load(folder)
    lines = [
        f"{folder}: {m.config.chunk_frames}-frame chunks at {m.config.sample_rate} Hz, "
        f"channels {m.config.channels}",
        f"  {'split':<6}{'hours':>9}{'tracks':>8}{'files':>7}{'chunks':>9}{'shards':>8}{'MB':>10}",
    ]
    for split, infos in m.shards.items():
        mb = sum(i.bytes for i in infos) / 1e6
        lines.append(
            f"  {split:<6}{m.seconds(split) / 3600:>9.3f}{m.tracks[split]:>8}"
            f"{m.files[split]:>7}{m.samples(split):>9}{len(infos):>8}{mb:>10.1f}"
        )
    lines.append(
        f"  left out: {m.dropped_tail_frames} tail frames, "
        f"{sum(i.silent_chunks for v in m.shards.values() for i in v)} silent chunks, "
        f"{len(m.rejected)} rejected files, {len(m.duplicates)} duplicates"
    )
    counts = level_histogram(m, folder, progress)
    lines.append(
        f"token levels ({int(counts.sum())} samples, {int((counts > 0).sum())} of "
        "65536 levels used), by |int16| amplitude:"
    )
    lines += _level_rows(counts)
    return "\n".join(lines)

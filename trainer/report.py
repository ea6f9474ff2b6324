"""The evaluation report's files: the markdown tables, the checks the demo gates on, and the
picture (bars of bits/sample, the training curve, one generated window and its spectrograms)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from pipeline.fsutil import atomic_path

__all__ = ["find_metrics_csv", "learning_checks", "plot_report", "read_curve", "render_markdown"]

METRIC_NAMES = ("train/bits_per_sample", "val/bits_per_sample", "val/bits_per_sample_untrained")


# ---------------------------------------------------------------------------------------------
# Training curve


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


def read_curve(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} for train/val bits per sample (and the val bits of the logistic
    head untrained) in a CSVLogger metrics.csv."""
    curve: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in METRIC_NAMES}
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


# ---------------------------------------------------------------------------------------------
# Report files


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _model_kind(model: dict) -> str:
    patch = model.get("patch_size", 1)
    kind = "per-sample" if patch == 1 else f"patches of {patch}, two-level decoder"
    return f"{kind}, {model['head']} head, {model['parameters'] / 1e6:.2f} M parameters"


def learning_checks(bits: dict, comparable_to_flac: bool) -> list[dict]:
    """The demo's gate (design §10), as checks on the teacher-forced bits/sample: below FLAC of
    the target alone (pcm16 only: other codecs' bits are of a lossy signal), and, with the
    logistic head, below the same head at step 0. That head's adaptive predictor alone already
    beats FLAC, so for it only the second check fails a model that learned nothing."""
    model, checks = bits["model"], []
    if comparable_to_flac:
        margin = bits["flac_target_alone"] - model
        checks.append({"check": "below FLAC of target alone", "by": margin, "passed": margin > 0})
    if bits["model_untrained"] is not None:
        margin = bits["model_untrained"] - model
        checks.append(
            {"check": "below the same head untrained", "by": margin, "passed": margin > 0}
        )
    return checks


def render_markdown(report: dict) -> str:
    """The two tables of report.md, readable in ten seconds."""
    bits, snr, counts = report["bits_per_sample"], report["snr_db"], report["counts"]
    codec, cfg = report["codec"], report["config"]
    if report["bits_comparable_to_flac"]:
        model_row = "model (teacher-forced)"
    else:
        model_row = (
            f"model (teacher-forced; bits of the lossy {codec} signal, not comparable to FLAC)"
        )
    side = "two-sided" if not cfg["fir_causal"] else "causal"
    untrained_row = (
        []
        if bits["model_untrained"] is None
        else [f"| same head untrained (its predictor alone) | {bits['model_untrained']:.3f} |"]
    )
    temperature, level = cfg["temperature"], cfg["flac_compression_level"]
    lines = [
        f"# Evaluation: {report['split']} split",
        "",
        f"- checkpoint: `{report['ckpt']}` ({_model_kind(report['model'])})",
        f"- shards: `{report['shards']}`",
        f"- codec {codec}, direction {report['direction']}, {report['sample_rate']} Hz, "
        f"{counts['chunks']} chunks x {counts['chunk_frames']} frames "
        f"({counts['samples_scored']} target samples scored), windows of {cfg['seq_len']}",
        "",
        "| target channel | bits / sample |",
        "|---|---:|",
        f"| {model_row} | {_fmt(bits['model'], 3)} |",
        *untrained_row,
        f"| FLAC of target given input | {_fmt(bits['flac_given_input'], 3)} |",
        f"| FLAC of target alone | {_fmt(bits['flac_target_alone'], 3)} |",
        f"| level entropy of target ({codec}) | {_fmt(bits['level_entropy'], 3)} |",
        "",
        *(
            f"- model {c['check']}: {'yes' if c['passed'] else 'NO'}, by {c['by']:.3f} bits/sample"
            for c in report["checks"]
        ),
        *([""] if report["checks"] else []),
        f"| generated target, {counts['generated_windows']} windows x {cfg['seq_len']} | SNR dB |",
        "|---|---:|",
        f"| model greedy | {_fmt(snr['model_greedy'], 2)} |",
        f"| model sampled (T = {temperature:g}) | {_fmt(snr['model_sampled'], 2)} |",
        f"| copy input | {_fmt(snr['copy'], 2)} |",
        f"| best gain | {_fmt(snr['best_gain'], 2)} |",
        f"| LS FIR, {cfg['fir_taps']} taps {side}, fitted per window (oracle) "
        f"| {_fmt(snr['ls_fir'], 2)} |",
    ]
    if not report["codec_exact"]:
        lines.append(
            f"| {codec} round trip of the truth (ceiling) | {_fmt(snr['codec_round_trip'], 2)} |"
        )
    lines += [
        "",
        f"FLAC: whole chunks, libsndfile compression level {level:g} (FLAC preset "
        f"{round(8 * level)}). SNR: against the original 16-bit target, energies summed over "
        "windows.",
    ]
    lines += [f"\nwarning: {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def _spectrogram(x: np.ndarray, nfft: int) -> np.ndarray:
    """dB power [freq, frames] of a Hann-windowed STFT, hop nfft / 2 (-100 dB floor)."""
    x = np.asarray(x, dtype=np.float64) / 32768.0
    hop = nfft // 2
    frames = max(1, 1 + (len(x) - nfft) // hop)
    window = np.hanning(nfft)
    rows = [np.pad(x[i * hop : i * hop + nfft], (0, max(0, nfft - len(x)))) for i in range(frames)]
    power = np.abs(np.fft.rfft(np.stack(rows) * window, axis=1)) ** 2
    return 10 * np.log10(power.T + 1e-10)


def plot_report(report: dict, example: dict | None, curve: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 11), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 2)
    bits = report["bits_per_sample"]
    ax = fig.add_subplot(grid[0, 0])
    rows = [
        ("model", bits["model"], "tab:blue"),
        ("untrained", bits["model_untrained"], "tab:cyan"),
        ("FLAC |\ninput", bits["flac_given_input"], "tab:orange"),
        ("FLAC\nalone", bits["flac_target_alone"], "tab:red"),
        ("level\nentropy", bits["level_entropy"], "tab:gray"),
    ]
    names, values, colors = zip(*[row for row in rows if row[1] is not None], strict=True)
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.15 * max(values))
    lossy = "" if report["bits_comparable_to_flac"] else f" (model: lossy {report['codec']})"
    ax.set_title(f"bits per target sample, {report['split']}{lossy}")
    ax.set_ylabel("bits / sample")

    ax = fig.add_subplot(grid[0, 1])
    if curve:
        for name, (steps, vals) in curve.items():
            ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("bits / sample")
        ax.legend()
        ax.set_title("training curve")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics.csv near the checkpoint", ha="center", va="center")

    if example is None:
        ax = fig.add_subplot(grid[1:, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no generated window (--generate 0)", ha="center", va="center")
    else:
        rate = report["sample_rate"]
        truth, greedy = example["truth"], example["greedy"]
        t = np.arange(len(truth)) / rate * 1000
        ax = fig.add_subplot(grid[1, :])
        ax.plot(t, example["input"], color="0.75", lw=0.8, label="input channel")
        ax.plot(t, truth, color="tab:blue", lw=1.0, label="target (truth)")
        ax.plot(t, greedy, color="tab:orange", lw=1.0, alpha=0.85, label="generated (greedy)")
        ax.set_xlabel("ms")
        ax.set_ylabel("int16")
        ax.legend(loc="upper right")
        ax.set_title("one generated window")
        nfft = int(min(512, max(16, 2 ** int(math.log2(max(16, len(truth) // 8))))))
        spec_truth, spec_pred = _spectrogram(truth, nfft), _spectrogram(greedy, nfft)
        vmax = float(max(spec_truth.max(), spec_pred.max()))
        extent = (0, len(truth) / rate * 1000, 0, rate / 2000)
        for col, (title, spec) in enumerate(
            (("truth", spec_truth), ("generated (greedy)", spec_pred))
        ):
            ax = fig.add_subplot(grid[2, col])
            image = ax.imshow(
                spec,
                origin="lower",
                aspect="auto",
                extent=extent,
                vmin=vmax - 90,
                vmax=vmax,
                cmap="magma",
            )
            ax.set_title(f"spectrogram: {title}")
            ax.set_xlabel("ms")
            ax.set_ylabel("kHz")
        fig.colorbar(image, ax=ax, label="dB")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)

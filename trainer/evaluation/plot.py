"""report.png: bars of bits/sample, the training curve, one window's estimate and render over
the truth, one repaired gap and the spectrograms, read from the typed report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.fsutil import atomic_path
from trainer.evaluation.curve import Curve
from trainer.evaluation.report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.gridspec import SubplotSpec

__all__ = ["plot_report"]


def _spectrogram(x: np.ndarray, nfft: int) -> np.ndarray:
    """dB power [freq, frames] of a Hann-windowed STFT, hop nfft / 2 (-100 dB floor)."""
    x = np.asarray(x, dtype=np.float64) / 32768.0
    hop = nfft // 2
    frames = max(1, 1 + (len(x) - nfft) // hop)
    window = np.hanning(nfft)
    rows = [np.pad(x[i * hop : i * hop + nfft], (0, max(0, nfft - len(x)))) for i in range(frames)]
    power = np.abs(np.fft.rfft(np.stack(rows) * window, axis=1)) ** 2
    return 10 * np.log10(power.T + 1e-10)


def _bits_bars(fig: Figure, cell: SubplotSpec, report: Report) -> None:
    bits, given = report.bits_per_sample, report.bits_per_sample.given_input
    ax = fig.add_subplot(cell)
    rows = [
        ("model", bits.model, "tab:blue"),
        ("untrained", bits.model_untrained, "tab:cyan"),
        ("FLAC |\ninput", given.flac, "tab:orange"),
        ("WavPack |\ninput", given.wavpack, "tab:olive"),
        ("Sac |\ninput", given.sac, "tab:green"),
        ("FLAC\nalone", bits.flac_target_alone, "tab:red"),
        ("level\nentropy", bits.level_entropy, "tab:gray"),
    ]
    names, values, colors = zip(*[row for row in rows if row[1] is not None], strict=True)
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, 1.15 * max(values))
    lossy = "" if report.bits_comparable_to_flac else f" (model: lossy {report.codec})"
    ax.set_title(f"bits per target sample, {report.split}{lossy}")
    ax.set_ylabel("bits / sample")


def _curve(fig: Figure, cell: SubplotSpec, curve: Curve) -> None:
    ax = fig.add_subplot(cell)
    if not curve:
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics.csv near the checkpoint", ha="center", va="center")
        return
    for name, (steps, vals) in curve.items():
        ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("bits / sample")
    ax.legend()
    ax.set_title("training curve")


def _window(fig: Figure, cell: SubplotSpec, example: dict[str, list[int]], rate: int) -> None:
    truth = example["window_truth"]
    t = np.arange(len(truth)) / rate * 1000
    ax = fig.add_subplot(cell)
    ax.plot(t, example["window_input"], color="0.8", lw=0.8, label="input channel")
    ax.plot(t, example["window_render"], color="tab:green", lw=0.6, alpha=0.35, label="render")
    ax.plot(t, truth, color="tab:blue", lw=1.0, label="target (truth)")
    ax.plot(t, example["window_estimate"], color="tab:orange", lw=1.0, label="estimate")
    ax.set_xlabel("ms")
    ax.set_ylabel("int16")
    ax.legend(loc="upper right")
    ax.set_title("one window: the estimate and a render over the truth")


def _gap(fig: Figure, cell: SubplotSpec, example: dict[str, list[int]], rate: int) -> None:
    ax = fig.add_subplot(cell)
    if "gap_truth" not in example:
        ax.axis("off")
        ax.text(0.5, 0.5, "no gap repaired (segments too short)", ha="center", va="center")
        return
    truth = example["gap_truth"]
    t = np.arange(len(truth)) / rate * 1000
    a, b = example["gap_span"]
    ax.axvspan(t[a], t[b - 1], color="0.9", label="gap")
    ax.plot(t, truth, color="tab:blue", lw=1.0, label="target (truth)")
    ax.plot(t, example["gap_repaired"], color="tab:orange", lw=0.8, alpha=0.85, label="repaired")
    ax.set_xlabel("ms")
    ax.set_ylabel("int16")
    ax.legend(loc="upper right")
    ax.set_title("one repaired gap")


def _spectrograms(fig: Figure, cell: SubplotSpec, example: dict[str, list[int]], rate: int) -> None:
    truth, estimate = example["window_truth"], example["window_estimate"]
    nfft = int(min(512, max(16, 2 ** int(math.log2(max(16, len(truth) // 8))))))
    spec = np.concatenate([_spectrogram(truth, nfft), _spectrogram(estimate, nfft)], axis=1)
    ax = fig.add_subplot(cell)
    vmax = float(spec.max())
    extent = (0, 2 * len(truth) / rate * 1000, 0, rate / 2000)
    image = ax.imshow(
        spec, origin="lower", aspect="auto", extent=extent, vmin=vmax - 90, vmax=vmax, cmap="magma"
    )
    ax.set_title("spectrogram: truth (left half), estimate (right half)")
    ax.set_xlabel("ms")
    ax.set_ylabel("kHz")
    fig.colorbar(image, ax=ax, label="dB")


def plot_report(report: Report, curve: Curve, path: Path) -> None:
    """Write the picture to `path` (atomically); matplotlib is imported only here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 11), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 2)
    _bits_bars(fig, grid[0, 0], report)
    _curve(fig, grid[0, 1], curve)
    example = report.restoration.example if report.restoration else None
    if not example:
        ax = fig.add_subplot(grid[1:, :])
        ax.axis("off")
        why = "--generate 0" if not report.config.generate else "no estimate head"
        ax.text(0.5, 0.5, f"no restoration section ({why})", ha="center", va="center")
    else:
        rate = report.sample_rate
        _window(fig, grid[1, :], example, rate)
        _gap(fig, grid[2, 0], example, rate)
        _spectrograms(fig, grid[2, 1], example, rate)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)

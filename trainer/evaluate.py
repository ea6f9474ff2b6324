"""`python -m trainer evaluate`: a checkpoint on a shard split, beside baselines (design §8, §10).

Two measures of one target channel (the right one for l2r), each next to what a signal-processing
baseline achieves on the same audio:

- Teacher-forced bits per sample over every frame of the split's chunks, scored once (the
  EvalStream's windows and masks), as exact sums: NLL / count / ln 2. Beside it, on the same
  whole chunks (§10): FLAC's cost of the target given the input ((stereo FLAC - mono FLAC of the
  input) x 8 / frames), FLAC of the target alone, and the entropy of the target's codec levels.
  Under mulaw/linear codecs the model's bits are those of a lossy signal and are labelled so.
- Generated SNR: N windows spread evenly over the split, decoded autoregressively (greedy and
  sampled), against the original int16 target; beside it copy-input, best-gain and a 32-tap
  least-squares FIR fitted on each window itself (an oracle bound, not a deployable predictor).

Writes `report.json` (every figure), `report.md` (two small tables) and `report.png`.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from pipeline.codec import Codec, get_codec, pcm16_to_int16
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_path, atomic_write_text
from pipeline.records import SPLITS, Manifest
from trainer.baselines import (
    FLAC_COMPRESSION_LEVEL,
    FlacCost,
    best_gain,
    fir_apply,
    flac_bits,
    level_entropy,
    ls_fir,
    snr_from_energies,
    to_int16,
)
from trainer.data import DIRECTIONS, IGNORE, EvalStream, ShardDataModule, ShardSplit, tokenize
from trainer.model import META_NAME, ModelError, StereoT5

__all__ = [
    "LoadedModel",
    "evaluate",
    "find_metrics_csv",
    "generate_windows",
    "load_model",
    "main",
    "render_markdown",
    "resolve_seq_len",
]

REPORT_FORMAT = "stereo-eval/1"
FIR_TAPS = 32
FIR_CAUSAL = False  # two-sided: the model's encoder sees the whole input window too
LN2 = math.log(2.0)
METRIC_NAMES = ("train/bits_per_sample", "val/bits_per_sample", "val/bits_per_sample_untrained")


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint


@dataclass
class LoadedModel:
    """A StereoT5 in eval mode and what its checkpoint says about how it was trained.

    Attributes:
        kind: ``lightning`` (a ``.ckpt``) or ``export`` (a ``save_pretrained`` folder).
        sample_rate: the training shards' rate when the checkpoint leads to it, else None.
        sample_rate_source: where ``sample_rate`` came from, or why it is unknown.
        train_seq_len: the training window when the checkpoint records the data config.
    """

    path: Path
    kind: str
    model: StereoT5
    sample_rate: int | None
    sample_rate_source: str
    train_seq_len: int | None

    @property
    def codec(self) -> Codec:
        return self.model.codec

    @property
    def max_len(self) -> int:
        return int(self.model.hparams.max_len)


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning may pickle hyperparameter objects: our own files only
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{path}: not a readable checkpoint ({reason}); pass a Lightning .ckpt or a "
                "StereoT5.save_pretrained folder"
            ) from None


def _manifest_rate(manifest: Any, what: str) -> tuple[int | None, str]:
    if not manifest:
        return None, f"{what}: no shard manifest recorded"
    try:
        rate = Manifest.load(Path(manifest)).config.sample_rate
    except PipelineError:
        return None, f"the training shards {manifest} (from the {what}) are not readable here"
    return int(rate), f"training shards {manifest} (from the {what})"


def _lightning(path: Path) -> tuple[StereoT5, dict, dict]:
    ckpt = _torch_load(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "codec" not in hparams or "state_dict" not in ckpt:
        raise ModelError(f"{path}: not a StereoT5 Lightning checkpoint (no codec hyperparameter)")
    known = set(inspect.signature(StereoT5.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in known}
    # init_from was only the starting point of training: the checkpoint holds the weights
    model = StereoT5(**{**kwargs, "init_from": None, "compile": False})
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"{path}: weights do not fit the model its hyperparameters describe ({first})"
        ) from None
    return model, dict(hparams), dict(ckpt.get("datamodule_hyper_parameters") or {})


def _export_data_config(folder: Path) -> tuple[dict, str]:
    """The `data.init_args` of the LightningCLI config.yaml beside an export folder (on_fit_end
    exports into the run's log_dir, where LightningCLI saves config.yaml), and what was read."""
    config = folder.parent / "config.yaml"
    if not config.is_file():
        return {}, f"no config.yaml beside the export folder {folder.name}"
    try:
        import yaml

        data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    except Exception:
        return {}, f"{config} (not readable)"
    init_args = data.get("init_args") if isinstance(data, dict) else None
    return dict(init_args or {}), str(config)


def load_model(ckpt: str | Path, device: str | None = None) -> LoadedModel:
    """A Lightning ``.ckpt`` of StereoT5 or a ``save_pretrained`` folder -> model in eval mode.

    Raises:
        ModelError: a missing path, a file that is not a StereoT5 checkpoint, a folder without
            ``stereo_t5.json``, weights that do not fit.
    """
    path = Path(ckpt)
    if not path.exists():
        raise ModelError(f"{path}: no checkpoint here; pass a .ckpt file or an export folder")
    if path.is_dir():
        if not (path / META_NAME).is_file():
            raise ModelError(
                f"{path}: a folder without {META_NAME}: pass a .ckpt or a folder written by "
                "StereoT5.save_pretrained (the run's export/)"
            )
        model = StereoT5.from_pretrained(path)
        hparams = dict(model.hparams)
        data, what = _export_data_config(path)
        kind = "export"
    else:
        model, hparams, data = _lightning(path)
        what = (
            "checkpoint's datamodule hyperparameters"
            if data
            else "no data config in the checkpoint"
        )
        kind = "lightning"
    if hparams.get("sample_rate"):  # a future model that records its rate itself
        rate, source = int(hparams["sample_rate"]), "the model's hyperparameters"
    elif data.get("sample_rate"):
        rate, source = int(data["sample_rate"]), what
    elif data:
        rate, source = _manifest_rate(data.get("manifest"), what)
    else:
        rate, source = None, what
    seq_len = data.get("seq_len")
    model = model.to(_device(device)).eval()
    return LoadedModel(path, kind, model, rate, source, int(seq_len) if seq_len else None)


def resolve_seq_len(
    loaded: LoadedModel,
    seq_len: int | None,
    codec: str | None = None,
    chunk_frames: int | None = None,
) -> int:
    """Check what the user asks against the checkpoint; return the window length to use.

    The shards hold uint16 PCM, so any codec could be applied to them: the checkpoint's codec is
    the one that must be. Default window: the training window (else max_len), at most a chunk.

    Raises:
        ModelError: ``codec`` differs from the checkpoint's, or ``seq_len`` exceeds its max_len
            (the relative-attention span it was built for), is < 1 or is not a multiple of its
            patch_size.
    """
    if codec is not None and get_codec(codec).name != loaded.codec.name:
        raise ModelError(
            f"{loaded.path}: trained with codec {loaded.codec.name}, asked for "
            f"{get_codec(codec).name}; the shards hold 16-bit PCM and take the checkpoint's "
            f"codec: drop --codec or pass --codec {loaded.codec.name}"
        )
    patch = loaded.model.patch_size
    if seq_len is None:
        seq_len = min(loaded.train_seq_len or loaded.max_len, loaded.max_len)
        if chunk_frames:
            seq_len = min(seq_len, chunk_frames)
        seq_len -= seq_len % patch  # a patched model reads whole patches
    if seq_len < 1:
        raise ModelError(f"seq_len must be >= 1, got {seq_len}")
    if seq_len % patch:
        raise ModelError(
            f"{loaded.path}: seq_len {seq_len} is not a multiple of the model's patch_size "
            f"{patch}: use --seq-len {max(patch, seq_len - seq_len % patch)}"
        )
    if seq_len > loaded.max_len:
        raise ModelError(
            f"{loaded.path}: seq_len {seq_len} is above the checkpoint's max_len "
            f"{loaded.max_len} (the window its relative attention was built for): use "
            f"--seq-len {loaded.max_len} or less"
        )
    return seq_len


# ---------------------------------------------------------------------------------------------
# Scoring pass


@dataclass
class _Scored:
    nll: float
    untrained_nll: float | None  # the logistic head at step 0 (its predictor alone); else None
    count: int
    correct: int
    tf_signal: float
    tf_error: float
    levels: np.ndarray  # histogram of target tokens
    flac: FlacCost
    chunks: int
    windows: int
    picked: list[np.ndarray]  # uint16 [2, L] windows to generate
    picked_meta: list[tuple[str, int]]
    seconds: float


def _limit(samples: list[int], max_chunks: int | None) -> list[int]:
    """Per-shard sample counts cut to the first `max_chunks` chunks in manifest order."""
    if max_chunks is None:
        return list(samples)
    out, left = [], max_chunks
    for n in samples:
        take = min(n, left)
        if take == 0:
            break
        out.append(take)
        left -= take
    return out


def _score(
    model: StereoT5,
    stream: EvalStream,
    codec: Codec,
    sample_rate: int,
    direction: int,
    generate: int,
    progress: bool,
) -> _Scored:
    device = next(model.parameters()).device
    per_chunk, length = len(stream.starts), stream.seq_len
    total_windows = sum(stream.split.samples) * per_chunk
    picks = min(generate, total_windows)
    pick = set(np.linspace(0, total_windows - 1, picks).round().astype(int).tolist())
    nll = tf_signal = tf_error = 0.0
    untrained_nll = 0.0 if model.head_kind == "logistic" else None
    count = correct = window = chunks = 0
    hist = torch.zeros(codec.levels, dtype=torch.int64)
    flac = FlacCost(0, 0, 0, 0)
    chunk = np.zeros((2, stream.split.chunk_frames), np.uint16)
    picked: list[np.ndarray] = []
    picked_meta: list[tuple[str, int]] = []
    int16_of_token = torch.as_tensor(codec.decode_table().astype(np.int64) - 32768)
    start_time = time.perf_counter()
    bar = tqdm(total=len(stream), desc="score", unit="batch", disable=not progress)
    with torch.inference_mode():
        for raw in stream:
            bar.update(1)
            real = raw["mask"].any(axis=1)
            if not real.any():
                continue  # a padding batch (only under several ranks or workers)
            batch = tokenize(raw, codec)
            labels = batch["labels"]
            scored = model.score(batch["input_ids"].to(device), labels.to(device))
            nll += float(scored["nll_sum"])
            if untrained_nll is not None:
                untrained_nll += float(scored["untrained_nll_sum"])
            count += int(scored["count"])
            keep = labels != IGNORE
            correct += int(scored["correct"])
            hist += torch.bincount(labels[keep], minlength=codec.levels)
            # teacher-forced argmax against the original int16 target (not its codec round trip)
            # the channel task's stereo windows again: input channel `direction`, target other
            windows = np.stack([raw["inputs"], raw["targets"]], axis=1)[
                :, [direction, 1 - direction]
            ]
            target = torch.from_numpy(pcm16_to_int16(raw["targets"])).double()
            pred = int16_of_token[scored["pred"].cpu()].double()
            tf_signal += float(torch.where(keep, target.square(), 0.0).sum())
            tf_error += float(torch.where(keep, (target - pred).square(), 0.0).sum())
            for row in np.flatnonzero(real):
                k = window % per_chunk
                start = int(stream.starts[k])
                chunk[:, start : start + length] = windows[row]
                if k == per_chunk - 1:  # the chunk is whole again: FLAC on the whole chunk
                    flac = flac + flac_bits(pcm16_to_int16(chunk), sample_rate, direction)
                    chunks += 1
                if window in pick:
                    picked.append(windows[row].copy())
                    picked_meta.append(tuple(raw["meta"][row]))
                window += 1
    bar.close()
    assert count == chunks * stream.split.chunk_frames, "every frame of every chunk is scored once"
    return _Scored(
        nll,
        untrained_nll,
        count,
        correct,
        tf_signal,
        tf_error,
        hist.numpy(),
        flac,
        chunks,
        window,
        picked,
        picked_meta,
        time.perf_counter() - start_time,
    )


# ---------------------------------------------------------------------------------------------
# Generation and signal baselines


def generate_windows(
    model: StereoT5,
    inputs: np.ndarray,
    codec: Codec,
    batch_size: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """uint16 input-channel windows [N, L] -> int16 generated target [N, L], `batch_size`
    windows per `StereoT5.generate` call (greedy at temperature 0)."""
    device = next(model.parameters()).device
    out = []
    for first in range(0, len(inputs), batch_size):
        ids = torch.from_numpy(codec.encode(inputs[first : first + batch_size])).to(device)
        tokens, _ = model.generate(ids, temperature=temperature, generator=generator)
        out.append(pcm16_to_int16(codec.decode(tokens.cpu().numpy())))
    return np.concatenate(out) if out else np.zeros((0, inputs.shape[-1]), np.int16)


def _energy(x: np.ndarray) -> float:
    return float(np.square(np.asarray(x, dtype=np.float64)).sum())


def _snr_rows(truth: np.ndarray, preds: dict[str, np.ndarray | None]) -> tuple[dict, dict]:
    """Aggregate SNR (ratio of energy sums over windows) and per-window SNR per method."""
    total, per_window = {}, {}
    signal = [_energy(t) for t in truth]
    for name, pred in preds.items():
        if pred is None:
            total[name], per_window[name] = None, []
            continue
        errors = [_energy(t.astype(np.float64) - p) for t, p in zip(truth, pred, strict=True)]
        total[name] = snr_from_energies(sum(signal), sum(errors))
        per_window[name] = [snr_from_energies(s, e) for s, e in zip(signal, errors, strict=True)]
    return total, per_window


METHODS = ("model_greedy", "model_sampled", "copy", "best_gain", "ls_fir", "codec_round_trip")


def _generated(
    model: StereoT5,
    windows: list[np.ndarray],
    codec: Codec,
    direction: int,
    batch_size: int,
    temperature: float,
    seed: int,
) -> dict:
    """Generate the target of each window (greedy, and sampled when temperature > 0) and score
    it and the signal baselines against the original int16 target."""
    if not windows:
        return {
            "snr_db": dict.fromkeys(METHODS),
            "per_window": {name: [] for name in METHODS},
            "gains": [],
            "seconds": 0.0,
            "samples_per_s": None,
            "example": None,
        }
    stack = np.stack(windows)
    inputs_u16, target_u16 = stack[:, direction], stack[:, 1 - direction]
    x, truth = pcm16_to_int16(inputs_u16), pcm16_to_int16(target_u16)
    start = time.perf_counter()
    greedy = generate_windows(model, inputs_u16, codec, batch_size, 0.0, None)
    sampled = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        sampled = generate_windows(model, inputs_u16, codec, batch_size, temperature, generator)
    seconds = time.perf_counter() - start
    gains = [best_gain(a, b) for a, b in zip(x, truth, strict=True)]
    fir = [
        fir_apply(a, ls_fir(a, b, FIR_TAPS, FIR_CAUSAL), FIR_CAUSAL)
        for a, b in zip(x, truth, strict=True)
    ]
    preds = {
        "model_greedy": greedy,
        "model_sampled": sampled,
        "copy": x,
        "best_gain": to_int16(np.asarray(gains)[:, None] * x),
        "ls_fir": to_int16(np.stack(fir)),
        "codec_round_trip": pcm16_to_int16(codec.decode(codec.encode(target_u16))),
    }
    total, per_window = _snr_rows(truth, preds)
    generated = greedy.size + (sampled.size if sampled is not None else 0)
    return {
        "snr_db": total,
        "per_window": per_window,
        "gains": gains,
        "seconds": seconds,
        "samples_per_s": generated / seconds if seconds > 0 else None,
        "example": {"input": x[0], "truth": truth[0], "greedy": greedy[0]},
    }


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


def _plot(report: dict, example: dict | None, curve: dict, path: Path) -> None:
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


# ---------------------------------------------------------------------------------------------
# The evaluation


def default_out(ckpt: str | Path, split: str) -> Path:
    """`<folder holding the checkpoint>/eval-<split>`: beside a .ckpt, and beside an export
    folder rather than inside it (save_pretrained replaces that folder as a whole)."""
    return Path(ckpt).parent / f"eval-{split}"


def evaluate(
    ckpt: str | Path,
    shards: str | Path,
    split: str = "test",
    max_chunks: int | None = None,
    generate: int = 8,
    out: str | Path | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    seq_len: int | None = None,
    direction: str = "l2r",
    codec: str | None = None,
    device: str | None = None,
    progress: bool = True,
    gate: bool = False,
) -> dict:
    """Evaluate a checkpoint on a split of a shard set and write report.{json,md,png}.

    Args:
        ckpt: a Lightning ``.ckpt`` of StereoT5 or a ``save_pretrained`` folder.
        shards: a shard set's folder or its manifest.json.
        split: ``train``, ``val`` or ``test``.
        max_chunks: score only the first N chunks of the split (manifest order); all if None.
        generate: windows decoded autoregressively for the SNR rows (0: none).
        out: output folder (default ``<checkpoint's folder>/eval-<split>``).
        temperature: of the sampled generation (<= 0: no sampled row).
        seed: of the sampled generation.
        batch_size: windows per forward pass (scoring and generation).
        seq_len: window length (default: the training window, at most max_len and a chunk).
        direction: ``l2r`` (target = right) or ``r2l``.
        codec: only checked: it must be the checkpoint's codec.
        device: torch device (default: cuda if available, else cpu).
        gate: only checked: the caller gates on the report's checks, which need a pcm16
            checkpoint (refused before any scoring otherwise).

    Returns:
        The report (what report.json holds).

    Raises:
        PipelineError / ModelError: bad arguments, unreadable shards or checkpoint, a codec or
            window the checkpoint was not built for.
    """
    if split not in SPLITS:
        raise PipelineError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    if direction not in DIRECTIONS:
        raise PipelineError(f"direction {direction!r}: evaluate takes l2r or r2l")
    if max_chunks is not None and max_chunks < 1:
        raise PipelineError(f"max_chunks must be >= 1, got {max_chunks}")
    if generate < 0 or batch_size < 1:
        raise PipelineError("generate must be >= 0 and batch_size >= 1")
    manifest = Manifest.load(Path(shards))
    loaded = load_model(ckpt, device)
    model, model_codec = loaded.model, loaded.codec
    length = resolve_seq_len(loaded, seq_len, codec, manifest.config.chunk_frames)
    if gate and not model_codec.exact:
        raise PipelineError(
            f"{ckpt}: the gate compares bits with FLAC, which needs a pcm16 checkpoint, not "
            f"{model_codec.name}: drop --gate"
        )
    warnings = []
    rate = int(manifest.config.sample_rate)
    if loaded.sample_rate is not None and loaded.sample_rate != rate:
        warnings.append(
            f"the model was trained on {loaded.sample_rate} Hz shards, these are {rate} Hz"
        )
    data = ShardDataModule(
        str(shards),
        seq_len=length,
        batch_size=batch_size,
        num_workers=0,
        codec=model_codec.name,
        direction=direction,
        return_meta=True,
    )
    full = data.eval_stream(split, rank=0, world_size=1).split
    samples = _limit(full.samples, max_chunks)
    stream = EvalStream(
        ShardSplit(full.urls[: len(samples)], samples, full.chunk_frames),
        length,
        batch_size,
        direction,
        return_meta=True,
    )
    d = DIRECTIONS[direction]
    scored = _score(model, stream, model_codec, rate, d, generate, progress)
    gen = _generated(model, scored.picked, model_codec, d, batch_size, temperature, seed)
    out_dir = Path(out) if out is not None else default_out(loaded.path, split)
    metrics_csv = find_metrics_csv(loaded.path)
    curve = read_curve(metrics_csv) if metrics_csv else {}

    exact = model_codec.exact
    bits = {
        "model": scored.nll / max(scored.count, 1) / LN2,
        "model_untrained": (
            None
            if scored.untrained_nll is None
            else scored.untrained_nll / max(scored.count, 1) / LN2
        ),
        "flac_given_input": scored.flac.given_input,
        "flac_target_alone": scored.flac.alone,
        "level_entropy": level_entropy(scored.levels),
    }
    files = {name: str(out_dir / f"report.{name}") for name in ("json", "md", "png")}
    report = {
        "format": REPORT_FORMAT,
        "ckpt": str(loaded.path),
        "ckpt_kind": loaded.kind,
        "shards": str(shards),
        "split": split,
        "codec": model_codec.name,
        "codec_exact": exact,
        "bits_comparable_to_flac": exact,  # pcm16 (or linear16, the same tokens)
        "direction": direction,
        "sample_rate": rate,
        "model": {
            "head": model.head_kind,
            "patch_size": model.patch_size,  # 1: one position per sample; > 1: two-level
            "max_len": loaded.max_len,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_sample_rate": loaded.sample_rate,
            "train_sample_rate_source": loaded.sample_rate_source,
            "train_seq_len": loaded.train_seq_len,
            "hparams": {k: v for k, v in model.hparams.items() if not k.startswith("_")},
        },
        "config": {
            "max_chunks": max_chunks,
            "generate": generate,
            "temperature": temperature,
            "seed": seed,
            "batch_size": batch_size,
            "seq_len": length,
            "device": str(next(model.parameters()).device),
            "flac_compression_level": FLAC_COMPRESSION_LEVEL,
            "fir_taps": FIR_TAPS,
            "fir_causal": FIR_CAUSAL,
            "snr_truth": "original int16 target",
        },
        "counts": {
            "shards": len(samples),
            "chunks": scored.chunks,
            "chunk_frames": stream.split.chunk_frames,
            "windows": scored.windows,
            "samples_scored": scored.count,
            "generated_windows": len(scored.picked),
            "generated_samples": len(scored.picked) * length,
        },
        "bits_per_sample": bits,
        "checks": learning_checks(bits, exact),
        "teacher_forced": {
            "nll_nats": scored.nll,
            "count": scored.count,
            "accuracy": scored.correct / max(scored.count, 1),
            "snr_db": snr_from_energies(scored.tf_signal, scored.tf_error),
        },
        "flac": {
            "stereo_bytes": scored.flac.stereo_bytes,
            "input_bytes": scored.flac.input_bytes,
            "target_bytes": scored.flac.target_bytes,
            "frames": scored.flac.frames,
        },
        "snr_db": gen["snr_db"],
        "snr_db_per_window": gen["per_window"],
        "best_gains": gen["gains"],
        "generated_windows": [{"source": s, "start": int(t)} for s, t in scored.picked_meta],
        "training_curve": str(metrics_csv) if metrics_csv else None,
        "timing": {
            "score_s": scored.seconds,
            "score_samples_per_s": scored.count / scored.seconds if scored.seconds else None,
            "generate_s": gen["seconds"],
            "generate_samples_per_s": gen["samples_per_s"],
        },
        "warnings": warnings,
        "files": files,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(files["json"]), json.dumps(report, indent=1) + "\n")
    atomic_write_text(Path(files["md"]), render_markdown(report))
    _plot(report, gen["example"], curve, Path(files["png"]))
    return report


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options `evaluate` and `predict` share: where and how fast the model runs."""
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is often fastest for small models, "
        "which decode one sample per step",
    )
    parser.add_argument("--no-progress", action="store_true")


def apply_runtime_options(args: argparse.Namespace) -> None:
    transformers_logging.disable_progress_bar()  # "Loading weights" of an export folder
    if args.threads:
        torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer evaluate --ckpt C --shards DIR [--split test] ...`; returns the exit
    code (2 for a user error, printed as one `error:` line)."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer evaluate",
        description="Teacher-forced bits/sample and generated SNR of a checkpoint on a shard "
        "split, beside FLAC and signal baselines; writes report.json, report.md, report.png.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt or save_pretrained folder")
    parser.add_argument("--shards", required=True, help="shard set folder (or its manifest.json)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--max-chunks", type=int, default=None, help="first N chunks only")
    parser.add_argument("--generate", type=int, default=8, help="windows to generate (0: none)")
    parser.add_argument(
        "--out", default=None, help="output folder (default: <ckpt dir>/eval-SPLIT)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="of the sampled row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the training window")
    parser.add_argument("--direction", default="l2r", choices=("l2r", "r2l"))
    parser.add_argument("--codec", default=None, help="must match the checkpoint's codec")
    parser.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 unless the model passes every check (the demo's gate; pcm16 only)",
    )
    add_runtime_options(parser)
    args = parser.parse_args(argv)
    apply_runtime_options(args)
    try:
        report = evaluate(
            args.ckpt,
            args.shards,
            split=args.split,
            max_chunks=args.max_chunks,
            generate=args.generate,
            out=args.out,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            direction=args.direction,
            codec=args.codec,
            device=args.device,
            progress=not args.no_progress,
            gate=args.gate,
        )
    except PipelineError as exc:  # ModelError and CodecError are PipelineErrors too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    print(f"report: {report['files']['md']} (+ report.json, report.png)")
    if not args.gate:
        return 0
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    if failed:
        print(f"gate: failed: the model is not {' and not '.join(failed)}", file=sys.stderr)
        return 1
    print(f"gate: passed ({len(report['checks'])} checks)")
    return 0

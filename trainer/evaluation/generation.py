"""Generated SNR: the target channel of a few windows decoded autoregressively (greedy, and
sampled when asked), scored against the original int16 target beside the signal baselines
(copy input, best gain, a least-squares FIR fitted on each window itself). See
docs/evaluation.md."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.codec import Codec, pcm16_to_int16
from trainer.evaluation.baselines import (
    best_gain,
    fir_apply,
    ls_fir,
    snr_from_energies,
    to_int16,
)
from trainer.evaluation.report import METHODS, SnrRows
from trainer.model import StereoT5

__all__ = ["FIR_CAUSAL", "FIR_TAPS", "Example", "Generated", "generate_windows", "generated_snr"]

FIR_TAPS = 32
FIR_CAUSAL = False  # two-sided: the model's encoder sees the whole input window too


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


@dataclass(frozen=True)
class Example:
    """One generated window for the picture: int16 [L] each."""

    input: np.ndarray
    truth: np.ndarray
    greedy: np.ndarray


@dataclass(frozen=True)
class Generated:
    """The generated-SNR section: SNR over all windows and per window, per method."""

    snr_db: SnrRows[float | None]
    per_window: SnrRows[list[float]]
    gains: list[float]  # the best gain of each window
    seconds: float  # of the model's generation alone
    samples_per_s: float | None
    example: Example | None  # the first window, None when none was generated


def _energy(x: np.ndarray) -> float:
    return float(np.square(np.asarray(x, dtype=np.float64)).sum())


def _snr(
    truth: np.ndarray, signal: list[float], pred: np.ndarray | None
) -> tuple[float | None, list[float]]:
    """Aggregate SNR (ratio of energy sums over windows) and per-window SNR of one method."""
    if pred is None:
        return None, []
    errors = [_energy(t.astype(np.float64) - p) for t, p in zip(truth, pred, strict=True)]
    per_window = [snr_from_energies(s, e) for s, e in zip(signal, errors, strict=True)]
    return snr_from_energies(sum(signal), sum(errors)), per_window


def generated_snr(
    model: StereoT5,
    windows: list[np.ndarray],
    codec: Codec,
    direction: int,
    batch_size: int,
    temperature: float,
    seed: int,
) -> Generated:
    """Generate the target of each uint16 stereo window [2, L] (greedy, and sampled when
    temperature > 0) and score it and the signal baselines against the original int16 target;
    `direction` is the input channel."""
    if not windows:
        return Generated(
            SnrRows(**dict.fromkeys(METHODS)),
            SnrRows(**{name: [] for name in METHODS}),
            [],
            0.0,
            None,
            None,
        )
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
    signal = [_energy(t) for t in truth]
    rows = {name: _snr(truth, signal, pred) for name, pred in preds.items()}
    generated = greedy.size + (sampled.size if sampled is not None else 0)
    return Generated(
        snr_db=SnrRows(**{name: row[0] for name, row in rows.items()}),
        per_window=SnrRows(**{name: row[1] for name, row in rows.items()}),
        gains=gains,
        seconds=seconds,
        samples_per_s=generated / seconds if seconds > 0 else None,
        example=Example(input=x[0], truth=truth[0], greedy=greedy[0]),
    )

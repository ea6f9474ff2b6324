"""Deterministic synthetic stereo corpus in the MUSDB layout, for tests and the demo.

Each track mixes 3-5 sources (lead, bass, drums, pluck, pad) on one tempo and key. Every source
is panned, delayed and reverberated differently per channel, so one channel carries real but
incomplete information about the other, as in a studio mix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.errors import PipelineError

# (soundfile format, subtype, extension), cycled over tracks. The 16-bit ones come first so
# that a corpus of up to 3 tracks is all 16-bit (bit-exact round trips through int16).
_FORMATS = (
    ("WAV", "PCM_16", "wav"),
    ("FLAC", "PCM_16", "flac"),
    ("AIFF", "PCM_16", "aiff"),
    ("WAV", "PCM_24", "wav"),
    ("FLAC", "PCM_24", "flac"),
    ("WAV", "FLOAT", "wav"),
)
_WORDS = (
    "Amber", "Basalt", "Cinder", "Delta", "Ember", "Fjord", "Glacier", "Harbor",
    "Indigo", "Juniper", "Kestrel", "Lumen", "Meridian", "Nebula", "Orchid", "Quartz",
)  # fmt: skip
_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
_PEAK = 0.8


def make_corpus(
    out: Path, tracks: int = 8, seconds: float = 10.0, seed: int = 0, sample_rate: int = 44100
) -> list[Path]:
    """Write `tracks` stereo mixtures under out/{train,test}/<track name>/mixture.<ext>.

    Track k is `Synth {k+1:03d} - <word>`, goes to test/ when k % 4 == 1 (about 1 in 4, at
    least one once there are 2 tracks) and is written in format k % 6 of `_FORMATS`. Its audio
    depends only on (seed, k, seconds, sample_rate), never on the number of tracks.

    Returns:
        The written paths, sorted.

    Raises:
        PipelineError: a negative count or seed, or fewer than one frame per track.
    """
    frames = round(seconds * sample_rate)
    if tracks < 0 or seed < 0 or sample_rate <= 0 or frames < 1:
        raise PipelineError(
            f"make_corpus needs tracks >= 0, seed >= 0, sample_rate > 0 and at least one frame; "
            f"got tracks={tracks}, seed={seed}, seconds={seconds}, sample_rate={sample_rate}"
        )
    out = Path(out)
    paths = []
    for k in range(tracks):
        split = "test" if k % 4 == 1 else "train"
        folder = out / split / f"Synth {k + 1:03d} - {_WORDS[k % len(_WORDS)]}"
        folder.mkdir(parents=True, exist_ok=True)
        audio = synth_mixture(np.random.default_rng([seed, k]), frames, sample_rate)
        paths.append(_write_atomic(folder, audio, sample_rate, *_FORMATS[k % len(_FORMATS)]))
    return sorted(paths)


def synth_mixture(rng: np.random.Generator, frames: int, sample_rate: int) -> np.ndarray:
    """float64 [frames, 2] in (-1, 1), peak 0.8."""
    beat = 60.0 / rng.uniform(90.0, 140.0)
    root = int(rng.integers(40, 53))  # MIDI E2..E3
    scale = _MAJOR if rng.random() < 0.5 else _MINOR
    # Any 3 of the 5 kinds include a sustained one (lead, bass or pad): no silent second.
    kinds = rng.choice(len(_SOURCES), size=int(rng.integers(3, 6)), replace=False)
    # Studio routing: each source reaches each channel panned (constant power) and delayed by
    # 0-0.45 ms (0-20 samples at 44.1 kHz: spaced-microphone arrival differences), dry and
    # through a send into a stereo reverb whose L and R impulse responses are independent
    # noise: two convolutions, whatever the number of sources.
    max_delay = round(20 * sample_rate / 44100)
    dry = np.zeros((2, frames), dtype=np.float32)
    send = np.zeros((2, frames), dtype=np.float32)
    for kind in kinds:
        render = _SOURCES[kind](rng, frames, sample_rate, beat, root, scale)
        mono = np.empty(frames, dtype=np.float32)
        for start in range(0, frames, _RENDER_FRAMES):
            stop = min(start + _RENDER_FRAMES, frames)
            mono[start:stop] = render(np.arange(start, stop))
        level = 10 ** (rng.uniform(-6.0, 0.0) / 20) / (np.sqrt(np.mean(np.square(mono))) + 1e-12)
        angle = (rng.uniform(-0.7, 0.7) + 1) * np.pi / 4
        gains = (np.cos(angle), np.sin(angle))
        for c, delay in enumerate(rng.integers(0, max_delay + 1, size=2)):
            shifted = mono[: max(frames - delay, 0)] * float(level * gains[c])
            dry[c, delay:] += shifted
            send[c, delay:] += shifted * rng.uniform(0.1, 0.4)
    irs = [_reverb_ir(rng, sample_rate) for _ in range(2)]
    dry += _convolve(send, irs)
    return dry.T.astype(np.float64, order="C") * (_PEAK / (float(np.max(np.abs(dry))) + 1e-12))


def _write_atomic(
    folder: Path, audio: np.ndarray, sr: int, fmt: str, subtype: str, ext: str
) -> Path:
    """Write under a hidden name that no audio scan matches, then rename into place."""
    final = folder / f"mixture.{ext}"
    tmp = folder / f".mixture.{ext}.part"
    try:
        sf.write(tmp, audio, sr, format=fmt, subtype=subtype)
        if fmt == "WAV":
            _zero_peak_timestamp(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _zero_peak_timestamp(path: Path) -> None:
    """libsndfile writes the wall clock into a float WAV's PEAK chunk; zero it for stable bytes."""
    with open(path, "r+b") as f:
        head = f.read(4096)
        pos = 12  # after "RIFF", size, "WAVE"
        while pos + 8 <= len(head) and head[pos : pos + 4] != b"data":
            size = int.from_bytes(head[pos + 4 : pos + 8], "little")
            if head[pos : pos + 4] == b"PEAK":  # version (4 bytes), timestamp (4 bytes), peaks
                f.seek(pos + 12)
                f.write(bytes(4))
                return
            pos += 8 + size + (size & 1)


def _convolve(x: np.ndarray, irs: list[np.ndarray]) -> np.ndarray:
    """Row c of x convolved with irs[c], cut to x's length. Overlap-add with FFTs of 4-8x the
    IR length, which stay in cache, unlike one FFT of the whole track (docs/benchmarks.md)."""
    taps = max(len(ir) for ir in irs)
    size = 1 << (4 * taps - 1).bit_length()
    hop = size - taps + 1  # > size / 2: a segment's tail reaches into the next segment only
    rows, frames = x.shape
    segments = -(-frames // hop)
    padded = np.zeros((rows, segments * hop), dtype=x.dtype)
    padded[:, :frames] = x
    kernels = np.stack([np.fft.rfft(ir, size) for ir in irs])[:, None, :]
    y = np.fft.irfft(np.fft.rfft(padded.reshape(rows, segments, hop), size) * kernels, size)
    out = np.zeros((rows, segments + 1, hop), dtype=x.dtype)
    out[:, :segments] += y[:, :, :hop]
    out[:, 1:, : size - hop] += y[:, :, hop:]
    return out.reshape(rows, -1)[:, :frames]


def _reverb_ir(rng: np.random.Generator, sr: int) -> np.ndarray:
    """50-200 ms of exponentially decaying noise after a 2-10 ms predelay, unit energy."""
    length = int(rng.uniform(0.05, 0.2) * sr) + 1
    decay = rng.uniform(0.02, 0.06) * sr
    tail = rng.standard_normal(length) * np.exp(-np.arange(length) / decay)
    ir = np.zeros(int(rng.uniform(0.002, 0.01) * sr) + length, dtype=np.float32)
    ir[-length:] = tail / np.sqrt(np.sum(tail**2))
    return ir


# Sources. Each draws its parameters up front and returns a function rendering any span of
# sample indices as a pure function of time (phases are per note, not running sums), so a
# track renders in cache-sized spans, faster than whole-track arrays. Rendering is float32
# after the phase is wrapped in float64: numpy's float32 sin/cos/exp are SIMD where float64's
# are not (docs/benchmarks.md), and float32's 6e-8 error is far below 16-bit (3e-5).
_RENDER_FRAMES = 8192
Render = Callable[[np.ndarray], np.ndarray]  # sample indices -> float32 samples


def _radians(cycles: np.ndarray) -> np.ndarray:
    """2*pi*cycles as float32, wrapped in float64 first so float32 loses nothing."""
    return (2 * np.pi * (cycles - np.floor(cycles))).astype(np.float32)


def _harmonics(cycles: np.ndarray, amps: Sequence[float | np.ndarray]) -> np.ndarray:
    """Sum of amps[h-1] * sin(2*pi*h*cycles), by the Chebyshev recurrence: one sin and one cos
    for all harmonics."""
    theta = _radians(cycles)
    cur = np.sin(theta)
    c2 = 2 * np.cos(theta)
    prev = np.zeros_like(cur)
    out = np.zeros_like(cur)
    for amp in amps:
        out += amp * cur
        # sin((h+1)x) = 2cos(x) sin(hx) - sin((h-1)x), into the oldest buffer
        np.subtract(np.multiply(c2, cur, out=theta), prev, out=prev)
        prev, cur = cur, prev
    return out


def _partials(top_hz: float, sr: int, most: int) -> range:
    """Harmonic numbers 1.. that stay below 0.45*sr at the highest note: no aliasing."""
    return range(1, 1 + sum(1 for h in range(1, most + 1) if h * top_hz < 0.45 * sr))


def _count(frames: int, sr: int, step: float) -> int:
    """Number of `step`-second notes that `_notes` indexes in a track of `frames` samples."""
    return int(np.floor((frames - 1) / sr / step)) + 1


def _notes(n: np.ndarray, sr: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sample index: the `step`-second note it lies in, and the time since that onset."""
    t = n / sr
    idx = np.floor(t / step).astype(np.int64)
    return idx, t - idx * step


def _env(tn: np.ndarray, step: float, attack: float, floor: float, decay: float) -> np.ndarray:
    """Exponential attack, decay from 1 toward `floor`, 10 ms release before the next note."""
    tn = tn.astype(np.float32)
    shape = (1 - np.exp(tn / -attack)) * (floor + (1 - floor) * np.exp(tn / -decay))
    return shape * np.minimum(1, (step - tn) / 0.01)


def _hz(root: int, scale: tuple[int, ...], degrees: np.ndarray) -> np.ndarray:
    midi = root + np.asarray(scale)[degrees % 7] + 12 * (degrees // 7)
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _lead(
    rng: np.random.Generator, frames: int, sr: int, beat: float, root: int, scale: tuple[int, ...]
) -> Render:
    """Melody with vibrato (restarting each note) and an attack/decay envelope."""
    step = beat * rng.choice([0.5, 1.0, 2.0])
    hz = _hz(root, scale, rng.integers(7, 16, _count(frames, sr, step)))
    depth, rate = rng.uniform(0.003, 0.008), rng.uniform(4.5, 6.5)
    tilt = rng.uniform(1.0, 2.0)
    amps = [h**-tilt for h in _partials(hz.max() * (1 + depth), sr, 6)]

    def render(n: np.ndarray) -> np.ndarray:
        idx, tn = _notes(n, sr, step)
        # integral of f * (1 + depth * sin(2*pi*rate*tn)) from the onset
        wobble = depth * (1 - np.cos(_radians(rate * tn))) / (2 * np.pi * rate)
        return _harmonics(hz[idx] * (tn + wobble), amps) * _env(tn, step, 0.02, 0.6, 0.15)

    return render


def _bass(
    rng: np.random.Generator, frames: int, sr: int, beat: float, root: int, scale: tuple[int, ...]
) -> Render:
    """Saw-like bass line an octave below the root."""
    step = beat * rng.choice([1.0, 2.0])
    hz = _hz(root - 12, scale, rng.integers(0, 5, _count(frames, sr, step)))
    amps = [1 / h for h in _partials(hz.max(), sr, 8)]

    def render(n: np.ndarray) -> np.ndarray:
        idx, tn = _notes(n, sr, step)
        return _harmonics(hz[idx] * tn, amps) * _env(tn, step, 0.005, 0.4, 0.2)

    return render


def _drums(
    rng: np.random.Generator, frames: int, sr: int, beat: float, root: int, scale: tuple[int, ...]
) -> Render:
    """Noise bursts on the beat (a pitch-swept thump on even beats), hi-hat ticks off the beat."""
    noise = rng.standard_normal((2, frames), dtype=np.float32)
    # Snare: noise averaged over 0.25 ms (first null at 4 kHz), so that sub-millisecond channel
    # delays leave part of it correlated. Hats: the first difference, high-passed noise.
    width = max(1, round(0.00025 * sr))
    running = np.concatenate([np.zeros(width), np.cumsum(noise[0], dtype=np.float64)])
    snare = ((running[width:] - running[:-width]) / np.sqrt(width)).astype(np.float32)
    hiss = np.diff(noise[1], prepend=np.float32(0))
    burst_decay = rng.uniform(0.03, 0.08)

    def render(n: np.ndarray) -> np.ndarray:
        idx, tn = _notes(n, sr, beat)
        even = (idx % 2 == 0).astype(np.float32)
        tn32 = tn.astype(np.float32)
        burst = snare[n] * np.exp(tn32 / -burst_decay) * (0.6 + 0.4 * even)
        # a 150 -> 50 Hz sweep: integral of 50 + 100 * exp(-tn / 0.03)
        sweep = 50 * tn + 3 * (1 - np.exp(tn32 / -0.03))
        thump = np.sin(_radians(sweep)) * np.exp(tn32 / -0.12) * even
        off = np.where(tn32 < beat / 2, tn32 + beat / 2, tn32 - beat / 2)
        hat = hiss[n] * np.exp(off / -0.015)
        return burst + 2 * thump + 0.3 * hat

    return render


def _pluck(
    rng: np.random.Generator, frames: int, sr: int, beat: float, root: int, scale: tuple[int, ...]
) -> Render:
    """Plucked string as modes: amplitude set by the pluck position, higher modes decay faster."""
    step = beat * rng.choice([0.5, 1.0])
    hz = _hz(root, scale, rng.integers(7, 15, _count(frames, sr, step)))
    where, decay = rng.uniform(0.1, 0.3), rng.uniform(2.0, 5.0)
    modes = [
        (float(np.sin(np.pi * h * where) / h), decay * (1 + 0.1 * h * h))
        for h in _partials(hz.max(), sr, 10)
    ]

    def render(n: np.ndarray) -> np.ndarray:
        idx, tn = _notes(n, sr, step)
        tn32 = tn.astype(np.float32)
        amps = [amp * np.exp(tn32 * -rate) for amp, rate in modes]
        return _harmonics(hz[idx] * tn, amps) * _env(tn, step, 0.001, 1.0, 1.0)

    return render


def _pad(
    rng: np.random.Generator, frames: int, sr: int, beat: float, root: int, scale: tuple[int, ...]
) -> Render:
    """Triads changing every bar, two detuned voices per note, slow attack."""
    step = 4 * beat
    chords = rng.choice([0, 3, 4, 5], size=_count(frames, sr, step))
    hz = [_hz(root + 12, scale, chords + third) for third in (0, 2, 4)]
    detune = rng.uniform(0.001, 0.004)
    amps = [1.0, 0.3][: len(_partials(max(v.max() for v in hz) * (1 + detune), sr, 2))]

    def render(n: np.ndarray) -> np.ndarray:
        idx, tn = _notes(n, sr, step)
        out = np.zeros(len(n), dtype=np.float32)
        for voice in hz:
            for ratio in (1 - detune, 1 + detune):
                out += _harmonics(voice[idx] * (ratio * tn), amps)
        return out * _env(tn, step, 0.3, 1.0, 1.0)

    return render


_SOURCES = (_lead, _bass, _drums, _pluck, _pad)

"""Seeded draws: a window's random numbers as a small hash of its own seed (see docs/data.md).

Reproducible and resumable (nothing but the seed decides them), and cheap enough to run per
batch in the loader: far cheaper than seeding a numpy Generator per window. `uniforms` is the
numpy form for many draws; `draws` and `uniform` give the same numbers in plain Python, cheaper
for the one or two a task needs per window.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["draws", "uniform", "uniforms"]

_MASK, _GAMMA = (1 << 64) - 1, 0x9E3779B97F4A7C15
_ONE, _S11, _S32, _NP_GAMMA = np.uint64(1), np.uint64(11), np.uint64(32), np.uint64(_GAMMA)


def uniforms(seeds: np.ndarray | list[int], count: int, stream: int = 0) -> np.ndarray:
    """`[B]` seeds -> `[B, count]` floats in [0, 1), a hash of (seed, stream, draw): the seed's
    Weyl step (seed + 1) * gamma, xor-shifted, times an odd multiplier per stream and draw; the
    top 53 bits. One mixing round, so that sequential seeds (evaluation's) come out
    uncorrelated; a full splitmix64 per draw would cost twice the numpy calls."""
    z = (np.asarray(seeds, dtype=np.uint64) + _ONE) * _NP_GAMMA
    z ^= z >> _S32
    z = np.multiply.outer(z, _multipliers(stream, count))
    z >>= _S11
    return z * 2.0**-53


def draws(seeds: list[int], stream: int = 0, draw: int = 0) -> list[float]:
    """`uniforms(seeds, ...)[:, draw]` in plain Python: for a few draws, cheaper than numpy."""
    k, out = _multiplier(stream, draw), []
    for seed in seeds:
        z = (seed + 1) * _GAMMA & _MASK
        out.append((((z ^ z >> 32) * k & _MASK) >> 11) * 2.0**-53)
    return out


def uniform(seed: int, stream: int = 0, draw: int = 0) -> float:
    """`uniforms(...)[b, draw]` for the one seed of window b."""
    return draws([int(seed)], stream, draw)[0]


@functools.cache
def _multiplier(stream: int, draw: int) -> int:
    """An odd 64-bit multiplier, fixed once and for all: splitmix64 of (stream, draw)."""
    z = ((stream << 32 | draw) + 1) * _GAMMA & _MASK
    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9 & _MASK
    z = (z ^ z >> 27) * 0x94D049BB133111EB & _MASK
    return z ^ z >> 31 | 1


@functools.cache
def _multipliers(stream: int, count: int) -> np.ndarray:
    return np.array([_multiplier(stream, k) for k in range(count)], dtype=np.uint64)

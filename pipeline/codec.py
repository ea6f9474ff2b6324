"""uint16 PCM <-> model tokens: where samples become token ids and back (docs/architecture.md).

Shards hold uint16 = int16 + 32768 (the original trainer's mapping). A codec maps those 65536
values to token ids ``0..levels-1``:

- ``pcm16``: token = the uint16 value, exact, 65536 levels.
- ``linearN`` (1 <= N <= 16): token = u16 >> (16 - N), a truncation in the offset domain; decode
  gives the centre of the bin, so the error is at most half a bin (2**(15 - N) int16 units; N = 8:
  128). Silence (u16 32768) decodes to 32768 + half a bin: the bins are those of the offset
  domain, not centred on zero.
- ``mulawN`` (2 <= N <= 16, ``mulaw`` = ``mulaw8``): mu = 2**N - 1, x = int16 / 32768,
  y = sign(x) ln(1 + mu|x|) / ln(1 + mu), token = floor((y + 1) / 2 * mu + 0.5), the same rounding
  as ``torchaudio.functional.mu_law_encoding``. A token decodes to the inverse curve at its centre,
  rounded to the nearest int16, clipped to [-32768, 32767] and then into the range of int16 values
  that encode to it, so ``encode(decode(c)) == c`` for every reachable code. The error on a sample x
  is at most (1/mu + |x|)(exp(ln(1 + mu)/mu) - 1) * 32768 + 1 int16 units, half the local bin
  plus rounding (with s = |int16 sample|: mulaw8 0.022 s + 3.8, mulaw10 0.0068 s + 1.2).

Unreachable codes: near zero the mu-law bins of N >= 10 are narrower than one int16 step, so some
codes are the encoding of no sample (mulaw8: none; mulaw10: 39 of 1024; mulaw12: 1211 of 4096;
mulaw16: 45409 of 65536). They still decode (to the rounded curve value, which encodes to a
neighbouring code); only reachable codes round-trip exactly. ``Codec.reachable()`` says which.

encode and decode are lookups in tables computed once in float64 with numpy (65536 entries
``u16 -> code``, ``levels`` entries ``code -> u16``), so numpy and torch give bit-identical results
on any device. This module imports no torch: tensors are recognised only when the caller has
already imported torch.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

__all__ = [
    "Codec",
    "CodecError",
    "get_codec",
    "int16_to_pcm16",
    "pcm16_to_int16",
]

VALID_SPECS = "pcm16, mulaw (= mulaw8), mulawN or mulaw:N (2..16), linearN or linear:N (1..16)"
_SPEC = re.compile(r"(mulaw|linear):?(\d+)")


class CodecError(PipelineError, ValueError):
    """A bad codec spec or out-of-range samples/tokens (a ValueError, and the pipeline's type)."""


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    return None if torch is None else torch.Tensor


def _is_tensor(x: Any) -> bool:
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(x, tensor)


@dataclass(frozen=True)
class Codec:
    """A uint16 PCM <-> token mapping; build it with ``get_codec``.

    Attributes:
        name: canonical spec, e.g. ``"pcm16"``, ``"mulaw8"``, ``"linear12"``.
        kind: ``"pcm16"``, ``"mulaw"`` or ``"linear"``.
        bits: token bits; ``levels = 2**bits``.
    """

    name: str
    kind: str
    bits: int

    @property
    def levels(self) -> int:
        """Number of token values: tokens are ``0..levels-1``."""
        return 1 << self.bits

    @property
    def exact(self) -> bool:
        """True when decode(encode(u16)) == u16 for every sample (pcm16, linear16)."""
        return self.bits == 16 and self.kind != "mulaw"

    def encode_table(self) -> np.ndarray:
        """Read-only int64 array [65536]: the token of every uint16 sample value."""
        return _tables(self.kind, self.bits)[0]

    def decode_table(self) -> np.ndarray:
        """Read-only uint16 array [levels]: the sample value every token decodes to."""
        return _tables(self.kind, self.bits)[1]

    def reachable(self) -> np.ndarray:
        """Bool array [levels]: True for codes that some uint16 sample encodes to."""
        return _tables(self.kind, self.bits)[2]

    def encode(self, u16: Any) -> Any:
        """uint16 samples -> token ids.

        Args:
            u16: numpy array (any integer dtype) or torch tensor (uint16, int16..int64) with
                values in 0..65535.

        Returns:
            Token ids in ``0..levels-1``, same shape: numpy int64 array or torch int64 tensor on
            the input's device.

        Raises:
            CodecError: non-integer input or values outside 0..65535.
        """
        if _is_tensor(u16):
            x = _check_tensor(u16, 65536, "samples (uint16 PCM)")
            if self.kind == "pcm16":
                return x
            return _torch_table(self.kind, self.bits, 0, x.device)[x]
        x = _check_array(u16, 65536, "samples (uint16 PCM)")
        if self.kind == "pcm16":
            return x.astype(np.int64)
        return np.asarray(self.encode_table()[x])

    def decode(self, tokens: Any) -> Any:
        """Token ids -> uint16 sample values (int16 + 32768).

        Args:
            tokens: numpy array (any integer dtype) or torch tensor with values in
                ``0..levels-1`` (ignored label positions, -100, must be removed first).

        Returns:
            Same shape: numpy uint16 array, or torch int32 tensor on the input's device (torch
            supports few operations on uint16) holding values 0..65535.

        Raises:
            CodecError: non-integer input or tokens outside ``0..levels-1``.
        """
        if _is_tensor(tokens):
            x = _check_tensor(tokens, self.levels, f"{self.name} tokens")
            if self.kind == "pcm16":
                return x.int()
            return _torch_table(self.kind, self.bits, 1, x.device)[x]
        x = _check_array(tokens, self.levels, f"{self.name} tokens")
        if self.kind == "pcm16":
            return x.astype(np.uint16)
        return np.asarray(self.decode_table()[x])


@functools.cache
def get_codec(spec: str) -> Codec:
    """Parse a codec spec: ``pcm16``, ``mulaw`` (= ``mulaw8``), ``mulawN``/``mulaw:N`` with
    2 <= N <= 16, ``linearN``/``linear:N`` with 1 <= N <= 16 (case and surrounding spaces ignored).

    Raises:
        CodecError (a ValueError): any other spec; the message lists the valid forms.
    """
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text == "pcm16":
        return Codec("pcm16", "pcm16", 16)
    if text == "mulaw":
        text = "mulaw8"
    match = _SPEC.fullmatch(text)
    if match:
        kind, bits = match.group(1), int(match.group(2))
        if (2 if kind == "mulaw" else 1) <= bits <= 16:
            return Codec(f"{kind}{bits}", kind, bits)
    raise CodecError(f"unknown codec {spec!r}: use one of {VALID_SPECS}")


def pcm16_to_int16(u16: Any) -> Any:
    """uint16 PCM -> int16 samples (u16 - 32768, exact). numpy uint16 -> int16 (a sign-bit flip);
    a torch tensor -> int16 tensor."""
    if _is_tensor(u16):
        return (u16.int() - 32768).short()
    return (np.asarray(u16, dtype=np.uint16) ^ np.uint16(0x8000)).view(np.int16)


def int16_to_pcm16(i16: Any) -> Any:
    """int16 samples -> uint16 PCM (i16 + 32768, exact). numpy int16 -> uint16 (a sign-bit flip);
    a torch tensor -> int32 tensor with values 0..65535."""
    if _is_tensor(i16):
        return i16.int() + 32768
    return np.asarray(i16, dtype=np.int16).view(np.uint16) ^ np.uint16(0x8000)


def _check_array(x: Any, limit: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise CodecError(f"{what} must be integers, got dtype {x.dtype}")
    if x.size and not (x.dtype == np.uint16 and limit == 65536):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= limit:
            raise CodecError(f"{what} must lie in 0..{limit - 1}, got values in {lo}..{hi}")
    return x


def _check_tensor(x: Any, limit: int, what: str) -> Any:
    if x.is_floating_point() or x.is_complex() or x.dtype == sys.modules["torch"].bool:
        raise CodecError(f"{what} must be integers, got dtype {x.dtype}")
    x = x.long()  # torch has no min/max for uint16; int64 is also the index type
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= limit:
            raise CodecError(f"{what} must lie in 0..{limit - 1}, got values in {lo}..{hi}")
    return x


@functools.cache
def _tables(kind: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(encode [65536] int64, decode [levels] uint16, reachable [levels] bool), read-only."""
    levels = 1 << bits
    u16 = np.arange(65536, dtype=np.int64)
    if kind == "pcm16":
        enc, dec = u16, u16.copy()
    elif kind == "linear":
        shift = 16 - bits
        enc = u16 >> shift
        half = (1 << shift) >> 1
        dec = np.minimum((np.arange(levels, dtype=np.int64) << shift) + half, 65535)
    elif kind == "mulaw":
        mu = float(levels - 1)
        log1p_mu = math.log1p(mu)
        x = (u16 - 32768) / 32768.0
        y = np.sign(x) * np.log1p(mu * np.abs(x)) / log1p_mu
        enc = np.clip(np.floor((y + 1.0) / 2.0 * mu + 0.5), 0, levels - 1).astype(np.int64)
        # Encoding is monotone, so each code's samples form one run [first, last] of u16 values.
        assert np.all(np.diff(enc) >= 0), "mu-law encode table must be monotone"
        yc = np.arange(levels, dtype=np.float64) / mu * 2.0 - 1.0
        xc = np.sign(yc) * np.expm1(np.abs(yc) * log1p_mu) / mu
        dec = np.clip(np.rint(xc * 32768.0), -32768, 32767).astype(np.int64) + 32768
        codes = np.arange(levels)
        first = np.searchsorted(enc, codes, side="left")
        last = np.searchsorted(enc, codes, side="right") - 1
        hit = first <= last
        # Where the rounded curve value falls in a neighbour's bin, take the nearest sample that
        # encodes to this code instead; unreachable codes keep the curve value.
        dec[hit] = np.clip(dec[hit], first[hit], last[hit])
    else:
        raise AssertionError(f"no tables for codec kind {kind!r}")
    reachable = np.zeros(levels, dtype=bool)
    reachable[enc] = True
    enc = enc.astype(np.int64)
    dec = dec.astype(np.uint16)
    assert np.array_equal(enc[dec[reachable]], np.flatnonzero(reachable))
    for table in (enc, dec, reachable):
        table.setflags(write=False)
    return enc, dec, reachable


@functools.cache
def _torch_table(kind: str, bits: int, which: int, device: Any) -> Any:
    """Encode (which=0, int64) or decode (which=1, int32) table as a tensor on ``device``."""
    torch = sys.modules["torch"]
    table = _tables(kind, bits)[which]
    dtype = torch.int64 if which == 0 else torch.int32
    return torch.tensor(table.astype(np.int64), dtype=dtype, device=device)

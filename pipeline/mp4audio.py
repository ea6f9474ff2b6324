"""Decode MP4-family audio (.m4a, .mp4, .stem.mp4, .aac) with PyAV, forward only, never seeking.

AAC decoding is not seek-invariant: the first frame after a container seek differs from a
sequential decode (up to 0.3 of full scale on tonal audio; on noise-like audio every frame
after it). So `Mp4Decoder` decodes from the start and discards up to a position, and a
position behind it reopens the file. PyAV is an optional extra, imported on the first open.

A file's audio streams are its stems: stream 0 is the mixture; the other names come from the
NI/MUSDB `stem` JSON in the metadata, else from MUSDB18's order (docs/data.md).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from pipeline.errors import AudioError

MP4_EXTENSIONS = frozenset({".m4a", ".mp4", ".aac"})  # `.stem.mp4` ends in `.mp4`
MUSDB_STEMS = ("mixture", "drums", "bass", "other", "vocals")
INSTALL_HINT = 'pip install -e ".[av]"'
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


class Mp4OpenError(AudioError):
    """An MP4-family file that does not open: PyAV missing, FFmpeg's reason, or an unknown stem."""


def is_mp4_path(path: str | os.PathLike) -> bool:
    """True for an MP4-family extension, whatever its case."""
    return os.path.splitext(path)[1].lower() in MP4_EXTENSIONS


def _av() -> ModuleType:
    try:
        import av
    except ImportError:
        raise Mp4OpenError(
            f"MP4-family audio needs PyAV, which is not installed: {INSTALL_HINT}"
        ) from None
    return av


def decoder_version() -> str:
    """PyAV's and FFmpeg's decoder versions (AAC decoding is FFmpeg's), as the index records it."""
    av = _av()
    codec = ".".join(str(v) for v in av.library_versions["libavcodec"])
    return f"av {av.__version__}, libavcodec {codec}"


def _safe_name(raw: object, fallback: str) -> str:
    """A stem name usable in an index key: lower case, [a-z0-9_-] only (never an extension)."""
    name = _UNSAFE.sub("_", str(raw).strip().lower()).strip("_")
    return name or fallback


def stem_names(metadata: dict[str, str], streams: int) -> tuple[str, ...]:
    """One unique name per audio stream: `mixture`, then the `stem` JSON's names when it names
    every other stream, else MUSDB18's order for 5 streams, else `stem1`, `stem2`, ..."""
    names: list[str] = ["mixture"]
    try:
        described = json.loads(metadata.get("stem", ""))["stems"]
    except (ValueError, KeyError, TypeError):
        described = None
    if isinstance(described, list) and len(described) == streams - 1:
        names += [
            _safe_name(s.get("name") if isinstance(s, dict) else s, f"stem{i}")
            for i, s in enumerate(described, 1)
        ]
    elif streams == len(MUSDB_STEMS):
        names = list(MUSDB_STEMS)
    else:
        names += [f"stem{i}" for i in range(1, streams)]
    seen: set[str] = set()
    for i, name in enumerate(names):
        names[i] = name if name not in seen else f"{name}{i}"
        seen.add(names[i])
    return tuple(names[:streams])


def _open_container(av: ModuleType, path: str) -> Any:
    try:
        # export_all: a raw `udta/stem` atom (NI stems) shows up as the metadata key `stem`
        return av.open(path, options={"export_all": "1"})
    except av.FFmpegError as exc:
        raise Mp4OpenError(f"not readable as audio: {exc.strerror or exc}") from None


def _samples(frame: Any) -> np.ndarray:
    """One decoded frame -> `[n, channels]`: float64 for float formats, else int16 / int32 as
    decoded (FFmpeg's 24-bit ALAC is the high bits of s32), quantized like libsndfile's data."""
    data = frame.to_ndarray()
    data = data.T if frame.format.is_planar else data.reshape(-1, len(frame.layout.channels))
    return data.astype(np.float64) if data.dtype.kind == "f" else data


def _stream_frames(av: ModuleType, container: Any, position: int) -> int:
    """Audio stream `position`'s length in samples: where its last packet ends (priming before 0
    and the last frame's padding excluded), from demuxing its packets without decoding them.
    Not the stream's `duration`: an MP4's edit list gives that in the movie's timescale (ms)."""
    stream = container.streams.audio[position]
    try:
        ends = [p.pts + p.duration for p in container.demux(stream) if p.pts is not None]
        return round(max(ends) * stream.time_base * stream.rate) if ends else 0
    except av.FFmpegError as exc:
        raise Mp4OpenError(f"decode error: {exc.strerror or exc}") from None


class Mp4Decoder:
    """One audio stream of an MP4-family file, read like a `soundfile.SoundFile` (`frames`,
    `samplerate`, `channels`, `subtype`, `tell`, `seek`, `read`, `close`), decoded forward."""

    def __init__(self, path: str | os.PathLike, stem: str | None = None) -> None:
        self.path = os.fspath(path)
        self._av = av = _av()
        container = _open_container(av, self.path)
        try:
            audio = list(container.streams.audio)
            if not audio:
                raise Mp4OpenError("no audio stream")
            self.stems = stem_names(dict(container.metadata), len(audio))
            if stem is not None and stem not in self.stems:
                raise Mp4OpenError(
                    f"no stem {stem!r} (the file has {', '.join(self.stems)}); re-run index"
                )
            self.stream = self.stems.index(stem) if stem is not None else 0
            chosen = audio[self.stream]
            name = container.format.name  # "mov,mp4,m4a,..." or "aac" (ADTS)
            self.format = "MP4" if "mp4" in name.split(",") else name.upper()
            self.samplerate = chosen.rate
            self.channels = chosen.channels
            self.subtype = chosen.codec_context.name.upper()
            self.frames = _stream_frames(av, container, self.stream)
        finally:
            container.close()
        self._container: Any = None
        self._decoded: Iterator[np.ndarray] | None = None
        self._pending = np.zeros((0, self.channels))
        self._position = 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._decoded = None
        self._position = 0

    def tell(self) -> int:
        return self._position

    def _blocks(self) -> Iterator[np.ndarray]:
        """Decoded `[n, channels]` blocks of the stream from its start, cut at `frames`."""
        container = self._container = _open_container(self._av, self.path)
        left = self.frames
        for frame in container.decode(audio=self.stream):
            block = _samples(frame)[:left]
            left -= len(block)
            if len(block):
                yield block
            if left == 0:
                return

    def _next_block(self) -> np.ndarray | None:
        if self._decoded is None:
            self._decoded = self._blocks()
        try:
            return next(self._decoded, None)
        except self._av.FFmpegError as exc:
            self.close()  # the next read starts over from the beginning
            raise AudioError(f"decode error: {exc.strerror or exc}") from None

    def seek(self, position: int) -> None:
        """Decode forward to `position`, discarding; behind the current position, reopen."""
        if position < self._position:
            self.close()
            self._pending = self._pending[:0]
        while self._position < position:
            if not len(self._pending):
                block = self._next_block()
                if block is None:
                    return
                self._pending = block
            skip = min(position - self._position, len(self._pending))
            self._pending = self._pending[skip:]
            self._position += skip

    def read(self, frames: int, dtype: str | None = None, always_2d: bool = True) -> np.ndarray:
        """Up to `frames` samples `[n, channels]` from the current position, in the decoded
        type (`dtype`, `always_2d`: accepted for the `SoundFile` interface, not used)."""
        parts, have = [], 0
        while have < frames:
            if not len(self._pending):
                block = self._next_block()
                if block is None:
                    break
                self._pending = block
            part = self._pending[: frames - have]
            self._pending = self._pending[len(part) :]
            parts.append(part)
            have += len(part)
        self._position += have
        return np.concatenate(parts) if parts else self._pending[:0]

    def __enter__(self) -> Mp4Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stems_sum_snr_db(path: str | os.PathLike) -> float:
    """How far the mixture (stream 0) is from the sum of the other streams, in dB:
    10 log10(sum mixture^2 / sum (mixture - stems)^2), all streams decoded in one pass."""
    av = _av()
    with Mp4Decoder(path) as mixture_stream:
        left = mixture_stream.frames
    container = _open_container(av, os.fspath(path))
    try:
        streams = list(container.streams.audio)
        if len(streams) < 2:
            raise AudioError("one audio stream: no stems to sum")
        slot = {s.index: i for i, s in enumerate(streams)}
        pending: list[list[np.ndarray]] = [[] for _ in streams]
        signal = residual = 0.0
        for packet in container.demux(streams):
            for frame in packet.decode():
                pending[slot[packet.stream.index]].append(_samples(frame).astype(np.float64))
            ready = min(left, *(sum(len(b) for b in blocks) for blocks in pending))
            if ready == 0:
                continue
            parts = []
            for i, blocks in enumerate(pending):
                joined = np.concatenate(blocks)
                parts.append(joined[:ready])
                pending[i] = [joined[ready:]]
            left -= ready
            if left == 0:
                break
            mixture = parts[0]
            signal += float(np.sum(mixture**2))
            residual += float(np.sum((mixture - sum(parts[1:])) ** 2))
    except av.FFmpegError as exc:
        raise AudioError(f"decode error: {exc.strerror or exc}") from None
    finally:
        container.close()
    if residual == 0.0:
        return float("inf")
    return float(10 * np.log10(signal / residual)) if signal > 0 else float("-inf")

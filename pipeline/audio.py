"""Read any supported audio file as int16 frames `[2, n]`: channel policy, bit depth, resampling.

One reader for every format libsndfile decodes (WAV/WAVE_EXTENSIBLE/RF64, FLAC, AIFF, OGG/Vorbis,
Opus, MP3), and for MP4-family audio (.m4a .mp4 .stem.mp4 .aac) through `pipeline.mp4audio`
(PyAV). Files are read in blocks, so a two-hour file never sits in memory whole. A path
`FILE#STEM` reads one named audio stream of a multi-stream MP4 (`stream_key`).

Quantization (docs/data.md): files of <= 16-bit integer PCM are read as int16 (exact; 8-bit scales
up by 256). Wider integer files are read as int32 and reduced with integer arithmetic (round half
to even, then clip). Float and lossy files are read as float64, x 32768, round half to even, clip
to [-32768, 32767]. libsndfile's own int16 read truncates 24-bit and zeroes some float files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipeline.errors import AudioError, PipelineError
from pipeline.mp4audio import MP4_EXTENSIONS, Mp4Decoder, Mp4OpenError, decoder_version, is_mp4_path

AUDIO_EXTENSIONS = (
    frozenset({".wav", ".wave", ".flac", ".aif", ".aiff", ".aifc", ".ogg", ".oga", ".opus", ".mp3"})
    | MP4_EXTENSIONS
)
STREAM_SEPARATOR = "#"
BLOCK_FRAMES = 1 << 16

# Subtypes libsndfile decodes to at most 16 significant bits: its int16 read is exact for these.
_INT16_SUBTYPES = frozenset(
    {"PCM_S8", "PCM_U8", "PCM_16", "ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM", "GSM610", "ALAC_16"}
)
_INT32_SUBTYPES = frozenset({"PCM_24", "PCM_32", "ALAC_20", "ALAC_24", "ALAC_32", "DWVW_24"})
# Uncompressed containers whose frame count libsndfile derives from the data actually present
# (it clamps a header's data length to the file size), so their count needs no decode check.
_CLAMPED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "AIFF", "W64", "CAF", "AU"})
_PCM_SUBTYPES = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"})


def is_audio_path(path: str | os.PathLike) -> bool:
    """True when the extension is a supported audio one, whatever its case (`.WAV` too)."""
    return os.path.splitext(path)[1].lower() in AUDIO_EXTENSIONS


def stream_key(path: str, stem: str) -> str:
    """The index key (or path) of one stem of a multi-stream MP4 file: `song.stem.mp4#drums`."""
    return f"{path}{STREAM_SEPARATOR}{stem}"


def split_stream_key(key: str | os.PathLike) -> tuple[str, str | None]:
    """`song.stem.mp4#drums` -> (`song.stem.mp4`, `drums`); any other path -> (path, None).

    Unambiguous: a stem name never holds a dot, so a key with a stem never ends in an audio
    extension, and a real file named `a.m4a#b` is not an audio file.
    """
    key = os.fspath(key)
    file, sep, stem = key.rpartition(STREAM_SEPARATOR)
    if sep and stem and "." not in stem and "/" not in stem and is_mp4_path(file):
        return file, stem
    return key, None


@dataclass(frozen=True)
class ChannelPolicy:
    """How a file's channels become the two channels of a stereo sample.

    `stereo` (default, the original trainer's): mono duplicated, more than two -> first two.
    `pick:i,j`: channels i and j (a mono file duplicates channel 0).
    `downmix`: left = mean(front left, rear left), right = mean(front right, rear right), where the
    front pair is channels 0, 1 and the rear pair the last two of a file with 4 or more channels
    (quad and 5.1 in WAV order); 3 channels keep the first two; mono is duplicated.
    `skip-mono`: like `stereo`, but mono files are rejected.
    """

    kind: str = "stereo"
    pick: tuple[int, int] = (0, 1)

    @classmethod
    def parse(cls, spec: str | ChannelPolicy) -> ChannelPolicy:
        if isinstance(spec, ChannelPolicy):
            return spec
        if spec in ("stereo", "downmix", "skip-mono"):
            return cls(spec)
        if spec.startswith("pick:"):
            try:
                i, j = (int(c) for c in spec[5:].split(","))
            except ValueError:
                i = j = -1
            if i >= 0 and j >= 0:
                return cls("pick", (i, j))
        raise PipelineError(
            f"channel policy {spec!r} is not one of: stereo, pick:I,J (e.g. pick:0,1), downmix, "
            "skip-mono"
        )

    def __str__(self) -> str:
        return f"pick:{self.pick[0]},{self.pick[1]}" if self.kind == "pick" else self.kind

    def check(self, channels: int) -> None:
        """Raise AudioError when a file with `channels` channels cannot follow this policy."""
        if self.kind == "skip-mono" and channels == 1:
            raise AudioError("mono file skipped by channel policy skip-mono")
        if self.kind == "pick" and channels > 1 and max(self.pick) >= channels:
            raise AudioError(
                f"channel policy {self} needs {max(self.pick) + 1} channels, file has {channels}"
            )

    def apply(self, block: np.ndarray) -> np.ndarray:
        """`[n, channels]` in the read dtype -> `[n, 2]` (a downmix: float64 in [-1, 1])."""
        channels = block.shape[1]
        if channels == 1:
            return np.repeat(block, 2, axis=1)
        if self.kind == "pick":
            return block[:, list(self.pick)]
        if self.kind == "downmix" and channels >= 4:
            wide = _to_float(block)
            return (wide[:, 0:2] + wide[:, channels - 2 : channels]) / 2
        return block[:, :2]


@dataclass(frozen=True)
class AudioInfo:
    """What the header says, with `frames` replaced by the count that can really be read."""

    frames: int
    sample_rate: int
    channels: int
    subtype: str
    format: str
    header_frames: int
    stems: tuple[str, ...] = ()  # the audio streams of a multi-stream MP4 file
    decoder: str | None = None  # PyAV's and FFmpeg's versions, for files PyAV decodes


def resampled_frames(frames: int, native_rate: int, sample_rate: int) -> int:
    """Output frames of a soxr stream over `frames` input frames (checked over rates 8k-96k)."""
    return frames if native_rate == sample_rate else round(frames * sample_rate / native_rate)


def _open(path: str | os.PathLike) -> sf.SoundFile | Mp4Decoder:
    """libsndfile's handle, or PyAV's decoder of one stream for an MP4-family file (or key)."""
    file, stem = split_stream_key(path)
    try:
        return Mp4Decoder(file, stem) if is_mp4_path(file) else sf.SoundFile(file)
    except (sf.LibsndfileError, OSError, Mp4OpenError) as exc:
        raise AudioError(_why_unopened(file, exc)) from None


def _why_unopened(path: str | os.PathLike, exc: sf.LibsndfileError | OSError | Mp4OpenError) -> str:
    """What kept `path` from opening: libsndfile says `System error.` for a missing or
    unreadable file and `Format not recognised.` for an empty file or a folder."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symlink to {os.readlink(path)}"
        return "missing: no such file"
    except OSError as err:
        return f"cannot open: {err.strerror or err}"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an audio file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(path, os.R_OK):
        return "cannot open: permission denied"
    if isinstance(exc, sf.LibsndfileError):
        return f"not readable as audio: {exc.error_string}"
    if isinstance(exc, Mp4OpenError):
        return str(exc)
    return f"cannot open: {exc.strerror or exc}"


def _read_dtype(subtype: str) -> str:
    if subtype in _INT16_SUBTYPES:
        return "int16"
    if subtype in _INT32_SUBTYPES:
        return "int32"
    return "float64"


def _decodes_at(f: sf.SoundFile, position: int) -> bool:
    """Whether frame `position` decodes: one frame into a small buffer (no array, no dtype work)."""
    try:
        f.seek(position)
        return f.buffer_read_into(bytearray(2 * f.channels), "int16") == 1
    except (sf.LibsndfileError, RuntimeError):
        return False


def _decodes_at_fresh(path: str | os.PathLike, position: int) -> bool:
    """`_decodes_at` on a new handle: a failed seek poisons the handle that made it."""
    try:
        with sf.SoundFile(path) as f:
            return _decodes_at(f, position)
    except (sf.LibsndfileError, RuntimeError):
        return False


def readable_frames(path: str | os.PathLike, header_frames: int) -> int:
    """Frames that really decode: the header's count, or less for a file cut short.

    A truncated FLAC keeps its header's total, and seeking past the cut fails, so the last
    decodable frame is found by bisection (about 22 probes for a 1-hour file).
    """
    if header_frames <= 0 or _decodes_at_fresh(path, header_frames - 1):
        return max(header_frames, 0)
    if not _decodes_at_fresh(path, 0):
        return 0
    lo, hi = 0, header_frames - 1  # frame `lo` decodes, frame `hi` does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _decodes_at_fresh(path, mid):
            lo = mid
        else:
            hi = mid
    return lo + 1


def probe(path: str | os.PathLike) -> AudioInfo:
    """Open a file and return its info; raise AudioError with the reason when it is not usable.

    One handle: header, then (compressed formats only) whether the header's last frame decodes.
    An MP4-family file's count is its stream's duration (what decodes, priming and end padding
    excluded); it is not decoded to the end here.
    """
    if is_mp4_path(split_stream_key(path)[0]):
        with _open(path) as mp4:
            if mp4.frames <= 0:
                raise AudioError("no audio frames")
            info = (mp4.frames, mp4.samplerate, mp4.channels, mp4.subtype, mp4.format)
            return AudioInfo(*info, mp4.frames, mp4.stems, decoder_version())
    with _open(path) as f:
        header_frames, rate, channels = f.frames, f.samplerate, f.channels
        fmt, subtype = f.format, f.subtype
        if channels < 1 or rate < 1:
            raise AudioError(f"bad header: {channels} channels at {rate} Hz")
        if fmt in _CLAMPED_FORMATS and subtype in _PCM_SUBTYPES:
            tail_decodes = True
        else:
            tail_decodes = header_frames > 0 and _decodes_at(f, header_frames - 1)
    frames = header_frames if tail_decodes else readable_frames(path, header_frames)
    if frames == 0:
        if header_frames > 0:
            raise AudioError(f"truncated: header says {header_frames} frames, data holds 0")
        raise AudioError("no audio frames")
    return AudioInfo(frames, rate, channels, subtype, fmt, header_frames)


def quantize(block: np.ndarray) -> np.ndarray:
    """int16 / int32 / float64 samples -> int16, exact for int16, round half to even otherwise."""
    if block.dtype == np.int16:
        return block
    if block.dtype == np.int32:
        wide = block.astype(np.int64)
        high = wide >> 16
        low = wide & 0xFFFF
        high += (low > 0x8000) | ((low == 0x8000) & (high & 1 == 1))
        return np.minimum(high, 32767).astype(np.int16)
    scaled = np.rint(block.astype(np.float64, copy=False) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def _to_float(block: np.ndarray) -> np.ndarray:
    if block.dtype == np.int16:
        return block.astype(np.float64) / 32768.0
    if block.dtype == np.int32:
        return block.astype(np.float64) / 2147483648.0
    return block.astype(np.float64, copy=False)


class AudioReader:
    """Block-wise reader of one file, yielding int16 `[2, n]` at the native or a target rate.

    `frames` caps what is read (pass the index's readable count for a file whose header lies).
    With resampling, positions and counts are in output frames and a read streams from the start.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        channels: str | ChannelPolicy = "stereo",
        sample_rate: int | None = None,
        frames: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.policy = ChannelPolicy.parse(channels)
        # One handle for the reader's life: chunk after chunk needs no reopen and no seek.
        self._file = f = _open(path)
        self.native_rate = f.samplerate
        self.source_channels = f.channels
        self.subtype = f.subtype
        self.native_frames = f.frames if frames is None else min(frames, f.frames)
        try:
            self.policy.check(self.source_channels)
        except AudioError:
            f.close()
            raise
        self.sample_rate = sample_rate or self.native_rate
        self._dtype = _read_dtype(self.subtype)

    @property
    def resampled(self) -> bool:
        return self.sample_rate != self.native_rate

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _native_blocks(self, start: int, count: int, block_frames: int) -> Iterator[np.ndarray]:
        """Policy-applied `[n, 2]` blocks in the read dtype, frames [start, start + count)."""
        f = self._file
        try:
            if f.tell() != start:
                f.seek(start)
            left = count
            while left > 0:
                block = f.read(min(block_frames, left), dtype=self._dtype, always_2d=True)
                if len(block) == 0:
                    break
                left -= len(block)
                yield self.policy.apply(block)
        except sf.LibsndfileError as exc:
            # a failed seek or decode leaves the handle unusable: start over on the next read
            self._file = _open(self.path)
            raise AudioError(f"decode error: {exc.error_string}") from None

    def blocks(
        self, start: int = 0, frames: int | None = None, block_frames: int = BLOCK_FRAMES
    ) -> Iterator[np.ndarray]:
        """int16 `[2, n]` blocks covering output frames [start, start + frames)."""
        if not self.resampled:
            count = self.native_frames - start if frames is None else frames
            count = max(0, min(count, self.native_frames - start))
            for block in self._native_blocks(start, count, block_frames):
                yield np.ascontiguousarray(quantize(block).T)
            return
        stop = None if frames is None else start + frames
        position = 0
        for block in self._resampled_blocks(block_frames):
            end = position + block.shape[1]
            lo, hi = max(start, position), end if stop is None else min(stop, end)
            if hi > lo:
                yield np.ascontiguousarray(block[:, lo - position : hi - position])
            position = end
            if stop is not None and position >= stop:
                return

    def _resampled_blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        stream = soxr.ResampleStream(
            self.native_rate, self.sample_rate, 2, dtype="float64", quality="VHQ"
        )
        blocks = self._native_blocks(0, self.native_frames, block_frames)
        previous = next(blocks, None)
        while previous is not None:
            current = next(blocks, None)
            out = stream.resample_chunk(_to_float(previous), last=current is None)
            if len(out):
                yield quantize(out).T
            previous = current

    @property
    def frames(self) -> int:
        """Frames at the output rate."""
        return resampled_frames(self.native_frames, self.native_rate, self.sample_rate)

    def read(self, start: int = 0, frames: int | None = None) -> np.ndarray:
        """int16 `[2, n]` from output frame `start`; resampled reads moving forward stream on
        from where the last one stopped instead of from the start of the file."""
        if self.resampled and frames is not None:
            return self._read_forward(start, frames)
        parts = list(self.blocks(start, frames))
        return np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), np.int16)

    def _read_forward(self, start: int, frames: int) -> np.ndarray:
        cursor = getattr(self, "_cursor", None)
        if cursor is None or start < cursor[1]:
            cursor = (self._resampled_blocks(BLOCK_FRAMES), 0, np.zeros((2, 0), np.int16))
        stream, position, buffer = cursor  # buffer holds output frames from `position` on
        stop = start + frames
        while position + buffer.shape[1] < stop:
            block = next(stream, None)
            if block is None:
                break
            if position + buffer.shape[1] <= start:  # nothing of the buffer is wanted any more
                position, buffer = position + buffer.shape[1], block
            else:
                buffer = np.concatenate([buffer, block], axis=1)
        out = np.ascontiguousarray(buffer[:, max(0, start - position) : stop - position])
        keep = max(0, min(stop, position + buffer.shape[1]) - position)
        self._cursor = (stream, position + keep, buffer[:, keep:])
        return out


def read(
    path: str | os.PathLike,
    start: int = 0,
    frames: int | None = None,
    channels: str | ChannelPolicy = "stereo",
    sample_rate: int | None = None,
) -> np.ndarray:
    """int16 `[2, frames]` of `path` from frame `start` (all remaining frames when None)."""
    return AudioReader(path, channels, sample_rate).read(start, frames)


class ReaderPool:
    """Open readers of many files, at most `size` at a time (the oldest is closed first), so
    chunk after chunk of interleaved files needs neither a reopen nor a seek."""

    def __init__(
        self, channels: str | ChannelPolicy, sample_rate: int | None, size: int = 64
    ) -> None:
        self.channels, self.sample_rate, self.size = channels, sample_rate, size
        self._readers: dict[str, AudioReader] = {}

    def read(self, path: str, start: int, frames: int, cap: int | None = None) -> np.ndarray:
        """int16 `[2, <= frames]` of `path` from `start`; `cap`: the frames that decode."""
        reader = self._readers.get(path)
        if reader is None:
            if len(self._readers) >= self.size:
                self._readers.pop(next(iter(self._readers))).close()
            reader = AudioReader(path, self.channels, self.sample_rate, cap)
            self._readers[path] = reader
        return reader.read(start, frames)

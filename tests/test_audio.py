"""pipeline.audio: every format, bit depth and channel layout read exactly as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline import audio
from pipeline.errors import AudioError, PipelineError

RATE = 44100


def _signal(frames: int, channels: int, seed: int = 0, peak: float = 0.9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None] / RATE
    tones = np.sin(2 * np.pi * (220 + 110 * np.arange(channels)) * t)
    return np.clip(peak * (0.7 * tones + 0.3 * rng.uniform(-1, 1, (frames, channels))), -1, 1)


def _float_reference(path: Path) -> np.ndarray:
    """What the documented quantization must give: float64 x 32768, round half to even, clip."""
    data, _ = sf.read(path, dtype="float64", always_2d=True)
    return np.clip(np.rint(data * 32768), -32768, 32767).astype(np.int16)


def _stereo(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 2, axis=0) if x.shape[0] == 1 else x[:2]


INT16_CASES = [
    ("a.wav", "WAV", "PCM_16", 2),
    ("b.WAV", "WAV", "PCM_16", 2),
    ("ext.wav", "WAVEX", "PCM_16", 2),
    ("c.flac", "FLAC", "PCM_16", 2),
    ("d.aiff", "AIFF", "PCM_16", 2),
    ("e.aif", "AIFF", "PCM_16", 2),
    ("mono.wav", "WAV", "PCM_16", 1),
    ("six.wav", "WAVEX", "PCM_16", 6),
    ("six.flac", "FLAC", "PCM_16", 6),
]


@pytest.mark.parametrize(("name", "fmt", "subtype", "channels"), INT16_CASES)
def test_int16_sources_read_back_bit_for_bit(tmp_path, name, fmt, subtype, channels):
    frames = 5000
    path = tmp_path / name
    sf.write(path, _signal(frames, channels), RATE, format=fmt, subtype=subtype)
    truth, _ = sf.read(path, dtype="int16", always_2d=True)

    info = audio.probe(path)
    assert (info.frames, info.sample_rate, info.channels) == (frames, RATE, channels)
    got = audio.read(path)
    assert got.dtype == np.int16 and got.shape == (2, frames)
    np.testing.assert_array_equal(got, _stereo(truth.T))


@pytest.mark.parametrize(
    ("name", "fmt", "subtype"),
    [
        ("w24.wav", "WAV", "PCM_24"),
        ("f24.flac", "FLAC", "PCM_24"),
        ("a24.aiff", "AIFF", "PCM_24"),
        ("w32.wav", "WAV", "PCM_32"),
        ("fl.wav", "WAV", "FLOAT"),
        ("db.wav", "WAV", "DOUBLE"),
        ("v.ogg", "OGG", "VORBIS"),
        ("o.opus", "OGG", "OPUS"),
        ("m.mp3", "MP3", "MPEG_LAYER_III"),
    ],
)
def test_wide_and_lossy_sources_match_rounding_reference(tmp_path, name, fmt, subtype):
    frames, rate = 4800, 48000
    path = tmp_path / name
    sf.write(path, _signal(frames, 2), rate, format=fmt, subtype=subtype)
    info = audio.probe(path)
    assert (info.frames, info.sample_rate, info.channels, info.subtype) == (
        frames,
        rate,
        2,
        subtype,
    )
    np.testing.assert_array_equal(audio.read(path), _float_reference(path).T)


def test_24bit_rounds_half_to_even_not_truncates(tmp_path):
    # 24-bit values k*256 + 128 sit exactly halfway between two int16 values.
    k = np.array([-3, -2, -1, 0, 1, 2, 3, 32767], dtype=np.int64)
    values = np.stack([k * 256 + 128, k * 256 - 128], axis=1).astype(np.int32) << 8
    path = tmp_path / "half.wav"
    sf.write(path, values, RATE, subtype="PCM_24")
    got = audio.read(path)
    np.testing.assert_array_equal(got[0], np.clip(np.rint(k + 0.5), -32768, 32767))
    np.testing.assert_array_equal(got[1], np.rint(k - 0.5))


def test_8bit_scales_up_exactly(tmp_path):
    codes = np.arange(256, dtype=np.int16).reshape(-1, 1) - 128
    path = tmp_path / "u8.wav"
    sf.write(path, np.repeat(codes, 2, axis=1).astype(np.float64) / 128, 8000, subtype="PCM_U8")
    np.testing.assert_array_equal(audio.read(path)[0], codes[:, 0] * 256)


def test_float_above_full_scale_clips_never_wraps(tmp_path):
    path = tmp_path / "hot.wav"
    sf.write(path, np.array([[3.0, -3.0], [1.0, -1.0], [0.5, -0.5]]), RATE, subtype="FLOAT")
    got = audio.read(path)
    np.testing.assert_array_equal(got, [[32767, 32767, 16384], [-32768, -32768, -16384]])


def test_blockwise_reads_concatenate_to_whole_read(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, _signal(70001, 2, seed=3), RATE, subtype="PCM_16")
    reader = audio.AudioReader(path)
    whole = reader.read()
    blocks = list(reader.blocks(block_frames=4096))
    assert [b.shape[1] for b in blocks[:-1]] == [4096] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole)
    for start, frames in [(0, 1), (4095, 2), (12345, 30000), (70000, 10)]:
        np.testing.assert_array_equal(
            reader.read(start, frames), whole[:, start : start + frames][:, :frames]
        )


def test_channel_policies_on_six_channels(tmp_path):
    path = tmp_path / "six.wav"
    sf.write(path, _signal(1000, 6), RATE, subtype="PCM_16")
    truth = sf.read(path, dtype="int16")[0].T.astype(np.int64)
    np.testing.assert_array_equal(audio.read(path), truth[:2])
    np.testing.assert_array_equal(audio.read(path, channels="pick:3,5"), truth[[3, 5]])
    down = np.rint((truth[[0, 1]] + truth[[4, 5]]) / 2)
    np.testing.assert_array_equal(audio.read(path, channels="downmix"), down)


def test_mono_is_duplicated_or_skipped(tmp_path):
    path = tmp_path / "mono.flac"
    sf.write(path, _signal(1000, 1), RATE, subtype="PCM_16")
    got = audio.read(path)
    np.testing.assert_array_equal(got[0], got[1])
    with pytest.raises(AudioError, match="skip-mono"):
        audio.read(path, channels="skip-mono")


def test_bad_channel_policy_is_a_clear_error():
    with pytest.raises(PipelineError, match="pick:I,J"):
        audio.ChannelPolicy.parse("left-only")


def test_pick_beyond_channel_count_is_rejected(tmp_path):
    path = tmp_path / "st.wav"
    sf.write(path, _signal(100, 2), RATE, subtype="PCM_16")
    with pytest.raises(AudioError, match="needs 4 channels"):
        audio.AudioReader(path, channels="pick:0,3")


def test_resampling_matches_one_shot_soxr_and_slices_agree(tmp_path):
    path = tmp_path / "hi.wav"
    sf.write(path, _signal(48000, 2, seed=5, peak=0.5), 48000, subtype="PCM_16")
    reader = audio.AudioReader(path, sample_rate=44100)
    whole = reader.read()
    assert whole.shape == (2, 44100)
    data = sf.read(path, dtype="int16")[0].astype(np.float64) / 32768
    one_shot = soxr.resample(data, 48000, 44100, quality="VHQ")
    reference = np.clip(np.rint(one_shot * 32768), -32768, 32767).T
    assert np.abs(whole - reference).max() <= 1
    np.testing.assert_array_equal(reader.read(1000, 5000), whole[:, 1000:6000])
    small = np.concatenate(list(reader.blocks(block_frames=3000)), axis=1)
    np.testing.assert_array_equal(small, whole)


def test_extensions_match_without_case():
    assert audio.is_audio_path("x/Song.WAV") and audio.is_audio_path("a.Flac")
    assert audio.is_audio_path("b.AIF") and audio.is_audio_path("c.opus")
    assert not audio.is_audio_path("notes.txt") and not audio.is_audio_path("wav")

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.errors import PipelineError
from pipeline.synth import make_corpus, synth_mixture


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _by_track(paths: list[Path]) -> list[Path]:
    """Paths in track order (Synth 001, 002, ...), whatever their split folder."""
    return sorted(paths, key=lambda p: p.parent.name)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    # 6 tracks: every format, the float WAV (whose header libsndfile stamps with the time) included
    kwargs = dict(tracks=6, seconds=0.5, sample_rate=16000)
    make_corpus(tmp_path / "a", seed=3, **kwargs)
    make_corpus(tmp_path / "b", seed=3, **kwargs)
    make_corpus(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_digests(tmp_path / name) for name in "abc")
    assert len(a) == 6
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_rewriting_a_corpus_in_place_gives_the_same_bytes_and_no_leftovers(tmp_path):
    make_corpus(tmp_path, tracks=3, seconds=0.3, sample_rate=8000)
    before = _digests(tmp_path)
    paths = make_corpus(tmp_path, tracks=3, seconds=0.3, sample_rate=8000)
    assert _digests(tmp_path) == before
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == list(before)


def test_float_wav_carries_no_wall_clock_timestamp(tmp_path):
    paths = _by_track(make_corpus(tmp_path, tracks=6, seconds=0.2, sample_rate=8000))
    assert sf.info(paths[5]).subtype == "FLOAT"
    head = paths[5].read_bytes()[:512]
    peak = head.index(b"PEAK")
    assert head[peak + 12 : peak + 16] == bytes(4)


def test_a_track_does_not_depend_on_the_number_of_tracks(tmp_path):
    few = _by_track(make_corpus(tmp_path / "few", tracks=2, seconds=0.3, sample_rate=8000))
    many = _by_track(make_corpus(tmp_path / "many", tracks=5, seconds=0.3, sample_rate=8000))
    for p, q in zip(few, many[:2], strict=True):
        assert p.relative_to(tmp_path / "few") == q.relative_to(tmp_path / "many")
        assert p.read_bytes() == q.read_bytes()


def test_layout_is_musdb_like_with_about_a_quarter_in_test(tmp_path):
    paths = make_corpus(tmp_path, tracks=8, seconds=0.2, sample_rate=8000)
    assert paths == sorted(paths)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == paths
    splits = [p.relative_to(tmp_path).parts[0] for p in paths]
    assert splits.count("train") == 6
    assert splits.count("test") == 2
    for p in paths:
        assert re.fullmatch(r"Synth \d{3} - \w+", p.parent.name)
        assert p.stem == "mixture"
    assert len({p.parent.name for p in paths}) == 8


@pytest.mark.parametrize(("tracks", "test_tracks"), [(1, 0), (2, 1), (3, 1), (5, 1), (6, 2)])
def test_every_corpus_of_two_or_more_tracks_has_a_test_track(tmp_path, tracks, test_tracks):
    paths = make_corpus(tmp_path, tracks=tracks, seconds=0.1, sample_rate=8000)
    assert len(paths) == tracks
    assert sum(p.relative_to(tmp_path).parts[0] == "test" for p in paths) == test_tracks


def test_three_track_corpus_is_all_16_bit(tmp_path):
    paths = make_corpus(tmp_path, tracks=3, seconds=0.2, sample_rate=8000)
    assert [sf.info(p).subtype for p in paths] == ["PCM_16"] * 3


def test_formats_cycle_over_tracks(tmp_path):
    paths = _by_track(make_corpus(tmp_path, tracks=7, seconds=0.1, sample_rate=8000))
    got = [(p.suffix, sf.info(p).format, sf.info(p).subtype) for p in paths]
    assert got == [
        (".wav", "WAV", "PCM_16"),
        (".flac", "FLAC", "PCM_16"),
        (".aiff", "AIFF", "PCM_16"),
        (".wav", "WAV", "PCM_24"),
        (".flac", "FLAC", "PCM_24"),
        (".wav", "WAV", "FLOAT"),
        (".wav", "WAV", "PCM_16"),
    ]


@pytest.mark.parametrize(("seconds", "rate"), [(0.51, 44100), (0.1234567, 8000), (1.0, 22050)])
def test_files_are_stereo_at_the_requested_rate_and_length(tmp_path, seconds, rate):
    for p in make_corpus(tmp_path, tracks=6, seconds=seconds, sample_rate=rate):
        info = sf.info(p)
        assert (info.channels, info.samplerate, info.frames) == (2, rate, round(seconds * rate))


def test_channels_are_related_but_not_identical(tmp_path):
    # Each source reaches L and R with its own pan, 0-20 sample delay and reverb tail
    for p in make_corpus(tmp_path, tracks=8, seconds=1.0, sample_rate=44100):
        audio, _ = sf.read(p)
        left, right = audio.T
        assert 0.2 < np.corrcoef(left, right)[0, 1] < 0.99, p
        assert np.max(np.abs(left - right)) > 0.05, p


def test_every_second_has_signal_and_nothing_clips(tmp_path):
    for p in make_corpus(tmp_path, tracks=6, seconds=4.0, sample_rate=8000):
        audio, rate = sf.read(p)
        seconds = audio.reshape(-1, rate, 2)
        rms = np.sqrt(np.mean(seconds**2, axis=1))
        assert rms.min() > 0.01, p  # -40 dBFS in every second of each channel
        assert 0.75 < np.max(np.abs(audio)) < 0.81, p


def test_synth_mixture_is_float64_stereo_and_deterministic():
    a = synth_mixture(np.random.default_rng(7), 1000, 8000)
    b = synth_mixture(np.random.default_rng(7), 1000, 8000)
    assert a.dtype == np.float64
    assert a.shape == (1000, 2)
    assert np.array_equal(a, b)
    assert np.max(np.abs(a)) < 1


@pytest.mark.parametrize(
    "kwargs", [dict(tracks=-1), dict(seed=-1), dict(seconds=0.0), dict(sample_rate=0)]
)
def test_invalid_arguments_raise(tmp_path, kwargs):
    with pytest.raises(PipelineError, match="make_corpus needs"):
        make_corpus(tmp_path, **kwargs)

"""trainer.data.tasks and .augment: the exact relation between input and label for every task."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.codec import get_codec, int16_to_pcm16, pcm16_to_int16
from pipeline.errors import UserError
from trainer.data import ShardDataModule
from trainer.data.augment import Augment, change_speed
from trainer.data.draws import uniform, uniforms
from trainer.data.tasks import Task, moving_sums

L = 4096


def _windows(batch: int = 4, seed: int = 0) -> np.ndarray:
    """Stereo uint16 windows of music-like signals (a few partials, moderate level)."""
    rng = np.random.default_rng(seed)
    t = np.arange(L)
    out = np.empty((batch, 2, L), np.uint16)
    for b in range(batch):
        freqs = rng.uniform(0.002, 0.05, 4)
        x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs) * 2500
        out[b, 0] = int16_to_pcm16(np.rint(x).astype(np.int16))
        out[b, 1] = int16_to_pcm16(np.rint(0.7 * x).astype(np.int16))
    return out


def _int(x: np.ndarray) -> np.ndarray:
    return pcm16_to_int16(x).astype(np.float64)


def test_denoise_input_minus_label_has_the_requested_snr():
    task = Task("denoise", L, snr_db=(12.0, 12.0))
    windows, directions = _windows(), np.array([0, 1, 0, 1])
    inputs, labels = task.pairs(windows, directions, np.arange(4))
    np.testing.assert_array_equal(labels, windows[np.arange(4), directions])
    for x, y in zip(_int(inputs), _int(labels), strict=True):
        snr = 10 * np.log10(np.sum(y**2) / np.sum((x - y) ** 2))
        assert abs(snr - 12.0) < 0.5


def test_bitdepth_input_is_the_label_requantized():
    task = Task("bitdepth", L, bits=(6, 6))
    windows = _windows()
    inputs, labels = task.pairs(windows, np.zeros(4, np.int64), np.arange(4))
    step = 2.0**10
    expected = np.clip(np.floor(_int(labels) / step + 0.5) * step, -32768, 32768 - step)
    np.testing.assert_array_equal(_int(inputs), expected)
    assert len(np.unique(_int(inputs))) <= 64


@pytest.mark.parametrize("bits", [1, 4, 8, 15, 16])
def test_bitdepth_on_every_sample_value_rounds_and_saturates(bits):
    every = np.arange(65536, dtype=np.uint16).reshape(32, 1, 2048).repeat(2, axis=1)
    inputs, labels = Task("bitdepth", 2048, bits=(bits, bits)).pairs(
        every, np.zeros(32, np.int64), np.arange(32)
    )
    step = 2 ** (16 - bits)
    expected = np.clip(np.floor(_int(labels) / step + 0.5) * step, -32768, 32768 - step)
    np.testing.assert_array_equal(_int(inputs), expected)
    assert len(np.unique(inputs)) == 2**bits


def test_codec_input_differs_same_length_and_lies_on_the_mulaw_levels():
    task = Task("codec", L, cutoff=(0.2, 0.2))
    windows = _windows()
    inputs, labels = task.pairs(windows, np.zeros(4, np.int64), np.arange(4))
    assert inputs.shape == labels.shape == (4, L) and not np.array_equal(inputs, labels)
    assert np.isin(inputs, get_codec("mulaw8").decode_table()).all()  # the lossy round trip
    snr = 10 * np.log10(np.sum(_int(labels) ** 2) / np.sum((_int(inputs) - _int(labels)) ** 2))
    assert 10 < snr < 40  # degraded, not destroyed


def test_codec_is_a_moving_average_then_the_mulaw_round_trip():
    task = Task("codec", L, cutoff=(0.2, 0.2))  # -3 dB at 0.2 x Nyquist: width 5 (0.886 / 5)
    windows = _windows()
    inputs, labels = task.pairs(windows, np.zeros(4, np.int64), np.arange(4))
    padded = np.pad(labels.astype(np.int64), ((0, 0), (2, 2)), mode="edge")
    sums = np.stack([np.convolve(row, np.ones(5, np.int64), "valid") for row in padded])
    mulaw = get_codec("mulaw8")
    np.testing.assert_array_equal(inputs, mulaw.decode(mulaw.encode((sums + 2) // 5)))
    whole_band = Task("codec", L, cutoff=(0.5, 0.5)).pairs(windows, np.zeros(4, np.int64), [0] * 4)
    np.testing.assert_array_equal(whole_band[0], mulaw.decode(mulaw.encode(labels)))


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 9, 13])
def test_moving_sums(width):
    x = np.random.default_rng(width).integers(0, 65536, 100).astype(np.int32)
    np.testing.assert_array_equal(moving_sums(x, width), np.convolve(x, np.ones(width), "valid"))


def test_uniform_is_one_draw_of_uniforms():
    seeds = np.random.default_rng(0).integers(0, 2**63, 20)
    draws = uniforms(seeds, 3, stream=1)
    assert draws.min() >= 0 and draws.max() < 1
    assert all(uniform(s, 1, k) == draws[b, k] for b, s in enumerate(seeds) for k in range(3))
    assert not np.array_equal(draws, uniforms(seeds, 3, stream=0))


@pytest.mark.parametrize("name", ["denoise", "bitdepth", "codec"])
def test_same_seeds_same_pair_and_the_seeds_decide(name):
    task, windows, directions = Task(name, L), _windows(), np.zeros(4, np.int64)
    a = task.pairs(windows, directions, np.array([1, 2, 3, 4]))[0]
    b = task.pairs(windows, directions, np.array([1, 2, 3, 4]))[0]
    np.testing.assert_array_equal(a, b)
    others = [task.pairs(windows, directions, np.arange(4) + 4 * k)[0] for k in range(1, 9)]
    distinct = len({x.tobytes() for x in [a, *others]})
    # codec draws one of a few cutoffs per batch; the others draw per window, continuously
    assert distinct >= 3 if name == "codec" else distinct == 9


def test_unknown_task_and_bad_bits_are_clear_errors():
    with pytest.raises(UserError, match="use one of channel, continuation"):
        Task("upmix")
    with pytest.raises(UserError, match="bits"):
        Task("bitdepth", bits=(0, 20))
    with pytest.raises(UserError, match="cutoff"):
        Task("codec", cutoff=(0.0, 0.5))


@pytest.mark.parametrize("name", ["denoise", "bitdepth", "codec"])
def test_the_loader_delivers_each_task_deterministically(shard_dir, name):
    dm = ShardDataModule(
        str(shard_dir), seq_len=1024, batch_size=4, num_workers=0, task=name, seed=2
    )
    stream = dm.train_stream()
    a = next(iter(stream.batches(0, 0, 0)))
    b = next(iter(dm.train_stream().batches(0, 0, 0)))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], a["targets"])
    assert a["inputs"].shape == a["targets"].shape == (4, 1024)
    val = list(dm.val_dataloader())
    again = list(dm.val_dataloader())
    assert all(
        np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(val, again, strict=True)
    )


def test_augmentations_repeat_under_a_seed_and_differ_under_another():
    aug = Augment(gain_p=1, polarity_p=0.5, swap_p=0.5, noise_p=1, speed_p=1)
    windows = _windows(seed=3)
    read = aug.read_frames(L - 512)
    a = aug(windows[:, :, :read], np.array([1, 2, 3, 4]), L - 512)
    b = aug(windows[:, :, :read], np.array([1, 2, 3, 4]), L - 512)
    c = aug(windows[:, :, :read], np.array([9, 8, 7, 6]), L - 512)
    assert a.shape == (4, 2, L - 512)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_gain_never_wraps_int16():
    loud = np.full((2, 1000), 30000, np.int16)
    loud[:, ::2] = -30000
    out = Augment(gain_p=1, gain_db=(12.0, 12.0)).one(loud, 0, 1000)
    assert out.max() <= 32767 and out.min() >= -32768
    assert np.all(np.sign(out) == np.sign(loud))  # clipped to full scale, never wrapped
    assert np.abs(out).max() == 32767


def test_speed_changes_the_length_and_pitch_by_the_factor_before_cropping():
    x = np.sin(2 * np.pi * 0.01 * np.arange(48000))[None].repeat(3, 0)
    for factor in (0.8, 1.25):
        y = change_speed(x, factor)
        assert y.shape[1] == round(48000 / factor)  # factors on the 1/200 grid are exact
        peak = np.argmax(np.abs(np.fft.rfft(y[1, 1000:-1000])))
        assert abs(peak / (y.shape[1] - 2000) - 0.01 * factor) < 1e-4
    aug = Augment(speed_p=1, speed=(1.1, 1.1))
    assert aug.read_frames(1000) >= 1100
    out = aug.one(np.zeros((2, aug.read_frames(1000)), np.int16), 0, 1000)
    assert out.shape == (2, 1000)


def test_speed_change_resamples_each_row_as_if_alone():
    x = np.random.default_rng(0).standard_normal((5, 3000)) * 1000
    together = change_speed(x, 1.07)
    for row in range(5):
        alone = change_speed(x[row : row + 1], 1.07)[0]
        # after soxr's first few output samples (a start-up transient of its own)
        np.testing.assert_allclose(together[row, 4:], alone[4:], atol=0.05)


def test_polarity_and_swap_are_exact():
    x = pcm16_to_int16(_windows(1)[0])
    flip = Augment(polarity_p=1).one(x, 0, L)
    np.testing.assert_array_equal(flip, np.clip(-x.astype(np.int32), -32768, 32767))
    swap = Augment(swap_p=1).one(x, 0, L)
    np.testing.assert_array_equal(swap, x[::-1])


def test_the_loader_augments_train_only(shard_dir):
    plain = ShardDataModule(str(shard_dir), seq_len=1024, batch_size=4, num_workers=0)
    noisy = ShardDataModule(
        str(shard_dir),
        seq_len=1024,
        batch_size=4,
        num_workers=0,
        augment={"noise_p": 1.0, "speed_p": 0.5, "speed": [0.9, 1.1]},
    )
    assert noisy.read_frames == Augment(speed_p=0.5).read_frames(1024)
    a = next(iter(noisy.train_stream().batches(0, 0, 0)))
    assert a["inputs"].shape == (4, 1024)
    clean_val = next(iter(plain.val_dataloader()))
    noisy_val = next(iter(noisy.val_dataloader()))
    assert np.array_equal(clean_val["input_ids"], noisy_val["input_ids"])


def test_a_speed_rounded_up_to_the_grid_still_reads_enough_frames():
    augment = Augment(speed_p=1.0, speed=(1.0026, 1.0026))  # resampled at 201/200
    frames = 2048
    assert augment.read_frames(frames) >= math.ceil(frames * 201 / 200)

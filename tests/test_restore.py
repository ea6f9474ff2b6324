"""The estimate head and the three restoration modes: on synthetic stereo whose target is a
known nonlinear function of the input plus a little noise (so no linear filter reaches it), a
tiny trained model's estimate beats the least-squares filter fitted on the same data, its
repair comes close to the function, repair leaves every known sample as it was, seams stay
within the truth's steps, and render's level follows the truth's over a long signal."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from pipeline.codec import get_codec, int16_to_pcm16
from tests.conftest import TINY_MODEL
from trainer.data import ShardDataModule
from trainer.evaluation import EvaluationError
from trainer.evaluation.baselines import fir_apply, lagged, ls_fir, snr_db, to_int16
from trainer.evaluation.gaps import (
    detect_gaps,
    draw_gaps,
    merge_gaps,
    parse_gaps,
    read_gaps_file,
    seam_steps,
)
from trainer.evaluation.restore import default_overlap, estimate_range, fit_gap, render, repair
from trainer.model import StereoT5
from trainer.model.estimator import Estimate, Estimator, correction_weight, unit_samples
from trainer.model.estimator import lagged as torch_lagged

LENGTH = 256
RATE = 16000
CODEC = get_codec("pcm16")


def signal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low-passed noise whose level wanders over the signal (float, peak about 1)."""
    kernel = np.hanning(16) / np.hanning(16).sum()
    s = np.convolve(rng.standard_normal(n + 64), kernel, "valid")[:n]
    phase = np.linspace(0, rng.uniform(2, 6), n) + rng.uniform(0, 6)
    return s / s.std() * 0.25 * (0.3 + 0.7 * np.abs(np.sin(phase)))


def pair(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 input and target: target = 0.4 tanh(3 x) - 0.6 x^2 + noise (an even part that no
    linear filter of x can predict)."""
    x = signal(rng, n)
    y = 0.4 * np.tanh(3 * x) - 0.6 * x**2 + 0.005 * rng.standard_normal(n)
    return to_int16(x * 32767), to_int16(np.clip(y, -1, 1) * 32767)


def tokens(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(CODEC.encode(int16_to_pcm16(x)).astype(np.int64))


@pytest.fixture(scope="module")
def trained() -> StereoT5:
    """A tiny model whose estimate head trained 300 steps on the synthetic pairs with its loss
    (it reads the encoder detached: the body stays as initialised). The spread starts at the
    input's level and this target's error is about a tenth of it: its layer gets a larger step
    so that 300 steps get there."""
    torch.manual_seed(0)
    model = StereoT5(**TINY_MODEL, max_len=LENGTH, head="logistic", estimate={"weight": 1.0})
    spread = list(model.estimator.spread.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in spread)]
    opt = torch.optim.Adam([{"params": rest}, {"params": spread, "lr": 3e-2}], lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        xs, ys = zip(*(pair(rng, LENGTH) for _ in range(8)), strict=True)
        ids, labels = tokens(np.stack(xs)), tokens(np.stack(ys))
        x, y = unit_samples(ids, model.int16_of_token), unit_samples(labels, model.int16_of_token)
        enc, _ = model(ids, None)
        keep = torch.ones_like(labels, dtype=torch.bool)
        loss = Estimator.loss(model.estimator(enc, x), y, keep).loss()
        model.estimator.observe(x, y, keep)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def fit(model: StereoT5, shard_dir, steps: int, **options) -> pl.Trainer:
    """`steps` training steps of `model` on the fixture shards (batches of 2 windows)."""
    data = ShardDataModule(
        str(shard_dir), seq_len=LENGTH, batch_size=2, num_workers=0, batches_per_epoch=steps
    )
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **options,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return trainer


def test_lagged_columns_are_the_baselines_taps():
    x = np.random.default_rng(0).standard_normal((2, 50))
    ours = torch_lagged(torch.from_numpy(x), 32).numpy()
    for row in range(2):
        np.testing.assert_array_equal(ours[row], lagged(x[row], np.arange(-16, 16)))


def test_static_filter_is_least_squares_over_the_observed_windows():
    rng = np.random.default_rng(1)
    est = Estimator(8, taps=32)
    xs, ys = zip(*(pair(rng, 300) for _ in range(3)), strict=True)
    x = torch.from_numpy(np.stack(xs) / 32768.0)
    y = torch.from_numpy(np.stack(ys) / 32768.0)
    est.observe(x, y, torch.ones_like(x, dtype=torch.bool))
    # the baseline's filter over the same windows (each zero-padded at its ends)
    design = np.concatenate([lagged(row, np.arange(-16, 16)) for row in x.numpy()])
    want, *_ = np.linalg.lstsq(design, y.numpy().ravel(), rcond=None)
    np.testing.assert_allclose(est.linear_filter().numpy(), want, rtol=1e-4, atol=1e-6)
    out = est(torch.zeros(3, 300, 8), x.float())
    torch.testing.assert_close(out.mean, out.linear)  # untrained: the filter alone


def test_trained_estimate_beats_the_least_squares_filter_on_a_nonlinear_channel(trained):
    x, y = pair(np.random.default_rng(5), 8 * LENGTH)
    h = ls_fir(x, y, 32)  # fitted on the very signal scored: the best any such filter does
    est = estimate_range(trained, CODEC, x, LENGTH, default_overlap(LENGTH), 4)
    model_db, filter_db = snr_db(y, to_int16(est.mean)), snr_db(y, fir_apply(x, h))
    assert model_db > filter_db + 1.0, (model_db, filter_db)


def test_estimate_is_deterministic_and_a_range_equals_the_whole(trained):
    x, _ = pair(np.random.default_rng(6), 5 * LENGTH + 77)
    overlap = default_overlap(LENGTH)
    whole = estimate_range(trained, CODEC, x, LENGTH, overlap, 3)
    again = estimate_range(trained, CODEC, x, LENGTH, overlap, 3)
    np.testing.assert_array_equal(whole.mean, again.mean)
    # frames 300..900 from only the input their windows read, batched otherwise
    first, stop, offset = 300, 900, 192 - LENGTH + 64  # the window at 64 is the first needed
    part = estimate_range(
        trained, CODEC, x[offset:], LENGTH, overlap, 2, first=first, stop=stop, offset=offset
    )
    np.testing.assert_allclose(part.mean, whole.mean[first:stop], rtol=0, atol=1e-3)


def test_windows_join_within_the_truths_steps(trained):
    x, y = pair(np.random.default_rng(7), 12 * LENGTH)
    overlap = default_overlap(LENGTH)
    out = to_int16(estimate_range(trained, CODEC, x, LENGTH, overlap, 4).mean)
    hop = LENGTH - overlap
    edges = [(s, s) for s in range(hop, len(x) - LENGTH, hop)]  # every window's start
    edges += [(s + LENGTH, s + LENGTH) for s in range(0, len(x) - LENGTH, hop)]  # and end
    steps = seam_steps(out, y, edges, RATE)
    assert steps and all(step <= bound for step, bound in steps)


def test_repair_keeps_known_samples_and_comes_close_to_the_function(trained):
    x, y = pair(np.random.default_rng(8), RATE)
    gaps = [(3000, 4600), (9000, 9800)]
    damaged = y.copy()
    missing = np.zeros(len(y), bool)
    for a, b in gaps:
        damaged[a:b] = 0
        missing[a:b] = True
    est = estimate_range(trained, CODEC, x, LENGTH, default_overlap(LENGTH), 8)
    out = repair(x, damaged, gaps, est.mean, RATE)
    np.testing.assert_array_equal(out[~missing], y[~missing])
    assert all(step <= bound for step, bound in seam_steps(out, y, gaps, RATE))
    for a, b in gaps:
        baseline = fit_gap(x, damaged, (a, b), missing, RATE).inside
        ours, theirs = snr_db(y[a:b], out[a:b]), snr_db(y[a:b], baseline)
        assert ours > theirs + 1.0 and ours > 10.0, (ours, theirs)


def test_render_level_follows_the_truth_over_a_long_signal(trained):
    x, y = pair(np.random.default_rng(9), 40 * LENGTH)
    est = estimate_range(trained, CODEC, x, LENGTH, default_overlap(LENGTH), 8)
    out = render(est, 1.0, np.random.default_rng(0))
    at_full_scale = np.abs(out.astype(np.int32)) >= 32767
    edges = np.flatnonzero(np.diff(np.r_[0, at_full_scale.astype(np.int8), 0]))
    longest = int((edges[1::2] - edges[::2]).max(initial=0))
    assert longest < RATE // 1000  # a noise peak may clip a sample; a runaway would stay there
    for start in range(0, len(y), LENGTH):
        truth = np.square(y[start : start + LENGTH].astype(np.float64)).mean()
        level = np.square(out[start : start + LENGTH].astype(np.float64)).mean()
        assert abs(10 * np.log10(level / truth)) <= 3.0
    again = render(est, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)


def test_gaps_from_a_spec_a_file_and_detection_merge_in_frames(tmp_path):
    assert parse_gaps("0.5:0.75, 2:2.5", 1000) == [(500, 750), (2000, 2500)]
    (tmp_path / "gaps.txt").write_text("# dropouts\n1 1.25\n\n3:3.5  # a click\n")
    assert read_gaps_file(tmp_path / "gaps.txt", 1000) == [(1000, 1250), (3000, 3500)]
    assert merge_gaps([(40, 60), (10, 20), (15, 30), (90, 120)], 100) == [
        (10, 30),
        (40, 60),
        (90, 100),
    ]
    with pytest.raises(EvaluationError, match="past the track's 100 frames"):
        merge_gaps([(100, 120)], 100)
    with pytest.raises(EvaluationError, match=r"gaps.txt:2: '1 x' is not START:END"):
        (tmp_path / "gaps.txt").write_text("1 2\n1 x\n")
        read_gaps_file(tmp_path / "gaps.txt", 1000)


def test_detection_finds_silence_and_flat_lines_in_the_target_only_where_the_input_moves():
    rng = np.random.default_rng(3)
    x = rng.integers(-9000, 9000, 4000).astype(np.int16)
    y = rng.integers(-9000, 9000, 4000).astype(np.int16)
    y[1000:1200] = 0  # digital silence
    y[2000:2100] = 1234  # a flat line
    y[3000:3005] = 7  # too short to be a dropout (10 ms at 1 kHz is 10 frames)
    x[3500:3700] = 0
    y[3500:3700] = 0  # both channels silent: the music's own silence
    assert detect_gaps(x, y, 1000) == [(1001, 1200), (2001, 2100)]


def test_drawn_gaps_are_disjoint_in_range_and_seeded():
    first = draw_gaps(10 * RATE, RATE, 4, np.random.default_rng(0), 0.1, 1.0)
    assert first == draw_gaps(10 * RATE, RATE, 4, np.random.default_rng(0), 0.1, 1.0)
    assert len(first) == 4
    for (a, b), (c, _) in zip(first, [*first[1:], (10 * RATE, 0)], strict=True):
        assert 0.1 * RATE <= b - a <= RATE and a >= RATE // 2 and b <= c
    assert draw_gaps(RATE // 10, RATE, 4, np.random.default_rng(0), 0.1, 1.0) == []


def test_the_estimate_head_leaves_the_teacher_forced_model_as_it_was():
    torch.manual_seed(0)
    plain = StereoT5(**TINY_MODEL, max_len=LENGTH, head="logistic")
    torch.manual_seed(0)
    with_head = StereoT5(**TINY_MODEL, max_len=LENGTH, head="logistic", estimate={})
    theirs = plain.state_dict()
    ours = {k: v for k, v in with_head.state_dict().items() if not k.startswith("estimator.")}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the seed drew the same weights
    x, y = pair(np.random.default_rng(4), 2 * LENGTH)
    ids, labels = tokens(x.reshape(2, LENGTH)), tokens(y.reshape(2, LENGTH))
    with torch.no_grad():
        scored = with_head.score(ids, labels)
        torch.testing.assert_close(scored["nll"], plain.score(ids, labels)["nll"])
    assert scored["estimate"] is not None and plain.score(ids, labels)["estimate"] is None


def test_training_with_the_estimate_head_leaves_every_other_weight_as_without_it(shard_dir):
    """Three clipped steps with and without the head: the same body and head, to the bit (its
    states are read detached, its layers draw nothing from the seed, its gradients are clipped
    apart)."""
    trained, initial = [], None
    for estimate in (None, {"weight": 1.0}):
        torch.manual_seed(0)
        model = StereoT5(**TINY_MODEL, max_len=LENGTH, head="coarse_fine", estimate=estimate)
        initial = initial or {k: v.clone() for k, v in model.state_dict().items()}
        fit(model, shard_dir, 3, gradient_clip_val=0.05, limit_val_batches=0)
        trained.append(model.state_dict())
    plain, with_head = trained
    assert any(not torch.equal(v, initial[k]) for k, v in plain.items())  # it did train
    for key, value in plain.items():
        assert torch.equal(value, with_head[key]), key


def test_the_correction_weight_is_least_squares_on_held_out_sums():
    rng = np.random.default_rng(8)
    shape = (2, 500)
    linear = torch.from_numpy(rng.standard_normal(shape))
    correction = torch.from_numpy(rng.standard_normal(shape))
    noise = torch.from_numpy(rng.standard_normal(shape))
    keep = torch.ones(shape, dtype=torch.bool)

    def weight(y: torch.Tensor, c: torch.Tensor) -> float:
        est = Estimate(linear + c, torch.zeros(shape, dtype=torch.float64), linear)
        sums = Estimator.loss(est, y, keep)
        return float(correction_weight(sums.correction_cross, sums.correction_energy))

    y = linear + 0.3 * correction + noise
    # the weight numpy's least squares gives the correction on y's error from the linear part
    want = float(np.linalg.lstsq(correction.reshape(-1, 1), (y - linear).ravel(), rcond=None)[0])
    assert weight(y, correction) == pytest.approx(want, rel=1e-9) and 0 < want < 1
    assert weight(linear - correction, correction) == 0.0  # a correction that hurts is left out
    assert weight(linear + 2 * correction, correction) == 1.0  # never past the trained one
    assert weight(y, torch.zeros(shape, dtype=torch.float64)) == 1.0  # nothing to weigh


def test_the_estimate_takes_the_correction_at_its_weight_and_old_checkpoints_load_at_one(trained):
    x, _ = pair(np.random.default_rng(9), 3 * LENGTH)
    ids = tokens(x[: 2 * LENGTH].reshape(2, LENGTH))
    blend = trained.estimator.blend.clone()
    try:
        whole = trained.estimate(ids)
        trained.estimator.blend.fill_(0.0)
        none = trained.estimate(ids)
        trained.estimator.blend.fill_(0.25)
        quarter = trained.estimate(ids)
    finally:
        trained.estimator.blend.copy_(blend)
    assert not torch.allclose(whole.mean, whole.linear)  # it learned a correction
    torch.testing.assert_close(none.mean, none.linear)
    torch.testing.assert_close(quarter.mean, whole.linear + 0.25 * (whole.mean - whole.linear))
    state = {k: v for k, v in trained.state_dict().items() if k != "estimator.blend"}
    fresh = StereoT5(**TINY_MODEL, max_len=LENGTH, head="logistic", estimate={"weight": 1.0})
    fresh.estimator.blend.fill_(0.0)
    fresh.load_state_dict(state, strict=True)
    assert float(fresh.estimator.blend) == 1.0


def test_each_validation_sets_the_corrections_weight_from_its_own_sums(shard_dir):
    torch.manual_seed(0)
    model = StereoT5(**TINY_MODEL, max_len=LENGTH, head="logistic", estimate={"weight": 1.0})
    model.estimator.blend.fill_(-1.0)  # no weight a validation can give
    trainer = fit(model, shard_dir, 4, limit_val_batches=2, num_sanity_val_steps=0)
    logged = float(trainer.callback_metrics["val/estimate_blend"])
    assert 0.0 <= logged <= 1.0
    assert float(model.estimator.blend) == pytest.approx(logged, abs=1e-7)

"""The logistic mixture head (trainer/logistic.py) inside StereoT5."""

from __future__ import annotations

import math

import pytest
import torch
from test_model import fit_one_batch, loader, make_batch, teacher_forced, tiny

from trainer.model import ModelError, StereoT5
from trainer.model.heads import LogisticOptions
from trainer.model.heads.logistic import LogisticHead
from trainer.model.heads.predictor import Track

LOGISTIC = dict(codec="pcm16", head=LogisticOptions(order=4, taps=2, refit_every=4), align=True)


def smooth_batch(batch: int = 3, length: int = 48, seed: int = 0) -> dict:
    """Sine-like 16-bit target and a scaled copy as input: what the head is built for."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64)
    freq = 0.05 + 0.2 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    amp = 2000 + 8000 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    wave = amp * torch.sin(freq * t) + 20 * torch.randn(batch, length, generator=g).double()
    labels = (wave.round() + 32768).long()
    input_ids = ((0.7 * wave).round() + 32768).long()
    labels[-1, length * 3 // 4 :] = -100
    return dict(input_ids=input_ids, labels=labels, direction=torch.zeros(batch, dtype=torch.long))


@pytest.mark.parametrize("levels", [256, 65536])
def test_probabilities_over_all_levels_sum_to_one_and_bits_are_their_log(levels):
    torch.manual_seed(0)
    head = LogisticHead(16, levels, LogisticOptions(mixtures=3, order=4, taps=1))
    with torch.no_grad():
        head.net[2].weight.normal_(std=0.5)  # a trained-looking, uneven mixture
    states, n_feats = 4, head.predictor.n_features - 1
    hidden = torch.randn(states, 16)
    final = (torch.rand(states, dtype=torch.float64) - 0.5) * levels  # edges included
    # the earlier stages' predictions, which the mixture moves the means towards
    candidates = final[:, None] + torch.randn(states, head.mixed, dtype=torch.float64) * 100
    feats = torch.cat(
        [
            torch.rand(states, n_feats, dtype=torch.float64) * 3,
            torch.tensor([[0.0], [3], [50], [1e4]]),
        ],
        -1,
    )
    assert head.mixed == 2  # the default cascade has two stages: two earlier predictions
    with torch.no_grad():
        logits, means, scales = head.mixture(hidden, Track(final, candidates, feats))
        y = torch.arange(levels, dtype=torch.float64) - levels // 2
        log_p = head.log_prob(
            logits[:, None], means[:, None], scales[:, None], y.expand(states, -1)
        )
    probs = log_p.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(states, dtype=torch.float64), atol=1e-4)
    # bits = -log2 of that probability: the head's NLL at a level equals -log of the same entry
    with torch.no_grad():
        for level in (0, levels // 3, levels - 1):
            one = head.log_prob(logits, means, scales, torch.full((states,), level - levels // 2))
            assert torch.allclose(-one / math.log(2), -log_p[:, level] / math.log(2))


def test_score_bits_are_minus_log2_of_the_head_probability():
    model = tiny(**LOGISTIC).eval()
    batch = smooth_batch()
    with torch.no_grad():
        scored = teacher_forced(model, batch)
        _, hidden = model(batch["input_ids"], batch["labels"])
        track, _ = model.head.track(batch["labels"], batch["input_ids"])
        logits, means, scales = model.head.mixture(hidden, track)
    keep = batch["labels"] != -100
    b, t = 0, 17
    level = int(batch["labels"][b, t])
    y = torch.arange(65536, dtype=torch.float64) - 32768
    probs = model.head.log_prob(logits[b, t], means[b, t], scales[b, t], y[:, None]).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert scored["nll"][b, t].item() == pytest.approx(-math.log(probs[level].item()), rel=1e-5)
    assert scored["count"] == keep.sum() and torch.all(scored["nll"][~keep] == 0)


def test_logistic_head_is_causal_in_the_target():
    model = tiny(**LOGISTIC).eval()
    batch = smooth_batch(length=40)
    for t in (3, 4, 21):  # inside a predictor block, at its first sample, later
        changed = batch["labels"].clone()
        changed[:, t] = (changed[:, t] + 4321) % 65536
        with torch.no_grad():
            before = teacher_forced(model, batch)["nll"]
            after = model.score(batch["input_ids"], changed)["nll"]
        assert torch.equal(before[:, :t], after[:, :t]), t
        assert not torch.equal(before[:, t:], after[:, t:])


def test_logistic_head_starts_as_the_fixed_predictor_and_overfits_one_batch():
    model = tiny(**LOGISTIC, lr=3e-3)
    batch = smooth_batch(length=32)
    track, _ = model.head.track(batch["labels"], batch["input_ids"])
    lpc = track.candidates[..., 0]  # the least-squares stage
    x = batch["labels"][:, :3].double() - 32768
    assert torch.allclose(lpc[:, 2], 2 * x[:, 1] - x[:, 0], atol=1e-3)  # no history yet
    losses = fit_one_batch(model, batch, 60)
    assert losses[-1] < 0.7 * losses[0], losses


def test_untrained_bits_are_the_head_at_step_0_and_do_not_move_with_training():
    model = tiny(**LOGISTIC, lr=3e-3)
    batch = smooth_batch(length=32)
    with torch.no_grad():
        before = teacher_forced(model.eval(), batch)
    assert torch.equal(before["untrained_nll_sum"], before["nll_sum"])  # one thing at step 0
    fit_one_batch(model.train(), batch, 20)
    with torch.no_grad():
        after = teacher_forced(model.eval(), batch)
    assert torch.equal(after["untrained_nll_sum"], before["untrained_nll_sum"])
    assert after["nll_sum"] < 0.9 * before["nll_sum"]


def test_validation_logs_the_untrained_head_beside_the_model(tmp_path):
    import pytorch_lightning as pl

    model = tiny(**LOGISTIC, lr=3e-3)
    batches = [smooth_batch(seed=s) for s in range(2)]
    with torch.no_grad():
        model.head.net[2].weight.normal_(std=0.1)  # as if trained: the two now differ
        scored = [teacher_forced(model.eval(), b) for b in batches]
    count = sum(s["count"] for s in scored)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    metrics = trainer.validate(model, dataloaders=loader(batches), verbose=False)[0]
    for name, key in (
        ("val/bits_per_sample", "nll_sum"),
        ("val/bits_per_sample_untrained", "untrained_nll_sum"),
    ):
        expected = sum(s[key].double() for s in scored) / count / math.log(2)
        assert metrics[name] == pytest.approx(expected.item(), rel=1e-5), name
    assert metrics["val/bits_per_sample"] != pytest.approx(metrics["val/bits_per_sample_untrained"])


def test_logistic_head_save_load_and_bad_combinations(tmp_path):
    model = tiny(**LOGISTIC).eval()
    folder = model.save_pretrained(tmp_path / "export")
    loaded = StereoT5.from_pretrained(folder)
    assert loaded.head_kind == "logistic"
    batch = smooth_batch()
    with torch.no_grad():
        a, b = teacher_forced(model, batch), teacher_forced(loaded, batch)
    assert torch.equal(a["nll"], b["nll"]) and torch.equal(a["pred"], b["pred"])
    for kwargs, match in [
        (dict(residual=True), "residual: false"),
        (dict(patch_size=8, local_d=16, local_layers=1, local_heads=2), "patch_size: 1"),
        (
            dict(head={"class_path": "LogisticOptions", "init_args": {"mixtures": 0}}),
            "mixtures >= 1",
        ),
        (dict(head={"class_path": "LogisticOptions", "init_args": {"forget": 1.5}}), "forget"),
    ]:
        with pytest.raises(ModelError, match=match) as e:
            tiny(**{**LOGISTIC, **kwargs})
        assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="set head: logistic"):
        tiny(codec="pcm16", head="coarse_fine", init_from=str(folder))


def test_logistic_head_on_a_small_codec_and_random_tokens():
    model = tiny(codec="mulaw8", head="logistic").eval()
    batch = make_batch(256)
    with torch.no_grad():
        scored = teacher_forced(model, batch)
    assert torch.isfinite(scored["nll"]).all() and scored["nll_sum"] > 0
    assert int(scored["pred"].min()) >= 0 and int(scored["pred"].max()) < 256

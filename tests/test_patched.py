"""The patched encoder / two-level decoder (patch_size > 1) and the residual parametrization:
causality, overfitting, export, clear errors (generation agreeing with scoring: test_model)."""

from __future__ import annotations

import pytest
import torch
from test_model import PATCH, fit_one_batch, make_batch, teacher_forced, tiny

from trainer.model import ModelError, StereoT5
from trainer.model.tokens import from_residual, to_residual


def patched(**kwargs) -> StereoT5:
    return tiny(**{**PATCH, **kwargs})


@pytest.mark.parametrize("head", ["coarse_fine", "full"])
def test_changing_sample_t_changes_nothing_up_to_t(head):
    """Perturb one target sample, including at patch boundaries: every state up to t (they see
    samples < t) stays, so every distribution before t and, for coarse_fine, the high-byte
    distribution at t stay; the change reaches t + 1."""
    codec = "pcm16" if head == "coarse_fine" else "mulaw8"
    model = patched(codec=codec, head=head, align=True).eval()
    batch = make_batch(model.levels, length=32)
    labels = batch["labels"]
    labels[-1] = labels[0]  # no ignored tail: every position counts here
    for t in (0, 6, 7, 8, 9, 15, 16, 30):
        changed = labels.clone()
        changed[:, t] = (changed[:, t] + 101) % model.levels
        with torch.no_grad():
            _, before = model(batch["input_ids"], labels)
            _, after = model(batch["input_ids"], changed)
            nll_before = model.score(batch["input_ids"], labels)["nll"]
            nll_after = model.score(batch["input_ids"], changed)["nll"]
        assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6), t
        assert torch.allclose(nll_before[:, :t], nll_after[:, :t], atol=1e-6), t
        if head == "coarse_fine":
            high = model.head.high
            assert torch.equal(high(before[:, t]), high(after[:, t])), t
        assert not torch.allclose(before[:, t + 1], after[:, t + 1]), t


def test_residuals_are_a_bijection_that_leaves_pad_and_ignored_positions():
    levels = 65536
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, levels, (3, 50), generator=g)
    tokens[0, :5] = torch.tensor([0, 65535, 0, 32768, 1])  # wrap-arounds both ways
    residuals = to_residual(tokens, levels)
    assert residuals[0, :5].tolist() == [0, 32767, 32769, 0, 1]
    previous = torch.cat([torch.full((3, 1), -100), tokens[:, :-1]], 1)
    assert torch.equal(from_residual(residuals, previous, levels), tokens)
    masked = tokens.clone()
    masked[1, 10:] = -100
    masked[2, -3:] = levels  # pad
    out = to_residual(masked, levels)
    assert (out[1, 10:] == -100).all() and (out[2, -3:] == levels).all()
    assert torch.equal(out[:, :10], residuals[:, :10])


def test_tiny_patched_model_overfits_one_batch():
    model = patched(codec="mulaw8", head="full", d_model=64, d_ff=128, lr=3e-3)
    losses = fit_one_batch(model, make_batch(256, batch=4, length=32), 60)
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = patched(codec="pcm16", head="coarse_fine", align=True).eval()
    folder = model.save_pretrained(tmp_path / "export")
    loaded = StereoT5.from_pretrained(folder)
    assert loaded.patch is not None and loaded.patch_size == PATCH["patch_size"]
    batch = make_batch(65536, length=32)
    with torch.no_grad():
        a, b = teacher_forced(model, batch), teacher_forced(loaded, batch)
    assert torch.equal(a["nll"], b["nll"]) and torch.equal(a["pred"], b["pred"])
    tokens_a, _ = model.generate(batch["input_ids"][:, :16])
    tokens_b, _ = loaded.generate(batch["input_ids"][:, :16])
    assert torch.equal(tokens_a, tokens_b)


def test_patched_weights_do_not_load_into_a_per_sample_model(tmp_path):
    folder = patched(codec="pcm16").save_pretrained(tmp_path / "export")
    with pytest.raises(ModelError, match="patch_size"):
        tiny(codec="pcm16", init_from=str(folder))


def test_window_not_a_multiple_of_the_patch_is_a_clear_error():
    with pytest.raises(ModelError, match="not a multiple of patch_size 8"):
        patched(max_len=60)
    model = patched()
    batch = make_batch(65536, length=20)
    with pytest.raises(ModelError, match="not a multiple of patch_size 8"):
        teacher_forced(model, batch)


def test_residual_weights_do_not_load_into_a_level_model(tmp_path):
    folder = tiny(codec="pcm16", residual=True).save_pretrained(tmp_path / "export")
    with pytest.raises(ModelError, match="set residual: true"):
        tiny(codec="pcm16", init_from=str(folder))
    assert tiny(codec="pcm16", residual=True, init_from=str(folder)).residual

"""Context beyond the body's window: the logistic head's predictor runs over the whole sequence
(the body attends within ``body_window``) and carries its state from one call to the next."""

from __future__ import annotations

import pytest
import torch
from test_logistic import smooth_batch
from test_model import tiny

from trainer.model import ModelError
from trainer.model.heads import LogisticOptions
from trainer.model.weights import current_hparams

# refit every 8, NLMS stages of 16 and 4 taps; the body attends within windows of 32 samples
OPTIONS = LogisticOptions(2, 6, 3, 8, 0.85, cascade=[16, 4], cascade_mu=[0.05, 0.1])
CONTEXT = dict(codec="pcm16", head=OPTIONS, align=True, max_len=128, body_window=32)
LENGTH = 128


def trained_looking(**kwargs):
    """A tiny context model whose head depends on the decoder state and mixes its candidates."""
    model = tiny(**{**CONTEXT, **kwargs})
    with torch.no_grad():
        model.head.net[2].weight.normal_(std=0.05)
        model.head.from_state.weight.normal_(std=0.05)
    return model.eval()


def test_perturbing_sample_t_changes_nothing_at_or_before_t_across_windows_and_calls():
    model = trained_looking()
    batch = smooth_batch(batch=2, length=LENGTH)
    ids, labels = batch["input_ids"], batch["labels"]
    for t in (20, 40, 95):  # inside the first body window, at the start of another, late
        changed = labels.clone()
        changed[:, t] = (changed[:, t] + 4321) % 65536
        with torch.no_grad():
            before, after = model.score(ids, labels), model.score(ids, changed)
            # the same across two calls, the state carried at sample 64
            first = model.score(ids[:, :64], changed[:, :64], None, ids[:, 64:])
            second = model.score(ids[:, 64:], changed[:, 64:], first["state"])
        assert torch.equal(before["nll"][:, :t], after["nll"][:, :t]), t
        assert torch.equal(before["pred"][:, : t + 1], after["pred"][:, : t + 1]), t  # the mode
        split = torch.cat([first["pred"], second["pred"]], 1)
        assert torch.equal(split[:, : t + 1], before["pred"][:, : t + 1]), t
        # and the context does cross: the next body window (and the next call) sees sample t
        later = (t // 32 + 1) * 32
        assert not torch.equal(before["nll"][:, later:], after["nll"][:, later:]), t


def test_a_stream_scored_whole_equals_it_scored_window_by_window_with_the_state():
    model = trained_looking()
    batch = smooth_batch(batch=3, length=LENGTH)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        whole = model.score(ids, labels)
        parts, state = [], None
        for lo in range(0, LENGTH, 32):
            part = model.score(
                ids[:, lo : lo + 32], labels[:, lo : lo + 32], state, ids[:, lo + 32 :]
            )
            parts.append(part)
            state = part["state"]
    nll = torch.cat([p["nll"] for p in parts], 1)
    untrained = torch.cat([p["untrained_nll"] for p in parts], 1)
    # The predictor's float64 sums run in another order (its statistics scan groups intervals
    # from each call's start) and differ at ~1e-12; a sample far in a component's tail (tens of
    # nats) amplifies that, and the nats are float32: equal to 1e-5 relative.
    torch.testing.assert_close(nll, whole["nll"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(untrained, whole["untrained_nll"], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([p["pred"] for p in parts], 1), whole["pred"])
    # without the state every call starts its predictor cold: more bits
    with torch.no_grad():
        cold = [
            model.score(ids[:, lo : lo + 32], labels[:, lo : lo + 32]) for lo in range(0, 128, 32)
        ]
    assert sum(float(c["untrained_nll_sum"]) for c in cold) > float(whole["untrained_nll_sum"]) + 50


def test_a_call_whose_length_breaks_the_refit_grid_returns_no_state():
    model = trained_looking()
    batch = smooth_batch(batch=1, length=36)
    with torch.no_grad():
        assert model.score(batch["input_ids"], batch["labels"])["state"] is None
        assert model.score(batch["input_ids"][:, :32], batch["labels"][:, :32])["state"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_log_probs_equal_teacher_forced_ones_over_body_windows(temperature):
    model = trained_looking()
    ids = smooth_batch(batch=2, length=96)["input_ids"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tokens, log_probs = model.generate(ids, temperature=temperature, generator=gen)
        scored = model.score(ids, tokens)
    torch.testing.assert_close(log_probs, -scored["nll"], rtol=1e-5, atol=1e-4)


def test_a_logistic_head_recorded_before_the_cascade_loads_as_it_was():
    for recorded in (
        "logistic",
        {"class_path": "trainer.model.heads.LogisticOptions", "init_args": {"order": 8}},
    ):
        head = current_hparams({"codec": "pcm16", "head": recorded})["head"]["init_args"]
        assert head["cascade"] == [] and head["cascade_mu"] == [] and head["mix"] is False
    now = OPTIONS.to_dict()
    assert current_hparams({"codec": "pcm16", "head": now})["head"] == now


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(body_window=-1), "body_window -1"),
        (dict(body_window=16, patch_size=8, local_d=16, local_layers=1, local_heads=2), "patch"),
        (dict(head={"class_path": "LogisticOptions", "init_args": {"cascade": [8]}}), "cascade"),
        (
            dict(head={"class_path": "LogisticOptions", "init_args": {"cascade_mu": [0.1, 3]}}),
            "cascade_mu",
        ),
    ],
)
def test_bad_context_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(ModelError, match=match) as error:
        tiny(**{**CONTEXT, **kwargs})
    assert "\n" not in str(error.value)

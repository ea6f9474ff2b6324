"""Every registered head, through the one head interface: a distribution that sums to 1, NLL that
is -log p of the level, generation that agrees with teacher forcing, save -> load identical, and
options that belong to one head only."""

from __future__ import annotations

import math

import pytest
import torch
from test_model import PATCH, make_batch, tiny

from trainer.model import ModelError, StereoT5
from trainer.model.heads import OPTIONS, ChunkedOptions, LogisticOptions, resolve_head

# options small enough to exercise every code path in a 24-sample window (a chunk boundary,
# several predictor refits)
SMALL = {"chunked": ChunkedOptions(chunk=16), "logistic": LogisticOptions(order=4, refit_every=4)}
FRONTENDS = {"per-sample": {}, "align": dict(align=True), "residual": dict(residual=True)}
FRONTENDS["patched"] = PATCH
# generation log-probs equal teacher-forced ones to float32 rounding of per-step sums
TOLERANCE = 1e-4


def cases() -> list:
    out = []
    for name, options in OPTIONS.items():
        module = options.module
        for frontend, kwargs in FRONTENDS.items():
            if (frontend == "residual" and module.residual_refusal) or (
                frontend == "patched" and module.patch_refusal
            ):
                continue
            for codec in ("mulaw8", "pcm16"):
                out.append(pytest.param(name, codec, kwargs, id=f"{name}-{frontend}-{codec}"))
    return out


def build(name: str, codec: str, kwargs: dict, seed: int = 0) -> StereoT5:
    return tiny(seed, codec=codec, head=SMALL.get(name, name), **kwargs).eval()


@pytest.mark.parametrize(("name", "codec", "kwargs"), cases())
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_log_probs_equal_teacher_forced_log_probs(name, codec, kwargs, temperature):
    model = build(name, codec, kwargs)
    input_ids = make_batch(model.levels, batch=3, length=24)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    tokens, log_probs = model.generate(input_ids, temperature=temperature, generator=generator)
    assert tokens.shape == input_ids.shape and int(tokens.min()) >= 0
    assert int(tokens.max()) < model.levels
    with torch.no_grad():
        scored = model.score(input_ids, tokens)
    assert torch.allclose(log_probs, -scored["nll"], atol=TOLERANCE)
    if temperature == 0:
        assert torch.equal(scored["pred"], tokens)  # greedy = teacher-forced argmax on itself


@pytest.mark.parametrize(("name", "codec", "kwargs"), [c for c in cases() if "mulaw8" in c.id])
def test_the_distribution_over_every_level_sums_to_one(name, codec, kwargs):
    """Position t of V rows that share the prefix and hold each level v once at t: the NLLs
    there are -log p(v | prefix) for every v."""
    model = build(name, codec, kwargs)
    levels, t = model.levels, 13  # inside the second patch of 8, after refits of 4
    base = make_batch(levels, batch=1, length=16, seed=3)
    input_ids = base["input_ids"].expand(levels, -1).clone()
    labels = base["labels"].expand(levels, -1).clone()
    labels[:, t] = torch.arange(levels)
    with torch.no_grad():
        nll = model.score(input_ids, labels)["nll"][:, t].double()
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():  # the level greedy generation picks, and its log-prob, agree
        tokens, log_probs = model.generate(input_ids[:1])
        first = model.score(input_ids[:1], tokens)["nll"][0]
    assert math.isclose(float(-first[0]), float(log_probs[0, 0]), abs_tol=TOLERANCE)


@pytest.mark.parametrize(("name", "codec", "kwargs"), [c for c in cases() if "pcm16" in c.id])
def test_save_then_load_gives_identical_scores(name, codec, kwargs, tmp_path):
    model = build(name, codec, kwargs)
    loaded = StereoT5.from_pretrained(model.save_pretrained(tmp_path / "export"))
    assert loaded.head_options == model.head_options
    batch = make_batch(model.levels, length=24)
    with torch.no_grad():
        a = model.score(batch["input_ids"], batch["labels"])
        b = loaded.score(batch["input_ids"], batch["labels"])
    assert torch.equal(a["nll"], b["nll"]) and torch.equal(a["pred"], b["pred"])


def test_auto_is_resolved_in_one_place_by_the_level_count():
    assert resolve_head("auto", 256).name == "full"
    assert resolve_head("auto", 65536).name == "coarse_fine"
    assert tiny(codec="mulaw8").hparams["head"]["class_path"].endswith(".FullOptions")


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ({"class_path": "CoarseFineOptions", "init_args": {"chunk": 16}}, "has no option chunk"),
        ({"class_path": "FullOptions", "init_args": {"order": 4}}, "has no option order"),
        (
            {"class_path": "trainer.model.heads.LogisticOptions", "init_args": {"chunk": 3}},
            "head logistic has no option chunk: its options are mixtures, order, taps",
        ),
        ({"class_path": "NoSuchOptions"}, "is none of"),
        ("softmax", "unknown head 'softmax'"),
    ],
)
def test_an_option_given_to_the_wrong_head_is_a_one_line_error(head, match):
    with pytest.raises(ModelError, match=match) as error:
        tiny(codec="pcm16", head=head)
    assert "\n" not in str(error.value)


def test_stored_head_options_round_trip_through_hyperparameters():
    model = tiny(codec="pcm16", head=LogisticOptions(order=6, forget=0.9))
    again = tiny(codec="pcm16", head=model.hparams["head"])
    assert again.head_options == LogisticOptions(order=6, forget=0.9)
    assert again.head.predictor.order == 6 and again.head.predictor.forget == 0.9

"""StereoT5: heads, exact metrics, LoRA, init_from, export and generation on tiny models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL
from torch.utils.data import DataLoader

from trainer.callbacks import AudioExamples, ExportOnFitEnd
from trainer.model import ModelError, StereoT5
from trainer.model.heads import ChunkedOptions
from trainer.model.metrics import SumMetrics, summarize
from trainer.model.optim import lr_factor

TINY = dict(**TINY_MODEL, max_len=64, warmup_steps=0)
# a tiny patched model (patch_size 8): the two-level decoder of trainer/patched.py
PATCH = dict(patch_size=8, local_d=16, local_layers=1, local_heads=2)
CHUNK16 = {"chunked": ChunkedOptions(chunk=16)}  # head name -> options, where not the defaults


def tiny(seed: int = 0, **kwargs) -> StereoT5:
    torch.manual_seed(seed)
    return StereoT5(**{**TINY, **kwargs})


def make_batch(levels: int, batch: int = 2, length: int = 40, seed: int = 0) -> dict:
    """Random input, target = input shifted by a few levels, the last row's tail ignored."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, levels, (batch, length), generator=g)
    labels = (input_ids + 3) % levels
    labels[-1, length * 3 // 4 :] = -100
    return dict(input_ids=input_ids, labels=labels, direction=torch.zeros(batch, dtype=torch.long))


def padding_batch(levels: int, batch: int = 2, length: int = 40) -> dict:
    return dict(
        input_ids=torch.full((batch, length), levels),
        labels=torch.full((batch, length), -100),
        direction=torch.zeros(batch, dtype=torch.long),
    )


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # yields the prepared batches as they are


def teacher_forced(model: StereoT5, batch: dict) -> dict:
    return model.score(batch["input_ids"], batch["labels"])


def test_auto_head_is_full_for_small_vocabularies_and_coarse_fine_for_16_bit():
    assert tiny(codec="mulaw8").head_kind == "full"
    assert tiny(codec="pcm16").head_kind == "coarse_fine"
    model = tiny(codec="mulaw8")
    assert model.config.vocab_size == 257
    assert model.config.pad_token_id == model.config.decoder_start_token_id == 256
    assert model.config.eos_token_id is None
    assert model.config.relative_attention_max_distance == TINY["max_len"]


def fit_one_batch(model: StereoT5, batch: dict, steps: int) -> list[float]:
    """Train `steps` AdamW steps on one batch; the loss after each."""
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        scored = teacher_forced(model, batch)
        loss = scored["nll_sum"] / scored["count"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_overfits_one_batch():
    model = tiny(codec="mulaw8", head="full", d_model=64, d_ff=128, lr=3e-3)
    losses = fit_one_batch(model, make_batch(256, batch=4, length=32), 50)
    assert losses[-1] < 0.5 * losses[0], losses


def test_chunked_loss_and_gradients_equal_full_on_the_same_weights():
    full = tiny(codec="pcm16", head="full")
    chunked = tiny(codec="pcm16", head=ChunkedOptions(chunk=16))  # 40 = 16 + 16 + 8
    chunked.load_state_dict(full.state_dict())
    batch = make_batch(65536)
    a, b = teacher_forced(full, batch), teacher_forced(chunked, batch)
    assert torch.allclose(a["nll_sum"], b["nll_sum"], rtol=1e-5, atol=1e-5)
    assert torch.equal(a["pred"], b["pred"]) and a["count"] == b["count"]
    a["nll_sum"].backward()
    b["nll_sum"].backward()
    for (name, p), q in zip(full.named_parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_coarse_fine_nll_is_the_sum_of_its_two_cross_entropies():
    model = tiny(codec="pcm16", head="coarse_fine")
    batch = make_batch(65536)
    labels = batch["labels"]
    keep = labels != -100
    with torch.no_grad():
        hidden = model(batch["input_ids"], labels)[1][keep]
        high, low = labels[keep] >> 8, labels[keep] & 255
        head = model.head
        expected = F.cross_entropy(head.high(hidden), high, reduction="sum")
        low_in = torch.cat([hidden, head.high_embed(high)], -1)
        expected += F.cross_entropy(head.low(low_in), low, reduction="sum")
        scored = teacher_forced(model, batch)
    assert torch.allclose(scored["nll_sum"], expected, rtol=1e-5)
    assert scored["count"] == keep.sum()


def test_coarse_fine_is_causal_and_the_high_part_ignores_the_current_sample():
    model = tiny(codec="pcm16", head="coarse_fine", align=True).eval()
    batch = make_batch(65536, length=24)
    changed = batch["labels"].clone()
    t = 10
    changed[:, t] = (changed[:, t] + 12345) % 65536
    with torch.no_grad():
        _, before = model(batch["input_ids"], batch["labels"])
        _, after = model(batch["input_ids"], changed)
        # every state up to and including t (which sees labels < t) is unchanged ...
        assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)
        assert torch.equal(model.head.high(before[:, t]), model.head.high(after[:, t]))
        # ... and the change reaches t + 1
        assert not torch.allclose(before[:, t + 1], after[:, t + 1])


@pytest.mark.parametrize(
    ("codec", "head"), [("mulaw8", "full"), ("pcm16", "chunked"), ("pcm16", "coarse_fine")]
)
def test_pad_token_is_never_an_audio_prediction(codec, head):
    model = tiny(codec=codec, head=CHUNK16.get(head, head))
    levels = model.levels
    classes = (
        model.head.proj.out_features
        if head != "coarse_fine"
        else model.head.n_high * model.head.n_low
    )
    assert classes == levels  # the pad/decoder-start token V is not an output class
    batch = make_batch(levels)
    batch["input_ids"][-1] = levels  # a padded input row
    scored = teacher_forced(model, batch)
    assert int(scored["pred"].max()) < levels and int(scored["pred"].min()) >= 0
    tokens, _ = model.generate(batch["input_ids"][:, :8])
    assert int(tokens.max()) < levels


@pytest.mark.parametrize(("codec", "head"), [("mulaw8", "full"), ("pcm16", "coarse_fine")])
def test_uniform_output_costs_log2_levels_bits_per_sample(codec, head):
    model = tiny(codec=codec, head=head)
    with torch.no_grad():
        for linear in [model.head.proj] if head == "full" else [model.head.high, model.head.low[2]]:
            linear.weight.zero_()
            linear.bias.zero_()
    scored = teacher_forced(model, make_batch(model.levels))
    stats = summarize(
        {k: scored[k] for k in ("count", "correct")} | {"nll": scored["nll_sum"].double()}
    )
    assert stats["bits_per_sample"].item() == pytest.approx(math.log2(model.levels), rel=1e-6)


def test_all_padding_batch_gives_finite_metrics_and_zero_count():
    model = tiny(codec="mulaw8")
    scored = teacher_forced(model, padding_batch(256))
    assert scored["count"] == 0 and scored["nll_sum"] == 0
    loss = summarize({"nll": scored["nll_sum"], "count": scored["count"], "correct": 0})["loss"]
    loss.backward()  # a training step on it is a zero-gradient step, not NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    alone, mixed = SumMetrics(), SumMetrics()
    batch = make_batch(256)
    with torch.no_grad():
        real = model.metric_sums(batch["labels"], teacher_forced(model, batch))
        empty = model.metric_sums(padding_batch(256)["labels"], scored)
    alone.update(real)
    mixed.update(real)
    mixed.update(empty)
    only_padding = SumMetrics()
    only_padding.update(empty)
    assert all(torch.isfinite(v) for v in only_padding.compute().values())
    for name, value in alone.compute().items():
        assert torch.equal(value, mixed.compute()[name]), name


def test_out_of_range_tokens_name_the_codec():
    model = tiny(codec="mulaw8")
    batch = make_batch(256)
    batch["labels"][0, 0] = 256  # the pad token is never a label
    with pytest.raises(ModelError, match="mulaw8"):
        model._check_batch(batch)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_lora_trains_only_adapters_and_keeps_base_weights(tmp_path, feed_forward_proj):
    base = tiny(codec="mulaw8", feed_forward_proj=feed_forward_proj)
    base.save_pretrained(tmp_path / "base")
    model = tiny(
        seed=1,
        codec="mulaw8",
        feed_forward_proj=feed_forward_proj,
        init_from=str(tmp_path / "base"),
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        lr=1e-2,
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ffn = ["wi_0", "wi_1", "wo"] if feed_forward_proj == "gated-gelu" else ["wi", "wo"]
    for target in ["q", "k", "v", "o", *ffn]:
        assert any(f".{target}.lora_A" in n for n in trainable), target

    batch = make_batch(256)
    with torch.no_grad():  # lora_B starts at zero: the adapted model is the base model
        assert torch.equal(teacher_forced(model, batch)["nll"], teacher_forced(base, batch)["nll"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = model.configure_optimizers()["optimizer"]
    scored = teacher_forced(model, batch)
    (scored["nll_sum"] / scored["count"]).backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)

    # the export merges the adapters: same outputs without peft
    model.eval()
    exported = StereoT5.from_pretrained(model.save_pretrained(tmp_path / "adapted"))
    assert not any("lora" in n for n, _ in exported.named_parameters())
    with torch.no_grad():
        a, b = teacher_forced(model, batch)["nll"], teacher_forced(exported, batch)["nll"]
    assert torch.allclose(a, b, atol=1e-5)
    # so does init_from on a checkpoint of the adapted model
    ckpt = tmp_path / "adapted.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    merged = tiny(codec="mulaw8", feed_forward_proj=feed_forward_proj, init_from=str(ckpt))
    with torch.no_grad():
        assert torch.allclose(teacher_forced(merged.eval(), batch)["nll"], a, atol=1e-5)


def test_init_from_with_another_codec_is_a_clear_error(tmp_path):
    source = tiny(codec="mulaw8")
    folder = source.save_pretrained(tmp_path / "mulaw")
    ckpt = tmp_path / "mulaw.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, ckpt)
    for path in (folder, ckpt):
        with pytest.raises(ModelError, match=r"mulaw8 \(256 levels\).*pcm16 \(65536 levels\)") as e:
            tiny(codec="pcm16", init_from=str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="do not fit"):
        tiny(codec="mulaw8", d_model=48, init_from=str(folder))


def test_save_pretrained_then_from_pretrained_gives_identical_outputs(tmp_path):
    model = tiny(codec="pcm16", head="coarse_fine", align=True).eval()
    folder = model.save_pretrained(tmp_path / "export")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "heads.safetensors", "model.safetensors", "stereo_t5.json"]
    loaded = StereoT5.from_pretrained(folder)
    assert loaded.head_kind == "coarse_fine" and loaded.align_embed is not None
    batch = make_batch(65536)
    with torch.no_grad():
        a, b = teacher_forced(model, batch), teacher_forced(loaded, batch)
    assert torch.equal(a["nll"], b["nll"]) and torch.equal(a["pred"], b["pred"])
    # saving again replaces the folder as a whole
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert lr_factor(0, warmup=4, total=20) == 0.25
    assert lr_factor(3, warmup=4, total=20) == 1.0
    assert lr_factor(4, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_factor(12, warmup=4, total=20) == pytest.approx(0.55)
    assert lr_factor(20, warmup=4, total=20) == pytest.approx(0.1)
    assert lr_factor(99, warmup=4, total=20) == pytest.approx(0.1)
    assert lr_factor(99, warmup=4, total=None) == 1.0


def test_compile_wraps_the_body_forward_without_renaming_weights():
    model = tiny(codec="mulaw8", compile=True)
    names = list(model.state_dict())
    model.configure_model()
    assert model._hidden_fn != model.hidden
    assert list(model.state_dict()) == names


def test_fit_logs_exact_epoch_metrics_and_exports(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    model = tiny(codec="mulaw8", warmup_steps=2, lr=1e-3)
    train = [make_batch(256, seed=s) for s in range(3)]
    val = [make_batch(256, seed=10), padding_batch(256), make_batch(256, batch=3, seed=11)]
    val[2]["labels"][:, 5:] = -100  # batches with very different counts
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        callbacks=[ExportOnFitEnd()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers and small-batch advice
        trainer.fit(model, train_dataloaders=loader(train), val_dataloaders=loader(val))
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/bits_per_sample", "train/accuracy"} <= set(metrics)
    with torch.no_grad():
        scored = [teacher_forced(model, b) for b in val]
    nll = sum(s["nll_sum"].double() for s in scored)
    count = sum(s["count"] for s in scored)
    assert metrics["val/bits_per_sample"].item() == pytest.approx(
        (nll / count / math.log(2)).item(), rel=1e-5
    )
    assert metrics["val/loss"].item() == pytest.approx((nll / count).item(), rel=1e-5)
    for name in ("val/accuracy", "val/snr_db"):
        assert math.isfinite(metrics[name].item())
    assert model.lr_schedulers().get_last_lr()[0] < 1e-3  # the cosine has started

    export = tmp_path / "lightning_logs" / "version_0" / "export"
    loaded = StereoT5.from_pretrained(export)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    from_ckpt = tiny(codec="mulaw8", init_from=str(ckpt)).eval()
    model.eval()
    with torch.no_grad():
        expected = teacher_forced(model, val[0])["nll"]
        assert torch.equal(teacher_forced(loaded, val[0])["nll"], expected)
        assert torch.equal(teacher_forced(from_ckpt, val[0])["nll"], expected)

    trainer.test(model, dataloaders=loader(val), verbose=False)
    assert trainer.callback_metrics["test/bits_per_sample"].item() == pytest.approx(
        metrics["val/bits_per_sample"].item(), rel=1e-5
    )


def test_audio_examples_go_to_wandb_every_n_validation_runs(monkeypatch, tmp_path):
    import pytorch_lightning as pl

    import trainer.callbacks

    logged = []

    class FakeWandb:  # the real one starts a W&B run; the model only calls log_audio
        def log_audio(self, key, audios, step=None, **kwargs):
            logged.append((key, [len(a) for a in audios], kwargs["sample_rate"]))

    monkeypatch.setattr(trainer.callbacks, "wandb_logger", lambda loggers: FakeWandb())
    model = tiny(codec="mulaw8")
    fit = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        default_root_dir=tmp_path,  # the export at the end of fit goes here
        callbacks=[AudioExamples(every=2), ExportOnFitEnd()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    val = [make_batch(256, seed=10), padding_batch(256)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.fit(model, loader([make_batch(256)]), loader(val))
    # validation runs 2 and 4; 40 + 30 target samples (the padded rows contribute nothing)
    assert logged == [("val/audio", [70, 70, 70], [44100] * 3)] * 2
    assert (tmp_path / "export" / "stereo_t5.json").is_file()


@pytest.mark.parametrize("head", ["chunked", "coarse_fine"])
def test_bf16_autocast_gives_finite_scores_close_to_fp32(head):
    model = tiny(codec="pcm16", head=CHUNK16.get(head, head), align=True)
    batch = make_batch(65536)
    with torch.no_grad():
        fp32 = teacher_forced(model, batch)["nll_sum"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = teacher_forced(model, batch)["nll_sum"]
    bf16.backward()
    assert bf16.dtype == torch.float32  # losses are summed in fp32 whatever the autocast
    assert torch.allclose(bf16, fp32, rtol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

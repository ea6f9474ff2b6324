"""The GPU path, checked on the CPU: bf16 autocast for every head, no host synchronisation
inside the training step, the model-FLOPs count behind the MFU, and compile against eager."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import pytorch_lightning as pl
import torch
from test_heads import SMALL
from test_model import PATCH, fit_one_batch, loader, make_batch, tiny
from torch.utils.flop_counter import FlopCounterMode

from trainer.callbacks import ThroughputMonitor, device_peak_flops, model_flops_per_token
from trainer.model import ModelError, StereoT5

# (head, model options) for every head; the patched two-level model with the coarse_fine head
HEADS = {
    "full": dict(codec="mulaw8"),
    "chunked": dict(codec="mulaw8"),
    "coarse_fine": dict(codec="pcm16"),
    "logistic": dict(codec="pcm16"),
    "patched": dict(codec="pcm16", **PATCH),
}
# bf16 keeps 8 bits of mantissa: one rounding is a relative error of at most 2^-8. The loss is
# a mean of float32 (logistic: float64) likelihoods, so it may move by about one rounding. The
# gradients pass through every matmul of the body in bf16 (forward and backward): measured
# 0.5-1.9 % of their norm per parameter group on these tiny models, a few roundings summed
# over the layers; 5 % is about 13 roundings. A likelihood computed in bf16, or a gradient that
# is lost (an overflow, a detached path), is far outside both.
BF16_LOSS_RTOL = 2.0**-8
BF16_GRAD_RTOL = 0.05


def build(name: str, **kwargs) -> StereoT5:
    options = dict(HEADS[name])
    head = "coarse_fine" if name == "patched" else name
    return tiny(head=SMALL.get(head, head), **{**options, **kwargs})


def groups(model: StereoT5) -> dict[str, torch.Tensor]:
    """Every gradient flattened, per parameter group: T5's shared, encoder and decoder, and
    each other top-level module (head, patch, value_embed)."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] == "t5" else parts[0]
            out.setdefault(key, []).append(param.grad.flatten())
    return {key: torch.cat(grads) for key, grads in out.items()}


def step_gradients(model: StereoT5, batch: dict, bf16: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {key: grad.clone() for key, grad in groups(model).items()}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("name", HEADS)
def test_a_bf16_step_is_finite_and_its_gradients_are_fp32_within_rounding(name):
    # trained a few fp32 steps first: at initialisation the logistic head's output ignores the
    # decoder state (its last layers are zero), so the body's gradients would be zero in both
    model = build(name, lr=1e-2)
    batch = make_batch(model.levels, length=48)
    fit_one_batch(model, batch, 3)
    loss32, grads32 = step_gradients(model, batch, bf16=False)
    loss16, grads16 = step_gradients(model, batch, bf16=True)
    assert torch.isfinite(loss16) and torch.isfinite(loss16 / math.log(2))
    assert loss16.dtype == torch.float32  # the likelihood is never computed in bf16
    assert abs(float(loss16 - loss32)) <= BF16_LOSS_RTOL * abs(float(loss32))
    assert grads16.keys() == grads32.keys() and {"t5.encoder", "t5.decoder", "head"} <= set(grads32)
    for key, grad in grads32.items():
        assert torch.isfinite(grads16[key]).all(), key
        assert float(grad.norm()) > 0, key  # the comparison below can fail
        relative = float((grads16[key] - grad).norm() / grad.norm())
        assert relative < BF16_GRAD_RTOL, (key, relative)


# ---------------------------------------------------------------- no host sync in the step


class HostSync(RuntimeError):
    """A host synchronisation inside the training step (on a GPU: a stall of the queue)."""


SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")
SYNC_FUNCTIONS = ((torch, "nonzero"), (torch, "masked_select"), (torch.linalg, "solve"))


def _is_mask(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Every Python-level operation that reads a device value back on a GPU raises: the
    scalar conversions, ``nonzero`` and boolean-mask indexing (data-dependent shapes), and
    ``linalg.solve`` (it reads its error status back; ``solve_ex(check_errors=False)`` does
    not). Copies and syncs inside C++ only show on a GPU (``bench/gpu_bench.py`` runs under
    ``torch.cuda.set_sync_debug_mode("error")``)."""

    def refuse(what: str):
        def raising(*args, **kwargs):
            raise HostSync(what)

        return raising

    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self, index):
        if _is_mask(index):
            raise HostSync("boolean-mask indexing")
        return get(self, index)

    def setitem(self, index, value):
        if _is_mask(index) and isinstance(value, torch.Tensor):
            raise HostSync("boolean-mask assignment")
        return put(self, index, value)

    with pytest.MonkeyPatch.context() as patch:
        for method in SYNC_METHODS:
            patch.setattr(torch.Tensor, method, refuse(f"Tensor.{method}"))
        for owner, function in SYNC_FUNCTIONS:
            patch.setattr(owner, function, refuse(f"{owner.__name__}.{function}"))
        patch.setattr(torch.Tensor, "__getitem__", getitem)
        patch.setattr(torch.Tensor, "__setitem__", setitem)
        yield


def guard_steps(model: StereoT5) -> None:
    """Run every ``training_step`` of ``model`` under ``no_host_sync``."""
    step = model.training_step

    def guarded(*args, **kwargs):
        with no_host_sync():
            return step(*args, **kwargs)

    model.training_step = guarded


def fit(model: StereoT5, batches: list[dict]) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, loader(batches))
    return trainer


def test_the_guard_catches_what_the_step_used_to_do():
    x = torch.arange(4)
    with no_host_sync():
        for sync in (x.sum().item, lambda: bool(x.any()), lambda: x[x > 1], lambda: int(x[0])):
            with pytest.raises(HostSync):
                sync()
        with pytest.raises(HostSync):
            torch.linalg.solve(torch.eye(2), torch.ones(2))
        torch.linalg.solve_ex(torch.eye(2), torch.ones(2), check_errors=False)


@pytest.mark.parametrize("name", HEADS)
def test_the_training_step_never_syncs_with_the_host(name):
    model = build(name, warmup_steps=0)
    guard_steps(model)
    trainer = fit(model, [make_batch(model.levels, length=48, seed=s) for s in range(2)])
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/bits_per_sample"])  # prog_bar kept


def test_the_training_step_with_the_estimate_head_never_syncs():
    model = build("logistic", estimate={}, warmup_steps=0)
    guard_steps(model)
    fit(model, [make_batch(model.levels, length=48)])


def test_out_of_range_tokens_still_fail_the_fit_before_the_step():
    model = tiny(codec="mulaw8")
    batch = make_batch(256)
    batch["labels"][0, 0] = 256  # the pad token is never a label
    guard_steps(model)
    with pytest.raises(ModelError, match="codec mulaw8"):
        fit(model, [batch])


# ---------------------------------------------------------------- model FLOPs and MFU


@pytest.mark.parametrize(
    "options",
    [dict(), dict(body_window=16, align=True), dict(value_embed=False), PATCH],
    ids=["whole", "windowed", "no-value-embed", "patched"],
)
def test_model_flops_per_token_match_the_flop_counter_of_a_training_step(options):
    """FlopCounterMode counts every matmul of forward and backward as it runs. attn_tile: the
    body's attention as plain matmuls (CPU sdpa is not counted). Left apart: the value
    embedding's input gradient (never computed) and, patched, the local model's sdpa: 1 %
    and 4 % of these tiny models, 5 % allowed."""
    model = tiny(codec="mulaw8", head="full", attn_tile=16, **options)
    batch = make_batch(model.levels, length=64)
    with FlopCounterMode(display=False) as counter:
        model.score(batch["input_ids"], batch["labels"])["nll_sum"].backward()
    counted = counter.get_total_flops() / batch["labels"].numel()
    assert model_flops_per_token(model, 64) == pytest.approx(counted, rel=0.05)


def test_the_flops_formula_is_the_hand_count_of_a_tiny_model():
    model = tiny(codec="mulaw8", head="full", value_embed=False, feed_forward_proj="relu")
    d, ff, inner, levels, window = 32, 64, 32, 256, 40
    encoder = 4 * d * inner + 2 * d * ff + 2 * inner * window
    decoder = 8 * d * inner + 2 * d * ff + 4 * inner * window  # self and cross attention
    head = d * levels
    assert model_flops_per_token(model, window) == 3 * 2 * (encoder + decoder + head)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_throughput_monitor_logs_flops_and_mfu_against_a_given_peak():
    model = tiny(codec="mulaw8", head="full", warmup_steps=0)
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=1,
        callbacks=[ThroughputMonitor(peak_flops=1e9), recorder],
    )  # fmt: skip
    trainer.fit(model, loader([make_batch(256, length=40, seed=s) for s in range(3)]))
    first, *rest = recorder.logged
    assert "train/tokens_per_s" not in first  # the first step only opens the window
    flops = model_flops_per_token(model, 40)
    for logged in rest:  # on a CPU each step is its own window
        assert logged["train/model_flops_per_token"] == flops
        mfu = logged["train/tokens_per_s"] * flops / 1e9
        assert logged["train/mfu"] == pytest.approx(mfu, rel=1e-6)
        assert 0 <= logged["train/data_wait_frac"] < 1


def test_peaks_are_matched_by_whole_words_of_the_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: NAME)
    cuda = torch.device("cuda", 0)
    for NAME, peak in [
        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10G", None), ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
    ]:  # fmt: skip
        assert device_peak_flops(cuda) == peak, NAME
    assert device_peak_flops(torch.device("cpu")) is None


def test_a_compiled_body_gives_eager_loss_and_gradients(monkeypatch):
    """`compile: true` compiles the body's forward (`StereoT5.hidden`), the heads stay eager.
    The graph is captured and differentiated as on a GPU (dynamo, AOTAutograd); the `aot_eager`
    backend runs it without inductor's C++ build (a minute per shape on 2 cores, timed in
    bench/gpu_bench.py's compile row)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: compile_(fn, backend="aot_eager"))
    eager, compiled = build("logistic", lr=1e-2), build("logistic", lr=1e-2, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert compiled._hidden_fn is not compiled.hidden  # the body is compiled, the head is not
    batch = make_batch(eager.levels, length=48)
    fit_one_batch(eager, batch, 3)
    fit_one_batch(compiled, batch, 3)
    loss_e, grads_e = step_gradients(eager, batch, bf16=False)
    loss_c, grads_c = step_gradients(compiled, batch, bf16=False)
    assert abs(float(loss_c - loss_e)) <= 1e-5 * abs(float(loss_e))
    for key, grad in grads_e.items():
        assert torch.allclose(grads_c[key], grad, rtol=1e-4, atol=1e-6), key

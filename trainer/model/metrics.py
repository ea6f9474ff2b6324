"""Exact metrics over any number of batches: every step reduces to float64 sums (NLL, target
count, correct argmaxes, signal and error energy in int16 units, and each head's reference
NLLs); reported values are ratios of sums, never means of batch means, and an all-padding batch
adds zero count and no NaN."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from trainer.data.batch import IGNORE
from trainer.model.estimator import correction_weight

LN2 = math.log(2.0)
SUM_FIELDS = ("nll", "count", "correct", "signal", "error")
ESTIMATE_FIELDS = ("estimate_error", "estimate_cross", "estimate_correction")


class SumMetrics(Metric):
    """float64 sums of the fields above plus one NLL sum per name in ``extras`` (a head's
    reference scores, e.g. ``untrained``) and, with ``estimate``, the estimate head's error
    energy; reduced by summing across processes."""

    full_state_update = False

    def __init__(self, extras: tuple[str, ...] = (), estimate: bool = False) -> None:
        super().__init__()
        self.fields = (*SUM_FIELDS, *extras, *(ESTIMATE_FIELDS if estimate else ()))
        self.extras = extras
        for name in self.fields:
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: dict[str, torch.Tensor]) -> None:
        for name in self.fields:
            setattr(self, name, getattr(self, name) + sums[name].detach().to(torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        return summarize({name: getattr(self, name) for name in self.fields}, self.extras)


def summarize(sums: dict[str, torch.Tensor], extras: tuple[str, ...] = ()) -> dict:
    """Sums -> loss (nats/sample), bits_per_sample, accuracy, snr_db (and the estimate head's
    estimate_snr_db and estimate_blend, the weight its correction earns on these sums) and,
    per extra NLL, ``bits_per_sample_<name>``; zero count gives 0, not NaN.

    Error energy is a sum of squared int16 differences, so it is 0 or >= 1: clamping both
    energies at 1 only changes the 0/0 and x/0 cases (a perfect prediction reports 10 log10 of
    the signal energy instead of inf).
    """
    count = sums["count"].clamp(min=1)
    loss = sums["nll"] / count
    out = {"loss": loss, "bits_per_sample": loss / LN2, "accuracy": sums["correct"] / count}
    for name in extras:
        out[f"bits_per_sample_{name}"] = sums[name] / count / LN2
    if "signal" in sums:
        ratio = sums["signal"].clamp(min=1) / sums["error"].clamp(min=1)
        out["snr_db"] = 10 * torch.log10(ratio)
        if "estimate_error" in sums:
            ratio = sums["signal"].clamp(min=1) / sums["estimate_error"].clamp(min=1)
            out["estimate_snr_db"] = 10 * torch.log10(ratio)
            out["estimate_blend"] = correction_weight(
                sums["estimate_cross"], sums["estimate_correction"]
            )
    return out


def energy_sums(
    labels: torch.Tensor, pred: torch.Tensor, int16_of_token: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Target energy and teacher-forced argmax error energy over the scored positions."""
    keep = labels != IGNORE
    target = int16_of_token[labels.clamp(min=0)].double()
    guess = int16_of_token[pred].double()
    return {
        "signal": torch.where(keep, target.square(), 0.0).sum(),
        "error": torch.where(keep, (target - guess).square(), 0.0).sum(),
    }

"""Training-step benchmark of the 16-bit output heads: seconds per step and peak activation memory
for `full`, `chunked` and `coarse_fine` (align off and on) next to the same body with a 256-way
head (the floor any 16-bit head can reach), measured side by side in one run (design §10).

    python bench/train_bench.py [--quick] [--steps 2] [--lengths 1024 2048]

Each configuration runs in its own subprocess: peak RSS (`ru_maxrss`) only ever grows, so one
process per configuration is the only clean peak on CPU. "act MB" is the peak minus a baseline
taken after construction with gradients and AdamW state already allocated (one priming step on
zero gradients), i.e. what the forward/backward of one step adds. "s/step" is the mean of the
timed steps, "min s" the fastest (a gap between them means other work shared the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BODY = dict(d_model=256, d_ff=1024, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=64)
BATCH = 2
# (label, head, align); "floor256" is the full head with 256 classes on the same body
CONFIGS = [
    ("full", "full", False),
    ("chunked", "chunked", False),
    ("coarse_fine", "coarse_fine", False),
    ("coarse_fine+align", "coarse_fine", True),
    ("floor256", "floor256", False),
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(head: str, align: bool, length: int, steps: int, warmup: int) -> dict:
    """One configuration in this process; returns seconds/step and memory in MB."""
    import torch

    from trainer.model import SoftmaxHead, StereoT5

    torch.manual_seed(0)
    model = StereoT5(
        codec="pcm16",
        head="full" if head == "floor256" else head,
        align=align,
        max_len=length,
        warmup_steps=0,
        **BODY,
    )
    classes = model.levels
    if head == "floor256":
        classes = 256
        model.head = SoftmaxHead(BODY["d_model"], classes)
    model.train()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.levels, (BATCH, length), generator=g)
    labels = torch.randint(0, classes, (BATCH, length), generator=g)
    optimizer = model.configure_optimizers()["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates AdamW state now, so the baseline holds it
    baseline = _rss_mb()

    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        scored = model.score(input_ids, labels)
        loss = scored["nll_sum"] / scored["count"]
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = _rss_mb()
    return {
        "params_m": sum(p.numel() for p in params) / 1e6,
        "s_per_step": sum(times) / len(times),
        "min_s": min(times),
        "baseline_mb": baseline,
        "peak_mb": peak,
        "act_mb": peak - baseline,
        "bits": float(loss.detach()) / 0.6931471805599453,
    }


def run_one(label: str, head: str, align: bool, length: int, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        head,
        "--align" if align else "--no-align",
        "--lengths",
        str(length),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{label} L={length} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"label": label, "length": length, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 1024 only")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--align", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.align, args.lengths[0], args.steps, args.warmup)
        print(json.dumps(result))
        return

    import torch

    lengths = [1024] if args.quick else args.lengths
    began = time.perf_counter()
    print(
        f"train step benchmark: pcm16 (65536 levels), T5 d {BODY['d_model']}, "
        f"{BODY['num_layers']}+{BODY['num_decoder_layers']} layers, gated-gelu d_ff "
        f"{BODY['d_ff']}, batch {BATCH}, CPU {torch.get_num_threads()} threads, "
        f"{args.warmup} warm-up + {args.steps} timed steps, one process per row"
    )
    header = (
        f"{'L':>5}  {'head':<18}{'s/step':>8}{'min s':>7}{'full/x':>8}{'peak MB':>9}{'act MB':>8}"
        f"{'full/x':>8}{'+s vs floor':>12}{'+MB vs floor':>13}"
    )
    summary = []
    for length in lengths:
        rows = [run_one(label, head, align, length, args) for label, head, align in CONFIGS]
        by = {r["label"]: r for r in rows}
        full, floor = by["full"], by["floor256"]
        print(header)
        for r in rows:
            print(
                f"{length:>5}  {r['label']:<18}{r['s_per_step']:>8.2f}{r['min_s']:>7.2f}"
                f"{full['s_per_step'] / r['s_per_step']:>7.2f}x{r['peak_mb']:>9.0f}"
                f"{r['act_mb']:>8.0f}{full['act_mb'] / max(r['act_mb'], 1):>7.2f}x"
                f"{r['s_per_step'] - floor['s_per_step']:>+12.2f}"
                f"{r['act_mb'] - floor['act_mb']:>+13.0f}",
                flush=True,
            )
        full_extra = full["act_mb"] - floor["act_mb"]
        for label in ("chunked", "coarse_fine"):
            r = by[label]
            extra = r["act_mb"] - floor["act_mb"]
            speed = full["s_per_step"] / r["s_per_step"]
            memory = full["act_mb"] / max(r["act_mb"], 1)
            summary.append(
                f"L={length} {label}: {speed:.2f}x faster than full (goal 3x), "
                f"{memory:.2f}x less activation memory (goal 5x); head's own cost over the "
                f"256-way floor: {r['s_per_step'] - floor['s_per_step']:+.2f} s vs full "
                f"{full['s_per_step'] - floor['s_per_step']:+.2f} s, {extra:+.0f} MB vs full "
                f"{full_extra:+.0f} MB"
            )
    print("\n".join(summary))
    load = os.getloadavg()[0]
    print(
        f"total {time.perf_counter() - began:.0f} s; 1-min load average at the end {load:.2f} on "
        f"{os.cpu_count()} cores (other work on the machine inflates s/step, not memory)"
    )


if __name__ == "__main__":
    main()

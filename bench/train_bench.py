"""Training-step benchmark, in three parts measured side by side in one run (docs/benchmarks.md):

- heads: seconds per step and peak activation memory for `full`, `chunked`, `coarse_fine`
  (align off and on) and `logistic` (the demo's head: an adaptive predictor in float64 under a
  4-component mixture) next to the same body with a 256-way head (the floor any 16-bit head can
  reach), each also with the body's attention tiled (`attn_tile`, trainer/model/attention.py)
  and with that plus activation checkpointing of the body (`checkpoint_body`);
- patches: the per-sample model (P = 1) against the patched encoder / two-level decoder
  (P = 8, 16) at L = 2048, 8192, 16384 (P = 1 only where its L x L attention fits);
- budget: P = 1 at L = 2048 and P = 16 at L = 16384 trained for the same wall-clock seconds on
  a synthetic corpus, then teacher-forced bits/sample on its test split.

    python bench/train_bench.py [--parts heads patches budget] [--quick] [--budget 150]

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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BODY = dict(d_model=256, d_ff=1024, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=64)
LOCAL = dict(local_d=128, local_layers=2, local_heads=4)
BATCH = 2
# heads part: (label, head, align, tiled, ckpt); "floor256" is a 256-class full head. Bodies:
# dense sdpa; "+tiled": tiled attention (`attn_tile` = ATTN_TILE query rows); "+lean":
# tiled attention and every T5 layer recomputed in backward (`checkpoint_body`)
ATTN_TILE = 256
BODIES = {"": (False, False), "+tiled": (True, False), "+lean": (True, True)}
HEAD_ROWS = [
    (label + body, head, align, *BODIES[body])
    for body in BODIES
    for label, head, align in [
        ("full", "full", False),
        ("chunked", "chunked", False),
        ("coarse_fine", "coarse_fine", False),
        ("coarse_fine+align", "coarse_fine", True),
        ("logistic", "logistic", False),
        ("floor256", "floor256", False),
    ]
    if not (body and align)
]
# patches part: (L, P); P = 1 at 16384 would hold 2 x 4 x 16384^2 fp32 attention scores per
# layer (8.6 GB, several times over in backward): not run
PATCH_ROWS = [(2048, 1), (2048, 8), (2048, 16), (8192, 1), (8192, 8), (8192, 16), (16384, 8)]
PATCH_ROWS.append((16384, 16))
# budget part: a tiny CPU body (the demo's before its logistic head); (label, L, P, batch):
# equal tokens/step
TINY_BODY = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16)
BUDGET_ROWS = [("P=1, L=2048", 2048, 1, 8), ("P=16, L=16384", 16384, 16, 1)]
LN2 = 0.6931471805599453


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_worker(spec: dict) -> dict:
    """One configuration in this process: seconds/step and memory in MB."""
    import torch

    from trainer.model import StereoT5
    from trainer.model.heads import SoftmaxHead

    torch.manual_seed(0)
    head, length = spec["head"], spec["length"]
    model = StereoT5(
        codec="pcm16",
        head="full" if head == "floor256" else head,
        align=spec["align"],
        max_len=length,
        warmup_steps=0,
        attn_tile=ATTN_TILE if spec["tiled"] else 0,
        checkpoint_body=spec["ckpt"],
        patch_size=spec["patch"],
        **(LOCAL if spec["patch"] > 1 else {}),
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
    for step in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        scored = model.score(input_ids, labels)
        loss = scored["nll_sum"] / scored["count"]
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = _rss_mb()
    return {
        "params_m": sum(p.numel() for p in params) / 1e6,
        "s_per_step": sum(times) / len(times),
        "min_s": min(times),
        "peak_mb": peak,
        "act_mb": peak - baseline,
    }


def budget_worker(spec: dict) -> dict:
    """Train for `seconds` of wall clock on the corpus's train split, then score its test split
    teacher-forced (every test sample once, in windows of the model's own L)."""
    import torch

    from trainer.data import ShardDataModule
    from trainer.evaluation.evaluate import evaluate
    from trainer.model import StereoT5

    torch.manual_seed(0)
    length, patch = spec["length"], spec["patch"]
    extra = dict(local_d=64, local_layers=2, local_heads=4) if patch > 1 else {}
    model = StereoT5(
        codec="pcm16",
        head="coarse_fine",
        align=True,
        max_len=length,
        patch_size=patch,
        lr=2e-3,
        warmup_steps=30,
        **extra,
        **TINY_BODY,
    ).train()
    data = ShardDataModule(
        spec["shards"],
        seq_len=length,
        batch_size=spec["batch"],
        num_workers=0,
        seed=0,
        direction="random",
    )
    data.setup("fit")
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < spec["seconds"]:
        for batch in data.train_dataloader():
            scored = model.score(batch["input_ids"], batch["labels"])
            loss = scored["nll_sum"] / scored["count"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            steps += 1
            if time.perf_counter() - start >= spec["seconds"]:
                break
    trained = time.perf_counter() - start
    folder = model.save_pretrained(Path(spec["out"]) / "export")
    report = evaluate(
        folder,
        spec["shards"],
        split="test",
        seq_len=length,
        generate=0,
        out=Path(spec["out"]) / "eval",
        progress=False,
    )
    return {
        "steps": steps,
        "seconds": trained,
        "train_bits": float(loss.detach()) / LN2,
        "test_bits": report.bits_per_sample.model,
        "flac_alone": report.bits_per_sample.flac_target_alone,
        "samples": report.counts.samples_scored,
    }


def run_worker(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} {spec} failed:\n{out.stderr[-3000:]}")
    return {**spec, **json.loads(out.stdout.strip().splitlines()[-1])}


def step_spec(
    head="coarse_fine", align=False, tiled=False, ckpt=False, patch=1, length=2048, args=None
):
    return dict(
        head=head,
        align=align,
        tiled=tiled,
        ckpt=ckpt,
        patch=patch,
        length=length,
        steps=args.steps,
        warmup=args.warmup,
    )


def heads_part(args) -> None:
    print(
        f"heads: pcm16 (65536 levels), T5 d {BODY['d_model']}, {BODY['num_layers']}+"
        f"{BODY['num_decoder_layers']} layers, gated-gelu d_ff {BODY['d_ff']}, batch {BATCH}; "
        f"+tiled = tiled attention (attn_tile {ATTN_TILE}); +lean = +tiled and "
        "checkpoint_body"
    )
    header = (
        f"{'L':>5}  {'head':<18}{'s/step':>8}{'min s':>7}{'full/x':>8}{'peak MB':>9}{'act MB':>8}"
        f"{'full/x':>8}{'+s vs floor':>12}{'+MB vs floor':>13}"
    )
    summary = []
    for length in [1024] if args.quick else [1024, 2048]:
        rows = {
            label: run_worker("step", step_spec(head, align, tiled, ckpt, 1, length, args))
            for label, head, align, tiled, ckpt in HEAD_ROWS
        }
        print(header)
        for label, r in rows.items():
            suffix = next(body for body, kind in BODIES.items() if kind == (r["tiled"], r["ckpt"]))
            full, floor = rows["full" + suffix], rows["floor256" + suffix]
            print(
                f"{length:>5}  {label:<18}{r['s_per_step']:>8.2f}{r['min_s']:>7.2f}"
                f"{full['s_per_step'] / r['s_per_step']:>7.2f}x{r['peak_mb']:>9.0f}"
                f"{r['act_mb']:>8.0f}{full['act_mb'] / max(r['act_mb'], 1):>7.2f}x"
                f"{r['s_per_step'] - floor['s_per_step']:>+12.2f}"
                f"{r['act_mb'] - floor['act_mb']:>+13.0f}",
                flush=True,
            )
        for suffix in BODIES:
            full = rows["full" + suffix]
            for label in ("chunked", "coarse_fine", "logistic"):
                r = rows[label + suffix]
                summary.append(
                    f"L={length} {label + suffix} vs full{suffix}: "
                    f"{full['s_per_step'] / r['s_per_step']:.2f}x faster (goal 3x), "
                    f"{full['act_mb'] / max(r['act_mb'], 1):.2f}x less activation memory (goal 5x)"
                )
    print("\n".join(summary))


def patches_part(args) -> None:
    print(
        f"\npatches: the same body, coarse_fine, align on, batch {BATCH}; P > 1: local model "
        f"{LOCAL['local_layers']} layers x {LOCAL['local_d']}, {LOCAL['local_heads']} heads"
    )
    print(
        f"{'L':>6}{'P':>4}{'positions':>10}{'s/step':>8}{'min s':>7}{'peak MB':>9}"
        f"{'act MB':>8}{'vs P=1 L=2048 s':>17}"
    )
    rows = [(length, patch) for length, patch in PATCH_ROWS if not args.quick or length == 2048]
    first = None
    for length, patch in rows:
        r = run_worker("step", step_spec("coarse_fine", True, False, False, patch, length, args))
        first = first or r
        print(
            f"{length:>6}{patch:>4}{length // patch:>10}{r['s_per_step']:>8.2f}{r['min_s']:>7.2f}"
            f"{r['peak_mb']:>9.0f}{r['act_mb']:>8.0f}"
            f"{r['s_per_step'] / first['s_per_step']:>16.2f}x",
            flush=True,
        )
    print("P=1 at L=16384: not run (its L x L attention scores alone are 8.6 GB per layer)")


def budget_part(args) -> None:
    from pipeline.index import build_index
    from pipeline.shard import write_shards
    from pipeline.synth import make_corpus

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        root = Path(tmp)
        make_corpus(root / "audio", tracks=8, seconds=12.0, seed=0)
        build_index(root / "audio", root / "index.json", progress=False)
        write_shards(root / "index.json", root / "shards", chunk_frames=16384, progress=False)
        print(
            f"\nbudget: the demo corpus (synth, 8 tracks x 12 s), tiny body d "
            f"{TINY_BODY['d_model']} {TINY_BODY['num_layers']}+{TINY_BODY['num_decoder_layers']}, "
            f"coarse_fine, align, {args.budget:.0f} s of training each, then the whole test split"
        )
        print(
            f"{'model':<16}{'batch':>6}{'steps':>7}{'s/step':>8}{'train bits':>11}"
            f"{'test bits/sample':>17}"
        )
        results = []
        for label, length, patch, batch in BUDGET_ROWS:
            spec = dict(
                shards=str(root / "shards"),
                length=length,
                patch=patch,
                batch=batch,
                seconds=args.budget,
                out=str(root / f"run-{patch}"),
            )
            r = run_worker("budget", spec)
            results.append(r)
            print(
                f"{label:<16}{batch:>6}{r['steps']:>7}{r['seconds'] / r['steps']:>8.2f}"
                f"{r['train_bits']:>11.3f}{r['test_bits']:>17.3f}",
                flush=True,
            )
        print(
            f"FLAC of the target alone on the same test split: {results[0]['flac_alone']:.3f} "
            f"bits/sample ({results[0]['samples']} samples scored by each model)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["heads", "patches", "budget"],
        default=["heads", "patches", "budget"],
    )
    parser.add_argument("--quick", action="store_true", help="L = 1024 (heads), 2048 (patches)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per model")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, spec = args.worker
        work = step_worker if kind == "step" else budget_worker
        print(json.dumps(work(json.loads(spec))))
        return

    import torch

    began = time.perf_counter()
    print(
        f"train benchmark: CPU {torch.get_num_threads()} threads, {args.warmup} warm-up + "
        f"{args.steps} timed steps, one process per row"
    )
    parts = {"heads": heads_part, "patches": patches_part, "budget": budget_part}
    for name in args.parts:
        parts[name](args)
    print(
        f"total {time.perf_counter() - began:.0f} s; 1-min load average at the end "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other work inflates s/step, "
        "not memory)"
    )


if __name__ == "__main__":
    main()

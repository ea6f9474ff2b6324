"""Samples/s of a teacher-forced scoring pass and of a training step, each T5 stack's position
bias from its bucket table (trainer/model/position_bias.py, what build_body installs) against
T5's own compute_bias (an L x L bucketing per forward), side by side in one run, and where a
scoring pass spends its time (docs/benchmarks.md).

    python bench/speed_bench.py [--window 2048] [--batch 8] [--model-arg key=value ...]

The default model is configs/tiny.yaml's (d_model 32, d_ff 64, 1+1 layers, 2 heads of 16, the
logistic head, align) on synthetic random-walk pcm16 tokens. Both models hold the same weights
and run alternately (table, T5, table, T5, ...), so a change in the machine's speed hits both;
times are medians. Scoring is ``model.score`` under inference mode in eval mode, as evaluate
runs it; a training step is forward, backward, gradient clipping at 1.0 and an AdamW step, as
fit runs it. The split times the position bias (compute_bias), the attention function (sdpa,
or tiled attention: with its mask building) and the head; "rest" is everything else
(embeddings, projections, feed-forward, norms, the zero bias T5 gives cross-attention).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import yaml
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from trainer.model import StereoT5
from trainer.model.heads import LogisticOptions
from trainer.model.optim import param_groups

PARTS = ("position bias", "attention", "head")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--d-model", type=int, default=32)
    add("--d-ff", type=int, default=64)
    add("--layers", type=int, default=1, help="encoder and decoder layers each")
    add("--heads", type=int, default=2)
    add("--d-kv", type=int, default=16)
    add("--window", type=int, default=2048, help="the model's max_len (training window)")
    add("--seq-len", type=int, default=None, help="samples per row (default: the window)")
    add("--batch", type=int, default=8, help="rows per scoring pass (evaluate's default)")
    add("--train-batch", type=int, default=4, help="rows per training step (tiny.yaml's)")
    add("--repeats", type=int, default=5, help="timed scoring passes per model")
    add("--train-repeats", type=int, default=3, help="timed training steps per model")
    add("--threads", type=int, default=1, help="torch threads (the demo runs one)")
    add(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another StereoT5 argument, the value read as YAML (attn_tile=256, lora={r: 4})",
    )
    return parser.parse_args()


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """StereoT5's arguments: configs/tiny.yaml's model, then the options, then --model-arg."""
    kwargs: dict[str, Any] = dict(
        codec="pcm16",
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        num_heads=args.heads,
        d_kv=args.d_kv,
        max_len=args.window,
        head=LogisticOptions(mixtures=4, order=32, taps=16, refit_every=16, forget=0.85),
        align=True,
    )
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-arg wants KEY=VALUE, got {item!r}")
        kwargs[key.replace("-", "_")] = yaml.safe_load(value)
    return kwargs


def use_t5_bias(model: torch.nn.Module) -> None:
    """Back to T5Attention's own compute_bias (drop the method build_body installs)."""
    for module in model.modules():
        module.__dict__.pop("compute_bias", None)


def random_walk(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, label) pcm16 tokens: a random walk and the same walk plus a slower one."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-300, 301, (2, batch, length), generator=g)
    walk = steps.cumsum(-1)
    inputs = (32768 + walk[0]).clamp(0, 65535)
    labels = (32768 + walk[0] + walk[1] // 4).clamp(0, 65535)
    return inputs, labels


def scoring_pass(model: StereoT5, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model.score(*batch)

    return run


def training_step(model: StereoT5, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    hp = model.hparams
    optimizer = torch.optim.AdamW(param_groups(model, hp.weight_decay), lr=hp.lr)

    def run() -> None:
        scored = model.score(*batch)
        loss = scored["nll_sum"] / scored["count"].clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return run


def side_by_side(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each run: one untimed call each, then ``repeats`` rounds in turn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


@contextlib.contextmanager
def timed_parts(model: StereoT5, spent: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in the position bias, the attention function and the head to
    ``spent`` while inside (the bias methods wrapped, the attention function swapped in
    transformers' table, hooks on the head)."""

    def timer(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - start

        return wrapped

    owners = [m for m in model.modules() if getattr(m, "has_relative_attention_bias", False)]
    installed = [m.__dict__.get("compute_bias") for m in owners]
    for module in owners:
        module.compute_bias = timer("position bias", module.compute_bias)
    name = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[name] = timer("attention", ALL_ATTENTION_FUNCTIONS[name])
    head_start: list[float] = []

    def head_begins(*_: Any) -> None:
        head_start.append(time.perf_counter())

    def head_ends(*_: Any) -> None:
        spent["head"] += time.perf_counter() - head_start.pop()

    hooks = [
        model.head.register_forward_pre_hook(head_begins),
        model.head.register_forward_hook(head_ends),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        del ALL_ATTENTION_FUNCTIONS[name]  # the local override: the registered one again
        for module, method in zip(owners, installed, strict=True):
            if method is None:
                del module.compute_bias
            else:
                module.compute_bias = method


def split(model: StereoT5, run: Callable[[], None], repeats: int) -> dict[str, float]:
    """Shares of a scoring pass's time in PARTS and the rest, over ``repeats`` passes."""
    spent = dict.fromkeys(PARTS, 0.0)
    with timed_parts(model, spent):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        total = time.perf_counter() - start
    shares = {part: spent[part] / total for part in PARTS}
    return {**shares, "rest": 1 - sum(shares.values())}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    length = args.seq_len or args.window
    kwargs = model_kwargs(args)
    torch.manual_seed(0)
    table = StereoT5(**kwargs)
    t5 = StereoT5(**kwargs)
    t5.load_state_dict(table.state_dict())
    use_t5_bias(t5)
    models = {"T5 bias": t5, "table": table}
    shown = ", ".join(f"{k} {v}" for k, v in kwargs.items() if k not in ("codec", "head"))
    head = table.head_options.to_dict().get("init_args", {})
    print(
        f"speed: pcm16 StereoT5 {shown}; head {table.head_kind} {head}; rows of {length} "
        f"samples; CPU, {torch.get_num_threads()} torch thread(s); medians of {args.repeats} "
        f"scoring passes and {args.train_repeats} training steps per model after one untimed "
        "each, the two models in turn"
    )

    scoring = random_walk(args.batch, length, seed=0)
    for model in models.values():
        model.eval()
    score_s = side_by_side({k: scoring_pass(m, scoring) for k, m in models.items()}, args.repeats)
    training = random_walk(args.train_batch, length, seed=1)
    for model in models.values():
        model.train()
    train_runs = {k: training_step(m, training) for k, m in models.items()}
    train_s = side_by_side(train_runs, args.train_repeats)

    print(
        f"{'pass':<12}{'rows':>6}{'T5 bias s':>11}{'table s':>9}"
        f"{'T5 bias samples/s':>19}{'table samples/s':>17}{'T5 bias/table':>15}"
    )
    for label, rows, seconds in (
        ("score", args.batch, score_s),
        ("train step", args.train_batch, train_s),
    ):
        samples = rows * length
        print(
            f"{label:<12}{rows:>6}{seconds['T5 bias']:>11.3f}{seconds['table']:>9.3f}"
            f"{samples / seconds['T5 bias']:>19.0f}{samples / seconds['table']:>17.0f}"
            f"{seconds['T5 bias'] / seconds['table']:>14.2f}x"
        )

    print(f"where a scoring pass spends its time ({args.repeats} passes each):")
    print(f"{'':<12}" + "".join(f"{part:>15}" for part in (*PARTS, "rest")))
    for name, model in models.items():
        model.eval()
        shares = split(model, scoring_pass(model, scoring), args.repeats)
        print(f"{name:<12}" + "".join(f"{share:>15.1%}" for share in shares.values()))
    print(
        f"1-min load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
        "(other work slows both models alike: it blurs the ratios, it does not bias them)"
    )


if __name__ == "__main__":
    main()

"""Map a function over work items in worker processes or threads, with a progress bar.

Worker processes come from `WorkerPool`: they never outlive this process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ThreadPoolExecutor,
    wait,
)
from typing import TypeVar

from tqdm import tqdm

from pipeline.workerpool import WorkerPool

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool costs more than it saves.
MIN_ITEMS_FOR_POOL = 32
# map_batches starts workers only when more than this much serial work seems left (seconds):
# about three times what starting and joining a worker costs (docs/benchmarks.md).
POOL_AFTER_S = 0.03


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    jobs: int,
    desc: str,
    progress: bool = True,
    unit: str = "file",
    weight: Callable[[T], float] | None = None,
    min_items_for_pool: int = MIN_ITEMS_FOR_POOL,
) -> Iterator[R]:
    """Yield fn(item) in the order of items; the bar advances by weight(item) (default 1).

    Serial (in this process) when jobs == 1 or there are few items, so results never depend on
    `jobs`, only the speed does.
    """
    total = sum(weight(i) for i in items) if weight else len(items)
    bar = tqdm(
        total=total,
        unit=unit,
        desc=desc,
        disable=not progress or not items,
        unit_scale=weight is not None,
    )
    try:
        if jobs > 1 and len(items) >= min_items_for_pool:
            chunksize = max(1, min(64, len(items) // (jobs * 8)))
            with WorkerPool(jobs) as pool:
                for item, result in zip(
                    items, pool.map(fn, items, chunksize=chunksize), strict=True
                ):
                    bar.update(weight(item) if weight else 1)
                    yield result
        else:
            for item in items:
                result = fn(item)
                bar.update(weight(item) if weight else 1)
                yield result
    finally:
        bar.close()


def map_batches(
    fn: Callable[[list[T]], list[R]],
    items: Sequence[T],
    jobs: int,
    desc: str,
    progress: bool = True,
    batch: int = 64,
    threads: bool = False,
) -> Iterator[tuple[T, R]]:
    """Yield (item, result) pairs in no fixed order, where fn maps a batch of items to a list of
    their results: for many small tasks (a file header each), where per-task costs dominate.

    This process works through batches itself from the front, beside `jobs - 1` workers that
    take batches from the end; batches shrink as the work runs out (down to batch / 8), so no
    one waits long for the last batch of another. Worker processes start only once the batches
    done so far predict more than POOL_AFTER_S seconds of work left, so a small run never pays
    for starting processes. `threads=True` makes the workers threads, which start at once: for
    an fn that spends its time in C calls that release the GIL (hashlib, file reads; not
    libsndfile, whose `sf_open` soundfile serialises).
    """
    lo, hi = 0, len(items)  # items[lo:hi] are not taken yet
    smallest = max(1, batch // 8)

    def size() -> int:
        return max(smallest, min(batch, (hi - lo) // (2 * jobs)))

    bar = tqdm(total=len(items), unit="file", desc=desc, disable=not progress or not items)
    pool: Executor | None = None
    running: dict[Future[list[R]], Sequence[T]] = {}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # shuts the pool down, then closes the bar
        stack.callback(bar.close)
        while lo < hi or running:
            if pool is None and jobs > 1 and hi - lo > batch:
                if threads:
                    pool = ThreadPoolExecutor(jobs - 1)
                    stack.callback(pool.shutdown, cancel_futures=True)
                elif lo and (hi - lo) * (time.perf_counter() - start) / lo > POOL_AFTER_S:
                    pool = stack.enter_context(WorkerPool(jobs - 1))
            for future in [f for f in running if f.done()]:
                chunk = running.pop(future)
                yield from zip(chunk, future.result(), strict=True)
                bar.update(len(chunk))
            while pool is not None and lo < hi and len(running) < 2 * (jobs - 1):
                chunk = items[max(lo, hi - size()) : hi]
                hi -= len(chunk)
                running[pool.submit(fn, list(chunk))] = chunk
            if lo < hi:
                chunk = items[lo : min(hi, lo + size())]
                lo += len(chunk)
                yield from zip(chunk, fn(list(chunk)), strict=True)
                bar.update(len(chunk))
            elif running:
                wait(running, return_when=FIRST_COMPLETED)

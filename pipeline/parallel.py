"""Map a function over work items in worker processes, in order, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool costs more than it saves.
MIN_ITEMS_FOR_POOL = 32


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
            with ProcessPoolExecutor(jobs) as pool:
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

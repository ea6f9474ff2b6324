"""A process pool whose workers never outlive this process, nor leave its temporary files.

A concurrent.futures worker blocks on its task queue and never notices a parent killed by
SIGKILL (PR_SET_PDEATHSIG would follow the parent's forking thread, not the process). So each
worker watches a pipe from the parent that nothing is ever written to: it reads end-of-file once
the parent closes its end, on leaving a `with` block by an exception, or dies, when the kernel
closes it. Then the worker interrupts its running task, whose `finally` blocks remove the files
it was writing (`fsutil.atomic_path`), and exits. SIGINT and SIGTERM do the same unless ignored,
so Ctrl-C and a `kill` of the process group stop the workers at once and cleanly too. The pipe's
ends travel as pool initializer arguments, so this holds whatever multiprocessing's start method.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import Connection
from types import FrameType, TracebackType
from typing import Any, TypeVar

R = TypeVar("R")

# How long an interrupted task may take to unwind before its worker exits anyway (seconds).
UNWIND_S = 2.0
_INTERRUPTED = 128 + signal.SIGINT  # a worker's exit status once interrupted
# The watch thread's signal to its main thread: not SIGINT, which the worker may ignore (`cmd &`).
_WATCH_SIGNAL = signal.SIGUSR1

_busy = False  # in a worker: a task runs, so an interrupt unwinds it instead of exiting at once
_stopping = False  # in a worker: interrupted once; a second signal must not cut the unwinding


class WorkerPool(ProcessPoolExecutor):
    """A ProcessPoolExecutor whose workers exit when this process dies (SIGKILL included) and
    whose `with` block, left by an exception, interrupts the running tasks instead of awaiting
    them."""

    def __init__(self, workers: int) -> None:
        self._watched, self._alive = multiprocessing.Pipe(duplex=False)
        super().__init__(workers, initializer=_start_worker, initargs=(self._watched, self._alive))

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        return super().submit(_run_task, fn, *args, **kwargs)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None:
            self._alive.close()  # every worker reads end-of-file: interrupted
        self.shutdown(cancel_futures=kind is not None)
        self._alive.close()
        self._watched.close()


def _start_worker(watched: Connection, alive: Connection) -> None:
    """Pool initializer: the parent's pipe closing interrupts this worker, and so do SIGINT and
    SIGTERM unless they are ignored (as the parent does then)."""
    alive.close()  # this worker's copy: end-of-file must depend on the parent alone
    signal.signal(_WATCH_SIGNAL, _interrupt)
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _interrupt)
    args = (watched, threading.get_ident())
    threading.Thread(target=_watch, args=args, name="parent-watch", daemon=True).start()


def _watch(watched: Connection, main_thread: int) -> None:
    """Interrupt this worker once the parent is gone or stopping; exit if it does not unwind."""
    watched.poll(None)  # nothing is ever sent: this returns at end-of-file
    # To the main thread itself, so that a read it is blocked in (of the task queue) wakes up.
    signal.pthread_kill(main_thread, _WATCH_SIGNAL)
    time.sleep(UNWIND_S)
    os._exit(_INTERRUPTED)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler of a worker: the first signal unwinds the running task, or exits if idle."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    if not _busy:
        os._exit(_INTERRUPTED)
    raise KeyboardInterrupt


def _run_task(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run one task in a worker; exit once an interrupt has unwound it (the pool is stopping),
    rather than report it and take the next task."""
    global _busy
    _busy = True
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        os._exit(_INTERRUPTED)
    finally:
        _busy = False


def exit_with_parent(poll_s: float = 0.5) -> None:
    """In a worker that some other library started (a DataLoader's): exit once the process that
    started it is gone, SIGKILL included. A worker blocked writing to its parent's full queue
    never reaches its own liveness check, so a daemon thread checks the parent's pid."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(_INTERRUPTED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

"""The user-error types and the one wrapper every command line uses to report them.

A user error is one line that names the file and the fix. Every entry point (`python -m pipeline`,
`python -m trainer fit|validate|test|evaluate|predict`) runs under `run_cli`, which prints such
an error as `error: ...` and exits 2, whether it was raised directly or arrived wrapped by
another library (jsonargparse, Lightning).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["AudioError", "DiskError", "PipelineError", "UserError", "find_user_error", "run_cli"]


class UserError(Exception):
    """A user error: the message names the file and the fix, on one line."""


class PipelineError(UserError):
    """A user error of the offline stage (index, shard, verify, stats, merge)."""


class AudioError(PipelineError):
    """A file that cannot be read as audio; the message is the reason recorded in the index."""


class DiskError(UserError):
    """A write the disk or the folder refused (full, read-only, not permitted, over a size
    limit), raised by `pipeline.fsutil`: in any command, and in worker processes, whose pool
    re-raises it in the main one (its one argument is the message, so it pickles intact)."""


def find_user_error(exc: BaseException) -> UserError | None:
    """`exc` itself if it is a UserError, else the first one along its causes and contexts."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, UserError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a command's body; its exit code (None: 0), or 2 after printing a user error as one
    `error:` line; 130 on Ctrl-C. Any other exception is a bug and keeps its traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left under a final name", file=sys.stderr)
        return 130
    except Exception as exc:
        error = find_user_error(exc)
        if error is None:
            raise
        message = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)

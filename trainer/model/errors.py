"""The model's user error."""

from __future__ import annotations

from pipeline.errors import UserError


class ModelError(UserError, ValueError):
    """A bad model setting, model file or batch: one line naming the file and the fix (also a
    ValueError, for callers that catch that)."""

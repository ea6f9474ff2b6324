"""The one exception type for user-facing failures: the CLI prints its message, no traceback."""


class PipelineError(Exception):
    """A user error: the message names the file and the fix, on one line."""


class AudioError(PipelineError):
    """A file that cannot be read as audio; the message is the reason recorded in the index."""

"""Running a trained model: load it (`loading`), score a split teacher-forced (`scoring`),
generate (`generation`), compare with signal baselines (`baselines`), write the typed report
(`report`, `plot`, `curve`); the two commands are `evaluate` and `predict`. See
docs/evaluation.md."""

from pipeline.errors import UserError


class EvaluationError(UserError):
    """A bad argument to `evaluate` or `predict`: one line naming the file and the fix."""

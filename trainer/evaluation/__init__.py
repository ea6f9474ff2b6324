"""Running a trained model: load it (`loading`), score a split teacher-forced (`scoring`),
restore a channel (`restore`, scored by `restoration`), compare with signal baselines
(`baselines`, `coders`), write the typed report (`report`, `plot`, `curve`); the two commands are
`evaluate` and `predict`. See docs/evaluation.md."""

from pipeline.errors import UserError


class EvaluationError(UserError):
    """A bad argument to `evaluate` or `predict`: one line naming the file and the fix."""

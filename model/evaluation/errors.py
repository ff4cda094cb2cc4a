"""The evaluation stage's error: bad input a user can fix (a prompt file, a checkpoint, a run folder)."""

from __future__ import annotations

from pipeline.errors import UserError


class EvaluationError(UserError, ValueError):
    """Its message names the file or checkpoint and what to change; the CLI prints it in one line."""

"""The runner's errors (every message says why and what to do)."""

from __future__ import annotations

__all__ = ["RunError", "RunExistsError", "RunMismatchError"]


class RunError(RuntimeError):
    """A run cannot start or continue (message says why and what to do)."""


class RunMismatchError(RunError):
    """``resume`` with a model, data file or protocol different from the checkpointed run."""


class RunExistsError(RunError):
    """The output directory holds an unfinished run and neither resume nor overwrite was asked."""

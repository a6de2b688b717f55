"""Errors meant for people: each names the bad key, the bad value and what to do instead."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line: key, value, allowed range, fix."""


class RunDirectoryError(RuntimeError):
    """The run directory already holds an earlier run's outputs; we never overwrite them."""


class OtherRunError(RunDirectoryError):
    """The run directory belongs to another run: held by a running one, holding an earlier run's results, or (with
    ``resume=auto``) a run of another configuration. Nothing is written there, in a sweep not even ``failed.json``."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights: the run stops, and its results are marked as diverged.

    Attributes:
        step: The optimizer step (Lightning's global step) at which it was detected.
        task: The task being trained.
        value: What was not finite: ``"nan"`` or ``"inf"`` for the loss, ``"weights"`` for the parameters.
    """

    def __init__(self, message: str, step: int, task: int, value: str) -> None:
        super().__init__(message)
        self.step, self.task, self.value = step, task, value

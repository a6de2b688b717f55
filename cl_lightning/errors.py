"""Errors meant for people: each names the bad key, the bad value and what to do instead."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line: key, value, allowed range, fix."""


class RunDirectoryError(RuntimeError):
    """The run directory already holds an earlier run's outputs; we never overwrite them."""

"""Checks of config values: each returns the value or raises a one-line :class:`~cl_lightning.errors.ConfigError`
naming the key, the value and the allowed range (``CONVENTIONS.md``, rule 12).

>>> check_int("method.buffer_size", 500)
500
>>> check_int("method.buffer_size", 0)
Traceback (most recent call last):
...
cl_lightning.errors.ConfigError: method.buffer_size=0: must be an integer >= 1
>>> check_number("method.alpha", 0.5), check_optional_int("method.samples", None)
(0.5, None)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cl_lightning.errors import ConfigError


def check_int(key: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (booleans are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}")
    return value


def check_optional_int(key: str, value: Any, minimum: int = 1, none_means: str = "the whole task") -> int | None:
    """An integer >= ``minimum``, or ``None`` (which means ``none_means``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}, or null for {none_means}")
    return value


def check_number(key: str, value: Any, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite number >= ``minimum`` (> ``minimum`` when ``strict``), as a float."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ConfigError(f"{key}={value!r}: must be a number {'>' if strict else '>='} {minimum:g}")
    return float(value)


def check_fraction(key: str, value: Any, low_open: bool = False, high_open: bool = False) -> float:
    """A number in [0, 1] (the ends excluded where asked)."""
    number = check_number(key, value)
    if number > 1 or (low_open and number == 0) or (high_open and number == 1):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r}: must be a number in {interval}")
    return number


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    return str(value)


def check_bool(key: str, value: Any) -> bool:
    """``value`` if it is ``true`` or ``false``.

    >>> check_bool("method.distill", 1)
    Traceback (most recent call last):
    ...
    cl_lightning.errors.ConfigError: method.distill=1: must be true or false
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be true or false")
    return value

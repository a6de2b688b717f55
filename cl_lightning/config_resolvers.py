"""OmegaConf resolvers the configs use, registered by :func:`register_resolvers`.

``cl.case`` picks a value by a key, so that one preset file can give a method different values per scenario
(``dataset.scenario`` is a value, not a config group, so Hydra's defaults list cannot choose a file by it)::

    lambda_: "${cl.case:${dataset.scenario}, {task_il: 1.0e7, domain_il: 1.0e6, class_il: 1.0e8}}"

``python -m cl_lightning ... --cfg job`` shows the whole table; ``--cfg job --resolve`` and ``results.json`` show the
value the run used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from cl_lightning.errors import ConfigError

RESOLVERS = ("cl.case", "cl_or", "cl_resumed")


def case(key: Any, table: Mapping[str, Any]) -> Any:
    """Return ``table[key]``; a key the table lacks is a one-line :class:`ConfigError` naming the config key.

    >>> case("class_il", {"task_il": 1.0e7, "class_il": 1.0e8})
    100000000.0
    """
    if key not in table:
        raise ConfigError(f"cl.case: no value for {key!r} in its table; it has {', '.join(map(str, table))}")
    return table[key]


def or_default(value: Any, default: Any) -> Any:
    """``value`` unless it is null, else ``default`` (``oc.select`` returns a null value as it is).

    ``hydra.run.dir: ${cl_or:${resume},<new directory>}``: a resumed run continues in its own directory.

    >>> or_default(None, "outputs/new"), or_default("outputs/old", "outputs/new")
    ('outputs/new', 'outputs/old')
    """
    return value if value is not None else default


def resumed_or_new(resume: Any, new: Any) -> Any:
    """The directory ``resume=<run dir>`` names, else ``new`` (for ``resume=null`` and ``resume=auto``, which
    continues a run only in the directory the run would write to anyway).

    ``hydra.run.dir: ${cl_resumed:${resume},<new directory>}``.

    >>> resumed_or_new("outputs/old", "outputs/new"), resumed_or_new("auto", "outputs/new")
    ('outputs/old', 'outputs/new')
    """
    return new if resume is None or resume == "auto" else resume


def register_resolvers() -> None:
    """Register this package's resolvers with OmegaConf (idempotent: a second call changes nothing).

    Called once at import of :mod:`cl_lightning.train`, before any config is resolved.
    """
    if not OmegaConf.has_resolver("cl.case"):
        OmegaConf.register_new_resolver("cl.case", case)
    if not OmegaConf.has_resolver("cl_or"):
        OmegaConf.register_new_resolver("cl_or", or_default)
    if not OmegaConf.has_resolver("cl_resumed"):
        OmegaConf.register_new_resolver("cl_resumed", resumed_or_new)

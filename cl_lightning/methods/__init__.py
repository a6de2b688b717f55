"""Continual-learning methods: one file, one class each; Hydra's ``_target_`` is the registry."""

from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.joint import Joint
from cl_lightning.methods.naive import Naive

__all__ = ["CLMethod", "Joint", "Naive"]

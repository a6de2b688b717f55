"""Naive fine-tuning: the lower bound of every continual-learning table."""

from __future__ import annotations

from typing import ClassVar

from cl_lightning.methods.base import CLMethod


class Naive(CLMethod):
    """Fine-tuning: train on each task in turn with the task loss alone, nothing against forgetting.

    Called "SGD" in Buzzega et al. (2020) and "None" / "fine-tuning" in van de Ven & Tolias (2019). In class-IL it
    ends near ``1 / n_tasks`` average accuracy with forgetting near 1: catastrophic forgetting (McCloskey & Cohen,
    1989), the curve every method is measured against.
    """

    name: ClassVar[str] = "naive"

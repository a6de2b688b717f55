"""Backbones and the ``CLModule`` that trains them through a task sequence."""

from cl_lightning.models.backbones import MLP, ResNet18Reduced, SmallCNN
from cl_lightning.models.module import CLModule

__all__ = ["MLP", "CLModule", "ResNet18Reduced", "SmallCNN"]

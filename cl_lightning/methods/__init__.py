"""Continual-learning methods: one file, one class each; Hydra's ``_target_`` is the registry."""

from cl_lightning.methods.agem import AGEM
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.der import DER
from cl_lightning.methods.derpp import DERpp
from cl_lightning.methods.dgr import DGR
from cl_lightning.methods.er import ER
from cl_lightning.methods.ewc import EWC
from cl_lightning.methods.gem import GEM
from cl_lightning.methods.joint import Joint
from cl_lightning.methods.lwf import LwF
from cl_lightning.methods.mas import MAS
from cl_lightning.methods.naive import Naive
from cl_lightning.methods.oml import OML
from cl_lightning.methods.online_ewc import OnlineEWC
from cl_lightning.methods.packnet import PackNet
from cl_lightning.methods.pnn import PNN
from cl_lightning.methods.si import SI

__all__ = [
    "AGEM", "DER", "DGR", "EWC", "GEM", "MAS", "OML", "PNN", "SI", "CLMethod", "DERpp", "ER", "Joint", "LwF", "Naive",
    "OnlineEWC", "PackNet",
]  # fmt: skip

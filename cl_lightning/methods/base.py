"""What a method file builds on: the contract (:class:`~cl_lightning.contract.CLMethod`, re-exported here).

The contract lives in :mod:`cl_lightning.contract`, outside this package, so that the module (``models/``) depends
on it without importing any method.
"""

from cl_lightning.contract import CLMethod, check_combination

__all__ = ["CLMethod", "check_combination"]

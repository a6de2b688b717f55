"""Progressive neural networks (PNN): a new column per task; earlier columns frozen, reused through laterals."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from typing_extensions import override

from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod
from cl_lightning.models.progressive import ProgressiveNet

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class PNN(CLMethod):
    """Progressive Neural Networks (Rusu et al., "Progressive Neural Networks", 2016).

    The network (:class:`~cl_lightning.models.progressive.ProgressiveNet`, ``model=pnn_mlp`` or ``model=pnn_cnn``)
    has one column per task; column ``k`` computes ``h_i^(k) = f(W_i^(k) h_{i-1}^(k) + sum_{j<k} U_i^(k:j)
    h_{i-1}^(j))`` (eq. 1). While task ``k`` trains, columns ``0..k-1`` are frozen: their parameters get no gradient
    (``requires_grad=False``, so they are not even given to the optimizer) and they stay in evaluation mode, so their
    batch-norm statistics do not move either. Only column ``k`` and its lateral connections learn, with the plain
    task loss; earlier tasks are classified by their own, unchanged columns, so there is no forgetting by
    construction: the accuracy on a task never changes after it is learned.

    A sample is routed to its task's column, so the task id must be known at test time: task-IL only. All columns
    are allocated when the network is built (the optimizer exists before any task starts); columns of later tasks
    take no part in the forward pass, get no gradient and are left alone by the optimizer.

    The freezing is recomputed from the module's current task at the start of every fit (a resumed run included);
    the columns themselves are the network's weights, in the module's checkpoint, so the method has no state.
    After each task it reports the parameters of every column trained so far (``diagnostics``).

    DDP: only the learning column requires gradients (earlier and later columns do not), so every parameter DDP
    tracks is used by every step; its gradients are all-reduced as usual and the ranks stay identical.
    """

    name: ClassVar[str] = "pnn"
    supported_scenarios: ClassVar[tuple[str, ...]] = ("task_il",)
    needs_task_boundaries: ClassVar[bool] = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        net = getattr(pl_module, "net", None)
        if not isinstance(net, ProgressiveNet):
            raise ConfigError(
                f"method=pnn needs a progressive network, got model {type(net).__name__}; "
                "use model=pnn_mlp or model=pnn_cnn"
            )
        # Frozen columns are in evaluation mode on purpose; Lightning would warn about it at every task's fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
        if stage == "fit":
            # before the optimizer is built: frozen columns are not even given to it
            net.freeze(int(pl_module.current_task))  # type: ignore[attr-defined]

    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        """Parameters of each column trained so far (laterals and output layer included) and their sum."""
        assert isinstance(pl_module.net, ProgressiveNet)
        per_task = pl_module.net.parameters_per_column()[: int(pl_module.current_task) + 1]
        return {"parameters_per_task": per_task, "parameters_total": sum(per_task)}

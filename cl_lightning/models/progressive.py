"""Progressive neural networks: one column per task, lateral connections from every earlier column.

Lightning-free; the continual method that trains them (freezing earlier columns) is
:class:`cl_lightning.methods.pnn.PNN`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cl_lightning.models.backbones import (
    _check_init,
    _check_input_shape,
    _check_n_outputs,
    _check_widths,
    _is_positive_int,
    init_linears,
)

__all__ = ["LateralLayer", "ProgressiveNet", "ProgressiveMLP", "ProgressiveCNN"]


class LateralLayer(nn.Module):
    """Layer ``i`` of column ``k``: ``h_i^(k) = post(main(h_{i-1}^(k)) + sum_{j<k} U_j(h_{i-1}^(j)))``.

    Args:
        main: The column's own map ``W_i^(k)`` (a linear layer or a convolution).
        laterals: One map ``U_i^(k:j)`` per earlier column ``j``, in column order (empty for the first layer and
            the first column).
        post: What follows the sum: batch norm, the non-linearity, pooling, dropout (identity for the output layer).
    """

    def __init__(self, main: nn.Module, laterals: Sequence[nn.Module] = (), post: nn.Module | None = None) -> None:
        super().__init__()
        self.main = main
        self.laterals = nn.ModuleList(laterals)
        self.post = post if post is not None else nn.Identity()

    def forward(self, h: Tensor, earlier: Sequence[Tensor]) -> Tensor:
        """``h`` is this column's previous activation, ``earlier`` that of each earlier column (same shapes)."""
        z = self.main(h)
        for lateral, h_j in zip(self.laterals, earlier, strict=True):
            z = z + lateral(h_j)
        return self.post(z)


class ProgressiveNet(nn.Module):
    """Progressive neural network (Rusu et al., "Progressive Neural Networks", 2016, eq. 1).

    Column ``k`` (one per task, all allocated up front) computes, for every layer ``i``::

        h_i^(k) = f(W_i^(k) h_{i-1}^(k) + sum_{j<k} U_i^(k:j) h_{i-1}^(j)),     h_0^(k) = x

    with linear lateral connections ``U`` (the paper's eq. 1, not its non-linear adapters of eq. 2) into every layer
    after the first, the output layer included; the first layer sees only the input, which all columns share. A
    sample of task ``k`` is classified by column ``k``, which needs columns ``0..k``; the earlier columns are frozen
    by the method that trains the network (``freeze``), so learning task ``k`` changes only column ``k`` and its
    lateral connections.

    Each column's output layer has one logit per output of its task (``task_outputs``, a multi-head network); the
    logits are returned over all ``n_outputs`` with ``-inf`` outside the task's outputs (the column has none there).
    Without ``task_outputs`` every column has a head over all outputs.

    Subclasses build the columns and install them with :meth:`_finish`; the network is task-conditioned:
    ``forward(x, task_id)``.

    Args:
        n_outputs: Number of logits.
        n_tasks: Number of columns.
        task_outputs: Logit indices of each task, or ``None``.
    """

    task_conditioned = True

    def __init__(self, n_outputs: int, n_tasks: int, task_outputs: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self.n_outputs = _check_n_outputs(n_outputs)
        if not _is_positive_int(n_tasks):
            raise ValueError(f"model.n_tasks: must be an integer >= 1, got {n_tasks!r}")
        self.n_tasks = n_tasks
        outputs = [list(range(n_outputs))] * n_tasks if task_outputs is None else [list(o) for o in task_outputs]
        if len(outputs) != n_tasks or any(not o or min(o) < 0 or max(o) >= n_outputs for o in outputs):
            raise ValueError(
                f"model.task_outputs: expected {n_tasks} non-empty lists of indices in [0, {n_outputs}), got {outputs}"
            )
        for k, o in enumerate(outputs):
            self.register_buffer(f"outputs_{k}", torch.tensor(o, dtype=torch.long), persistent=False)
        self.columns = nn.ModuleList()
        self.feature_dim = 0
        self._frozen = 0

    def _finish(self, columns: Sequence[Sequence[LateralLayer]], feature_dim: int) -> None:
        """Install the columns (each its hidden layers, then its output layer)."""
        self.columns = nn.ModuleList(nn.ModuleList(layers) for layers in columns)
        self.feature_dim = feature_dim

    def column_outputs(self, k: int) -> Tensor:
        """Logit indices of column ``k``'s output layer."""
        return getattr(self, f"outputs_{k}")

    # ------------------------------------------------------------------ freezing
    @property
    def frozen(self) -> int:
        """Number of frozen columns (``0..frozen-1``)."""
        return self._frozen

    def freeze(self, n_columns: int) -> None:
        """Freeze columns ``0..n_columns-1``; column ``n_columns`` is the one that learns (idempotent).

        Frozen columns get ``requires_grad=False`` (no gradient, so no optimizer touches them) and stay in evaluation
        mode whatever ``train()`` is asked (their batch-norm statistics and dropout are fixed too). Columns after
        ``n_columns`` take no part in the forward pass of the tasks so far and get ``requires_grad=False`` as well:
        the optimizer and DDP (which expects a gradient for every parameter that requires one) see only the
        learning column.
        """
        if not 0 <= n_columns <= self.n_tasks:
            raise ValueError(f"freeze: n_columns must be in [0, {self.n_tasks}], got {n_columns}")
        self._frozen = n_columns
        for k, column in enumerate(self.columns):
            for p in column.parameters():
                p.requires_grad_(k == n_columns)
                if k < n_columns:
                    p.grad = None
        self.train(self.training)

    def train(self, mode: bool = True) -> ProgressiveNet:
        """Set the training mode; frozen columns always stay in evaluation mode."""
        super().train(mode)
        for column in self.columns[: self._frozen]:
            column.train(False)
        return self

    # ------------------------------------------------------------------ forward
    def parameters_per_column(self) -> list[int]:
        """Parameters of each column, its lateral connections and output layer included."""
        return [sum(p.numel() for p in column.parameters()) for column in self.columns]

    def _hidden(self, x: Tensor, n_columns: int) -> list[Tensor]:
        """Run columns ``0..n_columns-1``; return each column's last hidden activation (``x`` if none)."""
        acts: list[list[Tensor]] = []
        for k in range(n_columns):
            h, hs = x, []
            for i, layer in enumerate(self.columns[k][:-1]):
                h = layer(h, [acts[j][i - 1] for j in range(k)] if i > 0 else [])
                hs.append(h)
            acts.append(hs)
        return [hs[-1] if hs else x for hs in acts]

    def _logits(self, x: Tensor, k: int, last: list[Tensor]) -> Tensor:
        """Column ``k``'s logits over all outputs (``-inf`` outside its task's)."""
        head = self.columns[k][-1]
        depth = len(self.columns[k]) - 1
        z = head(last[k], last[:k] if depth > 0 else [])
        idx = self.column_outputs(k)
        return z.new_full((len(z), self.n_outputs), float("-inf")).index_copy(1, idx, z)

    @staticmethod
    def _task_ids(task_id: Tensor | int, batch: int, device: torch.device, n_tasks: int) -> tuple[Tensor | None, int]:
        """``(per-sample ids or None, number of columns to run)``; one int id runs ``0..id``."""
        if isinstance(task_id, int) or (isinstance(task_id, Tensor) and task_id.dim() == 0):
            k = int(task_id)
            if not 0 <= k < n_tasks:
                raise ValueError(f"task_id must be in [0, {n_tasks}), got {k}")
            return None, k + 1
        tid = task_id.to(device=device, dtype=torch.long)
        if tid.shape != (batch,):
            raise ValueError(f"task_id: expected one id per sample ({batch}), got shape {tuple(tid.shape)}")
        lo, hi = int(tid.min()), int(tid.max())
        if lo < 0 or hi >= n_tasks:
            raise ValueError(f"task_id must be in [0, {n_tasks}), got values in [{lo}, {hi}] (task ids hidden?)")
        return tid, hi + 1

    def features(self, x: Tensor, task_id: Tensor | int) -> Tensor:
        """The last hidden activation of each sample's column, ``[B, feature_dim]``."""
        tid, n = self._task_ids(task_id, len(x), x.device, self.n_tasks)
        last = self._hidden(x, n)
        if tid is None:
            return last[n - 1].flatten(1)
        return torch.stack([h.flatten(1) for h in last], 1)[torch.arange(len(x), device=x.device), tid]

    def forward(self, x: Tensor, task_id: Tensor | int) -> Tensor:
        """Logits ``[B, n_outputs]`` of each sample's column (``task_id``: one per sample, or one for all)."""
        tid, n = self._task_ids(task_id, len(x), x.device, self.n_tasks)
        last = self._hidden(x, n)
        if tid is None:
            return self._logits(x, n - 1, last)
        logits = torch.stack([self._logits(x, k, last) for k in range(n)], 1)
        return logits[torch.arange(len(x), device=x.device), tid]


class ProgressiveMLP(ProgressiveNet):
    """Progressive network whose columns are :class:`~cl_lightning.models.backbones.MLP` s.

    Column ``k``: ``h_1 = dropout(ReLU(W_1 flatten(x) + b_1))``, ``h_i = dropout(ReLU(W_i h_{i-1} + b_i +
    sum_{j<k} (U_i^(k:j) h_{i-1}^(j) + c_i^(k:j))))``, logits ``W h_L + b + sum_{j<k} (U^(k:j) h_L^(j) + c^(k:j))``.
    With ``hidden=(256, 256)`` each column is the 784-256-256-10 network with which Chaudhry et al. ("Efficient
    Lifelong Learning with A-GEM", ICLR 2019) ran PNN.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        n_outputs: Number of logits (all tasks).
        n_tasks: Number of columns.
        hidden: Width of each hidden layer, in order.
        dropout: Dropout probability after each hidden ReLU, in ``[0, 1)``.
        task_outputs: Logit indices of each task (passed by the training script), or ``None``.
        init: ``default`` or ``xavier`` (every linear layer, laterals included: Glorot-uniform weights, zero biases),
            as :class:`~cl_lightning.models.backbones.MLP`'s.

    Example:
        >>> net = ProgressiveMLP((1, 4, 4), n_outputs=4, n_tasks=2, hidden=[8], task_outputs=[[0, 1], [2, 3]])
        >>> net(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 1])).shape, net.parameters_per_column()
        (torch.Size([3, 4]), [154, 172])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        n_tasks: int,
        hidden: Sequence[int] = (400, 400),
        dropout: float = 0.0,
        task_outputs: Sequence[Sequence[int]] | None = None,
        init: str = "default",
    ) -> None:
        super().__init__(n_outputs, n_tasks, task_outputs)
        c, h, w = _check_input_shape(input_shape)
        widths = _check_widths("hidden", hidden, allow_empty=True)
        _check_init(init)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout: must be a probability in [0, 1), got {dropout!r}")

        def post() -> nn.Module:
            return nn.Sequential(nn.ReLU(), nn.Dropout(dropout)) if dropout > 0 else nn.ReLU()

        columns = []
        for k in range(n_tasks):
            layers, in_features = [], c * h * w
            for i, width in enumerate(widths):
                linear = nn.Linear(in_features, width)
                main = nn.Sequential(nn.Flatten(), linear) if i == 0 else linear
                laterals = [nn.Linear(in_features, width) for _ in range(k)] if i > 0 else []
                layers.append(LateralLayer(main, laterals, post()))
                in_features = width
            n_out = len(self.column_outputs(k))
            head_main = nn.Linear(in_features, n_out)
            if not widths:  # a linear classifier per task, on the flattened input
                head_main = nn.Sequential(nn.Flatten(), head_main)
            head_laterals = [nn.Linear(in_features, n_out) for _ in range(k)] if widths else []
            layers.append(LateralLayer(head_main, head_laterals))
            columns.append(layers)
        self._finish(columns, widths[-1] if widths else c * h * w)
        init_linears(self, init)


class ProgressiveCNN(ProgressiveNet):
    """Progressive network whose columns are :class:`~cl_lightning.models.backbones.SmallCNN` s.

    Every convolution after the first gets one lateral ``1x1`` convolution per earlier column, applied to that
    column's input of the same layer (so shapes match), summed before the batch norm (when enabled) and the ReLU:
    ``h_i^(k) = pool(ReLU(BN(conv3x3(h_{i-1}^(k)) + sum_{j<k} conv1x1(h_{i-1}^(j)))))``. The fully connected
    feature layer and the output layer get linear laterals from the earlier columns' flattened last convolutional
    map and feature layer. The lateral convolutions have no bias when batch norm follows (its shift makes it
    redundant), as the column's own convolutions.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        n_outputs: Number of logits (all tasks).
        n_tasks: Number of columns.
        channels: Output channels of each stage (two convolutions and a 2x2 max-pool each).
        hidden: Width of the fully connected feature layer.
        batch_norm: Batch norm after every convolution.
        task_outputs: Logit indices of each task (passed by the training script), or ``None``.

    Example:
        >>> net = ProgressiveCNN((1, 8, 8), n_outputs=4, n_tasks=2, channels=[4], hidden=8, batch_norm=True)
        >>> net(torch.zeros(2, 1, 8, 8), 1).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        n_tasks: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        batch_norm: bool = False,
        task_outputs: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__(n_outputs, n_tasks, task_outputs)
        c, h0, w0 = _check_input_shape(input_shape)
        widths = _check_widths("channels", channels, allow_empty=False)
        if not _is_positive_int(hidden):
            raise ValueError(f"model.hidden: must be a positive integer, got {hidden!r}")

        columns = []
        for k in range(n_tasks):
            layers: list[LateralLayer] = []
            in_ch, h, w = c, h0, w0
            for out_ch in widths:
                for second, conv_in in enumerate((in_ch, out_ch)):
                    post: list[nn.Module] = [nn.BatchNorm2d(out_ch)] if batch_norm else []
                    post.append(nn.ReLU())
                    if second and min(h, w) >= 2:
                        post.append(nn.MaxPool2d(2))
                        h, w = h // 2, w // 2
                    main = nn.Conv2d(conv_in, out_ch, kernel_size=3, padding=1, bias=not batch_norm)
                    n_lat = k if layers else 0
                    laterals = [nn.Conv2d(conv_in, out_ch, kernel_size=1, bias=not batch_norm) for _ in range(n_lat)]
                    layers.append(LateralLayer(main, laterals, nn.Sequential(*post)))
                in_ch = out_ch
            flat = in_ch * h * w
            laterals = [nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden)) for _ in range(k)]
            layers.append(LateralLayer(nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden)), laterals, nn.ReLU()))
            n_out = len(self.column_outputs(k))
            layers.append(LateralLayer(nn.Linear(hidden, n_out), [nn.Linear(hidden, n_out) for _ in range(k)]))
            columns.append(layers)
        self._finish(columns, hidden)

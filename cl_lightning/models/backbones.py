"""Backbones of the continual-learning literature: the MNIST MLP, a small CNN and GEM's reduced ResNet-18.

Every backbone shares one contract, which the training module and the replay methods rely on:

- ``features(x) -> Tensor[B, feature_dim]``: the penultimate representation (herding, k-center, distillation);
- ``head``: one ``nn.Linear(feature_dim, n_outputs)`` over *all* outputs (task-incremental multi-head training
  masks the logits outside the model, so the backbone never knows about tasks), or with ``head=cosine`` a
  :class:`CosineLinear` over them;
- ``feature_dim``: the width of ``features``;
- ``forward(x) = head(features(x))`` on float input ``x`` of shape ``[B, C, H, W]``.

Each class is built as ``cls(input_shape=(C, H, W), n_outputs=K, **config_kwargs)``; Hydra's ``_target_`` is the
registry, so there is deliberately no ``build_backbone`` factory here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "SmallCNN",
    "ResNet18Reduced",
    "BasicBlock",
    "CosineLinear",
    "routes_by_task",
    "net_logits",
    "uses_batch_statistics",
]

HEADS = ("linear", "cosine")


def routes_by_task(net: nn.Module) -> bool:
    """Whether ``net`` picks its computation by task (``net.task_conditioned``, e.g. a progressive network)."""
    return bool(getattr(net, "task_conditioned", False))


_BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)
_INSTANCE_NORMS = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)


def uses_batch_statistics(net: nn.Module) -> bool:
    """Whether a layer of ``net`` makes a sample's training output, or its running statistics, depend on the other
    samples of its batch: batch norm (which normalises with the batch's statistics), or instance norm that tracks
    running statistics (updated with the batch's mean). Only ``torch.nn``'s layers are known; a layer of another
    kind that does so is not detected (set ``module.fused_forward=false`` for such a network)."""
    return any(
        isinstance(m, _BATCH_NORMS) or (isinstance(m, _INSTANCE_NORMS) and m.track_running_stats) for m in net.modules()
    )


class CosineLinear(nn.Module):
    """Cosine-normalised classifier (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing",
    CVPR 2019, eq. 4): ``logits_c = sigma * <w_c / ||w_c||, f / ||f||>`` with a learnable scale ``sigma``.

    Every class's logit is a cosine scaled alike, so the new classes' larger weight norms cannot bias the
    prediction toward them. Initialised as LUCIR's code does: ``w ~ U(-1/sqrt(in), 1/sqrt(in))``, ``sigma = 1``.

    Example:
        >>> head = CosineLinear(3, 2)
        >>> bool((head(torch.randn(4, 3)).abs() <= head.sigma + 1e-6).all())
        True
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sigma = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LUCIR's initialisation (see the class docstring)."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.ones_(self.sigma)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, out_features]`` scaled cosines of ``features`` ``[B, in_features]`` with each class's weights."""
        return self.sigma * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


def make_head(head: str, in_features: int, n_outputs: int, bias: bool = True) -> nn.Module:
    """The classifier over the features: ``linear`` (``nn.Linear``) or ``cosine`` (:class:`CosineLinear`)."""
    if head not in HEADS:
        raise ValueError(f"model.head: must be one of {', '.join(HEADS)}, got {head!r}")
    return nn.Linear(in_features, n_outputs, bias=bias) if head == "linear" else CosineLinear(in_features, n_outputs)


def net_logits(net: nn.Module, x: Tensor, task_id: Tensor | int | None) -> Tensor:
    """``net(x, task_id)`` for a network that routes by task, ``net(x)`` for the others."""
    if routes_by_task(net):
        if task_id is None:
            raise ValueError("this network routes inputs by task: pass task_id")
        return net(x, task_id)
    return net(x)


def _check_init(init: str) -> None:
    if init not in ("default", "xavier"):
        raise ValueError(f"model.init: choose 'default' or 'xavier', got {init!r}")


def init_linears(net: nn.Module, init: str) -> None:
    """``xavier``: every ``nn.Linear`` of ``net`` gets Glorot-uniform weights and zero biases (Mammoth's MNISTMLP);
    ``default`` leaves PyTorch's initialisation."""
    _check_init(init)
    if init == "xavier":
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _is_positive_int(value: object) -> bool:
    # bool is a subclass of int, but `hidden: [true]` is a config mistake, not a width of 1.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``input_shape`` as a ``(C, H, W)`` tuple of ints, or raise a ValueError that says what is wrong."""
    shape = list(input_shape)  # may arrive as an omegaconf ListConfig
    if len(shape) != 3 or not all(_is_positive_int(s) for s in shape):
        raise ValueError(f"model.input_shape: expected three positive integers (C, H, W), got {shape}")
    return shape[0], shape[1], shape[2]


def _check_n_outputs(n_outputs: int) -> int:
    if not _is_positive_int(n_outputs):
        raise ValueError(f"model.n_outputs: must be an integer >= 1, got {n_outputs!r}")
    return n_outputs


def _check_widths(name: str, widths: Sequence[int], allow_empty: bool) -> list[int]:
    values = list(widths)  # ListConfig -> list; also makes the error message print plainly
    if not all(_is_positive_int(w) for w in values):
        raise ValueError(f"model.{name}: widths must be positive integers, got {values}")
    if not values and not allow_empty:
        raise ValueError(f"model.{name}: needs at least one width, got {values}")
    return values


class MLP(nn.Module):
    """Fully connected network of the MNIST continual-learning benchmarks.

    ``features(x) = h_L``, with ``h_0 = flatten(x)`` and ``h_l = Dropout(ReLU(W_l h_{l-1} + b_l))``; the output is
    ``head(h_L) = W h_L + b``. With ``hidden=(400, 400)`` this is the 784-400-400-10 network of van de Ven & Tolias,
    "Three scenarios for continual learning" (2019), and with ``hidden=(100, 100)`` the 784-100-100-10 network of
    Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline" (NeurIPS 2020).
    An empty ``hidden`` gives a linear classifier on the flattened input.

    Args:
        input_shape: ``(C, H, W)`` of one input; the network flattens it to ``C * H * W`` inputs.
        n_outputs: number of output units (all classes of all tasks), at least 1.
        hidden: width of each hidden layer, in order (a list or an omegaconf ListConfig).
        dropout: dropout probability after each hidden ReLU, in ``[0, 1)``; 0 adds no Dropout module.
        init: ``default`` (PyTorch's ``nn.Linear`` initialisation) or ``xavier``: Glorot-uniform weights
            (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``) and zero biases, the initialisation of Mammoth's
            ``MNISTMLP`` (Buzzega et al. 2020).
        batch_norm: ``h_l = ReLU(BN(W_l h_{l-1}))`` (no bias before the batch norm, eps 1e-6), the MLP of GDumb's code
            (Prabhu et al. 2020).
        batch_norm_logits: also ``logits = BN(W h_L)`` (the head without a bias, then a batch norm over the
            outputs), as GDumb's last block does; ``head`` stays the linear layer, the norm is ``head_norm``.
        head: ``linear`` or ``cosine`` (:class:`CosineLinear`, LUCIR's classifier); with ``cosine`` the last
            hidden layer has no ReLU, so that features may be negative (LUCIR removes the last ReLU likewise).

    Raises:
        ValueError: if a width is not a positive integer, ``n_outputs < 1``, ``dropout`` is outside ``[0, 1)`` or
            ``init`` is unknown.

    Example:
        >>> net = MLP((1, 28, 28), n_outputs=10, hidden=[100, 100])
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.feature_dim
        (torch.Size([2, 10]), 100)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        hidden: Sequence[int] = (400, 400),
        dropout: float = 0.0,
        init: str = "default",
        batch_norm: bool = False,
        batch_norm_logits: bool = False,
        head: str = "linear",
    ) -> None:
        super().__init__()
        _check_init(init)
        if head == "cosine" and batch_norm_logits:
            raise ValueError("model.head=cosine normalises the logits itself: it cannot take model.batch_norm_logits")
        for key, flag in (("batch_norm", batch_norm), ("batch_norm_logits", batch_norm_logits)):
            if not isinstance(flag, bool):
                raise ValueError(f"model.{key}: must be true or false, got {flag!r}")
        c, h, w = _check_input_shape(input_shape)
        n_outputs = _check_n_outputs(n_outputs)
        widths = _check_widths("hidden", hidden, allow_empty=True)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout: must be a probability in [0, 1), got {dropout!r}")

        layers: list[nn.Module] = [nn.Flatten()]
        in_features = c * h * w
        for i, width in enumerate(widths):
            if head == "cosine" and i == len(widths) - 1:  # LUCIR: the features of a cosine head may be negative
                layers.append(nn.Linear(in_features, width))
            elif batch_norm:
                layers += [nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width, eps=1e-6), nn.ReLU()]
            else:
                layers += [nn.Linear(in_features, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        self.body = nn.Sequential(*layers)
        self.feature_dim: int = in_features
        self.head = make_head(head, self.feature_dim, n_outputs, bias=not batch_norm_logits)
        self.head_norm = nn.BatchNorm1d(n_outputs, eps=1e-6) if batch_norm_logits else None
        init_linears(self, init)

    def features(self, x: Tensor) -> Tensor:
        """Return the last hidden activation, ``[B, feature_dim]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits over all ``n_outputs``, ``[B, n_outputs]``."""
        logits = self.head(self.features(x))
        return logits if self.head_norm is None else self.head_norm(logits)


class SmallCNN(nn.Module):
    """Small VGG-style convolutional network for MNIST- and CIFAR-sized inputs.

    Each stage ``i`` maps ``channels[i-1] -> channels[i]`` by ``conv3x3 -> [BN] -> ReLU -> conv3x3 -> [BN] -> ReLU ->
    maxpool2``; then ``features(x) = ReLU(W flatten(z) + b)`` with ``hidden`` units and ``head`` is linear. This is
    the shape of the small CNNs used for split MNIST / split CIFAR in e.g. Zenke et al., "Continual Learning Through
    Synaptic Intelligence" (ICML 2017), without their multi-head output (heads are masked outside the model here).

    BatchNorm, when enabled, sits between each convolution and its ReLU (the usual ``conv-BN-ReLU`` order, as in the
    ResNet blocks below), and the convolution then has no bias because BN's shift makes it redundant. A stage skips
    its max-pool once a spatial side is below 2, so the network also runs on tiny inputs (8x8 test images).

    Args:
        input_shape: ``(C, H, W)`` of one input.
        n_outputs: number of output units, at least 1.
        channels: output channels of each conv stage, in order; at least one stage.
        hidden: width of the fully connected feature layer (``feature_dim``).
        batch_norm: add ``BatchNorm2d`` after every convolution.
        head: ``linear`` or ``cosine`` (:class:`CosineLinear`, LUCIR's classifier; the feature layer then has no
            ReLU, as LUCIR removes the last one).

    Raises:
        ValueError: if a channel width or ``hidden`` is not a positive integer, or ``n_outputs < 1``.

    Example:
        >>> net = SmallCNN((3, 32, 32), n_outputs=10, channels=[8, 16], hidden=32)
        >>> net.features(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        batch_norm: bool = False,
        head: str = "linear",
    ) -> None:
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        n_outputs = _check_n_outputs(n_outputs)
        widths = _check_widths("channels", channels, allow_empty=False)
        if not _is_positive_int(hidden):
            raise ValueError(f"model.hidden: must be a positive integer, got {hidden!r}")

        layers: list[nn.Module] = []
        in_ch = c
        for out_ch in widths:
            for conv_in in (in_ch, out_ch):
                layers.append(nn.Conv2d(conv_in, out_ch, kernel_size=3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_ch))
                layers.append(nn.ReLU())
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            in_ch = out_ch
        self.conv = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Flatten(), nn.Linear(in_ch * h * w, hidden)]
        self.fc = nn.Sequential(*fc, nn.ReLU()) if head != "cosine" else nn.Sequential(*fc)
        self.feature_dim: int = hidden
        self.head = make_head(head, hidden, n_outputs)

    def features(self, x: Tensor) -> Tensor:
        """Return the fully connected feature layer, ``[B, feature_dim]``."""
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits over all ``n_outputs``, ``[B, n_outputs]``."""
        return self.head(self.features(x))


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Residual block of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016).

    ``y = ReLU(BN(conv3x3(ReLU(BN(conv3x3_s(x))))) + shortcut(x))`` where the shortcut is the identity, or
    ``BN(conv1x1_s(x))`` when the stride ``s`` is not 1 or the width changes.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the first convolution (and of the projection shortcut).
        relu_out: apply the final ReLU (off for the last block under a cosine head: LUCIR's features may be negative).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, relu_out: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu = nn.ReLU()
        self.relu_out = relu_out

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``[B, in_ch, H, W]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(out) if self.relu_out else out


class ResNet18Reduced(nn.Module):
    """Reduced ResNet-18 of GEM: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017).

    ``features(x) = GAP(stage_4(...stage_1(ReLU(BN(conv3x3(x))))))`` where stage ``k`` holds two :class:`BasicBlock`
    of width ``2^(k-1) * nf`` with strides 1, 2, 2, 2, and ``GAP`` is global average pooling, so
    ``feature_dim = 8 * nf``; ``head`` is linear. Unlike torchvision's ``resnet18`` the stem is a stride-1 3x3
    convolution with no max-pool, which suits 32x32 images. With ``nf=20`` this is the network of GEM, of A-GEM
    (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019) and the reduced ResNet used by the DER
    paper's code; ``nf=64`` gives the full-width ResNet-18 of Mammoth's seq-CIFAR-10 (Buzzega et al., NeurIPS 2020).

    GEM pooled with ``avg_pool2d(out, 4)`` on the 4x4 map of a 32x32 input; the adaptive 1x1 average pool used here
    is identical there and also works for 28x28 (4x4 map) or smaller inputs.

    Parameters, for a 32x32x3 input and 10 outputs: 1,094,750 with ``nf=20`` (the head is 1,610 of them) and
    11,173,962 with ``nf=64``. BatchNorm running statistics are buffers, not parameters.

    Args:
        input_shape: ``(C, H, W)`` of one input; only ``C`` shapes the network.
        n_outputs: number of output units, at least 1.
        nf: width of the first stage; the stages have ``nf, 2nf, 4nf, 8nf`` channels.
        head: ``linear`` or ``cosine`` (:class:`CosineLinear`, LUCIR's classifier; the last block then has no final
            ReLU, as LUCIR removes it).

    Raises:
        ValueError: if ``nf`` is not a positive integer or ``n_outputs < 1``.

    Example:
        >>> net = ResNet18Reduced((3, 32, 32), n_outputs=10)
        >>> sum(p.numel() for p in net.parameters()), net.feature_dim
        (1094750, 160)
    """

    def __init__(self, input_shape: Sequence[int], n_outputs: int, nf: int = 20, head: str = "linear") -> None:
        super().__init__()
        c, _, _ = _check_input_shape(input_shape)
        n_outputs = _check_n_outputs(n_outputs)
        if not _is_positive_int(nf):
            raise ValueError(f"model.nf: must be a positive integer, got {nf!r}")

        self.conv1 = _conv3x3(c, nf)
        self.bn1 = nn.BatchNorm2d(nf)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        in_ch = nf
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            out_ch = mult * nf
            last = BasicBlock(out_ch, out_ch, 1, relu_out=not (head == "cosine" and mult == 8))
            stages.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride), last))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = 8 * nf
        self.head = make_head(head, self.feature_dim, n_outputs)

    def features(self, x: Tensor) -> Tensor:
        """Return the globally average-pooled last stage, ``[B, 8 * nf]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.pool(out), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits over all ``n_outputs``, ``[B, n_outputs]``."""
        return self.head(self.features(x))

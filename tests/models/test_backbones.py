"""Tests of the backbone contract (features / head / feature_dim / forward) and of the published architectures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from cl_lightning.models.backbones import MLP, CosineLinear, ResNet18Reduced, SmallCNN

torch.set_num_threads(1)

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
# Small widths keep every forward pass in milliseconds; the architecture code path is the same as at full width.
FACTORIES = {
    "mlp": lambda shape, k: MLP(shape, k, hidden=[16, 8], dropout=0.5),
    "cnn": lambda shape, k: SmallCNN(shape, k, channels=[4, 8], hidden=12),
    "cnn_bn": lambda shape, k: SmallCNN(shape, k, channels=[4, 8, 8], hidden=12, batch_norm=True),
    "resnet": lambda shape, k: ResNet18Reduced(shape, k, nf=4),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_contract(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = FACTORIES[name](shape, 7).eval()  # eval: dropout and BN must not make two passes differ
    x = torch.randn(3, *shape)
    feats = net.features(x)
    logits = net(x)
    assert feats.shape == (3, net.feature_dim)
    assert logits.shape == (3, 7)
    assert isinstance(net.head, nn.Linear)
    assert (net.head.in_features, net.head.out_features) == (net.feature_dim, 7)
    assert torch.equal(logits, net.head(feats))


def test_default_widths_feature_dims() -> None:
    assert MLP((1, 28, 28), 10).feature_dim == 400
    assert SmallCNN((3, 32, 32), 10).feature_dim == 256
    assert ResNet18Reduced((3, 32, 32), 10).feature_dim == 160
    assert ResNet18Reduced((3, 32, 32), 10, nf=64).feature_dim == 512


def test_mlp_parameter_count_van_de_ven() -> None:
    net = MLP((1, 28, 28), 10, hidden=(400, 400))
    assert n_params(net) == 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10


def test_mlp_dropout_layers_only_when_requested() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in MLP((1, 4, 4), 2, hidden=[3, 3]).modules())
    drops = [m for m in MLP((1, 4, 4), 2, hidden=[3, 3], dropout=0.2).modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.2 for d in drops)


def test_mlp_empty_hidden_is_linear_classifier() -> None:
    net = MLP((1, 4, 4), 3, hidden=[])
    assert net.feature_dim == 16
    assert n_params(net) == 16 * 3 + 3


def test_mlp_accepts_listconfig() -> None:
    cfg = OmegaConf.create({"hidden": [100, 100], "input_shape": [1, 28, 28]})
    net = MLP(cfg.input_shape, 10, hidden=cfg.hidden)
    assert net.feature_dim == 100
    assert n_params(net) == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_mlp_xavier_init_is_mammoths() -> None:
    # Mammoth's MNISTMLP: weights U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), zero biases
    torch.manual_seed(0)
    net = MLP((1, 28, 28), 10, hidden=[100, 100], init="xavier")
    for m in (m for m in net.modules() if isinstance(m, nn.Linear)):
        bound = (6 / (m.in_features + m.out_features)) ** 0.5
        assert float(m.weight.abs().max()) <= bound and float(m.weight.abs().max()) > 0.9 * bound
        assert float(m.weight.std()) == pytest.approx(bound / 3**0.5, rel=0.05)
        assert not m.bias.any()
    default = MLP((1, 28, 28), 10, hidden=[100, 100])
    assert default.head.bias.any(), "the default keeps PyTorch's initialisation"
    with pytest.raises(ValueError, match="model.init"):
        MLP((1, 28, 28), 10, init="kaiming")


def _reduced_resnet18_params(c: int, nf: int, k: int) -> int:
    """Parameter count of GEM's reduced ResNet-18 by arithmetic (bias-free convs, BN has weight + bias)."""

    def block(cin: int, cout: int, stride: int) -> int:
        shortcut = cin * cout + 2 * cout if stride != 1 or cin != cout else 0
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout + shortcut

    total = 9 * c * nf + 2 * nf
    cin = nf
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        total += block(cin, mult * nf, stride) + block(mult * nf, mult * nf, 1)
        cin = mult * nf
    return total + 8 * nf * k + k


def test_resnet18_reduced_parameter_count() -> None:
    net = ResNet18Reduced((3, 32, 32), 10)
    assert n_params(net) == _reduced_resnet18_params(3, 20, 10) == 1_094_750
    # nf=64 is the standard CIFAR ResNet-18 (Mammoth's seq-cifar-10 backbone): 11,173,962 parameters.
    assert _reduced_resnet18_params(3, 64, 10) == 11_173_962


def test_resnet18_reduced_has_batchnorm_and_gradients_everywhere() -> None:
    torch.manual_seed(0)
    net = ResNet18Reduced((3, 32, 32), 5, nf=4).train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 8 * 2 + 3  # stem, two per block, three projection shortcuts
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_small_cnn_pooling_stops_at_side_one() -> None:
    # 8x8 with four stages: pools 8->4->2->1, the fourth stage keeps 1x1 instead of pooling to 0.
    net = SmallCNN((1, 8, 8), 3, channels=[2, 2, 2, 2], hidden=5)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_small_cnn_batch_norm_flag() -> None:
    plain = SmallCNN((1, 8, 8), 3, channels=[2], hidden=5)
    normed = SmallCNN((1, 8, 8), 3, channels=[2], hidden=5, batch_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == 2


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"hidden": [400, -1]}, ["model.hidden", "[400, -1]", "positive"]),
        ({"hidden": [400, 0]}, ["model.hidden", "[400, 0]"]),
        ({"hidden": [2.5]}, ["model.hidden", "[2.5]"]),
        ({"dropout": 1.0}, ["model.dropout", "1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["model.dropout", "-0.1", "[0, 1)"]),
        ({"n_outputs": 0}, ["model.n_outputs", "0", ">= 1"]),
        ({"input_shape": (28, 28)}, ["model.input_shape", "[28, 28]"]),
    ],
)
def test_mlp_validation_messages(kwargs: dict, fragments: list[str]) -> None:
    args = {"input_shape": (1, 28, 28), "n_outputs": 10, **kwargs}
    with pytest.raises(ValueError) as excinfo:
        MLP(**args)
    for fragment in fragments:
        assert fragment in str(excinfo.value)


@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        (lambda: SmallCNN((1, 8, 8), 3, channels=[4, 0]), ["model.channels", "[4, 0]"]),
        (lambda: SmallCNN((1, 8, 8), 3, channels=[]), ["model.channels", "[]"]),
        (lambda: SmallCNN((1, 8, 8), 3, hidden=-5), ["model.hidden", "-5"]),
        (lambda: SmallCNN((1, 8, 8), 0), ["model.n_outputs", "0"]),
        (lambda: ResNet18Reduced((3, 32, 32), 10, nf=0), ["model.nf", "0"]),
        (lambda: ResNet18Reduced((3, 32, 32), -2), ["model.n_outputs", "-2"]),
    ],
)
def test_cnn_validation_messages(factory, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as excinfo:
        factory()
    for fragment in fragments:
        assert fragment in str(excinfo.value)


def test_mlp_batch_norm_is_gdumbs_block() -> None:
    """``batch_norm``: Linear without bias, BatchNorm1d, ReLU per hidden layer; ``batch_norm_logits`` also normalises
    the logits (GDumb's FCBlock and FinalBlock), the head staying the linear layer."""
    net = MLP((1, 4, 4), 3, hidden=[5], batch_norm=True, batch_norm_logits=True)
    kinds = [type(m).__name__ for m in net.body]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU"] and net.body[1].bias is None
    assert isinstance(net.head, nn.Linear) and net.head.bias is None and isinstance(net.head_norm, nn.BatchNorm1d)
    net.eval()
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(net(x), net.head_norm(net.head(net.features(x))))
    plain = MLP((1, 4, 4), 3, hidden=[5])
    assert plain.head_norm is None and plain.head.bias is not None
    with pytest.raises(ValueError, match="model.batch_norm_logits"):
        MLP((1, 4, 4), 3, batch_norm_logits="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [lambda h: MLP((1, 4, 4), 3, hidden=[8, 6], head=h), lambda h: SmallCNN(
    (1, 4, 4), 3, channels=[2], hidden=6, head=h), lambda h: ResNet18Reduced((1, 4, 4), 3, nf=2, head=h)])  # fmt: skip
def test_cosine_head_is_lucirs_scaled_cosine_over_features_that_may_be_negative(factory) -> None:
    torch.manual_seed(0)
    net = factory("cosine")
    assert isinstance(net.head, CosineLinear) and float(net.head.sigma) == 1.0
    x = torch.rand(16, 1, 4, 4)
    feats = net.features(x)
    assert (feats < 0).any(), "no ReLU after the last hidden layer"
    expected = F.normalize(feats, dim=1) @ F.normalize(net.head.weight, dim=1).T
    torch.testing.assert_close(net(x), expected)
    with torch.no_grad():
        net.head.weight.mul_(7.0)  # a class's weight norm does not change its logit
    torch.testing.assert_close(net(x), expected)
    assert (factory("linear").features(x) >= 0).all(), "the linear head keeps the ReLU"
    with pytest.raises(ValueError, match="model.head"):
        factory("cosinus")

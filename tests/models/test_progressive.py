"""Progressive networks: routing by task, laterals from earlier columns only, freezing, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_lightning.models.progressive import LateralLayer, ProgressiveCNN, ProgressiveMLP

OUTPUTS = [[0, 1], [2, 3], [4, 5]]


def mlp(**kwargs) -> ProgressiveMLP:
    torch.manual_seed(0)
    return ProgressiveMLP((1, 4, 4), n_outputs=6, n_tasks=3, hidden=[8, 8], task_outputs=OUTPUTS, **kwargs)


def cnn(**kwargs) -> ProgressiveCNN:
    torch.manual_seed(0)
    kwargs = {"channels": [4, 8], "hidden": 8, **kwargs}
    return ProgressiveCNN((1, 8, 8), n_outputs=6, n_tasks=3, task_outputs=OUTPUTS, **kwargs)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_each_sample_is_classified_by_its_tasks_column(make) -> None:
    net = make().eval()
    x = torch.randn(6, 1, *((4, 4) if isinstance(net, ProgressiveMLP) else (8, 8)))
    tid = torch.tensor([0, 1, 2, 2, 1, 0])
    out = net(x, tid)
    for i in range(6):
        alone = net(x[i : i + 1], int(tid[i]))[0]
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-6)
        own = torch.zeros(6, dtype=torch.bool)
        own[OUTPUTS[int(tid[i])]] = True
        assert torch.isfinite(out[i][own]).all() and torch.isneginf(out[i][~own]).all(), "one head per task"
    assert net.features(x, tid).shape == (6, net.feature_dim)


def test_a_column_reads_earlier_columns_and_never_later_ones() -> None:
    net = mlp().eval()
    x = torch.randn(5, 1, 4, 4)
    before = [net(x, k) for k in range(3)]
    with torch.no_grad():
        for p in net.columns[2].parameters():
            p.add_(1.0)
    assert all(torch.equal(net(x, k), before[k]) for k in (0, 1)), "a later column never changes an earlier one"
    with torch.no_grad():
        for p in net.columns[0].parameters():
            p.add_(1.0)
    assert not torch.allclose(net(x, 1), before[1]), "column 1 reads column 0 through its laterals"
    # with its laterals from column 0 cut, column 1 no longer depends on column 0
    with torch.no_grad():
        for layer in net.columns[1]:
            for lateral in layer.laterals:
                for p in lateral.parameters():
                    p.zero_()
        reference = net(x, 1)
        for p in net.columns[0].parameters():
            p.add_(1.0)
    assert torch.equal(net(x, 1), reference)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_laterals_enter_every_layer_after_the_first_from_every_earlier_column(make) -> None:
    net = make()
    for k, column in enumerate(net.columns):
        layers = list(column)
        assert all(isinstance(layer, LateralLayer) for layer in layers)
        assert len(layers[0].laterals) == 0, "the first layer sees only the shared input"
        assert [len(layer.laterals) for layer in layers[1:]] == [k] * (len(layers) - 1)
    convs = [m for m in net.columns[2].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    # 4 convolutions, the 3 after the first with one lateral from each of the 2 earlier columns
    assert len(convs) == (3 * 2 if isinstance(net, ProgressiveCNN) else 0), "1x1 convolution laterals"


def test_parameters_per_column_count_the_column_its_laterals_and_its_head() -> None:
    net = ProgressiveMLP((1, 28, 28), n_outputs=10, n_tasks=5, hidden=[400, 400], task_outputs=[[0, 1]] * 5)
    expected = [(784 * 400 + 400) + (1 + k) * (400 * 400 + 400) + (1 + k) * (400 * 2 + 2) for k in range(5)]
    assert net.parameters_per_column() == expected
    full = ProgressiveMLP((1, 28, 28), n_outputs=10, n_tasks=2, hidden=[400, 400])
    assert full.parameters_per_column()[0] == 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10, "one head over all"


def test_freezing_stops_gradients_and_batch_norm_statistics_of_earlier_columns() -> None:
    net = cnn(batch_norm=True)
    net.freeze(2)
    net.train()
    assert net.training and not net.columns[0].training and not net.columns[1].training and net.columns[2].training
    frozen = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("columns.0.", "columns.1."))}
    assert any("running_mean" in k for k in frozen)
    net(torch.randn(16, 1, 8, 8), 2).logsumexp(1).sum().backward()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in frozen.items()), "batch-norm statistics kept"
    for k, column in enumerate(net.columns):
        grads = [p.grad for p in column.parameters()]
        if k < 2:
            assert all(g is None for g in grads) and not any(p.requires_grad for p in column.parameters())
        else:
            assert all(g is not None for g in grads)
    net.eval()
    net.train()
    assert not net.columns[0].training, "train() keeps frozen columns in evaluation mode"
    net.freeze(0)
    assert net.columns[0].training and all(p.requires_grad for p in net.columns[0].parameters())
    assert not any(p.requires_grad for c in net.columns[1:] for p in c.parameters()), "later columns wait their turn"


def test_bad_arguments_and_task_ids_are_named() -> None:
    with pytest.raises(ValueError, match="model.n_tasks"):
        ProgressiveMLP((1, 4, 4), n_outputs=6, n_tasks=0)
    with pytest.raises(ValueError, match="model.task_outputs"):
        ProgressiveMLP((1, 4, 4), n_outputs=6, n_tasks=3, task_outputs=[[0, 1], [6]])
    with pytest.raises(ValueError, match="model.dropout"):
        mlp(dropout=1.0)
    with pytest.raises(ValueError, match="model.init"):
        mlp(init="kaiming")
    with pytest.raises(ValueError, match="model.hidden"):
        cnn(hidden=0)
    net = mlp()
    with pytest.raises(ValueError, match="task ids hidden"):
        net(torch.zeros(2, 1, 4, 4), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="task_id must be in"):
        net(torch.zeros(2, 1, 4, 4), 3)


def test_tiny_inputs_skip_pooling_and_a_linear_column_has_no_laterals() -> None:
    net = ProgressiveCNN((1, 2, 2), n_outputs=4, n_tasks=2, channels=[4, 4], hidden=8)
    assert net(torch.zeros(3, 1, 2, 2), 1).shape == (3, 4)
    linear = ProgressiveMLP((1, 4, 4), n_outputs=4, n_tasks=2, hidden=[])
    assert linear.parameters_per_column() == [16 * 4 + 4] * 2 and linear.feature_dim == 16


def test_xavier_init_reaches_every_linear_layer_laterals_included() -> None:
    # as the MLP's option (Mammoth's MNISTMLP): Glorot-uniform weights, zero biases
    linears = [m for m in mlp(init="xavier").modules() if isinstance(m, nn.Linear)]
    assert any(m.out_features == 8 and m.in_features == 8 for m in linears), "laterals are among them"
    for m in linears:
        bound = (6 / (m.in_features + m.out_features)) ** 0.5
        assert float(m.weight.abs().max()) <= bound and not m.bias.any()
    assert any(m.bias.any() for m in mlp().modules() if isinstance(m, nn.Linear)), "default: PyTorch's init"

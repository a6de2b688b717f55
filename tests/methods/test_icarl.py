"""iCaRL: binary cross-entropy with labels for the new classes and the old network's sigmoid outputs for the old
ones, herding exemplars under a shared budget, and the nearest-mean-of-exemplars classifier filling the accuracy
matrix (instantiation, state round trip, resume and DDP: ``tests/test_contract.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.contract import CLMethod, check_combination
from cl_lightning.errors import ConfigError
from cl_lightning.methods.icarl import ICaRL
from cl_lightning.train import train

QUICK = ["method=icarl", "logger=none", "method.buffer_size=40", "optimizer=adam", "optimizer.lr=0.01"]


def fake_module() -> SimpleNamespace:
    return SimpleNamespace(prepare=lambda x, train=False: x.float())


def test_targets_are_labels_for_new_classes_and_the_old_network_for_old_ones() -> None:
    """Their Alg. 3 over the active classes: new classes 2-3 get one-hot labels, old classes 0-1 the teacher's
    ``sigmoid(z_old / T)``; classes 4-5 (not seen yet) are in neither the loss nor its gradient."""
    icarl = ICaRL(buffer_size=10, temperature=2.0)
    teacher = nn.Linear(5, 6)
    icarl.old.net = teacher
    icarl._active = torch.tensor([0, 1, 2, 3])
    icarl._old_classes = torch.tensor([True, True, False, False, False, False])
    x = torch.randn(3, 5)
    y = torch.tensor([2, 3, 3])
    logits = torch.randn(3, 6, requires_grad=True)
    loss = icarl.replay_terms(fake_module(), SimpleNamespace(x=x, y=y, task_id=torch.ones(3)), logits)["bce"]  # type: ignore[arg-type]

    with torch.no_grad():
        q = torch.sigmoid(teacher(x) / 2.0)
    targets = torch.cat([q[:, :2], F.one_hot(y - 2, 2).float()], dim=1)
    expected = F.binary_cross_entropy_with_logits(logits[:, :4], targets, reduction="none").sum(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None and (logits.grad[:, 4:] == 0).all() and (logits.grad[:, :4] != 0).all()


def test_exemplars_are_added_in_proportion_to_the_memory() -> None:
    icarl = ICaRL(buffer_size=100)
    icarl._n_task = 1000
    icarl.buffer.add_task(torch.zeros(200, 2), torch.arange(200) % 2, 0, torch.randn(200, 3))
    assert len(icarl.buffer) == 100
    assert icarl.replay_count(128) == round(128 * 100 / 1000)
    assert ICaRL(buffer_size=100, replay_batch_size=7).replay_count(128) == 7


def test_nme_predicts_the_nearest_normalised_class_mean_and_never_a_class_without_exemplars() -> None:
    icarl = ICaRL()
    icarl.means.update(torch.tensor([[2.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1]), 3, task=0)
    module = SimpleNamespace(net=SimpleNamespace(features=lambda x: x))
    inputs = torch.tensor([[3.0, 1.0], [0.1, 5.0], [0.0, 0.0001]])
    scores = icarl.eval_scores(module, inputs, 0, torch.zeros(3, 3))  # type: ignore[arg-type]
    assert scores.argmax(1).tolist() == [0, 1, 1]
    assert torch.isinf(scores[:, 2]).all()
    # the norm of a feature vector does not matter, only its direction
    torch.testing.assert_close(icarl.eval_scores(module, 10 * inputs[:2], 0, torch.zeros(2, 3)), scores[:2])  # type: ignore[arg-type]
    assert torch.equal(ICaRL(classifier="head").eval_scores(module, inputs, 0, torch.ones(3, 3)), torch.ones(3, 3))  # type: ignore[arg-type]


def test_the_accuracy_matrix_is_the_nme_classifiers_and_diagnostics_the_heads(make_cfg) -> None:
    """After the run: recompute the class means from the stored exemplars with the final network, classify the
    test data by nearest mean and by the head (among the seen classes), and compare with what the run reported."""
    run = train(make_cfg(*QUICK))
    icarl, module, dm = run.methods[0], run.module, run.datamodule
    assert isinstance(icarl, ICaRL)
    buf = icarl.buffer
    net = module.net.eval()
    with torch.no_grad():
        feats = F.normalize(net.features(module.prepare(buf.x[: buf.size])), dim=1)
        y = buf.y[: buf.size]
        assert torch.bincount(y).tolist() == [4] * 10, "the budget of 40 shared by the 10 classes seen"
        means = torch.stack([F.normalize(feats[y == c].mean(0), dim=0) for c in range(10)])
        torch.testing.assert_close(icarl.means.means, means)
        nme, head = [], []
        for task in dm.tasks:
            inputs = module.prepare(task.test_x)
            nme.append(torch.cdist(F.normalize(net.features(inputs), dim=1), means).argmin(1) == task.test_y)
            head.append(net(inputs).argmax(1) == task.test_y)
    assert run["acc_matrix"][-1] == pytest.approx([float(c.float().mean()) for c in nme], abs=1e-6)
    assert run["diagnostics"]["icarl"]["head_acc"] == pytest.approx([float(c.float().mean()) for c in head], abs=1e-6)
    assert run["avg_acc"] > 0.8, run["avg_acc"]


def test_the_teacher_is_the_network_of_the_previous_task_end(make_cfg) -> None:
    run = train(make_cfg(*QUICK, "max_tasks=2"))
    icarl = run.methods[0]
    assert icarl.old.task == 1 and icarl.means.task == 1
    for name, value in icarl.old.net.state_dict().items():
        assert torch.equal(value, run.module.net.state_dict()[name])
    assert all(not p.requires_grad for p in icarl.old.net.parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.scenario=domain_il", "does not support dataset.scenario=domain_il"),
        ("dataset.stream=online epochs_per_task=1", "needs task boundaries"),
        ("method.classifier=knn", "method.classifier"),
        ("method.temperature=0", "method.temperature"),
    ],
)
def test_refuses_what_it_is_not_defined_for(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*QUICK, *override.split()))


def test_two_classifiers_of_their_own_cannot_be_combined() -> None:
    class OtherClassifier(CLMethod):
        name = "other"

        def eval_scores(self, pl_module, inputs, task_id, logits):  # type: ignore[no-untyped-def]
            return logits

    with pytest.raises(ConfigError, match="both bring their own classifier"):
        check_combination([ICaRL(), OtherClassifier()])
    check_combination([ICaRL(), CLMethod()])

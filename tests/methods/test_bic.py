"""BiC: the bias layer changes only the new classes' logits, stage 2 trains it alone on the held-out data, held-out
samples are never trained on, lambda is the class ratio, the accuracy matrix is the corrected classifier's, state
round trip and resume (instantiation, mid-task SIGKILL resume and DDP: ``tests/test_contract.py``)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity
from torch import Tensor, nn

from cl_lightning.core.bias_correction import bias_loss
from cl_lightning.data.batch import Batch
from cl_lightning.errors import ConfigError
from cl_lightning.methods.bic import BiC
from cl_lightning.train import train

QUICK = ["method=bic", "logger=none", "method.buffer_size=40", "method.val_fraction=0.25"]
MASKS = torch.eye(3, dtype=torch.bool).repeat_interleave(2, 1)  # task t owns outputs 2t, 2t + 1


class FakeModule(nn.Module):
    """The parts of ``CLModule`` BiC's training step reads: a linear network, 3 tasks of 2 classes, class-IL."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 6)
        self.register_buffer("output_masks", MASKS.clone())
        self.scenario = "class_il"

    def forward(self, x: Tensor, task_id: Tensor | None = None) -> Tensor:
        return self.net(x)

    def prepare(self, x: Tensor, train: bool = False) -> Tensor:
        return x


def bic_at_task_2(module: FakeModule) -> BiC:
    """A BiC training task 2 (classes 4-5) after layers were fitted for task 1, without exemplars to replay."""
    bic = BiC(buffer_size=10)
    bic.alpha, bic.beta = torch.tensor([1.0, 0.6]), torch.tensor([0.0, -0.4])
    bic.old.take(nn.Linear(4, 6), 1)
    bic._seen, bic._old_idx, bic.lam = MASKS.any(0), torch.arange(4), 4 / 6
    bic._held_mask = torch.tensor([False, True, False, True, False, False, False, False])
    return bic


def test_the_bias_layer_changes_only_the_new_classes_logits() -> None:
    bic = BiC()
    z = torch.randn(5, 6)
    assert torch.equal(bic.correct(z, MASKS), z), "no layer fitted yet: the logits as they are"
    bic.alpha, bic.beta = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 3.0])  # task 1's layer, task 2 not yet fitted
    q = bic.correct(z, MASKS)
    assert torch.equal(q[:, :2], z[:, :2]) and torch.equal(q[:, 4:], z[:, 4:])
    torch.testing.assert_close(q[:, 2:4], 0.5 * z[:, 2:4] + 3.0)
    module = SimpleNamespace(output_masks=MASKS, seen_mask=lambda: MASKS[:2].any(0))
    scores = bic.eval_scores(module, torch.zeros(5, 4), 0, z)  # type: ignore[arg-type]
    torch.testing.assert_close(scores[:, :4], q[:, :4])
    assert torch.isinf(scores[:, 4:]).all(), "classes not seen yet are not classes of the network"


def test_held_out_samples_never_contribute_to_the_training_loss() -> None:
    """Samples 1 and 3 are held out: their logits get exactly zero gradient, and the loss is the one of the batch
    without them, lambda-weighted: ``lambda * L_d + (1 - lambda) * L_c`` on the corrected logits."""
    torch.manual_seed(0)
    module = FakeModule()
    bic = bic_at_task_2(module)
    x, y = torch.randn(4, 4), torch.tensor([4, 5, 5, 4])
    batch = Batch(x, y, torch.full((4,), -1), torch.tensor([0, 1, 2, 3]))
    logits = module(x).detach().requires_grad_(True)
    terms = bic.replay_terms(module, batch, logits)  # type: ignore[arg-type]
    sum(terms.values()).backward()  # type: ignore[union-attr]
    assert logits.grad is not None
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2]] != 0).all()

    keep = torch.tensor([0, 2])
    scale = torch.tensor([1.0, 1.0, 0.6, 0.6, 1.0, 1.0])
    shift = torch.tensor([0.0, 0.0, -0.4, -0.4, 0.0, 0.0])
    q = logits.detach()[keep] * scale + shift
    q_old = bic.old.net(x[keep]) * scale + shift
    ce = F.cross_entropy(q, y[keep])
    kd = -(F.softmax(q_old[:, :4] / 2, 1) * F.log_softmax(q[:, :4] / 2, 1)).sum(1).mean()
    torch.testing.assert_close(terms["ce"], (1 - 4 / 6) * ce)
    torch.testing.assert_close(terms["distill"], 4 / 6 * kd)


def test_held_out_new_samples_are_class_balanced_seeded_and_match_the_held_out_exemplars(make_cfg) -> None:
    runs = [train(make_cfg(*QUICK, "max_tasks=2", f"seed={s}")) for s in (0, 0, 1)]
    bic, dm = runs[0].methods[0], runs[0].datamodule
    assert isinstance(bic, BiC) and bic.held_task == 1
    assert torch.equal(bic.held, runs[1].methods[0].held) and not torch.equal(bic.held, runs[2].methods[0].held)
    # task 1 was trained with 20 exemplars per old class, 5 of each held out: 5 of each new class too
    assert torch.bincount(dm.tasks[1].train_y[bic.held]).tolist()[2:] == [5, 5]


def test_lambda_is_the_share_of_old_classes(make_cfg, monkeypatch) -> None:
    seen: dict[int, float] = {}
    original = BiC._prepare_task

    def record(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        original(self, trainer, pl_module)
        seen[int(pl_module.current_task)] = self.lam

    monkeypatch.setattr(BiC, "_prepare_task", record)
    train(make_cfg(*QUICK, "epochs_per_task=1"))
    # 5 tasks of 2 classes: n old, m = 2 new
    assert seen == pytest.approx({t: 2 * t / (2 * t + 2) for t in range(5)})


def test_stage_2_leaves_every_weight_bit_identical_and_lowers_the_validation_loss(make_cfg, monkeypatch) -> None:
    fits: list[tuple[bool, float, float]] = []
    original = BiC._fit_layer

    def checked(self, trainer, pl_module, t) -> None:  # type: ignore[no-untyped-def]
        if t == 0:  # no old classes, no validation set, no layer
            original(self, trainer, pl_module, t)
            assert self.alpha.tolist() == [1.0] and self.beta.tolist() == [0.0]
            return
        before = {k: v.clone() for k, v in pl_module.state_dict().items()}
        data = trainer.datamodule.tasks[t]
        x = torch.cat([self.buffer.x[self._val_slots], data.train_x[self.held]])
        y = torch.cat([self.buffer.y[self._val_slots], data.train_y[self.held]])
        with torch.no_grad():
            z = self.correct(pl_module.net.eval()(pl_module.prepare(x)), pl_module.output_masks)
        pl_module.net.train()
        original(self, trainer, pl_module, t)
        same = all(torch.equal(v, pl_module.state_dict()[k]) for k, v in before.items())
        new, seen = pl_module.output_masks[t], pl_module.seen_mask()
        loss_before = bias_loss(z, y, new, seen, torch.tensor(1.0), torch.tensor(0.0))
        loss_after = bias_loss(z, y, new, seen, self.alpha[t], self.beta[t])
        fits.append((same, float(loss_before), float(loss_after)))

    monkeypatch.setattr(BiC, "_fit_layer", checked)
    train(make_cfg(*QUICK, "max_tasks=3"))
    assert len(fits) == 2
    for same, before, after in fits:
        assert same, "stage 2 changed a weight of the network"
        assert after < before, (before, after)


def test_the_accuracy_matrix_is_the_corrected_classifiers(make_cfg) -> None:
    """After the run: apply every task's fitted layer to the final network's logits and compare the argmax with the
    accuracy matrix's last row; the uncorrected head's accuracy is the diagnostics'."""
    run = train(make_cfg(*QUICK))
    bic, module, dm = run.methods[0], run.module, run.datamodule
    assert isinstance(bic, BiC)
    assert len(bic.alpha) == 5 and bool((bic.alpha[1:] != 1).all()), "a layer was fitted at every task end from 1"
    net = module.net.eval()
    corrected, raw = [], []
    with torch.no_grad():
        for task in dm.tasks:
            z = net(module.prepare(task.test_x))
            q = z.clone()
            for j in range(5):
                cols = module.output_masks[j]
                q[:, cols] = bic.alpha[j] * z[:, cols] + bic.beta[j]
            corrected.append(q.argmax(1) == task.test_y)
            raw.append(z.argmax(1) == task.test_y)
    assert run["acc_matrix"][-1] == pytest.approx([float(c.float().mean()) for c in corrected], abs=1e-6)
    diagnostics = run["diagnostics"]["bic"]
    assert diagnostics["uncorrected_acc"] == pytest.approx([float(c.float().mean()) for c in raw], abs=1e-6)
    assert diagnostics["alpha"] == pytest.approx(bic.alpha.tolist(), abs=1e-6)
    assert run["avg_acc"] > 0.8, run["avg_acc"]


def test_state_round_trips_and_restores_the_corrected_classifier(make_cfg) -> None:
    run = train(make_cfg(*QUICK, "max_tasks=3"))
    bic = run.methods[0]
    state = bic.state_dict()
    assert state["corrected"] == 2 and state["held_task"] == 2 and state["teacher_task"] == 2
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = BiC(buffer_size=40, val_fraction=0.25)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.alpha, bic.alpha) and torch.equal(fresh.beta, bic.beta)
    assert torch.equal(fresh.held, bic.held) and fresh.carry == bic.carry and fresh.corrected == 2
    z = torch.randn(3, 10)
    masks = run.module.output_masks
    assert torch.equal(fresh.correct(z, masks), bic.correct(z, masks))
    fresh.old.attach(run.module.net)
    for name, value in bic.old.net.state_dict().items():
        assert torch.equal(fresh.old.net.state_dict()[name], value)


def test_resumed_after_two_tasks_equals_uninterrupted(make_cfg) -> None:
    assert_resume_parity(make_cfg, *QUICK)


def test_proportional_replay_adds_each_exemplar_once_per_epoch_in_expectation() -> None:
    bic = BiC(buffer_size=10)
    bic._train_slots, bic._n_new = torch.arange(45), 1200  # 45 exemplars, 1200 new samples, batches of 10
    counts = [bic.replay_count(10) for _ in range(120)]
    assert sum(counts) == 120 * 10 * 45 // 1200 and set(counts) == {0, 1}, "0.375 per step: rounding would give 0"
    assert BiC(replay_batch_size=7).replay_count(10) == 0, "nothing to replay without exemplars"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.scenario=domain_il", "domain-IL tasks share all outputs"),
        ("dataset.stream=online epochs_per_task=1", "needs task boundaries"),
        ("method.val_fraction=1.0", "method.val_fraction"),
        ("method.selection=reservoir", "method.selection"),
        ("method.bias_lr=0", "method.bias_lr"),
    ],
)
def test_refuses_what_it_is_not_defined_for(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*QUICK, *override.split()))

"""LwF: a frozen teacher copied at the task end, distillation over the old outputs (instantiation, state round
trip and resume: ``tests/test_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cl_lightning.core.distill import distillation_loss
from cl_lightning.errors import ConfigError
from cl_lightning.methods.lwf import LwF
from cl_lightning.models.backbones import MLP
from cl_lightning.train import train

QUICK = ["method=lwf", "logger=none", "epochs_per_task=2"]


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


def net_from(state_dict: dict[str, torch.Tensor], prefix: str = "net.") -> MLP:
    weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    net = MLP((1, 4, 4), weights["head.weight"].shape[0], hidden=(400, 400))
    net.load_state_dict(weights)
    return net.eval()


@pytest.mark.parametrize(
    ("override", "message"), [("method.alpha=-1", "method.alpha=-1"), ("method.temperature=0", "method.temperature=0")]
)
def test_bad_values_fail_with_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("method=lwf", override, "logger=none"))


def test_teacher_is_a_frozen_copy_of_the_task_end_weights(make_cfg) -> None:
    cfg = make_cfg(*QUICK, "max_tasks=1")
    train(cfg)
    ckpt = checkpoint(cfg)
    teacher = ckpt["callbacks"]["LwF[lwf]"]["teacher"]
    assert ckpt["callbacks"]["LwF[lwf]"]["teacher_task"] == 0
    for name, value in teacher.items():
        assert torch.equal(value, ckpt["state_dict"][f"net.{name}"])
    # resumed: the teacher is rebuilt from the state, and replaced by a copy at the end of task 1
    train(make_cfg("resume=" + cfg.paths.output_dir, "logger=none", "max_tasks=1"))
    after = checkpoint(cfg)["callbacks"]["LwF[lwf]"]
    assert after["teacher_task"] == 1
    lwf = LwF()
    lwf.load_state_dict(after)
    assert lwf.teacher is None and lwf.teacher_task == 1


@pytest.mark.parametrize("scenario", ["class_il", "domain_il"])
def test_distillation_keeps_old_outputs_close_to_the_teacher(make_cfg, scenario: str) -> None:
    """The invariant of Li & Hoiem: on the new task's data, the old outputs stay what the old network said.

    (Task-IL is left out here: on blobs, naive fine-tuning of a masked multi-head model barely moves the old head's
    answers either, so there is nothing to compare.)"""
    common = ["logger=none", f"dataset.scenario={scenario}"]
    first = make_cfg("method=lwf", "method.alpha=5", *common, "max_tasks=1")
    train(first)
    teacher = net_from(checkpoint(first)["state_dict"])
    train(make_cfg("resume=" + first.paths.output_dir, "logger=none", "max_tasks=1"))
    lwf_net = net_from(checkpoint(first)["state_dict"])
    naive = make_cfg("method=naive", *common, "max_tasks=2")
    train(naive)
    naive_net = net_from(checkpoint(naive)["state_dict"])
    from helpers.synthetic import blobs

    data = blobs()
    task1 = (data.train_y == 2) | (data.train_y == 3)
    x = data.train_x[task1].float() / 255
    old = torch.tensor([[0, 1]])  # task 0's head, the classes seen before task 1, the shared head: outputs 0 and 1
    with torch.no_grad():
        target = teacher(x)
        lwf_gap = distillation_loss(lwf_net(x), target, old, 2.0)
        naive_gap = distillation_loss(naive_net(x), target, old, 2.0)
    assert lwf_gap < 0.2 * naive_gap, (float(lwf_gap), float(naive_gap))


@pytest.mark.parametrize("scenario", ["task_il", "class_il"])
def test_distillation_is_zero_at_the_start_of_the_next_task(make_cfg, monkeypatch, scenario: str) -> None:
    """The term LwF adds in training is zero at the first step of the next task (the teacher is the network as it
    ended the task, frozen, in eval mode, on the same inputs) and grows as the network moves away from it (the
    teacher is a copy, not the network itself, whose distillation would always be zero)."""
    seen: list[tuple[int, float]] = []
    teachers: list[tuple[object, object]] = []
    loss_terms = LwF.loss_terms

    def recording(self, pl_module, batch, logits):
        terms = loss_terms(self, pl_module, batch, logits)
        if "distill" in terms:
            seen.append((int(pl_module.current_task), float(terms["distill"].detach())))
            teachers.append((self.teacher, pl_module.net))
        return terms

    monkeypatch.setattr(LwF, "loss_terms", recording)
    train(make_cfg(*QUICK, "max_tasks=2", f"dataset.scenario={scenario}"))
    assert seen and {task for task, _ in seen} == {1}, "distillation only once there is a teacher"
    assert seen[0][1] == pytest.approx(0.0, abs=1e-7)
    assert max(value for _, value in seen) > 1e-6, "the network moves away from the teacher while learning task 1"
    teacher, student = teachers[-1]
    assert teacher is not student and not teacher.training  # type: ignore[attr-defined]
    student_storage = {p.data_ptr() for p in student.parameters()}  # type: ignore[attr-defined]
    assert all(not p.requires_grad and p.data_ptr() not in student_storage for p in teacher.parameters())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("scenario", "groups"),
    [("task_il", [[0, 1], [2, 3]]), ("class_il", [[0, 1, 2, 3]]), ("domain_il", [[0, 1]])],
)
def test_distilled_outputs_follow_the_scenario(scenario: str, groups: list[list[int]]) -> None:
    if scenario == "domain_il":
        masks = torch.zeros(5, 2, dtype=torch.bool)
        masks[:, :] = True
    else:
        masks = torch.zeros(5, 10, dtype=torch.bool)
        for t in range(5):
            masks[t, 2 * t : 2 * t + 2] = True
    module = SimpleNamespace(current_task=torch.tensor(2), output_masks=masks, scenario=scenario)
    got = LwF.groups(module)  # type: ignore[arg-type]
    assert torch.is_tensor(got) and got.tolist() == groups


@pytest.mark.parametrize("scenario", ["task_il", "domain_il", "class_il"])
def test_runs_in_every_scenario(make_cfg, scenario: str) -> None:
    results = train(make_cfg(*QUICK, f"dataset.scenario={scenario}"))
    assert results["complete"] and results["scenario"] == scenario


@pytest.mark.parametrize(("scenario", "per_task"), [("class_il", True), ("task_il", False)])
def test_alpha_tasks_weights_by_the_number_of_previous_tasks(make_cfg, monkeypatch, scenario, per_task) -> None:
    """``alpha=tasks`` (van de Ven & Tolias): in task ``t`` the term is ``t`` times the mean over the old groups:
    ``t`` times the distillation of the one group of class-IL, the sum over the ``t`` old heads of task-IL."""
    seen: list[tuple[int, float, float]] = []
    loss_terms = LwF.loss_terms

    def recording(self, pl_module, batch, logits):
        terms = loss_terms(self, pl_module, batch, logits)
        if "distill" in terms:
            with torch.no_grad():
                teacher = self.teacher(pl_module.prepare(batch.x, train=False))
            plain = distillation_loss(logits, teacher, self._groups, self.temperature)
            seen.append((int(pl_module.current_task), float(terms["distill"].detach()), float(plain)))
        return terms

    monkeypatch.setattr(LwF, "loss_terms", recording)
    train(make_cfg(*QUICK, "method.alpha=tasks", "max_tasks=3", f"dataset.scenario={scenario}"))
    assert {task for task, _, _ in seen} == {1, 2}
    for task, term, plain in seen:
        assert term == pytest.approx((task if per_task else 1) * plain, rel=1e-5, abs=1e-9)


def test_seen_outputs_pull_the_new_classes_down_from_the_first_step(make_cfg, monkeypatch) -> None:
    """``class_il_outputs=seen``: the targets put no mass on the current task's classes, so the term is positive at
    the first step of task 1 (where ``old``, over the old classes only, is zero) and its gradient lowers those
    classes' logits on the new data."""
    first: dict[str, float] = {}
    loss_terms = LwF.loss_terms

    def recording(self, pl_module, batch, logits):
        terms = loss_terms(self, pl_module, batch, logits)
        if "distill" in terms and self.class_il_outputs not in first:
            first[self.class_il_outputs] = float(terms["distill"].detach())
        return terms

    monkeypatch.setattr(LwF, "loss_terms", recording)
    for outputs in ("old", "seen"):
        train(make_cfg(*QUICK, f"method.class_il_outputs={outputs}", "max_tasks=2", "dataset.scenario=class_il"))
    assert first["old"] == pytest.approx(0.0, abs=1e-7)
    assert first["seen"] > 1e-3


@pytest.mark.parametrize(("scenario", "outputs"), [("class_il", "seen"), ("class_il", "all"), ("task_il", "seen")])
def test_class_mean_averages_each_term_over_its_classes(make_cfg, monkeypatch, scenario: str, outputs: str) -> None:
    """``class_mean`` (van de Ven & Tolias's 2019 ``loss_fn_kd``: a mean over the batch and the classes): the padded
    class-IL term is the summed one divided by the number of classes seen so far; in task-IL each old head's term
    by its 2 classes."""
    seen: list[tuple[float, float, int]] = []
    loss_terms = LwF.loss_terms

    def recording(self, pl_module, batch, logits):
        terms = loss_terms(self, pl_module, batch, logits)
        if "distill" in terms:
            self.class_mean = False
            summed = loss_terms(self, pl_module, batch, logits)["distill"]
            self.class_mean = True
            n_seen = int(pl_module.output_masks[: int(pl_module.current_task) + 1].any(0).sum())
            n = (n_seen if outputs == "seen" else 10) if padded else 2
            seen.append((float(terms["distill"].detach()), float(summed.detach()), n))
        return terms

    padded = scenario == "class_il"
    monkeypatch.setattr(LwF, "loss_terms", recording)
    overrides = ["method.alpha=tasks", "method.class_il_outputs=seen", "method.class_mean=true", "max_tasks=3"]
    train(make_cfg(*QUICK, *overrides, f"dataset.scenario={scenario}", f"module.train_outputs={outputs}"))
    expected = ({4, 6} if outputs == "seen" else {10}) if padded else {2}  # tasks 1 and 2, 2 classes each
    assert {n for _, _, n in seen} == expected
    for term, summed, n_seen in seen:
        assert term == pytest.approx(summed / n_seen, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.alpha=often", "method.alpha='often'"),
        ("method.class_il_outputs=new", "method.class_il_outputs='new'"),
        ("method.class_mean=2", "method.class_mean=2"),
    ],
)
def test_bad_choices_fail_with_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("method=lwf", override, "logger=none"))

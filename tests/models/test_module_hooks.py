"""The module's extension points for methods that own part of the model or the objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.hooks import ExtraEpochs, RecordingView, TaskRoutedNet

from cl_lightning.errors import ConfigError
from cl_lightning.train import train

TASK_IL = ["dataset.scenario=task_il", "logger=none", "epochs_per_task=1"]


def test_task_conditioned_network_gets_each_samples_task_in_training_and_evaluation(make_cfg) -> None:
    TaskRoutedNet.calls.clear()
    routed = ["model._target_=helpers.hooks.TaskRoutedNet", "~model.hidden", "~model.dropout", "~model.init"]
    cfg = make_cfg(*TASK_IL, *routed, "epochs_per_task=4")
    results = train(cfg)
    assert results["complete"]
    seen = torch.cat(TaskRoutedNet.calls).unique().tolist()
    assert seen == list(range(5)), "every task's id reached the network (n_tasks was passed to its factory)"
    # each task's classifier learned its task and was left alone afterwards: routing is real
    matrix = results["acc_matrix"]
    assert min(matrix[t][t] for t in range(5)) > 0.9 and matrix[-1] == [matrix[t][t] for t in range(5)]


def test_every_evaluation_runs_inside_the_methods_task_view(make_cfg) -> None:
    RecordingView.views.clear()
    train(make_cfg(*TASK_IL, "method._target_=helpers.hooks.RecordingView", "max_tasks=2"))
    # the initial evaluation and one per task, each over all 5 tasks' test sets, batch by batch
    assert set(RecordingView.views) == set(range(5)) and len(RecordingView.views) >= 3 * 5


def test_a_method_can_replace_the_task_loss(make_cfg) -> None:
    # the objective is zero: the weights never move, so accuracy after the task is that of the initial model
    results = train(make_cfg(*TASK_IL, "method._target_=helpers.hooks.OwnObjective", "max_tasks=1"))
    trained = train(make_cfg(*TASK_IL, "max_tasks=1"))
    assert results["acc_matrix"][0][0] == pytest.approx(results["init_acc"][0])
    assert trained["acc_matrix"][0][0] != pytest.approx(trained["init_acc"][0]), "the plain task loss does train"


def test_two_methods_replacing_the_task_loss_are_refused(make_cfg) -> None:
    cfg = make_cfg(
        *TASK_IL, "method._target_=helpers.hooks.OwnObjective", "+hybrid.b._target_=helpers.hooks.OtherObjective"
    )
    with pytest.raises(ConfigError, match="both replace the task loss"):
        train(cfg)


def test_extra_epochs_lengthen_every_task(make_cfg, monkeypatch) -> None:
    made: list[ExtraEpochs] = []
    original = ExtraEpochs.__init__

    def record(self) -> None:
        original(self)
        made.append(self)

    monkeypatch.setattr(ExtraEpochs, "__init__", record)
    train(make_cfg(*TASK_IL, "method._target_=helpers.hooks.ExtraEpochs", "max_tasks=3"))
    assert made[0].epochs == {0: 3, 1: 3, 2: 3}


def test_method_diagnostics_reach_results_and_the_logger(make_cfg) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(
        "dataset.scenario=task_il", "epochs_per_task=1", "method._target_=helpers.hooks.Reporting", "max_tasks=3"
    )
    results = train(cfg)
    assert results["diagnostics"] == {"reporting": {"tasks_ended": 3, "ended": [0, 1, 2]}}
    (events,) = (Path(cfg.paths.output_dir) / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("diagnostics/reporting/tasks_ended")]
    assert logged == [1.0, 2.0, 3.0]


def test_a_method_trains_its_own_model_once_per_step(make_cfg) -> None:
    """The fourth door: ``auxiliary_step`` runs once in every training step and trains only the method's model."""
    run = train(make_cfg(*TASK_IL, "method._target_=helpers.hooks.OwnModel", "max_tasks=2"))
    (method,) = run.methods
    steps = [step for step, _ in method.calls]
    assert steps == list(range(run.trainer.global_step)), "one call per optimizer step, in order"
    assert all(untouched for _, untouched in method.calls)
    assert method.model.weight.grad is not None


def test_methods_without_a_model_of_their_own_are_not_called_per_step(make_cfg, monkeypatch) -> None:
    from cl_lightning.contract import CLMethod

    def fail(self, pl_module, batch):  # the base class's no-op, which the module must not even call
        raise AssertionError("called")

    monkeypatch.setattr(CLMethod, "auxiliary_step", fail)
    run = train(make_cfg(*TASK_IL, "method=naive", "max_tasks=1"))
    assert run["tasks_completed"] == 1


# ------------------------------------------------------------------ the optimizer step (manual optimization)
class _StepSizes(__import__("lightning.pytorch").pytorch.Callback):
    """Records the norm of every optimizer step's weight change."""

    def __init__(self) -> None:
        self.sizes: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.net.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = torch.cat([p.detach().reshape(-1) for p in pl_module.net.parameters()])
        self.sizes.append(float((after - self.before).norm()))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_trainer_gradient_clip_val_clips_every_step(make_cfg, algorithm: str) -> None:
    """``trainer.gradient_clip_val`` keeps working with the module's own optimizer step: with plain SGD (lr 0.1) a
    step moves the weights by lr times the clipped gradient, so by at most 0.1 * 1e-3 in norm (``norm``), or
    0.1 * 1e-4 per weight (``value``); unclipped steps on the same run are far larger."""
    from cl_lightning.build import build_run

    sizes = {}
    for clip in (None, 1e-3 if algorithm == "norm" else 1e-4):
        cfg = make_cfg(
            "logger=none", "max_tasks=1", "epochs_per_task=1", "optimizer=sgd", "optimizer.lr=0.1",
            f"trainer.gradient_clip_val={clip or 'null'}", f"+trainer.gradient_clip_algorithm={algorithm}",
        )  # fmt: skip
        module, dm, methods, trainer, _ = build_run(cfg, Path(cfg.paths.output_dir))
        recorder = _StepSizes()
        trainer.callbacks.append(recorder)  # type: ignore[attr-defined]
        dm.set_task(0)
        trainer.fit(module, datamodule=dm)
        sizes[clip] = recorder.sizes
    unclipped, clipped = sizes[None], next(v for k, v in sizes.items() if k is not None)
    n_weights = sum(p.numel() for p in module.net.parameters())
    bound = 0.1 * 1e-3 if algorithm == "norm" else 0.1 * 1e-4 * n_weights**0.5
    assert len(clipped) == len(unclipped) > 0
    assert max(clipped) <= bound * (1 + 1e-4), "every step is clipped"
    assert min(unclipped) > 10 * bound, "without the clip the steps are larger: the bound is not vacuous"


def test_gradient_accumulation_is_refused_in_one_line(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=2: not supported.*raise batch_size"):
        train(make_cfg("logger=none", "+trainer.accumulate_grad_batches=2"))


def test_an_unknown_gradient_clip_algorithm_is_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_algorithm='l3': choose 'norm' or 'value'"):
        train(make_cfg("logger=none", "trainer.gradient_clip_val=1.0", "+trainer.gradient_clip_algorithm=l3"))


def test_a_precision_lightning_would_replace_is_refused(make_cfg) -> None:
    """fp16 autocast needs a GPU: Lightning would train ``16-mixed`` in bf16 on the CPU with a warning; the run
    refuses instead, naming both."""
    cfg = make_cfg("logger=none", "trainer.accelerator=cpu", "trainer.precision=16-mixed")
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed: not available on this CPU .*bf16-mixed"):
        train(cfg)

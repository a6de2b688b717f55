"""Progressive networks: config, refusals, frozen columns and unchanged old accuracy, parameters, state, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.methods import assert_resume_parity
from hydra.utils import instantiate
from methods.test_er import assert_mid_task_resume

from cl_lightning.errors import ConfigError
from cl_lightning.methods.pnn import PNN
from cl_lightning.models.progressive import ProgressiveCNN, ProgressiveMLP
from cl_lightning.train import train

BASE = ["method=pnn", "dataset.scenario=task_il", "logger=none"]
SMALL = [*BASE, "epochs_per_task=2", "model.hidden=[16,16]"]
# batch-norm statistics need more steps than the 4x4 blobs give in 2 epochs
CNN_BN = [*BASE, "epochs_per_task=8", "model=pnn_cnn", "model.channels=[4]", "model.hidden=16", "model.batch_norm=true"]
# with the optimizer kept across tasks, momentum and weight decay would move any frozen weight they were given
SGD_KEPT = ["optimizer.momentum=0.9", "optimizer.weight_decay=0.01", "module.reset_optimizer=false"]


def record_task_ends(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """At each task's end: the module and a copy of the network's state (parameters and batch-norm buffers)."""
    ends: list[dict] = []
    original = PNN.on_task_end

    def record(self, trainer, pl_module, task_id) -> None:
        original(self, trainer, pl_module, task_id)
        state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
        ends.append({"module": pl_module, "state": state, "task": task_id})

    monkeypatch.setattr(PNN, "on_task_end", record)
    return ends


def test_config_instantiates_with_its_own_network(make_cfg) -> None:
    cfg = make_cfg("method=pnn")
    assert isinstance(instantiate(cfg.method), PNN)
    assert cfg.model._target_.endswith("ProgressiveMLP") and list(cfg.model.hidden) == [400, 400]
    net = instantiate(make_cfg("method=pnn", "model=pnn_cnn").model)((1, 8, 8), n_outputs=4, n_tasks=2)
    assert isinstance(net, ProgressiveCNN)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=mlp", "method=pnn needs a progressive network, got model MLP; use model=pnn_mlp or model=pnn_cnn"),
        ("dataset.scenario=class_il", "method=pnn does not support dataset.scenario=class_il; use one of task_il"),
        ("dataset.scenario=domain_il", "does not support dataset.scenario=domain_il"),
        ("dataset.stream=online", "needs task boundaries"),
    ],
)
def test_refuses_what_it_cannot_run_at_setup(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg(*BASE, "epochs_per_task=1", override))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "run", [CNN_BN, [*CNN_BN, *SGD_KEPT], [*SMALL, "optimizer=adam", "optimizer.lr=0.01", "model.dropout=0.3"]]
)
def test_old_columns_are_bit_identical_and_old_accuracy_never_changes(make_cfg, monkeypatch, run) -> None:
    ends = record_task_ends(monkeypatch)
    results = train(make_cfg(*run))
    net = ends[-1]["module"].net
    final = net.state_dict()
    for end in ends[:-1]:
        t = end["task"]
        column = {k: v for k, v in end["state"].items() if k.startswith(f"columns.{t}.")}
        assert any("running_var" in k for k in column) == ("model.batch_norm=true" in run)
        for key, value in column.items():
            assert torch.equal(final[key], value), f"{key} moved after task {t}"
    matrix = results["acc_matrix"]
    for t in range(5):
        assert [row[t] for row in matrix[t:]] == [matrix[t][t]] * (5 - t), f"task {t}'s accuracy changed"
    assert results["forgetting"] == 0.0 and results["avg_acc"] > 0.9


def test_reports_the_parameters_of_each_column(make_cfg) -> None:
    results = train(make_cfg(*SMALL))
    # blobs: 1x4x4 inputs, 2 outputs per task, hidden [16, 16]; column k has k laterals into layer 2 and the head
    expected = [(16 * 16 + 16) + (1 + k) * (16 * 16 + 16) + (1 + k) * (16 * 2 + 2) for k in range(5)]
    assert results["diagnostics"]["pnn"] == {"parameters_per_task": expected, "parameters_total": sum(expected)}


def test_state_round_trip(make_cfg, monkeypatch) -> None:
    # the columns are the network's weights: the checkpoint rebuilds the network exactly; the method has no state
    ends = record_task_ends(monkeypatch)
    cfg = make_cfg(*SMALL, "max_tasks=2")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"].get("PNN[pnn]", {}) == {}
    weights = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    module = ends[-1]["module"]
    outputs = [t.tolist() for t in module.trainer.datamodule.task_outputs]
    fresh = ProgressiveMLP((1, 4, 4), n_outputs=10, n_tasks=5, hidden=[16, 16], task_outputs=outputs)
    fresh.load_state_dict(weights)  # strict: every column, lateral and head
    x = torch.rand(8, 1, 4, 4)
    module.net.eval()
    for t in range(5):
        assert torch.equal(fresh.eval()(x, t), module.net(x, t))


def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg) -> None:
    # the resumed run freezes the columns of the tasks already learned again (at setup, from the current task)
    assert_resume_parity(make_cfg, *SMALL, "optimizer=adam", "optimizer.lr=0.01")


@pytest.mark.slow  # three command-line runs
def test_sigkill_mid_task_then_resume_is_bit_identical(tmp_path: Path) -> None:
    run = [*CNN_BN, "dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs", "batch_size=16",
           "threads=1"]  # fmt: skip
    got, _, _ = assert_mid_task_resume(tmp_path, run)
    assert got["forgetting"] == 0.0

"""PackNet: config, frozen weights, disjoint shares, free capacity, task views, state and resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.methods import assert_resume_parity
from hydra.utils import instantiate

from cl_lightning.core.pruning import FREE
from cl_lightning.errors import ConfigError
from cl_lightning.methods.packnet import PackNet
from cl_lightning.train import train

REPO = Path(__file__).resolve().parents[2]
SMALL = ["method=packnet", "dataset.scenario=task_il", "logger=none", "epochs_per_task=2"]
# momentum and weight decay move weights whose gradient is zero: the restore after each step must undo it
SGD_MOMENTUM_DECAY = ["optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.weight_decay=0.01"]
CNN_BN = ["model=cnn", "model.channels=[4]", "model.hidden=32", "model.batch_norm=true"]


def record_task_ends(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """After each task's end (pruned, before evaluation): the method, the module and copies of everything."""
    ends: list[dict] = []
    original = PackNet.on_task_end

    def record(self, trainer, pl_module, task_id) -> None:
        original(self, trainer, pl_module, task_id)
        ends.append(
            {
                "method": self,
                "module": pl_module,
                "net": copy.deepcopy(pl_module.net),
                "state": {k: v.clone() for k, v in pl_module.net.state_dict().items()},
                "owners": {k: v.clone() for k, v in self.owners.items()},
            }
        )

    monkeypatch.setattr(PackNet, "on_task_end", record)
    return ends


def cli(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "CL_OUTPUT_DIR": str(out), "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "cl_lightning", *args], capture_output=True, text=True, timeout=300, env=env, cwd=out
    )


def test_config_instantiates(make_cfg) -> None:
    method = instantiate(make_cfg("method=packnet").method)
    assert isinstance(method, PackNet) and method.name == "packnet" and method.gradient_edit == "mask"
    assert method.prune_ratio == 0.8 and method.retrain_epochs == 1 and method.extra_epochs() == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.prune_ratio=1.0", "method.prune_ratio=1.0: must be a number in (0, 1)"),
        ("method.prune_ratio=0", "method.prune_ratio=0: must be a number in (0, 1)"),
        ("method.retrain_epochs=-1", "method.retrain_epochs=-1: must be an integer >= 0"),
        ("method.retrain_epochs=1.5", "method.retrain_epochs=1.5"),
    ],
)
def test_bad_values_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg(*SMALL, override))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.scenario=class_il"], "does not support dataset.scenario=class_il"),
        (["+method@hybrid.gem=gem"], "packnet (mask) and gem (projection) both edit gradients"),
    ],
)
def test_refused_at_setup_with_the_reason(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg(*SMALL, *overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "extra", [SGD_MOMENTUM_DECAY, ["optimizer=adam", "optimizer.lr=0.01", "optimizer.weight_decay=0.01", *CNN_BN]]
)
def test_frozen_weights_stay_bit_identical_and_shares_are_disjoint(make_cfg, monkeypatch, extra: list[str]) -> None:
    ends = record_task_ends(monkeypatch)
    results = train(make_cfg(*SMALL, *extra))
    final = ends[-1]["module"].net.state_dict()
    prunable = ends[-1]["method"].prunable
    for t, end in enumerate(ends):
        owners = end["owners"]
        for name, value in end["state"].items():
            if name in owners:
                mine = (owners[name] >= 0) & (owners[name] <= t)
                assert torch.equal(final[name][mine], value[mine]), f"{name}: weights of tasks <= {t} moved"
                if name in prunable:
                    assert not value[owners[name] == FREE].any(), f"{name}: released weights are zero at task end"
            elif t == 0:  # biases, BatchNorm parameters and running statistics: the first task's, for good
                assert torch.equal(final[name], value), f"{name} changed after the first task"
        if t > 0:  # what task t changed is its own share, or weights it trained and released (now free, zero)
            before, prev_owners = ends[t - 1]["state"], ends[t - 1]["owners"]
            for name in prunable:
                changed = end["state"][name] != before[name]
                assert changed.any(), f"{name}: task {t} trained nothing"
                assert bool((prev_owners[name][changed] == FREE).all()), "only weights that were free moved"
                assert set(owners[name][changed].unique().tolist()) <= {t, FREE}, "task shares are disjoint"
    matrix = results["acc_matrix"]
    assert matrix[-1] == [matrix[t][t] for t in range(5)], "zero forgetting: the last row is the diagonal"
    assert min(matrix[t][t] for t in range(5)) > 0.8, "every task learned in its share"


def test_task_view_is_the_network_as_it_was_at_the_end_of_that_task(make_cfg, monkeypatch) -> None:
    ends = record_task_ends(monkeypatch)
    train(make_cfg(*SMALL, *SGD_MOMENTUM_DECAY))
    method, module = ends[-1]["method"], ends[-1]["module"]
    x = torch.rand(32, 1, 4, 4)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    with torch.no_grad():
        for t, end in enumerate(ends[:-1]):
            end["net"].eval()
            module.eval()
            with method.task_view(module, t):
                mine = module.output_masks[t]  # the task's logits (the others are masked in task-IL)
                assert torch.equal(module(x, t)[:, mine], end["net"](x)[:, mine]), f"the model of task {t}"
            assert not torch.equal(module(x, t)[:, mine], end["net"](x)[:, mine]), "outside the view: all weights"
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items()), "the view restores everything"


@pytest.mark.parametrize(("ratio", "retrain"), [(0.5, 1), (0.8, 0)])
def test_free_capacity_shrinks_as_configured(make_cfg, ratio: float, retrain: int) -> None:
    results = train(make_cfg(*SMALL, f"method.prune_ratio={ratio}", f"method.retrain_epochs={retrain}"))
    report = results["diagnostics"]["packnet"]
    assert report["free_capacity"] == pytest.approx([ratio ** (t + 1) for t in range(5)], abs=2e-3)
    assert report["task_fraction"] == pytest.approx([(1 - ratio) * ratio**t for t in range(5)], abs=2e-3)
    assert report["free_fraction"] == report["free_capacity"][-1] and report["prunable_weights"] == 16 * 400 + 400**2


def test_retrains_for_the_last_retrain_epochs_of_every_task(make_cfg, monkeypatch) -> None:
    pruned_at: list[tuple[int, int, int]] = []
    trained: list[bool] = []
    original = PackNet.on_train_batch_start

    def batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        before = self.pruned_task
        original(self, trainer, pl_module, batch, batch_idx)
        if self.pruned_task != before:
            pruned_at.append((self.pruned_task, trainer.current_epoch, batch_idx))

    def epoch_end(self, trainer, pl_module) -> None:
        trained.append(self.pruned_task == int(pl_module.current_task))

    monkeypatch.setattr(PackNet, "on_train_batch_start", batch_start)
    monkeypatch.setattr(PackNet, "on_train_epoch_end", epoch_end, raising=False)
    train(make_cfg(*SMALL, "method.retrain_epochs=2", "max_tasks=2"))
    assert pruned_at == [(0, 2, 0), (1, 6, 0)], "pruned before the first of the last two of each task's four epochs"
    assert trained == [False, False, True, True] * 2


def test_state_round_trip(make_cfg) -> None:
    cfg = make_cfg(*SMALL, "max_tasks=2")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["callbacks"]["PackNet[packnet]"]
    assert state["pruned_task"] == 1
    owners = state["owners"]
    assert set(owners) == {"body.1.weight", "body.3.weight", "head.weight", "head.bias"}
    assert owners["body.1.weight"].shape == (400, 16) and owners["body.1.weight"].dtype == torch.int16
    assert set(owners["body.3.weight"].unique().tolist()) == {FREE, 0, 1}
    fresh = PackNet()
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again["pruned_task"] == 1 and all(torch.equal(again["owners"][k], v) for k, v in owners.items())


def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg) -> None:
    assert_resume_parity(make_cfg, *SMALL, *SGD_MOMENTUM_DECAY)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("every", "kill", "pruned"),
    [(3, 29, 1), (5, 27, 0)],
    ids=["checkpoint-in-retraining", "checkpoint-at-the-last-step-before-pruning"],
)
def test_sigkill_mid_task_then_resume_is_bit_identical(tmp_path: Path, every: int, kill: int, pruned: int) -> None:
    # 2 + 1 epochs of 5 steps per task: task 2 (index 1) trains steps 16-25 and retrains steps 26-30
    run = [
        "dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs", "epochs_per_task=2", "batch_size=16",
        "logger=none", "threads=1", "method=packnet", "dataset.scenario=task_il", *SGD_MOMENTUM_DECAY,
    ]  # fmt: skip
    whole = cli(tmp_path / "whole", *run)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = cli(
        tmp_path / "killed", *run, f"checkpoint_every_n_steps={every}",
        "+callbacks.kill._target_=helpers.kill.KillAtStep", f"+callbacks.kill.step={kill}",
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    (run_dir,) = (tmp_path / "killed").glob("*/*")
    ckpt = torch.load(run_dir / "checkpoints" / "mid_task.ckpt", weights_only=True)
    assert ckpt["callbacks"]["PackNet[packnet]"]["pruned_task"] == pruned, "the checkpoint is in the intended phase"
    resumed = cli(tmp_path / "killed", f"resume={run_dir}", "threads=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads(next((tmp_path / "whole").glob("*/*/results.json")).read_text())
    got = json.loads((run_dir / "results.json").read_text())
    assert got["complete"] and got["acc_matrix"] == expected["acc_matrix"]
    assert got["diagnostics"] == expected["diagnostics"]

"""End-to-end runs of ``train(cfg)`` on the real configs, shrunk to a synthetic task sequence."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cl_lightning.errors import ConfigError, RunDirectoryError
from cl_lightning.train import train

KEYS = {
    "method", "dataset", "scenario", "seed", "n_tasks", "acc_matrix", "avg_acc", "forgetting", "bwt", "fwt",
    "train_seconds", "eval_seconds", "config", "versions",
}  # fmt: skip


def test_run_writes_complete_results(make_cfg) -> None:
    cfg = make_cfg()
    results = train(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk.keys() >= KEYS
    assert on_disk["method"] == "naive" and on_disk["dataset"] == "blobs" and on_disk["scenario"] == "class_il"
    matrix = torch.tensor(on_disk["acc_matrix"])
    assert matrix.shape == (5, 5) and bool(((matrix >= 0) & (matrix <= 1)).all())
    assert on_disk["avg_acc"] == pytest.approx(matrix[-1].mean().item(), abs=1e-5)
    assert torch.tensor(on_disk["task_il_acc_matrix"]).shape == (5, 5)
    assert on_disk["complete"] and on_disk["tasks_completed"] == 5
    assert on_disk["config"]["method"]["_target_"].endswith("Naive")
    assert on_disk["versions"]["torch"] == metadata.version("torch")
    assert on_disk["versions"]["lightning"] == metadata.version("lightning")


def test_naive_forgets_and_joint_does_not(make_cfg) -> None:
    naive = train(make_cfg("method=naive"))
    joint = train(make_cfg("method=joint"))
    diag = torch.tensor(naive["acc_matrix"]).diagonal()
    assert bool((diag > 0.9).all()), "each task is learned while it is trained"
    assert naive["forgetting"] > 0.8 and naive["avg_acc"] < 0.35, "class-IL fine-tuning forgets (textbook curve)"
    assert joint["avg_acc"] > 0.9 and joint["forgetting"] < 0.1


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_other_scenarios_run(make_cfg, scenario: str) -> None:
    results = train(make_cfg(f"dataset.scenario={scenario}", "logger=none"))
    assert results["scenario"] == scenario
    assert "task_il_acc_matrix" not in results
    if scenario == "task_il":
        # two-way choices inside each task: chance is 50%, blobs are separable
        assert results["avg_acc"] > 0.8


def test_steps_per_task_sets_optimizer_steps(make_cfg) -> None:
    cfg = make_cfg("steps_per_task=7", "logger=none")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5 * 7


def test_checkpoint_loads_weights_only_and_holds_matrix(make_cfg) -> None:
    cfg = make_cfg("logger=none")
    results = train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    matrix = state["acc_matrix.correct"].double() / state["acc_matrix.total"].double()
    assert torch.allclose(matrix, torch.tensor(results["acc_matrix"], dtype=torch.double), atol=1e-5)
    assert int(state["task_finished"]) == 4
    assert ckpt["TaskSequenceDataModule"]["current_task"] == 4


def test_tensorboard_has_every_view(make_cfg) -> None:
    cfg = make_cfg("module.log_every_n_steps=1")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/acc/task_0", "eval/acc/task_4", "summary/avg_acc", "summary/forgetting"} <= scalars
    assert "eval/acc_matrix" in events.Tags()["images"]
    assert len(events.Images("eval/acc_matrix")) == 5, "one heatmap per task end"
    steps = [e.step for e in events.Scalars("eval/acc/task_0")]
    assert steps == sorted(steps) and len(set(steps)) == 5, "continuous global steps across tasks"
    assert len(list((Path(cfg.paths.output_dir) / "tensorboard").glob("events.out.tfevents.*"))) == 1, "one file"
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams"), "HParams tab"
    assert "hparam/avg_acc" in scalars


def test_refuses_to_overwrite_an_earlier_run(make_cfg) -> None:
    cfg = make_cfg("logger=none")
    train(cfg)
    before = (Path(cfg.paths.output_dir) / "results.json").read_bytes()
    with pytest.raises(RunDirectoryError, match="already holds an earlier run"):
        train(cfg)
    assert (Path(cfg.paths.output_dir) / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=0", "optimizer.lr=0"),
        ("optimizer.lr=-1", "optimizer.lr=-1"),
        ("dataset.n_tasks=3", "dataset.n_tasks=3: must divide the 10 classes"),
        ("dataset.scenario=online_il", "dataset.scenario='online_il'"),
        ("batch_size=0", "batch_size=0"),
        ("epochs_per_task=-2", "epochs_per_task=-2"),
        ("model.hidden=[400,-1]", "model.hidden"),
        ("dataset.class_order=[0,1,2]", "dataset.class_order=[0, 1, 2]"),
        ("dataset.val_fraction=1.5", "dataset.val_fraction=1.5"),
    ],
)
def test_bad_values_fail_before_training_with_the_key(make_cfg, override: str, message: str) -> None:
    cfg = make_cfg(override, "logger=none")
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_online_stream_hides_boundaries_and_needs_single_pass(make_cfg) -> None:
    with pytest.raises(ConfigError, match="single pass"):
        train(make_cfg("dataset.stream=online", "logger=none"))
    with pytest.raises(ConfigError, match="needs task boundaries"):
        train(make_cfg("dataset.stream=online", "epochs_per_task=1", "method=joint", "logger=none"))
    results = train(make_cfg("dataset.stream=online", "epochs_per_task=1", "dataset.blur=0.2", "logger=none"))
    assert len(results["acc_matrix"]) == 5


def test_validation_split_can_be_the_evaluation_split(make_cfg) -> None:
    results = train(make_cfg("dataset.val_fraction=0.2", "dataset.eval_split=val", "logger=none"))
    assert len(results["acc_matrix"]) == 5


@pytest.mark.parametrize("overrides", [[], ["optimizer=adam", "module.reset_optimizer=false", "model.dropout=0.3"]])
def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg, overrides: list[str]) -> None:
    whole_cfg = make_cfg(*overrides, "logger=none")
    whole = train(whole_cfg)
    cfg = make_cfg(*overrides, "logger=none", "max_tasks=2")
    partial = train(cfg)
    assert partial["tasks_completed"] == 2 and not partial["complete"]
    resumed = train(make_cfg("resume=" + cfg.paths.output_dir, "logger=none"))
    assert resumed["complete"]
    assert resumed["acc_matrix"] == whole["acc_matrix"], "bit-identical on CPU"
    assert resumed["init_acc"] == whole["init_acc"]
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    ref = torch.load(Path(whole_cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == ref["global_step"] == 5 * 4 * 5  # tasks x epochs x (80 samples / batch 16)
    for key, value in ref["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][key], value), key


def test_resume_refuses_what_it_cannot_continue(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match="no checkpoints/last.ckpt"):
        train(make_cfg(f"resume={tmp_path / 'empty'}"))
    cfg = make_cfg("logger=none", "max_tasks=1")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(RunDirectoryError, match="cannot load"):
        train(make_cfg(f"resume={run_dir}"))
    assert (run_dir / "results.json").read_bytes() == before
    done = make_cfg("logger=none")
    train(done)
    with pytest.raises(RunDirectoryError, match="already complete"):
        train(make_cfg(f"resume={done.paths.output_dir}"))


@pytest.mark.parametrize("model", ["cnn", "resnet18_reduced"])
def test_split_cifar_runs_end_to_end_on_real_format_files(make_cfg, tmp_path: Path, monkeypatch, model: str) -> None:
    """`dataset=split_cifar` as users type it: real loader, normalisation and batched crop+flip augmentation."""
    from helpers.fake_cifar import write_cifar10

    write_cifar10(tmp_path / "data", monkeypatch)
    overrides = [
        f"data_dir={tmp_path / 'data'}",
        f"model={model}",
        "epochs_per_task=4",
        "optimizer=adam",
        "logger=none",
    ]
    if model == "resnet18_reduced":
        overrides.append("model.nf=4")
    results = train(make_cfg("dataset=split_cifar", *overrides, synthetic=False))
    assert results["dataset"] == "split_cifar10" and len(results["acc_matrix"]) == 5
    assert results["config"]["dataset"]["augment"] == "crop_flip"
    if model == "cnn":
        # the first task's colour-coded classes are learned through normalisation and augmentation (the ResNet's
        # BatchNorm running statistics, used in evaluation, need more steps than this test takes to settle)
        assert results["acc_matrix"][0][0] > 0.9


def test_periodic_evaluation_draws_forgetting_curves_without_changing_the_run(make_cfg) -> None:
    plain = train(make_cfg("logger=none"))
    cfg = make_cfg("eval_every_n_steps=5")
    curved = train(cfg)
    assert curved["acc_matrix"] == plain["acc_matrix"], "read-only: same weights, same RNG draws"
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    curve = events.Scalars("eval_curve/task_0")
    assert [e.step for e in curve] == list(range(5, 101, 5)), "every 5 of the 100 steps"
    assert curve[3].value > 0.9 > curve[-1].value, "task 0 learned by step 20, then forgotten (class-IL, naive)"

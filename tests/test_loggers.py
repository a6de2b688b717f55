"""``logger=``: TensorBoard (default), CSV, Weights & Biases and MLflow, all through Lightning's loggers."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from cl_lightning.errors import ConfigError
from cl_lightning.train import train


def test_csv_logger_gets_the_metrics_and_the_config(make_cfg) -> None:
    cfg = make_cfg("logger=csv", "max_tasks=2", "epochs_per_task=1")
    results = train(cfg)
    out = Path(cfg.paths.output_dir) / "csv"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    columns = set(rows[0])
    assert {"train/loss", "eval/acc/task_0", "summary/avg_acc"} <= columns
    last = [r for r in rows if r.get("summary/avg_acc")][-1]
    assert float(last["summary/avg_acc"]) == pytest.approx(results["avg_acc"]), "rows logged after the last fit too"


def test_the_final_metrics_reach_a_logger_other_than_tensorboard(make_cfg) -> None:
    cfg = make_cfg("logger=csv", "epochs_per_task=1")
    results = train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    final = [r for r in rows if r.get("hparam/avg_acc")]
    assert final and float(final[-1]["hparam/avg_acc"]) == pytest.approx(results["avg_acc"])
    assert "method" in (Path(cfg.paths.output_dir) / "csv" / "hparams.yaml").read_text(), "the config"


@pytest.mark.parametrize(("logger", "package"), [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_wandb_and_mlflow(make_cfg, logger: str, package: str) -> None:
    """Without the package: one line naming it, nothing trained; with it: the run logs offline (no server)."""
    extra = ["logger.wandb.offline=true"] if logger == "wandb" else []
    cfg = make_cfg(f"logger={logger}", *extra, "max_tasks=1", "epochs_per_task=1")
    if importlib.util.find_spec(package) is None:
        with pytest.raises(ConfigError, match=package) as info:
            train(cfg)
        assert "\n" not in str(info.value) and "logger" in str(info.value)
        assert not (Path(cfg.paths.output_dir) / "results.json").exists()
        return
    results = train(cfg)
    assert results["tasks_completed"] == 1
    assert (Path(cfg.paths.output_dir) / ("wandb" if logger == "wandb" else "mlruns")).is_dir()


def test_several_loggers_at_once_each_get_every_metric(make_cfg) -> None:
    """``logger=[tensorboard,csv]``: both are built, and what the run logs itself (losses, rows, summary, the final
    metrics) reaches the second logger too, not only Lightning's ``trainer.logger`` (the first)."""
    cfg = make_cfg("logger=[tensorboard,csv]", "epochs_per_task=1")
    results = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard's event file"
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert {"train/loss", "eval/acc/task_0", "summary/avg_acc", "hparam/avg_acc"} <= set(rows[0])
    assert float([r for r in rows if r.get("hparam/avg_acc")][-1]["hparam/avg_acc"]) == pytest.approx(
        results["avg_acc"]
    )
    last = [r for r in rows if r.get("summary/avg_acc")][-1]
    assert float(last["summary/avg_acc"]) == pytest.approx(results["avg_acc"])
    assert results["config"]["logger"].keys() == {"tensorboard", "csv"}

"""A quiet console: no Lightning device lines or advertisements, no leftover test bars, the loss in the bar."""

from __future__ import annotations

import logging

import pytest
import torch

from cl_lightning.callbacks.progress import TaskProgressBar
from cl_lightning.train import train


def test_lightning_s_notices_are_off_and_its_warnings_still_show(
    make_cfg, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        train(make_cfg("logger=none", "epochs_per_task=1", "save_checkpoints=false", "threads=1"))
    out = capsys.readouterr()
    printed = out.out + out.err + caplog.text
    for noise in ("GPU available", "TPU available", "litlogger", "LitLogger", "💡", "`Trainer.fit` stopped"):
        assert noise not in printed, noise
    assert "avg_acc=" in out.out, "the run's own summary is printed"
    lightning_log = logging.getLogger("lightning.pytorch.trainer.connectors")
    assert lightning_log.isEnabledFor(logging.WARNING) and not lightning_log.isEnabledFor(logging.INFO)


def test_the_evaluation_bars_leave_nothing_behind() -> None:
    bar = TaskProgressBar(n_tasks=5, epochs_per_task=1)
    tqdm = bar.init_test_tqdm()
    assert tqdm.leave is False, "Lightning's own test bar stays on screen after every evaluation"
    tqdm.close()
    assert bar.init_train_tqdm().leave is True, "the training bar of each task stays: it holds its last loss"


def test_the_bar_shows_the_training_loss() -> None:
    bar = TaskProgressBar(n_tasks=5, epochs_per_task=1)
    bar.record_loss({"loss": torch.tensor(0.123456)}, batch_idx=0)
    assert bar.loss_postfix() == {"loss": "0.123"}
    bar.record_loss(torch.tensor(2.5), batch_idx=bar.loss_every)
    assert bar.loss_postfix() == {"loss": "2.5"}
    bar.record_loss(torch.tensor(9.0), batch_idx=bar.loss_every + 1)  # read every `loss_every` batches only
    assert bar.loss_postfix() == {"loss": "2.5"}

"""``dataset.stream=online``: one pass over one stream, one fit, one optimizer; blur that blurs; class-IL masking
of labels not yet seen; rows of the matrix at the nominal task ends; exact resume in the middle of the stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers.synthetic import blobs

from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.errors import ConfigError
from cl_lightning.models.module import CLModule
from cl_lightning.train import RunInterrupted, train

ONLINE = ["dataset.stream=online", "epochs_per_task=1", "logger=none"]


def stream_dm(blur: float, **kwargs: Any) -> TaskSequenceDataModule:
    dm = TaskSequenceDataModule(
        source=lambda: blobs(per_class=200), name="blobs", n_tasks=5, batch_size=10, stream="online", blur=blur,
        **kwargs,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_the_stream_is_served_whole_and_in_its_order() -> None:
    dm = stream_dm(0.5)
    batches = list(dm.train_dataloader())
    index = torch.cat([b.index for b in batches])
    assert torch.equal(index, torch.arange(len(dm.stream_tasks()))), "one pass, in the stream's order"


def test_blur_zero_is_sharp_and_blur_raises_the_next_tasks_share_linearly() -> None:
    sharp = stream_dm(0.0).stream_tasks()
    assert torch.equal(sharp, sharp.sort().values), "no sample of a task before its start"
    tasks = stream_dm(0.5).stream_tasks()
    n = 400  # samples per task (200 per class, 2 classes, minus the test split's share: see blobs)
    n = int((tasks == 0).sum())
    # around the first boundary (position n), the window [n - n/4, n + n/4): task 1's share rises through it
    before = tasks[: int(0.7 * n)]
    assert not (before == 1).any(), "nothing of task 1 before the window"
    window = tasks[int(0.75 * n) : int(1.25 * n)]
    shares = [float((part == 1).float().mean()) for part in window.chunk(5)]
    assert shares[0] < 0.25 and shares[-1] > 0.75, shares
    assert all(b >= a - 0.15 for a, b in zip(shares, shares[1:], strict=False)), f"rises through the window: {shares}"
    assert 0.3 < shares[2] < 0.7, shares


def test_one_fit_and_one_optimizer_over_the_whole_stream(make_cfg, monkeypatch) -> None:
    built: list[Any] = []
    configure = CLModule.configure_optimizers

    def counting(self):
        out = configure(self)
        built.append(out)
        return out

    monkeypatch.setattr(CLModule, "configure_optimizers", counting)
    fits: list[int] = []
    monkeypatch.setattr(CLModule, "on_fit_start", lambda self: fits.append(1), raising=False)
    results = train(make_cfg(*ONLINE, "optimizer=adam", "module.reset_optimizer=true"))
    assert results["complete"] and len(results["acc_matrix"]) == 5
    assert len(built) == 1 and len(fits) == 1, "no optimizer, fit or hook boundary at a hidden task boundary"


def test_rows_are_measured_at_the_nominal_task_ends(make_cfg) -> None:
    """With blur 0 and class-IL, a task not reached yet scores 0 (its classes are masked until seen), the task just
    passed scores at least half; the rows differ (the network moved between them)."""
    results = train(make_cfg(*ONLINE, "batch_size=4", "optimizer.lr=0.05"))
    matrix = results["acc_matrix"]
    for i, row in enumerate(matrix):
        assert all(row[j] == 0 for j in range(i + 1, 5)), f"row {i}: a future task scores: {row}"
        assert row[i] >= 0.5, f"row {i}: the task just passed: {row}"
    assert len({tuple(r) for r in matrix}) == 5


def test_class_il_online_masks_the_labels_not_seen_yet(make_cfg, monkeypatch) -> None:
    seen: list[torch.Tensor] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                seen.append(pl_module.seen_labels.clone())
                logits = pl_module.training_logits(torch.zeros(1, pl_module.seen_labels.numel()), batch.task_id[:1])
                seen.append(torch.isfinite(logits[0]))
                seen.append(torch.zeros_like(seen[0]).index_fill_(0, batch.y, True))

    monkeypatch.setattr("helpers.hooks.Record", Record, raising=False)
    run = train(make_cfg(*ONLINE, "+callbacks.rec._target_=helpers.hooks.Record"))
    after_first, finite, first_labels = seen
    assert torch.equal(after_first, first_labels), "after the first batch, its labels only"
    assert torch.equal(finite, first_labels), "the other labels' logits are masked"
    assert bool(run.module.seen_labels.all()), "every label by the end of the stream"
    task_mode = train(make_cfg("logger=none", "max_tasks=1"))
    assert not bool(task_mode.module.seen_labels.any()), "task runs mask by task, not by this buffer"


def test_max_tasks_is_refused_online(make_cfg) -> None:
    with pytest.raises(ConfigError, match="max_tasks=2"):
        train(make_cfg(*ONLINE, "max_tasks=2"))


def test_a_stream_interrupted_mid_task_resumes_to_the_same_weights(make_cfg) -> None:
    common = [*ONLINE, "optimizer=adam", "dataset.blur=0.3"]
    whole = make_cfg(*common)
    expected_results = train(whole)
    cut = make_cfg(*common, "checkpoint_every_n_steps=3", "+callbacks.cut._target_=helpers.kill.InterruptAtStep",
                   "+callbacks.cut.step=13")  # fmt: skip
    with pytest.raises(RunInterrupted):
        train(cut)
    results = train(make_cfg(f"resume={cut.paths.output_dir}", "logger=none"))
    assert results["acc_matrix"] == expected_results["acc_matrix"]

    def weights(cfg) -> dict:
        return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    a, b = weights(whole), weights(cut)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def anytime_from_curve(results: dict) -> float:
    """The definition: mean over evaluations of the mean accuracy over the tasks started by then."""
    means = []
    for step, row in zip(results["anytime"]["step"], results["anytime"]["acc_matrix"], strict=True):
        started = [acc for acc, start in zip(row, results["task_start_step"], strict=True) if start <= step]
        means.append(sum(started) / len(started))
    return sum(means) / len(means)


def test_anytime_accuracy_online(make_cfg) -> None:
    """The anytime keys and their definition, and no leakage on a sharp stream: swapping the last two tasks changes
    nothing evaluated before the fourth task's nominal start (nothing of it was trained on). (That a blurred
    stream trains on a task before its nominal start is measured on the stream itself, above, and on MNIST by
    ``benchmarks/anytime.py``.)"""

    def run(order: str) -> dict:
        return train(make_cfg(*ONLINE, "method=er", "eval_every_n_steps=3", "batch_size=4",
                              f"dataset.task_order={order}"))  # fmt: skip

    results, swapped = run("[0,1,2,3,4]"), run("[0,1,2,4,3]")
    steps, rows, starts = results["anytime"]["step"], results["anytime"]["acc_matrix"], results["task_start_step"]
    assert steps == list(range(3, 3 * len(steps) + 1, 3)) and len(rows) == len(steps) and len(starts) == 5
    assert results["avg_anytime_acc"] == pytest.approx(anytime_from_curve(results))
    before = [i for i, step in enumerate(steps) if step < starts[3]]
    assert before and all(rows[i][:3] == swapped["anytime"]["acc_matrix"][i][:3] for i in before)
    assert rows != swapped["anytime"]["acc_matrix"], "the swap does change what comes after"


def test_anytime_curve_in_task_mode_and_across_a_resume(make_cfg) -> None:
    whole = train(make_cfg("logger=none", "eval_every_n_steps=3"))
    assert whole["task_start_step"] == [t * whole["anytime"]["step"][-1] // 5 for t in range(5)] or all(
        a < b for a, b in zip(whole["task_start_step"], whole["task_start_step"][1:], strict=False)
    )
    assert whole["avg_anytime_acc"] == pytest.approx(anytime_from_curve(whole))
    first = make_cfg("logger=none", "eval_every_n_steps=3", "max_tasks=2")
    train(first)
    resumed = train(make_cfg(f"resume={first.paths.output_dir}", "logger=none"))
    assert resumed["anytime"] == whole["anytime"] and resumed["task_start_step"] == whole["task_start_step"]

"""``python -m cl_lightning.report``: every figure is opened and checked, on a real run and on a hand-made sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from helpers.fake_results import fake_run, mark_diverged

from cl_lightning import report as report_module
from cl_lightning.callbacks.sweep_summary import summarize_runs
from cl_lightning.plots import accuracy_curves, accuracy_heatmap, comparison_bars
from cl_lightning.report import compare, find_runs, main, write_report
from cl_lightning.results import write_json_atomic
from cl_lightning.train import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "epochs_per_task=1", "save_checkpoints=false", "threads=1"]


def assert_png(path: Path, min_width: int = 200, min_height: int = 200) -> np.ndarray:
    """The PNG exists, has a plausible size and is not blank (varying pixels, several colours)."""
    assert path.is_file(), f"missing figure {path}"
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, f"{path.name} is {width}x{height}"
    assert float(image.std()) > 0, f"{path.name} is blank"
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 10, f"{path.name} has {len(colours)} colours"
    return image


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep directory: naive and joint over two seeds, one run stopped after 1 of 3 tasks."""
    root = tmp_path / "sweep"
    naive = [[0.9, 0.1, 0.0], [0.2, 0.95, 0.0], [0.1, 0.2, 0.97]]
    joint = [[0.9, 0.1, 0.0], [0.85, 0.9, 0.1], [0.8, 0.85, 0.9]]
    fake_run(root, "0_naive_seed0", "naive", 0, naive)
    fake_run(root, "1_naive_seed1", "naive", 1, [[v * 0.9 for v in row] for row in naive])
    fake_run(root, "2_joint_seed0", "joint", 0, joint)
    fake_run(root, "3_joint_seed1", "joint", 1, [[min(1.0, v * 1.05) for v in row] for row in joint])
    fake_run(root, "4_joint_seed2", "joint", 2, joint[:1])
    (root / "summary.md").write_text("| method |\n")  # what the sweep callback leaves beside the jobs
    return root


def test_figures_are_drawn(tmp_path: Path) -> None:
    matrix = np.array([[0.9, 0.1, 0.0, 0.05], [0.4, 0.95, 0.0, 0.1], [0.3, 0.5, 0.9, 0.2]])
    rows = [
        {"method": "naive", "dataset": "d", "scenario": "class_il", "runs": 3, "avg_acc_mean": 0.2, "avg_acc_std": 0.05,
         "forgetting_mean": 0.8, "forgetting_std": 0.1},
        {"method": "joint", "dataset": "d", "scenario": "class_il", "runs": 1, "avg_acc_mean": 0.9, "avg_acc_std": 0.0},
    ]  # fmt: skip
    padded = np.vstack([matrix, np.full((1, 4), np.nan)])
    figures = {
        "heatmap": accuracy_heatmap(padded, "stopped after 3/4"),
        "curves": accuracy_curves(matrix),
        "one_row": accuracy_curves(matrix[:1]),
        "bars": comparison_bars(rows, title="two groups"),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=100)
        assert_png(tmp_path / f"{name}.png")
    width = mpimg.imread(tmp_path / "bars.png").shape[1]
    assert width > mpimg.imread(tmp_path / "curves.png").shape[1], "one panel per metric, side by side"


def test_report_on_a_trained_run(make_cfg, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_cfg(*FAST)
    results = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    capsys.readouterr()
    main([str(run_dir)])
    assert "report written to" in capsys.readouterr().out
    out = run_dir / "report"
    text = (out / "report.md").read_text()
    assert "1 run(s) found" in text and "1 complete, 0 incomplete" in text
    assert "naive on blobs (class_il, seed 0), complete" in text
    assert f"avg_acc {100 * results['avg_acc']:.2f}%" in text
    assert "| after task | T0 | T1 | T2 | T3 | T4 |" in text
    last_row = " | ".join(f"{100 * v:.2f}" for v in results["acc_matrix"][-1])
    assert f"| 4 | {last_row} |" in text
    assert "| naive | blobs | class_il | 1 | 0 |" in text, "the comparison table"
    assert "| train FLOPs (est.) | model + state MB |" in text, "the cost beside the accuracy"
    cost = results["cost"]
    assert f"Cost: training ≈ {cost['train_flops']:.3g} FLOPs (estimate" in text
    assert f"network {cost['model_bytes'] / 1e6:.3g} MB, naive state 0 MB." in text
    (run_plots,) = (out / "runs").iterdir()
    for kind in ("acc_matrix", "acc_curves", "task_il_acc_matrix"):
        assert_png(run_plots / f"{kind}.png")
        assert f"runs/{run_plots.name}/{kind}.png" in text
    assert_png(out / "comparison.png")
    assert sorted(p.name for p in out.rglob("*.png")) == [
        "acc_curves.png", "acc_matrix.png", "accuracy_over_tasks_1.png", "comparison.png", "task_il_acc_matrix.png",
    ]  # fmt: skip


def test_report_on_a_sweep(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "report"
    report = write_report(sweep, out)
    assert report == out / "report.md" and not (sweep / "report").exists()
    text = report.read_text()
    assert "5 run(s) found" in text and "4 complete, 1 incomplete" in text
    assert "| joint | blobs | class_il | 2 (+1 incomplete) | 0 1 |" in text
    assert "| naive | blobs | class_il | 2 | 0 1 |" in text
    assert "## Incomplete runs" in text and "| 4_joint_seed2 | joint | blobs | class_il | 2 | 1/3 |" in text
    assert "joint on blobs (class_il, seed 2), **incomplete**: 1/3 tasks trained" in text
    assert_png(out / "comparison.png")
    for job in ("0_naive_seed0", "1_naive_seed1", "2_joint_seed0", "3_joint_seed1", "4_joint_seed2"):
        for kind in ("acc_matrix", "acc_curves", "task_il_acc_matrix"):
            assert_png(out / "runs" / job / f"{kind}.png")


def test_groups_are_the_sweep_summary_s(sweep: Path) -> None:
    runs, _ = find_runs(sweep)
    assert compare(sweep, runs).rows == [row | {"sweep": "."} for row in summarize_runs(sweep)]


def test_swept_settings_failed_jobs_and_several_sweeps(tmp_path: Path) -> None:
    """A tree of two sweeps: one swept the learning rate (not pooled), one had a failed job; neither is pooled."""
    root = tmp_path / "outputs"
    matrix = [[0.9, 0.0], [0.5, 0.9]]
    for i, lr in enumerate(["0.1", "0.1", "0.01"]):
        job = fake_run(root / "lr_sweep", f"{i}_naive", "naive", i, matrix, n_tasks=2)
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n- seed={i}\n")
    fake_run(root / "other", "0_naive", "naive", 0, matrix, n_tasks=2)
    (root / "other" / "1_naive" / ".hydra").mkdir(parents=True)
    write_json_atomic(root / "other" / "1_naive" / "failed.json", {"error": "ConfigError: optimizer.lr=-1: bad"})
    (root / "broken" / "0_run").mkdir(parents=True)
    (root / "broken" / "0_run" / "results.json").write_text("{not json")

    text = write_report(root).read_text()
    assert "| sweep | method | dataset | scenario | setting | runs |" in text
    assert "| lr_sweep | naive | blobs | class_il | optimizer.lr=0.1 | 2 | 0 1 |" in text
    assert "| lr_sweep | naive | blobs | class_il | optimizer.lr=0.01 | 1 | 2 |" in text
    assert "| other | naive | blobs | class_il | - | 1 | 0 |" in text
    assert "## Failed jobs" in text and "- `other/1_naive`: ConfigError: optimizer.lr=-1: bad" in text
    assert "## Unreadable results" in text and "broken/0_run/results.json" in text and "not valid JSON" in text
    assert "Overrides: `optimizer.lr=0.01` `seed=2`" in text
    assert_png(root / "report" / "comparison.png")


def test_one_corrupt_file_skips_its_sweep_s_comparison_only(sweep: Path) -> None:
    (sweep / "9_broken").mkdir()
    (sweep / "9_broken" / "results.json").write_text("{not json")
    text = write_report(sweep).read_text()
    assert "Not summarised: `.`: JSONDecodeError" in text
    assert "9_broken/results.json`: not valid JSON" in text
    assert text.count("![accuracy matrix]") == 5, "every readable run still gets its section"


def test_the_report_directory_is_not_searched(sweep: Path) -> None:
    write_report(sweep)
    runs, _ = find_runs(sweep, exclude=sweep / "report")
    assert len(runs) == 5


@pytest.mark.parametrize("case", ["missing", "not_a_dir", "taken", "no_results"])
def test_errors_exit_2_with_one_line(
    sweep: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "report.md").write_text("an earlier report")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    argv, expected = {
        "missing": ([str(tmp_path / "nowhere")], "nowhere: no such directory"),
        "not_a_dir": ([str(tmp_path / "file.txt")], "file.txt: not a directory"),
        "taken": ([str(sweep), "--out", str(taken)], f"{taken} already exists and is not empty"),
        "no_results": ([str(tmp_path / "empty")], "no results.json found"),
    }[case]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "--out" in err or case != "taken"
    assert (taken / "report.md").read_text() == "an earlier report"
    assert not (tmp_path / "empty" / "report").exists()


def test_an_empty_out_directory_is_used(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "ready"
    out.mkdir()
    assert write_report(sweep, out).is_file()


@pytest.mark.slow  # a command-line subprocess (CI runs -m slow too): the default suite under 5 min
def test_command_line(sweep: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cl_lightning.report", str(sweep)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"report written to {sweep / 'report' / 'report.md'}" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {sweep / 'report'} already exists and is not empty; its files are kept: choose another with --out DIR"
    ]
    assert json.loads((sweep / "0_naive_seed0" / "results.json").read_text())["method"] == "naive"


def test_a_diverged_run_is_listed_apart_and_never_pooled(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A diverged joint run whose two rows look better than any complete run's: apart, out of means and bars."""
    job = fake_run(sweep, "5_joint_seed3", "joint", 3, [[0.99, 0.0, 0.0], [0.99, 0.99, 0.0]])
    diverged = mark_diverged(job, step=57, task=2)
    drawn: list[list[dict]] = []
    real_bars = report_module.comparison_bars
    monkeypatch.setattr(
        report_module, "comparison_bars", lambda rows, *a, **k: drawn.append(rows) or real_bars(rows, *a, **k)
    )

    text = write_report(sweep).read_text()
    assert "6 run(s) found" in text and "4 complete, 1 incomplete, 1 diverged, 0 failed" in text
    assert "| joint | blobs | class_il | 2 (+1 incomplete, +1 diverged) | 0 1 |" in text
    complete = [json.loads((sweep / j / "results.json").read_text()) for j in ("2_joint_seed0", "3_joint_seed1")]
    mean_acc = sum(r["avg_acc"] for r in complete) / 2
    assert f"{100 * mean_acc:.2f} ± " in text
    assert diverged["avg_acc"] > max(r["avg_acc"] for r in complete), "the trap: the diverged rows look best"
    (bars,) = drawn
    (joint_bar,) = [r for r in bars if r["method"] == "joint"]
    assert joint_bar["avg_acc_mean"] == pytest.approx(mean_acc) and joint_bar["runs"] == 2
    assert "## Diverged runs" in text
    assert "- `5_joint_seed3`: diverged at step 57 of task 2 (nan): the training loss became nan" in text
    incomplete_section = text[text.index("## Incomplete runs") : text.index("## Runs")]
    assert "5_joint_seed3" not in incomplete_section and "4_joint_seed2" in incomplete_section
    assert "joint on blobs (class_il, seed 3), **diverged** at step 57 of task 2 (nan)" in text
    assert_png(sweep / "report" / "runs" / "5_joint_seed3" / "acc_matrix.png")


def test_report_on_a_single_diverged_run(tmp_path: Path) -> None:
    job = fake_run(tmp_path, "run", "ewc", 0, [[0.9, 0.1, 0.0]])
    mark_diverged(job, step=12, task=1, value="inf")
    text = write_report(job).read_text()
    assert "| ewc | blobs | class_il | 0 (+1 diverged) | - |" in text
    assert "- `run`: diverged at step 12 of task 1 (inf)" in text
    assert not (job / "report" / "comparison.png").exists(), "no bar for a group without a complete run"


def test_a_run_diverged_in_its_first_task_is_listed_not_unreadable(sweep: Path) -> None:
    job = fake_run(sweep, "5_joint_seed3", "joint", 3, [[0.5, 0.5, 0.5]])
    results = mark_diverged(job, step=4, task=0)
    results |= {"acc_matrix": [], "task_il_acc_matrix": [], "tasks_completed": 0}
    results |= {k: None for k in ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc")}
    write_json_atomic(job / "results.json", results)
    text = write_report(sweep).read_text()
    assert "- `5_joint_seed3`: diverged at step 4 of task 0 (nan)" in text
    assert "Unreadable" not in text
    assert "No task was finished: no accuracy matrix." in text
    assert "| joint | blobs | class_il | 2 (+1 incomplete, +1 diverged) | 0 1 |" in text


def test_the_anytime_curve_is_plotted(make_cfg) -> None:
    cfg = make_cfg(*FAST, "dataset.stream=online", "epochs_per_task=1", "eval_every_n_steps=2")
    results = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    main([str(run_dir)])
    text = (run_dir / "report" / "report.md").read_text()
    (run_plots,) = (run_dir / "report" / "runs").iterdir()
    assert_png(run_plots / "anytime.png")
    assert f"anytime accuracy {100 * results['avg_anytime_acc']:.2f}%" in text
    assert f"runs/{run_plots.name}/anytime.png" in text


def test_the_report_shows_the_intervals_and_the_paired_test(sweep: Path) -> None:
    for path in sweep.glob("*/results.json"):  # the runs were started with summary.reference=naive
        results = json.loads(path.read_text())
        results["config"]["summary"] = {"reference": "naive"}
        path.write_text(json.dumps(results))
    (joint,) = [r for r in summarize_runs(sweep, reference="naive") if r["method"] == "joint"]
    text = write_report(sweep).read_text()
    assert "| avg_acc 95% CI | avg_acc vs naive |" in text
    low, high = 100 * joint["avg_acc_ci95_low"], 100 * joint["avg_acc_ci95_high"]
    assert f"[{low:.2f}, {high:.2f}]" in text
    assert "### Statistics over seeds" in text and "| joint | blobs | class_il | forgetting | 2 |" in text
    assert "2 pairs" in text and "| reference |" in text


def test_a_lone_run_says_n_1(tmp_path: Path) -> None:
    job = fake_run(tmp_path, "run", "naive", 0, [[0.9, 0.1, 0.0], [0.2, 0.95, 0.0], [0.1, 0.2, 0.97]])
    text = write_report(job).read_text()
    assert "± 0.00" not in text and "(n=1)" in text and "| n=1 |" in text


def _assert_text_does_not_overlap(fig, name: str) -> None:
    """Every drawn, non-empty text of ``fig`` lies inside the figure and overlaps no other one (0.5 px slack)."""
    from itertools import combinations

    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    undrawn = set()  # tick labels outside the axes' view limits exist but are not drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    undrawn |= {id(tick.label1), id(tick.label2)}
    boxes = []
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip() and id(text) not in undrawn:
            box = text.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                boxes.append((text.get_text(), box.expanded(1, 1).padded(-0.5)))
    frame = fig.bbox.padded(1)
    for text, box in boxes:
        assert frame.containsx(box.x0) and frame.containsx(box.x1), f"{name}: {text!r} leaves the figure"
        assert frame.containsy(box.y0) and frame.containsy(box.y1), f"{name}: {text!r} leaves the figure"
    for (a, box_a), (b, box_b) in combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{name}: {a!r} overlaps {b!r}"


@pytest.fixture
def sweep_of_20(tmp_path: Path) -> Path:
    """5 methods x 2 learning rates x 2 seeds: 20 runs, 10 groups, 5 tasks, anytime curves."""
    root = tmp_path / "sweep20"
    rng = np.random.default_rng(0)
    job = 0
    for method in ("naive", "joint", "experience_replay", "ewc", "online_ewc"):
        for lr in ("0.1", "0.01"):
            for seed in (0, 1):
                matrix = np.tril(rng.uniform(0.3, 1.0, (5, 5))).tolist()
                path = fake_run(root, f"{job}_{method}", method, seed, matrix, n_tasks=5,
                                overrides=[f"method={method}", f"optimizer.lr={lr}", f"seed={seed}"])  # fmt: skip
                results = json.loads((path / "results.json").read_text())
                steps = list(range(10, 260, 10))
                results["anytime"] = {"step": steps, "acc_matrix": rng.uniform(0, 1, (len(steps), 5)).tolist()}
                results["task_start_step"] = [0, 50, 100, 150, 200]
                results["avg_anytime_acc"] = 0.5
                write_json_atomic(path / "results.json", results)
                job += 1
    return root


def test_over_20_runs_no_text_overlaps_and_units_are_percent(
    sweep_of_20: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: dict[str, object] = {}
    real_save = report_module._save

    def save(fig, path: Path) -> None:  # the comparison's figures and one run's own are written and checked
        if "runs" not in path.parts or path.parent.name == "0_naive":
            drawn[str(path)] = fig
            real_save(fig, path)

    monkeypatch.setattr(report_module, "_save", save)
    report = write_report(sweep_of_20)
    text = report.read_text()
    out = report.parent
    for name in ("comparison.png", "accuracy_over_tasks_1.png", "anytime_1.png"):
        assert_png(out / name)
        assert f"]({name})" in text
    for path, fig in drawn.items():
        _assert_text_does_not_overlap(fig, Path(path).name)
        labels = [ax.get_ylabel() + ax.get_xlabel() for ax in fig.axes]
        assert not any("accuracy" in label and "%" not in label for label in labels), (path, labels)
    over_tasks = drawn[str(out / "accuracy_over_tasks_1.png")]
    (ax,) = over_tasks.axes
    assert len(ax.get_lines()) == 10, "one curve per method x setting"
    assert ax.get_ylim()[1] > 50, "percent, not fractions"
    assert len(ax.collections) == 10, "a band over the seeds of each"
    assert_png(out / "runs" / "0_naive" / "acc_matrix.png")
    heatmap = drawn[str(out / "runs" / "0_naive" / "acc_matrix.png")]
    assert heatmap.axes[1].get_ylabel() == "accuracy (%)" and heatmap.axes[0].images[0].get_clim() == (0, 100)
    assert "| optimizer.lr=0.1 |" in text and "None" not in text

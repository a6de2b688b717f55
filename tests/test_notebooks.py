"""The notebooks run end to end (``CL_NOTEBOOK_SMOKE=1``: embedded data, tiny epochs) and are stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cl_lightning.train import CONFIG_DIR

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>.ipynb`` in ``tmp_path`` with the smoke settings; raise on any cell's error."""
    monkeypatch.setenv("CL_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("CL_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """The notebook's printed text (streams and plain results) and its number of PNG images."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            text.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            images += "image/png" in out.get("data", {})
    return "\n".join(text), images


def results_below(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


@pytest.mark.parametrize("name", ["quickstart", "compare_methods"])
def test_notebooks_are_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "clear outputs before committing"
    assert "CL_NOTEBOOK_SMOKE" in code[0].source, "the first code cell holds the parameters"


@pytest.mark.slow  # runs the notebook in a kernel of its own (CI runs -m slow too); the default suite under 5 min
def test_quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text, images = outputs(execute("quickstart", tmp_path, monkeypatch))
    assert "accuracy matrix" in text and "avg_acc" in text and "forgetting" in text
    assert images == 2, "the heatmap and the curves"
    (results,) = results_below(tmp_path / "outputs")
    assert results["dataset"] == "split_digits" and results["complete"] and len(results["acc_matrix"]) == 5
    assert results["config"]["epochs_per_task"] == 1, "smoke settings"
    (report,) = (tmp_path / "outputs").rglob("report.md")
    pngs = sorted(p.name for p in report.parent.rglob("*.png"))
    assert pngs == sorted(
        ["accuracy_over_tasks_1.png", "comparison.png", "acc_matrix.png", "task_il_acc_matrix.png", "acc_curves.png"]
    ), "the comparison, the accuracy over tasks, and the run's matrices and curves"
    assert str(report) in text


@pytest.mark.slow  # the longer notebook (four methods, orders, hybrids): with -m slow, as CI runs it
def test_compare_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text, images = outputs(execute("compare_methods", tmp_path, monkeypatch))
    available = {p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml")}
    compared = [m for m in ("naive", "ewc", "er", "agem", "joint") if m in available]
    assert f"compared: {', '.join(compared)}" in text
    runs = results_below(tmp_path / "outputs")
    assert {r["dataset"] for r in runs} == {"split_digits"} and all(r["complete"] for r in runs)
    methods = {r["method"] for r in runs}
    assert set(compared) <= methods
    orders = [r for r in runs if r["config"]["dataset"]["task_order"] is not None]
    assert len(orders) == 3 * len({"naive", "er"} & available), "easy-to-hard, hard-to-easy and random per method"
    hybrid = {"ewc", "er"} <= available
    assert ("ewc+er" in methods) == hybrid
    assert ("skipped: needs conf/method/ewc.yaml" in text) != hybrid
    assert images == 3 if hybrid else 2, "one comparison figure per exercise"
    (report,) = (tmp_path / "outputs").rglob("report.md")
    assert f"{len(runs)} run(s) found" in report.read_text()

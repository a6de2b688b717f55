"""``benchmarks/gpu.py``: its source, its table and bars, and (slow) its tiny CPU setting end to end."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling benchmarks
    try:
        spec = importlib.util.spec_from_file_location("gpu", BENCHMARKS / "gpu.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu"] = module  # dataclasses resolve their module by name; Hydra imports `gpu.cifar_shaped`
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("gpu", None)


def test_the_source_has_cifar_10s_shape(gpu) -> None:
    data = gpu.cifar_shaped(per_class=3, test_per_class=2)
    assert data.train_x.shape == (30, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (20, 3, 32, 32) and data.n_classes == 10
    assert data.train_y.bincount().tolist() == [3] * 10


def _row(gpu, model: str, method: str, args: argparse.Namespace, **seconds: list[float]):
    row = gpu.Row(gpu.Setting(model, method, args))
    row.seconds = {side.replace("_", " "): v for side, v in seconds.items()}
    return row


def test_table_ratios_and_bars(gpu) -> None:
    args = argparse.Namespace(steps=12, warmup=2, batch_size=10, device="cpu")
    rows = [
        _row(gpu, "reduced", "naive", args, plain=[1.0, 2.0, 3.0], ours=[2.2, 2.4, 2.6]),  # 1.2x: met
        _row(gpu, "reduced", "derpp", args, plain=[4.0], ours=[7.0]),  # 3.5x the plain naive loop: not met
        _row(gpu, "full", "naive", args, plain=[4.0], plain_compiled=[2.0], ours=[4.0]),
    ]
    table = gpu.markdown(rows, args, "CPU")
    assert table[2] == "| reduced | naive | 50.0 | - | 41.7 | - | 1.20 | - | 1.20 | <= 1.2: met |"
    assert table[3] == "| reduced | derpp | 25.0 | - | 14.3 | - | 1.75 | - | 3.50 | <= 3.3: not met |"
    assert table[4].endswith("| 1.00 | - | 1.00 |  |"), "the GPU bar is judged on a GPU only"
    args.device = "cuda"
    table = gpu.markdown(rows, args, "GPU")
    assert table[4].endswith("| ours >= 0.67 x plain compiled img/s: 0.50, not met |")


@pytest.mark.slow  # about a minute: both ResNet-18s, naive and DER++, every side
def test_tiny_setting_runs_every_side_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py"), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| reduced", "| full"))]
    assert [r.split(" | ")[:2] for r in rows] == [["| reduced", "naive"], ["| reduced", "derpp"], ["| full", "naive"],
                                                 ["| full", "derpp"]]  # fmt: skip
    assert all(" - |" not in r for r in rows), "every side measured"
    assert "met" in rows[0] and "met" in rows[1]

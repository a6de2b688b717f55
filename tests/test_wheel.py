"""A built wheel carries the configs: installed without ``-e``, ``python -m cl_lightning`` runs from any directory."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds a wheel and a virtual environment (CI runs -m slow too)
def test_a_built_wheel_runs_from_another_directory(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("cl_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = {n.removeprefix("cl_lightning/conf/") for n in names if n.startswith("cl_lightning/conf/")}
    conf = REPO / "cl_lightning" / "conf"
    expected = {str(p.relative_to(conf)) for p in conf.rglob("*.yaml")}
    assert configs == expected, "every config is in the wheel"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([python, "-c", "import cl_lightning; print(cl_lightning.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert str(venv) in where, f"the installed copy, not the repository's: {where}"
    run = subprocess.run(
        [python, "-m", "cl_lightning", "max_tasks=1", "logger=none", f"hydra.run.dir={work / 'run'}", "threads=1"],
        cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((work / "run" / "results.json").read_text())["tasks_completed"] == 1

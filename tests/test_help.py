"""``--help`` and ``--cfg`` answer from Hydra alone: the command line imports no Lightning module before a run."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.cli import REPO


def test_help_imports_no_lightning_and_names_the_program() -> None:
    probe = (
        "import sys, runpy; sys.argv = ['cl_lightning', '--help']\n"
        "try:\n    runpy.run_module('cl_lightning', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith(('lightning', 'torch'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m cl_lightning"), proc.stdout[:300]
    assert "is powered by Hydra" not in proc.stdout and "train is" not in proc.stdout
    loaded = proc.stdout.split("LOADED", 1)[1]
    assert "lightning" not in loaded and "torch" not in loaded, loaded

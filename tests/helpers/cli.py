"""The command line as users type it: ``python -m cl_lightning ...`` in a subprocess, one thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, out: Path, timeout: int = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line in ``out`` with ``CL_OUTPUT_DIR=out`` (extra environment variables: ``env``)."""
    full_env = {**os.environ, "CL_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "cl_lightning", *args, "threads=1"],
        capture_output=True, text=True, timeout=timeout, env=full_env | (env or {}), cwd=out,
    )  # fmt: skip


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``error:`` lines a command printed on stderr."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` by relative path, with its bytes (to check that nothing was touched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_state(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file below ``root`` with its bytes and its modification time (ns), every folder as ``None``: equal
    states mean nothing was written, rewritten, added or removed there."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }

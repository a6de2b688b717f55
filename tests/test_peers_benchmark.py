"""``benchmarks/peers.py`` without Avalanche: one line saying how to install it, exit status 2; and its table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
_spec = importlib.util.spec_from_file_location("peers", SCRIPT)
assert _spec is not None and _spec.loader is not None
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers"] = peers  # dataclasses resolve their module by name
_spec.loader.exec_module(peers)

# `import avalanche` fails in the child whether or not Avalanche is installed: a None entry in sys.modules
BLOCKED = (
    "import runpy, sys; sys.modules['avalanche'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_refuses_in_one_line_without_avalanche(tmp_path: Path) -> None:
    out = tmp_path / "peers.md"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(SCRIPT), "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == peers.EXIT_NO_AVALANCHE == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [peers.INSTALL_HINT]
    assert "pip install -e .[peers]" in lines[0]
    assert not out.exists()


def test_blocked_import_reads_as_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "avalanche", None)
    assert peers.avalanche_version() is None


def run(train_s: float, acc: float = 0.5, steps: int = 1876) -> Any:
    return peers.Measured(train_s=train_s, eval_s=train_s / 10, avg_acc=acc, steps=steps)


def test_table_medians_ratios_and_bars_per_evaluator() -> None:
    both = list(peers.EVALUATORS)
    rows = [
        peers.Row(
            "naive", 1.5, [run(2.0), run(3.0), run(1.0)],
            {"slim": [run(4.0), run(5.0), run(6.0)], "default": [run(2.0), run(2.5), run(3.0)]},
            plain_s=[1.0, 2.5, 2.0],
        ),
        peers.Row("ewc", 2.0, [run(2.0)], {"slim": [run(3.0, steps=1875)], "default": [run(5.0)]}),
        peers.Row("gem", 2.0, [run(2.0)], {"default": [run(6.0)]}, {"slim": "RuntimeError: no solver"}),
    ]  # fmt: skip
    table = peers.markdown_table(rows, both)
    assert table[0].startswith(
        "| method | bar | ours train s | Avalanche train s, slim | Avalanche / ours, slim "
        "| Avalanche train s, default | Avalanche / ours, default | plain loop train s "
        "| Avalanche / plain loop (slim / default) |"
    )
    assert len(table) == 2 + len(rows)
    assert all(line.count("|") == table[0].count("|") for line in table)
    naive, ewc, gem = table[2:]
    assert naive == (
        "| `naive` | >= 1.5x | 2.00 | 5.00 | 2.50 met | 2.50 | 1.25 NOT met | 2.00 | 2.50 / 1.25 | 0.20 "
        "| 0.50 / 0.25 | 0.500 | 0.500 / 0.500 | 1876 / 1876 / 1876 |"
    )
    assert "| 1.50 NOT met | 5.00 | 2.50 met | - | - / - |" in ewc, "no plain loop of EWC"
    assert rows[0].ceiling("slim") == 2.5 and rows[1].ceiling("slim") is None
    assert "| 1.50 NOT met | 5.00 | 2.50 met |" in ewc and "1876 / 1875 / 1876" in ewc
    assert "| not run | not measured | 6.00 | 3.00 met |" in gem and "1876 / - / 1876" in gem
    assert peers.bars_summary(rows, "slim") == (
        "Evaluator `slim` (like-for-like): bars met on 1 of 3 methods (not met: ewc; not measured: gem)."
    )
    assert peers.bars_summary(rows, "default") == (
        "Evaluator `default` (what users get): bars met on 2 of 3 methods (not met: naive; not measured: none)."
    )
    only_default = peers.markdown_table(rows[:1], ["default"])
    assert "slim" not in only_default[0] and only_default[2].endswith("| 1876 / 1876 |")


def test_evaluator_settings() -> None:
    assert peers.EVALUATORS == ("slim", "default")
    assert set(peers.EVALUATOR_TEXT) == set(peers.EVALUATOR_ROLE) == set(peers.EVALUATORS)
    with pytest.raises(ValueError, match="evaluator 'full'"):
        peers.build_strategy(peers.PEERS["naive"], None, "full")  # refused before Avalanche is imported


def test_unknown_evaluator_is_refused_by_the_parser(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(SCRIPT), "--avalanche-evaluator", "full"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'full'" in proc.stderr


def test_every_row_names_a_strategy_and_the_issue_bars() -> None:
    assert set(peers.METHODS) == {"naive", "er", "er:class_balanced", "derpp", "ewc", "agem", "gem", "lwf", "si"}
    assert {m for m, p in peers.PEERS.items() if p.bar == 2.0} == {"ewc", "gem", "agem"}
    assert all(p.bar == 1.5 for m, p in peers.PEERS.items() if m not in ("ewc", "gem", "agem"))
    assert peers.PEERS["er"].avalanche_call().endswith("storage_policy=ReservoirSamplingBuffer(500))")
    assert peers.PEERS["ewc"].avalanche_call() == "EWC(ewc_lambda=50.0, mode='separate')"
    assert peers.PEERS["gem"].avalanche_call() == "GEM(patterns_per_exp=100, memory_strength=0.5)"

"""Data errors as users meet them on the command line: one ``error:`` line, exit code 2, nothing trained."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from helpers.cli import error_lines, run_cli

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_fake_mnist(directory: Path) -> None:
    """The four gzipped IDX files of a 20 + 10 image MNIST."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20), rng.integers(0, 256, (10, 28, 28))]
    arrays.append(rng.integers(0, 10, 10))
    directory.mkdir(parents=True)
    for stem, array in zip(STEMS, arrays, strict=True):
        header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
        (directory / f"{stem}.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_an_empty_data_dir_never_falls_back_to_cl_data_dir(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "env" / "MNIST" / "raw")
    (tmp_path / "empty").mkdir()
    proc = run_cli(
        "dataset=split_mnist", f"data_dir={tmp_path / 'empty'}", "logger=none", out=tmp_path,
        env={"CL_DATA_DIR": str(tmp_path / "env")},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert "MNIST was not found" in line and f"data_dir={tmp_path / 'empty'} holds no copy" in line
    assert str(tmp_path / "env") not in line
    assert not list(tmp_path.rglob("results.json")), "nothing was trained on CL_DATA_DIR's data"


def test_a_truncated_file_is_named_on_one_line(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "data" / "MNIST" / "raw")
    bad = tmp_path / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    # no data_dir and no CL_DATA_DIR: the default search finds ./data (the working directory is tmp_path)
    proc = run_cli("dataset=split_mnist", "logger=none", out=tmp_path, env={"CL_DATA_DIR": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    assert line.startswith(f"error: {bad}: truncated") and "download it again" in line
    assert "Traceback" not in proc.stderr

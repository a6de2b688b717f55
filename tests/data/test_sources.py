"""Tests of cl_lightning.data.sources on small fake files in the real formats, plus opt-in real-data checks."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from cl_lightning.data import sources
from cl_lightning.data.sources import (
    DataFileError,
    DatasetNotFoundError,
    SourceData,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)

# Read at import, before the autouse fixture below clears it for the fake-data tests.
REAL_DATA_DIR = os.environ.get("CL_DATA_DIR")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

IDX_TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C}
IDX_TYPE_CODES |= {np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}
IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _isolated_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the fake-data tests independent of this machine's CL_DATA_DIR and system datasets."""
    monkeypatch.delenv("CL_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"mnist": [], "fashion_mnist": [Path("/nonexistent/fashion-mnist")]})


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` in the IDX format: 0x00 0x00 type ndim, big-endian int32 dims, big-endian data."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_mnist_like(seed: int = 0, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def write_mnist_like(directory: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> None:
    for key, stem in IDX_STEMS.items():
        write_idx(directory / stem, arrays[key], gz=gz)


def assert_matches(data: SourceData, arrays: dict[str, np.ndarray]) -> None:
    for key in IDX_STEMS:
        tensor = getattr(data, key)
        assert tensor.is_contiguous()
        if key.endswith("_x"):
            assert tensor.dtype == torch.uint8
            assert tuple(tensor.shape) == (len(arrays[key]), 1, 28, 28)
            assert torch.equal(tensor[:, 0], torch.from_numpy(arrays[key]))
        else:
            assert tensor.dtype == torch.int64
            assert torch.equal(tensor, torch.from_numpy(arrays[key].astype(np.int64)))


# --------------------------------------------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_read_idx_raw_and_gz_are_identical(tmp_path: Path, dtype: str) -> None:
    offset = 0 if dtype == "u1" else 7  # negative values for the signed and float types
    array = (np.arange(30).reshape(2, 3, 5) - offset).astype(dtype)
    raw = read_idx(write_idx(tmp_path / "a-idx", array))
    gzipped = read_idx(write_idx(tmp_path / "b-idx", array, gz=True))
    assert raw.shape == array.shape
    assert torch.equal(raw, gzipped)
    assert np.array_equal(raw.numpy(), array)


def test_read_idx_detects_gzip_by_magic_bytes_not_suffix(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = write_idx(tmp_path / "x", array, gz=True).rename(tmp_path / "no-suffix")
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_read_idx_rejects_non_idx_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    path = write_idx(tmp_path / "short", np.zeros((4, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


# ----------------------------------------------------------------------------------------------------- MNIST family
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    arrays = make_mnist_like()
    write_mnist_like(tmp_path / "MNIST" / "raw", arrays, gz=gz)
    data = load_mnist(tmp_path)
    assert data.name == "mnist" and data.n_classes == 10
    assert data.class_names == tuple("0123456789")
    assert_matches(data, arrays)


@pytest.mark.parametrize("subdir", ["MNIST", "."])
def test_load_mnist_flat_layouts(tmp_path: Path, subdir: str) -> None:
    arrays = make_mnist_like(seed=1)
    write_mnist_like(tmp_path / subdir, arrays, gz=True)
    assert_matches(load_mnist(str(tmp_path)), arrays)


# --------------------------------------------------------------------------------- where the data is looked for
@pytest.mark.parametrize("kind", ["empty", "missing", "file", "other_dataset"])
def test_a_given_data_dir_is_the_only_place_looked_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The issue's case: data_dir names a folder without MNIST while CL_DATA_DIR holds one: an error, no fall-back."""
    write_mnist_like(tmp_path / "env" / "MNIST" / "raw", make_mnist_like(seed=2))
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path / "env")  # ./data and the bare working directory must not be looked in either
    write_mnist_like(tmp_path / "env" / "data" / "MNIST" / "raw", make_mnist_like(seed=3))
    given = tmp_path / "given"
    if kind == "empty":
        given.mkdir()
    elif kind == "file":
        given.write_text("not a directory")
    elif kind == "other_dataset":
        write_mnist_like(given / "FashionMNIST" / "raw", make_mnist_like(seed=4))
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(given)
    message = str(info.value)
    assert f"data_dir={given}" in message and "\n" not in message
    assert str(tmp_path / "env") not in message, "CL_DATA_DIR is not looked in"
    assert set(info.value.searched) <= {str(given), str(given / "MNIST"), str(given / "MNIST" / "raw")}
    expected = {"empty": "holds no copy", "missing": "does not exist", "file": "is a file, not a directory"}
    assert expected.get(kind, "holds no copy") in message
    assert "only place looked in" in message or kind == "file"


def test_cl_data_dir_is_the_only_place_when_data_dir_is_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = make_mnist_like(seed=2)
    write_mnist_like(tmp_path / "env" / "MNIST" / "raw", arrays)
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "env"))
    assert_matches(load_mnist(), arrays)
    assert_matches(load_mnist(None), arrays)
    assert_matches(load_mnist(""), arrays), "an empty data_dir is not given"
    # the run's config resolves data_dir to $CL_DATA_DIR: the message says where the path came from
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    write_mnist_like(tmp_path / "data" / "MNIST" / "raw", arrays)  # the default search's ./data: not looked in
    for data_dir in (None, tmp_path / "empty"):
        with pytest.raises(DatasetNotFoundError, match="from CL_DATA_DIR|CL_DATA_DIR=") as info:
            load_mnist(data_dir)
        assert "does not exist" in str(info.value) and "data/MNIST" not in str(info.value)


def test_the_default_search_is_dot_data_then_the_system_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    arrays = make_mnist_like(seed=6)
    write_mnist_like(tmp_path / "data" / "MNIST" / "raw", arrays)
    assert_matches(load_mnist(), arrays)
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist()
    data = tmp_path / "data"
    assert info.value.searched == (f"{data}/FashionMNIST/raw", f"{data}/FashionMNIST", "/nonexistent/fashion-mnist")
    assert "only place" not in str(info.value)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_fashion_mnist_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    arrays = make_mnist_like(seed=3)
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", arrays, gz=gz)
    data = load_fashion_mnist(tmp_path)
    assert data.name == "fashion_mnist" and data.n_classes == 10
    assert data.class_names[0] == "T-shirt/top" and data.class_names[-1] == "Ankle boot"
    assert_matches(data, arrays)


def test_load_fashion_mnist_from_system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = make_mnist_like(seed=4)
    write_mnist_like(tmp_path / "system", arrays, gz=True)  # Debian's package ships only the .gz files
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [tmp_path / "system"])
    monkeypatch.chdir(tmp_path)
    assert_matches(load_fashion_mnist(), arrays)  # the default search: ./data (empty), then the system directory
    (tmp_path / "given").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:  # a given directory is the only place, even for the system's
        load_fashion_mnist(tmp_path / "given")
    assert str(tmp_path / "system") not in str(info.value)


def test_fashion_mnist_ignores_mnist_files_in_bare_data_dir(tmp_path: Path) -> None:
    write_mnist_like(tmp_path, make_mnist_like())  # same file names as Fashion-MNIST's: must not be taken for it
    with pytest.raises(DatasetNotFoundError):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    ("loader", "folder"), [(load_mnist, "MNIST"), (load_fashion_mnist, "FashionMNIST")], ids=["mnist", "fashion"]
)
def test_missing_mnist_family_says_where_and_how(tmp_path: Path, loader, folder: str) -> None:
    write_idx(tmp_path / folder / "raw" / IDX_STEMS["train_x"], np.zeros((1, 28, 28), np.uint8))  # 1 of 4 files
    with pytest.raises(DatasetNotFoundError) as info:
        loader(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / folder / "raw") in message
    assert "data_dir" in message and "CL_DATA_DIR" in message and "download=true" in message
    assert "\n" not in message
    assert "/nonexistent/fashion-mnist" not in message, "a given data_dir is the only place looked in"


def test_mnist_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = make_mnist_like(seed=5)
    calls = []

    class FakeMNIST:  # stands in for the network: writes the gzipped files where torchvision would
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, train, download))
            write_mnist_like(Path(root) / "MNIST" / "raw", arrays, gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    assert_matches(load_mnist(tmp_path, download=True), arrays)
    assert calls == [(str(tmp_path), True, True)]
    assert_matches(load_mnist(tmp_path, download=True), arrays)  # found now: no second download
    assert len(calls) == 1


def test_failed_download_raises_not_found_with_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="failed: RuntimeError: Error downloading") as info:
        load_fashion_mnist(tmp_path, download=True)
    assert isinstance(info.value.__cause__, RuntimeError)


# ------------------------------------------------------------------------------------------------------------ CIFAR
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    # The official layout: one row per image, 1024 red then 1024 green then 1024 blue values, each row-major.
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_fake_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 4) -> dict[str, np.ndarray]:
    """Write cifar-10-batches-py as the official archive does, and point torchvision's md5 sums at the fakes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = _cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        batch = {"batch_label": f"training batch {i} of 5", "labels": labels, "data": rows}
        _dump(folder / f"data_batch_{i}", batch | {"filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]})
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = _cifar_rows(rng, 3), rng.integers(0, 10, 3).tolist()
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_rows})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(
        cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")}
    )
    return {
        "train_x": np.concatenate(train_rows),
        "train_y": np.asarray(train_labels),
        "test_x": test_rows,
        "test_y": np.asarray(test_labels),
    }


def write_fake_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(100)
    expected = {}
    for split, n in (("train", 7), ("test", 5)):
        rows, fine = _cifar_rows(rng, n), rng.integers(0, 100, n).tolist()
        entry = {"filenames": [f"{split}_{j}.png" for j in range(n)], "batch_label": split, "data": rows}
        _dump(folder / split, entry | {"fine_labels": fine, "coarse_labels": [f // 5 for f in fine]})
        expected[f"{split}_x"], expected[f"{split}_y"] = rows, np.asarray(fine)
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    _dump(folder / "meta", meta)

    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {"filename": "meta", "key": "fine_label_names", "md5": _md5(folder / "meta")})
    return expected


def assert_cifar_matches(data: SourceData, expected: dict[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        x, y, rows = getattr(data, f"{split}_x"), getattr(data, f"{split}_y"), expected[f"{split}_x"]
        assert x.dtype == torch.uint8 and x.is_contiguous() and tuple(x.shape) == (len(rows), 3, 32, 32)
        assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(expected[f"{split}_y"].astype(np.int64)))
        # Channel-first round trip, spelt out pixel by pixel: row[c*1024 + h*32 + w] is pixel (c, h, w).
        assert int(x[0, 1, 2, 3]) == int(rows[0, 1 * 1024 + 2 * 32 + 3])
        assert torch.equal(x, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))


def test_load_cifar10_real_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_fake_cifar10(tmp_path, monkeypatch)
    data = load_cifar10(tmp_path)
    assert data.name == "cifar10" and data.n_classes == 10 and data.class_names[1] == "automobile"
    assert len(data.train_y) == 20 and len(data.test_y) == 3
    assert_cifar_matches(data, expected)


def test_load_cifar100_real_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_fake_cifar100(tmp_path, monkeypatch)
    data = load_cifar100(tmp_path)
    assert data.name == "cifar100" and data.n_classes == 100 and data.class_names[99] == "fine_99"
    assert_cifar_matches(data, expected)


@pytest.mark.parametrize(
    ("loader", "folder"), [(load_cifar10, "cifar-10-batches-py"), (load_cifar100, "cifar-100-python")]
)
def test_missing_cifar_says_where_and_how(tmp_path: Path, loader, folder: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        loader(tmp_path)
    message = str(info.value)
    assert str(tmp_path / folder) in message and "data_dir" in message and "CL_DATA_DIR" in message
    assert "only place looked in" in message and "\n" not in message


def test_cifar_missing_one_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py exists but lacks data_batch_3"):
        load_cifar10(tmp_path)


def test_cifar_is_looked_for_in_cl_data_dir_only_when_no_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = write_fake_cifar10(tmp_path / "env", monkeypatch)
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "env"))
    assert_cifar_matches(load_cifar10(), expected)
    (tmp_path / "given").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path / "given")
    assert str(tmp_path / "env") not in str(info.value)


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    cls = torchvision.datasets.CIFAR10

    def fake_init(self: object, root: str, train: bool = True, download: bool = False) -> None:
        calls.append((root, train, download))  # stands in for the network: writes the extracted archive
        write_fake_cifar10(Path(root), monkeypatch)

    monkeypatch.setattr(cls, "__init__", fake_init)
    data = load_cifar10(tmp_path / "new", download=True)
    assert calls == [(str(tmp_path / "new"), True, True)] and len(data.train_y) == 20
    load_cifar10(tmp_path / "new", download=True)
    assert len(calls) == 1, "found now: no second download"


# ------------------------------------------------------------------------------------------ bad files, one line each
def assert_one_line_about(err: DataFileError, path: Path, *words: str) -> None:
    message = str(err)
    assert isinstance(err, DatasetNotFoundError) and isinstance(err, ValueError), "exit 2 as missing data; ValueError"
    assert message.startswith(f"{path}: ") and err.path == str(path) and "\n" not in message
    assert "Delete it, then download it again" in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_a_truncated_mnist_file_is_named(tmp_path: Path, gz: bool) -> None:
    write_mnist_like(tmp_path / "MNIST" / "raw", make_mnist_like(), gz=gz)
    bad = tmp_path / "MNIST" / "raw" / (IDX_STEMS["test_x"] + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(DataFileError) as info:
        load_mnist(tmp_path)
    assert_one_line_about(info.value, bad, "truncated")
    assert not isinstance(info.value.__cause__, EOFError) or gz


def test_a_gz_with_a_bad_checksum_is_named(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x", np.arange(100, dtype=np.uint8), gz=True)
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    path.write_bytes(bytes(data))
    with pytest.raises(DataFileError) as info:
        read_idx(path)
    assert_one_line_about(info.value, path, "corrupt gzip data")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"PK\x03\x04 a zip file", ["bad magic number 50 4b 03 04", "not an IDX file"]),
        (b"", ["truncated", "0 bytes"]),
        (b"\x00\x00\x08\x03\x00\x00", ["truncated", "announces 3 dimensions"]),
    ],
    ids=["magic", "empty", "header"],
)
def test_wrong_magic_and_short_headers_are_named(tmp_path: Path, content: bytes, words: list[str]) -> None:
    write_mnist_like(tmp_path / "MNIST", make_mnist_like())
    bad = tmp_path / "MNIST" / IDX_STEMS["train_y"]
    bad.write_bytes(content)
    with pytest.raises(DataFileError) as info:
        load_mnist(tmp_path)
    assert_one_line_about(info.value, bad, *words)


def test_extra_bytes_are_a_wrong_size(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x", np.zeros((4, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataFileError) as info:
        read_idx(path)
    assert_one_line_about(info.value, path, "wrong size", "2 too many")


def test_mismatched_images_and_labels_are_named(tmp_path: Path) -> None:
    arrays = make_mnist_like()
    arrays["test_y"] = arrays["test_y"][:-1]
    write_mnist_like(tmp_path / "MNIST" / "raw", arrays)
    with pytest.raises(DataFileError) as info:
        load_mnist(tmp_path)
    assert_one_line_about(info.value, tmp_path / "MNIST" / "raw" / IDX_STEMS["test_y"], "9 labels for the 10 images")


def test_a_bad_file_in_a_system_dir_says_to_reinstall_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mnist_like(tmp_path / "system", make_mnist_like(), gz=True)
    bad = tmp_path / "system" / (IDX_STEMS["train_x"] + ".gz")
    bad.write_bytes(bad.read_bytes()[:100])
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [tmp_path / "system"])
    monkeypatch.setitem(sources.SYSTEM_PACKAGES, tmp_path / "system", "dataset-fashion-mnist")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileError, match=r"truncated.*apt-get install --reinstall dataset-fashion-mnist") as info:
        load_fashion_mnist()
    assert str(info.value).startswith(f"{bad}: ")


def test_a_corrupted_cifar_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path, monkeypatch)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated: its md5 sum is no longer the official one
    with pytest.raises(DataFileError) as info:
        load_cifar10(tmp_path)
    assert_one_line_about(info.value, bad, "truncated or corrupted", "md5 sum")


@pytest.mark.parametrize("cut", [10, -100], ids=["header", "data"])
def test_a_truncated_cifar_pickle_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    """Even with a matching md5 sum (a table pointed at the bad file), a pickle that does not load is named."""
    write_fake_cifar100(tmp_path, monkeypatch)
    bad = tmp_path / "cifar-100-python" / "train"
    bad.write_bytes(bad.read_bytes()[:cut])
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "train_list", [["train", _md5(bad)]])
    with pytest.raises(DataFileError) as info:
        load_cifar100(tmp_path)
    assert_one_line_about(info.value, bad, "truncated or corrupted", "does not unpickle")


def test_a_cifar_batch_of_the_wrong_size_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path, monkeypatch)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _dump(bad, {"labels": [0, 1], "data": np.zeros((2, 1000), dtype=np.uint8)})
    monkeypatch.setattr(
        torchvision.datasets.CIFAR10,
        "train_list",
        [[f"data_batch_{i}", _md5(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}")] for i in range(1, 6)],
    )
    with pytest.raises(DataFileError) as info:
        load_cifar10(tmp_path)
    assert_one_line_about(info.value, bad, "wrong size", "[2, 1000]")


# ----------------------------------------------------------------------------------------------------------- digits
def test_load_digits_shapes_and_values() -> None:
    data = load_digits()
    assert data.name == "digits" and data.n_classes == 10
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (1, 8, 8)
    assert len(data.train_x) + len(data.test_x) == 1797 and len(data.test_x) == 450
    assert int(data.train_x.max()) == 255 and int(data.train_x.min()) == 0
    # Values are round(v * 255 / 16) of integers v in 0..16, and nothing else.
    allowed = torch.tensor([round(v * 255 / 16) for v in range(17)], dtype=torch.uint8)
    assert torch.isin(data.train_x.unique(), allowed).all()
    for labels in (data.train_y, data.test_y):
        assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))


def test_load_digits_split_is_seeded() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_load_digits_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


# ------------------------------------------------------------------------------------------------------- SourceData
def test_source_data_validates_its_contract() -> None:
    x, y = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    data = SourceData("toy", x, y, x, y, n_classes=2)
    assert data.image_shape == (1, 2, 2) and "train=4" in repr(data)
    with pytest.raises(ValueError, match="uint8"):
        SourceData("toy", x.float(), y, x, y, n_classes=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        SourceData("toy", x, y + 1, x, y, n_classes=2)
    with pytest.raises(ValueError, match="int64"):
        SourceData("toy", x, y[:3], x, y, n_classes=2)


# -------------------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_mnist_from_cl_data_dir() -> None:
    if not REAL_DATA_DIR:
        pytest.skip("set CL_DATA_DIR to a directory holding MNIST to run this check")
    try:
        data = load_mnist(REAL_DATA_DIR)
    except DatasetNotFoundError as e:
        pytest.skip(f"no MNIST under CL_DATA_DIR: {e}")
    assert (len(data.train_y), len(data.test_y)) == (60000, 10000)
    assert data.train_x.shape[1:] == (1, 28, 28)
    counts = torch.bincount(data.train_y, minlength=10)
    assert len(counts) == 10 and int(counts.min()) > 5000 and int(counts.max()) < 7000


@pytest.mark.slow
def test_real_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not DEBIAN_FASHION_DIR.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_DIR} not present (Debian package dataset-fashion-mnist)")
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion_mnist", [DEBIAN_FASHION_DIR])
    monkeypatch.chdir(tmp_path)  # the default search (no data_dir): an empty ./data, then the system directory
    data = load_fashion_mnist()
    assert (len(data.train_y), len(data.test_y)) == (60000, 10000)
    assert torch.equal(torch.bincount(data.train_y), torch.full((10,), 6000))

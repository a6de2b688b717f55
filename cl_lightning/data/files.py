"""Reading dataset files (IDX, raw or gzipped, and CIFAR pickles) into :class:`SourceData`, with one-line errors.

:class:`DatasetNotFoundError` says where a dataset was looked for and how to provide it; :class:`DataFileError`
(a subclass) names a file that is there but unusable (truncated, of the wrong size, a bad magic number, an md5 sum
that is not the official one) and how to replace it. :mod:`cl_lightning.data.sources` finds the files and builds the
datasets from what these readers return.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATA_DIR_ENV", "SYSTEM_PACKAGES", "DataFileError", "DatasetNotFoundError", "SourceData", "file_md5", "one_line",
    "read_cifar_batch", "read_idx", "unpickle",
]  # fmt: skip

_GZIP_MAGIC = b"\x1f\x8b"
#: Environment variable naming the data directory when ``data_dir`` is not given; then it is the only place looked in.
DATA_DIR_ENV = "CL_DATA_DIR"
#: Debian packages that install a dataset, by the directory they install it in (for the fix in an error).
SYSTEM_PACKAGES: dict[Path, str] = {Path("/usr/share/datasets/fashion-mnist"): "dataset-fashion-mnist"}

# IDX type codes (third magic byte) -> big-endian numpy dtype, per the format's description on LeCun's MNIST page.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
#: Environment variable naming the data directory when ``data_dir`` is not given; then it is the only place looked in.
DATA_DIR_ENV = "CL_DATA_DIR"
#: Debian packages that install a dataset, by the directory they install it in (for the fix in an error).
SYSTEM_PACKAGES: dict[Path, str] = {Path("/usr/share/datasets/fashion-mnist"): "dataset-fashion-mnist"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked, and downloading was not asked for or failed.

    The message names the dataset, every path looked in, and how to provide the data. Build one with
    :meth:`from_search` to get that message; the constructor takes the message alone, like ``FileNotFoundError``.

    Attributes:
        dataset: The dataset's name, when built by :meth:`from_search`.
        searched: The paths looked in, when built by :meth:`from_search`.
    """

    dataset: str = ""
    searched: tuple[str, ...] = ()

    @classmethod
    def from_search(
        cls,
        dataset: str,
        searched: Iterable[str | os.PathLike[str]],
        expected: str = "",
        note: str = "",
    ) -> DatasetNotFoundError:
        """Build the error with the standard one-paragraph message.

        Args:
            dataset: Human name of the dataset, e.g. ``"MNIST"``.
            searched: Every directory looked in, in order.
            expected: What should be there, e.g. the file names.
            note: Anything learnt on the way (a failed download, a checksum mismatch).

        Returns:
            The error, with ``dataset`` and ``searched`` kept as attributes.

        Example:
            >>> err = DatasetNotFoundError.from_search("MNIST", ["/nowhere/MNIST/raw"])
            >>> "/nowhere/MNIST/raw" in str(err) and "CL_DATA_DIR" in str(err)
            True
        """
        paths = list(dict.fromkeys(str(p) for p in searched))
        parts = [f"{dataset} was not found. Looked in: {', '.join(paths) if paths else '(nowhere)'}."]
        if expected:
            parts.append(f"Expected {expected}.")
        if note:
            parts.append(note.rstrip(".") + ".")
        parts.append(
            "To provide it, put the files there, set data_dir=/path/to/data (or the "
            f"{DATA_DIR_ENV} environment variable), or pass dataset.source.download=true where the network allows."
        )
        err = cls(" ".join(parts))
        err.dataset = dataset
        err.searched = tuple(paths)
        return err


class DataFileError(DatasetNotFoundError, ValueError):
    """A dataset file is there but unusable: truncated, of the wrong size, not in its format, or unreadable.

    The message is one line: the file, what is wrong with it, and how to replace it. It derives from
    :class:`DatasetNotFoundError` (no usable copy of the dataset was found: the run prints ``error: <message>`` and
    exits with code 2, as for missing data) and from ``ValueError`` (what :func:`read_idx` raised for malformed files
    before this class existed, so callers that catch that keep working). Build one with :meth:`for_file`.

    Attributes:
        path: The bad file.
        problem: What is wrong with it.
    """

    path: str = ""
    problem: str = ""

    @classmethod
    def for_file(cls, path: str | os.PathLike[str], problem: str, fix: str = "") -> DataFileError:
        """Build the error with the standard one-line message ``<path>: <problem>. <fix>``.

        Args:
            path: The bad file.
            problem: What is wrong, e.g. ``"truncated: the gzip stream ends before its end marker"``.
            fix: How to repair it; by default, delete and download again (or reinstall the system package that put
                it there).

        Returns:
            The error, with ``path`` and ``problem`` kept as attributes.

        Example:
            >>> str(DataFileError.for_file("/d/MNIST/raw/t10k-labels-idx1-ubyte", "truncated")).split(". ")[0]
            '/d/MNIST/raw/t10k-labels-idx1-ubyte: truncated'
        """
        problem = " ".join(problem.split()).rstrip(".")
        fix = " ".join((fix or _default_fix(Path(path))).split()).rstrip(".")
        err = cls(f"{path}: {problem}. {fix}.")
        err.path, err.problem = str(path), problem
        return err


def _default_fix(path: Path) -> str:
    for directory, package in SYSTEM_PACKAGES.items():
        if directory == path.parent or directory in path.parents:
            return (
                f"It was installed by the system package {package}: reinstall it "
                f"(apt-get install --reinstall {package}), or put a good copy under data_dir"
            )
    return (
        "Delete it, then download it again (dataset.source.download=true where the network allows) "
        "or copy a good one there"
    )


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read a file in the IDX format of the MNIST family, raw or gzipped.

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
    ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, one big-endian int32 per dimension, then the data
    in row-major, big-endian order. Gzip is recognised by its magic bytes, whatever the file is called.

    Args:
        path: The file to read.

    Returns:
        A tensor of the stored shape and type (``uint8`` for images and labels), in native byte order.

    Raises:
        FileNotFoundError: If the file does not exist.
        DataFileError: If the file is truncated (a gzip stream that ends early, fewer bytes than its header
            announces), of the wrong size (more bytes than announced), corrupt (bad gzip data or checksum), does not
            start with an IDX magic number, or cannot be read. Also a ``ValueError``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == _GZIP_MAGIC
            if not is_gzip:
                f.seek(0)
                raw = f.read()
        if is_gzip:
            with gzip.open(path, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise
    except EOFError as e:
        raise DataFileError.for_file(path, "truncated: its gzip stream ends before the end marker") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataFileError.for_file(path, f"corrupt gzip data ({one_line(e)})") from e
    except OSError as e:
        raise DataFileError.for_file(path, f"cannot be read ({one_line(e)})", fix="Check its permissions") from e
    what = "after decompression " if is_gzip else ""
    if len(raw) < 4:
        raise DataFileError.for_file(
            path, f"truncated: {len(raw)} bytes {what}is shorter than the 4-byte IDX magic number"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError.for_file(
            path,
            f"bad magic number {raw[:4].hex(' ')}: not an IDX file (one starts with 00 00, a type code 08, 09 or "
            "0b-0e, and the number of dimensions)",
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataFileError.for_file(
            path,
            f"truncated: the IDX header announces {ndim} dimensions but the file ends {what}after {len(raw)} bytes",
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    held = len(raw) - header_end
    if held != expected:
        announced = f"the IDX header announces shape {list(shape)} ({expected} bytes of data)"
        if held < expected:
            problem = f"truncated: {announced} but the file holds {held} bytes {what}after the header"
        else:
            problem = (
                f"wrong size: {announced} but the file holds {held} bytes {what}after it, {held - expected} too many"
            )
        raise DataFileError.for_file(path, problem)
    array = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    # astype copies into native byte order, which also makes the array writable as torch wants.
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpickle(path: Path) -> Any:
    """A CIFAR pickle (Python 2 strings read as latin-1, as the official archives need)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # noqa: S301 - the official archive's format, md5-checked
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataFileError.for_file(path, f"truncated or corrupted: it does not unpickle ({one_line(e)})") from e


def read_cifar_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``[N, 3072]`` uint8 rows and ``[N]`` int64 labels of one CIFAR batch file."""
    entry = unpickle(path)
    key = "labels" if isinstance(entry, dict) and "labels" in entry else "fine_labels"
    if not isinstance(entry, dict) or "data" not in entry or key not in entry:
        raise DataFileError.for_file(path, "wrong content: not a CIFAR batch (a dict with 'data' and 'labels')")
    rows, labels = np.asarray(entry["data"]), np.asarray(entry[key])
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataFileError.for_file(
            path, f"wrong size: 'data' is {rows.dtype} of shape {list(rows.shape)}, expected uint8 rows of 3072 values"
        )
    if labels.ndim != 1 or len(labels) != len(rows) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError.for_file(path, f"wrong size: {len(rows)} images but labels of shape {list(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DataFileError.for_file(path, f"wrong content: labels outside 0..{n_classes - 1}")
    return rows, labels.astype(np.int64)


def one_line(error: BaseException) -> str:
    """An exception as one line, for embedding in a one-paragraph message."""
    return " ".join(f"{type(error).__name__}: {error}".split())


@dataclass(frozen=True, eq=False)
class SourceData:
    """A labelled image dataset held in memory.

    ``eq=False``: comparing tensors with ``==`` gives a tensor, not a bool, so instances compare by identity.

    Attributes:
        name: Short identifier, e.g. ``"mnist"``.
        train_x: Training images, ``uint8``, shape ``[N, C, H, W]``.
        train_y: Training labels, ``int64``, shape ``[N]``, values in ``[0, n_classes)``.
        test_x: Test images, ``uint8``, shape ``[M, C, H, W]`` with the same ``C, H, W`` as ``train_x``.
        test_y: Test labels, ``int64``, shape ``[M]``.
        n_classes: Number of classes.
        class_names: Human-readable class names, ``n_classes`` of them, or empty when unknown.

    Raises:
        ValueError: If a dtype, a shape or a label value breaks the contract above.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            raise ValueError(f"SourceData {self.name!r}: n_classes must be >= 1, got {self.n_classes}.")
        if self.class_names and len(self.class_names) != self.n_classes:
            raise ValueError(
                f"SourceData {self.name!r}: {len(self.class_names)} class_names for n_classes={self.n_classes}."
            )
        for split in ("train", "test"):
            x: torch.Tensor = getattr(self, f"{split}_x")
            y: torch.Tensor = getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(
                    f"SourceData {self.name!r}: {split}_x must be uint8 of shape [N, C, H, W], "
                    f"got {x.dtype} of shape {list(x.shape)}."
                )
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"SourceData {self.name!r}: {split}_y must be int64 of shape [{len(x)}] to match {split}_x, "
                    f"got {y.dtype} of shape {list(y.shape)}."
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise ValueError(
                    f"SourceData {self.name!r}: {split}_y values must lie in [0, {self.n_classes}), "
                    f"got min {int(y.min())} and max {int(y.max())}."
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"SourceData {self.name!r}: train images are {list(self.train_x.shape[1:])} but test images are "
                f"{list(self.test_x.shape[1:])}."
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` shape of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"SourceData(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"image_shape={self.image_shape}, n_classes={self.n_classes})"
        )

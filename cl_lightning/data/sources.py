"""Labelled image datasets read from disk into memory as uint8 tensors.

Every loader returns a :class:`SourceData`: images as ``uint8`` tensors of shape ``[N, C, H, W]`` and labels as
``int64`` tensors of shape ``[N]``, train and test split as published. Scenario builders (class-, task- and
domain-incremental splits, permutations, rotations) work on these tensors; nothing here normalises or augments.

Where the files are looked for. A data directory that is given (the ``data_dir`` argument, which the run's config
``data_dir`` fills, or else the ``CL_DATA_DIR`` environment variable) is the *only* place looked in: a given directory
that is a file, does not exist or holds no copy of the dataset is an error, never a silent fall-back to other data
than the one the run records. Given none (``data_dir=None``, the config's default when ``CL_DATA_DIR`` is unset), the
default search looks in ``./data`` and then in the system directories of :data:`SYSTEM_DIRS`. Below the root
(``<root>``: the given directory, or ``./data``):

* MNIST: ``<root>/MNIST/raw/`` (torchvision's layout), ``<root>/MNIST/``, ``<root>/``; the four IDX files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each raw or gzipped (``.gz``).
* Fashion-MNIST: ``<root>/FashionMNIST/raw/``, ``<root>/FashionMNIST/``, and in the default search also
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package, gzipped files only). Not
  ``<root>/`` itself: the files have the same names as MNIST's, and a bare directory would let one dataset be read as
  the other.
* CIFAR-10/100: torchvision's ``<root>/cifar-10-batches-py/`` and ``<root>/cifar-100-python/`` (the extracted
  official archives), every file checked against torchvision's table of the official md5 sums.
* The 8x8 digits of scikit-learn ship inside the package: :func:`load_digits` never touches the disk or network.

The IDX files are read by :func:`read_idx` rather than torchvision's ``MNIST`` class, which reads only unzipped
files and, given ``download=True``, writes next to them (impossible in a read-only system directory). The CIFAR
pickles are read here too rather than by torchvision's classes, so that a bad file is named in the error. A file
that is there but unusable (truncated, of the wrong size, a bad magic number, an md5 sum that is not the official
one) raises :class:`DataFileError`: one line naming the file, what is wrong with it and how to replace it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
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
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "SYSTEM_DIRS",
    "DataFileError",
    "DatasetNotFoundError",
    "SourceData",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]

log = logging.getLogger(__name__)

#: Environment variable naming the data directory when ``data_dir`` is not given; then it is the only place looked in.
DATA_DIR_ENV = "CL_DATA_DIR"

#: The directory of the default search (no ``data_dir``, no ``CL_DATA_DIR``), relative to the working directory.
DEFAULT_DATA_DIR = Path("data")

#: System-wide directories searched after :data:`DEFAULT_DATA_DIR` by the default search only, per dataset. Debian's
#: ``dataset-fashion-mnist`` package installs the four gzipped IDX files of Fashion-MNIST (and nothing else) in
#: ``/usr/share/datasets/fashion-mnist``.
SYSTEM_DIRS: dict[str, list[Path]] = {
    "mnist": [],
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
}

#: The system package that installs each system directory, named in the fix of a bad file found there.
SYSTEM_PACKAGES: dict[Path, str] = {Path("/usr/share/datasets/fashion-mnist"): "dataset-fashion-mnist"}

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The four files of the MNIST family, as named by LeCun's site and every mirror since.
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

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
        raise DataFileError.for_file(path, f"corrupt gzip data ({_one_line(e)})") from e
    except OSError as e:
        raise DataFileError.for_file(path, f"cannot be read ({_one_line(e)})", fix="Check its permissions") from e
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


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> SourceData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), split into train and test.

    The data ships inside scikit-learn, so this never needs a download. Pixel values 0..16 are scaled to 0..255 as
    ``round(v * 255 / 16)``; the split is stratified by class and seeded.

    Args:
        seed: Seed of the split.
        test_fraction: Fraction of the images that go to the test split, in ``(0, 1)``.

    Returns:
        The dataset, named ``"digits"``, images of shape ``[N, 1, 8, 8]``.

    Raises:
        ValueError: If ``test_fraction`` is not in ``(0, 1)``.

    Example:
        >>> data = load_digits(seed=0)
        >>> data.train_x.shape, data.test_x.shape, int(data.train_x.max())
        (torch.Size([1347, 1, 8, 8]), torch.Size([450, 1, 8, 8]), 255)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_load_digits(return_X_y=True)
    pixels = np.rint(images * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return SourceData(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        n_classes=10,
        class_names=MNIST_CLASSES,
    )


def load_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> SourceData:
    """MNIST, 60000 train and 10000 test images of 28x28 handwritten digits.

    Args:
        data_dir: Directory holding ``MNIST/raw/`` (torchvision's layout), ``MNIST/``, or the four files directly;
            the only place looked in. ``None``: ``$CL_DATA_DIR`` when set (then the only place), else ``./data``.
        download: Fetch the files with torchvision into ``<data_dir>/MNIST/raw/`` when they are not found.

    Returns:
        The dataset, named ``"mnist"``, images of shape ``[N, 1, 28, 28]``.

    Raises:
        DatasetNotFoundError: If the files are not found and ``download`` is false or the download failed.
        DataFileError: If a file is there but truncated, of the wrong size or not an IDX file.
    """
    return _load_idx_dataset(
        name="mnist",
        title="MNIST",
        folder="MNIST",
        data_dir=data_dir,
        download=download,
        class_names=MNIST_CLASSES,
        search_bare_root=True,
    )


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> SourceData:
    """Fashion-MNIST, 60000 train and 10000 test 28x28 images of clothing in 10 classes.

    Args:
        data_dir: Directory holding ``FashionMNIST/raw/`` (torchvision's layout) or ``FashionMNIST/``; the only place
            looked in. ``None``: ``$CL_DATA_DIR`` when set (then the only place), else ``./data`` and then the
            system directories of :data:`SYSTEM_DIRS` (Debian's ``dataset-fashion-mnist``).
        download: Fetch the files with torchvision into ``<data_dir>/FashionMNIST/raw/`` when they are not found.

    Returns:
        The dataset, named ``"fashion_mnist"``, images of shape ``[N, 1, 28, 28]``.

    Raises:
        DatasetNotFoundError: If the files are not found and ``download`` is false or the download failed.
        DataFileError: If a file is there but truncated, of the wrong size or not an IDX file.
    """
    return _load_idx_dataset(
        name="fashion_mnist",
        title="Fashion-MNIST",
        folder="FashionMNIST",
        data_dir=data_dir,
        download=download,
        class_names=FASHION_MNIST_CLASSES,
        search_bare_root=False,
    )


def load_cifar10(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> SourceData:
    """CIFAR-10, 50000 train and 10000 test 32x32 colour images in 10 classes.

    Args:
        data_dir: Directory holding ``cifar-10-batches-py/`` (the extracted official archive); the only place
            looked in. ``None``: ``$CL_DATA_DIR`` when set, else ``./data``.
        download: Fetch and extract the archive with torchvision into ``data_dir`` when it is not found.

    Returns:
        The dataset, named ``"cifar10"``, images of shape ``[N, 3, 32, 32]``.

    Raises:
        DatasetNotFoundError: If the files are missing and ``download`` is false or failed.
        DataFileError: If a file is there but its md5 sum is not the official one, or it does not unpickle.
    """
    return _load_cifar("cifar10", "CIFAR-10", "CIFAR10", "cifar-10-batches-py", data_dir, download)


def load_cifar100(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> SourceData:
    """CIFAR-100, 50000 train and 10000 test 32x32 colour images in 100 (fine) classes.

    Args:
        data_dir: Directory holding ``cifar-100-python/`` (the extracted official archive); the only place looked
            in. ``None``: ``$CL_DATA_DIR`` when set, else ``./data``.
        download: Fetch and extract the archive with torchvision into ``data_dir`` when it is not found.

    Returns:
        The dataset, named ``"cifar100"``, images of shape ``[N, 3, 32, 32]``, labels the fine classes.

    Raises:
        DatasetNotFoundError: If the files are missing and ``download`` is false or failed.
        DataFileError: If a file is there but its md5 sum is not the official one, or it does not unpickle.
    """
    return _load_cifar("cifar100", "CIFAR-100", "CIFAR100", "cifar-100-python", data_dir, download)


@dataclass(frozen=True)
class _DataRoot:
    """Where to look: the root directory, whether it was given, and how (for the messages)."""

    path: Path
    given: bool
    origin: str  # "data_dir=/x", "data_dir=/x (from CL_DATA_DIR)", or "" for the default search

    def check(self, title: str, expected: str) -> None:
        """Refuse a given root that is a file, at once (a download cannot go there either)."""
        if self.given and self.path.is_file():
            note = f"{self.origin} is a file, not a directory"
            raise DatasetNotFoundError.from_search(title, [self.path], expected, note=note)

    def not_found(self, title: str, searched: list[Path], expected: str, note: str = "") -> DatasetNotFoundError:
        """The standard error, saying why a given root was the only place looked in."""
        notes = [note] if note else []
        if self.given:
            state = "does not exist" if not self.path.exists() else "holds no copy"
            notes.append(
                f"{self.origin} {state}; a given data directory (data_dir or {DATA_DIR_ENV}) is the only place "
                "looked in"
            )
        return DatasetNotFoundError.from_search(title, searched, expected, note="; ".join(notes))


def _data_root(data_dir: str | os.PathLike[str] | None) -> _DataRoot:
    """``data_dir`` when given (not ``None`` nor empty), else ``$CL_DATA_DIR`` when set, else the default search."""
    env = os.environ.get(DATA_DIR_ENV) or ""
    if data_dir is not None and os.fspath(data_dir) != "":
        path = Path(data_dir).expanduser()
        source = f" (from {DATA_DIR_ENV})" if env and Path(env).expanduser() == path else ""
        return _DataRoot(path, True, f"data_dir={os.fspath(data_dir)}{source}")
    if env:
        return _DataRoot(Path(env).expanduser(), True, f"{DATA_DIR_ENV}={env}")
    return _DataRoot(Path.cwd() / DEFAULT_DATA_DIR, False, "")  # absolute: the messages say where it was


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (raw preferred over ``.gz``: faster to read), or None if any is missing."""
    found = {}
    for key, stem in _IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _idx_search_dirs(name: str, folder: str, root: _DataRoot, search_bare_root: bool) -> list[Path]:
    dirs = [root.path / folder / "raw", root.path / folder]
    if search_bare_root:
        dirs.append(root.path)
    # the system directories belong to the default search only: a given directory is the only place looked in
    return dirs if root.given else dirs + list(SYSTEM_DIRS.get(name, []))


def _load_idx_dataset(
    name: str,
    title: str,
    folder: str,
    data_dir: str | os.PathLike[str] | None,
    download: bool,
    class_names: tuple[str, ...],
    search_bare_root: bool,
) -> SourceData:
    root = _data_root(data_dir)
    dirs = _idx_search_dirs(name, folder, root, search_bare_root)
    expected = "the four files " + ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
    root.check(title, expected)
    files = next((f for f in map(_find_idx_files, dirs) if f is not None), None)
    if files is None and download:
        try:
            from torchvision import datasets

            # One construction downloads all four files (train and test) into <root>/<folder>/raw.
            getattr(datasets, folder)(root=str(root.path), train=True, download=True)
        except (RuntimeError, OSError) as e:
            note = f"Downloading into {root.path / folder / 'raw'} failed: {_one_line(e)}"
            raise root.not_found(title, dirs, expected, note=note) from e
        files = _find_idx_files(root.path / folder / "raw")
    if files is None:
        raise root.not_found(title, dirs, expected)

    log.info("%s read from %s", title, files["train_x"].parent)
    tensors = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x_path, y_path = files[f"{split}_x"], files[f"{split}_y"]
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        for path, tensor, ndim, what in ((x_path, x, 3, "images [N, H, W]"), (y_path, y, 1, "labels [N]")):
            if tensor.ndim != ndim or tensor.dtype != torch.uint8:
                raise DataFileError.for_file(
                    path, f"wrong content: {tensor.dtype} of shape {list(tensor.shape)}, expected uint8 {what}"
                )
        if len(x) != len(y):
            raise DataFileError.for_file(
                y_path, f"wrong size: {len(y)} labels for the {len(x)} images of {x_path.name} beside it"
            )
        if len(y) and int(y.max()) >= len(class_names):
            raise DataFileError.for_file(
                y_path, f"wrong content: label {int(y.max())} outside 0..{len(class_names) - 1} (corrupted?)"
            )
    return SourceData(
        name=name,
        train_x=tensors["train_x"].unsqueeze(1).contiguous(),
        train_y=tensors["train_y"].to(torch.int64).contiguous(),
        test_x=tensors["test_x"].unsqueeze(1).contiguous(),
        test_y=tensors["test_y"].to(torch.int64).contiguous(),
        n_classes=len(class_names),
        class_names=class_names,
    )


def _load_cifar(
    name: str, title: str, tv_class: str, folder: str, data_dir: str | os.PathLike[str] | None, download: bool
) -> SourceData:
    from torchvision import datasets

    # torchvision's class holds the official file names and md5 sums and knows how to download the archive
    cls = getattr(datasets, tv_class)
    root = _data_root(data_dir)
    directory = root.path / folder
    expected = f"the extracted batches of the official {cls.filename} (folder {folder})"
    root.check(title, expected)

    def official() -> list[tuple[str, str]]:  # (file name, md5 sum), read when needed: the table is torchvision's
        files = [(str(f), str(md5)) for f, md5 in [*cls.train_list, *cls.test_list]]
        return [*files, (str(cls.meta["filename"]), str(cls.meta["md5"]))]

    def missing() -> list[str]:
        return [f for f, _ in official() if not (directory / f).is_file()]

    if missing() and download:
        try:
            cls(root=str(root.path), train=True, download=True)
        except (RuntimeError, OSError) as e:
            note = f"Downloading into {root.path} failed: {_one_line(e)}"
            raise root.not_found(title, [directory], expected, note=note) from e
    lacking = missing()
    if lacking:
        note = f"{directory} exists but lacks {', '.join(lacking)}" if directory.is_dir() else ""
        raise root.not_found(title, [directory], expected, note=note)
    for filename, md5 in official():
        digest = _md5(directory / filename)
        if digest != md5:
            raise DataFileError.for_file(
                directory / filename,
                f"truncated or corrupted: its md5 sum is {digest}, not {md5} as in the official {cls.filename}",
            )
    log.info("%s read from %s", title, directory)
    n_classes = 10 if tv_class == "CIFAR10" else 100
    train = [_read_cifar_batch(directory / f, n_classes) for f, _ in cls.train_list]
    test = [_read_cifar_batch(directory / f, n_classes) for f, _ in cls.test_list]
    meta_path = directory / cls.meta["filename"]
    meta = _unpickle(meta_path)
    classes = meta.get(cls.meta["key"]) if isinstance(meta, dict) else None
    if not isinstance(classes, list) or len(classes) != n_classes:
        raise DataFileError.for_file(meta_path, f"wrong content: expected {n_classes} names under {cls.meta['key']!r}")

    def stack(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        # a row is 1024 red, then 1024 green, then 1024 blue values, each row-major: channels first as it stands
        x = np.concatenate([rows for rows, _ in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([labels for _, labels in batches])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    return SourceData(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        n_classes=n_classes,
        class_names=tuple(str(c) for c in classes),
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickle(path: Path) -> Any:
    """A CIFAR pickle (Python 2 strings read as latin-1, as the official archives need)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # noqa: S301 - the official archive's format, md5-checked
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataFileError.for_file(path, f"truncated or corrupted: it does not unpickle ({_one_line(e)})") from e


def _read_cifar_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``[N, 3072]`` uint8 rows and ``[N]`` int64 labels of one CIFAR batch file."""
    entry = _unpickle(path)
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


def _one_line(error: BaseException) -> str:
    """An exception as one line, for embedding in a one-paragraph message."""
    return " ".join(f"{type(error).__name__}: {error}".split())

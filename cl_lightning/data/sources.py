"""Labelled image datasets read from disk into memory as uint8 tensors.

Every loader returns a :class:`SourceData`: images as ``uint8`` tensors of shape ``[N, C, H, W]`` and labels as
``int64`` tensors of shape ``[N]``, train and test split as published. Scenario builders (class-, task- and
domain-incremental splits, permutations, rotations) work on these tensors; nothing here normalises or augments.

Where the files are looked for, in order (``data_dir`` first, then the directory named by the ``CL_DATA_DIR``
environment variable when it is set, then the system directories of :data:`SYSTEM_DIRS`):

* MNIST: ``<root>/MNIST/raw/`` (torchvision's layout), ``<root>/MNIST/``, ``<root>/``; the four IDX files
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each raw or gzipped (``.gz``).
* Fashion-MNIST: ``<root>/FashionMNIST/raw/``, ``<root>/FashionMNIST/`` and ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist`` package, gzipped files only). Not ``<root>/`` itself: the files have the same
  names as MNIST's, and a bare directory would let one dataset be read as the other.
* CIFAR-10/100: torchvision's ``<root>/cifar-10-batches-py/`` and ``<root>/cifar-100-python/``, read by torchvision's
  own classes (which check every file's md5 sum).
* The 8x8 digits of scikit-learn ship inside the package: :func:`load_digits` never touches the disk or network.

The IDX files are read by :func:`read_idx` rather than torchvision's ``MNIST`` class, which reads only unzipped
files and, given ``download=True``, writes next to them (impossible in a read-only system directory).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATA_DIR_ENV",
    "SYSTEM_DIRS",
    "DatasetNotFoundError",
    "SourceData",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]

#: Environment variable naming a directory that is searched after ``data_dir``.
DATA_DIR_ENV = "CL_DATA_DIR"

#: System-wide directories searched last, per dataset. Debian's ``dataset-fashion-mnist`` package installs the four
#: gzipped IDX files of Fashion-MNIST (and nothing else) in ``/usr/share/datasets/fashion-mnist``.
SYSTEM_DIRS: dict[str, list[Path]] = {
    "mnist": [],
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
}

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
        ValueError: If the header is not IDX or the data is shorter or longer than the header says.
    """
    path = Path(path)
    with open(path, "rb") as f:
        is_gzip = f.read(2) == _GZIP_MAGIC
    opener: Callable[..., Any] = gzip.open if is_gzip else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: its first bytes are {raw[:4].hex(' ') or '(none)'}.")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: the IDX header announces {ndim} dimensions but the file ends before them.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(
            f"{path}: the IDX header announces shape {list(shape)} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header_end} bytes after the header (truncated or corrupted download?)."
        )
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


def load_mnist(data_dir: str | os.PathLike[str], download: bool = False) -> SourceData:
    """MNIST, 60000 train and 10000 test images of 28x28 handwritten digits.

    Args:
        data_dir: Directory holding ``MNIST/raw/`` (torchvision's layout), ``MNIST/``, or the four files directly.
        download: Fetch the files with torchvision into ``<data_dir>/MNIST/raw/`` when they are not found.

    Returns:
        The dataset, named ``"mnist"``, images of shape ``[N, 1, 28, 28]``.

    Raises:
        DatasetNotFoundError: If the files are not found and ``download`` is false or the download failed.
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


def load_fashion_mnist(data_dir: str | os.PathLike[str], download: bool = False) -> SourceData:
    """Fashion-MNIST, 60000 train and 10000 test 28x28 images of clothing in 10 classes.

    Args:
        data_dir: Directory holding ``FashionMNIST/raw/`` (torchvision's layout) or ``FashionMNIST/``. The system
            directories of :data:`SYSTEM_DIRS` (Debian's ``dataset-fashion-mnist``) are searched too.
        download: Fetch the files with torchvision into ``<data_dir>/FashionMNIST/raw/`` when they are not found.

    Returns:
        The dataset, named ``"fashion_mnist"``, images of shape ``[N, 1, 28, 28]``.

    Raises:
        DatasetNotFoundError: If the files are not found and ``download`` is false or the download failed.
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


def load_cifar10(data_dir: str | os.PathLike[str], download: bool = False) -> SourceData:
    """CIFAR-10, 50000 train and 10000 test 32x32 colour images in 10 classes.

    Args:
        data_dir: Directory holding ``cifar-10-batches-py/`` (the extracted official archive).
        download: Fetch and extract the archive with torchvision into ``data_dir`` when it is not found.

    Returns:
        The dataset, named ``"cifar10"``, images of shape ``[N, 3, 32, 32]``.

    Raises:
        DatasetNotFoundError: If the files are missing or corrupted and ``download`` is false or failed.
    """
    return _load_cifar("cifar10", "CIFAR-10", "CIFAR10", "cifar-10-batches-py", data_dir, download)


def load_cifar100(data_dir: str | os.PathLike[str], download: bool = False) -> SourceData:
    """CIFAR-100, 50000 train and 10000 test 32x32 colour images in 100 (fine) classes.

    Args:
        data_dir: Directory holding ``cifar-100-python/`` (the extracted official archive).
        download: Fetch and extract the archive with torchvision into ``data_dir`` when it is not found.

    Returns:
        The dataset, named ``"cifar100"``, images of shape ``[N, 3, 32, 32]``, labels the fine classes.

    Raises:
        DatasetNotFoundError: If the files are missing or corrupted and ``download`` is false or failed.
    """
    return _load_cifar("cifar100", "CIFAR-100", "CIFAR100", "cifar-100-python", data_dir, download)


def _roots(data_dir: str | os.PathLike[str]) -> list[Path]:
    """``data_dir`` then ``$CL_DATA_DIR`` (when set and different), user-expanded."""
    roots = [Path(data_dir).expanduser()]
    env = os.environ.get(DATA_DIR_ENV)
    if env and Path(env).expanduser() != roots[0]:
        roots.append(Path(env).expanduser())
    return roots


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


def _idx_search_dirs(name: str, folder: str, data_dir: str | os.PathLike[str], search_bare_root: bool) -> list[Path]:
    dirs = []
    for root in _roots(data_dir):
        dirs += [root / folder / "raw", root / folder]
        if search_bare_root:
            dirs.append(root)
    return dirs + list(SYSTEM_DIRS.get(name, []))


def _load_idx_dataset(
    name: str,
    title: str,
    folder: str,
    data_dir: str | os.PathLike[str],
    download: bool,
    class_names: tuple[str, ...],
    search_bare_root: bool,
) -> SourceData:
    dirs = _idx_search_dirs(name, folder, data_dir, search_bare_root)
    files = next((f for f in map(_find_idx_files, dirs) if f is not None), None)
    expected = "the four files " + ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
    if files is None and download:
        root = Path(data_dir).expanduser()
        try:
            from torchvision import datasets

            # One construction downloads all four files (train and test) into <root>/<folder>/raw.
            getattr(datasets, folder)(root=str(root), train=True, download=True)
        except (RuntimeError, OSError) as e:
            raise DatasetNotFoundError.from_search(
                title, dirs, expected, note=f"Downloading into {root / folder / 'raw'} failed: {_one_line(e)}"
            ) from e
        files = _find_idx_files(root / folder / "raw")
    if files is None:
        raise DatasetNotFoundError.from_search(title, dirs, expected)

    tensors = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{title}: expected images [N, H, W] and labels [N] in {files[f'{split}_x']} and "
                f"{files[f'{split}_y']}, got {list(x.shape)} and {list(y.shape)}."
            )
    return SourceData(
        name=name,
        train_x=tensors["train_x"].to(torch.uint8).unsqueeze(1).contiguous(),
        train_y=tensors["train_y"].to(torch.int64).contiguous(),
        test_x=tensors["test_x"].to(torch.uint8).unsqueeze(1).contiguous(),
        test_y=tensors["test_y"].to(torch.int64).contiguous(),
        n_classes=len(class_names),
        class_names=class_names,
    )


def _load_cifar(
    name: str, title: str, tv_class: str, folder: str, data_dir: str | os.PathLike[str], download: bool
) -> SourceData:
    from torchvision import datasets

    cls = getattr(datasets, tv_class)
    roots = _roots(data_dir)
    searched = [root / folder for root in roots]
    expected = f"the extracted batches of the official {cls.filename} (folder {folder})"
    notes = []
    last_error: Exception | None = None
    for root in roots:
        try:
            return _cifar_from_torchvision(cls, name, root, download=False)
        except RuntimeError as e:
            last_error = e
            if (root / folder).exists():
                # The folder is there, so torchvision found a file missing or with the wrong md5 sum.
                notes.append(f"{root / folder} exists but torchvision reported: {_one_line(e)}")
    if download:
        root = roots[0]
        try:
            return _cifar_from_torchvision(cls, name, root, download=True)
        except (RuntimeError, OSError) as e:
            notes.append(f"Downloading into {root} failed: {_one_line(e)}")
            raise DatasetNotFoundError.from_search(title, searched, expected, note="; ".join(notes)) from e
    raise DatasetNotFoundError.from_search(title, searched, expected, note="; ".join(notes)) from last_error


def _cifar_from_torchvision(cls: type, name: str, root: Path, download: bool) -> SourceData:
    train = cls(root=str(root), train=True, download=download)
    test = cls(root=str(root), train=False, download=False)
    return SourceData(
        name=name,
        # torchvision holds [N, H, W, C]; we keep channels first like every torch image.
        train_x=torch.from_numpy(np.asarray(train.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous(),
        train_y=torch.as_tensor(train.targets, dtype=torch.int64),
        test_x=torch.from_numpy(np.asarray(test.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous(),
        test_y=torch.as_tensor(test.targets, dtype=torch.int64),
        n_classes=len(train.classes),
        class_names=tuple(str(c) for c in train.classes),
    )


def _one_line(error: BaseException) -> str:
    """An exception as one line, for embedding in a one-paragraph message."""
    return " ".join(f"{type(error).__name__}: {error}".split())

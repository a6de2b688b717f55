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

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl_lightning.data.files import (
    DATA_DIR_ENV,
    SYSTEM_PACKAGES,
    DataFileError,
    DatasetNotFoundError,
    SourceData,
    file_md5,
    one_line,
    read_cifar_batch,
    read_idx,
    unpickle,
)

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "SYSTEM_DIRS",
    "SYSTEM_PACKAGES",
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


#: The directory of the default search (no ``data_dir``, no ``CL_DATA_DIR``), relative to the working directory.
DEFAULT_DATA_DIR = Path("data")

#: System-wide directories searched after :data:`DEFAULT_DATA_DIR` by the default search only, per dataset. Debian's
#: ``dataset-fashion-mnist`` package installs the four gzipped IDX files of Fashion-MNIST (and nothing else) in
#: ``/usr/share/datasets/fashion-mnist``.
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
            note = f"Downloading into {root.path / folder / 'raw'} failed: {one_line(e)}"
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
            note = f"Downloading into {root.path} failed: {one_line(e)}"
            raise root.not_found(title, [directory], expected, note=note) from e
    lacking = missing()
    if lacking:
        note = f"{directory} exists but lacks {', '.join(lacking)}" if directory.is_dir() else ""
        raise root.not_found(title, [directory], expected, note=note)
    for filename, md5 in official():
        digest = file_md5(directory / filename)
        if digest != md5:
            raise DataFileError.for_file(
                directory / filename,
                f"truncated or corrupted: its md5 sum is {digest}, not {md5} as in the official {cls.filename}",
            )
    log.info("%s read from %s", title, directory)
    n_classes = 10 if tv_class == "CIFAR10" else 100
    train = [read_cifar_batch(directory / f, n_classes) for f, _ in cls.train_list]
    test = [read_cifar_batch(directory / f, n_classes) for f, _ in cls.test_list]
    meta_path = directory / cls.meta["filename"]
    meta = unpickle(meta_path)
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

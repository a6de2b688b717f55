"""The run directory: one run per directory, claimed with a lock, never written by a refused run.

Hydra creates the directory before the run starts; it writes nothing into it (``hydra.output_subdir: null`` and a
log file opened on its first record, ``conf/hydra/default.yaml``). :meth:`RunDirectory.claim` then checks, in this
order and without writing anything, that the directory can be written, that no other process holds it (an
exclusive ``flock`` on the directory itself, held until the run ends) and, for a new run, that it holds no earlier
run's results. Only a claimed run writes there: ``.hydra/`` (the composed config and the overrides, as Hydra would
have written them) and everything after. A command that is refused before it trains removes the directory again
when Hydra created it for that command, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl_lightning.errors import OtherRunError, RunDirectoryError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from hydra.experimental.callback import Callback

RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"
HYDRA_SUBDIR = ".hydra"
# The deepest folder on the way to the run directory that existed before Hydra created the run directory (noted by
# NoteExistingFolders); what Hydra created below it for a refused command is removed again.
_existed_before: dict[Path, Path] = {}


class NoteExistingFolders(Callback):
    """Hydra callback, before Hydra creates the run's (or the sweep's) directory: check that it can be created
    (one line and exit status 2 if not) and note how much of the path to it already exists."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        _existed_before[run_dir] = _check_creatable(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        _check_creatable(Path(str(config.hydra.sweep.dir)).absolute(), "hydra.sweep.dir")


def _check_creatable(path: Path, key: str) -> Path:
    """The deepest existing folder on the way to ``path``; exit with one line if ``path`` cannot be made there."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is read-only or not writable by this user"
    if problem is not None:
        print(
            f"error: cannot create the output directory {path}: {problem}; choose a writable place with "
            f"{key}=... or the environment variable CL_OUTPUT_DIR",
            file=sys.stderr,
        )
        sys.exit(2)
    return existing


def launch_rank() -> int:
    """This process's global rank as the launcher (Lightning, torchrun or SLURM) set it, before DDP starts."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RunDirectory:
    """The directory one run writes into (``paths.output_dir``).

    Args:
        path: The directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        # Hydra made it (and perhaps folders above it) for this command: a refused command removes them again
        existed = _existed_before.get(self.path.absolute())
        self._keep: Path | None = existed
        self.created_here = (
            existed is not None and existed != self.path.absolute() and self.path.is_dir()
            and not any(self.path.iterdir())
        )  # fmt: skip

    def claim(self, new_run: bool) -> None:
        """Take the directory for this run, or raise :class:`RunDirectoryError` having written nothing.

        Args:
            new_run: A new run (refused where results or checkpoints exist); ``False`` for a resumed run, which
                continues in its own directory.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"output directory {path} is a file; choose another with hydra.run.dir=...")
        if new_run and not path.exists():
            self.created_here, self._keep = True, next(p for p in path.absolute().parents if p.exists())
            try:
                path.mkdir(parents=True)
            except OSError as err:
                raise RunDirectoryError(
                    f"cannot create the output directory {path} ({err.strerror}); choose a writable one with "
                    "hydra.run.dir=... or CL_OUTPUT_DIR=..."
                ) from err
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirectoryError(
                f"cannot write to the output directory {path} (read-only or no permission); choose a writable one "
                "with hydra.run.dir=... or CL_OUTPUT_DIR=..."
            )
        if fcntl is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.created_here = False  # another run's directory now: never removed by this one
                raise OtherRunError(
                    f"{path} is in use by another run (it holds the directory's lock); wait for it to finish or "
                    "choose another directory with hydra.run.dir=..."
                ) from None
            self._fd = fd
        if new_run:
            taken = [p for p in (path / RESULTS_FILE, path / "checkpoints") if p.exists()]
            if taken:
                self.release()
                raise OtherRunError(
                    f"{path} already holds an earlier run ({taken[0].name}); its outputs are kept: choose another "
                    "directory with hydra.run.dir=... (or paths.output_dir=...)"
                )

    def write_hydra_files(self, cfg: DictConfig) -> None:
        """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them (when it runs)."""
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
        out = self.path / HYDRA_SUBDIR
        out.mkdir(exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), out / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")

    def discard(self) -> None:
        """Remove the directory, and the folders created above it for it, if this command created them; release it.

        Called when the command is refused before training: a refused command leaves no directory behind.
        """
        if not self.created_here or not self.path.is_dir():
            self.release()
            return
        if self._fd is None:  # refused before it was claimed: only an empty directory nobody holds is removed
            try:
                self.claim(new_run=False)
            except RunDirectoryError:
                return
            if any(self.path.iterdir()):
                self.release()
                return
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.path.absolute().parents:
            if parent == self._keep:
                break
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty: another run may have appeared there meanwhile
        self.release()

    def release(self) -> None:
        """Give up the lock (the run has ended)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

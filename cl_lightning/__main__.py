"""``python -m cl_lightning``: see :mod:`cl_lightning.cli`."""

from cl_lightning.cli import main

if __name__ == "__main__":
    main()

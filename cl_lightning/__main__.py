"""``python -m cl_lightning``: see :func:`cl_lightning.train.main`."""

from cl_lightning.train import main

if __name__ == "__main__":
    main()

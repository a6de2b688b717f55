"""Batches gathered by index from in-memory tensors.

A ``torch.utils.data.DataLoader`` over a ``TensorDataset`` collates sample by sample; gathering a whole batch with
one indexing op is several times faster for MNIST-sized inputs and keeps Lightning's per-step overhead the only
overhead. Lightning accepts any sized iterable as a dataloader; since it does not inject a ``DistributedSampler``
into one, the loader shards by ``rank`` / ``world_size`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from cl_lightning.data.batch import Batch


class TensorBatchLoader:
    """Iterate over ``(x, y, task_id)`` tensors in batches.

    Args:
        x: Inputs, any dtype, first dimension the sample.
        y: Labels.
        task_id: Task of each sample (``-1`` where hidden).
        batch_size: Samples per batch on each process.
        shuffle: Draw a fresh permutation of the samples on each pass; otherwise serve them in their order.
        seed: Seed of the permutation; the same seed gives the same batches on every process and after a resume.
        n_batches: If set, yield exactly this many batches, starting new passes as needed (a fixed number of
            optimizer steps per task); else one pass.
        rank: This process's rank; each rank takes every ``world_size``-th sample of the permutation.
        world_size: Number of processes.
        index: Index reported for each sample (defaults to ``arange(len(y))``).
        pad: Pad the ranks' shards to equal length (every rank takes the same number of steps, as training under
            DDP needs); default: when shuffling (training), not otherwise (evaluation, where no sample may count
            twice).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        task_id: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        n_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        index: Tensor | None = None,
        pad: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.task_id = x, y, task_id
        self.index = torch.arange(len(y)) if index is None else index
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.n_batches, self.rank, self.world_size = n_batches, rank, world_size
        self.pad = shuffle if pad is None else pad
        self._yielded = 0  # batches handed out in the current pass
        self._skip = 0  # batches to skip at the next pass (set by load_state_dict: mid-epoch resume)

    def _per_rank(self) -> int:
        n = len(self.y)
        # Training shards are padded to equal length (as DistributedSampler does) so every rank takes the same number
        # of optimizer steps; evaluation shards are not padded, so no sample is counted twice.
        return -(-n // self.world_size) if self.pad else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        if self.n_batches is not None:
            return self.n_batches
        return -(-self._per_rank() // self.batch_size)

    def _order(self, gen: torch.Generator) -> Tensor:
        n = len(self.y)
        if not self.pad:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        per_rank = self._per_rank()
        if per_rank * self.world_size > n:
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed)
        order = self._order(gen)
        if self.n_batches is None:
            chunks: Iterator[Tensor] = iter(order.split(self.batch_size))
        else:
            chunks = self._fixed_number(order, gen)
        skip, self._skip, self._yielded = self._skip, 0, 0
        tensors = (self.x, self.y, self.task_id, self.index)
        # index_select: the rows of t[idx] at a third of advanced indexing's per-call cost (it needs idx's device)
        select = all(t.device == order.device for t in tensors)
        for i, idx in enumerate(chunks):
            if i < skip:
                continue  # replayed, not served: the permutation and the generator advance as they did
            self._yielded = i + 1
            yield Batch(*(t.index_select(0, idx) if select else t[idx] for t in tensors))

    def state_dict(self) -> dict[str, int]:
        """Position in the current pass; Lightning saves it in mid-epoch checkpoints."""
        return {"yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the pass after the batches already served (the same seed gives the same batches)."""
        self._skip = int(state_dict.get("yielded", 0))

    def _fixed_number(self, order: Tensor, gen: torch.Generator) -> Iterator[Tensor]:
        assert self.n_batches is not None
        pos = 0
        for _ in range(self.n_batches):
            while pos + self.batch_size > len(order):
                # a new pass: the rest of this one followed by a fresh permutation, so every batch is full
                order = torch.cat([order[pos:], self._order(gen)])
                pos = 0
            yield order[pos : pos + self.batch_size]
            pos += self.batch_size

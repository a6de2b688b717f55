"""A callback that checks, at every task end, that all DDP ranks hold the same weights and method state."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from cl_lightning.methods.base import CLMethod


def _checksum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Order-sensitive float64 fingerprint of a list of tensors."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(tensors):
        t = t.detach().cpu().double().flatten()
        weights = torch.arange(1, t.numel() + 1, dtype=torch.float64)
        total += (i + 1) * (t * weights).sum()
    return total


def _state_tensors(state: object) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _state_tensors(state[key])]
    if isinstance(state, list | tuple):
        return [t for item in state for t in _state_tensors(item)]
    if isinstance(state, int | float) and not isinstance(state, bool):
        return [torch.tensor(float(state))]
    return []


class SameOnAllRanks(pl.Callback):
    """Raise at a task end if any rank's parameters or continual-method state differ from rank 0's."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        methods = [cb for cb in trainer.callbacks if isinstance(cb, CLMethod)]  # type: ignore[attr-defined]
        params = [p for _, p in sorted(pl_module.named_parameters())]
        states = [t for m in methods for t in _state_tensors(m.state_dict())]
        local = torch.stack([_checksum(params), _checksum(states)]).to(pl_module.device)
        gathered = trainer.strategy.all_gather(local)
        if gathered.dim() > 1 and not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-6):
            raise AssertionError(f"ranks differ at the end of a task: {gathered.tolist()}")

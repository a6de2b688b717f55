"""How many intra-op threads a run uses when ``threads`` is ``auto`` (the default).

Intra-op threads pay off only when each operation has enough arithmetic to split; for the small networks of most
continual-learning benchmarks (an MLP on MNIST, batch 10 to 128) a step is a few hundred small kernels, and extra
OpenMP threads cost more in hand-offs than they save. On a busy machine it is much worse: a thread waiting for a
core that another process holds stalls every kernel (measured in ``benchmarks/threads.py``). So ``auto`` is:

- **one thread** when the network's forward pass over one training batch is under ``SMALL_BATCH_FLOPS``
  (counted once, before training, by ``torch.utils.flop_counter`` on a one-sample batch);
- otherwise the cores this process may use (its CPU affinity, shared among the run's CPU processes under DDP),
  less the cores other processes keep busy (the one-minute load average, this process excluded), at least one.

The command line (``python -m cl_lightning``) also sets ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported,
unless it is set already, so that threads that have no work sleep instead of spinning on a core another process
needs. The choice is logged and recorded in ``results.json`` (``versions.torch_threads``).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from cl_lightning.models.backbones import net_logits

log = logging.getLogger("cl_lightning")

__all__ = ["SMALL_BATCH_FLOPS", "auto_threads", "available_cores", "batch_flops"]

SMALL_BATCH_FLOPS = 1e9  # a forward pass over one batch below this trains fastest on one thread


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def batch_flops(net: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> float:
    """FLOPs of ``net``'s forward pass over a batch of ``batch_size`` inputs of ``input_shape`` (one sample's count
    times the batch size; ``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    was_training = net.training
    net.eval()  # batch norm must not update its statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net_logits(net, x, torch.zeros(1, dtype=torch.long, device=device))
    finally:
        net.train(was_training)
    return float(counter.get_total_flops()) * batch_size


def auto_threads(flops: float, processes: int = 1) -> int:
    """Threads for one of ``processes`` CPU processes whose forward pass over a batch costs ``flops``."""
    if flops < SMALL_BATCH_FLOPS:
        return 1
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = min(cores - 1, max(0, round(load - processes)))  # cores held by other processes
    return max(1, (cores - busy) // max(1, processes))

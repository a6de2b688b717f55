"""Replay buffers: preallocated tensors on the model's device and the selection policies of the literature.

A :class:`Buffer` stores inputs as given (un-augmented; ``uint8`` for images), labels, task ids and, for methods
that need them (DER), logits. Its slots live on the device of the first inserted batch, so insertion and sampling
are indexing operations and never move the data between host and device. They are allocated as they fill, by
doubling, up to ``capacity`` (:attr:`Buffer.rows`): a buffer larger than its stream (``buffer_size=1000000`` on a
dataset of a few thousand samples) holds and checkpoints at most twice what it stores, not ``capacity`` rows, and a
restored buffer grows exactly as the original would have.

Selection policies (who stays when the buffer is full):

- ``reservoir`` -- Vitter's algorithm R (1985): the ``i``-th stream element (0-based) replaces a uniformly chosen
  slot with probability ``capacity / (i + 1)``, so after ``n`` elements every one of them is in the buffer with
  probability ``capacity / n``. Streaming, task-free (Chaudhry et al. 2019; Buzzega et al. 2020).
- ``class_balanced`` -- class-balanced reservoir (Chrysakis & Moens, "Online Continual Learning from Imbalanced
  Data", ICML 2020): while the buffer is full, a sample of a class that is not the largest evicts a random sample
  of the largest class (ties broken at random), so every seen class tends to an equal share; a sample of the
  largest class replaces a random sample of its own class with probability ``m_c / n_c`` (stored / seen of that
  class: a reservoir inside the class). Streaming, task-free.
- ``gdumb`` -- GDumb's greedy class-balancing sampler (Prabhu et al., ECCV 2020, Alg. 1): while the buffer is full,
  a sample whose class holds fewer than ``capacity / (classes seen)`` slots evicts a random sample of the largest
  class (ties broken at random); any other sample is discarded. Streaming, task-free.
- ``herding`` -- iCaRL's exemplar selection (Rebuffi et al., CVPR 2017, Alg. 4): at the end of a task, for each
  class of the task, greedily pick ``p_k = argmin_x || mu - (phi(x) + sum_{j<k} p_j) / k ||`` with ``phi`` the
  L2-normalised features and ``mu`` their class mean. Each class then holds ``capacity // n_classes_seen``
  exemplars; older classes keep the head of their herding order (iCaRL's ReduceExemplarSet).
- ``kcenter`` -- greedy k-center coreset (Gonzalez 1985; the coreset of VCL, Nguyen et al. 2018, and of Sener &
  Savarese 2018): at the end of a task, start from the sample nearest the task's mean feature, then repeatedly add
  the sample farthest from every chosen one. Each task holds ``capacity // n_tasks_seen`` samples, older tasks
  keep the head of their greedy order (a prefix of a greedy k-center sequence is the greedy solution for fewer
  centers).
- ``random`` -- at the end of a task, a uniform random subset of it (GEM's and A-GEM's episodic memories). Its
  quota per task is given by the caller (``buffer_size // n_tasks`` for GEM) or, by default, rebalanced like
  ``kcenter``.

Everything, including the generator's state (as a ``uint8`` tensor), is in :meth:`Buffer.state_dict`; a buffer
restored from it inserts and samples exactly what the original would have.
"""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lightning.core.selection import herding_selection, kcenter_selection

__all__ = [
    "SELECTIONS",
    "STREAMING_SELECTIONS",
    "TASK_END_SELECTIONS",
    "Buffer",
    "BufferSample",
    "herding_selection",
    "kcenter_selection",
]

STREAMING_SELECTIONS = ("reservoir", "class_balanced", "gdumb")
TASK_END_SELECTIONS = ("herding", "kcenter", "random")
SELECTIONS = STREAMING_SELECTIONS + TASK_END_SELECTIONS


class BufferSample(NamedTuple):
    """Samples drawn from a :class:`Buffer`; ``logits`` is ``None`` when the buffer stores none."""

    x: Tensor
    y: Tensor
    task_id: Tensor
    logits: Tensor | None
    slots: Tensor


class Buffer:
    """A fixed-capacity memory of past samples (see the module docstring for the selection policies).

    Streaming policies (``reservoir``, ``class_balanced``) take samples through :meth:`add`, every step; task-end
    policies (``herding``, ``kcenter``, ``random``) through :meth:`add_task`, once per task. Both are O(batch) per
    call apart from ``class_balanced`` evictions (O(capacity) each, on the host) and the task-end selections.

    Args:
        capacity: Number of slots.
        selection: One of :data:`SELECTIONS`.
        seed: Seed of the buffer's own ``torch.Generator`` (reservoir decisions, random subsets, sampling).

    Example:
        >>> buf = Buffer(3, seed=0)
        >>> buf.add(torch.arange(5).view(5, 1), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
        >>> len(buf), buf.n_seen, len(buf.sample(10).x)
        (3, 5, 3)
    """

    def __init__(self, capacity: int, selection: str = "reservoir", seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.capacity, self.selection = capacity, selection
        self.generator = torch.Generator().manual_seed(seed)
        self.n_seen = 0  # stream elements offered to add() (reservoir's i)
        self.size = 0  # filled slots: always the first `size`
        self.n_groups = 0  # task-end policies: groups (class or task) created so far
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.task_id: Tensor | None = None
        self.logits: Tensor | None = None
        self.group: Tensor | None = None  # task-end policies: group of each slot
        self.rank: Tensor | None = None  # task-end policies: position of the slot in its group's priority order
        self.class_seen: list[int] = []  # class_balanced: stream elements seen per label
        self._labels: list[int] | None = None  # class_balanced: host copy of y[:size]
        self._slots: dict[int, list[int]] | None = None  # class_balanced: each label's slots, in slot order

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.size

    @property
    def is_empty(self) -> bool:
        """Whether no sample is stored."""
        return self.size == 0

    @property
    def device(self) -> torch.device | None:
        """Device of the stored tensors (``None`` before the first insertion)."""
        return None if self.x is None else self.x.device

    def to(self, device: torch.device | str) -> Buffer:
        """Move the stored tensors to ``device`` (the generator stays on the host)."""
        for name in ("x", "y", "task_id", "logits", "group", "rank"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    @property
    def rows(self) -> int:
        """Slots allocated so far: ``len(self) <= rows <= capacity``."""
        return 0 if self.x is None else self.x.shape[0]

    @staticmethod
    def _grown(old: Tensor | None, rows: int, like: Tensor, dtype: torch.dtype, fill: float) -> Tensor:
        """``old`` (or nothing) followed by rows of ``fill`` up to ``rows``, shaped like ``like``'s rows."""
        new = torch.full((rows, *like.shape[1:]), fill, dtype=dtype, device=like.device)
        if old is not None:
            new[: old.shape[0]] = old
        return new

    def _allocate(self, x: Tensor, needed: int) -> None:
        """Slots for at least ``needed`` samples (at most ``capacity``) on ``x``'s device, with ``x``'s shape."""
        if self.x is not None and self.x.device != x.device:
            self.to(x.device)
        if self.x is not None and needed <= self.rows:
            return
        # doubling: O(1) amortised copies; never past the capacity
        rows = min(self.capacity, max(needed, 2 * self.rows))
        long = torch.zeros(0, dtype=torch.long, device=x.device)
        self.x = self._grown(self.x, rows, x, x.dtype, 0)
        self.y = self._grown(self.y, rows, long, torch.long, 0)
        self.task_id = self._grown(self.task_id, rows, long, torch.long, -1)
        if self.selection in TASK_END_SELECTIONS:
            self.group = self._grown(self.group, rows, long, torch.long, 0)
            self.rank = self._grown(self.rank, rows, long, torch.long, 0)
        if self.logits is not None:
            self.logits = self._grown(self.logits, rows, self.logits, torch.float32, 0)

    def _allocate_logits(self, logits: Tensor) -> None:
        if self.logits is None:
            # lazily, on the first insertion that carries logits; slots filled earlier hold zeros
            self.logits = torch.zeros((self.rows, *logits.shape[1:]), dtype=torch.float32, device=logits.device)

    @staticmethod
    def _task_ids(task_id: Tensor | int, n: int, device: torch.device) -> Tensor:
        if isinstance(task_id, Tensor) and task_id.dim() > 0:
            return task_id.to(device=device, dtype=torch.long)
        return torch.full((n,), int(task_id), dtype=torch.long, device=device)

    # ------------------------------------------------------------------ streaming insertion
    def add(self, x: Tensor, y: Tensor, task_id: Tensor | int, logits: Tensor | None = None) -> None:
        """Offer a batch of stream elements (``reservoir`` or ``class_balanced`` buffers).

        Args:
            x: Inputs as stored (un-augmented), ``[B, ...]``.
            y: Labels, ``[B]``.
            task_id: Task of each sample, ``[B]`` or one int.
            logits: Optional ``[B, n_outputs]`` to store with the samples (detached by the caller).
        """
        if self.selection not in STREAMING_SELECTIONS:
            raise RuntimeError(f"a {self.selection} buffer is filled at task end with add_task(), not add()")
        b = len(y)
        if b == 0:
            return
        self._allocate(x, min(self.capacity, self.size + b))  # new samples go to slot `size` onwards until full
        tid = self._task_ids(task_id, b, x.device)
        if logits is not None:
            self._allocate_logits(logits)
        if self.selection == "reservoir":
            self._add_reservoir(x, y, tid, logits)
        else:
            self._add_class_balanced(x, y, tid, logits)

    def _add_reservoir(self, x: Tensor, y: Tensor, tid: Tensor, logits: Tensor | None) -> None:
        b, n, cap = len(y), self.n_seen, self.capacity
        free = max(0, min(cap - n, b))
        if free:  # the buffer is not full yet: the first `free` elements go to the next slots
            self._write_range(n, x[:free], y[:free], tid[:free], None if logits is None else logits[:free])
        if free < b:
            # element i (0-based in the stream) draws j uniform in [0, i] and is kept in slot j if j < capacity;
            # plain floats on the host: a batch is a few elements, tensor ops would cost more than the arithmetic
            draws = torch.rand(b - free, generator=self.generator, dtype=torch.float64).tolist()
            last: dict[int, int] = {}
            for k, u in enumerate(draws, start=free):
                j = int(u * (n + k + 1))
                if j < cap:
                    last[j] = k  # a later element overwrites an earlier one in the same slot, as sequentially
            if last:
                self._write_slots(list(last), list(last.values()), x, y, tid, logits)
        self.n_seen = n + b
        self.size = min(cap, self.n_seen)

    def _add_class_balanced(self, x: Tensor, y: Tensor, tid: Tensor, logits: Tensor | None) -> None:
        labels = self._host_labels()
        slots = self._class_slots()
        counts = {c: len(s) for c, s in slots.items() if s}
        writes: dict[int, int] = {}
        # two uniforms for each element that meets a full buffer, drawn in one call (one generator call per batch,
        # not two per element): the first breaks ties between the largest classes or accepts an element of the
        # largest class, the second picks the evicted slot; plain floats on the host, as in _add_reservoir
        late = max(0, len(y) - max(0, self.capacity - self.size))
        draws = iter(torch.rand(2 * late, generator=self.generator, dtype=torch.float64).tolist())
        for k, c in enumerate(y.tolist()):
            if c >= len(self.class_seen):
                self.class_seen.extend([0] * (c + 1 - len(self.class_seen)))
            self.class_seen[c] += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
                labels.append(c)
                slots.setdefault(c, []).append(slot)  # the largest slot so far: the list stays in slot order
            else:
                u, v = next(draws), next(draws)
                largest = max(counts.values())
                if self.selection == "gdumb":  # below its share of the memory, or not kept at all
                    if counts.get(c, 0) >= self.capacity / sum(1 for n in self.class_seen if n > 0):
                        continue
                    victim = self._largest(counts, largest, u)
                elif counts.get(c, 0) < largest:
                    victim = self._largest(counts, largest, u)
                elif u * self.class_seen[c] < counts[c]:  # a reservoir inside the largest class
                    victim = c
                else:
                    continue
                slot = slots[victim].pop(_uniform_index(v, counts[victim]))  # a uniform one of the victim's samples
                counts[victim] -= 1
                labels[slot] = c
                bisect.insort(slots.setdefault(c, []), slot)
            counts[c] = counts.get(c, 0) + 1
            writes[slot] = k
        self.n_seen += len(y)
        if writes:
            self._write_slots(list(writes), list(writes.values()), x, y, tid, logits)

    @staticmethod
    def _largest(counts: dict[int, int], largest: int, u: float) -> int:
        """A uniform one (by the uniform ``u``) of the classes holding ``largest`` slots."""
        tied = sorted(c for c, n in counts.items() if n == largest)
        return tied[_uniform_index(u, len(tied))]

    def _host_labels(self) -> list[int]:
        if self._labels is None:
            self._labels = [] if self.y is None else self.y[: self.size].tolist()
        return self._labels

    def _class_slots(self) -> dict[int, list[int]]:
        """Each stored label's slots in slot order (kept up to date by the insertions, built from the labels once):
        the ``r``-th sample of a class is one lookup instead of a scan of the buffer."""
        if self._slots is None:
            self._slots = {}
            for slot, c in enumerate(self._host_labels()):
                self._slots.setdefault(c, []).append(slot)
        return self._slots

    def _write_range(self, start: int, x: Tensor, y: Tensor, tid: Tensor, logits: Tensor | None) -> None:
        assert self.x is not None and self.y is not None and self.task_id is not None
        end = start + len(y)
        self.x[start:end] = x
        self.y[start:end] = y
        self.task_id[start:end] = tid
        if logits is not None and self.logits is not None:
            self.logits[start:end] = logits

    def _write_slots(
        self, slots: list[int], src: list[int], x: Tensor, y: Tensor, tid: Tensor, logits: Tensor | None
    ) -> None:
        assert self.x is not None and self.y is not None and self.task_id is not None
        dst = torch.tensor(slots, dtype=torch.long, device=self.x.device)
        idx = torch.tensor(src, dtype=torch.long, device=x.device)
        # index_select / index_copy_: an order of magnitude faster than advanced indexing for image rows
        self.x.index_copy_(0, dst, x.index_select(0, idx))
        self.y.index_copy_(0, dst, y.index_select(0, idx))
        self.task_id.index_copy_(0, dst, tid.index_select(0, idx))
        if logits is not None and self.logits is not None:
            self.logits.index_copy_(0, dst, logits.index_select(0, idx).to(self.logits.dtype))

    # ------------------------------------------------------------------ task-end insertion
    def add_task(
        self,
        x: Tensor,
        y: Tensor,
        task_id: int,
        features: Tensor | None = None,
        quota: int | None = None,
        logits: Tensor | None = None,
    ) -> None:
        """Select from one finished task's samples (``herding``, ``kcenter`` or ``random`` buffers).

        ``herding`` makes one group per class of the task, ``kcenter`` and ``random`` one group for the task. Each
        group may keep ``quota`` samples (default ``capacity // n_groups`` after this task); the groups already
        stored are cut to the head of their priority order.

        Args:
            x: The task's inputs as stored, ``[N, ...]`` (on the device the buffer should live on).
            y: Labels, ``[N]``.
            task_id: The task.
            features: ``[N, D]`` feature vectors (``herding`` and ``kcenter``).
            quota: Samples per group; ``None`` rebalances the whole buffer.
            logits: Optional ``[N, n_outputs]`` to store with the chosen samples (X-DER's targets). Stored logits
                of the samples kept move with them; chosen samples without given logits get zeros.
        """
        if self.selection not in TASK_END_SELECTIONS:
            raise RuntimeError(f"a {self.selection} buffer is filled every step with add(), not add_task()")
        if self.selection != "random" and features is None:
            raise ValueError(f"{self.selection} selection needs the samples' features")
        if len(y) == 0:
            return
        self._allocate(x, self.size)
        if logits is not None:
            self._allocate_logits(logits)
        assert self.y is not None and self.task_id is not None and self.group is not None and self.rank is not None
        dev = x.device
        y = y.to(dev)
        members = (
            [torch.nonzero(y == c).view(-1) for c in torch.unique(y)]
            if self.selection == "herding"
            else [torch.arange(len(y), device=dev)]
        )
        n_groups = self.n_groups + len(members)
        per_group = self.capacity // n_groups if quota is None else quota
        if per_group * n_groups > self.capacity:
            raise ValueError(f"{n_groups} groups of {per_group} samples exceed the capacity {self.capacity}")
        keep = torch.nonzero(self.rank[: self.size] < per_group).view(-1)
        parts_x, parts_y, parts_t = [self.x.index_select(0, keep)], [self.y[keep]], [self.task_id[keep]]
        parts_g, parts_r = [self.group[keep]], [self.rank[keep]]
        parts_l = None if self.logits is None else [self.logits.index_select(0, keep)]
        for offset, idx in enumerate(members):
            order = self._priority(idx, features, per_group)
            chosen = idx[order]
            if parts_l is not None:
                parts_l.append(
                    torch.zeros(len(chosen), *parts_l[0].shape[1:], device=dev)
                    if logits is None
                    else logits.index_select(0, chosen).to(device=dev, dtype=torch.float32)
                )
            parts_x.append(x.index_select(0, chosen))
            parts_y.append(y[chosen])
            parts_t.append(torch.full((len(chosen),), task_id, dtype=torch.long, device=dev))
            parts_g.append(torch.full((len(chosen),), self.n_groups + offset, dtype=torch.long, device=dev))
            parts_r.append(torch.arange(len(chosen), device=dev))
        self._allocate(x, sum(len(p) for p in parts_y))
        stored_logits = None if parts_l is None else torch.cat(parts_l)
        self._write_range(0, torch.cat(parts_x), torch.cat(parts_y), torch.cat(parts_t), stored_logits)
        self.size = sum(len(p) for p in parts_y)
        self.group[: self.size] = torch.cat(parts_g)
        self.rank[: self.size] = torch.cat(parts_r)
        self.n_groups = n_groups
        self.n_seen += len(y)

    def _priority(self, idx: Tensor, features: Tensor | None, k: int) -> Tensor:
        """Positions (into ``idx``) of the group's first ``k`` samples in priority order."""
        if self.selection == "random":
            return torch.randperm(len(idx), generator=self.generator)[:k].to(idx.device)
        assert features is not None
        feats = features[idx]
        if self.selection == "herding":
            return herding_selection(F.normalize(feats.float(), dim=1), k)
        return kcenter_selection(feats, k)

    # ------------------------------------------------------------------ reading
    def sample(self, n: int, generator: torch.Generator | None = None) -> BufferSample:
        """``min(n, len(self))`` distinct stored samples in random order (never empty if the buffer is not).

        Args:
            n: Samples wanted (>= 1).
            generator: Host generator for the draw; defaults to the buffer's own (saved in the state).
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        perm = torch.randperm(self.size, generator=generator or self.generator)
        return self.get(perm[: min(n, self.size)])

    def get(self, slots: Tensor) -> BufferSample:
        """The samples in ``slots``."""
        assert self.x is not None and self.y is not None and self.task_id is not None
        idx = slots.to(self.x.device)
        logits = None if self.logits is None else self.logits.index_select(0, idx)
        x, y, tid = self.x.index_select(0, idx), self.y.index_select(0, idx), self.task_id.index_select(0, idx)
        return BufferSample(x, y, tid, logits, idx)

    def slots_of_task(self, task_id: int) -> Tensor:
        """Slots holding samples of ``task_id`` (on the buffer's device)."""
        if self.task_id is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(self.task_id[: self.size] == task_id).view(-1)

    def stored_tasks(self) -> list[int]:
        """Distinct task ids in the buffer, sorted."""
        if self.task_id is None or self.size == 0:
            return []
        return torch.unique(self.task_id[: self.size]).tolist()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors, counters and the generator state (``uint8`` tensor): loadable with ``weights_only=True``."""
        state: dict[str, Any] = {
            "capacity": self.capacity,
            "selection": self.selection,
            "n_seen": self.n_seen,
            "size": self.size,
            "n_groups": self.n_groups,
            "generator": self.generator.get_state(),
            "class_seen": torch.tensor(self.class_seen, dtype=torch.long),
        }
        for name in ("x", "y", "task_id", "logits", "group", "rank"):
            value = getattr(self, name)
            if value is not None:
                state[name] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors stay where they were loaded; call :meth:`to` to move them)."""
        capacity = int(state.get("capacity", self.capacity))
        if capacity != self.capacity:
            raise ValueError(f"the saved buffer has capacity {capacity}, this one {self.capacity}")
        self.n_seen = int(state.get("n_seen", 0))
        self.size = int(state.get("size", 0))
        self.n_groups = int(state.get("n_groups", 0))
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
        self.class_seen = [int(v) for v in state.get("class_seen", torch.zeros(0)).tolist()]
        for name in ("x", "y", "task_id", "logits", "group", "rank"):
            value = state.get(name)
            setattr(self, name, None if value is None else value.clone())
        self._labels = self._slots = None


def _uniform_index(u: float, n: int) -> int:
    """``floor(u * n)`` for a uniform ``u`` in [0, 1): a uniform index in ``range(n)`` (clamped: ``u * n`` can round
    up to ``n`` in floating point)."""
    return min(n - 1, int(u * n))

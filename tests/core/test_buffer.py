"""The replay buffer alone: capacity, the selection policies' statistics and definitions, sampling, state."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from scipy.stats import chisquare

from cl_lightning.core.buffer import Buffer, herding_selection, kcenter_selection


def _stream(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` stream elements whose input and label are their position in the stream."""
    ids = torch.arange(start, start + n)
    return ids.view(-1, 1), ids, torch.zeros(n, dtype=torch.long)


def _feed(buf: Buffer, n: int, batch_sizes: list[int]) -> None:
    pos = 0
    for b in itertools.cycle(batch_sizes):
        if pos >= n:
            break
        b = min(b, n - pos)
        buf.add(*_stream(b, pos))
        pos += b


def test_reservoir_never_exceeds_capacity_and_counts_the_stream() -> None:
    buf = Buffer(10, seed=0)
    assert buf.is_empty and len(buf) == 0
    buf.add(*_stream(4))
    assert len(buf) == 4 and buf.y[:4].tolist() == [0, 1, 2, 3], "filled in order while not full"
    _feed(buf, 100, [7, 1, 30])
    assert len(buf) == 10 and buf.n_seen == 104
    assert len(set(buf.x[:10].view(-1).tolist())) == 10, "a stream element occupies at most one slot"


@pytest.mark.parametrize(
    ("n", "capacity", "runs", "batches"), [(60, 10, 1500, [3, 25, 1, 8]), (12, 4, 2000, [1]), (12, 4, 2000, [5, 2])]
)
def test_reservoir_keeps_every_element_with_probability_capacity_over_n(
    n: int, capacity: int, runs: int, batches: list[int]
) -> None:
    # Vitter's algorithm R: after n elements each one is stored with probability capacity / n. Batches of mixed
    # sizes, some larger than the capacity, exercise the vectorised insertion (several draws hitting one slot).
    kept = torch.zeros(n)
    for run in range(runs):
        buf = Buffer(capacity, seed=run)
        _feed(buf, n, batches)
        kept[buf.y[: len(buf)]] += 1
    assert kept.sum() == runs * capacity
    expected = torch.full((n,), runs * capacity / n)
    result = chisquare(kept.numpy(), expected.numpy())
    assert result.pvalue > 1e-3, f"chi-square {result.statistic:.1f} rejects uniformity (p={result.pvalue:.2g})"
    # the first and the last element of the stream are as likely to stay as any other
    for idx in (0, n - 1):
        assert abs(kept[idx] / runs - capacity / n) < 4 * (capacity / n * (1 - capacity / n) / runs) ** 0.5


def test_sample_is_without_replacement_and_never_empty() -> None:
    buf = Buffer(50, seed=0)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(3)
    buf.add(*_stream(1))
    assert len(buf.sample(10).x) == 1, "fewer stored than asked: every stored sample, never an empty batch"
    _feed(buf, 200, [13])
    s = buf.sample(20)
    assert len(s.slots) == 20 and len(set(s.slots.tolist())) == 20
    assert torch.equal(s.x, buf.x[s.slots]) and torch.equal(s.y, buf.y[s.slots]) and s.logits is None
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(buf.sample(7, g1).slots, buf.sample(7, g2).slots), "an explicit generator drives the draw"


def test_logits_slot_is_allocated_on_first_insert_with_logits() -> None:
    buf = Buffer(8, seed=0)
    buf.add(*_stream(3))
    assert buf.logits is None
    x, y, t = _stream(3, 3)
    z = torch.randn(3, 4)
    buf.add(x, y, t, logits=z)
    assert buf.logits is not None and buf.logits.shape == (buf.rows, 4) and buf.rows >= 6  # a row per slot so far
    assert torch.equal(buf.logits[3:6], z) and torch.equal(buf.logits[:3], torch.zeros(3, 4))
    s = buf.sample(8)
    assert torch.equal(s.logits, buf.logits[s.slots])


def test_uint8_inputs_are_stored_as_given() -> None:
    buf = Buffer(4, seed=0)
    x = torch.randint(0, 255, (6, 1, 3, 3), dtype=torch.uint8)
    buf.add(x, torch.arange(6), 2)
    assert buf.x.dtype == torch.uint8 and buf.x.shape == (4, 1, 3, 3)
    assert bool((buf.task_id[:4] == 2).all())
    for slot in range(4):
        assert torch.equal(buf.x[slot], x[int(buf.y[slot])])


def test_class_balanced_gives_every_seen_class_an_equal_share() -> None:
    buf = Buffer(50, selection="class_balanced", seed=0)
    for c in range(5):  # classes arrive one after the other, as in class-incremental learning
        for _ in range(10):
            buf.add(torch.zeros(10, 1), torch.full((10,), c), c)
        counts = torch.bincount(buf.y[: len(buf)], minlength=5)
        if c == 0:
            assert counts.tolist() == [50, 0, 0, 0, 0]
        if c == 1:
            assert counts.tolist() == [25, 25, 0, 0, 0]
    assert len(buf) == 50 and torch.bincount(buf.y).tolist() == [10] * 5
    assert buf.class_seen == [100] * 5


def test_class_balanced_keeps_a_rare_class_whole() -> None:
    buf = Buffer(40, selection="class_balanced", seed=1)
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    y = y[torch.randperm(len(y), generator=gen)]
    for chunk in y.split(16):
        buf.add(torch.zeros(len(chunk), 1), chunk, 0)
    assert torch.bincount(buf.y, minlength=2).tolist() == [30, 10]


def test_class_balanced_is_uniform_inside_a_class() -> None:
    # one class only: the in-class reservoir keeps each element with probability capacity / n
    n, capacity, runs = 30, 6, 800
    kept = torch.zeros(n)
    for run in range(runs):
        buf = Buffer(capacity, selection="class_balanced", seed=run)
        for start in range(0, n, 5):
            buf.add(torch.arange(start, start + 5).view(-1, 1), torch.zeros(5, dtype=torch.long), 0)
        kept[buf.x[:, 0]] += 1
    assert chisquare(kept.numpy()).pvalue > 1e-3


def test_herding_follows_its_definition_on_hand_made_points() -> None:
    # mean (0, 0). First a, the point nearest the mean; then c, which pulls the running mean back toward (0, 0)
    # from a's side; then b, which cancels a + c exactly; then f, the smallest step off the mean; then e (below)
    # rather than d (above), since the running sum is above the mean after f; d last.
    a, b, c, d, e, f = (0.1, 0.0), (5.0, 0.0), (-5.1, 0.0), (0.0, 8.0), (0.0, -14.0), (0.0, 6.0)
    points = torch.tensor([b, e, a, f, c, d])
    assert torch.allclose(points.mean(0), torch.zeros(2), atol=1e-6)
    order = herding_selection(points, 6).tolist()
    assert order == [2, 4, 0, 3, 1, 5]
    # the running mean after k picks is the closest any remaining point could bring it to the class mean
    chosen = []
    for k, j in enumerate(order, start=1):
        dists = [((points[chosen + [i]].sum(0) / k) ** 2).sum() for i in range(6) if i not in chosen]
        assert ((points[chosen + [j]].sum(0) / k) ** 2).sum() == pytest.approx(min(dists))
        chosen.append(j)


def test_kcenter_picks_the_farthest_point_each_time() -> None:
    # three far clusters: three centers take one point of each cluster
    gen = torch.Generator().manual_seed(0)
    clusters = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (clusters[:, None, :] + 0.1 * torch.randn(3, 5, 2, generator=gen)).reshape(-1, 2)
    picked = kcenter_selection(points, 3)
    assert sorted((picked // 5).tolist()) == [0, 1, 2]
    assert int(picked[0]) == int((points - points.mean(0)).norm(dim=1).argmin()), "starts nearest the mean"
    # greedy k-center is within a factor 2 of the optimal covering radius (brute force on a small set)
    pts = torch.randn(9, 2, generator=gen)

    def radius(idx: list[int]) -> float:
        return float(torch.cdist(pts, pts[idx]).min(1).values.max())

    best = min(radius(list(s)) for s in itertools.combinations(range(9), 3))
    assert radius(kcenter_selection(pts, 3).tolist()) <= 2 * best + 1e-9


@pytest.mark.parametrize("selection", ["herding", "kcenter", "random"])
def test_task_end_selection_rebalances_and_keeps_each_group_head(selection: str) -> None:
    gen = torch.Generator().manual_seed(0)
    buf = Buffer(12, selection=selection, seed=0)
    x0, y0 = torch.randn(40, 3, generator=gen), torch.arange(40) % 2
    buf.add_task(x0, y0, task_id=0, features=x0)
    first, first_rank = buf.x[: len(buf)].clone(), buf.rank[: len(buf)].clone()
    groups = 2 if selection == "herding" else 1
    assert len(buf) == 12 and buf.n_groups == groups
    x1, y1 = torch.randn(40, 3, generator=gen) + 5, torch.arange(40) % 2 + 2
    buf.add_task(x1, y1, task_id=1, features=x1)
    per_group = 12 // (2 * groups)
    assert len(buf) == 2 * groups * per_group
    assert torch.bincount(buf.task_id[: len(buf)]).tolist() == [groups * per_group] * 2
    if selection == "herding":
        assert torch.bincount(buf.y[: len(buf)]).tolist() == [per_group] * 4, "iCaRL: m = K / classes seen"
    # the samples of task 0 that stay are the head of its priority order (iCaRL's ReduceExemplarSet)
    kept = buf.x[: len(buf)][buf.task_id[: len(buf)] == 0]
    assert torch.equal(kept, first[first_rank < per_group])


def test_random_selection_with_a_fixed_quota() -> None:
    buf = Buffer(10, selection="random", seed=0)
    for t in range(3):
        buf.add_task(torch.arange(100).view(-1, 1) + 100 * t, torch.zeros(100, dtype=torch.long), t, quota=3)
    assert len(buf) == 9 and buf.stored_tasks() == [0, 1, 2]
    assert [len(buf.slots_of_task(t)) for t in range(3)] == [3, 3, 3]
    assert bool((buf.x[buf.slots_of_task(2)] >= 200).all())
    with pytest.raises(ValueError, match="exceed the capacity"):
        buf.add_task(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long), 3, quota=3)


def test_policies_refuse_the_wrong_insertion() -> None:
    with pytest.raises(RuntimeError, match="add_task"):
        Buffer(4, selection="herding").add(*_stream(2))
    with pytest.raises(RuntimeError, match="add\\(\\)"):
        Buffer(4).add_task(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="features"):
        Buffer(4, selection="kcenter").add_task(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="capacity"):
        Buffer(0)
    with pytest.raises(ValueError, match="selection"):
        Buffer(4, selection="fifo")


@pytest.mark.parametrize("selection", ["reservoir", "class_balanced", "kcenter"])
def test_state_round_trip_continues_identically(selection: str) -> None:
    gen = torch.Generator().manual_seed(0)

    def step(buf: Buffer, k: int) -> None:
        x = torch.randint(0, 255, (7, 1, 2, 2), dtype=torch.uint8, generator=gen)
        if selection == "kcenter":
            buf.add_task(x, torch.arange(7) % 3, k, features=x.flatten(1).float())
        else:
            buf.add(x, torch.arange(7) % 3, k, logits=torch.randn(7, 3, generator=gen))

    original = Buffer(12, selection=selection, seed=3)
    for k in range(5):
        step(original, k)
    blob = io.BytesIO()
    torch.save(original.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    assert state["generator"].dtype == torch.uint8
    restored = Buffer(12, selection=selection, seed=99)
    restored.load_state_dict(state)
    gen_state = gen.get_state()
    step(original, 5)
    gen.set_state(gen_state)
    step(restored, 5)
    for name in ("x", "y", "task_id", "logits", "group", "rank"):
        a, b = getattr(original, name), getattr(restored, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert original.n_seen == restored.n_seen and original.size == restored.size
    assert torch.equal(original.sample(5).slots, restored.sample(5).slots)
    with pytest.raises(ValueError, match="capacity"):
        Buffer(13, selection=selection).load_state_dict(state)


def test_moves_to_the_device_of_the_inserted_batch() -> None:
    buf = Buffer(4).to("meta")
    buf.add(*_stream(2))
    assert buf.device == torch.device("cpu")


@pytest.mark.parametrize("selection", ["reservoir", "class_balanced", "herding", "random"])
def test_memory_follows_what_the_buffer_holds_not_its_capacity(selection: str) -> None:
    """A buffer larger than its stream allocates rows for what it holds (growing by doubling, so at most twice that),
    not for its capacity: a checkpoint of a 1,000,000-slot buffer that saw 300 samples is a few hundred rows, not a
    million. A full buffer has exactly ``capacity`` rows."""
    big = Buffer(1_000_000, selection=selection, seed=0)
    x = torch.randint(0, 255, (100, 1, 3, 3), dtype=torch.uint8)
    for task in range(3):
        if selection in ("reservoir", "class_balanced"):
            for part in range(0, 100, 16):
                big.add(x[part : part + 16], torch.arange(part, min(part + 16, 100)) % 4, task)
        else:
            big.add_task(x, torch.arange(100) % 4, task, features=x.flatten(1).float())
    assert len(big) == 300
    state = big.state_dict()
    for name in ("x", "y", "task_id", "group", "rank"):
        if name in state:
            assert 300 <= state[name].shape[0] <= 600, (name, state[name].shape)
    full = Buffer(10, selection=selection, seed=0)
    if selection in ("reservoir", "class_balanced"):
        full.add(x[:50], torch.arange(50) % 4, 0)
    else:
        full.add_task(x, torch.arange(100) % 5, 0, features=x.flatten(1).float())  # herding: 5 classes of 2
    assert len(full) == 10 and full.rows == full.x.shape[0] == 10


@pytest.mark.parametrize("selection", ["reservoir", "class_balanced", "kcenter"])
def test_state_round_trip_while_growing_continues_identically(selection: str) -> None:
    # saved while the rows are still growing: the restored buffer grows exactly as the original
    gen = torch.Generator().manual_seed(0)

    def step(buf: Buffer, k: int) -> None:
        x = torch.randint(0, 255, (7, 1, 2, 2), dtype=torch.uint8, generator=gen)
        if selection == "kcenter":
            buf.add_task(x, torch.arange(7) % 3, k, features=x.flatten(1).float())
        else:
            buf.add(x, torch.arange(7) % 3, k, logits=torch.randn(7, 3, generator=gen))

    original = Buffer(1000, selection=selection, seed=3)
    for k in range(3):
        step(original, k)
    blob = io.BytesIO()
    torch.save(original.state_dict(), blob)
    blob.seek(0)
    restored = Buffer(1000, selection=selection, seed=99)
    restored.load_state_dict(torch.load(blob, weights_only=True))
    gen_state = gen.get_state()
    for k in range(3, 8):
        step(original, k)
    gen.set_state(gen_state)
    for k in range(3, 8):
        step(restored, k)
    for name in ("x", "y", "task_id", "logits", "group", "rank"):
        a, b = getattr(original, name), getattr(restored, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert original.size == restored.size == 56 and original.x.shape[0] < 1000


def test_gdumb_sampler_keeps_each_class_to_its_share_and_drops_the_rest() -> None:
    """GDumb's Alg. 1: a sample enters a full memory only while its class is below ``k / classes seen``; it then
    evicts a sample of the largest class. Unlike the class-balanced reservoir, a class at its share keeps its first
    samples: later ones are dropped."""
    buf = Buffer(4, selection="gdumb", seed=0)
    x = torch.arange(6, dtype=torch.float32)[:, None]
    buf.add(x[:4], torch.zeros(4, dtype=torch.long), 0)  # fills the memory with class 0
    buf.add(x[4:], torch.ones(2, dtype=torch.long), 1)  # class 1 below its share 4/2: evicts two of class 0
    assert sorted(buf.y[: len(buf)].tolist()) == [0, 0, 1, 1]
    kept = buf.x[: len(buf)].flatten().tolist()
    for _ in range(20):  # class 0 is at its share: later samples of it are dropped, whatever the draws
        buf.add(torch.full((1, 1), 99.0), torch.zeros(1, dtype=torch.long), 0)
    assert buf.x[: len(buf)].flatten().tolist() == kept
    buf.add(torch.full((1, 1), 7.0), torch.full((1,), 2), 2)  # a new class: share 4/3, it enters
    assert sorted(buf.y[: len(buf)].tolist()) in ([0, 1, 1, 2], [0, 0, 1, 2])

"""The data plan: equal work per rank, every sample once, exact resume, world-size changes."""

import numpy as np
import pytest

from slurmvision.errors import DataError
from slurmvision.shards.plan import BatchSchedule, plan_rank

pytestmark = pytest.mark.unit

COUNTS = [37, 5, 0, 61, 13, 29]  # uneven, with an empty shard
SCHEDULE = BatchSchedule(resolutions=(24, 32, 40), batch_sizes=(9, 7, 5), seed=3)


def consumed(plan, batches=None):
    chosen = plan.batches if batches is None else plan.batches[:batches]
    return np.concatenate([plan.stream[s : s + n] for s, n, _ in chosen]) if chosen else np.zeros(0, np.int64)


def epoch_plans(world, segments=None, epoch=0, window=16):
    segments = segments or [(world, 0)]
    return [
        plan_rank(COUNTS, seed=3, epoch=epoch, segments=segments, rank=r, window=window, schedule=SCHEDULE)
        for r in range(world)
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_batches_and_every_sample_once(world):
    plans = epoch_plans(world)
    assert len({len(p.batches) for p in plans}) == 1
    assert len({tuple((n, r) for _, n, r in p.batches) for p in plans}) == 1  # same sizes and resolutions
    seen = np.concatenate([consumed(p) for p in plans])
    assert len(seen) == len(set(seen.tolist())) == sum(COUNTS) // world * world


def test_epochs_differ_and_plans_are_deterministic():
    a, b = epoch_plans(2, epoch=0), epoch_plans(2, epoch=0)
    assert all((x.stream == y.stream).all() for x, y in zip(a, b))
    assert not (epoch_plans(2, epoch=1)[0].stream == a[0].stream).all()


def test_resume_continues_the_same_sequence():
    full = epoch_plans(2)
    resumed = epoch_plans(2, segments=[(2, 4)])
    for f, r in zip(full, resumed):
        assert r.batches == f.batches[4:]
        assert r.first_batch == 4
        assert (consumed(r) == consumed(f)[sum(n for _, n, _ in f.batches[:4]) :]).all()


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (3, 2)])
def test_world_size_change_loses_and_repeats_nothing(old, new):
    done = 3
    before = np.concatenate([consumed(p, done) for p in epoch_plans(old)])
    after = np.concatenate([consumed(p) for p in epoch_plans(new, segments=[(old, done), (new, 0)])])
    together = np.concatenate([before, after]).tolist()
    assert len(together) == len(set(together))  # nothing twice
    # Everything the old plan would still have read is read (the new split may drop < new samples).
    old_epoch = set(np.concatenate([consumed(p) for p in epoch_plans(old)]).tolist())
    assert len(old_epoch - set(together)) < new
    plans = epoch_plans(new, segments=[(old, done), (new, 0)])
    assert len({len(p.batches) for p in plans}) == 1
    assert plans[0].first_batch == done


def test_multiscale_choice_is_spread_and_seeded():
    choices = [SCHEDULE.choice(0, j) for j in range(300)]
    assert set(choices) == {0, 1, 2}
    assert choices == [SCHEDULE.choice(0, j) for j in range(300)]
    other = BatchSchedule(SCHEDULE.resolutions, SCHEDULE.batch_sizes, seed=4)
    assert choices != [other.choice(0, j) for j in range(300)]


def test_too_few_samples_for_the_ranks():
    with pytest.raises(DataError, match="cannot be split over 8 ranks"):
        plan_rank([3], seed=0, epoch=0, segments=[(8, 0)], rank=0, window=4, schedule=SCHEDULE)

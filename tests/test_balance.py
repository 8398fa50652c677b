"""The epoch's kept samples split over ranks and workers: exact shares, nothing lost or doubled."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infobatch_stream.balance import assign, num_batches, samples_per_rank, split_sizes, within_part


def _read(order, kept, world_size, num_workers, remainder):
    """Positions (shard, kept ordinal) each rank reads, and the empty shards accounted."""
    per_rank, empties = [], []
    for rank in range(world_size):
        got = []
        for worker in range(max(num_workers, 1)):
            for part in assign(order, kept, rank, world_size, worker, num_workers, remainder):
                if part.first == part.stop:
                    empties.append(part.shard)
                got += [(part.shard, k) for k in range(part.first, part.stop)]
        per_rank.append(got)
    return per_rank, empties


@settings(max_examples=300, deadline=None)
@given(
    kept=st.lists(st.integers(0, 7), min_size=1, max_size=9),
    world_size=st.integers(1, 5),
    num_workers=st.integers(0, 3),
    remainder=st.sampled_from(["pad", "drop"]),
    seed=st.integers(0, 99),
)
def test_every_rank_gets_the_same_share(kept, world_size, num_workers, remainder, seed):
    kept = np.asarray(kept)
    order = np.random.default_rng(seed).permutation(len(kept))
    line = [(int(s), k) for s in order for k in range(kept[s])]  # the epoch's kept samples in order
    per_rank, empties = _read(order, kept, world_size, num_workers, remainder)
    n = samples_per_rank(len(line), world_size, remainder)
    assert [len(r) for r in per_rank] == [n] * world_size
    everything = [p for r in per_rank for p in r]
    if remainder == "drop":
        assert sorted(everything) == sorted(line[: world_size * n])  # the tail K mod W is not read
    else:
        assert set(everything) == set(line)  # every kept sample; repeats are the padding only
        assert sum(c - 1 for c in Counter(everything).values()) == world_size * n - len(line) < max(world_size, 1)
    assert sorted(empties) == sorted(np.flatnonzero(kept == 0).tolist())  # each empty shard once


def test_a_rank_reads_a_contiguous_run_of_the_epoch_order():
    kept = np.array([5, 0, 3, 9, 1])
    order = np.array([3, 1, 0, 4, 2])  # kept in order: 9, 0, 5, 1, 3 = 18
    parts = [assign(order, kept, r, 2, 0, 0) for r in range(2)]
    assert [tuple(p) for p in parts[0]] == [(3, 0, 9)]
    assert [tuple(p) for p in parts[1]] == [(1, 0, 0), (0, 0, 5), (4, 0, 1), (2, 0, 3)]  # (1, 0, 0): empty, skipped
    split = assign(order, kept, 0, 3, 0, 0)  # 6 each: the first rank stops inside shard 3
    assert [tuple(p) for p in split] == [(3, 0, 6)]


def test_sizes_and_batches():
    assert split_sizes(10, 3).tolist() == [4, 3, 3]
    assert num_batches(10, 4) == 3 and num_batches(10, 4, drop_last=True) == 2
    assert num_batches(10, 4, num_workers=3) == 3  # 4 | 3 | 3: one batch each
    assert num_batches(10, 2, num_workers=3) == 2 + 2 + 2
    assert samples_per_rank(10, 4) == 3 and samples_per_rank(10, 4, "drop") == 2
    with pytest.raises(ValueError, match="remainder"):
        samples_per_rank(10, 4, "spread")


def test_within_part_counts_kept_ordinals():
    keep = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    assert within_part(keep, (0, 1, 3)).tolist() == [False, False, True, True, False, False]

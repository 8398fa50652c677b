"""Planning in blocks: the same plan whatever the block size, plan bytes that travel in pieces."""

from __future__ import annotations

import numpy as np
import pytest

from infobatch_stream import InfoBatch, planner
from infobatch_stream.planner import EpochPlan
from tests.helpers.data import make_index


@pytest.mark.parametrize("block", [8, 24, 64, 1 << 20])
def test_the_plan_does_not_depend_on_the_block_size(tmp_path, monkeypatch, block):
    _, index = make_index(str(tmp_path), num_shards=7, per_shard=13)  # 91 slots: blocks cut shards
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0, seed=3)
    scores = np.random.default_rng(0).random(91).astype(np.float32)
    scores[::5] = np.nan  # some unseen
    ib.store.scores[:] = scores
    monkeypatch.setattr(planner, "BLOCK", 1 << 20)
    reference = planner.plan_epoch(
        ib.store.scores, index, ib.config, 2, ib.plan, plan_is_shared_by_all=True, writer=True
    )
    bits = ib.plan.read(0, 91)
    monkeypatch.setattr(planner, "BLOCK", block)
    got = planner.plan_epoch(ib.store.scores, index, ib.config, 2, ib.plan, plan_is_shared_by_all=True, writer=True)
    assert got.threshold == reference.threshold
    assert (got.seen, got.well_learned) == (reference.seen, reference.well_learned) == (72, got.well_learned)
    assert np.array_equal(got.kept_per_shard, reference.kept_per_shard)
    assert all(np.array_equal(a, b) for a, b in zip(ib.plan.read(0, 91), bits))
    assert reference.kept_per_shard.sum() == np.count_nonzero(bits[0]) < 91


def test_plan_bytes_written_back_in_pieces():
    rng = np.random.default_rng(1)
    source, target = EpochPlan.create(100), EpochPlan.create(100)
    keep, boosted = rng.random(100) < 0.5, rng.random(100) < 0.5
    source.write(0, keep, boosted)
    data = source.packed(16, 100)  # slots 16..99: 11 keep bytes, then 11 boosted bytes
    for offset in range(0, len(data), 5):  # pieces that straddle the keep/boosted boundary
        target.write_packed(16, 100, offset, data[offset : offset + 5])
    got_keep, got_boosted = target.read(16, 100)
    assert np.array_equal(got_keep, keep[16:]) and np.array_equal(got_boosted, boosted[16:])
    assert not target.read(0, 16)[0].any()  # untouched

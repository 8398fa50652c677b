"""Real torch.distributed process groups (Gloo on 127.0.0.1): ranks exchange scores and agree."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from _data import make_index, slot_loss
from infobatch_stream import META_KEY, InfoBatch
from infobatch_stream.distributed import all_gather_updates

EPOCHS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(ib: InfoBatch, epochs: int) -> list[list[int]]:
    per_epoch = []
    for epoch in range(epochs):
        ib.set_epoch(epoch)
        slots = []
        for sample in wds.DataPipeline(ib.shards(), ib.tarfile_to_samples()):
            meta = sample[META_KEY][None]
            ib.update(meta, slot_loss(meta) + epoch)  # scores move every epoch
            slots.append(int(meta[0, 0]))
        per_epoch.append(slots)
    return per_epoch


def _rank_main(rank: int, world_size: int, port: int, index_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # the chunked variable-size gather: rank r sends r * 3 + 1 updates in chunks of 2
        slots, values = all_gather_updates(np.arange(rank * 3 + 1) + 100 * rank,
                                           np.full(rank * 3 + 1, rank, dtype=np.float32), chunk=2)
        ib = InfoBatch(index_path, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=7)
        trained = _train(ib, EPOCHS)
        ib.set_epoch(EPOCHS - 1)  # no-op plan-wise after training, but it is what a loop would call
        ib.sync_scores()
        np.savez(os.path.join(out, f"rank{rank}.npz"), scores=np.asarray(ib.store.scores), gathered_slots=slots,
                 gathered_values=values, **{f"epoch{e}": np.asarray(s, dtype=np.int64) for e, s in enumerate(trained)},
                 kept=np.asarray([s["kept"] for s in ib.stats()]))
    finally:
        dist.destroy_process_group()


def test_ranks_exchange_scores_and_plan_the_same_epochs(tmp_path):
    _, index = make_index(str(tmp_path / "shards"), num_shards=8, per_shard=20)
    reference = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=7)
    ref_slots = _train(reference, EPOCHS)
    world_size = 2
    mp.spawn(_rank_main, args=(world_size, _free_port(), index.path, str(tmp_path)), nprocs=world_size, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(world_size)]
    expected_slots = np.concatenate([np.arange(r * 3 + 1) + 100 * r for r in range(world_size)])
    for got in ranks:
        assert np.array_equal(got["gathered_slots"], expected_slots)
        assert np.array_equal(got["gathered_values"], np.repeat(np.arange(world_size), [1, 4]).astype(np.float32))
        np.testing.assert_array_equal(got["scores"], np.asarray(reference.store.scores))
        assert got["kept"].tolist() == [s["kept"] for s in reference.stats()]
    for epoch in range(EPOCHS):
        per_rank = [ranks[r][f"epoch{epoch}"] for r in range(world_size)]
        union = np.concatenate(per_rank)
        assert len(np.unique(union)) == len(union), "a slot was trained on two ranks"
        assert sorted(union.tolist()) == sorted(ref_slots[epoch]), f"epoch {epoch}: ranks trained another set"
    assert reference.stats()[1]["pruned"] > 0

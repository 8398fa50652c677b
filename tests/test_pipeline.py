"""The stages and InfoBatch on real shards with real multi-worker DataLoaders."""

from __future__ import annotations

import inspect
import logging
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from infobatch_stream import (
    META_KEY,
    IndexMismatchError,
    InfoBatch,
    MetadataError,
    ShardAssignmentError,
    StaleIndexError,
    build_index,
)
from infobatch_stream.meta import as_meta_array
from infobatch_stream.stages import shard_order
from tests.helpers.data import make_index, slot_loss, train_epochs, write_sized_shards
from tests.helpers.loaders import data_loader, read_stages

EPOCHS = 4


@pytest.fixture(scope="module")
def dataset(shared_shards):
    return shared_shards(8, 40)


def batched_pipeline(ib: InfoBatch) -> wds.DataPipeline:
    return wds.DataPipeline(
        ib.shards(), wds.tarfile_to_samples(), ib.filter(), wds.to_tuple("cls", META_KEY), wds.batched(16)
    )


def train_slots(
    ib: InfoBatch, num_workers: int, epochs: int = EPOCHS, persistent: bool = False, context: str | None = None
) -> list[list[int]]:
    """Run ``epochs`` passes with the fixed per-slot loss; return the slots trained in each."""
    loader = data_loader(batched_pipeline(ib), None, num_workers, context=context, persistent=persistent)
    return train_epochs(ib, loader, epochs)


@pytest.fixture(scope="module")
def reference(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    return train_slots(ib, num_workers=0), ib.stats()


def test_pruning_is_visible_and_exact(reference, dataset):
    slots, stats = reference
    _, index = dataset
    assert stats[0]["pruned"] == 0 and len(slots[0]) == index.num_samples
    for epoch in range(1, EPOCHS):
        s = stats[epoch]
        assert s["seen"] == index.num_samples
        assert 0 < s["pruned"] < s["well_learned"]
        assert s["kept"] == len(slots[epoch]) == s["trained"]
        assert len(set(slots[epoch])) == len(slots[epoch]), "a slot was trained twice in one epoch"


@pytest.mark.parametrize("num_workers", [1, 4])
def test_same_slots_whatever_the_workers(reference, dataset, num_workers):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    slots = train_slots(ib, num_workers=num_workers)
    assert [sorted(s) for s in slots] == [sorted(s) for s in reference[0]]
    assert ib.stats() == reference[1]


@pytest.mark.parametrize("context,persistent", [("fork", True), ("spawn", True), ("spawn", False)])
def test_workers_see_the_training_process_updates(reference, dataset, context, persistent):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    slots = train_slots(ib, num_workers=2, epochs=2, persistent=persistent, context=context)
    assert ib.stats()[1]["pruned"] > 0  # epoch 1's plan depends on epoch 0's updates
    assert [sorted(s) for s in slots] == [sorted(s) for s in reference[0][:2]]


def test_last_epochs_stream_everything(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=0.5, seed=1)
    slots = train_slots(ib, num_workers=0, epochs=4)
    stats = ib.stats()
    assert stats[1]["pruned"] > 0  # epoch 1: 2 > 0.5 * 4 is false -> prunes
    for epoch in (2, 3):  # epoch + 1 > 2: full data, weight 1
        assert stats[epoch]["pruned"] == 0 and len(slots[epoch]) == index.num_samples


@pytest.mark.parametrize("style", ["fluent", "stages"])
def test_filter_after_plain_webdataset(dataset, reference, style):
    urls, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    if style == "fluent":
        pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).compose(ib.filter())
    else:
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), ib.filter())
    for epoch in range(EPOCHS):
        ib.set_epoch(epoch)
        metas = np.stack([sample[META_KEY] for sample in pipeline])
        assert sorted(metas[:, 0].tolist()) == sorted(reference[0][epoch])
        ib.update(metas, slot_loss(metas))


def test_filter_on_any_iterable(dataset):
    urls, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    keys = index.keys(2)
    samples = [{"__url__": urls[2], "__key__": k, "x": i} for i, k in enumerate(keys)]
    out = list(ib.filter()(iter(samples)))
    lo, _ = index.slots(2)
    assert [int(s[META_KEY][0]) for s in out] == list(range(lo, lo + len(keys)))
    assert all(s[META_KEY][1] == 0 and s[META_KEY][2] == 0 for s in out)


def test_metadata_survives_default_collate(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    pipeline = wds.DataPipeline(
        ib.shards(), wds.tarfile_to_samples(), ib.filter(), wds.decode(), wds.to_tuple("cls", META_KEY)
    )
    batch = next(iter(DataLoader(pipeline, batch_size=8, num_workers=0)))
    meta = batch[1]
    assert isinstance(meta, torch.Tensor) and meta.dtype == torch.int64 and meta.shape == (8, 4)
    dict_pipeline = wds.DataPipeline(ib.shards(), wds.tarfile_to_samples(), ib.filter(), wds.decode())
    ib.set_epoch(0)
    batch = next(iter(DataLoader(dict_pipeline, batch_size=4, num_workers=0)))
    assert batch[META_KEY].shape == (4, 4)
    ib.update(batch[META_KEY], torch.ones(4))


def test_unknown_key_and_shard_are_named(dataset, tmp_path):
    urls, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    with pytest.raises(StaleIndexError, match="not in the index.*re-run"):
        list(ib.filter()(iter([{"__url__": urls[0], "__key__": "nope"}])))
    with pytest.raises(IndexMismatchError, match="other.tar"):
        list(ib.filter()(iter([{"__url__": str(tmp_path / "other.tar"), "__key__": "x"}])))
    with pytest.raises(ValueError, match="__url__"):
        list(ib.filter()(iter([{"png": b""}])))


def test_shard_order_changes_every_epoch():
    orders = [shard_order(20, seed=5, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(20)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    assert np.array_equal(orders[2], shard_order(20, seed=5, epoch=2))


def test_empty_shards_are_not_opened(tmp_path):
    _, index = make_index(str(tmp_path), num_shards=30, per_shard=1)
    ib = InfoBatch(index, num_epochs=3, prune_ratio=0.9, delta=1.0, seed=0)
    ib.store.scores[:] = np.linspace(0, 1, 30, dtype=np.float32)  # slots below 0.5 are well-learned
    ib.set_epoch(1)
    listed = [d["url"] for d in ib.shards()]
    kept = np.asarray(ib.control.kept_per_shard)
    assert len(listed) == int((kept > 0).sum()) < 30
    assert sorted(listed) == sorted(index.urls[s] for s in np.flatnonzero(kept))
    got = sorted(int(s[META_KEY][0]) for s in wds.DataPipeline(ib.shards(), wds.tarfile_to_samples(), ib.filter()))
    assert len(got) == ib.stats()[-1]["kept"]


# ---- update() ------------------------------------------------------------------------------


def _batch(ib: InfoBatch, n: int = 6, epoch: int = 0) -> torch.Tensor:
    return torch.tensor([[i, epoch, i % 2, ib.tag] for i in range(n)], dtype=torch.int64)


def test_update_returns_weighted_mean_without_touching_the_loss(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2, prune_ratio=0.5)
    meta = _batch(ib)
    per_sample = (torch.arange(6, dtype=torch.float64) + 1.0).requires_grad_()
    before = per_sample.detach().clone()
    loss = ib.update(meta, per_sample)
    expected = (before * torch.tensor([1.0, 2.0] * 3, dtype=torch.float64)).mean()
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.allclose(per_sample.grad, torch.tensor([1.0, 2.0] * 3, dtype=torch.float64) / 6)
    assert torch.equal(per_sample.detach(), before)
    np.testing.assert_allclose(ib.store.scores[:6], before.numpy().astype(np.float32))


def test_update_rejects_bad_input(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    meta = _batch(ib)
    with pytest.raises(ValueError, match="scalar loss.*reduction='none'"):
        ib.update(meta, torch.tensor(1.0))
    with pytest.raises(ValueError, match="shape \\(6, 2\\)"):
        ib.update(meta, torch.ones(6, 2))
    with pytest.raises(ValueError, match="5 losses for a batch of 6"):
        ib.update(meta, torch.ones(5))
    with pytest.raises(ValueError, match="no metadata"):
        ib.update(None, torch.ones(6))
    with pytest.raises(ValueError, match="expected \\(batch, 4\\)"):
        ib.update(torch.ones(6, dtype=torch.int64), torch.ones(6))
    with pytest.raises(ValueError, match="another index"):
        ib.update(torch.tensor([[10**9, 0, 0, ib.tag]]), torch.ones(1))
    with pytest.raises(ValueError, match="another index"):
        ib.update(torch.tensor([[1, 0, 0, ib.tag + 1]]), torch.ones(1))
    assert np.isnan(ib.store.scores).all(), "a rejected update must not touch the store"


def test_nonfinite_losses_are_counted_not_stored(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        ib.update(_batch(ib, 3), torch.tensor([1.0, float("nan"), float("inf")]))
    assert ib.store.scores[0] == 1.0 and np.isnan(ib.store.scores[1:3]).all()
    assert ib.stats()[0]["nonfinite"] == 2 and ib.stats()[0]["trained"] == 3


def test_ema_decay_averages_losses_and_is_saved(dataset):
    _, index = dataset
    with pytest.raises(ValueError, match="ema_decay"):
        InfoBatch(index, num_epochs=2, ema_decay=1.0)
    ib = InfoBatch(index, num_epochs=2, ema_decay=0.75)
    ib.update(_batch(ib, 2), torch.tensor([4.0, 8.0]))  # unseen: the loss itself
    ib.update(_batch(ib, 3), torch.tensor([0.0, float("nan"), 2.0]))  # NaN leaves the score alone
    np.testing.assert_allclose(ib.store.scores[:3], [0.75 * 4.0, 8.0, 2.0])
    assert ib.state_dict()["config"]["ema_decay"] == 0.75
    plain = InfoBatch(index, num_epochs=2)
    plain.update(_batch(plain, 2), torch.tensor([4.0, 8.0]))
    plain.update(_batch(plain, 2), torch.tensor([0.0, 1.0]))
    np.testing.assert_array_equal(plain.store.scores[:2], [0.0, 1.0])  # the published rule: the last loss


def test_a_separate_score_is_stored_and_the_loss_is_returned(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    loss = torch.tensor([4.0, 8.0], requires_grad=True)
    out = ib.update(_batch(ib, 2), loss, score=torch.tensor([0.5, 2.0]))
    np.testing.assert_array_equal(ib.store.scores[:2], [0.5, 2.0])
    assert out.item() == pytest.approx((4.0 * 1 + 8.0 * 2) / 2)  # _batch boosts odd slots: weight 2 at r=0.5
    with pytest.raises(ValueError, match="one score per sample"):
        ib.update(_batch(ib, 2), loss, score=torch.ones(3))


def test_second_pass_without_set_epoch_warns(dataset, caplog):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=3)
    pipeline = batched_pipeline(ib)
    for _, meta in pipeline:
        ib.update(meta, slot_loss(meta))
    with caplog.at_level(logging.WARNING, logger="infobatch_stream"):
        with pytest.warns(RuntimeWarning, match="read again without set_epoch"):
            for _, meta in pipeline:
                ib.update(meta, slot_loss(meta))
    assert "without ib.set_epoch()" in caplog.text
    assert ib.stats()[0]["repeated_passes"] == 1
    ib.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _, meta in pipeline:
            ib.update(meta, slot_loss(meta))


def test_set_epoch_rejects_going_backwards(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=3)
    ib.set_epoch(2)
    ib.set_epoch(2)
    with pytest.raises(ValueError, match="backwards"):
        ib.set_epoch(1)


def test_store_is_four_bytes_per_sample(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    assert ib.store.nbytes == 4 * index.num_samples


def test_filter_in_the_wrong_place_says_where_it_goes(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    with pytest.raises(ValueError, match="right after tarfile_to_samples"):
        list(ib.filter()(iter([("png-bytes", "cls")])))


def test_epoch_past_the_end_warns(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    with pytest.warns(RuntimeWarning, match="past num_epochs=2"):
        ib.set_epoch(2)


def test_metadata_from_another_index_is_rejected(dataset, tmp_path):
    _, index = dataset
    _, small = make_index(str(tmp_path), num_shards=2, per_shard=5)
    big_ib, small_ib = InfoBatch(index, num_epochs=2), InfoBatch(small, num_epochs=2)
    metas = np.stack([s[META_KEY] for s in wds.DataPipeline(big_ib.shards(), big_ib.tarfile_to_samples())])
    metas = metas[metas[:, 0] < small.num_samples]  # slots in range: only the tag tells them apart
    assert len(metas) == small.num_samples
    with pytest.raises(ValueError, match="another index"):
        small_ib.update(metas, torch.ones(len(metas)))
    assert np.isnan(small_ib.store.scores).all()


def test_a_shard_read_twice_in_an_epoch_gives_the_same_samples(dataset):
    """The plan is frozen at set_epoch: updates in between do not move it."""
    urls, index = dataset
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0, seed=3)
    for meta in (s[META_KEY] for s in wds.DataPipeline(ib.shards(), ib.tarfile_to_samples())):
        ib.update(meta, slot_loss(meta[None]))
    ib.set_epoch(1)
    twice = wds.DataPipeline(wds.SimpleShardList([urls[0], urls[1], urls[0]]), ib.tarfile_to_samples())
    seen = []
    for sample in twice:
        seen.append(int(sample[META_KEY][0]))
        ib.update(sample[META_KEY], torch.rand(1) * 10)  # scores move a lot in between
    first = [s for s in seen if s < index.slots(0)[1]]
    assert first[: len(first) // 2] == first[len(first) // 2 :]
    stats = ib.stats()[1]
    ib.set_epoch(1)  # again, after training in it: the frozen plan and its stats stay
    assert ib.stats()[1]["kept"] == stats["kept"] and ib.stats()[1]["trained"] == stats["trained"]


def test_plan_bits_roundtrip_at_unaligned_shard_bounds():
    from infobatch_stream.planner import EpochPlan

    rng = np.random.default_rng(0)
    plan = EpochPlan.create(101)
    keep, boosted = rng.random(101) < 0.5, rng.random(101) < 0.3
    plan.write(0, keep[:64], boosted[:64])
    plan.write(64, keep[64:], boosted[64:])
    for lo, hi in [(0, 101), (3, 17), (63, 65), (100, 101), (7, 7)]:
        got_keep, got_boosted = plan.read(lo, hi)
        assert np.array_equal(got_keep, keep[lo:hi]) and np.array_equal(got_boosted, boosted[lo:hi])
    assert plan.nbytes == 2 * 13


def test_a_same_named_shard_of_another_split_is_refused(tmp_path):
    _, index = make_index(str(tmp_path / "train"), num_shards=2, per_shard=5)
    val_urls, _ = make_index(str(tmp_path / "val"), num_shards=2, per_shard=3)  # same file names
    ib = InfoBatch(index, num_epochs=2)
    with pytest.raises(IndexMismatchError, match="is another shard"):
        list(wds.DataPipeline(wds.SimpleShardList(val_urls), wds.tarfile_to_samples(), ib.filter()))


@pytest.mark.parametrize("path", ["reader", "filter"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_listed_twice_is_read_once_per_entry(tmp_path, path, num_workers):
    """Upsampling by listing a shard twice: each entry has its own slots, each read once."""
    urls = write_sized_shards(str(tmp_path), [20, 30])
    index = build_index([urls[0], urls[1], urls[0]], str(tmp_path / "index.json"))
    ib = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0, seed=1)
    loader = data_loader(
        wds.DataPipeline(ib.shards(), *read_stages(ib, path), wds.to_tuple(META_KEY)), 4, num_workers, context="fork"
    )
    for epoch, slots in enumerate(train_epochs(ib, loader, 3)):
        planned = np.flatnonzero(ib.plan.read(0, 70)[0]) if epoch == 2 else None
        assert len(slots) == len(set(slots)) == ib.stats()[epoch]["kept"]
        if planned is not None:
            assert sorted(slots) == planned.tolist()
    assert ib.stats()[1]["pruned"] > 0


def test_a_url_rewritten_between_source_and_filter_is_an_error(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    rewritten = wds.DataPipeline(
        ib.shards(), wds.map(lambda d: {**d, "url": "file:" + d["url"]}), wds.tarfile_to_samples(), ib.filter()
    )
    assert len(list(rewritten)) == 320  # "file:" still names the same shard: matched, read once
    with pytest.raises(ShardAssignmentError, match="did not hand it to this worker"):
        extra = wds.DataPipeline(ib.shards(), wds.map(lambda d: d), _twice, wds.tarfile_to_samples(), ib.filter())
        list(extra)


def _twice(src):
    for item in src:  # a stage that repeats every shard: the filter must not keep the repeat
        yield item
        yield {"url": item["url"]}


# ---- metadata that went through a cast --------------------------------------------------------


def _real_batch(ib: InfoBatch, kind: str, size: int = 8):
    """A batch's ``__ib__`` field as a real pipeline hands it over: a torch int64 tensor from the
    DataLoader's default collate, or a numpy int64 array from ``wds.batched``."""
    if kind == "torch":
        pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("cls", META_KEY))
        meta = next(iter(DataLoader(pipeline, batch_size=size, num_workers=0)))[1]
        assert isinstance(meta, torch.Tensor) and meta.dtype == torch.int64
    else:
        pipeline = wds.DataPipeline(
            ib.shards(), ib.tarfile_to_samples(), wds.to_tuple("cls", META_KEY), wds.batched(size)
        )
        meta = next(iter(pipeline))[1]
        assert isinstance(meta, np.ndarray) and meta.dtype == np.int64
    return meta


def _cast(meta, kind: str, dtype: str):
    if kind == "torch":
        return meta.to(getattr(torch, dtype))
    with np.errstate(over="ignore"):  # the tag overflows float16: that is the point
        return meta.astype(dtype)


WIDE = ["float32", "float64", "int32", "int64"]
NARROW = {"torch": ["float16", "bfloat16", "int16", "int8", "uint8"], "numpy": ["float16", "int16", "int8", "uint8"]}


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_metadata_cast_to_a_wide_dtype_is_accepted(dataset, kind):
    """float32/int32 hold the 23-bit index tag and these slots exactly: the scores land on the
    same samples as with the int64 field."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    meta = _real_batch(ib, kind)
    slots = np.asarray(meta)[:, 0]
    assert 0 < ib.tag < 2**23
    for i, dtype in enumerate(WIDE):
        loss = torch.arange(len(slots), dtype=torch.float32) + 10 * i
        ib.update(_cast(meta, kind, dtype), loss)
        np.testing.assert_array_equal(ib.store.scores[slots], loss.numpy())
    assert ib.stats()[0]["trained"] == len(WIDE) * len(slots)
    assert np.isnan(np.delete(np.asarray(ib.store.scores), slots)).all()


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_metadata_cast_to_a_narrow_dtype_is_refused_by_name(dataset, kind):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    meta = _real_batch(ib, kind)
    for dtype in NARROW[kind]:
        with pytest.raises(
            MetadataError,
            match=rf"as (torch\.)?{dtype}, which holds integers exactly only up to "
            r"\d+.*Keep the field int64",
        ):
            ib.update(_cast(meta, kind, dtype), torch.ones(len(meta)))
    assert isinstance(MetadataError("x"), ValueError)
    assert np.isnan(ib.store.scores).all() and ib.stats()[0]["trained"] == 0


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_cast_metadata_of_another_index_or_not_whole_is_still_refused(dataset, tmp_path, kind):
    _, index = dataset
    _, other = make_index(str(tmp_path), num_shards=2, per_shard=5)
    ib, other_ib = InfoBatch(index, num_epochs=2), InfoBatch(other, num_epochs=2)
    meta = _real_batch(other_ib, kind, size=4)  # slots 0-3 exist in both indexes: only the tag differs
    for dtype in WIDE:
        with pytest.raises(MetadataError, match="another index"):
            ib.update(_cast(meta, kind, dtype), torch.ones(4))
    halves = _cast(_real_batch(ib, kind, size=4), kind, "float64") + 0.5
    with pytest.raises(MetadataError, match="float64 holds values that are not whole numbers"):
        ib.update(halves, torch.ones(4))
    assert np.isnan(ib.store.scores).all()


def test_wide_dtypes_are_refused_where_the_slots_outgrow_them():
    """float32 is exact up to 2**24 and int32 up to 2**31 - 1: a larger index's slots would be
    rounded or wrapped (and a rounded slot is still a whole number), so the dtype is refused."""
    meta = torch.tensor([[3, 1, 0, 12345]])
    assert as_meta_array(meta.float(), num_samples=2**24 + 1).tolist() == [[3, 1, 0, 12345]]
    with pytest.raises(MetadataError, match=r"as torch\.float32.*up to 16777216, and this index's slots go up to"):
        as_meta_array(meta.float(), num_samples=2**24 + 2)
    with pytest.raises(MetadataError, match=r"as float32"):
        as_meta_array(meta.numpy().astype(np.float32), num_samples=2**25)
    assert as_meta_array(meta.int(), num_samples=2**31).tolist() == [[3, 1, 0, 12345]]
    with pytest.raises(MetadataError, match=r"as torch\.int32.*up to 2147483647"):
        as_meta_array(meta.int(), num_samples=2**31 + 1)
    assert as_meta_array(meta.double(), num_samples=2**40).tolist() == [[3, 1, 0, 12345]]
    with pytest.raises(MetadataError, match="torch.bool, which does not hold integers"):
        as_meta_array(meta.bool(), num_samples=10)


# ---- warnings point at the caller -------------------------------------------------------------


def _warned_here(record: list, match: str, line: int) -> None:
    hits = [w for w in record if match in str(w.message)]
    assert hits, f"no warning matching {match!r} among {[str(w.message) for w in record]}"
    assert [(w.filename, w.lineno) for w in hits] == [(__file__, line)] * len(hits)


def test_warnings_point_at_the_users_line(dataset, tmp_path):
    """However deep inside the library a warning is raised (update() -> _count() -> _warn_once()),
    it is attributed to the line of the caller's code that called the library."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        ib.update(_batch(ib, 3), torch.tensor([1.0, float("nan"), 2.0]))
        _warned_here(record, "non-finite", line)
        line = inspect.currentframe().f_lineno + 1
        ib.update(_batch(ib, 2, epoch=1), torch.ones(2))
        _warned_here(record, "while epoch 0 is current", line)
        line = inspect.currentframe().f_lineno + 1
        ib.set_epoch(3)
        _warned_here(record, "past num_epochs=2", line)
    ib = InfoBatch(index, num_epochs=3)
    pipeline = batched_pipeline(ib)
    for _, meta in pipeline:
        ib.update(meta, slot_loss(meta))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _, meta in pipeline:
            line = inspect.currentframe().f_lineno + 1
            ib.update(meta, slot_loss(meta))
        _warned_here(record, "read again without set_epoch", line)
    path = str(tmp_path / "state.ibs")
    ib.save(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        InfoBatch(index, num_epochs=3, seed=9).load(path)  # ib.load -> load_state_dict -> _check_resume
        _warned_here(record, "saved with other settings", line)

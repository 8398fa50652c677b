"""update()'s deferred path (what a GPU uses: scores copied to the host without waiting, applied
one call later), run on the CPU by adding "cpu" to the deferred device types, against the eager
path on the same shards; and, where a GPU is present, the same without a single host sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds

from infobatch_stream import META_KEY, InfoBatch, MetadataError, inbox
from tests.helpers.data import slot_loss
from tests.helpers.loaders import data_loader

EPOCHS = 4


@pytest.fixture(scope="module")
def dataset(shared_shards):
    return shared_shards(8, 40)


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(inbox, "DEFERRED_DEVICES", {"cpu", "cuda"})


def _loader(ib: InfoBatch, workers: int = 0):
    pipeline = wds.DataPipeline(
        ib.shards(), wds.tarfile_to_samples(), ib.filter(), wds.to_tuple("cls", META_KEY), wds.batched(16)
    )
    return data_loader(pipeline, None, workers)


def _train(ib: InfoBatch, workers: int = 0, meta_as=lambda m: m, epochs: int = EPOCHS) -> list:
    """Train with the fixed per-slot loss (plus the epoch, so scores move); per epoch: the
    returned losses and the store right after set_epoch."""
    out = []
    loader = _loader(ib, workers)
    for epoch in range(epochs):
        ib.set_epoch(epoch)
        out.append(np.array(ib.store.scores))
        losses = []
        for _, meta in loader:
            loss = slot_loss(meta) + 0.01 * epoch
            losses.append(float(ib.update(meta_as(meta), loss)))
        out.append(losses)
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def eager(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    run = _train(ib)
    return run, ib.stats(), np.array(ib.store.scores), ib.state_dict()


@pytest.mark.parametrize("meta_on", ["host", "device", "list"])
def test_deferred_updates_give_the_eager_store_losses_and_stats(dataset, eager, deferred, meta_on):
    """Host metadata (checked at once) or metadata "on the device" (checked when it lands), one
    tensor or a list of rows: every epoch's plan, every returned loss, the final store and the
    stats equal the eager run's."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    as_ = {"host": lambda m: m.numpy(), "device": lambda m: m, "list": lambda m: list(m)}[meta_on]
    run = _train(ib, meta_as=as_)
    _assert_same(run, eager[0])
    assert ib.stats() == eager[1]  # stats() lands the last batch
    np.testing.assert_array_equal(ib.store.scores, eager[2])


def test_the_store_lags_by_exactly_one_call(dataset, deferred):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    metas = [torch.tensor([[i, 0, 0, ib.tag] for i in range(k, k + 4)]) for k in range(0, 40, 4)]
    for n, meta in enumerate(metas):
        ib.update(meta, torch.ones(4))
        assert int(np.count_nonzero(~np.isnan(ib.store.scores))) == 4 * n  # the batch before this one
    ib.sync_scores()
    assert int(np.count_nonzero(~np.isnan(ib.store.scores))) == 40


@pytest.mark.parametrize("flush", ["set_epoch", "sync_scores", "stats", "state_dict", "save"])
def test_every_flush_point_lands_the_last_batch(dataset, deferred, flush, tmp_path):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    ib.update(torch.tensor([[5, 0, 0, ib.tag], [6, 0, 1, ib.tag]]), torch.tensor([0.25, 0.5]))
    assert np.isnan(ib.store.scores[5])
    if flush == "set_epoch":
        ib.set_epoch(1)
    elif flush == "save":
        ib.save(str(tmp_path / "ck"))
        fresh = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
        fresh.load(str(tmp_path / "ck"))
        assert fresh.store.scores[5] == 0.25 and fresh.store.scores[6] == 0.5
    elif flush == "state_dict":
        state = ib.state_dict()
        assert float(state["scores"][6]) == 0.5
    else:
        getattr(ib, flush)()
    assert ib.store.scores[5] == 0.25 and ib.store.scores[6] == 0.5
    if flush == "stats":
        assert ib.stats()[0]["trained"] == 2


def test_a_checkpoint_mid_epoch_resumes_like_the_eager_one(dataset, eager, deferred):
    """state_dict() taken after the last update() of the run holds that batch's scores too."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    _train(ib)
    state = ib.state_dict()
    np.testing.assert_array_equal(state["scores"].numpy(), eager[3]["scores"].numpy())
    assert state["stats"] == eager[3]["stats"]


def test_metadata_from_the_device_is_checked_when_it_lands(dataset, deferred):
    """A batch of another index is refused at the next call (its metadata is not read on the host
    before), naming the call; the store keeps nothing of it, and the run goes on."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    ib.update(torch.tensor([[1, 0, 0, ib.tag]]), torch.ones(1))
    ib.update(torch.tensor([[2, 0, 0, ib.tag + 1]]), torch.ones(1))  # another index's tag
    with pytest.raises(MetadataError, match="update\\(\\) call 2 .*another index"):
        ib.update(torch.tensor([[3, 0, 0, ib.tag]]), torch.ones(1))
    ib.sync_scores()
    assert ib.store.scores[1] == 1.0 and np.isnan(ib.store.scores[2]) and ib.store.scores[3] == 1.0


def test_a_reused_metadata_buffer_does_not_move_scores(dataset, deferred):
    """A loader that refills one metadata buffer in place: the batch in flight keeps its slots."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    buffer = np.array([[0, 0, 0, ib.tag], [1, 0, 0, ib.tag]])
    ib.update(buffer, torch.tensor([1.0, 2.0]))
    buffer[:, 0] = [7, 8]
    ib.update(buffer, torch.tensor([3.0, 4.0]))
    ib.sync_scores()
    seen = {int(i): float(ib.store.scores[i]) for i in np.flatnonzero(~np.isnan(ib.store.scores))}
    assert seen == {0: 1.0, 1: 2.0, 7: 3.0, 8: 4.0}


def test_a_late_error_is_not_lost_to_a_wrong_call(dataset, deferred):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS)
    ib.update(torch.tensor([[2, 0, 0, ib.tag + 1]]), torch.ones(1))  # bad, seen when it lands
    with pytest.raises(MetadataError, match="call 1") as raised:
        ib.update(torch.tensor([[3, 0, 0, ib.tag]]), torch.ones(2))  # wrong too: 2 losses for 1 sample
    assert "2 losses for a batch of 1" in str(raised.value.__context__)


def test_a_late_error_at_set_epoch_is_raised_there(dataset, deferred):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS)
    ib.update(torch.tensor([[2, 0, 0, ib.tag + 1]]), torch.ones(1))
    with pytest.raises(MetadataError, match="call 1"):
        ib.set_epoch(1)
    ib.set_epoch(1)  # the bad batch is gone; the run goes on
    assert np.isnan(ib.store.scores).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_weights_from_device_metadata_equal_the_eager_ones(dataset, dtype, monkeypatch):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.3)
    meta = torch.tensor([[i, 0, i % 2, ib.tag] for i in range(6)])
    loss = torch.linspace(0.1, 0.9, 6, dtype=dtype)
    eager = ib.update(meta, loss)
    monkeypatch.setattr(inbox, "DEFERRED_DEVICES", {"cpu", "cuda"})
    deferred = ib.update(meta, loss)
    assert deferred.dtype == eager.dtype and torch.equal(deferred, eager)


def test_ragged_metadata_fails_as_on_the_eager_path(dataset, monkeypatch):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS)
    ragged = [torch.tensor([1, 0, 0, ib.tag]), torch.tensor([1, 0, 0])]
    with pytest.raises(Exception) as eager:
        ib.update(ragged, torch.ones(2))
    monkeypatch.setattr(inbox, "DEFERRED_DEVICES", {"cpu", "cuda"})
    with pytest.raises(Exception) as deferred:
        ib.update(ragged, torch.ones(2))
    assert type(deferred.value) is type(eager.value)


def test_what_needs_no_values_is_refused_at_once(dataset, deferred):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS)
    meta = torch.tensor([[i, 0, 0, ib.tag] for i in range(6)])
    with pytest.raises(ValueError, match="scalar loss"):
        ib.update(meta, torch.tensor(1.0))
    with pytest.raises(ValueError, match="5 losses for a batch of 6"):
        ib.update(meta, torch.ones(5))
    with pytest.raises(MetadataError, match="expected \\(batch, 4\\)"):
        ib.update(torch.ones(6, dtype=torch.int64), torch.ones(6))
    with pytest.raises(MetadataError, match="float16"):
        ib.update(meta.half(), torch.ones(6))
    with pytest.raises(ValueError, match="score of shape"):
        ib.update(meta, torch.ones(6), score=torch.ones(3))
    ib.sync_scores()
    assert np.isnan(ib.store.scores).all()


def test_deferred_updates_with_loader_workers(dataset, monkeypatch):
    _, index = dataset
    eager = _train(InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3), workers=2)
    monkeypatch.setattr(inbox, "DEFERRED_DEVICES", {"cpu", "cuda"})
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    _assert_same(_train(ib, workers=2), eager)


# ---- on a GPU: no host synchronisation at all -------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("meta_on", ["pinned", "pageable", "device"])
def test_cuda_steps_never_sync_and_match_the_cpu(dataset, eager, meta_on):
    """torch.cuda.set_sync_debug_mode("error") raises on any host synchronisation (``.item()``,
    ``.cpu()``, blocking copies): none happens in update() over whole epochs; the store equals the
    CPU run's."""
    _, index = dataset
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=3)
    loader = _loader(ib)
    weight = torch.ones(1, device="cuda", requires_grad=True)
    for epoch in range(EPOCHS):
        ib.set_epoch(epoch)
        batches = [(meta, (slot_loss(meta) + 0.01 * epoch)) for _, meta in loader]
        gpu_batches = [
            (m.pin_memory() if meta_on == "pinned" else m.cuda() if meta_on == "device" else m, v.cuda())
            for m, v in batches
        ]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for meta, values in gpu_batches:
                loss = ib.update(meta, values * weight)
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ib.sync_scores()
    np.testing.assert_allclose(ib.store.scores, eager[2], rtol=1e-6)

"""The failure surface: each bad input gets a clear error or a counted skip, never silent damage."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import webdataset as wds

from infobatch_stream import DatasetIndex, InfoBatch, build_index
from infobatch_stream.checkpoint import CheckpointError, load_state, save_state
from infobatch_stream.reader import StaleIndexError
from tests.helpers.data import make_index, slot_loss, train_epochs
from tests.helpers.loaders import meta_loader


@pytest.fixture
def dataset(tmp_path):
    return make_index(str(tmp_path / "shards"), num_shards=4, per_shard=10)


def _trained(ib: InfoBatch, epochs: int = 2) -> InfoBatch:
    train_epochs(ib, meta_loader(ib, 5), epochs)
    return ib


@pytest.mark.parametrize("stage", ["reader", "dataset"])
def test_truncated_and_missing_shards_are_skipped_and_counted_by_the_handler(dataset, stage):
    urls, index = dataset
    with open(urls[0], "r+b") as f:
        f.truncate(os.path.getsize(urls[0]) - 700)
    os.remove(urls[2])
    caught = []

    def handler(exn: Exception) -> bool:
        caught.append(exn)
        return True

    ib = InfoBatch(index, num_epochs=2)
    if stage == "reader":
        got = list(wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(handler=handler)))
    else:
        got = list(ib.dataset(handler=handler))
    assert sorted({s["__url__"] for s in got}) == sorted([urls[1], urls[3]])
    assert sorted(type(e).__name__ for e in caught) == ["FileNotFoundError", "StaleIndexError"]
    assert ib.stats()[0]["shards_failed"] == 2
    with pytest.raises((StaleIndexError, FileNotFoundError), match=r"part-00[02]\.tar"):
        list(ib.dataset())  # the default handler re-raises, naming the shard
    assert "part-000.tar" in str(next(e for e in caught if isinstance(e, StaleIndexError)))


def test_a_checkpoint_of_another_index_is_refused(dataset, tmp_path):
    _, index = dataset
    _, other = make_index(str(tmp_path / "other"), num_shards=2, per_shard=10)
    path = str(tmp_path / "other.ibs")
    InfoBatch(other, num_epochs=2).save(path)
    with pytest.raises(CheckpointError, match="another index.*20 samples.*40 samples"):
        InfoBatch(index, num_epochs=2).load(path)
    with pytest.raises(CheckpointError, match="not an InfoBatch state"):
        InfoBatch(index, num_epochs=2).load_state_dict({"scores": torch.zeros(40)})


def test_damaged_checkpoints_are_refused(dataset, tmp_path):
    _, index = dataset
    path = str(tmp_path / "state.ibs")
    _trained(InfoBatch(index, num_epochs=3)).save(path)
    raw = open(path, "rb").read()
    cut = str(tmp_path / "cut.ibs")
    open(cut, "wb").write(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state(cut)
    flipped = bytearray(raw)
    flipped[-200] ^= 0x08  # a bit of a score (the arrays are the file's tail)
    bad = str(tmp_path / "flipped.ibs")
    open(bad, "wb").write(flipped)
    with pytest.raises(
        CheckpointError, match=r"flipped\.ibs is damaged \(the checksum of array 'scores' does not match"
    ):
        InfoBatch(index, num_epochs=3).load(bad)
    junk = str(tmp_path / "junk.ibs")
    open(junk, "wb").write(b"\x80\x04 pickled bytes")
    with pytest.raises(CheckpointError, match="not an infobatch_stream checkpoint"):
        load_state(junk)
    evil = str(tmp_path / "evil.ibs")
    header = json.dumps({"state": {}, "arrays": {"x": {"dtype": "|O", "shape": [1], "offset": 0}}}).encode()
    open(evil, "wb").write(b"IBSTATE1" + len(header).to_bytes(8, "little") + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="unexpected dtype"):  # object arrays would need pickle
        load_state(evil)


def test_state_dict_loads_with_weights_only_and_resumes_the_plan(dataset):
    _, index = dataset
    ib = _trained(InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0))
    buf = io.BytesIO()
    torch.save(ib.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain values and tensors only: no pickle needed
    again = InfoBatch(index, num_epochs=4, prune_ratio=0.5, delta=1.0)
    again.load_state_dict(state)
    assert again.epoch == ib.epoch and again.stats()[-1]["kept"] == ib.stats()[-1]["kept"]
    np.testing.assert_array_equal(np.asarray(again.store.scores), np.asarray(ib.store.scores))
    assert all(np.array_equal(a, b) for a, b in zip(again.plan.read(0, 40), ib.plan.read(0, 40)))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(dataset, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the write fail as a full disk would."""
    _, index = dataset
    path = str(tmp_path / "state.ibs")
    save_state(path, {"format": "small", "x": np.arange(10)})
    before = open(path, "rb").read()
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np
        from infobatch_stream.checkpoint import save_state
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_state({path!r}, {{"format": "big", "x": np.zeros(100_000)}})
        except OSError as e:
            print("failed:", e.strerror)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "failed: File too large" in done.stdout, done.stderr
    assert open(path, "rb").read() == before  # the previous checkpoint, intact
    assert load_state(path)["format"] == "small"
    assert sorted(os.listdir(tmp_path)) == ["shards", "state.ibs"]  # no temporary file left behind


def _die_in_worker(sample):
    info = torch.utils.data.get_worker_info()
    if info is not None and info.id == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return sample


def test_a_dead_loader_worker_is_an_error_and_the_next_epoch_works(dataset):
    _, index = dataset
    ib = InfoBatch(index, num_epochs=3, prune_ratio=0.5, delta=1.0)
    ib.set_epoch(0)
    dying = meta_loader(ib, 5, wds.map(_die_in_worker), num_workers=2, context="fork", timeout=60)
    with pytest.raises(RuntimeError, match="DataLoader worker.*(killed|exited)"):
        for (meta,) in dying:
            ib.update(meta, slot_loss(meta))
    before = np.array(ib.store.scores)
    assert not np.isinf(before).any()  # only whole batches were recorded
    loader = meta_loader(ib, 5, num_workers=2, context="fork")
    ib.set_epoch(1)
    trained = [s for (meta,) in loader for s in (ib.update(meta, slot_loss(meta)), meta[:, 0].tolist())[1]]
    assert len(trained) == ib.stats()[1]["kept"]


def test_an_index_of_pipe_urls_runs_only_when_allowed(tmp_path):
    urls, _ = make_index(str(tmp_path / "shards"), num_shards=2, per_shard=5)
    path = str(tmp_path / "pipes.json")
    build_index([f"pipe:cat {u}" for u in urls], path)
    with pytest.raises(PermissionError, match="shell commands.*allow_pipes=True"):
        DatasetIndex.load(path)
    with pytest.raises(PermissionError, match="allow_pipes"):
        InfoBatch(path, num_epochs=2)
    ib = InfoBatch(path, num_epochs=2, allow_pipes=True)
    assert len(list(ib.dataset())) == 10

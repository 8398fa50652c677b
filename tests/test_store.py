"""Shared-memory segments: visible across processes, removed when their owner is gone."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np

from infobatch_stream.shm import SharedArray, remove_stale
from infobatch_stream.store import ScoreStore

_OWNER = """
import sys, time
from infobatch_stream.shm import SharedArray
a = SharedArray.create(8, "float32", fill=2.0)
print(a.path, flush=True)
time.sleep(120)
"""


def test_store_starts_unseen_and_pickles_as_a_path():
    store = ScoreStore.create(1000)
    assert np.isnan(store.scores).all() and store.nbytes == 4000
    blob = pickle.dumps(store)
    assert len(blob) < 500
    other = pickle.loads(blob)
    store.record(np.array([3, 7]), np.array([0.5, 1.5]))
    assert other.scores[3] == 0.5 and other.scores[7] == 1.5 and other.num_seen() == 2


def test_a_live_owner_keeps_its_segment_and_a_killed_one_loses_it():
    proc = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        path = proc.stdout.readline().strip()
        attached = SharedArray(path, 8, "float32")
        assert (attached.array == 2.0).all()
        remove_stale()
        assert os.path.exists(path), "a live owner's segment was removed"
    finally:
        proc.kill()
        proc.wait()
    assert remove_stale() >= 1
    assert not os.path.exists(path)


def test_the_owner_removes_its_segment_when_collected():
    shared = SharedArray.create(4, "int64")
    path = shared.path
    del shared
    import gc

    gc.collect()
    assert not os.path.exists(path)


def test_a_store_larger_than_shared_memory_is_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from infobatch_stream import shm

    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setattr(shm, "shm_dir", lambda: str(tmp_path))
        with pytest.raises(OSError, match="cannot reserve 4.0 MiB.*shm-size"):
            SharedArray.create(1 << 20, "float32", fill=np.nan)
        assert os.listdir(tmp_path) == []
    finally:
        subprocess.run(["umount", str(tmp_path)], check=False)

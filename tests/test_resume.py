"""Exact resume after SIGKILL: the trained slot sequence and the final store equal an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import _resume_child as child
from _data import make_index

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_resume_child.py")
EVERY = 5
KILLS = 2


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    _, index = make_index(str(tmp_path_factory.mktemp("resume")), num_shards=5, per_shard=17)
    return index.path


@pytest.mark.parametrize("kind", ["sdl0", "sdl2", "nodes", "nodes-threads"])
def test_sigkill_and_resume_is_exact(index, tmp_path, kind):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference_scores = child.train(index, str(reference_dir), kind, EVERY)  # uninterrupted, in this process
    reference = np.fromfile(reference_dir / "slots.bin", dtype=np.int64)
    steps = -(-len(reference) // child.BATCH)
    rng = np.random.default_rng(sum(kind.encode()))  # stable across runs
    work = tmp_path / "killed"
    work.mkdir()
    last, kills = 0, 0
    while True:  # kill at a random step past the last checkpoint, until a run finishes
        die_at = int(rng.integers(last + 1, last + 2 * EVERY)) if kills < KILLS else None
        cmd = [sys.executable, CHILD, index, str(work), kind, "--every", str(EVERY)]
        if die_at is not None:
            cmd += ["--die-at", str(die_at)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if die_at is not None and die_at <= steps:
            assert done.returncode == -9, done.stderr[-3000:]
            kills += 1
            last = die_at // EVERY * EVERY
            continue
        assert done.returncode == 0, done.stderr[-3000:]
        break
    assert kills == KILLS
    got = np.fromfile(work / "slots.bin", dtype=np.int64)
    assert got.tolist() == reference.tolist(), "the resumed run trained another sequence of slots"
    np.testing.assert_array_equal(np.load(work / "final.npy"), reference_scores)

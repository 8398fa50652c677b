"""Exact resume after SIGKILL: the trained slot sequence and the final store equal an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from infobatch_stream import InfoBatch, SettingsMismatchError
from infobatch_stream import resume as resume_module
from infobatch_stream.infobatch import MID_EPOCH_SETTINGS
from tests.helpers import resume_child as child
from tests.helpers.data import make_index, slot_loss
from tests.helpers.loaders import meta_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child runs as tests.helpers.resume_child
EVERY = 5
KILLS = 2


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> str:
    _, index = make_index(str(tmp_path_factory.mktemp("resume")), num_shards=5, per_shard=17)
    return index.path


@pytest.mark.parametrize("kind", ["sdl0", "sdl2", "nodes", "nodes-threads"])
def test_sigkill_and_resume_is_exact(index_path, tmp_path, kind):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference_scores = child.train(index_path, str(reference_dir), kind, EVERY)  # uninterrupted, in this process
    reference = np.fromfile(reference_dir / "slots.bin", dtype=np.int64)
    steps = -(-len(reference) // child.BATCH)
    rng = np.random.default_rng(sum(kind.encode()))  # stable across runs
    work = tmp_path / "killed"
    work.mkdir()
    last, kills = 0, 0
    while True:  # kill at a random step past the last checkpoint, until a run finishes
        die_at = int(rng.integers(last + 1, last + 2 * EVERY)) if kills < KILLS else None
        cmd = [sys.executable, "-m", child.__name__, index_path, str(work), kind, "--every", str(EVERY)]
        if die_at is not None:
            cmd += ["--die-at", str(die_at)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
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


# ---- resuming with other settings ----------------------------------------------------------------

SETTINGS = dict(num_epochs=3, prune_ratio=0.5, delta=1.0, seed=5)


def _loader(ib):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return meta_loader(ib, 4, shuffle=7, loader_class=StatefulDataLoader)


def _run(ib, batches, steps: int | None = None) -> list[int]:
    """Train ``steps`` of ``batches`` (all when None) with the fixed per-slot loss; the slots."""
    slots: list[int] = []
    for step, (meta,) in enumerate(batches):
        ib.update(meta, slot_loss(meta))
        slots += meta[:, 0].tolist()
        if steps is not None and step + 1 == steps:
            break
    return slots


@pytest.fixture(scope="module")
def saved(index_path):
    """States of one run: at the start of epoch 1, partway through it, and after all of it."""
    ib = InfoBatch(index_path, **SETTINGS)
    loader = _loader(ib)
    _run(ib, loader)
    ib.set_epoch(1)
    boundary = {"ib": ib.state_dict(), "loader": loader.state_dict()}
    batches = iter(loader)
    first = _run(ib, batches, steps=3)
    partway = {"ib": ib.state_dict(), "loader": loader.state_dict()}
    rest = _run(ib, batches)
    finished = {"ib": ib.state_dict(), "loader": loader.state_dict()}
    assert ib.stats()[1]["trained"] == ib.stats()[1]["kept"] == len(first + rest)
    return {"boundary": boundary, "partway": partway, "finished": finished, "epoch1": first + rest}


@pytest.mark.parametrize(
    "change",
    [{"seed": 6}, {"remainder": "drop"}, {"prune_ratio": 0.6}, {"seed": 6, "prune_ratio": 0.6, "num_epochs": 4}],
)
def test_mid_epoch_resume_with_other_settings_is_refused(index_path, saved, change):
    ib = InfoBatch(index_path, **{**SETTINGS, **change})
    refused = {k: v for k, v in change.items() if k in MID_EPOCH_SETTINGS}
    with pytest.raises(SettingsMismatchError) as caught:
        ib.load_state_dict(saved["partway"]["ib"])
    message = str(caught.value)
    assert "saved partway through epoch 1 (had trained 12 of its" in message
    for key, value in refused.items():
        assert f"{key}: saved {SETTINGS.get(key, 'pad')!r}, now {value!r}" in message
    assert "num_epochs" not in message  # it only shapes later epochs: not a reason to refuse
    assert "Resume with the saved settings (InfoBatch(..., " in message and "at an epoch boundary" in message
    assert ib.epoch == 0 and np.isnan(ib.store.scores).all(), "a refused state must not be half restored"


def test_mid_epoch_resume_with_the_saved_settings_or_a_later_epoch_count_is_exact(index_path, saved):
    """Changing num_epochs partway is allowed (with a warning): the epoch keeps its saved plan
    and the rest of it reads exactly what the uninterrupted run read."""
    for extra, warns in (({}, False), ({"num_epochs": 5}, True)):
        ib = InfoBatch(index_path, **{**SETTINGS, **extra})
        loader = _loader(ib)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ib.load_state_dict(saved["partway"]["ib"])
        said = [str(w.message) for w in record if "other settings" in str(w.message)]
        assert len(said) == int(warns)
        if warns:
            assert "the rest of epoch 1 keeps its saved plan" in said[0] and "num_epochs: saved 3, now 5" in said[0]
        loader.load_state_dict(saved["partway"]["loader"])
        ib.set_epoch(1)
        assert saved["epoch1"][:12] + _run(ib, loader) == saved["epoch1"]


def test_the_refused_settings_would_train_samples_twice(index_path, saved, monkeypatch):
    """Why a new seed is refused partway: let it through, and the rest of the epoch reads
    positions of another shard order, so some samples come twice and others never."""
    monkeypatch.setattr(resume_module, "MID_EPOCH_SETTINGS", ())
    ib = InfoBatch(index_path, **{**SETTINGS, "seed": 6})
    loader = _loader(ib)
    with pytest.warns(RuntimeWarning, match="other settings"):
        ib.load_state_dict(saved["partway"]["ib"])
    loader.load_state_dict(saved["partway"]["loader"])
    ib.set_epoch(1)
    epoch1 = saved["epoch1"][:12] + _run(ib, loader)
    assert len(epoch1) == len(saved["epoch1"])
    assert len(set(epoch1)) < len(epoch1) and set(epoch1) != set(saved["epoch1"])


@pytest.mark.parametrize("when", ["boundary", "finished"])
def test_other_settings_at_an_epoch_boundary_are_taken_with_a_warning(index_path, saved, when):
    """Nothing of the saved epoch trained yet, or all of this rank's share: a new seed is safe."""
    ib = InfoBatch(index_path, **{**SETTINGS, "seed": 6, "num_epochs": 4})
    with pytest.warns(
        RuntimeWarning,
        match=r"keeping this InfoBatch's \(the next epoch planned uses them\): "
        r"num_epochs: saved 3, now 4; seed: saved 5, now 6",
    ):
        ib.load_state_dict(saved[when]["ib"])
    assert ib.epoch == 1 and not np.isnan(ib.store.scores).all()
    loader = _loader(ib)
    loader.load_state_dict(saved[when]["loader"])
    ib.set_epoch(1)
    slots = _run(ib, loader)
    if when == "finished":
        assert slots == []  # the saved loader had read its whole share
    else:  # re-planned with the new seed: every kept sample once
        assert len(slots) == len(set(slots)) == ib.stats()[1]["kept"]

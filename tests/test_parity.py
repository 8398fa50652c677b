"""Parity with the published InfoBatch rules (issue 6, point 4).

``PublishedInfoBatch`` below is a small map-style reference written from the paper's description,
independently of this library. The real library (tar shards, index, shared store, planner,
skip-aware reader, ``update``) is driven with a deterministic loss sequence, and the two are
compared epoch by epoch in two ways:

- **lockstep**: a shadow reference receives exactly the losses the library's run trained, so both
  hold the same scores every epoch. Threshold, well-learned set and score updates must then agree
  exactly; pruned counts differ only by the binomial noise of the library's per-sample coins
  (the paper prunes each well-learned sample with probability ``r``, its code draws an exact
  count: the shadow does the latter), and every weight must be the published ``1/(1-r)``;
- **free running**: the reference runs on its own with its own random subsets (per-sample coins),
  many times; the library's per-epoch figures must lie within that ensemble's spread.

The paper starts every score at one default value and prunes below the mean of *all* scores; the
library leaves never-seen samples unscored and never prunes them. The two coincide once every
sample has a score: epoch 0 trains everything on both sides (equal default scores have nothing
strictly below their mean), so exact comparisons start at epoch 1 and epoch 0 is only checked to
prune nothing on both sides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch
import webdataset as wds

from infobatch_stream import META_KEY, InfoBatch, build_index
from tests.helpers.data import write_sized_shards

SHARD_SIZES = [600, 350, 500, 450, 700, 400, 550, 450]  # 4,000 samples, uneven shards
NUM_SAMPLES = sum(SHARD_SIZES)
SIGMAS = 5.0  # tolerance in standard deviations: a false alarm with probability ~6e-7 per check
ENSEMBLE = 64  # free-running reference runs per case
LOSS_SEED = 11

# (prune_ratio, delta, num_epochs): delta * num_epochs = 7 (the boundary is an integer), 5.2, 4.8;
# 0.95 exceeds the published cap of 0.9.
CASES = [
    pytest.param((0.5, 0.875, 8), id="r0.5-delta0.875"),
    pytest.param((0.3, 0.65, 8), id="r0.3-delta0.65"),
    pytest.param((0.95, 0.8, 6), id="r0.95-capped-delta0.8"),
]


# ---- the published rules -------------------------------------------------------------------------


def published_ratio(prune_ratio: float) -> float:
    """The paper's code keeps at least 10% of the well-learned samples: r is capped at 0.9."""
    return min(prune_ratio, 0.9)


@dataclass
class Plan:
    """One epoch of the reference: what it compared, pruned and weighted."""

    threshold: float
    well_learned: np.ndarray  # bool per sample
    keep: np.ndarray  # bool per sample
    weights: np.ndarray  # float64 per sample: 1/(1-r) if kept and well-learned in a pruning epoch, else 1

    @property
    def pruned(self) -> int:
        return int(np.count_nonzero(~self.keep))


class PublishedInfoBatch:
    """InfoBatch as the paper describes it, over ``n`` indexable samples.

    Each epoch: threshold = mean of all scores; well-learned = score strictly below it; each
    well-learned sample is pruned with probability ``r`` (the paper's soft pruning), or, with
    ``exact_count``, exactly ``n_wl - floor((1-r) * n_wl)`` of them are, drawn without replacement
    (what the paper's code does); kept well-learned samples are weighted ``1/(1-r)``, all others 1.
    Epochs ``e`` with ``e + 1 > delta * num_epochs`` (0-based) train on everything with weight 1.
    Only trained samples get a new score; pruned ones keep their old one.
    """

    def __init__(
        self, n: int, num_epochs: int, prune_ratio: float, delta: float, seed: int = 0, exact_count: bool = True
    ) -> None:
        self.scores = np.ones(n, dtype=np.float32)  # the paper's default score, equal for all
        self.num_epochs, self.delta, self.exact_count = num_epochs, delta, exact_count
        self.ratio = published_ratio(prune_ratio)
        self.rng = np.random.default_rng(seed)

    def prunes(self, epoch: int) -> bool:
        return epoch + 1 <= self.delta * self.num_epochs

    def plan(self, epoch: int) -> Plan:
        thresh = float(np.mean(self.scores, dtype=np.float64))
        learned = self.scores < thresh
        keep = np.ones(len(self.scores), dtype=bool)
        if self.prunes(epoch):
            candidates = np.flatnonzero(learned)
            if self.exact_count:
                dropped = self.rng.permutation(candidates)[int((1.0 - self.ratio) * len(candidates)) :]
            else:
                dropped = candidates[self.rng.random(len(candidates)) < self.ratio]
            keep[dropped] = False
        boosted = learned & keep & self.prunes(epoch)
        return Plan(thresh, learned, keep, np.where(boosted, 1.0 / (1.0 - self.ratio), 1.0))

    def update(self, slots: np.ndarray, losses: np.ndarray) -> None:
        self.scores[slots] = losses


# ---- the loss sequence both sides see ----------------------------------------------------------


class LossModel:
    """Per-sample loss = difficulty x 0.8^(times trained) x noise(slot, epoch).

    Difficulty is lognormal (about 60% of the samples fall below the mean loss); training decays
    a sample's loss, so pruned samples keep a higher loss than trained ones and the scores evolve
    with the pruning history, as in real training. The noise comes from a generator keyed by the
    epoch and indexed by slot, so any side training the same slot in the same epoch with the same
    history sees the same loss.
    """

    DECAY = 0.8

    def __init__(self, n: int) -> None:
        self.difficulty = np.random.default_rng(LOSS_SEED).lognormal(0.0, 0.6, n)
        self.times_trained = np.zeros(n, dtype=np.int64)

    def __call__(self, slots: np.ndarray, epoch: int) -> np.ndarray:
        noise = epoch_noise(epoch, len(self.difficulty))[slots]
        loss = self.difficulty[slots] * self.DECAY ** self.times_trained[slots] * noise
        self.times_trained[slots] += 1
        return loss.astype(np.float32)


@cache
def epoch_noise(epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([LOSS_SEED, epoch]).lognormal(0.0, 0.15, n)


# ---- running both sides ------------------------------------------------------------------------


@dataclass
class EpochRun:
    """What the library did in one epoch, next to the shadow reference's plan on the same scores."""

    stats: dict  # ib.stats() of the epoch: planned figures and what update() counted
    shadow: Plan
    slots: np.ndarray  # trained, in reading order
    boosted: np.ndarray  # the library's boosted flag of each trained sample
    expected_means: list[float]  # per batch: mean(loss x the published weight)
    returned_means: list[float]  # per batch: what ib.update returned
    store_mismatches: int  # slots whose library score differs from the shadow's after the epoch


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("parity"))
    urls = write_sized_shards(folder, SHARD_SIZES)
    return build_index(urls, os.path.join(folder, "index.json"))


def run_library(index, prune_ratio: float, delta: float, num_epochs: int, seed: int = 0) -> list[EpochRun]:
    """Train ``num_epochs`` through ``ib.shards()`` + ``ib.tarfile_to_samples()`` with the shared
    loss sequence, a shadow reference receiving the same losses for the same samples."""
    ib = InfoBatch(index, num_epochs=num_epochs, prune_ratio=prune_ratio, delta=delta, seed=seed)
    shadow = PublishedInfoBatch(NUM_SAMPLES, num_epochs, prune_ratio, delta, seed=seed)
    losses = LossModel(NUM_SAMPLES)
    pipeline = wds.DataPipeline(ib.shards(), ib.tarfile_to_samples(), wds.to_tuple(META_KEY), wds.batched(256))
    runs = []
    for epoch in range(num_epochs):
        ib.set_epoch(epoch)
        plan = shadow.plan(epoch)
        boost = np.where(plan.well_learned & shadow.prunes(epoch), 1.0 / (1.0 - shadow.ratio), 1.0)
        slots, boosted, expected, returned = [], [], [], []
        for (meta,) in pipeline:
            meta = torch.as_tensor(meta)
            batch = meta[:, 0].numpy()
            loss = losses(batch, epoch)
            expected.append(float(np.mean(loss.astype(np.float64) * boost[batch])))
            returned.append(float(ib.update(meta, torch.from_numpy(loss))))
            shadow.update(batch, loss)
            slots.append(batch)
            boosted.append(meta[:, 2].numpy().astype(bool))
        mismatches = int(np.count_nonzero(np.asarray(ib.store.scores) != shadow.scores))
        runs.append(
            EpochRun(
                ib.stats()[epoch], plan, np.concatenate(slots), np.concatenate(boosted), expected, returned, mismatches
            )
        )
    return runs


@pytest.fixture(scope="module", params=CASES)
def case(request, index):
    prune_ratio, delta, num_epochs = request.param
    return request.param, run_library(index, prune_ratio, delta, num_epochs)


def binomial_sd(n: int, r: float) -> float:
    return math.sqrt(n * r * (1.0 - r))


def pruning_epochs(delta: float, num_epochs: int) -> list[int]:
    """The epochs that prune, from epoch 1 on (when every sample has a score)."""
    return [e for e in range(1, num_epochs) if e + 1 <= delta * num_epochs]


# ---- lockstep: same scores on both sides -------------------------------------------------------


def test_epoch_zero_prunes_nothing_on_either_side(case):
    _, runs = case
    first = runs[0]
    assert first.stats["seen"] == 0 and first.stats["threshold"] is None
    assert not first.shadow.well_learned.any() and first.shadow.pruned == 0
    assert first.stats["pruned"] == 0 and len(first.slots) == NUM_SAMPLES


def test_threshold_and_well_learned_match_the_reference(case):
    """With the same scores, the threshold is the same mean and the well-learned set the same set."""
    _, runs = case
    for epoch, run in enumerate(runs[1:], start=1):
        assert run.stats["seen"] == NUM_SAMPLES
        assert run.stats["threshold"] == pytest.approx(run.shadow.threshold, rel=1e-12, abs=0), epoch
        assert run.stats["well_learned"] == int(run.shadow.well_learned.sum()), epoch


def test_only_trained_samples_change_score(case):
    """The shadow applies the paper's update rule to the library's trained samples; the library's
    store must hold the very same scores after every epoch (pruned samples keep their old score)."""
    _, runs = case
    assert [run.store_mismatches for run in runs] == [0] * len(runs)


def test_pruned_counts_agree_within_binomial_noise(case):
    """The library flips one coin per well-learned sample; the paper draws an exact count. Per
    epoch the two counts differ by the library's binomial noise; summed over the pruning epochs
    the deviation must stay within the noise too, which catches any systematic bias in r."""
    (prune_ratio, delta, num_epochs), runs = case
    r = published_ratio(prune_ratio)
    deviation, variance = 0.0, 0.0
    for epoch in pruning_epochs(delta, num_epochs):
        run = runs[epoch]
        n = int(run.shadow.well_learned.sum())
        sd = binomial_sd(n, r)
        assert abs(run.stats["pruned"] - run.shadow.pruned) <= SIGMAS * sd + 1, (epoch, run.stats, run.shadow.pruned)
        deviation += run.stats["pruned"] - r * n
        variance += sd**2
    assert abs(deviation) <= SIGMAS * math.sqrt(variance)


def test_only_well_learned_samples_are_pruned(case):
    """Every slot is trained at most once, ``kept`` is exact, and every slot left out is one the
    reference calls well-learned (unlearned samples are always trained)."""
    _, runs = case
    for epoch, run in enumerate(runs):
        assert len(np.unique(run.slots)) == len(run.slots) == run.stats["kept"] == run.stats["trained"], epoch
        left_out = np.setdiff1d(np.arange(NUM_SAMPLES), run.slots)
        assert run.shadow.well_learned[left_out].all(), epoch


def test_weights_are_the_published_ones(case):
    """A kept sample is boosted exactly when the reference calls it well-learned in a pruning
    epoch, and ``update`` returns the mean of the loss times the published weight ``1/(1-r)``."""
    (prune_ratio, delta, num_epochs), runs = case
    for epoch, run in enumerate(runs):
        expected_boost = run.shadow.well_learned[run.slots] & (epoch + 1 <= delta * num_epochs)
        np.testing.assert_array_equal(run.boosted, expected_boost)
        np.testing.assert_allclose(run.returned_means, run.expected_means, rtol=1e-5)


def test_rescaling_is_unbiased(case):
    """Sum of the weights over the kept samples estimates the number of samples: up to one
    boosted weight for the reference's exact count, within the binomial noise ``sqrt(n r/(1-r))``
    of the library's coins."""
    (prune_ratio, delta, num_epochs), runs = case
    r = published_ratio(prune_ratio)
    for epoch in pruning_epochs(delta, num_epochs):
        run = runs[epoch]
        n = int(run.shadow.well_learned.sum())
        reference_total = run.shadow.weights[run.shadow.keep].sum()
        assert NUM_SAMPLES - 1 / (1 - r) < reference_total <= NUM_SAMPLES + 1e-9
        library_total = np.where(run.boosted, 1.0 / (1.0 - r), 1.0).sum()
        assert abs(library_total - NUM_SAMPLES) <= SIGMAS * math.sqrt(n * r / (1 - r)), (epoch, library_total)


def test_final_epochs_train_everything_with_weight_one(case):
    """Epochs with ``e + 1 > delta * num_epochs`` read every sample once, none boosted; the
    epoch before them still prunes (the boundary is the same on both sides)."""
    (_, delta, num_epochs), runs = case
    final = [e for e in range(num_epochs) if e + 1 > delta * num_epochs]
    assert final, "every case must reach the annealing phase"
    assert all(runs[e].shadow.pruned == 0 for e in final)
    for e in final:
        assert runs[e].stats["pruned"] == 0 and sorted(runs[e].slots) == list(range(NUM_SAMPLES))
        assert not runs[e].boosted.any()
    assert runs[final[0] - 1].stats["pruned"] > 0, "the last pruning epoch must prune"


# ---- free running: the library against the reference's own trajectories ---------------------------


@cache
def reference_ensemble(prune_ratio: float, delta: float, num_epochs: int) -> dict[str, np.ndarray]:
    """Per-epoch figures (runs x epochs) of ``ENSEMBLE`` independent runs of the paper's rule with
    per-sample coins, whose spread then holds the same binomial noise as the library's."""
    out = {"threshold": [], "well_learned": [], "pruned": []}
    for seed in range(ENSEMBLE):
        ref = PublishedInfoBatch(NUM_SAMPLES, num_epochs, prune_ratio, delta, seed=1000 + seed, exact_count=False)
        losses = LossModel(NUM_SAMPLES)
        rows = {k: [] for k in out}
        for epoch in range(num_epochs):
            plan = ref.plan(epoch)
            slots = np.flatnonzero(plan.keep)
            ref.update(slots, losses(slots, epoch))
            rows["threshold"].append(plan.threshold)
            rows["well_learned"].append(int(plan.well_learned.sum()))
            rows["pruned"].append(plan.pruned)
        for k in out:
            out[k].append(rows[k])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def test_free_running_trajectory_matches_the_reference(case):
    """Left to its own random subsets, the library's threshold, well-learned and pruned counts must
    stay inside the spread of the reference's own runs, every epoch from epoch 1 on (the spread is
    estimated from ``ENSEMBLE`` runs, hence the ``sqrt(1 + 1/ENSEMBLE)`` for the mean's error)."""
    (prune_ratio, delta, num_epochs), runs = case
    ens = reference_ensemble(prune_ratio, delta, num_epochs)
    for epoch in range(1, num_epochs):
        for name in ("threshold", "well_learned", "pruned"):
            values, got = ens[name][:, epoch], runs[epoch].stats[name]
            # epoch 1 follows the full epoch 0 and has no spread at all: allow rounding, one count
            floor = 1e-9 * abs(values.mean()) if name == "threshold" else 1
            tolerance = SIGMAS * values.std(ddof=1) * math.sqrt(1 + 1 / ENSEMBLE) + floor
            assert abs(got - values.mean()) <= tolerance, (epoch, name, got, values.mean(), tolerance)

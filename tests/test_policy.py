"""Unit tests for ``infobatch_stream.policy``: every rule of DESIGN.md's "Policy" section.

The statistical tests are deterministic (the drop coin is a hash of fixed seeds, epochs and
slots), so they never flake; their bounds are nevertheless chosen honestly, at about 6 standard
deviations of the quantity tested, so that a correct implementation passes for essentially any
choice of seeds and a biased one (even by a few tenths of a percent) fails.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infobatch_stream import policy
from infobatch_stream.policy import (
    MAX_PRUNE_RATIO,
    PruneConfig,
    decide,
    prunes_in_epoch,
    threshold,
    uniform,
    weights,
    well_learned,
)

SIGMAS = 6.0  # width of every statistical bound, in standard deviations
MASK64 = (1 << 64) - 1


def always_prunes(prune_ratio: float, seed: int = 0, num_epochs: int = 100_000) -> PruneConfig:
    """A config whose epochs 0 .. num_epochs-1 all prune (delta = 1: e + 1 > num_epochs never holds)."""
    return PruneConfig(num_epochs=num_epochs, prune_ratio=prune_ratio, delta=1.0, seed=seed)


# --------------------------------------------------------------------------------------------
# threshold
# --------------------------------------------------------------------------------------------


class TestThreshold:
    def test_mean_of_seen_scores(self):
        assert threshold(np.array([1.0, 2.0, 6.0])) == 3.0
        assert threshold([1.0, 2.0, 6.0]) == 3.0  # any array-like

    def test_nan_scores_are_ignored(self):
        scores = np.array([np.nan, 1.0, np.nan, 3.0, np.nan], dtype=np.float32)
        assert threshold(scores) == 2.0

    def test_nothing_seen_is_nan(self):
        assert math.isnan(threshold(np.full(10, np.nan, dtype=np.float32)))
        assert math.isnan(threshold(np.zeros(0, dtype=np.float32)))

    def test_returns_python_float(self):
        t = threshold(np.array([1.0, 2.0], dtype=np.float32))
        assert type(t) is float
        assert type(threshold(np.full(3, np.nan))) is float

    def test_single_seen_sample(self):
        assert threshold(np.array([np.nan, 0.25, np.nan], dtype=np.float32)) == 0.25

    def test_does_not_modify_input(self):
        scores = np.array([np.nan, 1.0, 5.0], dtype=np.float32)
        before = scores.copy()
        threshold(scores)
        np.testing.assert_array_equal(scores, before)

    def test_float64_accumulation_no_float16_overflow(self):
        # Summing these in float16 overflows to inf; the float64 mean is exact.
        scores = np.full(1000, 60000.0, dtype=np.float16)
        with np.errstate(over="ignore"):
            assert np.isinf(np.sum(scores, dtype=np.float16))
        assert threshold(scores) == 60000.0

    def test_float64_accumulation_precision(self):
        rng = np.random.default_rng(1234)
        scores = (rng.random(200_001) * 1000.0).astype(np.float32)
        scores[::7] = np.nan
        seen = scores[~np.isnan(scores)].astype(np.float64)
        exact = math.fsum(seen.tolist()) / len(seen)
        got = threshold(scores)
        assert abs(got - exact) <= 1e-12 * exact
        # Sanity: float32 accumulation would have been measurably worse, so the bound above
        # really distinguishes float64 from float32 accumulation.
        naive32 = float(np.cumsum(seen.astype(np.float32), dtype=np.float32)[-1]) / len(seen)
        assert abs(naive32 - exact) > 1e-9 * exact

    def test_float32_store_values(self):
        # The store holds float32; the threshold is the float64 mean of those float32 values.
        scores = np.array([0.1, 0.2, 0.3], dtype=np.float32)
        expected = (float(np.float32(0.1)) + float(np.float32(0.2)) + float(np.float32(0.3))) / 3
        assert threshold(scores) == pytest.approx(expected, rel=1e-15, abs=0)


# --------------------------------------------------------------------------------------------
# well_learned
# --------------------------------------------------------------------------------------------


class TestWellLearned:
    def test_strictly_below_threshold(self):
        scores = np.array([0.5, 1.0, 1.5, 2.0, 2.5])
        np.testing.assert_array_equal(well_learned(scores, 2.0), [True, True, True, False, False])

    def test_equal_to_threshold_is_not_well_learned(self):
        scores = np.array([2.0, 2.0, 2.0], dtype=np.float32)
        t = threshold(scores)
        assert t == 2.0
        assert not well_learned(scores, t).any()

    def test_unseen_never_well_learned(self):
        scores = np.array([np.nan, 0.0, np.nan, -1e30, np.nan], dtype=np.float32)
        got = well_learned(scores, 1.0)
        np.testing.assert_array_equal(got, [False, True, False, True, False])
        # Even with an absurdly large threshold.
        assert not well_learned(np.full(5, np.nan), np.inf).any()

    def test_nan_threshold_means_nothing_is_well_learned(self):
        scores = np.array([np.nan, 0.0, 1.0, -5.0])
        got = well_learned(scores, float("nan"))
        assert got.dtype == bool
        assert got.shape == scores.shape
        assert not got.any()

    def test_with_threshold_from_store(self):
        scores = np.array([np.nan, 1.0, 2.0, 3.0, np.nan, 6.0], dtype=np.float32)
        t = threshold(scores)  # (1 + 2 + 3 + 6) / 4 = 3
        assert t == 3.0
        np.testing.assert_array_equal(well_learned(scores, t), [False, True, True, False, False, False])

    def test_returns_bool_mask_same_shape(self):
        scores = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
        got = well_learned(scores, 0.5)
        assert got.dtype == bool and got.shape == (3, 4)

    def test_float32_scores_compared_against_float64_threshold(self):
        one = np.float32(1.0)
        scores = np.array([one, one, np.nextafter(one, np.float32(2))], dtype=np.float32)
        t = threshold(scores)  # 1 + 2**-23 / 3 = 1.0000000397..., > 1 but rounds to 1.0 in float32
        assert t > 1.0 and float(np.float32(t)) == 1.0
        # Reference: the rule evaluated exactly (float64 comparison).
        expected = scores.astype(np.float64) < t
        np.testing.assert_array_equal(expected, [True, True, False])
        np.testing.assert_array_equal(well_learned(scores, np.float64(t)), expected)  # passes
        np.testing.assert_array_equal(well_learned(scores, t), expected)  # was [F, F, F] before the float64 comparison


# --------------------------------------------------------------------------------------------
# PruneConfig, capping, validation, epoch boundary
# --------------------------------------------------------------------------------------------


class TestConfig:
    def test_defaults(self):
        c = PruneConfig(num_epochs=10)
        assert c.prune_ratio == 0.5 and c.delta == 0.875 and c.seed == 0
        assert c.ratio == 0.5 and c.boost == 2.0

    @pytest.mark.parametrize(
        "kwargs",
        [
            dict(num_epochs=0),
            dict(num_epochs=-3),
            dict(num_epochs=10, prune_ratio=-0.01),
            dict(num_epochs=10, prune_ratio=1.0),
            dict(num_epochs=10, prune_ratio=1.5),
            dict(num_epochs=10, prune_ratio=float("nan")),
            dict(num_epochs=10, delta=-0.01),
            dict(num_epochs=10, delta=1.01),
            dict(num_epochs=10, delta=float("nan")),
        ],
    )
    def test_invalid_configs_raise(self, kwargs):
        with pytest.raises(ValueError):
            PruneConfig(**kwargs)

    @pytest.mark.parametrize(
        "kwargs",
        [
            dict(num_epochs=1),
            dict(num_epochs=10, prune_ratio=0.0),
            dict(num_epochs=10, prune_ratio=0.999),
            dict(num_epochs=10, delta=0.0),
            dict(num_epochs=10, delta=1.0),
        ],
    )
    def test_edge_configs_are_valid(self, kwargs):
        PruneConfig(**kwargs)

    def test_frozen(self):
        c = PruneConfig(num_epochs=10)
        with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
            c.prune_ratio = 0.7  # type: ignore[misc]

    @pytest.mark.parametrize(
        "prune_ratio, ratio",
        [(0.0, 0.0), (0.3, 0.3), (0.5, 0.5), (0.9, 0.9), (0.900001, 0.9), (0.95, 0.9), (0.999, 0.9)],
    )
    def test_ratio_capped_at_0_9(self, prune_ratio, ratio):
        c = PruneConfig(num_epochs=10, prune_ratio=prune_ratio)
        assert c.ratio == ratio
        assert c.boost == pytest.approx(1.0 / (1.0 - ratio), rel=1e-12)
        assert MAX_PRUNE_RATIO == 0.9

    def test_capped_095(self):
        c = PruneConfig(num_epochs=10, prune_ratio=0.95)
        assert c.ratio == 0.9
        assert c.boost == pytest.approx(10.0, rel=1e-12)

    def test_capping_logs_a_warning(self, caplog):
        with caplog.at_level(logging.WARNING, logger=policy.__name__):
            assert PruneConfig(num_epochs=10, prune_ratio=0.95).ratio == 0.9
        assert any("capped" in rec.getMessage() for rec in caplog.records)

    def test_capped_ratio_is_the_drop_probability(self):
        # prune_ratio 0.95 must drop ~90% of well-learned samples, not 95%.
        n = 200_000
        keep, boosted = decide(np.zeros(n), np.arange(n), 1.0, 0, always_prunes(0.95, seed=5))
        share = 1.0 - keep.mean()
        sd = math.sqrt(0.9 * 0.1 / n)
        assert abs(share - 0.9) < SIGMAS * sd
        np.testing.assert_allclose(weights(boosted, always_prunes(0.95))[boosted], 10.0, rtol=1e-12)


class TestEpochBoundary:
    def test_60_epochs_delta_0875(self):
        # delta * num_epochs = 52.5: epoch 51 (51 + 1 = 52 <= 52.5) prunes, epoch 52 (53 > 52.5) does not.
        c = PruneConfig(num_epochs=60, delta=0.875)
        assert c.prunes(51)
        assert not c.prunes(52)
        assert [e for e in range(60) if c.prunes(e)] == list(range(52))

    def test_8_epochs_delta_0875_exact_product(self):
        # delta * num_epochs = 7.0 exactly: epoch 6 prunes (7 > 7 is false), epoch 7 does not.
        c = PruneConfig(num_epochs=8, delta=0.875)
        assert 0.875 * 8 == 7.0
        assert c.prunes(6)
        assert not c.prunes(7)
        assert [e for e in range(8) if c.prunes(e)] == list(range(7))

    def test_function_matches_method(self):
        for n in (1, 7, 8, 60, 100):
            for d in (0.0, 0.5, 0.875, 1.0):
                c = PruneConfig(num_epochs=n, delta=d)
                for e in range(n + 2):
                    assert c.prunes(e) == prunes_in_epoch(e, n, d) == (not (e + 1 > d * n))

    def test_delta_one_prunes_every_epoch(self):
        assert all(prunes_in_epoch(e, 10, 1.0) for e in range(10))
        assert not prunes_in_epoch(10, 10, 1.0)

    def test_delta_zero_prunes_nothing(self):
        assert not any(prunes_in_epoch(e, 10, 0.0) for e in range(10))

    @pytest.mark.parametrize(
        "num_epochs, delta, last_pruning", [(60, 0.875, 51), (8, 0.875, 6), (10, 0.5, 4), (3, 0.9, 1)]
    )
    def test_annealing_epochs_keep_everything_weight_one(self, num_epochs, delta, last_pruning):
        c = PruneConfig(num_epochs=num_epochs, prune_ratio=0.9, delta=delta, seed=3)
        n = 5000
        scores = np.zeros(n, dtype=np.float32)  # all well-learned against threshold 1
        slots = np.arange(n)
        keep, boosted = decide(scores, slots, 1.0, last_pruning, c)
        assert not keep.all() and boosted.any()  # the last pruning epoch really prunes
        for e in range(last_pruning + 1, num_epochs + 3):
            keep, boosted = decide(scores, slots, 1.0, e, c)
            assert keep.dtype == bool and boosted.dtype == bool
            assert keep.all() and not boosted.any()
            np.testing.assert_array_equal(weights(boosted, c), np.ones(n))


# --------------------------------------------------------------------------------------------
# decide / weights: the rules
# --------------------------------------------------------------------------------------------


def mixed_scores():
    """200 samples: 50 unseen, 100 well-learned, 10 equal to the threshold, 40 above; threshold 2."""
    scores = np.empty(200, dtype=np.float32)
    scores[:50] = np.nan
    scores[50:150] = 1.0
    scores[150:160] = 2.0
    scores[160:] = 4.5
    scores = scores[np.random.default_rng(7).permutation(200)]  # interleave the kinds
    t = threshold(scores)
    assert t == 2.0  # (100 * 1 + 10 * 2 + 40 * 4.5) / 150
    learned = ~np.isnan(scores) & (scores < 2.0)
    assert learned.sum() == 100
    return scores, t, learned


class TestDecide:
    def test_matches_rule_exactly(self):
        rng = np.random.default_rng(11)
        n = 50_000
        scores = rng.exponential(size=n).astype(np.float32)
        scores[rng.random(n) < 0.2] = np.nan
        t = threshold(scores)
        slots = np.arange(10**9, 10**9 + n)
        for pr, seed, epoch in [(0.3, 0, 0), (0.5, 1, 4), (0.9, 12345, 17), (0.95, 2**40, 3)]:
            c = always_prunes(pr, seed=seed)
            keep, boosted = decide(scores, slots, t, epoch, c)
            learned = ~np.isnan(scores) & (scores.astype(np.float64) < t)
            dropped = learned & (uniform(seed, epoch, slots) < c.ratio)
            np.testing.assert_array_equal(keep, ~dropped)
            np.testing.assert_array_equal(boosted, learned & ~dropped)

    def test_unseen_and_not_well_learned_are_never_pruned_nor_boosted(self):
        scores, t, learned = mixed_scores()
        slots = np.arange(200)
        c = always_prunes(0.9, seed=99)
        for epoch in range(300):
            keep, boosted = decide(scores, slots, t, epoch, c)
            assert keep[~learned].all()
            assert not boosted[~learned].any()
            np.testing.assert_array_equal(boosted, keep & learned)

    def test_nothing_seen_keeps_everything(self):
        n = 1000
        c = always_prunes(0.9)
        scores = np.full(n, np.nan, dtype=np.float32)
        t = threshold(scores)
        for epoch in range(20):
            keep, boosted = decide(scores, np.arange(n), t, epoch, c)
            assert keep.all() and not boosted.any()

    def test_zero_ratio_keeps_everything_weight_one(self):
        c = always_prunes(0.0)
        assert c.boost == 1.0
        keep, boosted = decide(np.zeros(1000), np.arange(1000), 1.0, 0, c)
        assert keep.all() and not boosted.any()
        np.testing.assert_array_equal(weights(boosted, c), np.ones(1000))

    def test_all_equal_scores_prune_nothing(self):
        scores = np.full(1000, 0.7, dtype=np.float32)
        t = threshold(scores)
        keep, boosted = decide(scores, np.arange(1000), t, 0, always_prunes(0.9))
        assert keep.all() and not boosted.any()

    def test_shapes_and_dtypes(self):
        keep, boosted = decide(np.zeros(7), np.arange(7), 1.0, 0, always_prunes(0.5))
        assert keep.shape == boosted.shape == (7,)
        assert keep.dtype == bool and boosted.dtype == bool
        keep, boosted = decide(np.zeros(0), np.arange(0), 1.0, 0, always_prunes(0.5))
        assert keep.shape == boosted.shape == (0,)


class TestWeights:
    @pytest.mark.parametrize("pr", [0.3, 0.5, 0.9, 0.95])
    def test_boosted_get_inverse_keep_probability(self, pr):
        c = always_prunes(pr, seed=1)
        scores, t, learned = mixed_scores()
        keep, boosted = decide(scores, np.arange(200), t, 2, c)
        w = weights(boosted, c)
        assert w.dtype == np.float64 and w.shape == (200,)
        np.testing.assert_allclose(w[boosted], 1.0 / (1.0 - c.ratio), rtol=1e-12)
        np.testing.assert_array_equal(w[~boosted], 1.0)
        assert c.boost == 1.0 / (1.0 - c.ratio)

    def test_plain_mask(self):
        c = PruneConfig(num_epochs=10, prune_ratio=0.75)
        np.testing.assert_array_equal(weights(np.array([True, False, True]), c), [4.0, 1.0, 4.0])


# --------------------------------------------------------------------------------------------
# determinism of the drop coin: calls, chunking, order, dtypes, processes, versions
# --------------------------------------------------------------------------------------------


def _mix_ref(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform_ref(seed: int, epoch: int, slot: int) -> float:
    """Pure-Python reference of the hash (SplitMix64 finaliser over golden-ratio-spaced counters)."""
    golden = 0x9E3779B97F4A7C15
    key = _mix_ref(((seed & MASK64) * golden + (epoch & 0xFFFFFFFF)) & MASK64)
    x = _mix_ref(((slot & MASK64) * golden + key) & MASK64)
    return (x >> 11) * 2.0**-53


class TestDeterminism:
    def test_identical_across_calls(self):
        slots = np.arange(100_000)
        a = uniform(42, 3, slots)
        b = uniform(42, 3, slots)
        np.testing.assert_array_equal(a, b)
        c = always_prunes(0.5, seed=42)
        scores = np.zeros(100_000)
        k1, b1 = decide(scores, slots, 1.0, 3, c)
        k2, b2 = decide(scores, slots, 1.0, 3, c)
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(b1, b2)

    @pytest.mark.parametrize(
        "seed, epoch, slot",
        [
            (0, 0, 0),
            (0, 0, 1),
            (1, 0, 0),
            (0, 1, 0),
            (12345, 7, 987654321),
            (2**63 + 5, 99, 2**40),
            (-1, 3, 17),
            (7, 2**31 + 3, 5),
            (3, 4, 2**62),
        ],
    )
    def test_matches_reference_hash(self, seed, epoch, slot):
        # Pins the hash itself: changing it would change every kept set after an upgrade,
        # breaking resume-from-checkpoint reproducibility.
        got = uniform(seed, epoch, np.array([slot], dtype=np.int64))
        assert got.shape == (1,)
        assert got[0] == uniform_ref(seed, epoch, slot)

    def test_slot_dtype_does_not_matter(self):
        slots = np.arange(0, 60_000, 3)
        ref = uniform(5, 2, slots.astype(np.int64))
        for dt in (np.int32, np.uint32, np.uint64, np.int64):
            np.testing.assert_array_equal(uniform(5, 2, slots.astype(dt)), ref)
        np.testing.assert_array_equal(uniform(5, 2, slots.tolist()), ref)

    @settings(max_examples=40, deadline=None)
    @given(
        n=st.integers(1, 3000),
        cuts=st.lists(st.integers(0, 3000), max_size=8),
        seed=st.integers(0, 2**64 - 1),
        epoch=st.integers(0, 1000),
        base=st.integers(0, 2**40),
        pr=st.sampled_from([0.1, 0.3, 0.5, 0.9, 0.95]),
        grouped=st.booleans(),
    )
    def test_chunking_does_not_matter(self, n, cuts, seed, epoch, base, pr, grouped):
        rng = np.random.default_rng(n)
        scores = rng.random(n).astype(np.float32)
        scores[rng.random(n) < 0.1] = np.nan
        t = threshold(scores)
        slots = np.arange(base, base + n)
        ids = slots // 3 if grouped else None
        c = always_prunes(pr, seed=seed, num_epochs=2000)
        keep, boosted = decide(scores, slots, t, epoch, c, coin_ids=ids)
        bounds = [0] + sorted(min(x, n) for x in cuts) + [n]
        parts = [
            decide(scores[lo:hi], slots[lo:hi], t, epoch, c, coin_ids=None if ids is None else ids[lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), keep)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), boosted)
        np.testing.assert_array_equal(
            np.concatenate([uniform(seed, epoch, slots[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]),
            uniform(seed, epoch, slots),
        )

    def test_one_sample_at_a_time_equals_all_at_once(self):
        n = 2000
        rng = np.random.default_rng(3)
        scores = rng.random(n)
        slots = rng.choice(10**12, size=n, replace=False)
        c = always_prunes(0.5, seed=8)
        keep, boosted = decide(scores, slots, 0.5, 9, c)
        for i in range(0, n, 97):
            k, b = decide(scores[i : i + 1], slots[i : i + 1], 0.5, 9, c)
            assert k[0] == keep[i] and b[0] == boosted[i]

    @settings(max_examples=30, deadline=None)
    @given(perm_seed=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
    def test_independent_of_array_order(self, perm_seed, seed, epoch):
        n = 4000
        rng = np.random.default_rng(perm_seed)
        scores = rng.random(n)
        slots = np.arange(500, 500 + n)
        c = always_prunes(0.5, seed=seed)
        keep, boosted = decide(scores, slots, 0.5, epoch, c)
        p = rng.permutation(n)
        keep_p, boosted_p = decide(scores[p], slots[p], 0.5, epoch, c)
        np.testing.assert_array_equal(keep_p, keep[p])
        np.testing.assert_array_equal(boosted_p, boosted[p])

    @pytest.mark.parametrize("field", ["seed", "epoch"])
    def test_different_seeds_and_epochs_give_different_decisions(self, field):
        n = 100_000
        slots = np.arange(n)
        scores = np.zeros(n)
        r = 0.5
        masks = []
        for v in range(4):
            seed, epoch = (v, 0) if field == "seed" else (0, v)
            keep, _ = decide(scores, slots, 1.0, epoch, always_prunes(r, seed=seed))
            masks.append(keep)
        # Independent coins agree with probability r^2 + (1-r)^2 = 0.5.
        p = r * r + (1 - r) * (1 - r)
        sd = math.sqrt(p * (1 - p) / n)
        for i in range(4):
            for j in range(i + 1, 4):
                agree = float(np.mean(masks[i] == masks[j]))
                assert abs(agree - p) < SIGMAS * sd, (i, j, agree)

    def test_far_apart_seeds_and_large_values_differ(self):
        slots = np.arange(10_000)
        arrays = [uniform(s, e, slots) for s, e in [(0, 0), (2**32, 0), (2**63, 0), (0, 2**31), (1, 1)]]
        for i in range(len(arrays)):
            for j in range(i + 1, len(arrays)):
                assert np.mean(arrays[i] == arrays[j]) < 0.01

    def test_identical_across_processes(self):
        # Any worker, rank or restart must make the same decisions: recompute in fresh
        # interpreters (with different hash randomisation) and compare digests. The child loads
        # policy.py by path (it needs only numpy) so as not to pay the package's torch import.
        cases = [(0, 0), (1, 5), (123456789, 41), (2**64 - 1, 7)]
        code = (
            "import hashlib, importlib.util, sys\n"
            "import numpy as np\n"
            "spec = importlib.util.spec_from_file_location('policy_child', sys.argv[1])\n"
            "pol = importlib.util.module_from_spec(spec)\n"
            "sys.modules['policy_child'] = pol\n"
            "spec.loader.exec_module(pol)\n"
            "slots = np.concatenate([np.arange(200000), np.arange(10**12, 10**12 + 1000)])\n"
            "scores = (np.arange(len(slots)) % 7).astype(np.float32)\n"
            f"for seed, epoch in {cases!r}:\n"
            "    c = pol.PruneConfig(num_epochs=100, prune_ratio=0.6, delta=1.0, seed=seed)\n"
            "    k, b = pol.decide(scores, slots, 3.5, epoch, c)\n"
            "    u = pol.uniform(seed, epoch, slots)\n"
            "    print(hashlib.sha256(u.tobytes() + k.tobytes() + b.tobytes()).hexdigest())\n"
        )
        slots = np.concatenate([np.arange(200000), np.arange(10**12, 10**12 + 1000)])
        scores = (np.arange(len(slots)) % 7).astype(np.float32)
        expected = []
        for seed, epoch in cases:
            c = PruneConfig(num_epochs=100, prune_ratio=0.6, delta=1.0, seed=seed)
            k, b = decide(scores, slots, 3.5, epoch, c)
            assert 0 < k.sum() < len(k)
            u = uniform(seed, epoch, slots)
            expected.append(hashlib.sha256(u.tobytes() + k.tobytes() + b.tobytes()).hexdigest())
        procs = []
        for hashseed in ("0", "12345"):
            env = dict(os.environ, PYTHONHASHSEED=hashseed)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, policy.__file__],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert out.split() == expected


# --------------------------------------------------------------------------------------------
# coin_ids: grouped drops
# --------------------------------------------------------------------------------------------


class TestDecisionIds:
    def test_default_is_slots(self):
        n = 10_000
        scores = np.random.default_rng(0).random(n)
        slots = np.arange(77, 77 + n)
        c = always_prunes(0.5, seed=4)
        a = decide(scores, slots, 0.5, 2, c)
        b = decide(scores, slots, 0.5, 2, c, coin_ids=slots)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    def test_decision_depends_on_ids_not_slots(self):
        n = 5000
        c = always_prunes(0.5, seed=4)
        ids = np.random.default_rng(1).integers(0, 10**9, n)
        k1, _ = decide(np.zeros(n), np.arange(n), 1.0, 0, c, coin_ids=ids)
        k2, _ = decide(np.zeros(n), np.arange(10**6, 10**6 + n), 1.0, 0, c, coin_ids=ids)
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(k1, uniform(4, 0, ids) >= 0.5)

    @pytest.mark.parametrize("r", [0.3, 0.5, 0.9])
    def test_shared_ids_drop_together_marginal_is_r(self, r):
        group = 5
        n_groups = 200_000
        n = group * n_groups
        slots = np.arange(n)
        ids = slots // group
        c = always_prunes(r, seed=21)
        keep, boosted = decide(np.zeros(n, dtype=np.float32), slots, 1.0, 6, c, coin_ids=ids)
        per_group = keep.reshape(n_groups, group)
        assert (per_group == per_group[:, :1]).all()  # all together, or not at all
        # Marginal drop probability per sample is still r; groups are the independent units.
        share = 1.0 - keep.mean()
        sd = math.sqrt(r * (1 - r) / n_groups)
        assert abs(share - r) < SIGMAS * sd
        np.testing.assert_array_equal(boosted, keep)

    def test_shared_ids_with_mixed_learnedness(self):
        # A not-well-learned or unseen member of a group is kept regardless; the well-learned
        # members still follow the group's single coin.
        scores = np.array([0.0, 5.0, np.nan, 0.0] * 5000, dtype=np.float32)
        n = len(scores)
        ids = np.arange(n) // 4
        keep, boosted = decide(scores, np.arange(n), 1.0, 1, always_prunes(0.5, seed=2), coin_ids=ids)
        k = keep.reshape(-1, 4)
        assert k[:, 1].all() and k[:, 2].all()
        np.testing.assert_array_equal(k[:, 0], k[:, 3])
        assert 0 < k[:, 0].sum() < len(k)
        np.testing.assert_array_equal(boosted.reshape(-1, 4)[:, 1:3], False)


# --------------------------------------------------------------------------------------------
# statistics of the drop decisions and of the weights
# --------------------------------------------------------------------------------------------


class TestStatistics:
    @pytest.mark.parametrize("r", [0.3, 0.5, 0.9])
    def test_dropped_share_is_r(self, r):
        n = 1_000_000
        c = always_prunes(r, seed=2024)
        scores = np.zeros(n, dtype=np.float32)
        keep, boosted = decide(scores, np.arange(n), 1.0, 13, c)
        dropped = n - int(keep.sum())
        sd = math.sqrt(n * r * (1 - r))
        assert abs(dropped - n * r) < SIGMAS * sd, (dropped, n * r, sd)
        assert int(boosted.sum()) == n - dropped

    @pytest.mark.parametrize("r", [0.3, 0.5, 0.9])
    def test_dropped_share_is_r_in_every_block_of_slots(self, r):
        # Slices of the slot space (i.e. shards) each see the right share, at high slot numbers too.
        n_blocks, size = 20, 50_000
        c = always_prunes(r, seed=77)
        sd = math.sqrt(size * r * (1 - r))
        # Bonferroni: 20 blocks, so widen the bound a little.
        bound = (SIGMAS + 0.5) * sd
        for b in range(n_blocks):
            lo = b * 10**9 + 12345
            keep, _ = decide(np.zeros(size), np.arange(lo, lo + size), 1.0, 0, c)
            assert abs((size - keep.sum()) - size * r) < bound

    @pytest.mark.parametrize("r", [0.3, 0.5, 0.9])
    def test_expected_weighted_keep_is_one_per_sample(self, r):
        # E[kept * weight] = (1 - r) * 1/(1 - r) = 1 for every sample: the gradient is unbiased.
        epochs = 4000
        scores, t, learned = mixed_scores()
        slots = np.arange(10**6, 10**6 + 200)
        c = always_prunes(r, seed=31, num_epochs=epochs)
        total = np.zeros(200)
        for e in range(epochs):
            keep, boosted = decide(scores, slots, t, e, c)
            kw = keep * weights(boosted, c)
            # Unseen and not-well-learned samples: exactly 1 in every epoch.
            assert (kw[~learned] == 1.0).all()
            total += kw
        mean = total / epochs
        # kept*weight is 1/(1-r) w.p. 1-r and 0 w.p. r: variance r/(1-r).
        sd = math.sqrt(r / (1 - r) / epochs)
        # Bonferroni over 100 samples: a normal tail of 6 sigma per sample is still < 1e-7 overall.
        worst = float(np.max(np.abs(mean[learned] - 1.0)))
        assert worst < SIGMAS * sd, (worst, sd)
        # The pooled mean over all 100 well-learned samples is much tighter.
        pooled = float(mean[learned].mean())
        assert abs(pooled - 1.0) < SIGMAS * sd / math.sqrt(learned.sum())
        np.testing.assert_array_equal(mean[~learned], 1.0)

    def test_expected_weighted_keep_is_one_over_seeds(self):
        # Same property across seeds at a fixed epoch (a restart with another seed).
        r = 0.5
        n_seeds = 4000
        scores, t, learned = mixed_scores()
        slots = np.arange(200)
        total = np.zeros(200)
        for s in range(n_seeds):
            c = always_prunes(r, seed=s)
            keep, boosted = decide(scores, slots, t, 0, c)
            total += keep * weights(boosted, c)
        mean = total / n_seeds
        sd = math.sqrt(r / (1 - r) / n_seeds)
        assert float(np.max(np.abs(mean[learned] - 1.0))) < SIGMAS * sd
        np.testing.assert_array_equal(mean[~learned], 1.0)

    def test_each_sample_is_dropped_in_share_r_of_epochs(self):
        # No sample is systematically kept or dropped: per-sample drop frequency over epochs is r.
        r, epochs, n = 0.5, 2000, 500
        c = always_prunes(r, seed=9, num_epochs=epochs)
        drops = np.zeros(n)
        slots = np.arange(n)
        for e in range(epochs):
            keep, _ = decide(np.zeros(n), slots, 1.0, e, c)
            drops += ~keep
        freq = drops / epochs
        sd = math.sqrt(r * (1 - r) / epochs)
        assert float(np.max(np.abs(freq - r))) < SIGMAS * sd


# --------------------------------------------------------------------------------------------
# uniform(): quality of the counter-based uniform
# --------------------------------------------------------------------------------------------


def _chi2_z(stat: float, dof: int) -> float:
    """Wilson-Hilferty: a chi-square statistic with ``dof`` degrees of freedom as a standard normal z."""
    k = float(dof)
    return ((stat / k) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / math.sqrt(2.0 / (9.0 * k))


N_UNIFORM = 1_000_000


@pytest.fixture(scope="module")
def u():
    return uniform(123, 4, np.arange(N_UNIFORM))


class TestUniform:
    def test_range_and_grid(self, u):
        assert u.dtype == np.float64 and u.shape == (N_UNIFORM,)
        assert u.min() >= 0.0 and u.max() < 1.0
        # Values lie on the 2**-53 grid (53 random bits).
        scaled = u * 2.0**53
        np.testing.assert_array_equal(scaled, np.floor(scaled))
        assert len(np.unique(u)) > N_UNIFORM - 5  # birthday collisions on 2**53 values: ~0

    def test_mean_and_variance(self, u):
        sd_mean = math.sqrt(1 / 12 / N_UNIFORM)
        assert abs(u.mean() - 0.5) < SIGMAS * sd_mean
        # Var(U) = 1/12; the sample variance's sd is sqrt((mu4 - sigma^4)/n) with mu4 = 1/80.
        sd_var = math.sqrt((1 / 80 - 1 / 144) / N_UNIFORM)
        assert abs(u.var() - 1 / 12) < SIGMAS * sd_var

    def test_chi_square_100_bins(self, u):
        bins = 100
        counts = np.bincount((u * bins).astype(np.int64), minlength=bins)
        assert counts.sum() == N_UNIFORM and len(counts) == bins
        expected = N_UNIFORM / bins
        stat = float(((counts - expected) ** 2 / expected).sum())
        z = _chi2_z(stat, bins - 1)
        # Both tails: too uneven, or suspiciously even (a stratified counter, not a hash).
        assert abs(z) < SIGMAS, (stat, z)

    def test_chi_square_over_pairs_of_consecutive_slots(self, u):
        # 10 x 10 joint bins of (u[i], u[i+1]) over disjoint pairs.
        a = (u[0::2] * 10).astype(np.int64)
        b = (u[1::2] * 10).astype(np.int64)
        counts = np.bincount(a * 10 + b, minlength=100)
        expected = len(a) / 100
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert abs(_chi2_z(stat, 99)) < SIGMAS

    def test_low_bits_of_mantissa_uniform(self, u):
        # The last bits of the 53-bit value must be balanced too (not a weak low-bit generator).
        bits = (u * 2.0**53).astype(np.uint64)
        for k in (0, 1, 2, 7):
            share = float(((bits >> np.uint64(k)) & np.uint64(1)).mean())
            assert abs(share - 0.5) < SIGMAS * math.sqrt(0.25 / N_UNIFORM)

    @pytest.mark.parametrize("lag", [1, 2, 3, 64, 1024])
    def test_low_correlation_between_nearby_slots(self, u, lag):
        corr = float(np.corrcoef(u[:-lag], u[lag:])[0, 1])
        assert abs(corr) < SIGMAS / math.sqrt(N_UNIFORM - lag), corr

    def test_low_correlation_between_consecutive_epochs(self, u):
        slots = np.arange(N_UNIFORM)
        nxt = uniform(123, 5, slots)
        corr = float(np.corrcoef(u, nxt)[0, 1])
        assert abs(corr) < SIGMAS / math.sqrt(N_UNIFORM), corr
        # Drop decisions of one slot in consecutive epochs are independent too (r = 0.5).
        agree = float(np.mean((u < 0.5) == (nxt < 0.5)))
        assert abs(agree - 0.5) < SIGMAS * math.sqrt(0.25 / N_UNIFORM)

    def test_low_correlation_between_consecutive_seeds(self, u):
        other = uniform(124, 4, np.arange(N_UNIFORM))
        corr = float(np.corrcoef(u, other)[0, 1])
        assert abs(corr) < SIGMAS / math.sqrt(N_UNIFORM), corr

    def test_low_correlation_over_many_epochs_of_same_slots(self):
        # For a small set of slots, the sequence over 2000 epochs is uncorrelated at lag 1.
        slots = np.arange(500)
        seq = np.stack([uniform(0, e, slots) for e in range(2000)])  # (epochs, slots)
        x, y = seq[:-1].ravel(), seq[1:].ravel()
        corr = float(np.corrcoef(x, y)[0, 1])
        assert abs(corr) < SIGMAS / math.sqrt(len(x)), corr
        assert abs(seq.mean() - 0.5) < SIGMAS * math.sqrt(1 / 12 / seq.size)

    def test_uniform_at_huge_slots(self):
        slots = np.arange(2**62, 2**62 + 200_000)
        v = uniform(1, 1, slots)
        assert abs(v.mean() - 0.5) < SIGMAS * math.sqrt(1 / 12 / len(v))
        counts = np.bincount((v * 20).astype(np.int64), minlength=20)
        exp = len(v) / 20
        assert abs(_chi2_z(float(((counts - exp) ** 2 / exp).sum()), 19)) < SIGMAS

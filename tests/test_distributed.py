"""Real torch.distributed process groups (Gloo on 127.0.0.1).

Two groups are started (2 and 4 ranks); each rank runs several scenarios and writes what it saw;
the tests below compare that with a single-process reference. A hung collective fails the test
after TIMEOUT seconds instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import time
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from torch.utils.data import DataLoader

from infobatch_stream import (
    META_KEY,
    CheckpointError,
    InfoBatch,
    SettingsMismatchError,
    build_index,
    inbox,
    planner,
)
from infobatch_stream.distributed import all_gather_updates
from infobatch_stream.stages import shard_order
from tests.helpers.data import make_index, slot_loss, write_shards, write_sized_shards
from tests.helpers.loaders import data_loader, read_stages
from tests.helpers.servers import free_port

EPOCHS = 3
BATCH = 8
TIMEOUT = 120
PLAN_BLOCK = 64  # small planning blocks: every rank plans a slice of these tiny datasets
SKEWED = [11, 110, 11, 110, 11, 11, 110, 11]  # kept counts differ by 10x; 385 samples: an odd total
CONFIG = dict(num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=7)


# ---- running a group -------------------------------------------------------------------------------


def _rank_entry(rank: int, world_size: int, port: int, scenario: str, args: tuple, out: str) -> None:
    # On SIGUSR1 the rank (and its forked DataLoader workers, which inherit the handler) appends
    # every thread's stack to this file: run_group asks for them before killing a hung group.
    stacks = open(os.path.join(out, f"rank{rank}.stacks"), "a")  # kept open for the process's life
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=TIMEOUT),
    )
    planner.BLOCK = PLAN_BLOCK
    try:
        result = SCENARIOS[scenario](*args)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_group(world_size: int, scenario: str, args: tuple, out: str) -> list[dict]:
    """Start ``world_size`` spawned ranks running ``scenario``; their results, by rank."""
    os.makedirs(out, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(r, world_size, port, scenario, args, out)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    if hung:
        files = [os.path.join(out, f"rank{r}.stacks") for r in hung]
        stacks = _dump_and_kill([p for p in procs if p.is_alive()], files)
        raise AssertionError(f"ranks {hung} still running after {TIMEOUT} s (a collective hung); stacks:\n{stacks}")
    assert [p.exitcode for p in procs] == [0] * world_size, "a rank failed (its traceback is above)"
    results = []
    for r in range(world_size):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _dump_and_kill(procs: list, stack_files: list[str]) -> str:
    """Ask hung ranks and their workers for their stacks, kill them all, return what they wrote."""
    pids = [p.pid for p in procs]
    pids += [c for pid in pids for c in _children(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.join()
    text = []
    for path in stack_files:
        with open(path) as f:
            text.append(f"--- {os.path.basename(path)}\n{f.read()}")
    return "\n".join(text)


# ---- what a rank does ------------------------------------------------------------------------------


def _pipeline(ib: InfoBatch, path: str, shuffle: int = 0) -> wds.DataPipeline:
    shuffled = [wds.shuffle(shuffle)] if shuffle else []
    return wds.DataPipeline(ib.shards(), *read_stages(ib, path), *shuffled, wds.to_tuple(META_KEY))


def _loader(ib: InfoBatch, path: str, num_workers: int, shuffle: int = 0) -> DataLoader:
    return data_loader(_pipeline(ib, path, shuffle), BATCH, num_workers, context="fork", persistent=True)


def _train(ib: InfoBatch, loader: DataLoader, epochs: int = EPOCHS, step=None) -> dict:
    """Train with the fixed per-slot loss (+ epoch); what each epoch read and planned."""
    out: dict = {
        "slots": [],
        "batches": [],
        "expected_batches": [],
        "per_rank": [],
        "padded": [],
        "dropped": [],
        "seen_before_exchange": [],
    }
    for epoch in range(epochs):
        out["seen_before_exchange"].append(int(np.count_nonzero(~np.isnan(ib.store.scores))))
        stats = ib.set_epoch(epoch)
        slots, batches = [], 0
        for (meta,) in loader:
            loss = slot_loss(meta) + epoch
            if step is None:
                ib.update(meta, loss)
            else:
                step(meta, loss)
            slots += meta[:, 0].tolist()
            batches += 1
        out["slots"].append(slots)
        out["batches"].append(batches)
        out["expected_batches"].append(ib.num_batches(BATCH, loader.num_workers))
        for name in ("per_rank", "padded", "dropped"):
            out[name].append(getattr(stats, name))
        out.setdefault("kept_per_shard", []).append(np.asarray(ib.control.kept_per_shard).tolist())
    ib.sync_scores()  # the last epoch's updates
    out["scores"] = np.asarray(ib.store.scores).tolist()
    out["store"] = ib.store.shared.path
    out["writer"] = ib.run.writer
    return out


def _matrix(index_path: str, configs: list, share_store: bool, sync_every: int | None) -> dict:
    result = {}
    for num_workers, path in configs:
        ib = InfoBatch(index_path, **CONFIG, share_store=share_store, sync_every=sync_every)
        result[f"{num_workers}-{path}"] = _train(ib, _loader(ib, path, num_workers))
    return result


def _ddp_skewed(index_path: str) -> dict:
    """A real DDP model over shards whose kept counts differ by 10x, 2 persistent workers."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ib = InfoBatch(index_path, **CONFIG)

    def step(meta, target):
        out = model(meta[:, :1].float() / 400).squeeze(1)
        loss = ib.update(meta, (out - target) ** 2)
        opt.zero_grad()
        loss.backward()  # DDP all-reduces here: a rank with fewer batches would leave the other waiting
        opt.step()

    result = _train(ib, _loader(ib, "reader", 2, shuffle=50), step=step)
    result["weight"] = model.module.weight.detach().tolist()
    return result


def _deferred(index_path: str) -> dict:
    """update()'s deferred path (what a GPU takes; here forced on the CPU) with sync_every=3, and
    rank 0 alone taking a state_dict now and then: a batch landing there must not start an
    exchange that rank 1 never joins."""
    inbox.DEFERRED_DEVICES = {"cpu", "cuda"}
    ib = InfoBatch(index_path, **CONFIG, sync_every=3)
    calls = 0

    def step(meta, loss):
        nonlocal calls
        ib.update(meta, loss)
        calls += 1
        if dist.get_rank() == 0 and calls % 4 == 0:
            ib.state_dict()

    try:
        return _train(ib, _loader(ib, "reader", 0), step=step)
    finally:
        inbox.DEFERRED_DEVICES = {"cuda"}


def _two_rank_scenarios(index_path: str, skewed_path: str) -> dict:
    rank = dist.get_rank()
    # the chunked variable-size gather: rank r sends r * 3 + 1 updates, rounds of 2 per rank
    slots, values = all_gather_updates(
        np.arange(rank * 3 + 1) + 100 * rank, np.full(rank * 3 + 1, rank, dtype=np.float32), round_bytes=2 * 2 * 12
    )
    result = {"gathered_slots": slots.tolist(), "gathered_values": values.tolist()}
    result["matrix"] = _matrix(index_path, [(0, "reader"), (2, "filter")], share_store=True, sync_every=3)
    result["ddp"] = _ddp_skewed(skewed_path)
    result["deferred"] = _deferred(index_path)
    ib = InfoBatch(skewed_path, **CONFIG, remainder="drop")
    result["drop"] = _train(ib, _loader(ib, "reader", 2), epochs=1)
    # rank 1 loads another dataset's index: every rank must refuse, none may hang
    result["mixed_index"] = _outcome(lambda: InfoBatch(index_path if rank == 0 else skewed_path, **CONFIG))
    return result


def _four_rank_scenarios(index_path: str) -> dict:
    return {"matrix": _matrix(index_path, [(0, "filter"), (2, "reader")], share_store=False, sync_every=None)}


def _outcome(call) -> dict:
    """What a call did on this rank: accepted, or the error's type and message."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - recorded, compared by the tests
        return {
            "error": type(e).__name__,
            "message": str(e),
            "mismatch": isinstance(e, SettingsMismatchError),
            "checkpoint": isinstance(e, CheckpointError),
        }
    return {"error": None}


# rank 1's value of each setting that every rank must share (rank 0 keeps CONFIG's / the default)
RANK1_SETTINGS = {
    "seed": 8,
    "num_epochs": 4,
    "prune_ratio": 0.7,
    "delta": 0.5,
    "granularity": 4,
    "remainder": "drop",
    "ema_decay": 0.5,
    "sync_every": 3,
    "share_store": False,
}


def _trained_part(ib: InfoBatch, epoch: int, n: int = 8) -> None:
    """``n`` of this rank's samples of ``epoch`` through update(): the epoch is then partway."""
    rank = dist.get_rank()
    meta = torch.tensor([[rank * 50 + i, epoch, 0, ib.tag] for i in range(n)], dtype=torch.int64)
    ib.update(meta, torch.ones(n))


def _mismatch_scenarios(index_path: str, other_path: str) -> dict:
    """Ranks that disagree, one way after another: every rank must raise each time (a rank
    that went on would wait forever in the next collective and fail the group's deadline)."""
    rank = dist.get_rank()
    out: dict = {}
    for key, value in RANK1_SETTINGS.items():
        mine = {**CONFIG, key: value} if rank == 1 else dict(CONFIG)
        out[f"init-{key}"] = _outcome(lambda mine=mine: InfoBatch(index_path, **mine))
    out["init-several"] = _outcome(
        lambda: InfoBatch(index_path, **{**CONFIG, **({"seed": 9, "remainder": "drop"} if rank == 1 else {})})
    )
    out["init-fails-on-one"] = _outcome(lambda: InfoBatch(index_path, **CONFIG, remainder="pad" if rank == 0 else "x"))
    out["init-no-index-on-one"] = _outcome(
        lambda: InfoBatch(index_path if rank == 0 else index_path + ".gone", **CONFIG)
    )

    ib = InfoBatch(index_path, **CONFIG)
    out["epochs"] = _outcome(lambda: ib.set_epoch(1 if rank == 0 else 2))
    out["negative-epoch"] = _outcome(lambda: ib.set_epoch(-1 if rank == 0 else 0))
    at_start = ib.state_dict()  # epoch 0, nothing trained
    out["calls"] = _outcome(lambda: ib.set_epoch(1) if rank == 0 else ib.load_state_dict(at_start))
    out["same-epoch-after"] = _outcome(lambda: ib.set_epoch(1))  # the group is still in step
    boundary = ib.state_dict()  # epoch 1 planned, nothing trained in it
    _trained_part(ib, 1)
    partway = ib.state_dict()

    def resume(state, **change):
        return _outcome(lambda: InfoBatch(index_path, **{**CONFIG, **change}).load_state_dict(state))

    out["resume-partway-seed"] = resume(partway, seed=8)
    out["resume-partway-one-rank"] = resume(partway if rank == 0 else boundary, seed=8)
    out["resume-partway-num-epochs"] = resume(partway, num_epochs=EPOCHS + 2)
    out["resume-boundary-seed"] = resume(boundary, seed=8)
    out["resume-partway-same"] = resume(partway)
    out["resume-saved-epochs-differ"] = resume(boundary if rank == 0 else at_start)
    other = InfoBatch(other_path, **CONFIG).state_dict()
    out["resume-other-index-on-one"] = resume(partway if rank == 0 else other)
    ib.set_epoch(2)  # after all of that, the ranks still plan together
    out["final_kept"] = ib.stats()[-1]["kept"]
    return out


def _listed(list_path: str) -> dict:
    """A run from a wids shard list of HTTP shards, no index: 2 ranks, 2 persistent workers each."""
    ib = InfoBatch(list_path, **CONFIG)
    result = _train(ib, _loader(ib, "reader", 2))
    result["stats"] = ib.stats()
    result["index"] = ib.index.path
    return result


SCENARIOS = {
    "two": _two_rank_scenarios,
    "four": _four_rank_scenarios,
    "mismatch": _mismatch_scenarios,
    "listed": _listed,
}


# ---- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    block, planner.BLOCK = planner.BLOCK, PLAN_BLOCK
    try:
        yield _run_everything(tmp_path_factory)
    finally:
        planner.BLOCK = block


def _run_everything(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    _, index = make_index(str(root / "even"), num_shards=10, per_shard=23)
    skewed = build_index(write_sized_shards(str(root / "skewed"), SKEWED), str(root / "skewed" / "index.json"))
    ib = InfoBatch(index, **CONFIG)
    reference = _train(ib, _loader(ib, "reader", 0))
    reference["kept"] = [s["kept"] for s in ib.stats()]
    assert ib.stats()[1]["pruned"] > 0
    ib = InfoBatch(skewed, **CONFIG)
    skewed_reference = _train(ib, _loader(ib, "reader", 0), epochs=1)
    two = run_group(2, "two", (index.path, skewed.path), str(root / "two"))
    four = run_group(4, "four", (index.path,), str(root / "four"))
    return {"reference": reference, "skewed_reference": skewed_reference, 2: two, 4: four}


def test_chunked_variable_size_gather(data):
    for got in data[2]:
        assert got["gathered_slots"] == [0, 100, 101, 102, 103]
        assert got["gathered_values"] == [0.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("world_size,config", [(2, "0-reader"), (2, "2-filter"), (4, "0-filter"), (4, "2-reader")])
def test_same_global_slots_whatever_the_world_size(data, world_size, config):
    """Every kept slot is read once over all ranks; the only extras are the documented padding."""
    reference = data["reference"]
    ranks = [r["matrix"][config] for r in data[world_size]]
    for epoch in range(EPOCHS):
        per_rank = ranks[0]["per_rank"][epoch]
        kept = reference["kept"][epoch]
        assert per_rank == -(-kept // world_size)
        union = [s for r in ranks for s in r["slots"][epoch]]
        assert [len(r["slots"][epoch]) for r in ranks] == [per_rank] * world_size, "unequal shares"
        assert set(union) == set(reference["slots"][epoch]), f"epoch {epoch}: another set of slots"
        repeats = sum(c - 1 for c in Counter(union).values())
        assert repeats == ranks[0]["padded"][epoch] == world_size * per_rank - kept < world_size
        batches = [r["batches"][epoch] for r in ranks]
        assert batches == [ranks[0]["expected_batches"][epoch]] * world_size, "unequal batch counts"
    for r in ranks:  # every rank ends with the single-process store
        np.testing.assert_array_equal(np.asarray(r["scores"]), np.asarray(reference["scores"]))


def test_local_ranks_share_one_store(data):
    shared = [r["matrix"]["0-reader"] for r in data[2]]
    assert shared[0]["store"] == shared[1]["store"]
    assert [s["writer"] for s in shared] == [True, False]
    separate = [r["matrix"]["0-filter"] for r in data[4]]
    assert len({s["store"] for s in separate}) == 4 and all(s["writer"] for s in separate)


def test_sync_every_exchanges_during_the_epoch(data):
    for config in ("0-reader", "2-filter"):
        got = data[2][0]["matrix"][config]
        # with sync_every=3 the store holds scores before set_epoch exchanges; without it, not
        assert got["seen_before_exchange"][1] > 0
    assert data[4][0]["matrix"]["0-filter"]["seen_before_exchange"][1] == 0


def test_deferred_updates_exchange_in_step_across_ranks(data):
    """The deferred path with sync_every and one-sided state_dict() calls: no hang (the group
    finished), the same slots as the eager run, and every rank ends with the single-process store."""
    eager = [r["matrix"]["0-reader"] for r in data[2]]
    for got, ref in zip([r["deferred"] for r in data[2]], eager):
        assert got["slots"] == ref["slots"]
        assert got["seen_before_exchange"][1] > 0
        np.testing.assert_array_equal(np.asarray(got["scores"]), np.asarray(data["reference"]["scores"]))


def test_ddp_over_skewed_shards_takes_equal_steps(data):
    ranks = [r["ddp"] for r in data[2]]
    naive = []  # what WebDataset's round-robin split of the shards would have given each rank
    for epoch, kept in enumerate(ranks[0]["kept_per_shard"]):
        order = shard_order(len(kept), CONFIG["seed"], epoch)
        naive.append([int(np.asarray(kept)[order[r::2]].sum()) for r in range(2)])
    assert any(abs(a - b) >= BATCH for a, b in naive), f"the shards are not skewed enough to matter: {naive}"
    for epoch in range(EPOCHS):
        assert ranks[0]["batches"][epoch] == ranks[1]["batches"][epoch] == ranks[0]["expected_batches"][epoch]
    assert ranks[0]["weight"] == ranks[1]["weight"]


def test_ranks_with_different_indexes_all_refuse(data):
    for got in data[2]:
        outcome = got["mixed_index"]
        assert outcome["mismatch"], outcome
        assert outcome["message"].startswith("index differs across ranks: rank 0 has fingerprint ")
        assert "rank 1 has fingerprint" in outcome["message"] and "skewed" in outcome["message"]
        assert outcome["message"].endswith("every rank must load the same index (the same shards, indexed once)")


def test_drop_remainder_reads_each_sample_at_most_once(data):
    ranks = [r["drop"] for r in data[2]]
    reference = data["skewed_reference"]["slots"][0]
    union = [s for r in ranks for s in r["slots"][0]]
    assert len(union) == len(set(union)) == 2 * ranks[0]["per_rank"][0] == len(reference) - 1
    assert ranks[0]["dropped"][0] == 1 and set(union) < set(reference)


# ---- ranks that disagree ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    _, index = make_index(str(root / "a"), num_shards=4, per_shard=25)
    _, other = make_index(str(root / "b"), num_shards=2, per_shard=10)
    return run_group(2, "mismatch", (index.path, other.path), str(root / "out"))  # fails on a hang


def _both(ranks: list[dict], case: str) -> list[dict]:
    got = [r[case] for r in ranks]
    assert all(g["error"] for g in got), f"{case}: a rank went on while another raised: {got}"
    return got


@pytest.mark.parametrize("key", list(RANK1_SETTINGS))
def test_every_rank_refuses_a_setting_that_differs(mismatch, key):
    default = {"granularity": 1, "remainder": "pad", "ema_decay": 0.0, "sync_every": None, "share_store": True}
    rank0 = CONFIG.get(key, default.get(key))
    rank1 = RANK1_SETTINGS[key]
    if key in ("prune_ratio", "delta", "ema_decay"):
        rank0, rank1 = float(rank0), float(rank1)
    for got in _both(mismatch, f"init-{key}"):
        assert got["mismatch"], got
        assert got["message"] == (
            f"{key} differs across ranks: rank 0 has {rank0!r}, rank 1 has {rank1!r}; "
            "every rank must create InfoBatch with the same settings"
        )


def test_several_differing_settings_are_all_named(mismatch):
    for got in _both(mismatch, "init-several"):
        assert got["message"] == (
            "seed differs across ranks: rank 0 has 7, rank 1 has 9; remainder differs across "
            "ranks: rank 0 has 'pad', rank 1 has 'drop'; every rank must create InfoBatch with "
            "the same settings"
        )


def test_a_rank_that_fails_to_start_stops_the_others(mismatch):
    rank0, rank1 = _both(mismatch, "init-fails-on-one")
    assert rank1["error"] == "ValueError" and "remainder must be one of" in rank1["message"]
    assert rank0["error"] == "RuntimeError" and rank0["message"].startswith("rank 1 failed in InfoBatch() (ValueError:")
    rank0, rank1 = _both(mismatch, "init-no-index-on-one")
    assert rank1["error"] == "FileNotFoundError"
    assert rank0["message"].startswith("rank 1 failed in InfoBatch() (FileNotFoundError")


def test_every_rank_refuses_different_epochs(mismatch):
    for got in _both(mismatch, "epochs"):
        assert got["mismatch"] and got["message"] == (
            "epoch differs across ranks: rank 0 has 1, rank 1 has 2; call "
            "ib.set_epoch(epoch) with the same epoch on every rank"
        )
    for got in _both(mismatch, "negative-epoch"):  # compared before the local checks: no rank goes on alone
        assert got["mismatch"] and "rank 0 has -1, rank 1 has 0" in got["message"]


def test_ranks_in_different_collectives_all_refuse(mismatch):
    for got in _both(mismatch, "calls"):
        assert got["mismatch"] and got["message"].startswith(
            "call differs across ranks: rank 0 has ib.set_epoch(), rank 1 has ib.load_state_dict(); InfoBatch(), "
            "ib.set_epoch() and ib.load_state_dict() are collectives"
        )
    assert [r["same-epoch-after"] for r in mismatch] == [{"error": None}] * 2  # still in step


def test_a_partway_resume_with_another_seed_is_refused_on_every_rank(mismatch):
    for case in ("resume-partway-seed", "resume-partway-one-rank"):  # the second: only rank 0's state is partway
        for got in _both(mismatch, case):
            assert got["mismatch"], got
            assert got["message"].startswith(
                "this state was saved partway through epoch 1 (rank 0 had trained 8 of "
                "its 50 samples) with other settings than this InfoBatch's: seed: saved "
                "7, now 8."
            )
            assert got["message"].endswith(
                "Resume with the saved settings (InfoBatch(..., seed=7)), or resume from a "
                "state saved at an epoch boundary to change them"
            )


def test_resumes_that_keep_the_rest_of_the_epoch_are_taken_on_every_rank(mismatch):
    for case in ("resume-partway-num-epochs", "resume-boundary-seed", "resume-partway-same"):
        assert [r[case] for r in mismatch] == [{"error": None}] * 2, case
    assert mismatch[0]["final_kept"] == mismatch[1]["final_kept"] > 0


def test_states_of_different_steps_or_indexes_are_refused_on_every_rank(mismatch):
    for got in _both(mismatch, "resume-saved-epochs-differ"):
        assert got["mismatch"] and got["message"].startswith(
            "saved epoch differs across ranks: rank 0 has 1, rank 1 has 0; every rank must load a state saved by "
            "this run at the same step"
        )
    rank0, rank1 = _both(mismatch, "resume-other-index-on-one")
    assert rank1["checkpoint"] and "saved for another index" in rank1["message"]
    assert rank0["checkpoint"] and rank0["message"].startswith("rank 1 failed in ib.load_state_dict() (CheckpointError")


# ---- a run started from a shard list, indexed during epoch 0 -----------------------------------------


def test_two_ranks_index_during_epoch_0_from_a_shard_list(tmp_path):
    """8 HTTP shards of 25 over 2 ranks x 2 workers (50 samples each: no shard is cut): epoch 0
    reads every byte once, epoch 1 skips pruned bytes, the index equals the indexing pass's."""
    from infobatch_stream import DatasetIndex
    from infobatch_stream.rangeserver import RangeServer

    urls = write_shards(str(tmp_path / "shards"), num_shards=8, per_shard=25)
    total = sum(os.path.getsize(u) for u in urls)
    block, planner.BLOCK = planner.BLOCK, PLAN_BLOCK
    try:
        with RangeServer(str(tmp_path / "shards")) as base:
            remote = [f"{base}/{os.path.basename(u)}" for u in urls]
            reference = build_index(remote, str(tmp_path / "reference.json"))
            ib = InfoBatch(reference, **CONFIG)
            expected = _train(ib, _loader(ib, "reader", 0))
            listing = tmp_path / "list.json"
            listing.write_text(json.dumps({"shardlist": [{"url": u, "nsamples": 25} for u in remote]}))
            ranks = run_group(2, "listed", (str(listing),), str(tmp_path / "out"))
    finally:
        planner.BLOCK = block
    for epoch in range(EPOCHS):
        union = sorted(s for r in ranks for s in r["slots"][epoch])
        want = expected["slots"][epoch]
        assert set(union) == set(want), f"epoch {epoch}: another set of samples"
        assert len(union) == 2 * -(-len(want) // 2)  # the documented padding only
        assert ranks[0]["batches"][epoch] == ranks[1]["batches"][epoch]
    epoch0 = [r["stats"][0] for r in ranks]
    assert sum(s["bytes_read"] for s in epoch0) == total  # every shard streamed once, by one worker
    epoch1 = [r["stats"][1] for r in ranks]
    assert sum(s["pruned"] for s in epoch1[:1]) > 0 and sum(s["bytes_skipped"] for s in epoch1) > 0
    assert sum(s["bytes_read"] for s in epoch1) < total
    built, ref = DatasetIndex.load(ranks[0]["index"]), DatasetIndex.load(str(tmp_path / "reference.json"))
    assert ranks[1]["index"] == ranks[0]["index"]
    for name in ref._arrays:
        assert np.asarray(built._arrays[name]).tobytes() == np.asarray(ref._arrays[name]).tobytes(), name
    for r in ranks:
        np.testing.assert_array_equal(np.asarray(r["scores"]), np.asarray(expected["scores"]))

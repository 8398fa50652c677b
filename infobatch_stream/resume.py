"""Checkpoints of a run: the state it saves, and resuming from one, decided on every rank alike.

A state saved partway through an epoch holds that epoch's frozen plan and this rank's position in
it. The settings that decide the rest of that epoch must be the saved ones, or some samples would
be trained twice and others never; the others only shape later epochs and may change (with a
warning), as may anything at an epoch boundary.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import distributed
from .checkpoint import check_state
from .errors import CheckpointError, SettingsMismatchError
from .run import complete_index
from .settings import agree
from .stats import EpochStats, user_stacklevel

if TYPE_CHECKING:
    from .run import Run

log = logging.getLogger("infobatch_stream.infobatch")

MID_EPOCH_SETTINGS = ("seed", "remainder", "prune_ratio")
"""Settings a state saved partway through an epoch must be resumed with: the seed draws the
epoch's shard order (so which sample each saved reading position means) and the shuffle picks,
``remainder`` cuts the epoch over the ranks, and ``prune_ratio`` weights the kept well-learned
samples the saved plan kept with probability ``1 - r``. The others (``num_epochs``, ``delta``,
``granularity``, ``ema_decay``) only shape the epochs planned later (or the scores recorded from
now on): the restored epoch keeps its saved plan."""


def progress(state: dict[str, Any]) -> tuple[int, int] | None:
    """``(trained, per_rank)`` when ``state`` was saved partway through its current epoch: the
    rank had trained some of its share but not all. None at an epoch boundary (nothing trained
    in it yet, or the whole share trained)."""
    epoch = int(state["epoch"])
    for d in state["stats"]:
        if int(d["epoch"]) == epoch:
            trained, per_rank = int(d.get("trained", 0)), int(d.get("per_rank") or d.get("kept", 0))
            return (trained, per_rank) if 0 < trained < per_rank else None
    return None


def saved_settings(state: dict[str, Any], names: Any) -> dict[str, Any]:
    """The epoch and the settings ``names`` a state was saved with."""
    config = {"ema_decay": 0.0, **state["config"]}  # states written before the option existed
    return {"epoch": int(state["epoch"]), **{k: config.get(k) for k in names}}


def check_resume(extras: list[dict[str, Any]], mine: dict[str, Any]) -> None:
    """Refuse, on every rank alike (``extras``: every rank's saved settings and progress), a
    mid-epoch resume that would change the rest of the epoch; warn about other changes."""
    saved_by_rank = [{f"saved {k}": v for k, v in x["saved"].items()} for x in extras]
    differ = distributed.differences(saved_by_rank)
    if differ:
        raise SettingsMismatchError(
            "; ".join(text for _, text in differ) + "; every rank must load a state "
            "saved by this run at the same step (each rank's own, or rank 0's after "
            "ib.sync_scores())"
        )
    saved = dict(extras[0]["saved"])
    epoch = saved.pop("epoch")
    changed = {k: (saved[k], v) for k, v in mine.items() if saved[k] != v}
    if not changed:
        return
    partway = [(r, x["progress"]) for r, x in enumerate(extras) if x["progress"] is not None]
    refused = {k: ab for k, ab in changed.items() if k in MID_EPOCH_SETTINGS}
    listing = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
    if partway and refused:
        r, (trained, per_rank) = partway[0]
        who = "" if len(extras) == 1 else f"rank {r} "
        keep = ", ".join(f"{k}={a!r}" for k, (a, _) in refused.items())
        raise SettingsMismatchError(
            f"this state was saved partway through epoch {epoch} ({who}had trained {trained} of its {per_rank} "
            f"samples) with other settings than this InfoBatch's: "
            + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in refused.items())
            + f". They decide which samples the rest of epoch {epoch} reads and how they are weighted: some "
            f"would be trained twice and others never. Resume with the saved settings (InfoBatch(..., {keep})), "
            "or resume from a state saved at an epoch boundary to change them"
        )
    when = f"the rest of epoch {epoch} keeps its saved plan" if partway else "the next epoch planned uses them"
    message = f"restoring a state saved with other settings, keeping this InfoBatch's ({when}): {listing}"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def state_of(run: Run) -> dict[str, Any]:
    """``ib.state_dict()``: plain values and tensors (``torch.load(weights_only=True)`` reads it)."""
    run.inbox.land()
    run.collect_io()
    pending = run.scores.pending_updates()
    return {
        "format": 1,
        "index_fingerprint": run.index.fingerprint,
        "num_samples": run.index.num_samples,
        "config": run.settings.recorded(),
        "epoch": run.epoch,
        "threshold": run.control.threshold,
        "stats": run.book.as_dicts(),
        "updates": run.scores.updates,
        "scores": torch.from_numpy(np.array(run.store.scores)),
        "plan": torch.from_numpy(np.array(run.plan.shared.array)),
        "kept_per_shard": torch.from_numpy(np.array(run.control.kept_per_shard)),
        "pending_slots": torch.from_numpy(np.ascontiguousarray(pending["slot"])),
        "pending_losses": torch.from_numpy(np.ascontiguousarray(pending["loss"])),
    }


def _complete_for(run: Run, state: dict[str, Any]) -> None:
    """A state from past epoch 0 of a run whose index was built then, loaded where the index is
    still to build (its saved copy was removed): build it now, then check that it is the state's."""
    complete_index(run)
    index = run.index
    wrong = state.get("index_fingerprint") not in {index.fingerprint, index.source_fingerprint} - {None}
    if distributed.any_rank(wrong):
        raise CheckpointError(
            f"this state was saved for another index (fingerprint {str(state.get('index_fingerprint'))[:12]}) than "
            f"the one built from {index.path} ({index.fingerprint[:12]}): load it with the index it was saved with"
        )


def restore(run: Run, state: dict[str, Any]) -> None:
    """``ib.load_state_dict()``: check the state and the settings on every rank alike, then put
    back the store, the epoch and its frozen plan (republished as saved, not recomputed)."""
    failure, saved, partway = None, None, None
    mine = run.settings.recorded()
    try:
        run.inbox.land()  # a batch of the run being replaced must not land on the loaded state
        check_state(state, run.index)
        saved, partway = saved_settings(state, mine), progress(state)
    except Exception as e:  # noqa: BLE001 - raised below, on every rank
        failure = e
    extras = agree(
        "ib.load_state_dict()",
        run.settings,
        run.index,
        failure=failure,
        peer_error=CheckpointError,
        extra={"saved": saved, "progress": partway},
    )
    check_resume(extras, mine)  # every rank now loads a state of the same epoch
    if run.index.building is not None and int(state["epoch"]) >= 1:
        _complete_for(run, state)
    if run.writer:
        run.store.scores[:] = np.asarray(state["scores"])
        run.plan.shared.array[:] = np.asarray(state["plan"])
    distributed.barrier()
    rank, world_size = distributed.world()
    run.book.epochs = {int(d["epoch"]): EpochStats(**d) for d in state["stats"]}
    run.epoch = int(state["epoch"])
    run.book.split(run.epoch, world_size, run.settings.remainder)  # the split over ranks follows this job
    run.control.publish(run.epoch, float(state["threshold"]), np.asarray(state["kept_per_shard"]), rank, world_size)
    run.scores.restore(np.asarray(state["pending_slots"]), np.asarray(state["pending_losses"]), int(state["updates"]))
    run.view.announced.clear()

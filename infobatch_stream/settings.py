"""The settings of a run: checked once, recorded in states, and compared across ranks.

Every setting here changes which samples an epoch reads or how the ranks exchange scores, so
the ranks of one job must agree on all of them (:func:`agree`, one small gather before any other
collective), and a resume in the middle of an epoch must keep those that decide the rest of it
(:mod:`infobatch_stream.resume`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import distributed, policy
from .balance import samples_per_rank

_AGREE_HINTS = {
    "*": "every rank must create InfoBatch with the same settings",
    "index": "every rank must load the same index (the same shards, indexed once)",
    "epoch": "call ib.set_epoch(epoch) with the same epoch on every rank",
    "call": "InfoBatch(), ib.set_epoch() and ib.load_state_dict() are collectives: call them on every rank, "
    "in the same order",
}


@dataclass(frozen=True)
class RunSettings:
    """What ``InfoBatch(...)`` was created with, validated (see its docstring for each one)."""

    config: policy.PruneConfig
    remainder: str = "pad"
    sync_every: int | None = None
    share_store: bool = True
    ema_decay: float = 0.0

    @classmethod
    def checked(
        cls,
        num_epochs: int,
        prune_ratio: float,
        delta: float,
        seed: int,
        granularity: str | int,
        remainder: str,
        sync_every: int | None,
        share_store: bool,
        ema_decay: float,
    ) -> RunSettings:
        """The settings, or ``ValueError`` naming the one that is wrong."""
        if granularity == "sample":
            granularity = 1
        if isinstance(granularity, bool) or not isinstance(granularity, int):
            raise ValueError(f"granularity must be 'sample' or a block size k >= 1, got {granularity!r}")
        config = policy.PruneConfig(
            num_epochs=num_epochs, prune_ratio=prune_ratio, delta=delta, seed=seed, block_size=granularity
        )
        samples_per_rank(0, 1, remainder)  # validates it
        if sync_every is not None and (isinstance(sync_every, bool) or int(sync_every) < 1):
            raise ValueError(f"sync_every must be None or a number of update() calls >= 1, got {sync_every!r}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: the last loss is the score), got {ema_decay!r}")
        return cls(
            config, remainder, None if sync_every is None else int(sync_every), bool(share_store), float(ema_decay)
        )

    def recorded(self) -> dict[str, Any]:
        """The settings a state records (and a mid-epoch resume must keep some of)."""
        c = self.config
        return {
            "num_epochs": int(c.num_epochs),
            "prune_ratio": float(c.prune_ratio),
            "delta": float(c.delta),
            "seed": int(c.seed),
            "granularity": int(c.block_size),
            "remainder": self.remainder,
            "ema_decay": self.ema_decay,
        }

    def compared(self) -> dict[str, Any]:
        """The settings every rank must share: all of them (``share_store`` decides which
        collectives run, ``sync_every`` when the exchanges happen)."""
        return {**self.recorded(), "sync_every": self.sync_every, "share_store": self.share_store}


def agree(
    call: str,
    settings: RunSettings | None,
    index: Any,
    failure: BaseException | None = None,
    peer_error: type[Exception] = RuntimeError,
    extra: Any = None,
    **values: Any,
) -> list[Any]:
    """Every rank has the same index, settings and ``values`` in this ``call``, or every rank
    raises (one small gather; see :func:`distributed.agree`). Every rank's ``extra``, by rank.
    ``failure``: this rank already failed (its settings are unknown); the others are told."""
    shown = {"call": call}
    if failure is None and settings is not None:
        compared = {"call": call, **values, **settings.compared(), "index": index.fingerprint}
        shown["index"] = f"fingerprint {index.fingerprint[:12]} ({index.path or '<memory>'})"
    else:
        compared = {"call": call}
    return distributed.agree(compared, _AGREE_HINTS, shown, failure, peer_error, extra)

"""The figures of one epoch, as ``ib.stats()`` reports them and states save them.

Apart from :class:`~infobatch_stream.InfoBatch` so that readers of saved runs (``infobatch-stream
report``) need neither torch nor the training machinery.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EpochStats:
    """What happened in one epoch. Planned figures are exact when the epoch starts."""

    epoch: int
    threshold: float | None  # None until some sample has a score
    total: int
    seen: int  # samples with a score when the epoch started
    well_learned: int
    pruned: int
    kept: int
    trained: int = 0  # per-sample losses update() received for this epoch
    nonfinite: int = 0  # of those, NaN or inf: not stored
    repeated_passes: int = 0  # passes over the loader started without set_epoch (replaying this plan)
    bytes_read: int = 0  # by ib.tarfile_to_samples(), over all workers
    bytes_skipped: int = 0  # shard bytes not read (pruned samples, unread tails, skipped shards)
    requests: int = 0  # reads: seeks+reads on local files, Range requests over HTTP
    shards_read: int = 0
    shards_skipped: int = 0  # shards with nothing kept: never opened
    shards_failed: int = 0  # shards given up on an error the handler= chose to skip (e.g. warn_and_continue)
    per_rank: int = 0  # samples each rank yields (all ranks equal)
    padded: int = 0  # remainder="pad": samples read twice so every rank gets per_rank
    dropped: int = 0  # remainder="drop": kept samples no rank reads

"""InfoBatch data pruning for streaming WebDataset tar shards.

The names below are imported when first used (PEP 562), so that ``import infobatch_stream`` and
the ``index`` and ``report`` commands do not pay for torch unless they need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    IndexMismatchError,
    InfoBatchError,
    MetadataError,
    RangeNotSupported,
    ReportError,
    SettingsMismatchError,
    ShardAssignmentError,
    StaleIndexError,
    StorageError,
    TarFormatError,
)

_LAZY = {
    "DatasetIndex": "index",
    "build_index": "index",
    "EpochStats": "stats",
    "InfoBatch": "infobatch",
    "META_KEY": "meta",
    "PruneConfig": "policy",
    "ProgressScheduler": "schedule",
    "ScoreStore": "store",
}

if TYPE_CHECKING:
    from .index import DatasetIndex, build_index
    from .infobatch import InfoBatch
    from .meta import META_KEY
    from .policy import PruneConfig
    from .schedule import ProgressScheduler
    from .stats import EpochStats
    from .store import ScoreStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'infobatch_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CheckpointError",
    "DatasetIndex",
    "EpochStats",
    "IndexMismatchError",
    "InfoBatch",
    "InfoBatchError",
    "META_KEY",
    "MetadataError",
    "ProgressScheduler",
    "PruneConfig",
    "RangeNotSupported",
    "ReportError",
    "ScoreStore",
    "SettingsMismatchError",
    "ShardAssignmentError",
    "StaleIndexError",
    "StorageError",
    "TarFormatError",
    "build_index",
]
__version__ = "0.1.0"

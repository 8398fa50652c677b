"""InfoBatch data pruning for streaming WebDataset tar shards."""

from .errors import (CheckpointError, IndexMismatchError, InfoBatchError, MetadataError, RangeNotSupported,
                     ReportError, SettingsMismatchError, ShardAssignmentError, StaleIndexError, StorageError,
                     TarFormatError)
from .index import DatasetIndex, build_index
from .infobatch import EpochStats, InfoBatch
from .meta import META_KEY
from .policy import PruneConfig
from .schedule import ProgressScheduler
from .store import ScoreStore

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

"""InfoBatch data pruning for streaming WebDataset tar shards."""

from .index import DatasetIndex, IndexMismatchError, build_index
from .infobatch import EpochStats, InfoBatch
from .meta import META_KEY
from .policy import PruneConfig
from .schedule import ProgressScheduler
from .store import ScoreStore
from .tarscan import TarFormatError

__all__ = [
    "DatasetIndex",
    "EpochStats",
    "IndexMismatchError",
    "InfoBatch",
    "META_KEY",
    "ProgressScheduler",
    "PruneConfig",
    "ScoreStore",
    "TarFormatError",
    "build_index",
]
__version__ = "0.1.0"

"""Every error the library raises on purpose, under one base class.

Catch :class:`InfoBatchError` to handle anything that a file, a setting or a server did wrong;
each subclass also derives from the built-in exception that code written before this module
expected (``ValueError`` for bad files, ``OSError`` for storage, ...), so existing ``except``
clauses keep working. Messages name the file, shard or key and say what to do.
"""

from __future__ import annotations

from collections.abc import Callable


class InfoBatchError(Exception):
    """Base of every error raised by infobatch_stream on purpose."""


class TarFormatError(InfoBatchError, ValueError):
    """A shard is not a readable tar: the message names the shard and the byte offset."""


class StaleIndexError(InfoBatchError, RuntimeError):
    """A shard differs from what the index recorded: reading at stale offsets would return garbage."""


class IndexMismatchError(InfoBatchError, LookupError):
    """An index that is damaged, or a sample or shard that does not match it; the message says
    what to re-index."""


class CheckpointError(InfoBatchError, ValueError):
    """A checkpoint file that is not one, is damaged, or does not belong to this dataset or run."""


class ReportError(InfoBatchError, ValueError):
    """A file the report cannot read; the message names the file and what was expected."""


class StorageError(InfoBatchError, OSError):
    """A storage request failed; the message names the URL."""


class RangeNotSupported(StorageError):
    """The server answered a range request with the whole object (it ignores ``Range``)."""


class SettingsMismatchError(InfoBatchError, RuntimeError):
    """Ranks of one job, or a run and the state it resumes, disagree on a setting that changes
    which samples are read: some would be trained twice and others never."""


class ShardAssignmentError(InfoBatchError, RuntimeError):
    """A worker did not read the shards ``ib.shards()`` assigned to it (a splitter dropped some)."""


class MetadataError(InfoBatchError, ValueError):
    """The ``__ib__`` field given to ``update()`` is not one this InfoBatch wrote."""


def handle(handler: Callable[[Exception], bool], exn: Exception, where: str) -> bool:
    """Apply a WebDataset ``handler=`` to ``exn``: the failing source (``where``) is appended to
    the exception's args as WebDataset does, and the handler says whether to go on (True) or to
    stop (False); the default ``reraise_exception`` raises."""
    exn.args = exn.args + (where,)
    return bool(handler(exn))


__all__ = [
    "CheckpointError",
    "IndexMismatchError",
    "InfoBatchError",
    "MetadataError",
    "RangeNotSupported",
    "ReportError",
    "SettingsMismatchError",
    "ShardAssignmentError",
    "StaleIndexError",
    "StorageError",
    "TarFormatError",
    "handle",
]

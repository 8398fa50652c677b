"""The DataLoaders the tests train with: each setup written once, what a test varies as arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader

from infobatch_stream import META_KEY


def data_loader(
    source: Any,
    batch_size: int | None,
    num_workers: int = 0,
    context: str | None = None,
    persistent: bool = False,
    loader_class: Callable[..., Any] = DataLoader,
    **kw: Any,
) -> Any:
    """``source`` in a DataLoader (or ``loader_class``) with ``num_workers`` workers, started by
    ``context`` (torch's default where None) and kept across epochs if ``persistent``; without
    workers neither applies."""
    return loader_class(
        source,
        batch_size=batch_size,
        num_workers=num_workers,
        multiprocessing_context=context if num_workers else None,
        persistent_workers=persistent and num_workers > 0,
        **kw,
    )


def meta_loader(ib: Any, batch_size: int, *stages: Callable, shuffle: int = 0, **loader_kw: Any) -> Any:
    """Batches of ``(meta,)``: ``ib.dataset(*stages, wds.to_tuple(META_KEY))`` in ``data_loader``."""
    return data_loader(ib.dataset(*stages, wds.to_tuple(META_KEY), shuffle=shuffle), batch_size, **loader_kw)


def read_stages(ib: Any, path: str) -> list[Callable]:
    """The stages after ``ib.shards()`` that read the kept samples: the skip-aware reader
    (``"reader"``), or WebDataset's reader then ``ib.filter()`` (``"filter"``)."""
    return [ib.tarfile_to_samples()] if path == "reader" else [wds.tarfile_to_samples(), ib.filter()]

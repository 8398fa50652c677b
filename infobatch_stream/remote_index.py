"""Indexing shards read through obstore in a fresh interpreter.

obstore's tokio threads do not survive ``fork()``: if the training process indexed ``s3://``
shards itself, its forked DataLoader workers could not use obstore afterwards. A child started
with ``python -m infobatch_stream.remote_index`` (not multiprocessing: nothing of the user's
``__main__`` is re-run there) lists and scans the shards and writes the index to a temporary
folder; this process loads it. Errors come back as JSON and are raised here as the same class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from .index import DatasetIndex, IndexMismatchError, _index_here, listed
from .storage import StorageError
from .tarscan import TarFormatError

_ERRORS: dict[str, type[Exception]] = {
    c.__name__: c
    for c in (TarFormatError, IndexMismatchError, StorageError, FileNotFoundError, PermissionError, ValueError)
}


def index_in_subprocess(patterns: list[str], globbing: bool, concurrency: int, progress: bool) -> DatasetIndex:
    with tempfile.TemporaryDirectory(prefix="infobatch-index-") as tmp:
        job: dict[str, Any] = {
            "patterns": patterns,
            "globbing": globbing,
            "concurrency": concurrency,
            "progress": progress,
            "output": os.path.join(tmp, "index.json"),
            "error": os.path.join(tmp, "error.json"),
        }
        proc = subprocess.Popen([sys.executable, "-m", "infobatch_stream.remote_index"], stdin=subprocess.PIPE)
        try:
            proc.communicate(json.dumps(job).encode())
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            if os.path.exists(job["error"]):
                with open(job["error"]) as f:
                    err = json.load(f)
                raise _ERRORS.get(err["type"], StorageError)(err["message"])
            raise StorageError(f"indexing {patterns[0]} ... failed in its subprocess (exit {proc.returncode})")
        index = DatasetIndex.load(job["output"], allow_pipes=True)
        arrays = {name: np.array(index.array(name)) for name in index._arrays}  # the folder goes away
        return DatasetIndex(index.shards, arrays, index.suffixes, fingerprint=index.fingerprint)


def main() -> None:
    job: dict[str, Any] = json.load(sys.stdin)
    try:
        urls = listed(job["patterns"], job["globbing"])
        _index_here(urls, 1, job["progress"], job["concurrency"]).save(job["output"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        with open(job["error"], "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc)}, f)
        sys.exit(1)


if __name__ == "__main__":
    main()

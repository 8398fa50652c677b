"""A hang is a test failure, not a stuck CI run."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def deadline(seconds: int, what: str = "no answer") -> Iterator[None]:
    """Raise ``AssertionError`` in the main thread if the block runs longer than ``seconds``."""

    def on_alarm(*_: Any) -> None:
        raise AssertionError(f"still running after {seconds} s: {what}")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fails_instead_of_hanging(seconds: int = 5):  # type: ignore[no-untyped-def]
    """Corrupt input must end in an error; turn an endless loop into a test failure."""
    return deadline(seconds, "endless loop on corrupt input")

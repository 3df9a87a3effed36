"""The one capture seam between the port and the parity harness.

At every stage point the model calls ``x = tap("vision.patch_ln1", x)``. By default that returns
``x`` untouched (one global read, no copy). The harness installs a handler with ``tapping(fn)``:
a capture run records ``x`` and returns it; a teacher-forced run records ``x`` and returns the
reference's value instead, so the next stage sees the reference's input. Nothing else about
parity lives in ``rmlx/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
Handler = Callable[[str, Any], Any]

_handler: Handler | None = None


def tap(name: str, x: T) -> T:
    """Pass ``x`` through the active handler (if any) under the public stage name ``name``."""
    if _handler is None:
        return x
    return _handler(name, x)


@contextmanager
def tapping(handler: Handler) -> Iterator[None]:
    """Install ``handler`` for the duration of the block (restores the previous one after)."""
    global _handler
    previous, _handler = _handler, handler
    try:
        yield
    finally:
        _handler = previous

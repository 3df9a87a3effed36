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

# The per-layer capture points, in forward order (the public names are "layers.{i}.<point>").
LAYER_POINTS = ("input_layernorm", "attn.q", "attn.k", "attn.v", "attn.out", "mlp.out", "out")


def layer_stages(i: int) -> dict[str, str]:
    """The public stage names of decoder layer ``i``, built once per layer (the only place rmlx builds
    per-layer names; the family's stage table, ``parity/adapters/gemma4_unified/stages.py``, writes
    the same names, and ``tests/test_stages.py`` keeps them in step)."""
    return {point: f"layers.{i}.{point}" for point in LAYER_POINTS}


def active() -> bool:
    """Is a handler installed? (Lets a caller skip work that only a capture needs.)"""
    return _handler is not None


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

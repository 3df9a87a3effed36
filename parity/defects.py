"""Planted defects: real porting bugs, applied to the port from outside, the way a mutation tester works.

A family's adapter keeps its catalog (``Adapter.defects``). Each :class:`Defect` knows how to plant
itself: ``apply()`` returns a context manager that patches a function, a method or a module attribute
of the port for the duration of the block (:func:`patched`), and the candidate is loaded *inside* that
block, so defects that act at load time (the loader, the codec) take effect too. The port carries no
switch: the code users run is the code that is measured clean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

from parity.stages import matches_any
from rmlx.errors import InputError


@dataclass(frozen=True)
class Defect:
    name: str
    area: str  # where the bug lives: preprocessing, embedder, masks, rope, attention, ...
    imitates: str  # the real-world bug, in one line
    stage: str  # the public stage it must first hit (teacher-forced): a name or glob, possibly with the
    #             family's placeholders (resolved by ``Adapter.expected_stage``); "logits@decode.N" is a
    #             decode step; "load": the strict loader refuses the checkpoint, naming ``load_error``
    apply: Callable[[], AbstractContextManager]  # plants the defect for the duration of a block
    settings: tuple[tuple[str, object], ...] = ()  # run settings the defect needs to show, e.g. quantize
    load_error: str = ""


def patched(*targets: tuple[Any, str, Any]) -> AbstractContextManager:
    """Set each ``(owner, attribute, value)`` for the duration of the block (``unittest.mock.patch.object``)."""
    stack = ExitStack()
    for owner, attribute, value in targets:
        stack.enter_context(mock.patch.object(owner, attribute, value))
    return stack


def wrapped(owner: Any, attribute: str, wrapper: Callable[[Callable], Callable]) -> AbstractContextManager:
    """Replace ``owner.attribute`` by ``wrapper(original)`` for the duration of the block."""
    original = getattr(owner, attribute)
    if isinstance(owner.__dict__.get(attribute), staticmethod):
        return patched((owner, attribute, staticmethod(wrapper(original))))
    return patched((owner, attribute, wrapper(original)))


def check(catalog: Mapping[str, Defect], names: Iterable[str], origin: str = "inject") -> list[Defect]:
    """The named defects in catalog order; an unknown name is an ``InputError`` listing the known ones."""
    wanted = {n.strip() for n in names if n.strip()}
    unknown = sorted(wanted - catalog.keys())
    if unknown:
        raise InputError(f"{origin}: unknown defect(s) {unknown}; known: {sorted(catalog)}")
    return [d for n, d in catalog.items() if n in wanted]


@contextmanager
def planted(defects: Iterable[Defect]) -> Iterator[None]:
    """Plant every defect for the duration of the block."""
    with ExitStack() as stack:
        for d in defects:
            stack.enter_context(d.apply())
        yield


def matches(stage: str, expected: str) -> bool:
    """Is ``stage`` the stage a defect declares (a resolved ``Defect.stage``, possibly a glob)?"""
    return matches_any(stage, [expected])

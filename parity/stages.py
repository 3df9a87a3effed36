"""Stages in the core: the :class:`Stage` record, the one glob selector, decode-step names, and the
forward order of names across families. Each family declares its own stage table, every name written
literally, in its adapter package (``parity/adapters/<family>/stages.py``)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from rmlx.errors import InputError


@dataclass(frozen=True)
class Stage:
    name: str  # public name, e.g. "vision.patch_ln1", "layers.3.attn.q"
    tol: str  # tolerance class in parity.tolerances, e.g. "layernorm", "exact"
    hf: str  # where the reference reads it: a module path or processor key
    read: str  # how the reference reads it (output, input, kwarg:NAME, mask, rope, processor, result, ...)
    what: str = ""
    port: str = ""  # where the port taps it: "module:Qualified.name" (``rmlx-parity stages`` shows it)


def with_ports(stages: tuple[Stage, ...], ports: dict[str, str]) -> tuple[Stage, ...]:
    """``stages`` with ``port`` set from ``ports`` (keyed by stage name)."""
    return tuple(replace(s, port=ports.get(s.name, s.port)) for s in stages)


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern:
    """A selector glob as a regex over dotted names: ``*`` and ``?`` stay inside one dotted component,
    ``**`` spans any number of them, ``[...]`` is a character class (as ``fnmatch``)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            body = pattern[i + 1:j]
            body = body.replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def matches_any(name: str, patterns) -> bool:
    """The one selector of stages and cases (``--stages``, ``--case``, compare, gate, the pytest plugin):
    does ``name`` match any glob of ``patterns``? Globs match whole dotted components: ``layers.*.out``
    matches ``layers.12.out`` but not ``layers.0.attn.out``; ``layers.**.out`` matches both;
    ``layers.1?.attn.*`` matches layers 10-19; ``vision.*`` every vision stage. Case-sensitive."""
    return any(_glob(p).fullmatch(name) for p in patterns)


def select(patterns: list[str] | None, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """Stages whose name matches any glob in ``patterns`` (all when None), in forward order."""
    if not patterns:
        return stages
    picked = tuple(s for s in stages if matches_any(s.name, patterns))
    if not picked:
        raise InputError(f"--stages {' '.join(patterns)} matches no stage. "
                         "Note: run 'rmlx-parity stages' to list the stage names")
    return picked


def hook_points(stages: tuple[Stage, ...]) -> dict[str, tuple[str, str]]:
    """{stage name: (module path, read)} for the stages read through forward hooks."""
    return {s.name: (s.hf, s.read) for s in stages if s.read not in ("processor", "result", "quantized")}


def decode_stage(step: int) -> str:
    """The name reports give the logits of decode step ``step`` (1-based): after every prefill stage."""
    return f"logits@decode.{step}"


_DECODE_NAME = re.compile(r"logits@decode\.(0|[1-9][0-9]*)")


def order_key(name: str) -> tuple:
    """Sort key putting stage names in forward order: by the vocabulary of the registered family that
    knows the name (layer indices compare as numbers), then decode steps, then unknown names by name."""
    from parity.adapter import families

    d = _DECODE_NAME.fullmatch(name)
    if d is not None:
        return (1, int(d[1]))
    for fam in families().values():
        key = fam.order_key(name)
        if key is not None:
            return (0, *key)
    return (2, name)


def classify(name: str) -> Stage | None:
    """The stage a public name denotes in the first registered family that knows it (None: no family)."""
    from parity.adapter import families

    for fam in families().values():
        stage = fam.classify(name)
        if stage is not None:
            return stage
    return None

"""What a model family supplies to the harness, and the registry that finds it.

The core (pipeline, metrics, tolerances, compare, gate, selftest, reports, CLI, pytest plugin) knows
no model. A family enters as a :class:`Family`, registered under the ``model_type`` of its
checkpoints' ``config.json``: the packages of this repository and any other installed package
register theirs through the entry-point group ``rmlx.parity.families`` (``name = "module:FAMILY"``),
and a test or script may call :func:`register`.

A family gives, per checkpoint, an :class:`Adapter`: both sides loaded once, producing a
:data:`Capture` each for every case. The core runs the case (``parity.pipeline.CaseRun``, driven by
``parity.runner.run_case`` or by the family's layer-by-layer driver): it asks the adapter for the case's
stages and inputs, the reference's capture, the candidate's capture (teacher-forced when the mode says
so), the optional float64 oracle and the optional pictures of the HTML report, and compares them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from parity.defects import Defect
from parity.stages import Stage
from rmlx.errors import InputError

Capture = dict[str, np.ndarray]  # keyed by public stage name (and input.* for a case's inputs)
GROUP = "rmlx.parity.families"


@dataclass(frozen=True)
class Option:
    """A run setting a family adds to the core's (``Family.options``): a command-line flag of ``run``,
    ``gate`` and ``debug``, a value its adapter reads as ``settings.<name>``, a key of the record's
    ``settings`` and of dump metadata. ``keyed``: a baseline holds only for runs with the same value.
    ``candidate_of``: the candidate side's own value of another option (None: the same), so dumps
    record it as that option of the candidate side."""

    name: str
    default: object
    help: str
    type: Any = str
    choices: tuple | None = None
    keyed: bool = True
    candidate_of: str | None = None
    label: str = ""  # how reports name it (default: its name)
    headline: bool = False  # shown in the first line of a run's report

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str | None) -> object:
        """A value as dump metadata states it (text) in this option's type; unparsable text as it is."""
        try:
            return None if text is None else self.type(text)
        except (TypeError, ValueError):
            return text


@dataclass(frozen=True)
class Scenario:
    """A prompt. ``parts``: ("text", (ids...)), ("image", Path) or ("audio", n_frames), in prompt order;
    a family may define other kinds (its adapter reads them)."""

    name: str
    parts: tuple[tuple[str, object], ...]

    @property
    def images(self) -> list[Path]:
        return [p for kind, p in self.parts if kind == "image"]

    @property
    def has_audio(self) -> bool:
        return any(kind == "audio" for kind, _ in self.parts)


@runtime_checkable
class Adapter(Protocol):
    """One checkpoint of a family, both sides loaded. ``settings`` is ``parity.runner.Settings``."""

    model_dir: Path
    candidate_model: Any  # the port's loaded model; the self-test swaps it for one loaded under a defect

    def load_candidate(self) -> Any:
        """The port's model of this checkpoint, loaded afresh (defects planted now act at load time)."""

    def supports(self, scenario: Scenario) -> bool: ...

    def stages(self, scenario: Scenario) -> tuple[Stage, ...]:
        """The case's stages in forward order (every name as the family's stage table spells it)."""

    def inputs(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings: Any
               ) -> tuple[Capture, dict[str, np.ndarray]]:
        """(the case's ``input.*`` arrays, the reference's own preprocessing for :meth:`reference`)."""

    def reference(self, scenario: Scenario, inputs: Capture, pre: dict[str, np.ndarray], settings: Any,
                  decode_steps: int, unquantized: bool = False) -> tuple:
        """(capture, each decode step's logits, the greedy tokens, self-consistency or None[, extras]).
        ``extras``, optional: a dict of what the reference computed beside its stages that only this
        family's :meth:`viz` reads (the core passes it through untouched)."""

    def candidate(self, scenario: Scenario, inputs: Capture, decoded: dict[Path, np.ndarray], settings: Any,
                  tokens: list[int], teacher: Capture | None = None) -> tuple[Capture, list[np.ndarray]]:
        """(capture, each decode step's logits). ``teacher``: the reference's capture to feed from."""

    def oracle(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings: Any) -> Capture:
        """Float64 values of the stages the family has an oracle for ({} when none)."""

    # Optional: ``viz(ref, cand, extras, inputs, settings, stage_names) -> dict``, the case's pictures in the
    # HTML report, built with ``parity.report.viz``'s generic builders (``patch_error``, ``masks``,
    # ``stage_groups``) from the captures, the reference's ``extras``, the case's inputs and settings, and
    # the names of its compared stages. An adapter without one gets the core's: the per-position KL and
    # max |reference| per stage.


class Family(Protocol):
    """A model family: its checkpoints, stage vocabulary, scenarios and defect catalog."""

    model_type: str
    defects: Mapping[str, Defect]
    selftest_settings: Mapping[str, object]  # run settings of the self-test cases (e.g. a small image budget)
    options: tuple[Option, ...]  # the family's own run settings (flags), beside the core's

    def check_settings(self, settings: Any) -> None:
        """Refuse settings this family cannot run (an ``InputError`` naming the value)."""

    def load(self, model_dir: Path, settings: Any) -> Adapter:
        """Both sides of one checkpoint (strict: a bad checkpoint is an ``InputError`` naming the problem)."""

    def load_streamed(self, model_dir: Path, settings: Any) -> Adapter:
        """The layer-by-layer driver's adapter (an ``InputError`` if the family has none)."""

    def run_streamed(self, adapter: Adapter, model: Path, scenario: Scenario, decoded: dict, settings: Any,
                     keep_captures: bool = False):
        """One case, layer by layer; ``keep_captures``: the result's ``reference``/``candidate`` are
        ``parity.dumps.Spool`` files of the selected stages (``--dump``), never held in memory."""

    def scenarios(self, images: list[Path], fixture_images: Path | None) -> list[Scenario]:
        """One case per image, plus the family's special cases (on the fixture battery)."""

    def selftest_scenarios(self, fixture_images: Path) -> list[Scenario]: ...

    def supports(self, model_dir: Path, scenario: Scenario) -> bool:
        """Can this checkpoint run the scenario (read from its config, nothing loaded)?"""

    def stage_table(self, model_dir: Path) -> tuple[Stage, ...]:
        """Every stage this checkpoint can produce, in forward order (``rmlx-parity stages``)."""

    def classify(self, name: str) -> Stage | None:
        """The stage a public name denotes, from the name alone (dumps of other ports); None: not ours."""

    def order_key(self, name: str) -> tuple | None:
        """A sort key putting this family's names in forward order; None: not in its vocabulary."""

    def expected_stage(self, defect: Defect, adapter: Adapter, scenario: Scenario) -> str:
        """``defect.stage`` resolved for one case (a name or a glob)."""

    def convert(self, src: Path, dst: Path, quantize: str, keep: list[str]) -> dict[str, str]:
        """``rmlx-parity convert``: write ``src`` quantized to the new folder ``dst``, ``keep`` left in full
        precision; returns each quantizable module's status. An ``InputError`` if the family has none."""


_REGISTERED: dict[str, Family] = {}
_LOADED = False


def register(family: Family) -> Family:
    """Add (or replace) the family of ``family.model_type``."""
    _REGISTERED[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    _REGISTERED.pop(model_type, None)


def families() -> dict[str, Family]:
    """Every registered family, entry points loaded on first use."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for ep in entry_points(group=GROUP):
            if ep.name not in _REGISTERED:
                _REGISTERED[ep.name] = ep.load()
    return dict(_REGISTERED)


def options() -> dict[str, Option]:
    """Every registered family's options by name; two families may share an option only if they declare
    it alike (one flag, one meaning)."""
    out: dict[str, Option] = {}
    for kind, fam in families().items():
        for opt in getattr(fam, "options", ()):
            if out.setdefault(opt.name, opt) != opt:
                raise RuntimeError(f"option '{opt.name}' of family '{kind}' differs from another family's")
    return out


def option_facts(settings: Mapping[str, object], headline: bool = False, sided: bool | None = None) -> list[str]:
    """``label value`` of each family option a record's settings state (None left out; an option that is
    the candidate's own value of another shown only where the two differ); ``headline``: only those
    declared for a report's first line; ``sided``: only the candidate's own values (True) or only the
    others (False)."""
    out = []
    for name, opt in options().items():
        value = settings.get(name)
        if value is None or (headline and not opt.headline):
            continue
        if sided is not None and sided != (opt.candidate_of is not None):
            continue
        if opt.candidate_of is not None and value == settings.get(opt.candidate_of):
            continue
        out.append(f"{opt.label or name} {value}")
    return out


def model_type(model_dir: Path) -> str:
    """``model_type`` of a checkpoint's ``config.json`` (an ``InputError`` names a missing or bad file)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{model_dir}: not a checkpoint directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{path}: no 'model_type' string")
    return config["model_type"]


def family_of(model_dir: Path) -> Family:
    """The registered family of a checkpoint directory, by its ``model_type``."""
    kind = model_type(model_dir)
    known = families()
    if kind not in known:
        raise InputError(f"{model_dir}: model_type '{kind}' has no registered adapter; known: {sorted(known)}. "
                         f"Note: a package adds one through the entry-point group '{GROUP}'")
    return known[kind]


def config_of(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def defect_catalog(kinds: list[str] | None = None) -> dict[str, Defect]:
    """Every registered family's defects by name (of the families ``kinds`` only, when given)."""
    out: dict[str, Defect] = {}
    for kind, fam in families().items():
        if kinds is None or kind in kinds:
            out.update(fam.defects)
    return out

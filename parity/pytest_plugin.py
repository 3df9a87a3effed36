"""pytest plugin (entry point ``pytest11: rmlx``): the embedded default as fixtures, and ``assert_parity``.

Loaded by every pytest run in an environment where rmlx is installed, so importing it is cheap: no
torch, transformers or mlx (parity.stages, parity.tolerances and parity.metrics are imported on
first use). Fixtures:

- ``rmlx_fixtures_dir`` -- the embedded default: ``$RMLX_FIXTURES`` or the installed ``rmlx_fixtures``
  (the repository's ``fixtures/``).
- ``rmlx_models`` / ``rmlx_battery`` -- every fixture checkpoint directory / battery PNG, sorted.
- ``rmlx_model`` / ``rmlx_image`` -- one of them: a test (or a fixture it uses) that asks for one of
  these names is parametrized over every fixture model / battery image (ids: directory name / image
  stem; ``rmlx_model`` at session scope, so a session fixture built on it loads each model once;
  ``rmlx_image`` at module scope). Opt-in by name: the parametrization happens at collection, only
  where the name is requested; a test that parametrizes the name itself
  (``@pytest.mark.parametrize("rmlx_model", [...])``) or a conftest fixture of the same name wins.

``assert_parity(candidate, reference)`` compares two captures (stage name -> array) with the named
tolerances of ``parity.tolerances`` and raises an ``AssertionError`` that leads with the first
divergent stage in forward order, then torch ``assert_close``'s mismatch block for it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from parity.metrics import StageDiff, Tol

INPUT_PREFIX = "input."  # a dump's case inputs (input.input_ids, ...): not stages
_MODES = ("free", "teacher")
_DTYPES = ("float32", "bfloat16", "float16", "float64")  # the ULP units parity.metrics knows
_GLOB = re.compile(r"[*?\[]")
_LISTED = 5  # failing stage names on the first line before "..."
_SUMMARY = 20  # lines of the failed-stage summary before "... and N more"


# ----------------------------------------------------------------------------------------------- fixtures


def _fixtures_dir() -> Path:
    from parity.cli import fixtures_dir  # stdlib-only module

    return fixtures_dir()


def _models() -> list[Path]:
    from parity.cli import default_models

    return default_models()


def _battery() -> list[Path]:
    from parity.cli import default_images

    return default_images()


def _require(paths: list[Path], what: str) -> list[Path]:
    if not paths:
        pytest.fail(f"no fixture {what} under {_fixtures_dir()}. Note: set RMLX_FIXTURES to a fixtures folder, "
                    "or run 'rmlx-parity fixtures' to generate it", pytrace=False)
    return paths


@pytest.fixture(scope="session")
def rmlx_fixtures_dir() -> Path:
    """The embedded default: ``$RMLX_FIXTURES`` or the installed ``rmlx_fixtures`` (must exist)."""
    path = _fixtures_dir()
    if not path.is_dir():
        pytest.fail(f"rmlx fixtures folder {path} does not exist. Note: set RMLX_FIXTURES to a fixtures folder, "
                    "or run 'rmlx-parity fixtures' to generate it", pytrace=False)
    return path


@pytest.fixture(scope="session")
def rmlx_models(rmlx_fixtures_dir: Path) -> list[Path]:
    """Every fixture checkpoint directory (``config.json`` + safetensors), sorted by name."""
    return _require(_models(), "models")


@pytest.fixture(scope="session")
def rmlx_battery(rmlx_fixtures_dir: Path) -> list[Path]:
    """Every battery image (PNG) of the embedded default, sorted by name."""
    return _require(_battery(), "images")


def _not_parametrized(name: str):
    pytest.fail(f"'{name}' is parametrized at collection: request it as a test or fixture argument, "
                f"not through request.getfixturevalue('{name}')", pytrace=False)


@pytest.fixture(scope="session")
def rmlx_model() -> Path:
    """One fixture checkpoint directory: a test asking for it runs once per fixture model (ids: names)."""
    _not_parametrized("rmlx_model")


@pytest.fixture(scope="module")
def rmlx_image() -> Path:
    """One battery image: a test asking for it runs once per battery PNG (ids: image stems)."""
    _not_parametrized("rmlx_image")


# Models are session-scoped (loading one is what costs); images module-scoped: with both at session scope,
# pytest's reordering alternates the models (a session fixture per model would be rebuilt per image).
_PARAMETRIZED = {"rmlx_model": (_models, lambda p: p.name, "models", "session"),
                 "rmlx_image": (_battery, lambda p: p.stem, "images", "module")}


def _own_parametrize(metafunc, name: str) -> bool:
    """True when the test parametrizes ``name`` itself, or a conftest overrides the fixture."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    defs = getattr(metafunc, "_arg2fixturedefs", {}).get(name)  # pytest's own hook reads it the same way
    return bool(defs) and getattr(getattr(defs[-1], "func", None), "__module__", __name__) != __name__


def pytest_generate_tests(metafunc) -> None:
    for name, (source, ident, what, scope) in _PARAMETRIZED.items():
        if name not in metafunc.fixturenames or _own_parametrize(metafunc, name):
            continue
        paths = source()
        if not paths:
            pytest.fail(f"{metafunc.definition.nodeid} asks for '{name}' but there are no fixture {what} under "
                        f"{_fixtures_dir()}. Note: set RMLX_FIXTURES to a fixtures folder", pytrace=False)
        metafunc.parametrize(name, paths, ids=[ident(p) for p in paths], scope=scope)


# ----------------------------------------------------------------------------------------- assert_parity


def _to_numpy(x: Any, name: str, side: str):
    import numpy as np

    module = type(x).__module__
    if module.startswith("torch") and hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bf16: exact in fp32; dtype= says how to count ULPs
            x = x.float()
        return x.numpy()
    if module.startswith("mlx") and str(getattr(x, "dtype", "")) == "mlx.core.bfloat16":
        x = x.astype(sys.modules["mlx.core"].float32)
    try:
        return np.asarray(x)
    except Exception as e:
        raise TypeError(f"{side} stage '{name}': cannot convert {type(x).__qualname__} to a NumPy array: {e}") from e


def _capture(obj: Any, side: str) -> Mapping[str, Any]:
    if isinstance(obj, (str, os.PathLike)):
        from parity import dumps

        path = Path(obj)
        if not path.is_file():
            raise ValueError(f"{side}: no such capture file {path}")
        return dumps.read(path)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{side} must be a mapping of stage name -> array (or a .safetensors dump path), "
                        f"got {type(obj).__qualname__}")
    return obj


def _as_tol(value: Any, key: str) -> Tol:
    from parity.metrics import Tol

    if isinstance(value, Tol):
        return value
    if isinstance(value, Mapping) and set(value) == {"rtol", "atol"}:
        return Tol(rtol=float(value["rtol"]), atol=float(value["atol"]))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Tol(rtol=float(value[0]), atol=float(value[1]))
    raise ValueError(f"tolerances['{key}'] must be (rtol, atol), {{'rtol': ..., 'atol': ...}} or a Tol "
                     f"(both required, as torch.testing.assert_close does), got {value!r}")


def _explicit_tol(name: str, overrides: dict[str, Tol]) -> Tol | None:
    from parity.stages import matches_any

    if name in overrides:
        return overrides[name]
    return next((t for k, t in overrides.items() if _GLOB.search(k) and matches_any(name, [k])), None)


def _select(patterns: list[str] | None, candidate: Mapping, reference: Mapping) -> list[str]:
    """Names to compare, before ordering: every non-input name on either side (None), or the names and
    glob matches of ``patterns`` (an exact name is kept even when missing: it then fails as missing)."""
    from parity.stages import matches_any

    keys = list(dict.fromkeys([*reference, *candidate]))
    if patterns is None:
        return [k for k in keys if not k.startswith(INPUT_PREFIX)]
    names: list[str] = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"stages must be names or globs, got {p!r}")
        if _GLOB.search(p):
            hits = [k for k in keys if matches_any(k, [p])]
            if not hits:
                raise ValueError(f"stages pattern '{p}' matches no stage of either capture. "
                                 "Note: run 'rmlx-parity stages' to list the stage names")
            names += hits
        else:
            names.append(p)
    return list(dict.fromkeys(names))


def _plan(names: list[str], dtype: str, mode: str, overrides: dict[str, Tol]) -> list[tuple[str, Tol]]:
    """(name, tolerance) in forward order: the stage table's names first, by the table; names it does not
    know after them, in the order given. An explicit tolerance overrides the class's."""
    from parity.stages import classify, order_key
    from parity.tolerances import EXACT, tolerance

    known, unknown, untolerated = [], [], []
    for name in names:
        tol = _explicit_tol(name, overrides)
        if name.startswith(INPUT_PREFIX):
            unknown.append((name, tol or EXACT))
            continue
        stage = classify(name)
        if stage is None:
            if tol is None:
                untolerated.append(name)
            unknown.append((name, tol))
        else:
            known.append((order_key(name), name, tol or tolerance(stage.tol, dtype, mode)))
    if untolerated:
        example = ", ".join(f"'{n}': (rtol, atol)" for n in untolerated[:2])
        raise ValueError(f"no tolerance class for stage(s) {untolerated}: the stage table does not know them. "
                         f"Pass tolerances={{{example}}}. Note: run 'rmlx-parity stages' to list the stage names")
    return [(n, t) for _, n, t in sorted(known, key=lambda k: k[0])] + unknown


def _brief(d: StageDiff) -> str:
    if d.error:
        return d.error
    t = d.tolerance
    return (f"{d.mismatched} / {d.numel} mismatched, max abs {d.max_abs:.3g} (atol {t.atol:g}), "
            f"max rel {d.max_rel:.3g} (rtol {t.rtol:g})")


def parity_message(diffs: list[StageDiff], candidate: Mapping, reference: Mapping, mode: str) -> str | None:
    """The failure message of ``assert_parity`` (None when every stage passed)."""
    from parity.metrics import first_divergence

    first = first_divergence(diffs)
    if first is None:
        return None
    failed = [d for d in diffs if not d.passed]
    names = ", ".join(d.stage for d in failed[:_LISTED]) + (", ..." if len(failed) > _LISTED else "")
    stage_word = "stage" if len(diffs) == 1 else "stages"
    lines = [f"First divergent stage: '{first.stage}' ({len(failed)} of {len(diffs)} {stage_word} failed: {names})",
             "", first.message()]
    compared = {d.stage for d in diffs}
    missing = sorted(n for n in compared if n not in candidate)
    absent = sorted(n for n in compared if n not in reference)
    if missing or absent:
        lines += ["", f"Missing in candidate: {missing}; missing in reference: {absent}"]
    if len(failed) > 1:
        width = max(len(d.stage) for d in failed[:_SUMMARY])
        lines += ["", "Failed stages, in forward order:"]
        lines += [f"  {d.stage:<{width}}  {_brief(d)}" for d in failed[:_SUMMARY]]
        if len(failed) > _SUMMARY:
            lines.append(f"  ... and {len(failed) - _SUMMARY} more")
        if mode == "free":
            lines += ["", "Note: free-running errors accumulate downstream; compare a teacher-forced capture "
                          "with mode='teacher' to isolate each stage's own error"]
    return "\n".join(lines)


def assert_parity(candidate: Mapping[str, Any] | str | os.PathLike, reference: Mapping[str, Any] | str | os.PathLike,
                  stages: str | Iterable[str] | None = None, *, dtype: str = "float32", mode: str = "free",
                  tolerances: Mapping[str, Any] | None = None) -> list[StageDiff]:
    """Assert that every stage of ``candidate`` is close to ``reference``; return the per-stage diffs.

    ``candidate`` / ``reference``: captures, stage name -> array (NumPy, or anything ``np.asarray``
    takes: mlx arrays, torch tensors), or the path of a ``--dump`` ``.safetensors`` file.
    ``stages``: None = every stage on either side except the case inputs (``input.*``); else names or
    globs (``"layers.*.attn.q"``). An ``input.*`` key is compared (exactly) only when named. A stage
    missing on either side fails. Known stages are compared in the stage table's forward order, names
    the table does not know after them, in the order given.
    ``dtype`` / ``mode``: pick the named tolerance of each stage's class (``parity.tolerances``);
    ``dtype`` is also the unit of the ULP distance. ``tolerances``: ``{name or glob: (rtol, atol)}``,
    overriding the class tolerance; required for every stage the table does not know.

    Raises ``AssertionError`` (a mismatch) whose first line names the first divergent stage, then
    torch ``assert_close``'s block for it; ``ValueError`` / ``TypeError`` for misuse.
    """
    __tracebackhide__ = True
    from parity.metrics import compare_all

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    cand, ref = _capture(candidate, "candidate"), _capture(reference, "reference")
    patterns = [stages] if isinstance(stages, str) else (None if stages is None else list(stages))
    overrides = {str(k): _as_tol(v, str(k)) for k, v in (tolerances or {}).items()}
    plan = _plan(_select(patterns, cand, ref), dtype, mode, overrides)
    if not plan:
        raise ValueError("nothing to compare: both captures are empty (or hold only input.* keys)")
    wanted = {n for n, _ in plan}
    cand_np = {k: _to_numpy(v, k, "candidate") for k, v in cand.items() if k in wanted}
    ref_np = {k: _to_numpy(v, k, "reference") for k, v in ref.items() if k in wanted}
    diffs = compare_all(cand_np, ref_np, plan, dtype)
    msg = parity_message(diffs, cand_np, ref_np, mode)
    if msg is not None:
        raise AssertionError(msg)
    return diffs

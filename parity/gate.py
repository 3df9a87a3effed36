"""Baselines and regression gates: hold every stage's error at most a little above its recorded value.

A baseline is a JSON file (schema ``rmlx.baseline/1``) of per-case, per-stage errors (``max_abs``) and
per-decode-step logits errors of one run, with that run's settings. ``rmlx-parity gate --baseline FILE``
runs the same cases and fails when any error grows past

    allowed = baseline * ratio + floor        (defaults: ratio 2.0, floor 1e-5)

-- the ratio absorbs the rounding noise between two runs of the same code on stages with real error; the
floor (torch.testing's fp32/bf16 ``atol``) keeps exact and near-zero stages from failing on a single ulp.
A baseline recorded on another machine -- another processor model or vector extension (MKL, oneDNN and
torch pick their kernels by it), core count, BLAS or numeric package -- rounds differently in its last
bits, so against it the ratio is ``cross_ratio`` (default 8; docs/reports.md has the measurement), and the
result says which machine recorded the baseline. The gate also fails when the run fails parity.
``--update-baseline`` is the only way to write one (atomically), and only from a run that passes.
"""

from __future__ import annotations

import math
from pathlib import Path

from parity.metrics import _json_float, fmt
from parity.stages import decode_stage, order_key
from rmlx.errors import InputError
from rmlx.files import finite_number, one_line, read_json, short, track

SCHEMA = "rmlx.baseline/1"
DEFAULT_RATIO = 2.0
DEFAULT_FLOOR = 1e-5
DEFAULT_CROSS_RATIO = 8.0
# what makes two runs of the same code round alike: the record's versions entries (parity.provenance)
MACHINE = ("cpu", "blas", "torch", "mlx", "numpy", "transformers")
# Settings that change what is measured: a baseline recorded under others cannot gate this run.
CORE_KEYED = ("mode", "dtype", "attn_implementation", "decode_steps", "quantize")


def keyed() -> tuple[str, ...]:
    """The core's keyed settings and every registered family's options declared ``keyed``."""
    from parity.adapter import options

    return CORE_KEYED + tuple(name for name, opt in options().items() if opt.keyed)


def from_record(rec: dict) -> dict:
    """The baseline of a (passing) run record."""
    cases = {}
    for c in rec["cases"]:
        entry = {"stages": {s["name"]: s["max_abs"] for s in c["stages"]},
                 "decode": {str(d["step"]): d["max_abs"] for d in c["decode"]}}
        if c.get("quantization_cost") and c["quantization_cost"].get("logits"):
            entry["quantization_kl_max"] = c["quantization_cost"]["logits"]["kl_max"]
        cases[c["name"]] = entry
    return {"schema": SCHEMA, "created": rec["created"], "recorded_from": rec["run_id"],
            "command": rec["command"], "versions": rec["versions"],
            "settings": {k: rec["settings"][k] for k in keyed()}, "cases": cases}


RECORD_SCHEMA = "rmlx.parity/2"  # parity.runner.SCHEMA (not imported: this module stays free of the runner)


def load_record(path: Path) -> dict:
    """Read and validate a run record (``run --json``, a report folder's report.json) for ``gate
    --record`` and ``report``: every problem is an ``InputError`` naming the file and the key.

    What the gate reads is checked here field by field; what the reports read is checked by rendering
    them once (:func:`_renders`), so the check is always the one the renderers need."""
    data = read_json(path, "record", RECORD_SCHEMA,
                     " (a run record: 'rmlx-parity run --json FILE' or a report folder's report.json)")
    for key, kind in (("settings", dict), ("cases", list), ("versions", dict), ("passed", bool)):
        if not isinstance(data.get(key), kind):
            raise InputError(f"record {path}: missing or malformed '{key}' (expected a JSON {kind.__name__})")
    _check_keyed(data["settings"], f"record {path}")
    for i, case in enumerate(data["cases"]):
        if not (isinstance(case, dict) and isinstance(case.get("name"), str) and isinstance(case.get("stages"), list)
                and isinstance(case.get("decode", []), list)):
            raise InputError(f"record {path}: cases[{i}] is malformed (needs 'name', 'stages' and 'decode' lists)")
        for j, st in enumerate(case["stages"]):
            if not (isinstance(st, dict) and isinstance(st.get("name"), str) and "max_abs" in st
                    and isinstance(st.get("passed"), bool)):
                raise InputError(f"record {path}: cases[{i}] ({_short(case['name'])}) stages[{j}] is malformed "
                                 "(needs 'name', 'max_abs' and 'passed')")
            _error_value(st["max_abs"], path, f"cases[{i}].stages[{j}].max_abs")
        for j, d in enumerate(case.get("decode", [])):
            if not (isinstance(d, dict) and isinstance(d.get("step"), int) and not isinstance(d["step"], bool)
                    and "max_abs" in d):
                raise InputError(f"record {path}: cases[{i}].decode[{j}] is malformed (needs 'step' and 'max_abs')")
            _error_value(d["max_abs"], path, f"cases[{i}].decode[{j}].max_abs")
        cost = case.get("quantization_cost")
        if cost is not None and not (isinstance(cost, dict) and isinstance(cost.get("logits") or {}, dict)):
            raise InputError(f"record {path}: cases[{i}].quantization_cost is malformed (expected an object with "
                             "an object 'logits')")
        if cost and cost.get("logits") and "kl_max" in cost["logits"]:
            _error_value(cost["logits"]["kl_max"], path, f"cases[{i}].quantization_cost.logits.kl_max")
    _bounded_pictures(data, path)
    _renders(data, path)
    return data


MAX_PICTURE = 1 << 24  # elements of one packed array of a record's pictures (a 4096 x 4096 mask)
_WIDTH = {"float16": 2, "float32": 4, "int16": 2}  # bytes per element of parity.report.viz.ARRAY_DTYPES


def _bounded_pictures(rec: dict, path: Path) -> None:
    """The packed arrays behind the HTML report's pictures (``parity.report.viz``: ``{"shape", "b64"}``,
    with ``"dtype"`` for numbers, zlib-packed bits without) hold as many bytes as their shapes say, and
    at most ``MAX_PICTURE`` elements; a prompt's ``token_types`` runs add up to at most as many tokens.
    A record's shapes size the renderer's arrays: a shape the bytes do not back would be a memory bomb."""
    import base64
    import binascii
    import zlib

    def walk(v, at: str, depth: int = 0) -> None:
        if depth > 32:
            return
        if isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{at}[{i}]", depth + 1)
            return
        if not isinstance(v, dict):
            return
        if "b64" in v:
            _packed(v, at)
        if at.endswith(".patch_error") and isinstance(v.get("positions"), dict) and "b64" in v["positions"]:
            _grid(v["positions"], f"{at}.positions")
        tokens = v.get("token_types")
        if tokens is not None and not (isinstance(tokens, list) and all(
                isinstance(t, list) and len(t) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                            for x in t) for t in tokens)
                and sum(c for _, c in tokens) <= MAX_PICTURE):
            raise InputError(f"record {path}: '{one_line(at)}.token_types' must be [[type, count], ...] of at most "
                             f"{MAX_PICTURE} tokens")
        for k, x in v.items():
            walk(x, f"{at}.{k}" if at else str(k), depth + 1)

    def _packed(v: dict, at: str) -> None:
        shape = v.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape) and isinstance(v["b64"], str)):
            raise InputError(f"record {path}: '{one_line(at)}' is not a packed array (a 'shape' of sizes, a "
                             "'b64' string)")
        n = math.prod(shape)
        if n > MAX_PICTURE:
            raise InputError(f"record {path}: '{one_line(at)}' has shape {_short(shape)}: more than {MAX_PICTURE} "
                             "elements")
        try:
            raw = base64.b64decode(v["b64"], validate=True)
            if "dtype" in v:
                width = _WIDTH.get(v["dtype"]) if isinstance(v["dtype"], str) else None
                ok = width is not None and len(raw) == n * width
            else:  # packed bits: inflate no more than the shape needs, plus one byte to see a longer stream
                inflate = zlib.decompressobj()
                ok = len(inflate.decompress(raw, (n + 7) // 8 + 1)) == (n + 7) // 8 and inflate.eof
        except (binascii.Error, ValueError, zlib.error):
            ok = False
        if not ok:
            raise InputError(f"record {path}: '{one_line(at)}' does not hold the {n} elements of its shape "
                             f"{_short(shape)}")

    def _grid(positions: dict, at: str) -> None:
        """The (x, y) of each patch (``patch_error.positions``): the picture spans the largest of them."""
        import numpy as np

        _packed(positions, at)
        if positions.get("dtype") not in _WIDTH:
            return  # not a numeric array: the renderer says so
        xy = np.frombuffer(base64.b64decode(positions["b64"]), dtype=np.dtype(positions["dtype"]).newbyteorder("<"))
        if xy.size and (float(np.nanmax(np.abs(xy))) + 1) ** 2 > MAX_PICTURE:
            raise InputError(f"record {path}: '{one_line(at)}' places a patch at {float(np.nanmax(np.abs(xy))):g}: "
                             f"a patch grid of more than {MAX_PICTURE} cells")

    walk(rec, "")


def _error_value(v, path: Path, key: str) -> None:
    """A record's error number: a JSON number, "inf" / "-inf", or null (NaN), as the runner writes it."""
    if not (v is None or v in ("inf", "-inf") or finite_number(v) or isinstance(v, float)):
        raise InputError(f"record {path}: '{key}' is {_short(v)}; expected a number, \"inf\" or null")


_RENDER_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError)


def _renders(rec: dict, path: Path) -> None:
    """Render every report of ``rec`` once (nothing written): a value of the wrong type anywhere the
    reports read is an ``InputError`` naming the key read last before the renderer failed."""
    from parity import report
    from parity.report import html, junit

    last = ["the top level"]
    tracked = track(rec, last)
    try:
        if "compare" in tracked:
            from parity import compare

            compare.report_files(tracked)
            compare.to_terminal(tracked)
        else:
            report.to_markdown(tracked)
            html.to_html(tracked)
            junit.to_junit(tracked)
            report.to_terminal(tracked)
        if "gate" in tracked:
            summary(tracked["gate"])
    except _RENDER_ERRORS as e:
        text = one_line(" ".join(str(e).split()), 160)
        raise InputError(f"record {path}: malformed value at '{one_line(last[0], 200)}' ({type(e).__name__}: "
                         f"{text}); the reports cannot be rendered from it") from None


def _check_keyed(settings: dict, source: str) -> None:
    """A record's or baseline's ``settings`` hold every keyed setting (:func:`keyed`), each a string, a
    number or null: what :func:`check_settings` compares."""
    missing = [k for k in keyed() if k not in settings]
    if missing:
        raise InputError(f"{source}: settings lack {missing}")
    bad = next((k for k in keyed() if isinstance(settings[k], dict | list)), None)
    if bad is not None:
        raise InputError(f"{source}: settings '{bad}' is {_short(settings[bad])}; expected a string, a number "
                         "or null")


def _short(v) -> str:
    """A value quoted in a message (:func:`rmlx.files.short`, 80 characters)."""
    return short(v, 80)


# the largest error a baseline may hold: far above any float32 / bfloat16 difference (< 7e38), and far enough
# below float64's limit that the allowance, baseline * ratio + floor, stays finite (for a ratio below 1e8)
MAX_ERROR = 1e300


def load(path: Path) -> dict:
    """Read and validate a baseline; every problem is an ``InputError`` naming the file and the key."""
    if not path.is_file():
        raise InputError(f"baseline {path}: not found; record one with "
                         "'rmlx-parity gate --baseline FILE --update-baseline' (same options as the run)")
    data = read_json(path, "baseline", SCHEMA)
    for key in ("settings", "cases"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"baseline {path}: missing or malformed '{key}'")
    _check_keyed(data["settings"], f"baseline {path}")
    for case, entry in data["cases"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("stages"), dict):
            raise InputError(f"baseline {path}: case {_short(case)} has no 'stages' table")
        if not isinstance(entry.get("decode", {}), dict):
            raise InputError(f"baseline {path}: case {_short(case)} has a malformed 'decode' table "
                             "(expected an object)")
        values = [("stage", n, v) for n, v in entry["stages"].items()]
        values += [("decode step", n, v) for n, v in entry.get("decode", {}).items()]
        if "quantization_kl_max" in entry:
            values.append(("value", "quantization_kl_max", entry["quantization_kl_max"]))
        for what, name, v in values:
            if not finite_number(v) or not 0 <= v <= MAX_ERROR:
                raise InputError(f"baseline {path}: case {_short(case)} {what} {_short(name)} has value {_short(v)}; "
                                 f"expected an error in [0, {MAX_ERROR:g}]")
    return data


def check_drift(ratio: float, floor: float, cross_ratio: float = DEFAULT_CROSS_RATIO) -> None:
    # bounded: a baseline error (at most MAX_ERROR) times the ratio plus the floor stays finite
    if not all(math.isfinite(v) and 1 <= v <= 1e6 for v in (ratio, cross_ratio)) or not (
            math.isfinite(floor) and 0 <= floor <= 1e6):
        raise InputError(f"--drift-ratio and --cross-machine-ratio must be finite, in [1, 1e6], and --drift-floor "
                         f"finite, in [0, 1e6]; got ratio {ratio}, cross-machine ratio {cross_ratio}, floor {floor}")


def other_machine(rec: dict, baseline: dict) -> dict[str, list]:
    """What differs between the machine that recorded the baseline and the run's (:data:`MACHINE`
    entries of their versions, ``[baseline's, run's]``; a baseline that does not say is another machine)."""
    def entries(versions) -> dict[str, str | None]:  # a file's value that is not a string, quoted: no nesting
        versions = versions if isinstance(versions, dict) else {}
        return {k: v if v is None or isinstance(v, str) else _short(v) for k in MACHINE for v in [versions.get(k)]}

    run, base = entries(rec.get("versions")), entries(baseline.get("versions"))
    return {k: [base[k], run[k]] for k in MACHINE if base[k] != run[k] or base[k] is None}


def check_settings(settings: dict, baseline: dict, source: str = "baseline") -> None:
    """A baseline recorded under other settings cannot gate this run (``InputError``, before any work)."""
    diff = {k: (baseline["settings"][k], settings[k]) for k in keyed() if baseline["settings"][k] != settings[k]}
    if diff:
        shown = ", ".join(f"{k}: baseline {_short(a)}, run {_short(b)}" for k, (a, b) in diff.items())
        raise InputError(f"{source}: recorded with other settings ({shown}); run with the baseline's settings "
                         "or record a new one with --update-baseline")


def check(rec: dict, baseline: dict, ratio: float = DEFAULT_RATIO, floor: float = DEFAULT_FLOOR,
          source: str = "baseline", cross_ratio: float = DEFAULT_CROSS_RATIO) -> dict:
    """Compare a run record with a baseline. Returns the gate result (also stored in the record as
    ``rec["gate"]``): ``passed``, every regression in forward order, the closest calls, the ratio used
    (``cross_ratio`` if larger when the baseline comes from another machine, which ``machine`` names).

    A setting that differs, or a case / stage of the run the baseline does not have, is an
    ``InputError`` (the baseline does not describe this run). A stage or decode step the baseline has
    but the run lacks is a regression ("missing"), unless the run selected stages (``--stages``); so is
    one the run could not measure ("failed": the candidate raised, a shape mismatch, non-finite values).
    Baseline cases the run skipped (``--case``) are counted, not failed. A NaN error is a regression."""
    check_drift(ratio, floor, cross_ratio)
    check_settings(rec["settings"], baseline, source)
    differs = other_machine(rec, baseline)
    own_ratio, ratio = ratio, max(ratio, cross_ratio) if differs else ratio
    uncovered = []
    for c in rec["cases"]:
        b = baseline["cases"].get(c["name"])
        if b is None:
            uncovered.append(c["name"])
            continue
        uncovered += [f"{c['name']} {s['name']}" for s in c["stages"] if s["name"] not in b["stages"]]
    if uncovered:
        raise InputError(f"{source} does not cover {uncovered[:6]}{' ...' if len(uncovered) > 6 else ''} "
                         f"({len(uncovered)} in all); record it with --update-baseline")
    selected = bool(rec["settings"].get("stages"))
    regressions, margins = [], []
    for ci, c in enumerate(rec["cases"]):
        b = baseline["cases"][c["name"]]
        measured = [(s["name"], "failed" if _unmeasured(s) else s["max_abs"], b["stages"][s["name"]])
                    for s in c["stages"]]
        measured += [(decode_stage(d["step"]), d["max_abs"], b.get("decode", {}).get(str(d["step"])))
                     for d in c["decode"]]
        q = (c.get("quantization_cost") or {}).get("logits") or {}
        if "quantization_kl_max" in b:
            measured.append(("quantization.kl_max", q.get("kl_max", "missing"), b["quantization_kl_max"]))
        if not selected:
            ran = {m[0] for m in measured}
            measured += [(n, "missing", v) for n, v in b["stages"].items() if n not in ran]
            measured += [(decode_stage(n), "missing", v) for n, v in b.get("decode", {}).items()
                         if decode_stage(n) not in ran]
        for name, now, base in measured:
            if base is None:
                continue
            allowed = base * ratio + floor
            entry = {"case": c["name"], "stage": name, "order": [*order_key(name)[:3], ci],
                     "max_abs": now if now in NO_NUMBER else _number(now), "baseline": base, "allowed": allowed}
            margins.append(entry)
            if now in NO_NUMBER or not _number(now) <= allowed:  # NaN: not <= anything
                regressions.append(entry)
    margins = [e for e in margins if e["max_abs"] not in NO_NUMBER]
    margins.sort(key=lambda e: -_share(e["max_abs"], e["allowed"]))
    regressions.sort(key=lambda e: e["order"])  # forward order over all cases: the earliest stage that grew
    return _json_float({"baseline": source, "ratio": ratio, "floor": floor, "own_ratio": own_ratio,
                        "machine": {"same": not differs, "differs": differs},
                        "passed": not regressions and rec["passed"], "parity_passed": rec["passed"],
                        "regressions": regressions, "closest": margins[:10], "checked": len(margins),
                        "cases": len(rec["cases"]),
                        "not_run": sorted(set(baseline["cases"]) - {c["name"] for c in rec["cases"]})})


NO_NUMBER = ("missing", "failed")  # a stage the run lacks; one it has but could not measure


def _unmeasured(stage: dict) -> bool:
    """A failed stage without numbers: the candidate raised there or never reached it, a shape or dtype
    mismatch, non-finite values (its error says which; every statistic is left at zero)."""
    return not stage["passed"] and bool(stage.get("error")) and not stage.get("mismatched") and stage["max_abs"] == 0


def _number(v) -> float:
    """A record number: JSON's "inf" / "-inf" strings and null (NaN) back to floats."""
    if isinstance(v, str):
        return float(v)
    return math.nan if v is None else float(v)


def _share(now: float, allowed: float) -> float:
    """How much of its allowance an error uses (NaN sorts first)."""
    if math.isnan(now):
        return math.inf
    return now / allowed if allowed > 0 else (math.inf if now > 0 else 0.0)


def summary(result: dict) -> str:
    lines = []
    regs = result["regressions"]
    head = "PASS" if result["passed"] else "FAIL"
    lines.append(f"gate {head}: {result['checked']} errors in {result['cases']} cases against {result['baseline']} "
                 f"(allowed = baseline x {result['ratio']:g} + {result['floor']:g})"
                 + ("" if result["parity_passed"] else "; the run itself fails parity"))
    machine = result.get("machine") or {"same": True}
    if not machine["same"]:
        def said(v) -> str:
            return "not recorded" if v is None else _short(v)

        shown = "; ".join(f"{k} {said(a)} there, {said(b)} here" for k, (a, b) in machine["differs"].items())
        own = result.get("own_ratio", result["ratio"])
        lines.append(f"the baseline was recorded on another machine ({shown}): the last bits round differently"
                     + (f", so the ratio is x {result['ratio']:g}, not x {own:g}" if own != result["ratio"] else ""))
    if regs:
        first = regs[0]
        lines.append(f"First regression: {first['stage']} in case {first['case']}: max_abs {fmt(first['max_abs'])} > "
                     f"allowed {fmt(first['allowed'])} (baseline {fmt(first['baseline'])})")
        lines += [f"  {r['case']} {r['stage']}: {fmt(r['max_abs'])} > {fmt(r['allowed'])} "
                  f"(baseline {fmt(r['baseline'])})" for r in regs[1:8]]
        if len(regs) > 8:
            lines.append(f"  ... {len(regs) - 8} more")
    else:
        lines += [f"  closest: {e['case']} {e['stage']}: {fmt(e['max_abs'])} of allowed {fmt(e['allowed'])}"
                  for e in result["closest"][:3]]
    if result["not_run"]:
        lines.append(f"baseline cases not run: {len(result['not_run'])}")
    return "\n".join(lines)


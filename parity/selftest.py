"""``rmlx-parity selftest``: the harness measures itself against the catalog of planted defects.

Every defect of each model family's catalog (``Family.defects``) is planted in turn and run in both modes on the
self-test cases; the harness must (a) fail the run -- *detection* -- and (b) in teacher-forced mode
name the defect's declared stage as the first divergence of every failing case -- *localisation*.
The clean port runs first in both modes and must pass: a false alarm fails the self-test too.

The reference does not depend on the candidate's defects, so each case's reference capture is
computed once and reused by every defect (that is what makes ~45 runs take a minute or two);
each defect gets a freshly loaded candidate, since some act at load time (the loader, the codec).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from parity.adapter import Adapter, Family, Scenario, family_of
from parity.defects import Defect, check, matches, planted
from parity.pipeline import CaseResult
from parity.provenance import git, versions
from parity.report import text_table
from parity.runner import MODES, Settings, divergence, run_case
from rmlx.errors import InputError
from rmlx.imagefile import load_image

SCHEMA = "rmlx.selftest/1"
CLEAN = "(none)"


@dataclass
class Outcome:
    fault: str  # CLEAN (+ the setting group) for the run without a defect
    area: str
    expected: str
    mode: str
    found: list[str]  # the first divergent stage of each failing case (deduplicated, in case order)
    failed_cases: int
    cases: int
    error: str = ""  # the run was refused or crashed: the loader's refusal is the detection of a "load" defect
    misplaced: list[dict] = field(default_factory=list)  # failing cases whose first stage is not the expected one
    seconds: float = 0.0
    planted: bool = True  # False: the clean port
    load_error: str | None = None  # a "load" defect: the tensor the loader's refusal must name
    evidence: dict | None = None  # the first failing case's divergent stage: its error against its bound

    @property
    def detected(self) -> bool:
        return self.failed_cases > 0 or (self.load_error is not None and bool(self.error))

    @property
    def localised(self) -> bool:
        if not self.planted or not self.detected:
            return False
        if self.load_error is not None:
            return self.load_error in self.error
        return bool(self.found) and not self.misplaced

    @property
    def ok(self) -> bool:
        if not self.planted:  # the clean port (of one setting group): passes, no crash
            return not self.detected and not self.error
        return self.detected and (self.mode != "teacher" or self.localised)

    def to_dict(self) -> dict:
        return {"fault": self.fault, "area": self.area, "expected": self.expected, "mode": self.mode,
                "found": self.found, "failed_cases": self.failed_cases, "cases": self.cases,
                "detected": self.detected, "localised": self.localised, "ok": self.ok, "error": self.error,
                "misplaced": self.misplaced, "seconds": round(self.seconds, 3), "planted": self.planted,
                "load_error": self.load_error, "evidence": self.evidence}


class _Side:
    """The adapters of one family's setting group (plain or quantized), with each case's reference kept."""

    def __init__(self, family: Family, models: list[Path], settings: Settings):
        self.family = family
        self.adapters: dict[Path, Adapter] = {m: family.load(m, settings) for m in models}
        self.clean = {m: a.candidate_model for m, a in self.adapters.items()}
        for a in self.adapters.values():
            a.inputs = _memoized_inputs(a.inputs)
            a.reference = _memoized(a.reference)
            a.oracle = _memoized_oracle(a.oracle)

    def reload_candidates(self) -> None:
        """Load every candidate again, under whatever defect is planted now."""
        for a in self.adapters.values():
            a.candidate_model = a.load_candidate()

    def restore(self) -> None:
        for m, a in self.adapters.items():
            a.candidate_model = self.clean[m]


def _options_key(settings: Settings) -> tuple:
    """The families' options of ``settings``, defaults filled in, as a hashable key."""
    return tuple(sorted(settings.option_values().items(), key=str))


def _memoized_inputs(inputs):
    """The adapter's case inputs (the prompt and the reference's preprocessing) keyed by its case: the
    reference's side, the same whatever is planted in the candidate (never mutated downstream)."""
    kept: dict = {}

    def call(scenario, decoded, settings):
        key = (scenario, _options_key(settings))
        if key not in kept:
            kept[key] = inputs(scenario, decoded, settings)
        return kept[key]

    return call


def _memoized_oracle(oracle):
    """The adapter's float64 oracle keyed by its case: reference-side code, the same whatever is planted."""
    kept: dict = {}

    def call(scenario, decoded, settings):
        key = (scenario, settings.dtype, _options_key(settings))
        if key not in kept:
            kept[key] = oracle(scenario, decoded, settings)
        return kept[key]

    return call


def _memoized(reference):
    """The adapter's reference() keyed by its case: the reference is the same whatever the candidate (its
    extras too; the pipeline settles copies of the capture, never the kept one)."""
    kept: dict = {}

    def call(scenario, inputs, pre, settings, decode_steps, unquantized=False):
        key = (scenario, settings.dtype, _options_key(settings), decode_steps, unquantized,
               inputs["input.input_ids"].tobytes())
        if key not in kept:
            kept[key] = reference(scenario, inputs, pre, settings, decode_steps, unquantized=unquantized)
        return kept[key]

    return call


def _run(side: _Side, scenarios: list[Scenario], decoded: dict, settings: Settings, reload: bool = False,
         first_failure: bool = False) -> list[CaseResult]:
    """Every supported case on every model; ``reload``: load the candidates again first, under whatever
    defect is planted (some act at load time: the loader, the codec). ``first_failure``: stop at the
    first case that fails (detection needs one; a raise of the reference or harness is not one)."""
    if reload:
        side.reload_candidates()
    results = []
    for m, a in side.adapters.items():
        for s in scenarios:
            if a.supports(s):
                r = run_case(a, m, s, decoded, settings, pictures=False)  # verdicts only
                r.reference = r.candidate = None
                results.append(r)
                if first_failure and not r.passed and not r.untestable:
                    return results
    return results


def _outcome(name: str, defect: Defect | None, mode: str, side: _Side, run: Callable[[], list[CaseResult]],
             dtype: str) -> Outcome:
    """Run one mode of one defect (or of the clean port) and judge every failing case against the
    defect's stage, resolved for that case's model and stages."""
    t = time.perf_counter()
    try:
        results, error = run(), ""
    except InputError as e:  # the strict loader refused the checkpoint (or the port refused its input)
        results, error = [], str(e)
    except Exception as e:  # the port crashed: not a detection, and the self-test goes on
        results, error = [], f"{type(e).__name__}: {e}"
    broken = [r for r in results if r.untestable]  # the reference or harness raised: not a detection
    if broken:
        error = error or "; ".join(f"{r.name}: {r.error['side']} raised {r.error['type']}: {r.error['message']}"
                                   for r in broken)
        results = [r for r in results if not r.untestable]
    found, misplaced, resolved, evidence = [], [], [], None
    for r in results:
        div = divergence(r, dtype)
        if div is None:
            continue
        stage = div[0].stage
        evidence = evidence or _evidence(r, div[0])
        if stage not in found:
            found.append(stage)
        if defect is not None and defect.stage != "load":
            expected = side.family.expected_stage(defect, side.adapters[r.model], r.scenario)
            if expected not in resolved:
                resolved.append(expected)
            if not matches(stage, expected):
                misplaced.append({"case": r.name, "found": stage, "expected": expected})
    shown = ", ".join(resolved) if resolved else (defect.stage if defect else "pass")
    return Outcome(name, defect.area if defect else "-", shown, mode, found, sum(not r.passed for r in results),
                   len(results), error, misplaced, time.perf_counter() - t, defect is not None,
                   defect.load_error if defect is not None and defect.stage == "load" else None, evidence)


def _evidence(r: CaseResult, d) -> dict:
    """What failed a case's first divergent stage, as (error, bound): the largest difference against
    the absolute tolerance, the float64 ratio against the allowed one, a structural error, or a raise."""
    out = {"case": r.name, "stage": d.stage}
    o = r.oracle.get(d.stage) or {}
    if r.error is not None and r.error.get("stage") == d.stage:
        return out | {"kind": "raised", "error": f"{r.error['type']}", "bound": "-"}
    if d.error and d.stage.startswith("logits@decode"):
        step = next(s for s in r.decode if not s["passed"])
        if step["max_abs"] > d.tolerance.atol:
            return out | {"kind": "absolute", "error": f"{step['max_abs']:.3g}", "bound": f"{d.tolerance.atol:g}"}
        return out | {"kind": "decisive top-1 flip", "error": f"{step['top1_flips_decisive']} flip(s)",
                      "bound": f"near-tie margin {step['tie_margin']:.3g}"}
    if d.max_abs > d.tolerance.atol or d.tolerance.atol == 0:
        exact = d.tolerance.atol == 0 and d.tolerance.rtol == 0
        return out | {"kind": "exact" if exact else "absolute", "error": f"{d.max_abs:.3g}",
                      "bound": "exact" if exact else f"{d.tolerance.atol:g}"}
    if o.get("allowed_ratio") is not None and o["ratio"] > o["allowed_ratio"]:
        return out | {"kind": "noise floor", "error": f"{o['ratio']:.3g}x", "bound": f"{o['allowed_ratio']:g}x"}
    return out | {"kind": "other", "error": (d.error or "")[:60], "bound": f"{d.tolerance.atol:g}"}


def run_selftest(models: list[Path], fixture_images: Path, names: list[str] | None = None,
                 modes: tuple[str, ...] = MODES, dtype: str = "float32", decode_steps: int = 2,
                 progress: Callable[[int, int, str], None] | None = None, jobs: int = 1) -> dict:
    """Run the clean port and every named defect (default: every defect of every model's family) in
    ``modes`` on the family's self-test cases; return the self-test record (schema ``rmlx.selftest/1``).
    ``jobs`` > 1: the runs (a defect in a mode, or the clean port in a mode) are dealt to that many
    processes (``parity.jobs``), each computing the references it needs; the outcomes are the same."""
    t0 = time.perf_counter()
    plan, all_cases = _plan(models, fixture_images, names, dtype, decode_steps)
    decoded = {p: load_image(p) for _, _, cases, *_ in plan for s in cases for p in s.images}
    tasks = list(enumerate(_tasks(plan, modes)))
    if jobs > 1 and len(tasks) > 1:
        from parity import jobs as workers

        fams = list({id(f): f for f, *_ in plan}.values())
        done = workers.deal(tasks, jobs, lambda share, tick: _run_tasks(share, plan, decoded, dtype, tick, len(tasks)),
                            _work, (models, fixture_images, names, modes, dtype, decode_steps, fams), progress,
                            what="self-test run", unit=_unit(tasks))
    else:
        done = _run_tasks(tasks, plan, decoded, dtype, progress, len(tasks))
        if progress:
            progress(len(tasks), len(tasks), "done")
    outcomes = [done[i] for i, _ in tasks]
    n_defects = sum(len(group) for *_, group in plan)
    return _record(outcomes, n_defects, modes, dtype, decode_steps, all_cases, models, time.perf_counter() - t0)


def _unit(tasks: list[tuple[int, tuple]]) -> Callable[[tuple[int, tuple]], int]:
    """A defect's (or the clean port's) runs in every mode are one unit of the deal: its teacher-forced run
    costs every case, its free-running run often one, so dealing runs one by one would give one process
    every teacher-forced run."""
    units: dict[tuple, int] = {}
    for _, (k, name, _mode) in tasks:
        units.setdefault((k, name), len(units))
    return lambda item: units[item[1][:2]]


def _plan(models: list[Path], fixture_images: Path, names: list[str] | None, dtype: str, decode_steps: int
          ) -> tuple[list[tuple], list[str]]:
    """[(family, models, cases, settings of the group, label, defects of the group)], every case name."""
    by_family: dict[str, tuple[Family, list[Path]]] = {}
    for m in models:
        fam = family_of(m)
        by_family.setdefault(fam.model_type, (fam, []))[1].append(m)
    catalog = {n: d for fam, _ in by_family.values() for n, d in fam.defects.items()}
    chosen = {d.name for d in check(catalog, names)} if names else set(catalog)
    plan = []
    all_cases: list[str] = []
    for fam, fam_models in by_family.values():
        picked = [d for n, d in fam.defects.items() if n in chosen]  # catalog order
        if names and not picked:
            continue
        cases = fam.selftest_scenarios(fixture_images)
        all_cases += [s.name for s in cases if s.name not in all_cases]
        base = Settings.of(dtype=dtype, decode_steps=decode_steps, **dict(fam.selftest_settings))
        groups: dict[tuple, list[Defect]] = {(): []}  # the clean run of the plain setting always runs
        for d in picked:
            groups.setdefault(d.settings, []).append(d)
        for extra, group in sorted(groups.items(), key=lambda kv: len(kv[0])):
            label = ", ".join(f"{k}={v}" for k, v in extra)
            plan.append((fam, fam_models, cases, replace(base, **dict(extra)), label, group))
    return plan, all_cases


def _tasks(plan: list[tuple], modes) -> list[tuple[int, str | None, str]]:
    """The runs in record order, (plan entry, defect name or None for the clean port, mode): per entry,
    the clean port in every mode (no false alarm in any), then each defect in every mode."""
    out = []
    for k, (*_, group) in enumerate(plan):
        out += [(k, None, mode) for mode in modes]
        out += [(k, d.name, mode) for d in group for mode in modes]
    return out


def _run_tasks(items: list[tuple[int, tuple]], plan: list[tuple], decoded: dict, dtype: str,
               progress: Callable[[int, int, str], None] | None, total: int,
               send: Callable[[int, Outcome], None] | None = None) -> dict[int, Outcome]:
    """The outcome of each (index, run) of ``items``; a plan entry's adapters are loaded when its first
    run comes and dropped after its last."""
    last = {task[0]: i for i, task in items}
    sides: dict[int, _Side] = {}
    out: dict[int, Outcome] = {}
    for i, (k, name, mode) in items:
        fam, fam_models, cases, settings, label, group = plan[k]
        if k not in sides:
            sides[k] = _Side(fam, fam_models, settings)
        side = sides[k]
        tag = ", ".join(x for x in (fam.model_type if len(plan) > 1 else "", label) if x)
        if progress:
            progress(len(out), total, f"{name or 'clean'} {mode}" + (f" {tag}" if name is None and tag else ""))
        if name is None:
            clean = partial(_run, side, cases, decoded, replace(settings, mode=mode))
            out[i] = _outcome(CLEAN + (f" [{tag}]" if tag else ""), None, mode, side, clean, dtype)
        else:
            d = next(d for d in group if d.name == name)
            # free-running only detection is judged: like a mutation tester, the first failing case ends it
            run = partial(_run, side, cases, decoded, replace(settings, mode=mode, inject=(d.name,)), reload=True,
                          first_failure=mode != "teacher")
            with planted([d]):
                try:
                    out[i] = _outcome(d.name, d, mode, side, run, dtype)
                finally:
                    side.restore()
        if send is not None:
            send(i, out[i])
        if last[k] == i:
            del sides[k]
    return out


def _work(conn, parent: int, share: list, models, fixture_images, names, modes, dtype, decode_steps,
          families: list) -> None:
    """A worker process of a dealt self-test (``parity.jobs.deal``): the same plan, its share of the runs."""
    import rmlx  # noqa: F401  (before mlx: the BLAS MLX calls, rmlx/blas.py)
    from parity.adapter import register
    from parity.jobs import serve

    for f in families:
        register(f)

    def run(send) -> None:
        plan, _ = _plan(models, fixture_images, names, dtype, decode_steps)
        decoded = {p: load_image(p) for _, _, cases, *_ in plan for s in cases for p in s.images}
        _run_tasks(share, plan, decoded, dtype, None, len(share), send)

    serve(conn, parent, run)


def _record(outcomes: list[Outcome], n_defects: int, modes, dtype, decode_steps, cases, models, wall) -> dict:
    planted_ = [o for o in outcomes if o.planted]
    by_fault: dict[str, list[Outcome]] = {}
    for o in planted_:
        by_fault.setdefault(o.fault, []).append(o)
    detected = [n for n, os in by_fault.items() if all(o.detected for o in os)]
    localised = [n for n, os in by_fault.items() if all(o.localised for o in os if o.mode == "teacher")
                 and any(o.mode == "teacher" for o in os)]
    false_alarms = [o.to_dict() for o in outcomes if not o.planted and o.detected]
    n = len(by_fault)
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "git": git(),
        "settings": {"dtype": dtype, "modes": list(modes), "decode_steps": decode_steps,
                     "cases": list(cases), "models": [m.name for m in models]},
        "faults": n_defects,
        "detection_score": len(detected) / n if n else None,
        "localisation_score": (len(localised) / n if n else None) if "teacher" in modes else None,
        "escaped": sorted(set(by_fault) - set(detected)),
        "mislocalised": sorted(set(by_fault) - set(localised)) if "teacher" in modes else [],
        "false_alarms": false_alarms,
        "passed": all(o.ok for o in outcomes),
        "wall_time_s": round(wall, 3),
        "outcomes": [o.to_dict() for o in outcomes],
    }


def _refusal(error: str, load_error: str | None) -> str:
    """A loader refusal in one cell: the tensor it names (the one the defect predicts, when it does)."""
    if load_error is None:
        return f"error: {error[:80]}"
    named = re.findall(r"'([^']+)'", error)
    hit = next((n for n in named if load_error and load_error in n), named[0] if named else "")
    return f"load refused ({hit})" if hit else "load refused"


def _table(rec: dict) -> list[tuple[str, ...]]:
    """One row per defect: expected stage, found stage per mode, detected, localised."""
    rows: dict[str, dict] = {}
    for o in rec["outcomes"]:
        row = rows.setdefault(o["fault"], {"area": o["area"], "expected": o["expected"], "found": {},
                                           "detected": True, "localised": None, "ok": True})
        shown = list(o["found"]) or ([_refusal(o["error"], o["load_error"])] if o["error"] else ["-"])
        shown += [f"(case {m['case']}: expected {m['expected']})" for m in o["misplaced"][:2]]
        row["planted"] = o["planted"]
        row["found"][o["mode"]] = ", ".join(shown) + ("" if o["planted"] or not o["detected"]
                                                      else " (FALSE ALARM)")
        row["detected"] = row["detected"] and o["detected"]
        if o["mode"] == "teacher":
            row["localised"] = o["localised"]
        row["ok"] = row["ok"] and o["ok"]
    modes = rec["settings"]["modes"]
    out = [("defect", "area", "expected stage", *(f"found ({m})" for m in modes), "detected", "localised", "ok")]
    for name, r in rows.items():
        planted = r["planted"]
        out.append((name, r["area"], r["expected"], *(r["found"].get(m, "-") for m in modes),
                    ("yes" if r["detected"] else "NO") if planted else ("ALARM" if r["detected"] else "no"),
                    "-" if not planted or r["localised"] is None else ("yes" if r["localised"] else "NO"),
                    "ok" if r["ok"] else "FAIL"))
    return out


def _summary(rec: dict) -> str:
    det, loc = rec["detection_score"], rec["localisation_score"]
    return (f"selftest {'PASS' if rec['passed'] else 'FAIL'}: {rec['faults']} planted defects; detection "
            f"{'-' if det is None else f'{det:.0%}'}, localisation {'-' if loc is None else f'{loc:.0%}'}, "
            f"false alarms {len(rec['false_alarms'])}; wall time {rec['wall_time_s']:.1f} s")


def to_terminal(rec: dict, notes: list[str] = ()) -> str:
    """The defect table, what escaped or was mislocalised, ``notes``, and the summary last."""
    lines = text_table(_table(rec))
    extra = list(notes)
    if rec["escaped"]:
        extra.append(f"escaped: {', '.join(rec['escaped'])}")
    if rec["mislocalised"]:
        extra.append(f"mislocalised: {', '.join(rec['mislocalised'])}")
    return "\n".join(lines + [""] + extra + [_summary(rec)])


def to_markdown(rec: dict) -> str:
    rows = _table(rec)
    lines = [f"# {_summary(rec)}", "", f"Cases: {', '.join(rec['settings']['cases'])} on "
             f"{', '.join(rec['settings']['models'])}; dtype {rec['settings']['dtype']}; "
             + ", ".join(f"{k} {v}" for k, v in rec["versions"].items()
                         if k in ("transformers", "torch", "mlx", "numpy")), "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    lines += ["", "## Evidence: the first failing case's divergent stage, its error against its bound", "",
              "| defect | mode | case | stage | failed by | error | bound |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {o['fault']} | {o['mode']} | {e['case']} | `{e['stage']}` | {e['kind']} | {e['error']} "
              f"| {e['bound']} |" for o in rec["outcomes"] if (e := o.get("evidence"))]
    return "\n".join(lines) + "\n"


"""Run cases: each side produces a Capture, metrics compare them, the record is a plain dict.

Inputs are validated before any case runs (every image decoded, every checkpoint loaded strictly),
so bad input fails fast with exit 2 and nothing written.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from parity.adapter import Adapter, Family, Scenario, families, family_of
from parity.defects import Defect, check, planted
from parity.metrics import StageDiff, Tol, _json_float, compare, first_divergence, logit_statistics, logits_agreement
from parity.pipeline import LOGITS, CaseResult, CaseRun, error_result, greedy_agreement, side_of
from parity.provenance import git, versions
from parity.stages import decode_stage, order_key
from parity.tolerances import Override, overrides_record, tolerance
from rmlx.errors import InputError
from rmlx.files import safetensors_layout
from rmlx.imagefile import load_image

SCHEMA = "rmlx.parity/2"
MODES = ("free", "teacher")
MAX_THREADS = 256  # more than any CPU here; a larger number is a typo, not a request


@dataclass(frozen=True)
class Settings:
    mode: str = "free"
    dtype: str = "float32"
    stages: tuple[str, ...] = ()
    attn_implementation: str = "eager"
    inject: tuple[str, ...] = ()
    oracle: bool = True
    decode_steps: int = 4
    quantize: str | None = None  # "mxfp8": the candidate quantizes on load
    shard: tuple[int, int] | None = None  # (K, N): run only the K-th of N deterministic slices of the cases
    stream: bool = False  # one decoder layer at a time on both sides (the family's layer-by-layer driver)
    threads: int = 1  # intra-op threads (torch, and the BLAS under MLX); 1 is bit-reproducible across processes
    tol_overrides: tuple[Override, ...] = ()  # --tol: (stage glob, atol, rtol or None), last match wins
    options: tuple[tuple[str, object], ...] = ()  # the families' own settings (parity.adapter.Option), by name

    @classmethod
    def of(cls, **kw) -> Settings:
        """Settings from keywords: the core's fields by name, every other keyword a family's option."""
        names = {f.name for f in fields(cls)}
        core = {k: v for k, v in kw.items() if k in names}
        extra = {k: v for k, v in kw.items() if k not in names}
        return cls(**core, options=tuple(sorted((dict(core.pop("options", ())) | extra).items())))

    def __getattr__(self, name: str):
        """A family's option as an attribute (``settings.<name>``, what its adapter reads)."""
        if name.startswith("__"):
            raise AttributeError(name)
        values = self.option_values()
        if name not in values:
            raise AttributeError(f"'Settings' has no field or family option '{name}'")
        return values[name]

    def option_values(self) -> dict[str, object]:
        """Every registered family's options: the value given, else the option's default; an option that
        is the candidate's own value of another (``candidate_of``) left None takes that option's value."""
        from parity.adapter import options as declared

        given, decl = dict(object.__getattribute__(self, "options")), declared()
        unknown = sorted(set(given) - set(decl))
        if unknown:
            raise InputError(f"unknown setting(s) {unknown}: no registered family declares them")
        values = {n: given.get(n, o.default) for n, o in decl.items()}
        for n, o in decl.items():
            if o.candidate_of is not None and values[n] is None:
                values[n] = values[o.candidate_of]
        return values

    def tol(self, cls: str, stage: str) -> Tol:
        """The tolerance of ``stage`` (of class ``cls``) under these settings, ``--tol`` applied."""
        return tolerance(cls, self.dtype, self.mode, stage, self.tol_overrides)

    def to_record(self) -> dict:
        """The record's ``settings``: the core's fields and every family option, flat."""
        return {"mode": self.mode, "dtype": self.dtype, "stages": list(self.stages),
                "attn_implementation": self.attn_implementation, "inject": sorted(set(self.inject)),
                "decode_steps": self.decode_steps, "quantize": self.quantize,
                "shard": None if self.shard is None else "{}/{}".format(*self.shard),
                "stream": self.stream, "threads": self.threads,
                "tol_overrides": overrides_record(self.tol_overrides), **self.option_values()}


def default_scenarios(images: list[Path], fixture_images: Path | None, models: list[Path] | None = None
                      ) -> list[Scenario]:
    """The scenarios of the families of ``models`` (every registered family when None), each family's
    in its own order, a scenario two families share (same name, same prompt) once. Each model then runs
    the ones its family supports (:func:`plan_cases`)."""
    fams = list(families().values()) if models is None else list({id(f): f for f in map(family_of, models)}.values())
    out: dict[str, Scenario] = {}
    for fam in fams:
        for s in fam.scenarios(images, fixture_images):
            if s.name in out and out[s.name] != s:
                raise InputError(f"scenario '{s.name}' means two different prompts in two families")
            out.setdefault(s.name, s)
    return list(out.values())


def run_defects(models: list[Path], names: tuple[str, ...]) -> list[Defect]:
    """The named defects from the catalogs of the models' families (an unknown name: ``InputError``)."""
    catalog: dict[str, Defect] = {}
    for fam in {id(f): f for f in map(family_of, models)}.values():
        catalog.update(fam.defects)
    return check(catalog, names)


def runnable(models: list[Path], settings: Settings) -> tuple[list[Path], dict[Path, str]]:
    """(the models whose family can run ``settings``, {model: why not} for the others)."""
    kept, skipped = [], {}
    for m in models:
        try:
            family_of(m).check_settings(settings)
        except InputError as e:
            skipped[m] = str(e)
        else:
            kept.append(m)
    return kept, skipped


def validate(settings: Settings) -> None:
    if settings.mode not in MODES:
        raise InputError(f"mode={settings.mode!r} is not one of {MODES}")
    from parity.adapter import options as declared

    decl = declared()
    for name, value in settings.option_values().items():  # a family option's value among its choices
        choices = decl[name].choices
        if choices is not None and value not in choices and value is not None:
            raise InputError(f"{name}={value!r} is not one of {choices}")
    if settings.decode_steps < 0:
        raise InputError(f"--decode-steps must be >= 0, got {settings.decode_steps}")
    if not 1 <= settings.threads <= MAX_THREADS:
        raise InputError(f"--threads must be in 1..{MAX_THREADS}, got {settings.threads}")


def plan_cases(models: list[Path], scenarios: list[Scenario], shard: tuple[int, int] | None = None
               ) -> list[tuple[Path, Scenario]]:
    """Every (model, scenario) the models support, in a fixed order (models as given, then scenarios);
    ``shard=(K, N)`` keeps cases K-1, K-1+N, K-1+2N, ...: N shards that together run every case once."""
    fams = {m: family_of(m) for m in models}
    plan = [(m, s) for m in models for s in scenarios if fams[m].supports(m, s)]
    if not plan:
        raise InputError("no case to run: the checkpoint(s) have no vision_config / audio_config for the "
                         "requested scenarios")
    if shard is not None:
        k, n = shard
        if not 1 <= k <= n:
            raise InputError(f"--shard {k}/{n}: K must be in 1..N")
        if n > len(plan):
            raise InputError(f"--shard {k}/{n}: there are only {len(plan)} cases; use at most that many shards")
        plan = plan[k - 1::n]
    return plan


def run_cases(models: list[Path], scenarios: list[Scenario], settings: Settings, keep_captures: bool = False,
              progress: Callable[[int, int, str], None] | None = None, kernel_check=None, jobs: int = 1
              ) -> list[CaseResult]:
    """Every planned case (a crash is a verdict). ``kernel_check``: a ``parity.kernels.KernelCheck``
    that sees every product the port computes in place of MLX's own kernel. ``jobs`` > 1: the cases
    are dealt to that many processes (``parity.jobs``), the results the same, in the same order."""
    validate(settings)
    plan = plan_cases(models, scenarios, settings.shard)
    paths = sorted({p for _, s in plan for p in s.images})
    decoded = {p: load_image(p) for p in paths}  # every image validated before any case runs
    for fam in {id(f): f for f in map(family_of, models)}.values():
        fam.check_settings(settings)
    for m in dict.fromkeys(m for m, _ in plan):  # every safetensors header, before any model code is imported
        for f in sorted(Path(m).glob("*.safetensors")):
            safetensors_layout(f)
    run_defects(models, settings.inject)  # an unknown defect name fails here, before any worker starts
    jobs = dealt(jobs, settings, len(plan))
    if jobs == 1:
        return run_plan(list(enumerate(plan)), decoded, settings, keep_captures, progress, kernel_check)
    from parity import jobs as workers

    return workers.run_dealt(plan, decoded, settings, keep_captures, progress, kernel_check, jobs)


def dealt(jobs: int, settings: Settings, cases: int) -> int:
    """The processes ``jobs`` gives a run of ``cases``: at most one per case, one when streamed."""
    return 1 if settings.stream else max(1, min(jobs, cases))


def run_plan(items: list[tuple[int, tuple[Path, Scenario]]], decoded: dict[Path, np.ndarray], settings: Settings,
             keep_captures: bool = False, progress: Callable[[int, int, str], None] | None = None,
             kernel_check=None, total: int | None = None,
             on_result: Callable[[int, CaseResult], None] | None = None) -> list[CaseResult]:
    """Run ``items`` ((index in the plan, (model, scenario))) in this process: the checkpoints loaded
    once each, the run's defects planted around it all. ``total``: the run's case count, for ``progress``;
    ``on_result(index, result)`` as each case finishes."""
    from rmlx.nn import kernels  # MLX: here, as run_case imports the capture

    models = list(dict.fromkeys(m for _, (m, _) in items))
    total = len(items) if total is None else total
    kernels.reset()
    watch = contextlib.nullcontext() if kernel_check is None else kernels.observe(kernel_check)
    with planted(run_defects(models, settings.inject)), watch:  # planted before loading: some act at load time
        fams: dict[Path, Family] = {m: family_of(m) for m in models}
        adapters: dict[Path, Adapter] = {}
        load_errors: dict[Path, tuple[BaseException, str]] = {}
        for m, f in fams.items():
            try:
                adapters[m] = (f.load_streamed if settings.stream else f.load)(m, settings)
            except InputError:
                raise  # the checkpoint is bad input (exit 2), for either side
            except Exception as e:  # a crash while loading: the port's (a verdict) or the reference's (125)
                load_errors[m] = (e, side_of(e, f, "reference"))
        results: list[CaseResult] = []
        for i, (m, scenario) in items:
            if progress:
                progress(len(results), total, f"{m.name}/{scenario.name}")
            if kernel_check is not None:
                kernel_check.case = i  # a shape's check comes from its first case in plan order
            run = functools.partial(fams[m].run_streamed, keep_captures=keep_captures) if settings.stream else run_case
            if m in load_errors:
                e, side = load_errors[m]
                results.append(error_result(_TableOnly(fams[m], m), m, scenario, decoded, settings, e, side, {}))
                continue
            try:
                result = run(adapters[m], m, scenario, decoded, settings)
            except InputError:
                raise  # the case's input is bad (an image this checkpoint cannot take, say): exit 2
            except Exception as e:  # a driver that cannot tell the sides apart: the traceback does
                side = side_of(e, fams[m], "harness")
                result = error_result(adapters[m], m, scenario, decoded, settings, e, side, {})
            if not keep_captures:
                result.reference = result.candidate = None
            results.append(result)
            if on_result is not None:
                on_result(i, result)
    if progress:
        progress(len(results), total, "done")
    return results


def run_case(adapter: Adapter, model: Path, scenario: Scenario, decoded: dict[Path, np.ndarray],
             settings: Settings, pictures: bool = True) -> CaseResult:
    """The resident driver: the reference's capture, then the candidate's (teacher-forced from it when the
    mode says so), both settled at once; the pipeline (:class:`parity.pipeline.CaseRun`) does the rest
    (``pictures``: the HTML report's, see there)."""
    from parity.capture import watching  # MLX: here, so compare/gate/report import this module without it

    run = CaseRun(adapter, model, scenario, decoded, settings, pictures=pictures)
    try:
        ref, ref_steps, tokens, consistency, *more = adapter.reference(scenario, run.inputs, run.pre, settings,
                                                                       settings.decode_steps)
    except Exception as e:
        return run.error(e, "reference", {})
    extras = more[0] if more else {}
    with watching() as recorders:  # the candidate's partial capture, should it raise
        try:
            cand, cand_steps = adapter.candidate(scenario, run.inputs, decoded, settings, tokens,
                                                 teacher=ref if settings.mode == "teacher" else None)
        except Exception as e:  # the port raised (its own validation of a valid input included): a verdict
            partial = recorders[-1].settled() if recorders else {}
            return run.error(e, "candidate", partial, reference=ref)
    cost = None
    if getattr(adapter, "hf_float", None) is not None:  # the cost of quantization: vs the unquantized model
        flt, *_ = adapter.reference(scenario, run.inputs, run.pre, settings, 0, unquantized=True)
        cost = {"stages": {s.name: compare(s.name, cand[s.name], flt[s.name], run.tols[s.name], settings.dtype).nmse_db
                           for s in run.stages if s.name in flt and s.name in cand},
                "logits": logits_agreement(cand["logits"], flt["logits"]) if "logits" in flt else {},
                "quantized_modules": sorted(adapter.quantized),
                "left_unquantized": {p: s for p, s in adapter.candidate_model.quant_status.items()
                                     if s != "quantized"}}
    # the reference's capture may be shared (the self-test memoizes it): settled from copies
    run.settle([n for n in run.names if n != LOGITS], dict(ref), dict(cand))
    return run.finish((cand.get(LOGITS), ref.get(LOGITS)), ref_steps, cand_steps, tokens, extras,
                      self_consistency=consistency, quantization_cost=cost,
                      reference=dict(ref) | run.inputs, candidate=dict(cand) | run.inputs)


class _TableOnly:
    """The stages of a checkpoint whose adapter could not be loaded (for its error results)."""

    def __init__(self, family: Family, model: Path):
        self.family, self.model = family, model

    def stages(self, scenario: Scenario):
        return self.family.stage_table(self.model)


def divergence(r: CaseResult, dtype: str) -> tuple[StageDiff, tuple] | None:
    """A case's first divergent stage and its forward-order key (``parity.stages.order_key``, the same
    for every case, so cases with different stage lists compare). A case whose prefill stages all pass
    but whose decode step N fails diverges at ``logits@decode.N`` (after every prefill stage)."""
    fd = first_divergence(r.diffs)
    if fd is None and r.error is not None:  # raised at a stage that no selected stage shows
        name = r.error.get("stage") or decode_stage(1)
        fd = StageDiff(name, False, tolerance("logits", dtype), dtype, (), error=r.error["message"])
    if fd is not None:
        return fd, order_key(fd.stage)
    step = next((s for s in r.decode if not s["passed"]), None)
    if step is None:
        return None
    name = decode_stage(step["step"])
    return StageDiff(name, False, tolerance("logits", dtype), dtype, (),
                     error=f"decode step {step['step']}: max |delta logits| {step['max_abs']:.3g}"), order_key(name)


def run_logit_statistics(results: list[CaseResult]) -> dict:
    """The logit statistics of every prefill position of every case, pooled."""
    parts = [r.positions for r in results if r.positions]
    if not parts:
        return {}
    return logit_statistics({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def record(results: list[CaseResult], settings: Settings, wall_time_s: float, run_id: str,
           argv: list[str] | None = None, kernels: dict | None = None, jobs: int = 1) -> dict:
    """The JSON record of a run (the schema every other report is rendered from). Non-finite numbers
    (a NaN KL from NaN logits, say) become JSON's "inf" / null, so a broken port still gets its report."""
    cases = []
    first = None
    options = settings.option_values()
    for r in results:
        div = divergence(r, settings.dtype)
        fd = None if div is None else div[0]
        stages = []
        for d in r.diffs:
            entry = d.to_dict()
            entry["class"] = r.classes.get(d.stage, "logits")
            if d.stage in r.oracle:
                entry["oracle"] = r.oracle[d.stage]
            stages.append(entry)
        cases.append({
            "name": r.name, "model": r.model.name, "model_dir": str(r.model),
            "scenario": r.scenario.name if r.scenario else r.name.partition("/")[2] or r.name,
            "image": ", ".join(str(p) for p in r.scenario.images) or None if r.scenario else None,
            "image_sizes": r.image_sizes, "audio": r.scenario.has_audio if r.scenario else None,
            "n_soft_tokens": r.n_soft_tokens, "dtype": settings.dtype, "mode": settings.mode,
            **options,
            "reference_self_consistency": {"max_abs_logits": r.self_consistency,
                                           "what": "max |logits(policy) - logits(HF's own forward)|"},
            "passed": r.passed,
            "first_divergence": None if fd is None else {"stage": fd.stage, "message": fd.message()},
            "logits": r.logits, "decode": r.decode, "greedy": r.greedy or greedy_agreement(r.decode),
            "quantization_cost": r.quantization_cost,
            "seconds": round(r.seconds, 3), "stages": stages, "viz": r.viz,
            **({} if r.stream is None else {"stream": r.stream}),
            **({} if r.error is None else {"error": r.error}),
        })
        if div is not None and (first is None or div[1] < first[2]):
            first = (r, *div)
    return _json_float({
        "schema": SCHEMA,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["rmlx-parity"] + (sys.argv[1:] if argv is None else argv)),
        "versions": versions(),
        "git": git(),
        "settings": settings.to_record(),
        # a kernel that computed the candidate in place of MLX's own and failed its check fails the run
        "passed": all(r.passed for r in results) and (kernels is None or kernels["passed"]),
        "kernels": kernels,
        "untestable": [r.name for r in results if r.untestable],
        "logits": run_logit_statistics(results),
        "first_divergence": None if first is None else {
            "case": first[0].name, "stage": first[1].stage, "max_abs": first[1].max_abs,
            "tolerance": {"rtol": first[1].tolerance.rtol, "atol": first[1].tolerance.atol},
            "error": first[1].error, "message": first[1].message(),
            "oracle": first[0].oracle.get(first[1].stage)},
        "wall_time_s": round(wall_time_s, 3),
        "jobs": jobs,  # processes the cases were dealt to (parity.jobs): a timing, not a result
        "cases": cases,
    })

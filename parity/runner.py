"""Run cases: each side produces a Capture, metrics compare them, the record is a plain dict.

Inputs are validated before any case runs (every image decoded, every checkpoint loaded strictly),
so bad input fails fast with exit 2 and nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from parity.adapter import Adapter, Family, Scenario, families, family_of
from parity.defects import Defect, check, planted
from parity.metrics import (
    StageDiff,
    Tol,
    _json_float,
    compare,
    compare_all,
    first_divergence,
    logit_statistics,
    logits_agreement,
    oracle_distance,
)
from parity.provenance import git, versions
from parity.report.viz import case_viz
from parity.stages import decode_stage, order_key, select
from parity.tolerances import Override, noise_ratio, overrides_record, tolerance
from rmlx.errors import InputError
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
    stream: bool = False  # one decoder layer at a time on both sides (parity.stream)
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


@dataclass
class CaseResult:
    name: str
    model: Path
    scenario: Scenario | None  # None: compared from dumps, which carry the inputs, not the prompt
    settings: Settings
    diffs: list[StageDiff]
    decode: list[dict] = field(default_factory=list)
    logits: dict = field(default_factory=dict)
    self_consistency: float = 0.0
    oracle: dict[str, dict] = field(default_factory=dict)
    quantization_cost: dict | None = None
    seconds: float = 0.0
    image_sizes: list = field(default_factory=list)
    n_soft_tokens: int = 0
    classes: dict[str, str] = field(default_factory=dict)
    viz: dict = field(default_factory=dict)  # parity.report.viz.case_viz: what the HTML report draws
    stream: dict | None = None  # a streamed case: timings, layer reads, peak RSS (parity.stream)
    reference: dict[str, np.ndarray] | None = None
    candidate: dict[str, np.ndarray] | None = None
    error: dict | None = None  # the case raised (:func:`case_error`): which side, where, at which stage
    positions: dict[str, np.ndarray] | None = None  # per-position logit agreement (pooled over the run)
    greedy: dict | None = None  # :func:`greedy_agreement`, with the prefill's choice as step 0

    @property
    def passed(self) -> bool:
        return self.error is None and all(d.passed for d in self.diffs) and all(s["passed"] for s in self.decode)

    @property
    def untestable(self) -> bool:
        """The reference or the harness raised: nothing is known of the port (exit 125)."""
        return self.error is not None and self.error["side"] != "candidate"


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
              progress: Callable[[int, int, str], None] | None = None, kernel_check=None) -> list[CaseResult]:
    """Every planned case (a crash is a verdict). ``kernel_check``: a ``parity.kernels.KernelCheck``
    that sees every product the port computes in place of MLX's own kernel."""
    from rmlx import kernels  # MLX: here, as run_case imports the capture

    validate(settings)
    plan = plan_cases(models, scenarios, settings.shard)
    paths = sorted({p for _, s in plan for p in s.images})
    decoded = {p: load_image(p) for p in paths}  # every image validated before any case runs
    for fam in {id(f): f for f in map(family_of, models)}.values():
        fam.check_settings(settings)
    kernels.reset()
    watch = contextlib.nullcontext() if kernel_check is None else kernels.observe(kernel_check)
    with planted(run_defects(models, settings.inject)), watch:  # planted before loading: some act at load time
        fams: dict[Path, Family] = {m: family_of(m) for m in dict.fromkeys(m for m, _ in plan)}
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
        for m, scenario in plan:
            if progress:
                progress(len(results), len(plan), f"{m.name}/{scenario.name}")
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
    if progress:
        progress(len(plan), len(plan), "done")
    return results


def run_case(adapter: Adapter, model: Path, scenario: Scenario, decoded: dict[Path, np.ndarray],
             settings: Settings) -> CaseResult:
    from parity.capture import watching  # MLX: here, so compare/gate/report import this module without it

    t0 = time.perf_counter()
    all_stages = adapter.stages(scenario)
    stages = select(list(settings.stages), all_stages)
    tols = [(s.name, settings.tol(s.tol, s.name)) for s in stages]
    inputs, pre = adapter.inputs(scenario, decoded, settings)
    other_masks: dict[str, np.ndarray] = {}  # the reference's masks under the other policy
    try:
        ref, ref_steps, tokens, consistency = adapter.reference(scenario, inputs, pre, settings,
                                                                settings.decode_steps, other_masks=other_masks)
    except Exception as e:
        return error_result(adapter, model, scenario, decoded, settings, e, "reference", {}, inputs, t0)
    with watching() as recorders:  # the candidate's partial capture, should it raise
        try:
            cand, cand_steps = adapter.candidate(scenario, inputs, decoded, settings, tokens,
                                                 teacher=ref if settings.mode == "teacher" else None)
        except Exception as e:  # the port raised (its own validation of a valid input included): a verdict
            partial = recorders[-1].capture if recorders else {}
            return error_result(adapter, model, scenario, decoded, settings, e, "candidate", partial, inputs, t0,
                                reference=ref)
    diffs = compare_all(cand, ref, tols, settings.dtype)
    agreement = (logits_agreement(cand["logits"], ref["logits"], per_position=True)
                 if "logits" in cand and "logits" in ref else {})
    decode = decode_entries(cand_steps, ref_steps, tokens, settings.dtype, settings.tol_overrides,
                            agreement.get("tie_margin"))
    greedy = greedy_agreement(decode, (cand["logits"], ref["logits"]) if agreement else None,
                              agreement.get("tie_margin"))
    cost = None
    if getattr(adapter, "hf_float", None) is not None:  # the cost of quantization: vs the unquantized model
        flt, *_ = adapter.reference(scenario, inputs, pre, settings, 0, unquantized=True)
        cost = {"stages": {s.name: compare(s.name, cand[s.name], flt[s.name], tols[i][1], settings.dtype).nmse_db
                           for i, s in enumerate(stages) if s.name in flt and s.name in cand},
                "logits": logits_agreement(cand["logits"], flt["logits"]) if "logits" in flt else {},
                "quantized_modules": sorted(adapter.quantized),
                "left_unquantized": {p: s for p, s in adapter.candidate_model.quant_status.items()
                                     if s != "quantized"}}
    oracle = oracle_columns(adapter.oracle(scenario, decoded, settings), ref, cand, dict(tols), settings.dtype
                            ) if settings.oracle else {}
    diffs = noise_floor(diffs, oracle, {s.name: s.tol for s in stages}, settings.dtype)
    diffs = decisive_flips(diffs, agreement)
    viz = case_viz(cand, ref, other_masks, settings.option_values().get("mask_policy"),
                   inputs.get("input.mm_token_type_ids"), agreement.pop("kl", None), [d.stage for d in diffs])
    return case_result(model, scenario, settings, decoded, inputs, all_stages, diffs, decode, agreement, viz, oracle,
                       time.perf_counter() - t0, self_consistency=consistency, quantization_cost=cost,
                       reference=dict(ref) | inputs, candidate=dict(cand) | inputs, greedy=greedy)


def case_result(model: Path, scenario: Scenario, settings: Settings, decoded: dict[Path, np.ndarray],
                inputs: dict[str, np.ndarray], all_stages, diffs: list[StageDiff], decode: list[dict],
                agreement: dict, viz: dict, oracle: dict, seconds: float, **driver) -> CaseResult:
    """A case's result, whichever driver ran it (resident here, a family's layer-by-layer one):
    ``driver`` holds what only that driver has (captures, self-consistency, stream timings)."""
    types = inputs.get("input.mm_token_type_ids")
    agreement = dict(agreement)
    driver.setdefault("positions", agreement.pop("positions_data", None))
    return CaseResult(
        name=f"{model.name}/{scenario.name}", model=model, scenario=scenario, settings=settings, diffs=diffs,
        decode=decode, logits=agreement, viz=viz, oracle=oracle, seconds=seconds,
        image_sizes=[list(decoded[p].shape[:2]) for p in scenario.images],
        n_soft_tokens=0 if types is None else int((types == 1).sum()),
        classes={s.name: s.tol for s in all_stages}, **driver)


class _TableOnly:
    """The stages of a checkpoint whose adapter could not be loaded (for its error results)."""

    def __init__(self, family: Family, model: Path):
        self.family, self.model = family, model

    def stages(self, scenario: Scenario):
        return self.family.stage_table(self.model)


def side_of(exc: BaseException, family, otherwise: str) -> str:
    """"candidate" when the traceback passes through the candidate's packages (a family may name them
    in ``candidate_packages``; the port of this repository by default), else ``otherwise``."""
    packages = tuple(getattr(family, "candidate_packages", ("rmlx",)))
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if any(name == p or name.startswith(p + ".") for p in packages):
            return "candidate"
        tb = tb.tb_next
    return otherwise


def case_error(exc: BaseException, side: str, stage: str | None, last: str | None) -> dict:
    """The record's ``error`` of a case: the exception, the innermost frame, the stage being computed
    and the last stage the candidate captured before it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else None
    return {"side": side, "type": type(exc).__name__, "message": str(exc)[:2000], "where": where,
            "stage": stage, "last_stage": last,
            "traceback": "".join(traceback.format_exception(exc))[-6000:]}


def error_result(adapter, model: Path, scenario: Scenario, decoded: dict[Path, np.ndarray], settings: Settings,
                 exc: BaseException, side: str, partial: dict[str, np.ndarray], inputs: dict | None = None,
                 t0: float | None = None, reference: dict[str, np.ndarray] | None = None) -> CaseResult:
    """The result of a case that raised. The candidate's stages captured before it raised are compared
    as usual; the stage it was computing fails with the exception; later stages fail as not reached.
    A reference or harness error fails every stage as not run (the case is untestable)."""
    try:
        all_stages = list(adapter.stages(scenario))
    except Exception:
        all_stages = []
    selected = {s.name for s in (select(list(settings.stages), all_stages) if all_stages else ())}
    names = [s.name for s in all_stages]
    captured = [n for n in names if n in partial]
    crashed_at = next((n for n in names if n not in partial), decode_stage(1)) if side == "candidate" else None
    err = case_error(exc, side, crashed_at, captured[-1] if captured else None)
    what = f"{err['type']}: {err['message'].splitlines()[0] if err['message'] else ''}"
    diffs = []
    for s in all_stages:  # the selected stages, and the one the candidate crashed in whether selected or not
        if s.name not in selected and s.name != crashed_at:
            continue
        tol = settings.tol(s.tol, s.name)
        if side == "candidate" and s.name in partial and reference is not None and s.name in reference:
            diffs.append(compare(s.name, partial[s.name], reference[s.name], tol, settings.dtype))
        elif s.name == crashed_at:
            diffs.append(StageDiff(s.name, False, tol, settings.dtype, (), error=(
                f"The candidate raised {what} while computing this stage (at {err['where']}; the last stage "
                f"it captured: {err['last_stage'] or 'none'})")))
        else:
            why = (f"not reached: the candidate raised at {crashed_at}" if side == "candidate"
                   else f"not run: the {side} raised {what}")
            diffs.append(StageDiff(s.name, False, tol, settings.dtype, (), error=why[0].upper() + why[1:]))
    if crashed_at == decode_stage(1):  # the prefill completed: a decode step raised
        diffs.append(StageDiff(crashed_at, False, settings.tol("logits", crashed_at), settings.dtype, (),
                               error=f"The candidate raised {what} in a decode step (at {err['where']})"))
    seconds = 0.0 if t0 is None else time.perf_counter() - t0
    return case_result(model, scenario, settings, decoded, inputs or {}, all_stages, diffs, [], {}, {}, {},
                       seconds, self_consistency=None, error=err)


def decode_entries(cand_steps: list[np.ndarray], ref_steps: list[np.ndarray], tokens: list[int], dtype: str,
                   overrides: tuple[Override, ...] = (), tie_margin: float | None = None) -> list[dict]:
    """The record's ``decode`` list: each greedy step's logits compared, with their agreement. Both
    sides are fed ``token`` (the reference's greedy choice at the step before); ``reference_token``
    and ``candidate_token`` are what each side's logits at this step choose next. Where they differ,
    ``near_tie`` says whether the reference's log-prob margin was within ``tie_margin`` (the prefill's,
    :func:`parity.metrics.logit_statistics`: one position has no error distribution of its own); a
    decisive difference fails the step."""
    out = []
    for step, (a, e, token) in enumerate(zip(cand_steps, ref_steps, tokens, strict=True)):
        tol = tolerance("logits", dtype, "free", decode_stage(step + 1), overrides)
        d = compare("logits", a, e, tol, dtype)
        lg = logits_agreement(a, e, tie_margin=tie_margin)
        own, ref = _next_token(a), _next_token(e)
        out.append({"step": step + 1, "token": token, "reference_token": ref, "candidate_token": own,
                    "passed": d.passed and lg["top1_flips_decisive"] == 0, "max_abs": d.max_abs,
                    "mismatched": d.mismatched,
                    "near_tie": None if own == ref else lg["top1_flips_decisive"] == 0, **lg})
    return out


def decisive_flips(diffs: list[StageDiff], agreement: dict) -> list[StageDiff]:
    """Fail the ``logits`` stage when a top-1 choice differs at a wide margin: the reference prefers its
    token by more than the near-tie margin (twice the 99th percentile of the per-position logit error,
    :func:`parity.metrics.logit_statistics`). A flip at a near tie is rounding; one past it is a defect,
    even when every logit is within the absolute tolerance."""
    n = agreement.get("top1_flips_decisive") or 0
    out = []
    for d in diffs:
        if d.stage == "logits" and d.passed and n:
            d = dataclasses.replace(d, passed=False, error=(
                f"{n} top-1 choice(s) differ where the reference's log-prob margin exceeds the near-tie margin "
                f"{agreement.get('tie_margin', float('nan')):.3g} (of {agreement.get('top1_flips', n)} flips)"))
        out.append(d)
    return out


def _next_token(logits: np.ndarray) -> int | None:
    """The greedy choice at the last position (None when its logits are not all finite)."""
    last = np.asarray(logits).reshape(-1, np.shape(logits)[-1])[-1]
    return int(np.argmax(last)) if np.isfinite(last).all() else None


def greedy_agreement(decode: list[dict], prefill: tuple[np.ndarray, np.ndarray] | None = None,
                     tie_margin: float | None = None) -> dict:
    """Greedy decoding on both sides: the tokens each side chooses -- step 0 from the prefill's last
    position (``prefill``: candidate and reference logits), step k from decode step k -- the first
    step whose choices differ, and whether that difference was a near tie (noise) or decisive (a
    defect), by the prefill's ``tie_margin``."""
    chosen = [(d["step"], d.get("reference_token"), d.get("candidate_token"), d.get("near_tie")) for d in decode]
    if prefill is not None:
        a, e = (np.asarray(x).reshape(-1, np.shape(x)[-1])[-1:] for x in prefill)
        own, ref = _next_token(a), _next_token(e)
        near = None if own == ref else logits_agreement(a, e, tie_margin=tie_margin)["top1_flips_decisive"] == 0
        chosen.insert(0, (0, ref, own, near))
    first = next((c for c in chosen if c[1] != c[2]), None)
    return {"steps": len(chosen), "reference": [c[1] for c in chosen], "candidate": [c[2] for c in chosen],
            "first_difference": None if first is None else first[0],
            "near_tie": None if first is None else first[3]}


def oracle_columns(orc: dict[str, np.ndarray], ref: dict[str, np.ndarray], cand: dict[str, np.ndarray],
                   tols: dict, dtype: str = "float32") -> dict[str, dict]:
    """Both sides' distance to the float64 oracle (:func:`parity.metrics.oracle_distance`), for the
    stages all three have."""
    out = {}
    for name in tols:
        if name in orc and name in ref and name in cand and np.issubdtype(np.asarray(orc[name]).dtype, np.floating):
            d = oracle_distance(ref[name], cand[name], orc[name], dtype)
            if d is not None:
                out[name] = d
    return out


def noise_floor(diffs: list[StageDiff], oracle: dict[str, dict], classes: dict[str, str], dtype: str
                ) -> list[StageDiff]:
    """Fail a stage whose candidate is more than its class's ratio times farther from the float64
    oracle than the reference is (:data:`parity.tolerances.NOISE_RATIOS`), even within its absolute
    tolerance: the bound is the reference's own rounding error, measured, not a worst case."""
    out = []
    for d in diffs:
        o = oracle.get(d.stage)
        k = noise_ratio(classes.get(d.stage, ""), dtype)
        if o is not None and k is not None:
            o["allowed_ratio"] = k
            if d.passed and o["ratio"] > k:
                d = dataclasses.replace(d, passed=False, error=(
                    f"Farther from float64 than the reference: the candidate's RMS error {o['candidate_rms']:.3g} "
                    f"is {o['ratio']:.1f}x the reference's {max(o['reference_rms'], o['floor']):.3g} (up to {k:g}x "
                    f"allowed); max |delta| to the reference {d.max_abs:.3g} is within the absolute tolerance "
                    f"{d.tolerance.atol:g}"))
        out.append(d)
    return out


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
           argv: list[str] | None = None, kernels: dict | None = None) -> dict:
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
        "cases": cases,
    })

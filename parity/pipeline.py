"""One case's pipeline, whichever driver produces the values.

A driver runs the two sides of a case; the core does everything else. :class:`CaseRun` is made per
case (the case's stages, selection, tolerances and inputs), and the driver feeds it:

- :meth:`CaseRun.settle` ``(names, reference, candidate)``: the stages among ``names`` that both
  captures hold are compared (when selected; on ``workers`` threads behind the driver when it asks
  for them), written to the ``--dump`` spools, kept when the post-processing needs them (``keep``;
  every stage by default) and taken out of both captures;
- :meth:`CaseRun.finish` ``(logits, decode steps, tokens, driver extras)``: the logits' comparison
  and agreement, the decode steps, greedy decoding, the float64 oracle's columns and noise floor,
  decisive top-1 flips, the HTML report's pictures, and the :class:`CaseResult`;
- :meth:`CaseRun.error`: a side raised; the result says which and where (:func:`error_result`).

The resident driver (``parity.runner.run_case``) settles both whole captures at once; a family's
layer-by-layer driver settles each layer as both sides have it, so it never holds more than about
two layers' captures.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from parity.adapter import Adapter, Capture, Scenario
from parity.dumps import Spool
from parity.metrics import StageDiff, compare, logits_agreement, missing, oracle_distance
from parity.report.viz import case_viz, ref_max_abs
from parity.stages import decode_stage, select
from parity.tolerances import Override, noise_ratio, tolerance

if TYPE_CHECKING:
    from parity.runner import Settings

LOGITS = "logits"  # the stage the next-token statistics and the decode steps are about


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
    stream: dict | None = None  # a layer-by-layer case: timings, layer reads, peak RSS (the family's driver)
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


class CaseRun:
    """One case on its way through the pipeline (see the module docstring).

    ``keep``: which settled stages the post-processing gets (the float64 oracle's columns and the
    pictures read them); None keeps every one. ``spool``: ``--dump`` -- the case's inputs, then each
    selected stage as it is settled, go to two :class:`parity.dumps.Spool` files, which become the
    result's ``reference`` and ``candidate``. ``workers``: threads that compare a settled batch while
    the driver goes on (0: compared at once, on the caller's thread). ``pictures=False``: no HTML
    pictures (``viz`` stays empty; the self-test reads verdicts only)."""

    def __init__(self, adapter: Adapter, model: Path, scenario: Scenario, decoded: dict[Path, np.ndarray],
                 settings: Settings, keep: Callable[[str], bool] | None = None, spool: bool = False,
                 workers: int = 0, pictures: bool = True):
        self.t0 = time.perf_counter()
        self.adapter, self.model, self.scenario = adapter, model, scenario
        self.decoded, self.settings = decoded, settings
        self.all_stages = tuple(adapter.stages(scenario))
        self.stages = select(list(settings.stages), self.all_stages)
        self.tols = {s.name: settings.tol(s.tol, s.name) for s in self.stages}
        self.inputs, self.pre = adapter.inputs(scenario, decoded, settings)
        self.keep = keep
        self.pictures = pictures
        self.diffs: dict[str, StageDiff] = {}
        self.ref_max: dict[str, float | None] = {}
        self.kept_ref: Capture = {}
        self.kept_cand: Capture = {}
        self.spools: dict[str, Spool] | None = None
        if spool:
            self.spools = {"reference": Spool(), "candidate": Spool()}
            for k, v in self.inputs.items():
                self.spools["reference"].add(k, v)
                self.spools["candidate"].add(k, v)
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers else None
        self.running: list[Future] = []
        self.seconds = 0.0  # spent settling (comparing, spooling) on the driver's thread

    @property
    def names(self) -> list[str]:
        """Every stage of the case, selected or not, in forward order."""
        return [s.name for s in self.all_stages]

    def settle(self, names: list[str], reference: Capture, candidate: Capture) -> None:
        """Compare the selected stages among ``names`` that both captures hold, spool them (``--dump``),
        keep what the post-processing reads, and take every stage among ``names`` that both hold out of
        both captures (a stage only one side holds stays: the other may still produce it). A selected
        stage a side lacks fails as missing. The previous batch's compares are collected first. The
        prefill logits are :meth:`finish`'s."""
        self.collect()
        t0 = time.perf_counter()
        dtype = self.settings.dtype
        for n in names:
            if n in self.tols and not (n in reference and n in candidate):
                self.diffs[n] = missing(n, self.tols[n], dtype, candidate, reference)
                self.ref_max[n] = ref_max_abs(reference.get(n))
        pairs = [(n, reference.pop(n), candidate.pop(n)) for n in names if n in reference and n in candidate]
        compared = [p for p in pairs if p[0] in self.tols]
        if self.pool is None:
            for p in compared:
                self._record(*self._compare(p))
        else:
            self.running = [self.pool.submit(self._compare, p) for p in compared]
        if self.spools is not None:
            for name, r, c in compared:
                self.spools["reference"].add(name, r)
                self.spools["candidate"].add(name, c)
        for name, r, c in pairs:
            if self.keep is None or self.keep(name):
                self.kept_ref[name], self.kept_cand[name] = r, c
        self.seconds += time.perf_counter() - t0

    def _compare(self, pair: tuple[str, np.ndarray, np.ndarray]) -> tuple[str, float | None, StageDiff]:
        name, r, c = pair
        return name, ref_max_abs(r), compare(name, c, r, self.tols[name], self.settings.dtype)

    def _record(self, name: str, top: float | None, diff: StageDiff) -> None:
        self.ref_max[name], self.diffs[name] = top, diff

    def collect(self) -> None:
        """Wait for the compares in flight and record their results."""
        t0 = time.perf_counter()
        for future in self.running:
            self._record(*future.result())
        self.running = []
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the compare workers (the driver's ``finally``; :meth:`finish` and :meth:`error` do it too)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def finish(self, logits: tuple[np.ndarray | None, np.ndarray | None] | None, ref_steps: list[np.ndarray],
               cand_steps: list[np.ndarray], tokens: list[int], extras: dict | None = None, **driver) -> CaseResult:
        """Everything after the forwards. ``logits``: (candidate, reference) prefill logits, compared here
        when the driver has not settled them; ``ref_steps``/``cand_steps``: each decode step's logits,
        both sides fed ``tokens`` (the reference's greedy choices); ``extras``: what the reference gave
        beside its capture, for the family's pictures (``Adapter.reference``); ``driver``: the result's
        fields only the driver has (``self_consistency``, ``quantization_cost``, ``stream``, ...)."""
        self.collect()
        self.close()
        s = self.settings
        cand_logits, ref_logits = logits if logits is not None else (None, None)
        del logits
        have_logits = cand_logits is not None and ref_logits is not None
        if LOGITS in self.tols and LOGITS not in self.diffs and have_logits:
            self.ref_max[LOGITS] = ref_max_abs(ref_logits)
            self.diffs[LOGITS] = compare(LOGITS, cand_logits, ref_logits, self.tols[LOGITS], s.dtype,
                                         workers=s.threads)
            if self.spools is not None:
                self.spools["reference"].add(LOGITS, ref_logits)
                self.spools["candidate"].add(LOGITS, cand_logits)
        if have_logits and (self.keep is None or self.keep(LOGITS)):
            self.kept_ref[LOGITS], self.kept_cand[LOGITS] = ref_logits, cand_logits
        agreement = (logits_agreement(cand_logits, ref_logits, per_position=True, workers=s.threads)
                     if have_logits else {})
        kl = agreement.pop("kl", None)
        decode = decode_entries(cand_steps, ref_steps, tokens, s.dtype, s.tol_overrides, agreement.get("tie_margin"))
        greedy = greedy_agreement(decode, (cand_logits, ref_logits) if have_logits else None,
                                  agreement.get("tie_margin"))
        # a stage never settled is missing on the sides that did not give it (the logits: on either)
        held = [set() if x is None else {LOGITS} for x in (cand_logits, ref_logits)]
        del cand_logits, ref_logits
        diffs = [self.diffs[st.name] if st.name in self.diffs  # (a StageDiff is falsy when it fails: no `or`)
                 else missing(st.name, self.tols[st.name], s.dtype, *held) for st in self.stages]
        oracle = oracle_columns(self.adapter.oracle(self.scenario, self.decoded, s), self.kept_ref, self.kept_cand,
                                self.tols, s.dtype) if s.oracle else {}
        diffs = noise_floor(diffs, oracle, {st.name: st.tol for st in self.stages}, s.dtype)
        diffs = decisive_flips(diffs, agreement)
        names = [d.stage for d in diffs]
        viz = case_viz(getattr(self.adapter, "viz", None), self.kept_cand, self.kept_ref, extras or {}, self.inputs,
                       s, kl, names, [self.ref_max.get(n) for n in names]) if self.pictures else {}
        if self.spools is not None:
            driver["reference"], driver["candidate"] = self.spools["reference"], self.spools["candidate"]
        return case_result(self.model, self.scenario, s, self.decoded, self.inputs, self.all_stages, diffs, decode,
                           agreement, viz, oracle, time.perf_counter() - self.t0, greedy=greedy, **driver)

    def error(self, exc: BaseException, side: str, partial: Capture,
              reference: Capture | None = None) -> CaseResult:
        """The result of this case when ``side`` raised (:func:`error_result`)."""
        self.close()
        return error_result(self.adapter, self.model, self.scenario, self.decoded, self.settings, exc, side, partial,
                            self.inputs, self.t0, reference=reference)


def case_result(model: Path, scenario: Scenario, settings: Settings, decoded: dict[Path, np.ndarray],
                inputs: dict[str, np.ndarray], all_stages, diffs: list[StageDiff], decode: list[dict],
                agreement: dict, viz: dict, oracle: dict, seconds: float, **driver) -> CaseResult:
    """A case's result, whichever driver ran it: ``driver`` holds what only that driver has (captures,
    self-consistency, stream timings)."""
    types = inputs.get("input.mm_token_type_ids")
    agreement = dict(agreement)
    driver.setdefault("positions", agreement.pop("positions_data", None))
    return CaseResult(
        name=f"{model.name}/{scenario.name}", model=model, scenario=scenario, settings=settings, diffs=diffs,
        decode=decode, logits=agreement, viz=viz, oracle=oracle, seconds=seconds,
        image_sizes=[list(decoded[p].shape[:2]) for p in scenario.images],
        n_soft_tokens=0 if types is None else int((types == 1).sum()),
        classes={s.name: s.tol for s in all_stages}, **driver)


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
        diffs.append(StageDiff(crashed_at, False, settings.tol(LOGITS, crashed_at), settings.dtype, (),
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
        tol = tolerance(LOGITS, dtype, "free", decode_stage(step + 1), overrides)
        d = compare(LOGITS, a, e, tol, dtype)
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
        if d.stage == LOGITS and d.passed and n:
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

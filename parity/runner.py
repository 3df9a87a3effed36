"""Run cases: each side produces a Capture, metrics compare them, the record is a plain dict.

Inputs are validated before any case runs (every image decoded, every checkpoint loaded strictly),
so bad input fails fast with exit 2 and nothing written.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.adapters.gemma4_unified import Case, Gemma4UnifiedAdapter
from parity.metrics import StageDiff, compare, compare_all, first_divergence
from parity.stages import BY_NAME, Stage, select
from parity.tolerances import tolerance
from rmlx import faults
from rmlx.errors import InputError
from rmlx.image import check_max_soft_tokens, load_image

SCHEMA = "rmlx.parity/1"
MODES = ("free", "teacher")


@dataclass(frozen=True)
class Settings:
    mode: str = "free"
    dtype: str = "float32"
    max_soft_tokens: int = 280
    stages: tuple[str, ...] = ()
    attn_implementation: str = "eager"
    inject: tuple[str, ...] = ()
    oracle: bool = True


@dataclass
class CaseResult:
    case: Case
    diffs: list[StageDiff]
    oracle: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    image_shape: tuple[int, ...] = ()
    n_soft_tokens: int = 0
    reference: dict[str, np.ndarray] | None = None
    candidate: dict[str, np.ndarray] | None = None

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.diffs)


def versions() -> dict[str, str]:
    import mlx.core as mx
    import PIL
    import safetensors
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "mlx": mx.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__, "pillow": PIL.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def run_cases(models: list[Path], images: list[Path], settings: Settings, keep_captures: bool = False,
              progress: Callable[[int, int, str], None] | None = None) -> list[CaseResult]:
    if settings.mode not in MODES:
        raise InputError(f"mode={settings.mode!r} is not one of {MODES}")
    check_max_soft_tokens(settings.max_soft_tokens)
    faults.check(*settings.inject)
    stages: tuple[Stage, ...] = select(list(settings.stages) or None)
    tols = [(s.name, tolerance(s.tol, settings.dtype)) for s in stages]
    decoded = {p: load_image(p) for p in images}  # every image validated before any case runs
    adapters = {m: Gemma4UnifiedAdapter(m, settings.dtype, settings.attn_implementation) for m in models}
    results: list[CaseResult] = []
    total = len(models) * len(images)
    with faults.inject(*settings.inject):
        for m, adapter in adapters.items():
            for p, image in decoded.items():
                case = Case(name=f"{m.name}/{p.stem}", model=m.name, model_dir=m, image=p,
                            max_soft_tokens=settings.max_soft_tokens, dtype=settings.dtype, mode=settings.mode)
                if progress:
                    progress(len(results), total, case.name)
                t0 = time.perf_counter()
                ref = adapter.reference(image, settings.max_soft_tokens, adapter.stages)
                cand = adapter.candidate(image, settings.max_soft_tokens,
                                         teacher=ref if settings.mode == "teacher" else None)
                diffs = compare_all(cand, ref, tols, settings.dtype)
                oracle = {}
                if settings.oracle:
                    orc = adapter.oracle(image, settings.max_soft_tokens)
                    for name, tol in tols:
                        if name in orc and name in ref and name in cand:
                            oracle[name] = {
                                "reference_max_abs": compare(name, ref[name], orc[name], tol, "float64").max_abs,
                                "candidate_max_abs": compare(name, cand[name], orc[name], tol, "float64").max_abs,
                            }
                n_soft = int((ref.get("image.position_ids", np.zeros((1, 0, 2))) != -1).all(-1).sum())
                result = CaseResult(case, diffs, oracle, time.perf_counter() - t0, tuple(image.shape), n_soft)
                if keep_captures:
                    result.reference = dict(ref) | adapter.prompt(n_soft) | {"input.image": image[None]}
                    result.candidate = dict(cand) | adapter.prompt(n_soft) | {"input.image": image[None]}
                results.append(result)
    if progress:
        progress(total, total, "done")
    return results


def record(results: list[CaseResult], settings: Settings, wall_time_s: float, run_id: str) -> dict:
    """The JSON record of a run (the schema every other report is rendered from)."""
    order = {name: i for i, name in enumerate(BY_NAME)}
    cases = []
    first = None
    for r in results:
        fd = first_divergence(r.diffs)
        stages = []
        for d in r.diffs:
            entry = d.to_dict()
            entry["class"] = BY_NAME[d.stage].tol
            if d.stage in r.oracle:
                entry["oracle"] = r.oracle[d.stage]
            stages.append(entry)
        cases.append({
            "name": r.case.name, "model": r.case.model, "model_dir": str(r.case.model_dir),
            "image": str(r.case.image), "image_size": list(r.image_shape[:2]),
            "max_soft_tokens": r.case.max_soft_tokens, "n_soft_tokens": r.n_soft_tokens,
            "dtype": r.case.dtype, "mode": r.case.mode, "passed": r.passed,
            "first_divergence": None if fd is None else {"stage": fd.stage, "message": fd.message()},
            "seconds": round(r.seconds, 3), "stages": stages,
        })
        if fd is not None and (first is None or order[fd.stage] < order[first[1].stage]):
            first = (r, fd)
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["rmlx-parity"] + sys.argv[1:]),
        "versions": versions(),
        "settings": {"mode": settings.mode, "dtype": settings.dtype, "max_soft_tokens": settings.max_soft_tokens,
                     "stages": list(settings.stages), "attn_implementation": settings.attn_implementation,
                     "inject": sorted(set(settings.inject) | faults.enabled())},
        "passed": all(r.passed for r in results),
        "first_divergence": None if first is None else {
            "case": first[0].case.name, "stage": first[1].stage, "max_abs": first[1].max_abs,
            "tolerance": {"rtol": first[1].tolerance.rtol, "atol": first[1].tolerance.atol},
            "error": first[1].error, "message": first[1].message(),
            "oracle": first[0].oracle.get(first[1].stage)},
        "wall_time_s": round(wall_time_s, 3),
        "cases": cases,
    }

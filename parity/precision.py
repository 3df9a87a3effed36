"""``rmlx-parity debug precision``: which modules to keep in full precision so that a quantized port's
logits meet a target (Polygraphy's ``debug precision``, for weight quantization).

The target is the port itself, unquantized, on the same cases (the cost of quantization alone; the
kernels' own error is what a quantized ``run`` measures against the dequantized reference). Steps:

1. the logits of the unquantized port on every case (the target), and of the fully quantized one;
2. each quantizable module's *sensitivity*: the KL of the port with that module alone quantized;
3. modules ordered by sensitivity, most sensitive first; a bisection over k finds the smallest k such
   that keeping the first k in full precision (quantizing the rest) meets the target. Quantization
   errors of different modules do not cancel by design, so meeting the target is taken to be monotone
   in k; the chosen set is measured, never assumed, and the record says if it missed.

The result: a table (module, sensitivity, rank, kept or quantized) with the resulting KL and top-1,
and the kept modules as JSON that ``rmlx-parity convert --keep FILE`` takes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from parity.metrics import fmt, logit_statistics, logits_agreement
from rmlx.errors import InputError
from rmlx.files import read_json

SCHEMA = "rmlx.precision/1"


def _pooled(logits: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    parts = [logits_agreement(a, e, per_position=True)["positions_data"] for a, e in zip(logits, targets, strict=True)]
    stats = logit_statistics({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return {"kl_mean": stats["kl_mean"], "kl_max": stats["kl_max"], "top1": stats["top1_agreement"]}


def meets(m: dict, target_kl: float | None, target_top1: float | None) -> bool:
    if target_kl is not None and not m["kl_mean"] <= target_kl:
        return False
    return target_top1 is None or m["top1"] >= target_top1


def search(adapter, cases: list[tuple], decoded: dict, settings, mode: str, target_kl: float | None,
           target_top1: float | None, progress=None) -> dict:
    """The search above on ``cases`` [(scenario, inputs)] of one checkpoint; the record (``SCHEMA``)."""
    if (target_kl is None) == (target_top1 is None):
        raise InputError("give one target: --target-kl X or --target-top1 Y")
    if not (hasattr(adapter, "quantizable") and hasattr(adapter, "port_logits")):
        raise InputError(f"{adapter.model_dir}: its model family has no precision debugger (quantizable, port_logits)")
    t0 = time.perf_counter()
    modules = adapter.quantizable(mode)
    if not modules:
        raise InputError(f"{adapter.model_dir}: nothing to quantize in mode {mode}")
    targets = adapter.port_logits(cases, decoded, settings, None)
    runs = 0

    def measure(keep: frozenset[str]) -> dict:
        nonlocal runs
        runs += 1
        if progress:
            progress(runs, len(modules) + 2 + int(np.ceil(np.log2(len(modules) + 1))), f"{len(keep)} kept")
        return _pooled(adapter.port_logits(cases, decoded, settings, mode, keep), targets)

    everything = frozenset(modules)
    all_quantized = measure(frozenset())
    sensitivity = {m: measure(everything - {m}) for m in modules}  # only m quantized
    order = sorted(modules, key=lambda m: (-sensitivity[m]["kl_mean"], sensitivity[m]["top1"], m))
    if meets(all_quantized, target_kl, target_top1):
        k, final = 0, all_quantized
    else:
        lo, hi, final = 0, len(order), None  # hi keeps everything: the target itself (KL 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            m = measure(frozenset(order[:mid]))
            if meets(m, target_kl, target_top1):
                hi, final = mid, m
            else:
                lo = mid
        k = hi
        if final is None:
            final = measure(frozenset(order[:k]))
    kept = set(order[:k])
    rows = [{"module": m, "rank": i + 1, "alone_kl_mean": sensitivity[m]["kl_mean"],
             "alone_top1": sensitivity[m]["top1"], "kept": m in kept} for i, m in enumerate(order)]
    return {"schema": SCHEMA, "model": str(adapter.model_dir), "mode": mode,
            "target": {"kl_mean": target_kl, "top1": target_top1},
            "cases": [s.name for s, _ in cases], "measured_against": "the port unquantized, same cases",
            "all_quantized": all_quantized, "result": final, "met": meets(final, target_kl, target_top1),
            "keep": sorted(kept), "quantized": len(order) - k, "modules": rows, "forwards": runs * len(cases),
            "seconds": round(time.perf_counter() - t0, 3)}


def keep_file(rec: dict) -> dict:
    """The JSON ``rmlx-parity convert --keep FILE`` takes."""
    return {"schema": SCHEMA, "mode": rec["mode"], "keep": rec["keep"], "from": rec["model"],
            "target": rec["target"], "result": rec["result"]}


def read_keep(path: Path, mode: str) -> list[str]:
    """The module paths of a ``--keep`` file (written by ``debug precision``); bad files: ``InputError``."""
    data = read_json(path, "--keep", SCHEMA, " (write it with 'rmlx-parity debug precision')")
    if data.get("mode") != mode:
        raise InputError(f"--keep {path}: written for mode {data.get('mode')!r}, not {mode!r}")
    keep = data.get("keep")
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise InputError(f"--keep {path}: 'keep' must be a list of module paths")
    return keep


def to_terminal(rec: dict) -> str:
    t = rec["target"]
    goal = f"KL mean <= {fmt(t['kl_mean'])}" if t["kl_mean"] is not None else f"top-1 >= {t['top1']:.2%}"
    lines = [f"debug precision: {rec['mode']} on {Path(rec['model']).name}, {len(rec['cases'])} case(s), target "
             f"{goal} against the unquantized port", "",
             f"{'rank':>4}  {'module':<44}  {'alone KL mean':>13}  {'alone top-1':>11}  precision"]
    for r in rec["modules"]:
        lines.append(f"{r['rank']:>4}  {r['module']:<44}  {fmt(r['alone_kl_mean']):>13}  {r['alone_top1']:>11.2%}  "
                     f"{'kept' if r['kept'] else 'quantized'}")
    a, f = rec["all_quantized"], rec["result"]
    lines += ["", f"all quantized: KL mean {fmt(a['kl_mean'])}, top-1 {a['top1']:.2%}",
              f"{len(rec['keep'])} kept, {rec['quantized']} quantized: KL mean {fmt(f['kl_mean'])}, top-1 "
              f"{f['top1']:.2%} -> target {'MET' if rec['met'] else 'NOT MET'} ({rec['forwards']} forwards, "
              f"{rec['seconds']:.1f} s)"]
    return "\n".join(lines)

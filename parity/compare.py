"""``rmlx-parity compare``: two stage dumps, compared stage by stage with the run's tolerances.

A dump is a safetensors file keyed by public stage names (``parity/stages.py``), batch axis kept,
plus the case's inputs under ``input.*`` -- what ``rmlx-parity run --dump`` writes, and what a port
in another language writes to be checked against HF. Nothing here runs a model.

- The tolerance class of a stage comes from its name (``stages.classify``); stages are compared in
  forward order (``stages.order_key``) and the first failing one is the headline, as in a run.
- A stage name outside the vocabulary, or a stage in one dump only, is a failed stage (listed, never
  skipped); ``--stages GLOB`` narrows what is compared and required.
- ``input.*`` keys present in both dumps must be identical, or the dumps are of different inputs
  (bad input, exit 2); an input present in one dump only is listed.
- bf16 and fp16 tensors are widened to float32 on load (exactly); ``dtype`` is the comparison dtype
  (tolerances, ULPs): given, or from the dumps' ``dtype`` metadata, or bf16 when a dump holds bf16.

A side is a file, or a folder: ``DIR/<side>.safetensors`` (one case), or ``DIR/<case>/<side>.safetensors``
(the ``run --dump`` layout) and ``DIR/<case>.safetensors``, cases paired by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from parity.metrics import StageDiff, compare_all, logits_agreement
from parity.runner import CaseResult, Settings, record
from parity.stages import classify, matches_any, order_key
from parity.tolerances import EXACT, tolerance
from rmlx.errors import InputError
from rmlx.load import read_safetensors_header

INPUT_PREFIX = "input."
DTYPES = ("float32", "bfloat16")
SIDES = ("reference", "candidate")
_WIDEN = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}


@dataclass
class Dump:
    path: Path
    stages: dict[str, np.ndarray]  # floating stages widened to float32 (exact)
    inputs: dict[str, np.ndarray]  # the input.* keys, as stored
    metadata: dict[str, str]
    dtypes: dict[str, str]  # the stored dtype of every stage


def load_dump(path: Path) -> Dump:
    """Read one dump; any unreadable file is an ``InputError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    header = read_safetensors_header(path)
    try:
        arrays = load_file(str(path))
    except (SafetensorError, ValueError, TypeError, OSError) as e:
        raise InputError(f"{path}: cannot read safetensors data ({e})") from None
    meta = header.get("__metadata__") or {}
    stages, inputs, dtypes = {}, {}, {}
    for key, x in arrays.items():
        if key.startswith(INPUT_PREFIX):
            inputs[key] = x
            continue
        dtypes[key] = _WIDEN.get(x.dtype, x.dtype.name)
        stages[key] = x.astype(np.float32) if x.dtype in _WIDEN else x
    return Dump(path, stages, inputs, dict(meta), dtypes)


def infer_dtype(ref: Dump, cand: Dump) -> str:
    """The comparison dtype: the reference's ``dtype`` metadata, else the candidate's, else
    ``bfloat16`` when either dump stores a bf16 stage, else ``float32``."""
    for d in (ref, cand):
        meta = d.metadata.get("dtype")
        if meta is not None:
            if meta not in DTYPES:
                raise InputError(f"{d.path}: metadata dtype {meta!r} has no tolerances; "
                                 f"pass --dtype {' or '.join(DTYPES)}")
            return meta
    stored = {t for d in (ref, cand) for t in d.dtypes.values()}
    if "bfloat16" in stored:
        return "bfloat16"
    if "float16" in stored:
        raise InputError(f"{ref.path}: float16 stages have no tolerances; pass --dtype {' or '.join(DTYPES)}")
    return "float32"


def check_inputs(ref: Dump, cand: Dump) -> dict[str, list[str]]:
    """``input.*`` keys in both dumps must be equal (else ``InputError``); returns what was compared
    and what is in one dump only."""
    for key in sorted(ref.inputs.keys() & cand.inputs.keys()):
        a, b = ref.inputs[key], cand.inputs[key]
        what = f"the dumps are of different inputs: {key}"
        if a.shape != b.shape:
            raise InputError(f"{what} has shape {a.shape} in {ref.path}, {b.shape} in {cand.path}")
        same = a == b
        if a.dtype.kind == "f" and b.dtype.kind == "f":
            same |= np.isnan(a) & np.isnan(b)
        if not same.all():
            idx = tuple(int(i) for i in np.argwhere(~same)[0])
            raise InputError(f"{what} differs at index {idx} ({ref.path}: {a[idx]}, {cand.path}: {b[idx]}; "
                             f"{int((~same).sum())} of {a.size} elements differ)")
    return {"compared": sorted(ref.inputs.keys() & cand.inputs.keys()),
            "only_in_reference": sorted(ref.inputs.keys() - cand.inputs.keys()),
            "only_in_candidate": sorted(cand.inputs.keys() - ref.inputs.keys())}


def _unknown(name: str, ref: Dump, cand: Dump, dtype: str) -> StageDiff:
    where = {(True, True): "in both dumps", (True, False): "in the reference dump only",
             (False, True): "in the candidate dump only"}[(name in ref.stages, name in cand.stages)]
    shape = (ref.stages.get(name) if name in ref.stages else cand.stages[name]).shape
    return StageDiff(name, False, EXACT, dtype, tuple(shape),
                     error=f"Unknown stage name ({where}): not in the stage vocabulary, so it has no tolerance.\n"
                           "Note: run 'rmlx-parity stages' for the public names, or leave it out with --stages")


def compare_case(name: str, ref: Dump, cand: Dump, dtype: str, mode: str, patterns: list[str]):
    """One case -> (``runner.CaseResult``, the case's ``compare`` section)."""
    t0 = time.perf_counter()
    names = ref.stages.keys() | cand.stages.keys()
    if patterns:
        names = {n for n in names if matches_any(n, patterns)}
        if not names:
            raise InputError(f"--stages {' '.join(patterns)} matches no stage of {ref.path} or {cand.path}. "
                             "Note: run 'rmlx-parity stages' to list the stage names")
    ordered = sorted(names, key=order_key)
    classes = {n: classify(n) for n in ordered}
    known = [(n, tolerance(s.tol, dtype, mode)) for n, s in classes.items() if s is not None]
    diffs = compare_all(cand.stages, ref.stages, known, dtype)
    diffs += [_unknown(n, ref, cand, dtype) for n, s in classes.items() if s is None]  # they sort last
    section = {
        "reference": str(ref.path), "candidate": str(cand.path),
        "unknown": sorted(n for n, s in classes.items() if s is None),
        "missing_in_candidate": sorted(n for n in names if n not in cand.stages),
        "missing_in_reference": sorted(n for n in names if n not in ref.stages),
        "inputs": check_inputs(ref, cand),
        "metadata": {"reference": ref.metadata, "candidate": cand.metadata},
        "stored_dtypes": {"reference": sorted(set(ref.dtypes.values())),
                          "candidate": sorted(set(cand.dtypes.values()))},
    }
    logits = {}
    if "logits" in ref.stages and "logits" in cand.stages:
        a, e = cand.stages["logits"], ref.stages["logits"]
        if a.shape == e.shape and a.size and np.isfinite(a).all() and np.isfinite(e).all():
            logits = logits_agreement(a, e)
    types = ref.inputs.get("input.mm_token_type_ids", cand.inputs.get("input.mm_token_type_ids"))
    model, _, scenario = name.partition("/")
    result = CaseResult(  # no scenario: a dump carries its inputs, not the prompt they were built from
        name=name, model=Path(model if scenario else ""), scenario=None,
        settings=Settings(mode=mode, dtype=dtype), diffs=diffs, logits=logits,
        n_soft_tokens=0 if types is None else int((types == 1).sum()),
        classes={n: ("unknown" if s is None else s.tol) for n, s in classes.items()},
        seconds=time.perf_counter() - t0)
    return result, section


def _case_name(ref: Path, cand: Path) -> str:
    """A file pair's case name: the case folder of a side in the ``run --dump`` layout (the reference
    first), else the common file stem, else ``<ref stem>-vs-<cand stem>``."""
    for p in (ref, cand):
        if p.stem in SIDES:
            return p.parent.name
    return ref.stem if ref.stem == cand.stem else f"{ref.stem}-vs-{cand.stem}"


def _case_files(folder: Path, side: str) -> dict[str, Path]:
    """{case name: file} of one side of a folder (see the module docstring)."""
    if (folder / f"{side}.safetensors").is_file():
        return {folder.name: folder / f"{side}.safetensors"}
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (p / f"{side}.safetensors").is_file():
            found[p.name] = p / f"{side}.safetensors"
        elif p.is_file() and p.suffix == ".safetensors":
            found[p.stem] = p
    if not found:
        raise InputError(f"{folder}: no {side}.safetensors, <case>/{side}.safetensors or <case>.safetensors in it")
    return found


def pair(ref: Path, cand: Path | None) -> tuple[list[tuple[str, Path, Path]], dict[str, list[str]]]:
    """[(case name, reference file, candidate file)] and the cases found on one side only. Case names
    are the dump folder names with ``__`` read back as ``/`` (``tiny__image__gradient`` ->
    ``tiny/image/gradient``, the run's case name)."""
    if cand is None and ref.is_file():
        raise InputError(f"{ref}: a dump file needs a second one to compare with (REF CAND)")
    cand = ref if cand is None else cand
    for p in (ref, cand):
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
    if ref.is_file() != cand.is_file():
        raise InputError(f"{ref} and {cand}: give two dump files or two folders, not one of each")
    if ref.is_file():
        if ref.resolve() == cand.resolve():
            raise InputError(f"{ref}: the reference and the candidate are the same file")
        return [(_case_name(ref, cand).replace("__", "/"), ref, cand)], {"reference": [], "candidate": []}
    refs, cands = _case_files(ref, "reference"), _case_files(cand, "candidate")
    both = sorted(refs.keys() & cands.keys())
    if not both:
        raise InputError(f"no case in both {ref} ({', '.join(sorted(refs))}) and {cand} ({', '.join(sorted(cands))})")
    pairs = [(c.replace("__", "/"), refs[c], cands[c]) for c in both]
    if any(r.resolve() == c.resolve() for _, r, c in pairs):
        raise InputError(f"{ref}: the reference and the candidate are the same file")
    return pairs, {"candidate": [c.replace("__", "/") for c in sorted(refs.keys() - cands.keys())],
                   "reference": [c.replace("__", "/") for c in sorted(cands.keys() - refs.keys())]}


def compare_paths(ref: Path, cand: Path | None, dtype: str = "auto", mode: str = "free",
                  patterns: list[str] | None = None, run_id: str = "", argv: list[str] | None = None) -> dict:
    """Compare every paired case and return the record (``runner.record``'s schema plus ``compare``).
    Every file is read and every input checked before anything is returned: bad input raises."""
    t0 = time.perf_counter()
    pairs, missing_cases = pair(ref, cand)
    for _, r, c in pairs:  # every header first: a corrupt file fails before any work
        read_safetensors_header(r)
        read_safetensors_header(c)
    results, sections, dtypes, soft, meta = [], {}, set(), set(), {}
    for name, r, c in pairs:
        dr, dc = load_dump(r), load_dump(c)
        meta = meta or dr.metadata
        if "image.pixel_values" in dr.stages:  # padded to max_soft_tokens rows: (B, max_soft_tokens, 6912)
            soft.add(int(dr.stages["image.pixel_values"].shape[-2]))
        case_dtype = infer_dtype(dr, dc) if dtype == "auto" else dtype
        dtypes.add(case_dtype)
        if len(dtypes) > 1:
            raise InputError(f"the cases' dumps are of different dtypes {sorted(dtypes)}; pass --dtype")
        result, sections[name] = compare_case(name, dr, dc, case_dtype, mode, list(patterns or ()))
        results.append(result)
    # what the dumps' run used, when their metadata says so; renderers need strings
    policy = meta.get("mask_policy", "unknown")
    settings = Settings(mode=mode, dtype=dtypes.pop(), max_soft_tokens=max(soft) if soft else None,
                        stages=tuple(patterns or ()), attn_implementation=meta.get("attn_implementation", "unknown"),
                        inject=(), oracle=False, mask_policy=policy,
                        candidate_mask_policy=meta.get("candidate_mask_policy", policy), decode_steps=0)
    rec = record(results, settings, time.perf_counter() - t0, run_id, argv=argv)
    rec["settings"]["inject"] = []  # nothing runs here: faults switched on in this process are irrelevant
    for case in rec["cases"]:
        case["compare"] = sections[case["name"]]
        case["model_dir"] = case["image"] = None
        case["reference_self_consistency"] = {"max_abs_logits": None, "what": "not measured: compared from dumps"}
    union = {k: sorted({n for s in sections.values() for n in s[k]})
             for k in ("unknown", "missing_in_candidate", "missing_in_reference")}
    rec["compare"] = {"reference": str(ref), "candidate": str(ref if cand is None else cand), **union,
                      "cases_missing_in_candidate": missing_cases["candidate"],
                      "cases_missing_in_reference": missing_cases["reference"]}
    if missing_cases["candidate"] or missing_cases["reference"]:
        rec["passed"] = False
    return rec


def summary_lines(rec: dict) -> list[str]:
    """What the terminal shows of the ``compare`` section: the two sides and every listed name."""
    cmp = rec["compare"]
    out = [f"compared: {cmp['reference']} (reference) vs {cmp['candidate']} (candidate)"]
    for key, what in (("unknown", "unknown stage names"), ("missing_in_candidate", "stages missing in the candidate"),
                      ("missing_in_reference", "stages missing in the reference"),
                      ("cases_missing_in_candidate", "cases missing in the candidate"),
                      ("cases_missing_in_reference", "cases missing in the reference")):
        if cmp[key]:
            out.append(f"{what} ({len(cmp[key])}): " + ", ".join(cmp[key]))
    for case in rec["cases"]:
        inputs = case["compare"]["inputs"]
        one_side = [f"{k} only in the {side}" for side in ("reference", "candidate") for k in inputs[f"only_in_{side}"]]
        prefix = f"{case['name']}: " if len(rec["cases"]) > 1 else ""
        out.append(f"{prefix}inputs identical: {', '.join(inputs['compared']) or 'none in both dumps'}"
                   + (f"; {', '.join(one_side)}" if one_side else ""))
    return out

"""``rmlx-parity compare``: two stage dumps, compared stage by stage with the run's tolerances.

A dump is a safetensors file keyed by public stage names (``parity/stages.py``), batch axis kept,
plus the case's inputs under ``input.*`` -- what ``rmlx-parity run --dump`` writes, and what another
port writes to be checked against HF. Nothing here runs a model.

- The stages both dumps hold are compared, in forward order (``stages.order_key``), with the
  tolerance class their name gives (``stages.classify``); the first failing one is the headline.
- A stage in one dump only is listed apart (missing in, or extra in, the candidate): never compared,
  never the first divergence. ``--require-all`` makes each of them a failed stage instead.
- A name outside the vocabulary held by both dumps is a failed stage (it has no tolerance);
  ``--stages GLOB`` narrows what is compared and required. A case in one folder only fails.
- ``input.*`` keys present in both dumps must be identical, or the dumps are of different inputs
  (bad input, exit 2); an input present in one dump only is listed.
- bf16 and fp16 tensors are widened to float32 on load (exactly); ``dtype`` is the comparison dtype
  (tolerances, ULPs): given, or from the dumps' ``dtype`` metadata, or bf16 when a dump holds bf16.

The safetensors metadata of a dump (strings) describes the run that wrote it. Read here: ``dtype``,
``mode``, ``mask_policy`` (the policy that side followed), ``attn_implementation``, ``max_soft_tokens``
and ``config_sha256`` (of the checkpoint's config.json); every key is shown. The record and the header
show what the dumps say and nothing else: a setting no dump states is null. Dumps that state a
different ``dtype``, ``mode`` or ``config_sha256`` get a warning, not an error.

A side is a file, or a folder: ``DIR/<side>.safetensors`` (one case), or ``DIR/<case>/<side>.safetensors``
(the ``run --dump`` layout) and ``DIR/<case>.safetensors``, cases paired by name.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity import dumps
from parity.adapter import option_facts, options
from parity.metrics import StageDiff, compare_all, logits_agreement
from parity.pipeline import CaseResult
from parity.runner import Settings, record
from parity.stages import classify, matches_any, order_key
from parity.tolerances import EXACT, Override, tolerance
from rmlx.errors import InputError
from rmlx.files import read_safetensors_header

INPUT_PREFIX = "input."
DTYPES = ("float32", "bfloat16")
MODES = ("free", "teacher")
WARN_IF_DIFFERENT = ("dtype", "mode", "config_sha256")
SIDES = ("reference", "candidate")
_WIDEN = ("bfloat16", "float16")  # stored dtypes a dump's floating stages are widened from


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

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    header = read_safetensors_header(path)
    try:
        arrays = dumps.read(path)
    except (SafetensorError, ValueError, TypeError, OSError) as e:
        raise InputError(f"{path}: cannot read safetensors data ({e})") from None
    meta = header.get("__metadata__") or {}
    stages, inputs, dtypes = {}, {}, {}
    for key, x in arrays.items():
        if key.startswith(INPUT_PREFIX):
            inputs[key] = x
            continue
        dtypes[key] = x.dtype.name
        stages[key] = x.astype(np.float32) if x.dtype.name in _WIDEN else x
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


def infer_mode(ref: Dump, cand: Dump) -> str:
    """The tolerance table: the reference's ``mode`` metadata, else the candidate's, else ``free``."""
    for d in (ref, cand):
        meta = d.metadata.get("mode")
        if meta is not None:
            if meta not in MODES:
                raise InputError(f"{d.path}: metadata mode {meta!r} is not one of {MODES}; pass --mode")
            return meta
    return "free"


def metadata_warnings(ref: Dump, cand: Dump) -> list[str]:
    """A line for each of ``WARN_IF_DIFFERENT`` that both dumps state differently."""
    return [f"the dumps' metadata disagree on {key}: {ref.metadata[key]!r} in {ref.path}, "
            f"{cand.metadata[key]!r} in {cand.path}"
            for key in WARN_IF_DIFFERENT
            if key in ref.metadata and key in cand.metadata and ref.metadata[key] != cand.metadata[key]]


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


def compare_case(name: str, ref: Dump, cand: Dump, dtype: str, mode: str, patterns: list[str],
                 require_all: bool = False, overrides: tuple[Override, ...] = ()):
    """One case -> (``pipeline.CaseResult``, the case's ``compare`` section). The stages of both dumps
    are compared; with ``require_all`` a stage of one dump only is a failed stage too."""
    t0 = time.perf_counter()
    names = ref.stages.keys() | cand.stages.keys()
    if patterns:
        names = {n for n in names if matches_any(n, patterns)}
        if not names:
            raise InputError(f"--stages {' '.join(patterns)} matches no stage of {ref.path} or {cand.path}. "
                             "Note: run 'rmlx-parity stages' to list the stage names")
    both = {n for n in names if n in ref.stages and n in cand.stages}
    if not both and not require_all:
        raise InputError(f"{cand.path}: no stage in common with {ref.path} ({len(names & ref.stages.keys())} "
                         f"stages in the reference, {len(names & cand.stages.keys())} in the candidate"
                         + (f", matching --stages {' '.join(patterns)}" if patterns else "") + ")")
    judged = sorted(names if require_all else both, key=order_key)
    classes = {n: classify(n) for n in sorted(names, key=order_key)}
    known = [(n, tolerance(classes[n].tol, dtype, mode, n, overrides)) for n in judged if classes[n] is not None]
    diffs = compare_all(cand.stages, ref.stages, known, dtype)
    diffs += [_unknown(n, ref, cand, dtype) for n in judged if classes[n] is None]  # they sort last
    section = {
        "reference": str(ref.path), "candidate": str(cand.path),
        "compared": sorted(both, key=order_key),
        "missing_in_candidate": sorted((n for n in names if n not in cand.stages), key=order_key),
        "extra_in_candidate": sorted((n for n in names if n not in ref.stages), key=order_key),
        "unknown": sorted(n for n, s in classes.items() if s is None),
        "inputs": check_inputs(ref, cand),
        "metadata": {"reference": ref.metadata, "candidate": cand.metadata},
        "warnings": metadata_warnings(ref, cand),
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


def compare_paths(ref: Path, cand: Path | None, dtype: str = "auto", mode: str = "auto",
                  patterns: list[str] | None = None, run_id: str = "", argv: list[str] | None = None,
                  require_all: bool = False, overrides: tuple[Override, ...] = ()) -> dict:
    """Compare every paired case and return the record (``runner.record``'s schema plus ``compare``).
    Every file is read and every input checked before anything is returned: bad input raises."""
    t0 = time.perf_counter()
    pairs, missing_cases = pair(ref, cand)
    for _, r, c in pairs:  # every header first: a corrupt file fails before any work
        read_safetensors_header(r)
        read_safetensors_header(c)
    results, sections, dtypes, modes, metas = [], {}, set(), set(), []
    for name, r, c in pairs:
        dr, dc = load_dump(r), load_dump(c)
        metas.append((dr.metadata, dc.metadata))
        dtypes.add(infer_dtype(dr, dc) if dtype == "auto" else dtype)
        modes.add(infer_mode(dr, dc) if mode == "auto" else mode)
        for what, seen, flag in (("dtypes", dtypes, "--dtype"), ("modes", modes, "--mode")):
            if len(seen) > 1:
                raise InputError(f"the cases' dumps are of different {what} {sorted(seen)}; pass {flag}")
        result, sections[name] = compare_case(name, dr, dc, next(iter(dtypes)), next(iter(modes)),
                                              list(patterns or ()), require_all, overrides)
        results.append(result)
    meta = {side: _agreed([m[i] for m in metas]) for i, side in enumerate(SIDES)}
    settings = Settings(mode=modes.pop(), dtype=dtypes.pop(), stages=tuple(patterns or ()), inject=(),
                        oracle=False, decode_steps=0, tol_overrides=overrides)
    rec = record(results, settings, time.perf_counter() - t0, run_id, argv=argv)
    # what the dumps' runs used, as their metadata says (null when no dump says)
    rec["settings"] |= {"inject": [], **_stated(*meta.values())}
    for case, (ref_meta, cand_meta) in zip(rec["cases"], metas, strict=True):
        stated = _stated(ref_meta, cand_meta)
        case |= {"compare": sections[case["name"]], "model_dir": None, "image": None,
                 **{k: stated[k] for k in options()},
                 "reference_self_consistency": {"max_abs_logits": None, "what": "not measured: compared from dumps"}}
    union = {k: sorted({n for s in sections.values() for n in s[k]}, key=order_key)
             for k in ("compared", "missing_in_candidate", "extra_in_candidate", "unknown")}
    rec["compare"] = {"reference": str(ref), "candidate": str(ref if cand is None else cand),
                      "require_all": require_all, **union,
                      "cases_missing_in_candidate": missing_cases["candidate"],
                      "cases_missing_in_reference": missing_cases["reference"],
                      "metadata": meta,
                      "warnings": list(dict.fromkeys(w for s in sections.values() for w in s["warnings"]))}
    if missing_cases["candidate"] or missing_cases["reference"]:
        rec["passed"] = False
    return rec


def _agreed(metas: list[dict[str, str]]) -> dict[str, str]:
    """The metadata every one of ``metas`` that states a key agrees on."""
    out: dict[str, str] = {}
    for key in sorted({k for m in metas for k in m}):
        values = {m[key] for m in metas if key in m}
        if len(values) == 1:
            out[key] = values.pop()
    return out


def _stated(ref: dict[str, str], cand: dict[str, str]) -> dict:
    """The run settings the dumps state (None where they do not): each family option as the reference's
    dump states it, else the candidate's; an option that is the candidate's own value of another
    (``candidate_of``) is that option as the candidate's dump states it, and that other option the
    reference's own."""
    declared = options()
    per_side = {o.candidate_of for o in declared.values() if o.candidate_of is not None}
    out: dict[str, object] = {}
    for name, opt in declared.items():
        if opt.candidate_of is not None:
            out[name] = opt.parse(cand.get(opt.candidate_of))
        else:
            out[name] = opt.parse(ref.get(name) if name in per_side else ref.get(name, cand.get(name)))
    out["attn_implementation"] = ref.get("attn_implementation", cand.get("attn_implementation"))
    return out


def report_files(rec: dict) -> dict[str, str]:
    """The report folder of a comparison: {file name: text}."""
    from parity.report import html, json_text, junit

    shown = copy.deepcopy(rec)  # the HTML page takes strings where the record has nulls
    for entry in (shown["settings"], *shown["cases"]):
        for key in (*options(), "attn_implementation"):
            if key in entry and entry[key] is None:
                entry[key] = "not recorded"
    return {"report.json": json_text(rec), "report.md": to_markdown(rec), "report.html": html.to_html(shown),
            "junit.xml": junit.to_junit(rec)}


def headline(rec: dict) -> list[str]:
    """The two header lines: the verdict with the settings the dumps state, then what was compared."""
    s = rec["settings"]
    n_pass = sum(c["passed"] for c in rec["cases"])
    facts = [f"mode {s['mode']}", f"dtype {s['dtype']}"]
    facts += option_facts(s, sided=False)
    if s.get("attn_implementation") is not None:
        facts.append(f"attention {s['attn_implementation']}")
    facts += option_facts(s, sided=True)  # the candidate's own values last
    return [f"rmlx parity compare {'PASS' if rec['passed'] else 'FAIL'}: {n_pass}/{len(rec['cases'])} cases passed "
            f"({', '.join(facts)})",
            f"{stage_counts(rec)}; wall time {rec['wall_time_s']:.1f} s"]


def stage_counts(rec: dict) -> str:
    """How many stages were compared, and how many were in one dump only."""
    cmp = rec["compare"]
    cases = f" over {len(rec['cases'])} cases" if len(rec["cases"]) > 1 else ""
    return (f"{len(cmp['compared'])} stages compared (in both dumps){cases}, "
            f"{len(cmp['missing_in_candidate'])} missing in the candidate, "
            f"{len(cmp['extra_in_candidate'])} extra in the candidate"
            + (" (--require-all: each fails)" if cmp["require_all"] and (cmp["missing_in_candidate"]
                                                                       or cmp["extra_in_candidate"]) else ""))


_LISTS = (("missing_in_candidate", "stages missing in the candidate"),
          ("extra_in_candidate", "stages extra in the candidate"),
          ("unknown", "unknown stage names"),
          ("cases_missing_in_candidate", "cases missing in the candidate"),
          ("cases_missing_in_reference", "cases missing in the reference"))


def summary_lines(rec: dict) -> list[str]:
    """What the terminal shows of the ``compare`` section under the table: the two sides, their
    metadata and every name listed apart."""
    cmp = rec["compare"]
    out = [f"dumps: {cmp['reference']} (reference) vs {cmp['candidate']} (candidate)"]
    for side in SIDES:
        meta = cmp["metadata"][side]
        out.append(f"{side} metadata: " + (", ".join(f"{k} {v}" for k, v in meta.items()) or "none"))
    for key, what in _LISTS:
        if cmp[key]:
            out.append(f"{what} ({len(cmp[key])}): " + ", ".join(cmp[key]))
    for case in rec["cases"]:
        inputs = case["compare"]["inputs"]
        one_side = [f"{k} only in the {side}" for side in SIDES for k in inputs[f"only_in_{side}"]]
        prefix = f"{case['name']}: " if len(rec["cases"]) > 1 else ""
        out.append(f"{prefix}inputs identical: {', '.join(inputs['compared']) or 'none in both dumps'}"
                   + (f"; {', '.join(one_side)}" if one_side else ""))
    out += [f"warning: {w}" for w in cmp["warnings"]]
    return out


def to_terminal(rec: dict, wide: bool = False, notes: list[str] = ()) -> str:
    """The run's terminal table under the comparison's own header, the summary and ``notes`` before
    the first divergence, and the verdict last."""
    from parity.report import to_terminal as run_terminal

    # the run's two header lines state settings a dump may not have: the comparison's own replace them
    body = run_terminal(rec, wide=wide, notes=[*summary_lines(rec), *notes]).split("\n")[2:]
    return "\n".join(headline(rec) + body)


def to_markdown(rec: dict) -> str:
    """The run's Markdown report under the comparison's own header, with a section on the dumps."""
    from parity.report import to_markdown as run_markdown

    lines = run_markdown(rec).rstrip("\n").split("\n")
    head = headline(rec)
    lines[0], lines[2] = "# " + head[0], head[1]  # the run's header: "# verdict", "", versions
    cmp = rec["compare"]
    lines += ["", "## Dumps", "", f"Reference `{cmp['reference']}`, candidate `{cmp['candidate']}`.", "",
              f"- {stage_counts(rec)}"]
    lines += [f"- {what} ({len(cmp[key])}): " + ", ".join(f"`{n}`" for n in cmp[key])
              for key, what in _LISTS if cmp[key]]
    lines += [f"- **warning:** {w}" for w in cmp["warnings"]]
    meta = cmp["metadata"]
    if meta["reference"] or meta["candidate"]:
        cell = lambda v: v.replace("|", "\\|")  # noqa: E731
        lines += ["", "| metadata | reference | candidate |", "|---|---|---|"]
        lines += [f"| {cell(k)} | {cell(meta['reference'].get(k, '-'))} | {cell(meta['candidate'].get(k, '-'))} |"
                  for k in sorted(meta["reference"].keys() | meta["candidate"].keys())]
    return "\n".join(lines) + "\n"

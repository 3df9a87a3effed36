"""Reports rendered from the JSON record: Markdown, a terminal table, a progress bar; atomic writes.

The JSON record is the source of truth; nothing here computes a metric.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _json_string  # json.dumps's own str encoder
from pathlib import Path

import numpy as np

from parity.atomic import staged
from parity.metrics import fmt


def _fmt(v, spec: str = ".2e") -> str:
    return fmt(v, spec, null="exact")


def _db(stages: dict, name: str) -> str:
    return "-" if name not in stages else _fmt(stages[name], ".1f")


def forward_order(cases: Sequence[Sequence[str]]) -> list[str]:
    """Every stage name of ``cases`` (each a list in forward order) once, in forward order: a stage first
    seen in a later case goes after its predecessor in that case (before its successor when it has
    none), so a text-only case's table is not followed by the image stages of the next case."""
    order: list[str] = []
    seen: set[str] = set()
    for names in cases:
        for i, name in enumerate(names):
            if name in seen:
                continue
            if i and names[i - 1] in seen:
                order.insert(order.index(names[i - 1]) + 1, name)
            else:
                order.insert(next((order.index(n) for n in names[i + 1:] if n in seen), len(order)), name)
            seen.add(name)
    return order


def stage_summary(rec: dict) -> list[dict]:
    """One row per stage, worst case over all cases (forward order). ``max_ulp`` is None when no case has
    a ULP to show (parity.metrics.ulp_floor)."""
    rows: dict[str, dict] = {}
    for case in rec["cases"]:
        for st in case["stages"]:
            row = rows.setdefault(st["name"], {
                "stage": st["name"], "class": st["class"], "tolerance": st["tolerance"], "cases": 0, "passed": 0,
                "max_abs": 0.0, "max_ulp": None, "cosine": 1.0, "nmse_db": None, "min_atol": 0.0, "oracle_ref": None,
                "measured": 0, "ratio": None, "allowed_ratio": None})
            row["cases"] += 1
            row["passed"] += bool(st["passed"])
            if st.get("error"):  # missing, raised, not reached, a shape mismatch: no numbers to show
                continue
            row["measured"] += 1
            row["max_abs"] = max(row["max_abs"], st["max_abs"])
            if st.get("max_ulp") is not None:
                row["max_ulp"] = st["max_ulp"] if row["max_ulp"] is None else max(row["max_ulp"], st["max_ulp"])
            row["cosine"] = min(row["cosine"], st["cosine"])
            if st["nmse_db"] is not None and (row["nmse_db"] is None or _num(st["nmse_db"]) > _num(row["nmse_db"])):
                row["nmse_db"] = st["nmse_db"]
            row["min_atol"] = max(row["min_atol"], st["min_tolerance"].get("atol", 0.0))
            if "oracle" in st:
                row["oracle_ref"] = max(row["oracle_ref"] or 0.0, st["oracle"]["reference_max_abs"])
                if "ratio" in st["oracle"]:
                    row["ratio"] = max(row["ratio"] or 0.0, _num(st["oracle"]["ratio"]))
                    row["allowed_ratio"] = st["oracle"].get("allowed_ratio")
    return [rows[n] for n in forward_order([[st["name"] for st in c["stages"]] for c in rec["cases"]])]


def _num(v) -> float:
    return float(v) if not isinstance(v, str) else (float("inf") if v == "inf" else float("-inf"))


def _headline(rec: dict, short: bool = False) -> list[str]:
    """Two lines: the verdict with the settings, the wall time with the versions. ``short`` (the
    terminal's): mode and dtype by their values."""
    status = "PASS" if rec["passed"] else "FAIL"
    n_pass = sum(c["passed"] for c in rec["cases"])
    s = rec["settings"]
    shown = ("transformers", "torch", "mlx", "numpy", "blas", "cpu")
    versions = {k: v for k, v in rec["versions"].items() if k in shown}
    from parity.adapter import option_facts  # (the registry's modules import this package)

    mode = f"{s['mode']}, {s['dtype']}" if short else f"mode {s['mode']}, dtype {s['dtype']}"
    return [f"rmlx parity {status}: {n_pass}/{len(rec['cases'])} cases passed "
            f"({', '.join([mode, *option_facts(s, headline=True)])}"
            + (f", injected {','.join(s['inject'])}" if s["inject"] else "") + ")",
            f"wall time {rec['wall_time_s']:.1f} s; " + ", ".join(f"{k} {v}" for k, v in versions.items())]


_COLS = ("stage", "class", "rtol", "atol", "pass", "max_abs", "max_ulp", "min cosine", "worst NMSE dB",
         "needs atol", "HF-vs-oracle", "f64 ratio")


def _rows(rec: dict) -> list[tuple[str, ...]]:
    out = []
    for r in stage_summary(rec):
        if not r["measured"]:  # no case produced numbers for it (missing, or the candidate raised)
            out.append((r["stage"], r["class"], f"{r['tolerance']['rtol']:g}", f"{r['tolerance']['atol']:g}",
                        f"{r['passed']}/{r['cases']}", "not measured", *("-",) * 6))
            continue
        out.append((r["stage"], r["class"], f"{r['tolerance']['rtol']:g}", f"{r['tolerance']['atol']:g}",
                    f"{r['passed']}/{r['cases']}", _fmt(r["max_abs"]) if r["max_abs"] else "0",
                    _ulp(r["max_ulp"]), f"{r['cosine']:.9f}",
                    _fmt(r["nmse_db"], ".1f"),
                    _fmt(r["min_atol"]) if r["min_atol"] else "0",
                    "-" if r["oracle_ref"] is None else (_fmt(r["oracle_ref"]) if r["oracle_ref"] else "0"),
                    _ratio(r)))
    return out


def _ratio(row: dict) -> str:
    """The worst "candidate / reference distance to float64" of a stage, and the bound when there is one."""
    if row["ratio"] is None:
        return "-"
    return f"{row['ratio']:.1f}" + (f" / {row['allowed_ratio']:g}" if row["allowed_ratio"] else "")


WIDTH = 100  # columns of the default terminal output; to_terminal(rec, wide=True) has no limit
NO_ULP = "—"  # a stage without a ULP to show: every differing value's reference is near zero (metrics.ulp_floor)
# the default terminal table: rtol and atol in one column, cosine to 6 places, numbers in 2 digits; the
# stage column gives way (an ellipsis in the middle) when a row would not fit
_NARROW_COLS = ("stage", "class", "pass", "max_abs", "atol / rtol", "min cos", "f64 ratio", "max ULP")
_MIN_STAGE = 16  # narrower than this, the class column goes first


def _ulp(v, short: bool = False) -> str:
    """A stage's max_ulp: NO_ULP for None; ``short``: 2 digits from 100000 on."""
    if v is None:
        return NO_ULP
    return _compact(v, 2) if short and v >= 100_000 else str(v)


def _compact(v: float, digits: int = 6) -> str:
    """``v`` in ``digits`` significant digits, the shorter of plain and scientific without exponent
    padding: 0.0002 -> 2e-4, 1.3e-06 -> 1.3e-6, 2154037218 -> 2.2e9, 0.016 -> 0.016."""
    plain = f"{v:.{digits}g}"
    if "e" not in f"{v:.{digits - 1}e}":  # inf, nan
        return plain
    mant, exp = f"{v:.{digits - 1}e}".split("e")
    sci = f"{mant.rstrip('0').rstrip('.') if '.' in mant else mant}e{int(exp)}"
    return sci if len(sci) < len(plain) else plain


def _tol(t: dict) -> str:
    return "exact" if t["atol"] == t["rtol"] == 0 else f"{_compact(t['atol'])} / {_compact(t['rtol'])}"


def _narrow_rows(rec: dict) -> list[tuple[str, ...]]:
    out = []
    for r in stage_summary(rec):
        head = (r["stage"], r["class"], f"{r['passed']}/{r['cases']}")
        if not r["measured"]:
            out.append((*head, "not measured", _tol(r["tolerance"]), "-", "-", "-"))
            continue
        ratio = "-" if r["ratio"] is None else (_compact(r["ratio"], 2) + (
            f"/{r['allowed_ratio']:g}" if r["allowed_ratio"] else ""))
        out.append((*head, _fmt(r["max_abs"]) if r["max_abs"] else "0", _tol(r["tolerance"]),
                    f"{r['cosine']:.6f}", ratio, _ulp(r["max_ulp"], short=True)))
    return out


def _ellipsize(text: str, width: int) -> str:
    """``text`` in ``width`` characters, its middle replaced by an ellipsis when it is longer."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + "…" + (text[-tail:] if tail else "")


def fit_table(rows: list[tuple[str, ...]], width: int = WIDTH) -> list[str]:
    """:func:`text_table` of ``rows`` (header first; stage, class, pass, then numbers) in ``width``
    columns: number columns whose every cell is "-" are left out; then the stage column is shortened
    (:func:`_ellipsize`) to fit, down to ``_MIN_STAGE`` characters; below that the "class" column is
    left out first."""
    keep = [i for i in range(len(rows[0])) if i < 3 or any(r[i] != "-" for r in rows[1:])]
    rows = [tuple(r[i] for i in keep) for r in rows]
    for attempt in (rows, [r[:1] + r[2:] for r in rows] if rows[0][1] == "class" else rows):
        widths = [max(len(r[i]) for r in attempt) for i in range(len(attempt[0]))]
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over <= 0:
            return text_table(attempt)
        if widths[0] - over >= _MIN_STAGE:
            break
    first = max(widths[0] - over, min(_MIN_STAGE // 2, widths[0]))  # never under 8: past that, wider than width
    return text_table([(_ellipsize(r[0], first), *r[1:]) if i else r for i, r in enumerate(attempt)])


def _wrap(lines: Sequence[str], width: int | None, indent: str = "") -> list[str]:
    """Each line folded at spaces into ``width`` columns (``None``: as it is); blank lines kept. A word
    is never broken (a path longer than ``width`` stays whole, to be copied)."""
    if width is None:
        return list(lines)
    return [w for line in lines for w in textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                                                       break_on_hyphens=False) or [""]]


def _clip(line: str, width: int | None) -> str:
    return line if width is None or len(line) <= width else line[:width - 1] + "…"


LOGIT_ROWS = (  # (label, record keys): the statistics of parity.metrics.logit_statistics
    ("same top token", ("top1_agreement", "top1_agreement_se")),
    ("top-1 flips (decisive)", ("top1_flips", "top1_flips_decisive")),
    ("KL mean", ("kl_mean", "kl_se")),
    ("KL median / p90", ("kl_median", "kl_p90")),
    ("KL p99 / p99.9", ("kl_p99", "kl_p999")),
    ("KL max", ("kl_max",)),
    ("Δp mean", ("dp_mean",)),
    ("Δp p1 / p99", ("dp_p1", "dp_p99")),
    ("max |Δp|", ("dp_max_abs",)),
    ("top-5 overlap", ("top5_overlap",)),
)


def logit_lines(lg: dict) -> list[str]:
    """The Markdown table of a run's pooled logit statistics (llama.cpp ``--kl-divergence`` style)."""
    if not lg:
        return []
    rows = []
    for label, keys in LOGIT_ROWS:
        vals = [lg.get(k) for k in keys]
        if vals[0] is None and keys[0] not in lg:
            continue
        if keys[0] == "top1_agreement":
            cell = f"{vals[0]:.4%} ± {vals[1]:.4%}" if isinstance(vals[0], float) else str(vals[0])
        elif keys[0] == "top1_flips":
            cell = f"{vals[0]} ({vals[1]} decisive; near-tie margin {fmt(lg.get('tie_margin'))})"
        elif keys[0] == "kl_mean":
            cell = f"{fmt(vals[0])} ± {fmt(vals[1])}"
        elif keys[0] == "top5_overlap":
            cell = f"{vals[0]:.2%}" if isinstance(vals[0], float) else str(vals[0])
        else:
            cell = " / ".join(fmt(v) for v in vals)
        rows.append(f"| {label} | {cell} |")
    extra = (f" ({lg['nonfinite_positions']} with NaN/Inf, the first at position {lg.get('first_nonfinite_position')})"
             if lg.get("nonfinite_positions") else "")
    return ["", f"## Logits: {lg['positions']} positions of every case{extra}", "",
            "| statistic | value |", "|---|---|", *rows]


def greedy_cell(g: dict | None) -> str:
    """A case's greedy decode agreement (``pipeline.greedy_agreement``) in a few words."""
    if not g or not g.get("steps"):
        return "-"
    if g["first_difference"] is None:
        return f"same {g['steps']}/{g['steps']}"
    return f"differs at step {g['first_difference']} ({'near tie' if g['near_tie'] else 'decisive'})"


def case_logit_lines(cases: list[dict]) -> list[str]:
    """The Markdown table of each case's logit statistics and its greedy decode agreement."""
    rows = [c for c in cases if isinstance((c.get("logits") or {}).get("top1_agreement"), float)]
    if not rows:
        return []
    out = ["", "## Logits per case", "",
           "| case | positions | same top token | flips (decisive) | KL mean ± SE | KL median / p90 / p99 / p99.9 "
           "| KL max | Δp mean | Δp p1 / p99 | max \\|Δp\\| | top-5 overlap | greedy decode |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        lg = c["logits"]
        out.append(f"| {c['name']} | {lg.get('positions', '-')} | {lg['top1_agreement']:.2%} ± "
                   f"{lg.get('top1_agreement_se', 0):.2%} | {lg.get('top1_flips', 0)} "
                   f"({lg.get('top1_flips_decisive', 0)})"
                   f" | {fmt(lg.get('kl_mean'))} ± {fmt(lg.get('kl_se'))} | "
                   + " / ".join(fmt(lg.get(k)) for k in ("kl_median", "kl_p90", "kl_p99", "kl_p999"))
                   + f" | {fmt(lg.get('kl_max'))} | {fmt(lg.get('dp_mean'))} | {fmt(lg.get('dp_p1'))} / "
                   f"{fmt(lg.get('dp_p99'))} | {fmt(lg.get('dp_max_abs'))} | "
                   + (f"{lg['top5_overlap']:.2%}" if isinstance(lg.get("top5_overlap"), float) else "-")
                   + f" | {greedy_cell(c.get('greedy'))} |")
    return out


def oracle_line(fd: dict) -> list[str]:
    """Polygraphy-style note: which side the float64 oracle sides with."""
    o = fd.get("oracle")
    if not o:
        return []
    closer = "rmlx" if o["candidate_max_abs"] < o["reference_max_abs"] else "HF"
    return [f"Note: float64 oracle: HF is {o['reference_max_abs']:.3g} from it, rmlx {o['candidate_max_abs']:.3g} "
            f"({closer} is closer)"]


def to_markdown(rec: dict) -> str:
    lines = ["# " + _headline(rec)[0], "", _headline(rec)[1], "", f"Command: `{rec['command']}`", ""]
    fd = rec["first_divergence"]
    if fd:
        lines += [f"## First divergence: `{fd['stage']}` in case `{fd['case']}`", "", "```", fd["message"],
                  *oracle_line(fd), "```", ""]
    lines += ["## Stages (worst over all cases)", "", "| " + " | ".join(_COLS) + " |",
              "|" + "---|" * len(_COLS)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(rec)]
    lines += logit_lines(rec.get("logits") or {})
    if kernel_lines(rec):
        lines += ["", "## Kernels", "", *kernel_lines(rec)]
    lines += ["", "## Cases", "",
              "| case | images | soft tokens | passed | first divergence | top-1 | KL max | decode max abs "
              "| HF self-consistency | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rec["cases"]:
        fdc = c["first_divergence"]["stage"] if c["first_divergence"] else ""
        sizes = ", ".join("x".join(map(str, s)) for s in c["image_sizes"]) or "-"
        lg = c["logits"]
        dec = max((d["max_abs"] for d in c["decode"]), default=None)
        lines.append(f"| {c['name']} | {sizes} | {c['n_soft_tokens']} | {'yes' if c['passed'] else 'NO'} "
                     f"| {fdc} | {lg.get('top1_agreement', 0):.0%} | {_fmt(lg.get('kl_max'))} | {_fmt(dec)} "
                     f"| {_fmt(c['reference_self_consistency']['max_abs_logits'])} | {c['seconds']:.2f} |")
    lines += case_logit_lines(rec["cases"])
    quantized = [c for c in rec["cases"] if c.get("quantization_cost")]
    if quantized:
        lines += ["", "## Cost of quantization (candidate vs the unquantized HF model)", "",
                  "Not a parity check: the dequantized reference above is. This is what MXFP8 costs.", "",
                  "| case | top-1 agreement | KL mean | KL max | NMSE dB soft tokens | NMSE dB logits "
                  "| left unquantized |", "|---|---|---|---|---|---|---|"]
        for c in quantized:
            q = c["quantization_cost"]
            lg = q["logits"]
            lines.append(f"| {c['name']} | {lg.get('top1_agreement', 0):.1%} | {_fmt(lg.get('kl_mean'))} "
                         f"| {_fmt(lg.get('kl_max'))} | {_db(q['stages'], 'vision.soft_tokens')} "
                         f"| {_db(q['stages'], 'logits')} | {len(q['left_unquantized'])} |")
    if rec.get("gate"):
        from parity.gate import summary

        lines += ["", "## Gate", "", "```", summary(rec["gate"]), "```"]
    return "\n".join(lines) + "\n"


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """The one terminal table: columns padded to their widest cell, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def to_terminal(rec: dict, wide: bool = False, notes: Sequence[str] = ()) -> str:
    """The run for a terminal: the header, the stage table, the failed cases, ``notes`` (e.g. where the
    report went), then the first divergence and last the verdict line, so the end of the output is
    what a reader needs first. Every line fits in ``WIDTH`` columns (but a single word longer, such as
    a long path in ``notes``); ``wide``: the full table (the Markdown report's columns), no line folded
    or clipped."""
    width = None if wide else WIDTH
    # two lines, clipped, never folded: parity.compare.to_terminal puts its own two in their place
    out = [_clip(line, width) for line in _headline(rec, short=not wide)] + [""]
    out += text_table([_COLS] + _rows(rec)) if wide else fit_table([_NARROW_COLS] + _narrow_rows(rec), WIDTH)
    failed = [c for c in rec["cases"] if not c["passed"]]
    if failed:
        out += ["", *_wrap([f"failed cases ({len(failed)}): " + ", ".join(c["name"] for c in failed[:12])
                            + (" ..." if len(failed) > 12 else "")], width, "  ")]
    if kernel_lines(rec):
        out += ["", *_wrap(kernel_lines(rec), width, "  ")]
    if notes:
        out += ["", *_wrap(notes, width, "  ")]
    fd = rec["first_divergence"]
    if fd:
        out += ["", *_wrap([f"First divergent stage: {fd['stage']} (case {fd['case']})",
                            *fd["message"].split("\n"), *oracle_line(fd)], width, "  ")]
    out += ["", verdict_line(rec, width)]  # last: the verdict does not scroll away above a long table
    return "\n".join(out)


def kernel_lines(rec: dict) -> list[str]:
    """What computed the candidate where it was not MLX's own kernel, and the check of each
    (``parity.kernels``): a line per failed check, else one line in all."""
    k = rec.get("kernels") or {}
    if not k.get("used"):
        return []
    checks = k.get("checks") or []
    products = [c for c in checks if not c.get("exact")]
    worst = max((c["bound_ratio"] for c in products), default=0.0)
    out = [f"kernels: {', '.join(sorted(k['used']))} in place of MLX's own; {len(checks)} shape(s) checked "
           f"(products against the exact product, quantization bit for bit against MLX's): "
           f"{'PASS' if k.get('passed') else 'FAIL'} (worst product {fmt(worst, '.2g')} of the fp32-sum bound)"]
    for c in checks:
        if c["passed"]:
            continue
        if c.get("exact"):
            out.append(f"  kernel check FAILED: {c['kernel']} K={c['k']} N={c['n']}: "
                       f"{1 - c['bit_identical_to_mlx']:.2%} of the sampled bytes differ from MLX's own, decoded "
                       f"max |difference| {fmt(c['max_abs_vs_mlx'])} ({c['how']})")
        else:
            out.append(f"  kernel check FAILED: {c['kernel']} K={c['k']} N={c['n']}: max |error| "
                       f"{fmt(c['max_abs_vs_exact'])} is {fmt(c['bound_ratio'], '.3g')} x the bound ({c['how']})")
    return out


def verdict_line(rec: dict, width: int | None = None) -> str:
    """One line: PASS/FAIL, cases, the first divergence, the logits' agreement, the wall time. In
    ``width`` columns the logits' agreement gives way first, then the wall time, then the first
    divergence's case (the wall time back when it fits), never its stage."""
    n_pass = sum(c["passed"] for c in rec["cases"])
    fd = rec.get("first_divergence")
    lg = rec.get("logits") or {}
    head = [f"{'PASS' if rec['passed'] else 'FAIL'}: {n_pass}/{len(rec['cases'])} cases pass"]
    where = [f"first divergence {fd['stage']} in {fd['case']}"] if fd else []
    logits = ([f"same top token {lg['top1_agreement']:.2%}, KL mean {fmt(lg.get('kl_mean'))}"]
              if isinstance(lg.get("top1_agreement"), float) else [])
    untestable = [f"{len(rec['untestable'])} case(s) untestable"] if rec.get("untestable") else []
    if rec.get("kernels") and not rec["kernels"].get("passed", True):
        untestable.append("a kernel check failed")
    stage = [f"first divergence {fd['stage']}"] if fd else []
    jobs = rec.get("jobs") or 1
    seconds = f" ({rec['wall_time_s']:.1f} s{f', {jobs} processes' if jobs > 1 else ''})"
    line = ""
    for parts, tail in (([*head, *where, *logits, *untestable], seconds), ([*head, *where, *untestable], seconds),
                        ([*head, *where, *untestable], ""),  # the wall time is in the header too
                        ([*head, *stage, *untestable], seconds), ([*head, *stage, *untestable], "")):
        line = "rmlx parity " + "; ".join(parts) + tail
        if width is None or len(line) <= width:
            return line
    return _clip(line, width)


class Progress:
    """Progress on stderr with an ETA: a one-line bar on a terminal; off a terminal (a CI log), one
    line per tenth of the work, so a long run is never silent."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream  # resolved now, not at import
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0: float | None = None
        self.last_tenth = 0

    def eta(self, done: int, total: int) -> str:
        if self.t0 is None or done == 0:
            return ""
        left = (time.perf_counter() - self.t0) * (total - done) / done
        return f", ETA {left:.0f} s"

    def __call__(self, done: int, total: int, label: str) -> None:
        if total == 0:
            return
        if self.t0 is None:
            self.t0 = time.perf_counter()
        if not self.tty:
            tenth = 10 * done // total
            if tenth > self.last_tenth and done < total:
                self.last_tenth = tenth
                self.stream.write(f"rmlx-parity: {done}/{total} done{self.eta(done, total)} ({label[:60]})\n")
                self.stream.flush()
            return
        width = 30
        fill = int(width * done / total)
        self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total}{self.eta(done, total)} "
                          f"{label[:40]:<40}")
        if done == total:
            self.stream.write("\r" + " " * (width + 70) + "\r")
        self.stream.flush()


def _json_layout(v, width: int = 120) -> str:
    """Indented JSON whose containers stay on one line when they fit in ``width`` columns (a shape,
    an index, a tolerance): a quarter smaller than ``indent=2`` and easier to read. Each value is
    written once, bottom-up (a record of 10 MB: 0.8 s, against 1.9 s re-serialising every subtree)."""
    return _laid(v, 0, width)[1]


_FLOAT_REPR = float.__repr__


def _leaf(v) -> str:
    """``json.dumps(v, allow_nan=False)`` of a value that is not a container, without its call overhead."""
    t = type(v)
    if t is str:
        return _json_string(v)
    if t is float and v - v == 0:  # finite
        return _FLOAT_REPR(v)
    if t is int:
        return int.__repr__(v)
    return json.dumps(v, allow_nan=False)  # bool, None, NaN and inf (a ValueError), subclasses


def _key(k) -> str:
    """A dict key as ``json.dumps`` writes it (a non-string key as its JSON string form)."""
    return _json_string(k if isinstance(k, str) else next(iter(json.loads(json.dumps({k: 0})))))


def _laid(v, depth: int, width: int) -> tuple[str | None, str]:
    """(``v`` on one line, None when that does not fit in ``width`` at ``depth``; ``v`` laid out)."""
    if not isinstance(v, (dict, list)) or not v:
        one = json.dumps(v) if isinstance(v, (dict, list)) else _leaf(v)
        return one, one
    if isinstance(v, dict):
        parts = [(_key(k) + ": ", *_laid(x, depth + 1, width)) for k, x in v.items()]
        opener, closer = "{", "}"
    else:
        parts = [("", *_laid(x, depth + 1, width)) for x in v]
        opener, closer = "[", "]"
    if all(one is not None for _, one, _ in parts):
        size = 2 * len(parts) + sum(len(k) + len(one) for k, one, _ in parts)  # brackets and ", "
        if size + 2 * depth <= width:
            one = opener + ", ".join(k + one for k, one, _ in parts) + closer
            return one, one
    pad, end = "  " * (depth + 1), "\n" + "  " * depth
    return None, opener + "\n" + ",\n".join(pad + k + laid for k, _, laid in parts) + end + closer


def json_text(rec: dict) -> str:
    return _json_layout(rec) + "\n"


def check_free(folder: Path) -> None:
    """Reports and dumps go to a new (or empty) folder; an existing one is never overwritten."""
    from rmlx.errors import InputError

    if folder.is_symlink() or folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder}: already exists and is not empty; choose a new folder")


def publishing(*finals: Path):
    """The one way a run publishes folders (:func:`rmlx.atomic.staged`): a temporary sibling folder
    for each of ``finals``, renamed into place at the end once every destination is checked free."""
    return staged(*finals, before_rename=check_free)


def write_report_dir(report_dir: Path, rec: dict, dumps: dict[str, dict[str, dict[str, np.ndarray]]] | None = None,
                     dump_dir: Path | None = None) -> None:
    """Write report.json, report.md, report.html and junit.xml into ``report_dir`` (and dumps into
    ``dump_dir``), all or nothing (:func:`publishing`)."""
    from safetensors.numpy import save_file

    from parity.report import html, junit

    with_dumps = dumps is not None and dump_dir is not None
    with publishing(report_dir, *([dump_dir] if with_dumps else [])) as folders:
        tmp = folders[0]
        (tmp / "report.json").write_text(json_text(rec), encoding="utf-8", errors="backslashreplace")
        (tmp / "report.md").write_text(to_markdown(rec), encoding="utf-8", errors="backslashreplace")
        (tmp / "report.html").write_text(html.to_html(rec), encoding="utf-8", errors="backslashreplace")
        (tmp / "junit.xml").write_text(junit.to_junit(rec), encoding="utf-8", errors="backslashreplace")
        if with_dumps:
            from parity.adapter import options  # (the report package is imported by the registry's users)

            st = rec["settings"]
            declared = options()
            meta = {"schema": rec["schema"], "run_id": rec["run_id"], "dtype": st["dtype"], "mode": st["mode"],
                    "attn_implementation": st["attn_implementation"],
                    **{n: str(st[n]) for n, o in declared.items() if o.candidate_of is None and st.get(n) is not None},
                    **{f"version.{k}": str(v) for k, v in rec["versions"].items()
                       if k in ("transformers", "torch", "mlx", "numpy")}}
            # an option that is the candidate's own value of another is that option in the candidate's dump
            sided = {o.candidate_of: st[n] for n, o in declared.items() if o.candidate_of is not None
                     and st.get(n) is not None}
            model_dirs = {c["name"]: c.get("model_dir") for c in rec["cases"]}
            for case_name, sides in dumps.items():
                folder = folders[1] / case_name.replace("/", "__")
                folder.mkdir(parents=True)
                digest = _config_digest(model_dirs.get(case_name))
                for side, capture in sides.items():
                    side_meta = meta | {"side": side} | ({k: str(v) for k, v in sided.items()}
                                                         if side == "candidate" else {})
                    if digest:
                        side_meta["config_sha256"] = digest
                    if hasattr(capture, "finish"):  # a streamed run's parity.dumps.Spool
                        capture.finish(folder / f"{side}.safetensors", side_meta)
                        continue
                    arrays = {k: np.ascontiguousarray(v) for k, v in capture.items()}
                    save_file(arrays, str(folder / f"{side}.safetensors"), metadata=side_meta)


def _config_digest(model_dir: str | None) -> str | None:
    """sha256 of a checkpoint's config.json (a dump's ``config_sha256``), None when there is none."""
    import hashlib

    try:
        return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest() if model_dir else None
    except OSError:
        return None


def write_files(folder: Path, files: dict[str, str]) -> None:
    """Write ``{name: text}`` into a new ``folder``, all or nothing (:func:`publishing`)."""
    with publishing(folder) as (tmp,):
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8", errors="backslashreplace")

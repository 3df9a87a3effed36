"""The HTML report: one self-contained file rendered from the JSON record only.

No network, no external CSS, JS or fonts: plots are inline SVG written here, pictures (masks,
per-patch heat-maps) are PNG data URIs made with Pillow. Per case: the error at every stage along
the forward pass against its tolerance, and what the case's ``viz`` holds (``parity.report.viz``):
a heat-map of each patch-grid stage's error over each image's grid, the reference's masks under
each view the family gave (and the candidate's, with a difference picture, when they differ), and
the KL of the next-token distributions at every position and decode step. The page knows no model:
stage groups, mask labels and views, token-type names and colours are the record's. Every string
from the record is escaped.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterable
from html import escape

import numpy as np
from PIL import Image

from parity.metrics import fmt
from parity.report.viz import MASK_KEYS, unpack_array, unpack_bool

PASS, FAIL, MUTED, INK, GRID = "#1a7f37", "#cf222e", "#8c959f", "#1f2328", "#d8dee4"
# token-type colours of a record whose masks carry no ``token_legend`` (by type: 0 is plain, not outlined)
TOKEN_PALETTE = ("#1f3a5f", "#e8590c", "#8250df", "#1a7f37")
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
_VIRIDIS_RGB = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in VIRIDIS], dtype=np.float64)


def _e(x) -> str:
    return escape(str(x), quote=True)


def _num(v, spec: str = ".3g") -> str:
    """:func:`parity.metrics.fmt` with the page's conventions: a dash for null, a bare 0."""
    return "0" if v == 0 and not isinstance(v, str) else fmt(v, spec, null="–")


def _float(v) -> float:
    """A record number (``"inf"``/``"-inf"`` strings, null NaN) as a float."""
    if v is None:
        return math.nan
    return float(v)


def _slug(i: int, name: str) -> str:
    return f"case-{i}-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _png(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    # zlib level 6, not optimize=True: a 300x300 mask encodes in 1.6 ms against 5.2 (1.5 KB against 1.0;
    # Image.save of one such mask, 50 times, timed with time.perf_counter)
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _viridis(t: np.ndarray) -> np.ndarray:
    """t in [0, 1] -> (..., 3) uint8."""
    x = np.clip(t, 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.round(_VIRIDIS_RGB[i] * (1 - f) + _VIRIDIS_RGB[i + 1] * f).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- axes


class LogAxis:
    """log10 axis over whole decades: value -> pixel (``lo`` at ``p0``, ``hi`` at ``p1``)."""

    def __init__(self, values: Iterable[float], p0: float, p1: float, max_decades: int = 14):
        pos = [v for v in values if v > 0 and math.isfinite(v)]
        hi = max(pos, default=1.0)
        lo = min(pos, default=hi / 10)
        self.b = math.ceil(math.log10(hi) + 1e-9)
        self.a = min(math.floor(math.log10(lo)), self.b - 1)
        self.a = max(self.a, self.b - max_decades)
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        t = (math.log10(max(v, 10.0**self.a)) - self.a) / (self.b - self.a)
        return self.p0 + min(t, 1.0) * (self.p1 - self.p0)

    def ticks(self) -> list[int]:
        step = max(1, math.ceil((self.b - self.a) / 7))
        return list(range(self.b, self.a - 1, -step))


def _y_grid(axis: LogAxis, x0: float, x1: float, zero_y: float | None) -> list[str]:
    out = []
    for k in axis.ticks():
        y = axis(10.0**k)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}" stroke-width="1"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">1e{k}</text>')
    if zero_y is not None:
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{zero_y}" y2="{zero_y}" stroke="{GRID}" stroke-dasharray="2 3"/>'
                   f'<text x="{x0 - 6}" y="{zero_y + 4}" class="tick" text-anchor="end">0</text>')
    return out


# ---------------------------------------------------------------------------------- (a) stage errors


def _fallback_group(name: str) -> str:
    """A stage's group when the record names none: its first dotted component, with the index that
    follows it if there is one (``layers.3.attn.q`` -> ``layers.3``)."""
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    return f"{head}.{index}" if index.isdigit() else head


def _groups(case: dict) -> list[tuple[str, int, int]]:
    """(label, first, last stage index) of each run of stages under one label: the record's
    ``viz.stage_groups`` (run-length, as the family groups its stages), else :func:`_fallback_group`."""
    stages = case["stages"]
    runs = (case.get("viz") or {}).get("stage_groups")
    if not runs or sum(int(n) for _, n in runs) != len(stages):
        runs = []
        for st in stages:
            g = _fallback_group(st["name"])
            if runs and runs[-1][0] == g:
                runs[-1][1] += 1
            else:
                runs.append([g, 1])
    out, at = [], 0
    for g, n in runs:
        out.append((str(g), at, at + int(n) - 1))
        at += int(n)
    return out


def stage_plot(case: dict) -> str:
    """max |cand - ref| per stage in forward order (log y), the allowance as a step line."""
    stages = case["stages"]
    n = len(stages)
    if n == 0:
        return ""
    ref_max = (case.get("viz") or {}).get("ref_max_abs") or [None] * n
    w, x0, x1, top, bottom = 980, 64, 968, 14, 214
    zero_y, group_y, h = bottom + 16, bottom + 38, bottom + 60
    dx = (x1 - x0) / n
    xs = [x0 + dx * (i + 0.5) for i in range(n)]
    errs, allowed = [], []
    for st, rm in zip(stages, ref_max, strict=False):
        tol = st["tolerance"]
        errs.append(math.inf if st.get("error") else _float(st["max_abs"]))
        allowed.append(tol["atol"] + tol["rtol"] * (rm or 0.0))
    oracle = [_float(st["oracle"]["reference_max_abs"]) if "oracle" in st else None for st in stages]
    axis = LogAxis([v for v in errs + allowed + [o or 0 for o in oracle] if math.isfinite(v)], bottom, top)
    parts = [f'<svg class="plot stage-plot" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="error per stage along the forward pass">']
    groups = _groups(case)
    row_end = [-math.inf, -math.inf]  # group labels on two rows, each placed where it does not overlap
    for k, (g, i, j) in enumerate(groups):
        gx0, gx1 = x0 + dx * i, x0 + dx * (j + 1)
        if k % 2 == 0:
            parts.append(f'<rect x="{gx0:.1f}" y="{top}" width="{gx1 - gx0:.1f}" height="{zero_y + 6 - top}" '
                         f'fill="#f6f8fa"/>')
        cx, half = (gx0 + gx1) / 2, 3.4 * len(g) + 3
        row = next((r for r, end in enumerate(row_end) if cx - half >= end), None)
        if row is not None:
            row_end[row] = cx + half
            parts.append(f'<text x="{cx:.1f}" y="{group_y + 13 * row}" class="tick" text-anchor="middle">'
                         f'{_e(g)}</text>')
    parts += _y_grid(axis, x0, x1, zero_y)
    parts.append(f'<text x="14" y="{(top + bottom) / 2:.0f}" class="tick" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + bottom) / 2:.0f})">max |cand − ref|</text>')
    # the allowance: a step per stage; 0 (exact stages) on the zero line
    path = []
    for x, a in zip(xs, allowed, strict=True):
        y = axis(a) if a > 0 else zero_y
        path.append(f"{'M' if not path else 'L'}{x - dx / 2:.1f},{y:.1f}L{x + dx / 2:.1f},{y:.1f}")
    parts.append(f'<path class="tolerance" d="{"".join(path)}" fill="none" stroke="#bf8700" stroke-width="1.6"/>')
    fd = (case.get("first_divergence") or {}).get("stage")
    r = 3.6 if n <= 120 else 2.4
    for i, (st, x, v) in enumerate(zip(stages, xs, errs, strict=True)):
        if oracle[i] is not None:
            oy = axis(oracle[i]) if oracle[i] > 0 else zero_y
            parts.append(f'<path d="M{x:.1f},{oy - 3.5:.1f}l3.5,3.5l-3.5,3.5l-3.5,-3.5z" fill="{MUTED}" '
                         f'opacity="0.7"><title>{_e(st["name"])}: HF vs float64 oracle '
                         f'{_num(oracle[i])}</title></path>')
        ok = bool(st["passed"])
        colour = PASS if ok else FAIL
        tip = (f"{st['name']} ({st['class']}): max |cand - ref| {_num(st['max_abs'])}, allowed up to "
               f"{_num(allowed[i])} (atol {st['tolerance']['atol']:g} + rtol {st['tolerance']['rtol']:g} x max|ref| "
               f"{_num(ref_max[i])}); mismatched {st.get('mismatched', 0)} / {st.get('numel', 0)}"
               + (f"; {st['error']}" if st.get("error") else ""))
        if st["name"] == fd:
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{zero_y}" stroke="{FAIL}" '
                         f'stroke-dasharray="4 3"/><text x="{min(x + 5, x1 - 4):.1f}" y="{top + 12}" class="note" '
                         f'text-anchor="{"start" if x < (x0 + x1) / 2 else "end"}" fill="{FAIL}">first divergence: '
                         f'{_e(st["name"])}</text>')
        if not math.isfinite(v):  # structural error or a non-finite value: a triangle at the top
            parts.append(f'<path class="point fail" d="M{x:.1f},{top + 2}l5,8h-10z" fill="{FAIL}">'
                         f'<title>{_e(tip)}</title></path>')
        elif v == 0:
            parts.append(f'<circle class="point {"pass" if ok else "fail"}" cx="{x:.1f}" cy="{zero_y}" r="{r}" '
                         f'fill="#fff" stroke="{colour}" stroke-width="1.5"><title>{_e(tip)}</title></circle>')
        else:
            parts.append(f'<circle class="point {"pass" if ok else "fail"}" cx="{x:.1f}" cy="{axis(v):.1f}" '
                         f'r="{r}" fill="{colour}"><title>{_e(tip)}</title></circle>')
    parts.append("</svg>")
    with_ref = sum(rm is not None for rm in ref_max)
    allowance = ("atol + rtol·max|ref| (the largest per-element allowance; a stage fails when any element "
                 "exceeds its own atol + rtol·|ref|)" if with_ref else "atol only (the record has no max|ref|)")
    legend = [_swatch(PASS, "stage passes"), _swatch(FAIL, "stage fails"),
              _swatch("#bf8700", "allowed: " + allowance, line=True)]
    if any(o is not None for o in oracle):
        legend.append(_swatch(MUTED, "HF vs the float64 oracle", diamond=True))
    return _figure("".join(parts), "Error per stage along the forward pass (max |candidate − reference|, log "
                   "scale; hollow points on the 0 line are exact)", legend)


def _swatch(colour: str, label: str, line: bool = False, diamond: bool = False) -> str:
    kind = "line" if line else ("diamond" if diamond else "dot")
    return f'<span class="key"><i class="sw {kind}" style="--c:{colour}"></i>{_e(label)}</span>'


def _figure(body: str, caption: str, legend: list[str] | None = None, cls: str = "") -> str:
    keys = f'<div class="legend">{"".join(legend)}</div>' if legend else ""
    return f'<figure class="{cls}">{body}<figcaption>{_e(caption)}{keys}</figcaption></figure>'


# ---------------------------------------------------------------------------------- (b) heat-maps


def _colorbar(lo_exp: float, hi_exp: float) -> str:
    w, h, x0, x1 = 360, 40, 10, 350
    ticks = []
    k0, k1 = math.ceil(lo_exp - 1e-9), math.floor(hi_exp + 1e-9)
    step = max(1, math.ceil((k1 - k0 + 1) / 6))
    for k in range(k0, k1 + 1, step):
        x = x0 + (k - lo_exp) / max(hi_exp - lo_exp, 1e-9) * (x1 - x0)
        ticks.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="20" stroke="#fff" stroke-opacity="0.6"/>'
                     f'<text x="{x:.1f}" y="34" class="tick" text-anchor="middle">1e{k}</text>')
    return (f'<svg class="colorbar" viewBox="0 0 {w} {h}" width="{w}" height="{h}">'
            f'<rect x="{x0}" y="4" width="{x1 - x0}" height="16" fill="url(#viridis)"/>'
            f'{"".join(ticks)}</svg>')


def heatmaps(case: dict) -> str:
    pe = (case.get("viz") or {}).get("patch_error")
    if not pe or not pe.get("stages"):
        return ""
    positions = unpack_array(pe["positions"]).astype(int)
    counts = pe["patches"]
    errs = {name: unpack_array(a).astype(np.float64) for name, a in pe["stages"].items()}
    values = np.concatenate([e[np.isfinite(e)] for e in errs.values()] + [np.zeros(0)])
    pos_vals = values[values > 0]
    passed = {st["name"]: st["passed"] for st in case["stages"]}
    if pos_vals.size:
        hi_exp = math.log10(pos_vals.max())
        lo_exp = max(math.log10(pos_vals.min()), hi_exp - 4)
        if hi_exp - lo_exp < 1:
            lo_exp = hi_exp - 1
        bar = (f'<div class="colorbar-row">{_colorbar(lo_exp, hi_exp)}<span>log scale, '
               f'{_num(10**lo_exp, ".2e")} … {_num(10**hi_exp, ".2e")}</span><span class="key">'
               f'<i class="sw dot" style="--c:#e6e9ed"></i>0 (exact)</span><span class="key">'
               f'<i class="sw dot" style="--c:#ff00ff"></i>not finite</span></div>')
    else:
        lo_exp = hi_exp = 0.0
        bar = '<p class="muted">Every stage is exact on every patch.</p>'
    rows = []
    start = 0
    for img, count in enumerate(counts):
        pos = positions[start:start + count]
        gw, gh = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        scale = max(2, min(16, 120 // max(gw, gh)))
        if gh * scale < 24:  # a panorama: wider, so that it is not a hairline
            scale = max(scale, min(24 // gh, 240 // gw))
        figs = []
        for name, err in errs.items():
            e = err[start:start + count]
            grid = np.full((gh, gw), np.nan)
            grid[pos[:, 1], pos[:, 0]] = e
            rgb = np.full((gh, gw, 3), 0xE6, np.uint8)
            rgb[..., 2] = 0xED
            finite = np.isfinite(grid)
            nonzero = finite & (grid > 0)
            t = (np.log10(np.where(nonzero, grid, 1.0)) - lo_exp) / max(hi_exp - lo_exp, 1e-9)
            rgb[nonzero] = _viridis(t[nonzero])
            placed = np.zeros((gh, gw), bool)
            placed[pos[:, 1], pos[:, 0]] = True
            rgb[placed & ~finite] = (255, 0, 255)
            rgb[~placed] = (255, 255, 255)
            big = np.repeat(np.repeat(rgb, scale, 0), scale, 1)
            worst = int(np.nanargmax(np.where(np.isfinite(e), e, np.inf))) if e.size else 0
            x, y = (int(v) for v in pos[worst]) if e.size else (0, 0)
            ok = passed.get(name, True)
            label = name.split(".", 1)[1]
            figs.append(f'<figure class="heat {"pass" if ok else "fail"}"><img class="heatmap" alt="{_e(name)} '
                        f'per-patch error, image {img + 1}" src="{_png(big)}" width="{gw * scale}" '
                        f'height="{gh * scale}"><figcaption><b>{_e(label)}</b><br>max {_num(float(e.max()))} '
                        f'at ({x}, {y})</figcaption></figure>')
        rows.append(f'<div class="heat-row"><div class="heat-title">image {img + 1}: {count} patches on a '
                    f'{gw}×{gh} grid (x →, y ↓)</div><div class="heat-figs">{"".join(figs)}</div></div>')
        start += count
    pad = {k: v for k, v in (pe.get("padding_max") or {}).items() if v}
    if pad:
        rows.append('<p class="muted">Padding rows (not drawn), max error: '
                    + _e(", ".join(f"{k.split('.', 1)[1]} {_num(v)}" for k, v in pad.items())) + "</p>")
    return (f'<div class="heatmaps"><h4>Per-patch error of the stages over the patch grid</h4><p class="muted">max '
            f'over the feature axis of |candidate − reference| at each patch, one colour scale (log) for every stage '
            f'and image of this case; a red frame marks a failing stage.</p>{bar}{"".join(rows)}</div>')


# -------------------------------------------------------------------------------------- (c) masks


def _spans(token_types: list[list[int]]) -> list[tuple[int, int, int]]:
    """(type, start, stop) of every non-text run."""
    out, at = [], 0
    for t, count in token_types:
        if t != 0:
            out.append((t, at, at + count))
        at += count
    return out


def _fit(rgb: np.ndarray, target: int = 240) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor, or an area-averaging downscale, to ~target px."""
    n = rgb.shape[0]
    if n <= target:
        k = max(1, target // n)
        return np.repeat(np.repeat(rgb, k, 0), k, 1)
    return np.asarray(Image.fromarray(rgb).resize((target, target), Image.Resampling.BOX))


def _colour(token_type: int, legend: dict[int, tuple[str, str]]) -> str:
    return legend[token_type][1] if token_type in legend else MUTED


def _name(token_type: int, legend: dict[int, tuple[str, str]]) -> str:
    return legend[token_type][0] if token_type in legend else f"type {token_type}"


def _mask_svg(rgb: np.ndarray, length: int, spans, legend: dict[int, tuple[str, str]], cls: str, label: str) -> str:
    pic = _fit(rgb)
    size = pic.shape[0]
    outlines = "".join(f'<rect x="{a}" y="{a}" width="{b - a}" height="{b - a}" fill="none" '
                       f'stroke="{_colour(t, legend)}" stroke-width="1.5" vector-effect="non-scaling-stroke"/>'
                       for t, a, b in spans)
    ticks = "".join(f'<rect x="{a}" y="-{length * 0.028:.2f}" width="{b - a}" height="{length * 0.016:.2f}" '
                    f'fill="{_colour(t, legend)}"/><rect y="{a}" x="-{length * 0.028:.2f}" height="{b - a}" '
                    f'width="{length * 0.016:.2f}" fill="{_colour(t, legend)}"/>' for t, a, b in spans)
    pad = length * 0.035
    return (f'<svg class="mask-plot {cls}" viewBox="{-pad:.2f} {-pad:.2f} {length + pad:.2f} {length + pad:.2f}" '
            f'width="{size + 12}" height="{size + 12}" role="img" aria-label="{_e(label)}">'
            f'<image href="{_png(pic)}" x="0" y="0" width="{length}" height="{length}" preserveAspectRatio="none"/>'
            f'<rect x="0" y="0" width="{length}" height="{length}" fill="none" stroke="{GRID}" '
            f'vector-effect="non-scaling-stroke"/>{outlines}{ticks}<title>{_e(label)}</title></svg>')


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _legend(viz: dict) -> dict[int, tuple[str, str]]:
    """{token type: (name, colour)} of a case: the record's ``masks.token_legend``, else a generic one
    (``type N``, :data:`TOKEN_PALETTE`)."""
    given = ((viz or {}).get("masks") or {}).get("token_legend")
    if given is not None:
        return {int(t): (str(name), str(colour)) for t, name, colour in given}
    return {t: (f"type {t}", c) for t, c in enumerate(TOKEN_PALETTE)}


def _mask_rgb(mask: np.ndarray, key_types: np.ndarray, legend: dict[int, tuple[str, str]]) -> np.ndarray:
    """White where a query may not attend, else its key's token-type colour (one colour per key)."""
    colour = np.empty((mask.shape[-1], 3), np.uint8)
    colour[:] = _rgb(MUTED)  # a token type the legend does not name
    for t, (_, c) in legend.items():
        colour[key_types == t] = _rgb(c)
    return np.where(mask[..., None], colour, np.uint8(255))


def _views(mv: dict) -> tuple[list[str], str | None]:
    """(the reference's mask views in order, the one in use). A record without ``views`` keeps them as
    every other key, the one in use first."""
    views = mv.get("views")
    if views is None:
        views = [k for k, v in mv.items() if k not in MASK_KEYS and isinstance(v, dict)]
        return views, views[0] if views else None
    return [str(v) for v in views], mv.get("in_use")


def masks(case: dict) -> str:
    mv = (case.get("viz") or {}).get("masks")
    if not mv:
        return ""
    views, in_use = _views(mv)
    cand_view = mv.get("candidate_view")
    legend = _legend(case.get("viz"))
    token_types = mv.get("token_types") or []
    types = np.concatenate([np.full(c, t) for t, c in token_types]) if token_types else None
    spans = _spans(token_types)
    labels = list(dict.fromkeys(label for v in views for label in mv.get(v) or {}))  # in the record's order
    rows, diff = [], False
    for kind in labels:
        ref = {p: unpack_bool(mv[p][kind]) for p in views if kind in (mv.get(p) or {})}
        if not ref:
            continue
        length = next(iter(ref.values())).shape[0]
        keys = types if types is not None and types.size == length else np.zeros(length, int)
        figs = []
        for p, m in ref.items():
            use = " (in use)" if p == in_use else ""
            figs.append(_figure(_mask_svg(_mask_rgb(m, keys, legend), length, spans, legend, "mask-ref",
                                          f"{kind}, reference, {p}"),
                                f"reference, {p}{use}: {int(m.sum())} of {length}² may attend",
                                cls="mask" + (" in-use" if use else "")))
        cand = (mv.get("candidate") or {}).get(kind)
        if cand is not None:
            c = unpack_bool(cand)
            r = ref.get(in_use)
            figs.append(_figure(_mask_svg(_mask_rgb(c, keys, legend), length, spans, legend, "mask-candidate",
                                          f"{kind}, candidate"),
                                f"candidate{f' ({cand_view})' if cand_view else ''}: {int(c.sum())} may attend",
                                cls="mask"))
            if r is not None and r.shape == c.shape:
                extra, missing = c & ~r, ~c & r
                rgb = np.full(c.shape + (3,), 255, np.uint8)
                rgb[c & r] = (208, 215, 222)
                rgb[extra] = (207, 34, 46)
                rgb[missing] = (9, 105, 218)
                figs.append(_figure(
                    _mask_svg(rgb, length, spans, legend, "mask-diff", f"{kind}: candidate vs reference ({in_use})"),
                    f"candidate − reference ({in_use}): {int(extra.sum())} cells extra, {int(missing.sum())} "
                    "missing", cls="mask diff"))
                diff = True
        rows.append(f'<div class="mask-row"><div class="mask-title">{_e(kind)}</div>'
                    f'<div class="mask-figs">{"".join(figs)}</div></div>')
    present = {t for t, _ in token_types} | {0}
    keys_legend = [_swatch(c, f"may attend ({name} key)") for t, (name, c) in legend.items() if t in present]
    keys_legend.append(_swatch("#ffffff", "masked"))
    if diff:
        keys_legend += ['<span class="key sep">difference:</span>',
                        _swatch("#cf222e", "candidate attends, reference not"),
                        _swatch("#0969da", "reference attends, candidate not"), _swatch("#d0d7de", "both attend")]
    blocks = [_name(t, legend) for t in dict.fromkeys(t for t, _, _ in spans)]
    outlined = (f'<p class="muted">Boxes outline the {_e(" and ".join(blocks))} token blocks (colours as in the '
                f'legend); the strips on the axes mark their positions.</p>' if blocks else "")
    return (f'<div class="masks"><h4>Attention masks (batch 0; row = query, column = key)</h4>'
            f'{outlined}<div class="legend">{"".join(keys_legend)}</div>'
            f'{"".join(rows)}</div>')


# ------------------------------------------------------------------------------------- (d) KL


def kl_plot(case: dict) -> str:
    viz = case.get("viz") or {}
    kl = unpack_array(viz["kl_per_position"]).astype(np.float64) if viz.get("kl_per_position") else np.zeros(0)
    decode = case.get("decode") or []
    if kl.size == 0 and not decode:
        return ""
    dec = [_float(d.get("kl_mean")) for d in decode]
    n, m = kl.size, len(dec)
    w, x0, x1, top, bottom = 980, 64, 968, 14, 200
    zero_y, h = bottom + 16, bottom + 46
    dec_w = min(200, max(80, 34 * m)) if m else 0  # the decode steps get a region of their own, after a gap
    px1 = x1 - dec_w - (24 if m else 0)  # prefill positions: [x0, px1]
    dx = (px1 - x0) / max(n, 1)
    axis = LogAxis(list(kl) + dec, bottom, top)
    parts = [f'<svg class="plot kl-plot" viewBox="0 0 {w} {h}" role="img" aria-label="KL per position">',
             f'<text x="14" y="{(top + bottom) / 2:.0f}" class="tick" text-anchor="middle" '
             f'transform="rotate(-90 14 {(top + bottom) / 2:.0f})">KL (nats)</text>']
    at = 0
    legend = _legend(viz)
    for t, count in (viz.get("masks") or {}).get("token_types") or []:
        if t != 0 and n:
            parts.append(f'<rect x="{x0 + dx * at:.1f}" y="{top}" width="{dx * count:.1f}" height="{zero_y - top}" '
                         f'fill="{_colour(t, legend)}" opacity="0.09"/><text x="{x0 + dx * (at + count / 2):.1f}" '
                         f'y="{zero_y + 20}" class="tick" text-anchor="middle" fill="{_colour(t, legend)}">'
                         f'{_e(_name(t, legend))} tokens</text>')
        at += count
    parts += _y_grid(axis, x0, x1, zero_y)

    def y_of(v: float) -> float:
        return axis(v) if v > 0 and math.isfinite(v) else (top if not math.isfinite(v) else zero_y)

    if n:
        pts = " ".join(f"{x0 + dx * (i + 0.5):.1f},{y_of(v):.1f}" for i, v in enumerate(kl))
        parts.append(f'<polyline class="kl-prefill" points="{pts}" fill="none" stroke="#0969da" stroke-width="1.3" '
                     f'stroke-linejoin="round"/>')
        worst = int(np.nanargmax(np.where(np.isnan(kl), -np.inf, kl)))
        parts.append(f'<circle cx="{x0 + dx * (worst + 0.5):.1f}" cy="{y_of(kl[worst]):.1f}" r="3.5" fill="#0969da">'
                     f'<title>prefill position {worst}: KL {_num(kl[worst])} (the largest)</title></circle>')
        parts.append(f'<text x="{x0 + 2}" y="{h - 4}" class="tick">prefill positions 0…{n - 1}</text>')
    if m:
        sx = px1 + 12
        ddx = dec_w / m
        parts.append(f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{top}" y2="{zero_y}" stroke="{MUTED}" '
                     f'stroke-dasharray="3 3"/><text x="{x1 - dec_w / 2:.1f}" y="{h - 4}" class="tick" '
                     f'text-anchor="middle">decode steps</text>')
        for j, (d, v) in enumerate(zip(decode, dec, strict=True)):
            cx = x1 - dec_w + ddx * (j + 0.5)
            colour = PASS if d.get("passed") else FAIL
            parts.append(f'<rect class="point" x="{cx - 4.5:.1f}" y="{y_of(v) - 4.5:.1f}" width="9" height="9" '
                         f'fill="{colour}"><title>decode step {d.get("step")} (token {d.get("token")}): KL '
                         f'{_num(v)}, max |Δ logits| {_num(d.get("max_abs"))}, '
                         f'{"passes" if d.get("passed") else "fails"}</title></rect>'
                         f'<text x="{cx:.1f}" y="{zero_y + 14}" class="tick" text-anchor="middle">'
                         f'{d.get("step")}</text>')
    parts.append("</svg>")
    legend = [_swatch("#0969da", "prefill position", line=True), _swatch(PASS, "decode step, logits pass"),
              _swatch(FAIL, "decode step, logits fail")]
    return _figure("".join(parts), "KL(reference ‖ candidate) of the next-token distribution (nats, log scale) "
                   "at every prefill position, then every decode step", legend)


# -------------------------------------------------------------------------------------- the page


def _logit_table(lg: dict, title: str, opened: bool = True) -> str:
    """Logit statistics (a run's pooled ones, or a case's), as the Markdown report lists them."""
    from parity.report import logit_lines  # report imports this module

    rows = [line.strip("|").split(" | ") for line in logit_lines(lg or {}) if line.startswith("| ")]
    if len(rows) < 2:
        return ""
    body = "".join(f"<tr><td>{_e(k.strip())}</td><td>{_e(v.strip())}</td></tr>" for k, v in rows[1:])
    return (f'<details class="block"{" open" if opened else ""}><summary>{_e(title)}: {lg["positions"]} positions'
            f'</summary><table class="grid"><tbody>{body}</tbody></table></details>')


def _summary_table(rec: dict) -> str:
    from parity.report import _ratio, _ulp, stage_summary  # report imports this module

    rows = []
    for r in stage_summary(rec):
        ok = r["passed"] == r["cases"]
        oracle = "–" if r["oracle_ref"] is None else _num(r["oracle_ref"], ".2e")
        rows.append(f'<tr class="{"pass" if ok else "fail"}"><td><code>{_e(r["stage"])}</code></td>'
                    f'<td>{_e(r["class"])}</td><td>{r["tolerance"]["rtol"]:g}</td><td>{r["tolerance"]["atol"]:g}</td>'
                    f'<td class="st">{r["passed"]}/{r["cases"]}</td><td>{_num(r["max_abs"], ".2e")}</td>'
                    f'<td>{_ulp(r["max_ulp"])}</td><td>{r["cosine"]:.9f}</td>'
                    f'<td>{"exact" if r["nmse_db"] is None else _e(_num(r["nmse_db"], ".1f"))}</td>'
                    f'<td>{_num(r["min_atol"], ".2e")}</td><td>{oracle}</td><td>{_e(_ratio(r))}</td></tr>')
    head = ("stage", "class", "rtol", "atol", "pass", "max abs", "max ULP", "min cosine", "worst NMSE dB",
            "needs atol", "HF vs oracle", "float64 ratio (rmlx / HF)")
    return (f'<table class="grid"><thead><tr>{"".join(f"<th>{_e(c)}</th>" for c in head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _case_index(rec: dict, slugs: list[str]) -> str:
    rows = []
    for c, slug in zip(rec["cases"], slugs, strict=True):
        fd = (c.get("first_divergence") or {}).get("stage", "")
        lg = c.get("logits") or {}
        dec = max((d["max_abs"] for d in c.get("decode") or []), default=None)
        sizes = ", ".join("×".join(map(str, s)) for s in c.get("image_sizes") or []) or "–"
        rows.append(f'<tr class="{"pass" if c["passed"] else "fail"}"><td><a href="#{slug}">{_e(c["name"])}</a></td>'
                    f'<td class="st">{"pass" if c["passed"] else "FAIL"}</td><td><code>{_e(fd)}</code></td>'
                    f'<td>{_e(sizes)}</td><td>{c.get("n_soft_tokens", 0)}</td>'
                    f'<td>{lg.get("top1_agreement", 0):.0%}</td><td>{_num(lg.get("kl_max"), ".2e")}</td>'
                    f'<td>{_num(dec, ".2e")}</td><td>{c.get("seconds", 0):.2f}</td></tr>')
    head = ("case", "result", "first divergence", "images", "soft tokens", "top-1", "KL max", "decode max abs",
            "seconds")
    return (f'<table class="grid cases"><thead><tr>{"".join(f"<th>{_e(c)}</th>" for c in head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _option_facts(c: dict) -> list[tuple[str, object]]:
    """(label, value) of each family option the case states (``parity.adapter.Option``); an option that is
    the candidate's own value of another only where the two differ."""
    from parity.adapter import options

    out = []
    for name, opt in options().items():
        value = c.get(name)
        if value is None or (opt.candidate_of is not None and value == c.get(opt.candidate_of)):
            continue
        out.append((opt.label or name.replace("_", " "), value))
    return out


def _case(c: dict, slug: str) -> str:
    from parity.report import greedy_cell  # report imports this module

    ok = c["passed"]
    fd = c.get("first_divergence")
    lg = c.get("logits") or {}
    facts = [("model", c.get("model")), ("scenario", c.get("scenario")),
             ("images", ", ".join("×".join(map(str, s)) for s in c.get("image_sizes") or []) or "none"),
             ("soft tokens", c.get("n_soft_tokens")),
             ("audio", {True: "yes", False: "no"}.get(c.get("audio"), "unknown")),
             *_option_facts(c),
             ("top-1 agreement", f"{lg.get('top1_agreement', 0):.1%}"),
             ("KL mean / max", f"{_num(lg.get('kl_mean'), '.2e')} / {_num(lg.get('kl_max'), '.2e')}"),
             ("greedy decode", greedy_cell(c.get("greedy"))),
             ("HF self-consistency", _num(c["reference_self_consistency"]["max_abs_logits"], ".3g")),
             ("seconds", f"{c.get('seconds', 0):.2f}")]
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts)
    msg = f'<pre class="message fail">{_e(fd["message"])}</pre>' if fd else ""
    badge = f'<span class="badge {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'
    where = f' <span class="muted">first divergence <code>{_e(fd["stage"])}</code></span>' if fd else ""
    body = "".join(part for part in (_logit_table(lg, "Logits", opened=False), stage_plot(c), heatmaps(c), masks(c),
                                     kl_plot(c)) if part)
    return (f'<section class="case {"pass" if ok else "fail"}" id="{slug}" data-case="{_e(c["name"])}">'
            f'<details{" open" if not ok else ""}><summary>{badge} <span class="case-name">{_e(c["name"])}</span>'
            f'{where}</summary><dl class="facts">{dl}</dl>{msg}{body}</details></section>')


CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --ink: #1f2328; --muted: #656d76; --line: #d8dee4; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", system-ui, Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 28px 60px; }
header.top { border-bottom: 1px solid var(--line); padding-bottom: 14px; margin-bottom: 18px; }
h1 { font-size: 24px; margin: 0 0 6px; display: flex; align-items: center; gap: 12px; }
h2 { font-size: 18px; margin: 28px 0 10px; }
h4 { font-size: 14px; margin: 18px 0 4px; }
code, pre { font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; color: #fff; font-weight: 700;
         font-size: 12px; letter-spacing: .04em; vertical-align: middle; }
h1 .badge { font-size: 16px; padding: 3px 14px; }
.badge.pass { background: var(--pass); } .badge.fail { background: var(--fail); }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; }
.chip { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 1px 8px; font-size: 12.5px; }
.chip b { font-weight: 600; color: var(--muted); margin-right: 4px; }
.cmd { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px;
       overflow-x: auto; white-space: pre; }
.divergence { border: 1px solid #ffcecb; border-left: 5px solid var(--fail); background: #fff5f5;
              border-radius: 6px; padding: 10px 14px; margin: 16px 0; }
.divergence h2 { margin: 0 0 6px; color: var(--fail); font-size: 17px; }
.divergence pre { margin: 6px 0 0; white-space: pre-wrap; }
.allclear { border: 1px solid #aceebb; border-left: 5px solid var(--pass); background: #f4fdf6;
            border-radius: 6px; padding: 10px 14px; margin: 16px 0; }
table.grid { border-collapse: collapse; width: 100%; font-size: 12.5px; }
table.grid th, table.grid td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: right;
                               white-space: nowrap; }
table.grid th { background: var(--bg); position: sticky; top: 0; font-weight: 600; }
table.grid th:first-child, table.grid td:first-child { text-align: left; }
table.grid tr.fail td { background: #fff5f5; } table.grid tr.fail td.st { color: var(--fail); font-weight: 700; }
table.grid tr.pass td.st { color: var(--pass); }
details.block > summary { font-size: 18px; font-weight: 600; margin: 26px 0 10px; cursor: pointer; }
.scroll { max-height: 430px; overflow-y: auto; border: 1px solid var(--line); border-radius: 6px; }
.toolbar { display: flex; align-items: center; gap: 18px; margin: 26px 0 8px; }
.toolbar h2 { margin: 0; }
.toolbar label { user-select: none; cursor: pointer; }
section.case { border: 1px solid var(--line); border-radius: 8px; margin: 10px 0; background: #fff; }
section.case.fail { border-color: #ffcecb; }
section.case > details > summary { padding: 9px 14px; cursor: pointer; font-weight: 600; list-style-position: inside; }
section.case.fail > details > summary { background: #fff5f5; border-radius: 8px 8px 0 0; }
section.case > details[open] > summary { border-bottom: 1px solid var(--line); }
section.case > details > *:not(summary) { margin-left: 16px; margin-right: 16px; }
.case-name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
body.failing-only section.case.pass, body.failing-only table.cases tr.pass { display: none; }
dl.facts { display: flex; flex-wrap: wrap; gap: 4px 22px; margin: 12px 16px; }
dl.facts div { display: flex; gap: 6px; } dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
pre.message { background: #fff5f5; border: 1px solid #ffcecb; border-radius: 6px; padding: 8px 12px;
              white-space: pre-wrap; }
figure { margin: 10px 0; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
svg.plot { width: 100%; height: auto; display: block; }
svg text.tick { font-size: 11px; fill: #57606a; } svg text.note { font-size: 11.5px; font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 4px 0; color: var(--muted); font-size: 12.5px; }
.key { display: inline-flex; align-items: center; gap: 6px; }
.key.sep { margin-left: 10px; font-weight: 600; }
.sw { display: inline-block; width: 11px; height: 11px; background: var(--c); border-radius: 50%;
      border: 1px solid rgba(0,0,0,.25); }
.sw.line { width: 18px; height: 3px; border-radius: 0; border: 0; }
.sw.diamond { transform: rotate(45deg); border-radius: 1px; width: 9px; height: 9px; }
.heat-row, .mask-row { margin: 8px 0 14px; }
.heat-title, .mask-title { font-weight: 600; font-size: 12.5px; margin-bottom: 4px; }
.heat-figs, .mask-figs { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure.heat { margin: 0; text-align: center; min-width: 132px; }
figure.heat img { display: block; margin: 0 auto; border: 2px solid transparent; border-radius: 3px;
                  image-rendering: pixelated; background: #fff; }
figure.heat.fail img { border-color: var(--fail); }
figure.heat figcaption { font-size: 11.5px; line-height: 1.3; }
.colorbar-row { display: flex; align-items: center; gap: 16px; flex-wrap: wrap; font-size: 12.5px;
                color: var(--muted); }
figure.mask { margin: 0; width: 262px; }
figure.mask svg { display: block; max-width: 100%; height: auto; image-rendering: pixelated; }
figure.mask.in-use figcaption { color: var(--ink); font-weight: 600; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

JS = """
document.getElementById("failing-only").addEventListener("change", function (event) {
  document.body.classList.toggle("failing-only", event.target.checked);
});
"""


def to_html(rec: dict) -> str:
    """The report page: header, first divergence, stage summary, cases (failing ones open)."""
    cases = rec["cases"]
    n_pass = sum(bool(c["passed"]) for c in cases)
    ok = bool(rec["passed"])
    s = rec["settings"]
    v = rec["versions"]
    from parity.adapter import options  # the families' own settings, as the record states them

    chips = [("mode", s["mode"]), ("dtype", s["dtype"]),
             *((o.label or n.replace("_", " "), s[n]) for n, o in options().items() if s.get(n) is not None),
             ("attention", s["attn_implementation"]), ("decode steps", s["decode_steps"])]
    chips += [("stages", ", ".join(s["stages"]))] if s.get("stages") else []
    chips += [("injected", ", ".join(s["inject"]))] if s.get("inject") else []
    chips += [("quantize", s["quantize"])] if s.get("quantize") else []
    main_versions = [(k, v[k]) for k in ("transformers", "torch", "mlx", "numpy") if k in v]
    other_versions = [(k, x) for k, x in v.items() if k not in dict(main_versions)]

    def chip_row(items: list[tuple[str, object]], cls: str = "") -> str:
        return (f'<div class="chips {cls}">'
                + "".join(f'<span class="chip"><b>{_e(k)}</b>{_e(x)}</span>' for k, x in items) + "</div>")

    fd = rec.get("first_divergence")
    slugs = [_slug(i, c["name"]) for i, c in enumerate(cases)]
    if fd:
        target = next((sl for c, sl in zip(cases, slugs, strict=True) if c["name"] == fd["case"]), "")
        from parity.report import oracle_line  # report imports this module: not at import time

        note = "".join("\n" + line for line in oracle_line(fd))
        top = (f'<div class="divergence"><h2>First divergence: <code>{_e(fd["stage"])}</code> in case '
               f'<a href="#{target}"><code>{_e(fd["case"])}</code></a></h2><pre>{_e(fd["message"] + note)}</pre></div>')
    else:
        top = (f'<div class="allclear"><b>Every stage of every case is within its tolerance</b> '
               f'({len(cases)} cases).</div>')
    body = "".join(_case(c, sl) for c, sl in zip(cases, slugs, strict=True))
    title = f"rmlx parity {'PASS' if ok else 'FAIL'}: {n_pass}/{len(cases)} cases"
    stops = "".join(f'<stop offset="{i / (len(VIRIDIS) - 1):.3f}" stop-color="{c}"/>' for i, c in enumerate(VIRIDIS))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; \
script-src 'unsafe-inline'">
<link rel="icon" href="data:,">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>
<linearGradient id="viridis">{stops}</linearGradient></defs></svg>
<main>
<header class="top">
<h1><span class="badge {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span> rmlx parity:
{n_pass} of {len(cases)} cases pass</h1>
<div class="muted">run <code>{_e(rec["run_id"])}</code>, {_e(rec["created"])}, wall time {rec["wall_time_s"]:.1f} s,
schema <code>{_e(rec["schema"])}</code></div>
{chip_row(chips)}
{chip_row(main_versions)}
{chip_row(other_versions, "muted")}
<div class="cmd"><code>{_e(rec["command"])}</code></div>
</header>
{top}
<details class="block" open><summary>Stages (worst over all cases, forward order)</summary>
<div class="scroll">{_summary_table(rec)}</div>
</details>
{_logit_table(rec.get("logits"), "Logits, every case")}
<div class="toolbar"><h2>Cases</h2>
<label><input type="checkbox" id="failing-only"> show failing cases only</label>
<span class="muted">{len(cases) - n_pass} failing, {n_pass} passing</span></div>
{_case_index(rec, slugs)}
{body}
<footer>Rendered from the JSON record ({_e(rec["schema"])}) by parity/report/html.py (no network).</footer>
</main>
<script>{JS}</script>
</body>
</html>
"""


"""The HTML report, rendered from the JSON record, opened in a real headless browser.

Debian's Chromium (/usr/bin/chromium, package ``chromium``) driven by playwright; no browser is ever
downloaded. Two real runs: one with a planted defect (``vision-causal``: two failing image cases and
a passing text-only case) and a clean one under the other mask policy. The page must show every
case and every kind of plot, the mask-difference picture of the failing cases, log nothing to the
console and make no request other than file: and data:. ``RMLX_SAVE_SCREENSHOT=1`` also copies the
screenshot of the failing report to docs/html-report.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.cli import main
from parity.report.html import to_html
from parity.report.viz import pack_array, pack_bool, unpack_array, unpack_bool
from tests.conftest import FIXTURES, ROOT

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")  # looked up on PATH
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TINY = str(FIXTURES / "models" / "tiny")


def _playwright_chromium() -> str | None:
    """The Chromium of Playwright's own install (``playwright install chromium``), if there is one."""
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # no driver, no browser registry: nothing installed
        return None
    return path if path and Path(path).is_file() else None


def chromium_executable(names: tuple[str, ...] = BROWSERS, playwright: bool = True) -> str:
    """A Chromium on PATH (Debian's ``chromium``, Chrome), else Playwright's own. Without one: a failure
    in CI (``CI`` set: CI must not pass without the browser test), a skip with the reason elsewhere."""
    found = next((p for p in map(shutil.which, names) if p), None) or (_playwright_chromium() if playwright else None)
    if found is None:
        if not os.environ.get("CI"):
            pytest.skip(f"no Chromium on PATH ({', '.join(names)}) nor Playwright's own (outside CI the browser "
                        "test is skipped; `sudo apt-get install chromium` or `playwright install chromium` runs it)")
        pytest.fail(f"no Chromium on PATH ({', '.join(names)}) nor Playwright's own: the HTML report test needs "
                    "one. Install it with `sudo apt-get install chromium` (.ci/run does).", pytrace=False)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for name, extra, want in (
        ("failing", ["--case", "image/gradient", "--case", "two-images", "--case", "text-only",
                     "--inject", "vision-causal"], 1),
        ("clean", ["--case", "image/gradient", "--mask-policy", "hf-forward"], 0),
    ):
        folder = tmp_path_factory.mktemp(name) / "report"
        code = main(["run", "--model", TINY, *extra, "--no-oracle", "--decode-steps", "2",
                     "--report-dir", str(folder)])
        assert code == want, (name, code)
        out[name] = (folder, json.loads((folder / "report.json").read_text()))
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_report(browser, folder: Path):
    """(page, problems): console errors and warnings, page errors, and requests that are not file:/data:."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(f"request {r.url}"))
    page.goto((folder / "report.html").as_uri(), wait_until="load")
    return page, problems


def case_section(page, name: str):
    return page.locator(f'section.case[data-case="{name}"]')


def test_failing_report_in_browser(runs, browser):
    folder, rec = runs["failing"]
    page, problems = open_report(browser, folder)
    assert "FAIL" in page.title() and "1/3" in page.title()
    fd = page.locator(".divergence")
    assert "mask.sliding_attention" in fd.inner_text() and "tiny/image/gradient" in fd.inner_text()
    assert page.locator("section.case").count() == len(rec["cases"]) == 3
    for case in rec["cases"]:
        sec = case_section(page, case["name"])
        assert sec.count() == 1, case["name"]
        assert sec.locator(":scope > details").evaluate("d => d.open") == (not case["passed"])
        assert sec.locator("svg.stage-plot").count() == 1
        assert sec.locator("svg.kl-plot").count() == 1
        logits = sec.locator("details.block", has_text="Logits").text_content()  # the case's own statistics
        assert "KL p99 / p99.9" in logits and "same top token" in logits
        assert sec.locator(".facts", has_text="greedy decode").count() == 1
        assert sec.locator("svg.mask-ref").count() == 4  # {full, sliding} x {official, hf-forward}
        n_images = len(case["image_sizes"])
        assert sec.locator("img.heatmap").count() == 8 * n_images  # pixel_values + 7 vision stages per image
        assert sec.locator("svg.colorbar").count() == (1 if n_images else 0)
        if case["passed"]:
            assert sec.locator("svg.mask-diff, svg.mask-candidate").count() == 0
            assert sec.locator("svg.stage-plot .point.fail").count() == 0
        else:  # the candidate's sliding mask differs: its picture and the difference picture
            assert sec.locator("svg.mask-candidate").count() == 1 and sec.locator("svg.mask-diff").count() == 1
            diff_caption = sec.locator("figure.diff figcaption").inner_text()
            assert "0 cells extra" in diff_caption and "missing" in diff_caption  # causal: it only loses cells
            plot = sec.locator("svg.stage-plot")
            assert "first divergence: mask.sliding_attention" in plot.inner_html()
            assert plot.locator(".point.fail").count() == sum(not s["passed"] for s in case["stages"])
            assert plot.locator(".point.pass").count() == sum(s["passed"] for s in case["stages"])
    broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert broken == 0
    assert page.locator("table.cases tbody tr").count() == 3

    toggle = page.locator("#failing-only")
    toggle.check()
    assert case_section(page, "tiny/text-only").is_hidden()
    assert case_section(page, "tiny/two-images").is_visible()
    toggle.uncheck()
    assert case_section(page, "tiny/text-only").is_visible()

    shot = folder / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("RMLX_SAVE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "html-report.png")
    assert not problems, problems


def test_clean_report_in_browser(runs, browser):
    folder, rec = runs["clean"]
    page, problems = open_report(browser, folder)
    assert "PASS" in page.title()
    assert page.locator("header .badge.pass").count() == 1 and page.locator(".allclear").count() == 1
    assert page.locator("section.case.pass").count() == len(rec["cases"]) == 1
    sec = case_section(page, "tiny/image/gradient")
    assert sec.locator(":scope > details").evaluate("d => d.open") is False  # passing cases start closed
    assert sec.locator("svg.mask-diff").count() == 0 and sec.locator(".point.fail").count() == 0
    assert sec.locator("img.heatmap").count() == 8
    assert not problems, problems


def test_missing_chromium_fails_with_install_hint_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install chromium"):
        chromium_executable(("no-such-browser-rmlx",), playwright=False)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"outside CI the browser test is skipped"):
        chromium_executable(("no-such-browser-rmlx",), playwright=False)


def test_html_is_rendered_from_the_record_only(runs):
    for folder, _ in runs.values():
        assert (folder / "report.html").read_text() == to_html(json.loads((folder / "report.json").read_text()))


def test_html_escapes_record_text(runs):
    rec = json.loads(json.dumps(runs["failing"][1]))
    rec["command"] = 'rmlx-parity run --image "<script>alert(1)</script>.png"'
    rec["cases"][0]["name"] = "tiny/<img src=x onerror=alert(1)>"
    page = to_html(rec)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "tiny/&lt;img src=x onerror=alert(1)&gt;" in page


def test_record_viz(runs):
    """What the pictures are drawn from: masks under both policies, the candidate's differing one,
    per-patch errors over the grid, per-position KL, max |ref| aligned with the stages."""
    _, rec = runs["failing"]
    for case in rec["cases"]:
        viz = case["viz"]
        length = sum(n for _, n in viz["masks"]["token_types"])
        causal = np.tril(np.ones((length, length), bool))
        full = {p: unpack_bool(viz["masks"][p]["full_attention"]) for p in ("official", "hf-forward")}
        assert (full["official"] == causal).all()  # official: full layers causal
        assert (full["hf-forward"] >= causal).all()  # hf-forward: causal | block
        assert (full["hf-forward"] != causal).any() == bool(case["image_sizes"])
        assert unpack_array(viz["kl_per_position"]).shape == (length,)
        assert len(viz["ref_max_abs"]) == len(case["stages"])
        # the labels the page shows travel with the record (the page knows no family)
        assert viz["masks"]["views"] == ["official", "hf-forward"] and viz["masks"]["in_use"] == "official"
        assert [name for _, name, _ in viz["masks"]["token_legend"]] == ["text", "image", "video", "audio"]
        assert sum(n for _, n in viz["stage_groups"]) == len(case["stages"])
        assert viz["stage_groups"][-1] == ["head", 2]  # text.norm, logits
        if case["image_sizes"]:
            sliding = unpack_bool(viz["masks"]["official"]["sliding_attention"])
            cand = unpack_bool(viz["masks"]["candidate"]["sliding_attention"])
            assert (cand <= causal).all() and (cand != sliding).any()  # vision-causal: no look-ahead in images
            pe = viz["patch_error"]
            assert sum(pe["patches"]) == case["n_soft_tokens"]
            assert unpack_array(pe["positions"]).shape == (case["n_soft_tokens"], 2)
            assert unpack_array(pe["stages"]["image.pixel_values"]).max() == 0  # preprocessing stays exact
            soft = next(s for s in case["stages"] if s["name"] == "vision.soft_tokens")
            assert np.isclose(unpack_array(pe["stages"]["vision.soft_tokens"]).max(), soft["max_abs"], rtol=1e-3)
        else:
            assert viz["patch_error"] is None and viz["masks"]["candidate"] == {}


def test_a_record_without_labels_renders(runs):
    """A record whose ``viz`` carries no labels (an older record, another family's) still renders every
    picture: views from its keys, the first in use; token types named by number; stages grouped by name."""
    rec = json.loads(json.dumps(runs["failing"][1]))
    for case in rec["cases"]:
        case["viz"].pop("stage_groups")
        for key in ("views", "in_use", "candidate_view", "token_legend"):
            case["viz"]["masks"].pop(key)
    page = to_html(rec)
    assert page.count('class="mask-plot mask-ref') == 4 * len(rec["cases"])
    assert page.count('class="heatmap"') == sum(8 * len(c["image_sizes"]) for c in rec["cases"])
    assert "reference, official (in use)" in page and "may attend (type 1 key)" in page
    assert ">layers.0</text>" in page and ">L0</text>" not in page
    labelled = to_html(runs["failing"][1])
    assert ">L0</text>" in labelled and "may attend (image key)" in labelled


def test_masks_of_both_policies_agree_across_runs(runs):
    """Each policy's masks are the same whether they come from the run under that policy (hooked on
    its forward) or from the run under the other one (the static dict / HF's own forward)."""
    (_, official_run), (_, hf_run) = runs["failing"], runs["clean"]
    a = next(c for c in official_run["cases"] if c["name"] == "tiny/image/gradient")["viz"]["masks"]
    b = next(c for c in hf_run["cases"] if c["name"] == "tiny/image/gradient")["viz"]["masks"]
    assert a["token_types"] == b["token_types"]
    for policy in ("official", "hf-forward"):
        for kind in ("full_attention", "sliding_attention"):
            assert np.array_equal(unpack_bool(a[policy][kind]), unpack_bool(b[policy][kind])), (policy, kind)
    assert b["candidate"] == {}


def test_pack_roundtrip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    assert np.array_equal(unpack_array(pack_array(x)), x)
    ids = rng.integers(-1, 30, (7, 2)).astype(np.int16)
    assert np.array_equal(unpack_array(pack_array(ids, "int16")), ids)
    err = np.array([0.0, 3e-9, 1e-6, 2.7e-5, 1e-30], np.float32)
    back = unpack_array(pack_array(err, "float16", scaled=True))
    assert back[0] == 0 and (back[1:] > 0).all()  # zero stays zero, nonzero stays nonzero
    np.testing.assert_allclose(back[:4], err[:4], rtol=1e-3)
    mask = rng.random((37, 37)) < 0.3
    assert np.array_equal(unpack_bool(pack_bool(mask)), mask)
    with pytest.raises(ValueError, match="float16"):
        pack_array(x, "float32", scaled=True)

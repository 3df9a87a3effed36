"""Top-1 and greedy-decode verdicts: a flip at a near tie is rounding, one at a wide margin fails the
logits; greedy agreement compares what each side chooses at the same step, the prefill's choice first."""

import json

import numpy as np

from parity.cli import main
from parity.metrics import compare, logits_agreement, oracle_distance
from parity.pipeline import decisive_flips, decode_entries, greedy_agreement
from parity.tolerances import Tol
from tests.conftest import MODELS


def _logits(rng, positions=400, vocab=40):
    ref = rng.standard_normal((1, positions, vocab)).astype(np.float32) * 3
    return ref, ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-4


def _flip(ref, cand, pos, margin):
    """Make the reference prefer token 0 over token 1 by ``margin`` at ``pos``; the candidate the reverse."""
    ref[0, pos, :] = -5.0
    ref[0, pos, 0], ref[0, pos, 1] = 5.0, 5.0 - margin
    cand[0, pos] = ref[0, pos]
    cand[0, pos, 1] = 5.0 + 1e-3


def test_a_flip_at_a_wide_margin_fails_the_logits_and_one_at_a_near_tie_does_not():
    rng = np.random.default_rng(0)
    loose = Tol(atol=10.0, rtol=0.0)
    for margin, decisive in ((2.0, True), (5e-5, False)):
        ref, cand = _logits(rng)
        _flip(ref, cand, 17, margin)
        lg = logits_agreement(cand, ref)
        assert lg["top1_flips"] == 1 and lg["top1_flips_decisive"] == int(decisive)
        (d,) = decisive_flips([compare("logits", cand, ref, loose)], lg)
        assert d.passed is not decisive  # within the absolute bound either way: the margin decides
        if decisive:
            assert "near-tie margin" in d.error


def test_greedy_agreement_compares_the_choices_of_the_same_step():
    rng = np.random.default_rng(1)
    ref_pre, cand_pre = _logits(rng, positions=6)
    steps = [_logits(rng, positions=1) for _ in range(3)]
    ref_steps, cand_steps = [r for r, _ in steps], [c for _, c in steps]
    _flip(ref_steps[1], cand_steps[1], 0, 2.0)  # decode step 2: a decisive flip
    fed = [int(ref_pre[0, -1].argmax()), int(ref_steps[0][0, -1].argmax()), int(ref_steps[1][0, -1].argmax())]
    tie = logits_agreement(cand_pre, ref_pre)["tie_margin"]  # a step's one position takes the prefill's margin
    decode = decode_entries(cand_steps, ref_steps, fed, "float32", tie_margin=tie)
    g = greedy_agreement(decode, (cand_pre, ref_pre), tie)
    assert g["steps"] == 4 and g["reference"][0] == fed[0] and g["reference"][1:3] == fed[1:]
    assert g["first_difference"] == 2 and g["near_tie"] is False
    assert [d["passed"] for d in decode] == [True, False, True]  # the decisive flip fails its step
    assert decode_entries(cand_steps, ref_steps, fed, "float32")[1]["near_tie"]  # its own margin: 2x its error
    same = greedy_agreement(decode_entries(ref_steps, ref_steps, fed, "float32"), (ref_pre, ref_pre))
    assert same["first_difference"] is None and same["candidate"] == same["reference"]


def test_a_clean_run_agrees_on_every_greedy_choice(tmp_path):
    out = tmp_path / "r.json"
    code = main(["run", "--model", str(MODELS[0]), "--case", "text-only", "--case", "text-9", "--no-oracle",
                 "--report-dir", str(tmp_path / "r"), "--json", str(out)])
    rec = json.loads(out.read_text())
    assert code == 0
    for case in rec["cases"]:
        g = case["greedy"]
        assert g["steps"] == len(case["decode"]) + 1 and g["first_difference"] is None
        # the token fed at decode step k is the reference's choice at step k - 1 (the prefill's first)
        assert [d["token"] for d in case["decode"]] == g["reference"][:-1]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Logits per case" in md and f"same {len(rec['cases'][0]['decode']) + 1}/" in md


def test_an_all_zero_oracle_floors_at_one_roundoff_absolute():
    z = np.zeros(64)
    tiny = oracle_distance(z, z + 1e-9, z)
    assert tiny["floor"] == 2.0**-24 and tiny["ratio"] < 1  # rounding-size noise on an exact zero passes
    assert oracle_distance(z, z + 1e-3, z)["ratio"] > 1000

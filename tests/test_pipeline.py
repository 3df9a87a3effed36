"""The one case pipeline (``parity.pipeline.CaseRun``): a driver only produces values. Fed stage by stage
on compare workers, keeping only what the pictures read (as the layer-by-layer driver feeds it), it gives
the resident driver's result; what it does not keep it drops."""

from __future__ import annotations

import numpy as np

from parity.adapter import family_of
from parity.pipeline import CaseRun
from parity.runner import Settings, default_scenarios, run_case
from rmlx.imagefile import load_image
from tests.conftest import FIXTURES

MODEL = FIXTURES / "models" / "tiny"


def test_settled_stage_by_stage_equals_settled_at_once():
    settings = Settings.of(decode_steps=1, oracle=False)
    adapter = family_of(MODEL).load(MODEL, settings)
    scenario = next(s for s in default_scenarios([], FIXTURES / "images", [MODEL]) if s.name == "two-images")
    decoded = {p: load_image(p) for p in scenario.images}
    resident = run_case(adapter, MODEL, scenario, decoded, settings)

    run = CaseRun(adapter, MODEL, scenario, decoded, settings, keep=lambda n: not n.startswith("layers."),
                  workers=2)
    ref, ref_steps, tokens, _, extras = adapter.reference(scenario, run.inputs, run.pre, settings, 1)
    cand, cand_steps = adapter.candidate(scenario, run.inputs, decoded, settings, tokens)
    ref, cand = dict(ref), dict(cand)
    logits = (cand.pop("logits"), ref.pop("logits"))
    for name in run.names:
        if name != "logits":  # the prefill logits are finish()'s
            run.settle([name], ref, cand)
    assert not set(ref) & set(run.names) and not set(cand) & set(run.names)  # every settled stage dropped
    assert run.kept_ref and not any(n.startswith("layers.") for n in run.kept_ref)
    result = run.finish(logits, ref_steps, cand_steps, tokens, extras, self_consistency=None)

    assert [d.to_dict() for d in result.diffs] == [d.to_dict() for d in resident.diffs]
    assert result.decode == resident.decode and result.greedy == resident.greedy
    assert result.logits == resident.logits
    for key in ("patch_error", "masks", "stage_groups", "kl_per_position", "ref_max_abs"):
        assert result.viz[key] == resident.viz[key], key
    assert result.positions.keys() == resident.positions.keys()
    assert all(np.array_equal(result.positions[k], resident.positions[k]) for k in resident.positions)


def test_a_family_without_pictures_gets_the_cores():
    """An adapter with no ``viz``: the record's pictures are the per-position KL and max |ref| only."""
    from parity.report.viz import case_viz

    viz = case_viz(None, {}, {"a": np.array([1.0, -3.0])}, {}, {}, None, np.zeros(3, np.float32), ["a"], [3.0])
    assert set(viz) == {"kl_per_position", "ref_max_abs"} and viz["ref_max_abs"] == [3.0]

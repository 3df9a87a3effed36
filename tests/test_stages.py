"""Every stage of the table resolves on both sides for every fixture model and scenario kind: a
renamed HF module or a dropped tap fails here, loudly, instead of silently removing a stage."""

from pathlib import Path

import pytest

from parity.adapters.gemma4_unified.adapter import special_scenarios
from parity.adapters.gemma4_unified.stages import VISION, stages_for
from parity.runner import Settings
from parity.stages import hook_points, matches_any, select
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.models.gemma4_unified.image import load_image
from rmlx.tap import LAYER_POINTS
from tests.conftest import FIXTURES, MODELS

SCENARIOS = {s.name: s for s in special_scenarios(FIXTURES / "images")}


def test_layer_points_are_the_table_order():
    from parity.adapters.gemma4_unified.stages import _LAYER

    assert tuple(_LAYER) == LAYER_POINTS


PAIRS = [(m, s) for m in MODELS for s in ("text-only", "image-and-audio", "two-images")
         if s != "image-and-audio" or ModelArgs.from_file(m / "config.json").audio is not None]


@pytest.mark.parametrize("model,scenario", PAIRS, ids=[f"{m.name}-{s}" for m, s in PAIRS])
def test_every_stage_resolves_on_both_sides(model, adapters, scenario):
    adapter = adapters(model)
    sc = SCENARIOS[scenario]
    assert adapter.supports(sc)
    stages = adapter.stages(sc)
    for path, _ in hook_points(stages).values():
        adapter.hf.model.get_submodule(path)  # raises AttributeError when HF renames a module
    decoded = {p: load_image(p) for p in sc.images}
    settings = Settings.of(max_soft_tokens=70)
    inputs, pre = adapter.inputs(sc, decoded, settings)
    ref, *_ = adapter.reference(sc, inputs, pre, settings, 0)
    cand, _ = adapter.candidate(sc, inputs, decoded, settings, [])
    names = [s.name for s in stages]
    assert sorted(ref) == sorted(names), f"reference: missing {sorted(set(names) - set(ref))}"
    assert sorted(cand) == sorted(names), f"candidate: missing {sorted(set(names) - set(cand))}"
    for n in names:
        assert ref[n].shape == cand[n].shape, (n, ref[n].shape, cand[n].shape)
        assert ref[n].shape[0] in (1, len(sc.images)), f"{n}: batch axis kept"


def test_stage_order_and_kv_shared_layers(model_dir, adapters):
    cfg = adapters(model_dir).args.text
    names = [s.name for s in stages_for(cfg, True, False)]
    assert len(names) == len(set(names))
    assert names[:2] == ["image.pixel_values", "image.position_ids"] and names[-2:] == ["text.norm", "logits"]
    assert names.index("mask.full_attention") < names.index("mask.sliding_attention") < names.index(
        "layers.0.input_layernorm")
    for i in range(cfg.num_hidden_layers):
        has_kv = f"layers.{i}.attn.k" in names
        assert has_kv == (not cfg.layer(i).kv_shared)


def test_select_globs():
    assert [s.name for s in select(["vision.patch_*"], VISION)] == ["vision.patch_ln1", "vision.patch_dense",
                                                                      "vision.patch_ln2"]
    assert select(None, VISION) == VISION


def test_fixture_paths_exist():
    assert all(Path(p).is_file() for s in SCENARIOS.values() for p in s.images)


def test_every_stage_points_at_the_code_that_taps_it():
    """One hop from the stage table to the port: each stage's ``port`` names a function or method of
    rmlx that exists and whose source taps that stage (the literal name, or its layer template)."""
    import importlib
    import inspect

    from parity.adapter import family_of
    from tests.conftest import ALL_MODELS

    for model in ALL_MODELS:
        for s in family_of(model).stage_table(model):
            module, _, qualname = s.port.partition(":")
            assert module.startswith("rmlx") and qualname, (model.name, s.name, s.port)
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            source = inspect.getsource(inspect.getmodule(obj))
            tail = s.name.split(".", 3)[-1] if s.name.startswith("vision.layers.") else s.name.split(".", 2)[-1]
            said = {s.name, tail, s.name.removeprefix("mask.")}  # the name, its layer point, its mask kind
            assert any(f'"{n}"' in source for n in said), (s.name, s.port)


@pytest.mark.parametrize("name,pattern,hit", [
    ("layers.12.out", "layers.*.out", True),
    ("layers.0.attn.out", "layers.*.out", False),  # '*' stays inside one dotted component
    ("layers.0.attn.out", "layers.**.out", True),
    ("layers.13.attn.q", "layers.1?.attn.*", True),
    ("layers.3.attn.q", "layers.1?.attn.*", False),
    ("layers.1.out", "layers.[0-2].out", True),
    ("layers.5.out", "layers.[!0-2].out", True),
    ("image/solid-green", "image/solid-*", True),
    ("logits@decode.2", "logits@decode.*", True),
    ("vision.patch_ln1", "vision", False),
])
def test_globs_match_whole_dotted_components(name, pattern, hit):
    assert matches_any(name, [pattern]) is hit

"""Every stage of the table resolves on both sides for every fixture model: a renamed HF module or a
dropped tap fails here, loudly, instead of silently removing a stage from the comparison."""

from parity.stages import STAGES, hook_points, select
from rmlx.image import load_image
from tests.conftest import IMAGES


def test_stage_names_are_unique_and_ordered():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    assert names[0] == "image.pixel_values" and names[-1] == "vision.soft_tokens"


def test_every_stage_resolves_on_both_sides(model_dir, adapters):
    adapter = adapters(model_dir)
    for path, _ in hook_points(STAGES).values():
        adapter.hf.model.get_submodule(path)  # raises AttributeError when HF renames a module
    img = load_image(IMAGES[0])
    ref = adapter.reference(img, 70, STAGES)
    cand = adapter.candidate(img, 70)
    names = [s.name for s in STAGES]
    assert sorted(ref) == sorted(names), f"reference: missing {sorted(set(names) - set(ref))}"
    assert sorted(cand) == sorted(names), f"candidate: missing {sorted(set(names) - set(cand))}"
    for n in names:
        assert ref[n].shape == cand[n].shape, n
        assert ref[n].shape[0] == 1, f"{n}: batch axis kept"


def test_select_globs():
    assert [s.name for s in select(["vision.patch_*"])] == ["vision.patch_ln1", "vision.patch_dense",
                                                             "vision.patch_ln2"]
    assert select(None) == STAGES

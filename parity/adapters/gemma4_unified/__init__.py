"""Gemma 4 unified (``model_type: gemma4_unified``): the encoder-free family.

``FAMILY`` is what the core sees (``parity.adapter.Family``), registered through the entry-point group
``rmlx.parity.families`` in pyproject.toml. The stage table is ``stages.py``, the defect catalog
``defects.py``, the per-checkpoint adapter ``adapter.py``, the layer-by-layer driver ``stream.py``.

Importing this package imports no MLX, torch or transformers: the stage vocabulary (``classify``,
``order_key``) serves ``compare`` in a core install. The adapter and the defect catalog, which need
them, are imported when first used.
"""

from __future__ import annotations

from pathlib import Path

from parity.adapter import Adapter, Option, Scenario
from parity.adapters.gemma4_unified import stages
from parity.defects import Defect
from parity.stages import Stage
from rmlx.errors import InputError
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.models.gemma4_unified.image import check_max_soft_tokens

# Small, and together they exercise every defect: an image, two images (block structure), image +
# audio, and a text-only prompt longer than every sliding window (the decode steps reach the cache).
SELFTEST_CASES = ("image/gradient", "two-images", "image-and-audio", "text-only", "text-4", "text-9",
                  "image/photo-1100x1400", "image/sliver-4x1200")


def unique_image_scenarios(images: list[Path]) -> list[Scenario]:
    """One single-image case per image; a repeated file name in another folder gets a suffix."""
    from parity.adapters.gemma4_unified.scenarios import image_scenario

    out, seen = [], {}
    for p in images:
        s = image_scenario(p)
        seen[s.name] = seen.get(s.name, 0) + 1
        out.append(s if seen[s.name] == 1 else Scenario(f"{s.name}-{seen[s.name]}", s.parts))
    return out


MASK_POLICIES = ("official", "hf-forward")
OPTIONS = (
    Option("max_soft_tokens", 280, "soft tokens per image: 70, 140, 280, 560 or 1120 (default 280)", int,
           headline=True),
    Option("mask_policy", "official", "attention-mask policy of both sides (default official; see docs/verdicts.md)",
           choices=MASK_POLICIES, label="mask policy"),
    Option("candidate_mask_policy", None, "give the candidate a different policy than the reference (shows the "
           "harness naming a mask difference)", choices=MASK_POLICIES, candidate_of="mask_policy",
           label="candidate mask policy"),
)


class Gemma4UnifiedFamily:
    model_type = "gemma4_unified"
    options = OPTIONS
    # the smallest image budget: every image still spans several sliding windows of the fixtures
    selftest_settings = {"max_soft_tokens": 70}
    selftest_cases = SELFTEST_CASES

    @property
    def defects(self) -> dict[str, Defect]:
        from parity.adapters.gemma4_unified import defects

        return defects.CATALOG

    def args(self, model_dir: Path) -> ModelArgs:
        return ModelArgs.from_file(Path(model_dir) / "config.json")

    def check_settings(self, settings) -> None:
        check_max_soft_tokens(settings.max_soft_tokens)

    def load(self, model_dir: Path, settings) -> Adapter:
        from parity.adapters.gemma4_unified.adapter import Gemma4UnifiedAdapter

        return Gemma4UnifiedAdapter(model_dir, settings.dtype, settings.attn_implementation, settings.quantize,
                                    settings.threads)

    def load_streamed(self, model_dir: Path, settings) -> Adapter:
        from parity.adapters.gemma4_unified.stream import StreamAdapter

        return StreamAdapter(model_dir, settings.dtype, settings.attn_implementation, settings.quantize,
                             settings.threads)

    def run_streamed(self, adapter, model: Path, scenario: Scenario, decoded: dict, settings, keep_captures=False):
        from parity.adapters.gemma4_unified.stream import run_case_streamed

        return run_case_streamed(adapter, model, scenario, decoded, settings, keep_captures)

    def convert(self, src: Path, dst: Path, quantize: str, keep: list[str]) -> dict[str, str]:
        from rmlx.models.gemma4_unified.load import save_quantized

        return save_quantized(src, dst, quantize, keep)

    def scenarios(self, images: list[Path], fixture_images: Path | None) -> list[Scenario]:
        from parity.adapters.gemma4_unified.scenarios import special_scenarios

        specials = list(special_scenarios(fixture_images)) if fixture_images is not None else []
        return unique_image_scenarios(images) + specials

    def selftest_scenarios(self, fixture_images: Path) -> list[Scenario]:
        every = self.scenarios(sorted(fixture_images.glob("*.png")), fixture_images)
        picked = [s for s in every if s.name in self.selftest_cases]
        missing = sorted(set(self.selftest_cases) - {s.name for s in picked})
        if missing:
            raise InputError(f"{fixture_images}: the self-test cases {missing} need images that are not there")
        return picked

    def supports(self, model_dir: Path, scenario: Scenario) -> bool:
        from parity.adapters.gemma4_unified.scenarios import supports

        return supports(self.args(model_dir), scenario)

    def stage_table(self, model_dir: Path) -> tuple[Stage, ...]:
        cfg = self.args(model_dir)
        return stages.stages_for(cfg.text, cfg.vision is not None, cfg.audio is not None)

    def classify(self, name: str) -> Stage | None:
        return stages.classify(name)

    def order_key(self, name: str) -> tuple | None:
        return stages.order_key(name)

    def expected_stage(self, defect: Defect, adapter, scenario: Scenario) -> str:
        from parity.adapters.gemma4_unified import defects

        return defects.expected_stage(defect, adapter.args.text.layer_types,
                                      [s.name for s in adapter.stages(scenario)])


FAMILY = Gemma4UnifiedFamily()

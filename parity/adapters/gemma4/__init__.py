"""Gemma 4 with the SigLIP-style vision tower (``model_type: gemma4``, HF ``Gemma4ForConditionalGeneration``).

``FAMILY`` is what the core sees (``parity.adapter.Family``), registered through the entry-point group
``rmlx.parity.families`` (``gemma4 = "parity.adapters.gemma4:FAMILY"``). The stage table is
``stages.py``, the defect catalog ``defects.py``, the per-checkpoint adapter ``adapter.py``. Scenarios
are the unified family's; the ones with audio are not supported (no audio tower is ported). Both mask
policies run: ``official`` is HF's own gemma4 forward, ``hf-forward`` is forced on the reference
through the per-layer-type mask dict (``reference.gemma4.hf.Runner.masks``).

As for the unified family, importing this package imports no MLX, torch or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from parity.adapter import Adapter, Scenario
from parity.adapters.gemma4 import stages
from parity.adapters.gemma4_unified import Gemma4UnifiedFamily
from parity.defects import Defect
from parity.stages import Stage
from rmlx.errors import InputError

if TYPE_CHECKING:
    from rmlx.models.gemma4.config import ModelArgs

# an image (padding rows at the self-test budget), two images of different sizes, and text only (no
# vision defect may fire there: the false-alarm check)
SELFTEST_CASES = ("image/gradient", "two-images", "text-only")

__all__ = ["FAMILY", "Gemma4Family"]


def supports(args, scenario: Scenario) -> bool:
    """No audio tower; images need a vision tower (``args``: ``rmlx.models.gemma4.config.ModelArgs``)."""
    return not scenario.has_audio and (not scenario.images or args.vision is not None)


class Gemma4Family(Gemma4UnifiedFamily):
    """The unified family's scenarios and self-test selection; its own port, stages and defects."""

    model_type = "gemma4"
    selftest_cases = SELFTEST_CASES

    @property
    def defects(self) -> dict[str, Defect]:
        from parity.adapters.gemma4 import defects

        return defects.CATALOG

    def args(self, model_dir: Path) -> ModelArgs:
        from rmlx.models.gemma4.config import ModelArgs

        return ModelArgs.from_file(Path(model_dir) / "config.json")

    def check_settings(self, settings) -> None:
        super().check_settings(settings)
        if settings.quantize is not None:
            raise InputError(f"--quantize {settings.quantize}: the gemma4 family has no quantized run yet")
        if settings.stream:
            raise InputError("--stream: the gemma4 family has no layer-by-layer driver yet")

    def load(self, model_dir: Path, settings) -> Adapter:
        from parity.adapters.gemma4.adapter import Gemma4Adapter

        return Gemma4Adapter(model_dir, settings.dtype, settings.attn_implementation, settings.threads)

    def load_streamed(self, model_dir: Path, settings) -> Adapter:
        raise InputError(f"{model_dir}: the gemma4 family has no layer-by-layer driver (--stream)")

    def convert(self, src: Path, dst: Path, quantize: str, keep: list[str]) -> dict[str, str]:
        raise InputError(f"{src}: the gemma4 family has no quantized checkpoints yet (convert --quantize {quantize})")

    def run_streamed(self, adapter, model: Path, scenario: Scenario, decoded: dict, settings, keep_captures=False):
        raise InputError(f"{model}: the gemma4 family has no layer-by-layer driver (--stream)")

    def supports(self, model_dir: Path, scenario: Scenario) -> bool:
        return supports(self.args(model_dir), scenario)

    def stage_table(self, model_dir: Path) -> tuple[Stage, ...]:
        a = self.args(model_dir)
        v = a.vision
        return stages.stages_for(a.text, None if v is None else v.num_hidden_layers,
                                 v is not None and v.standardize, v is not None)

    def classify(self, name: str) -> Stage | None:
        return stages.classify(name)

    def order_key(self, name: str) -> tuple | None:
        return stages.order_key(name)

    def expected_stage(self, defect: Defect, adapter, scenario: Scenario) -> str:
        from parity.adapters.gemma4 import defects

        return defects.expected_stage(defect)


FAMILY = Gemma4Family()

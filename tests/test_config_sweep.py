"""Config sweep: Hypothesis draws valid Gemma 4 unified configurations within small bounds, the
transformers config classes build them, and the port must load each and pass teacher-forced parity on
a short prompt and an image. The default run draws 6; ``RMLX_SWEEP_EXAMPLES=N`` (``nox -s sweep``:
200) draws N."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from parity.cli import main
from tests.conftest import FIXTURES

SWEEP = settings(max_examples=int(os.environ.get("RMLX_SWEEP_EXAMPLES", "6")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw) -> dict:
    layers = draw(st.integers(2, 4))
    layer_types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=layers - 1,
                                max_size=layers - 1)) + ["full_attention"]  # transformers forces the last layer
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    # a shared ("reuse") layer reads the last earlier non-shared layer of its type; transformers requires
    # every layer type to have a non-shared layer
    shared = draw(st.integers(0, layers - 1))
    if set(layer_types[:layers - shared]) != set(layer_types):
        shared = 0
    text = dict(vocab_size=draw(st.sampled_from([64, 99, 512])), hidden_size=draw(st.sampled_from([16, 32])),
                intermediate_size=draw(st.sampled_from([16, 37, 64])), num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=draw(st.sampled_from([8, 16])), global_head_dim=draw(st.sampled_from([8, 16, 32])),
                layer_types=layer_types, sliding_window=draw(st.integers(2, 16)), num_kv_shared_layers=shared,
                final_logit_softcapping=draw(st.sampled_from([None, 30.0, 5.0])),
                use_double_wide_mlp=draw(st.booleans()), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    width = draw(st.sampled_from([8, 16]))  # transformers projects output_proj_dims-wide soft tokens: equal
    vision = dict(patch_size=draw(st.sampled_from([4, 5, 8, 16])), pooling_kernel_size=draw(st.sampled_from([2, 3])),
                  mm_embed_dim=width, output_proj_dims=width)
    return dict(text=text, vision=vision, tie=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _write(spec: dict, out: Path) -> None:
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    from reference.fixtures import _rerandomise

    ids = dict(image_token_id=40, video_token_id=41, audio_token_id=42, boi_token_id=43, eoi_token_id=44)
    config = Gemma4UnifiedConfig(text_config=spec["text"], vision_config=spec["vision"], audio_config=None,
                                 tie_word_embeddings=spec["tie"], **ids)
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    _rerandomise(model, spec["seed"])
    model.save_pretrained(out)


@SWEEP
@given(configs())
def test_every_drawn_configuration_loads_and_passes_teacher_forced(spec):
    note(json.dumps(spec))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        _write(spec, model)
        code = main(["run", "--model", str(model), "--case", "text-9", "--case", "image/gradient", "--mode", "teacher",
                     "--max-soft-tokens", "70", "--decode-steps", "2", "--no-oracle",
                     "--report-dir", str(Path(tmp) / "r"), "--json", str(Path(tmp) / "r.json")])
        rec = json.loads((Path(tmp) / "r.json").read_text())
        failed = [(c["name"], c["first_divergence"]) for c in rec["cases"] if not c["passed"]]
        assert code == 0 and not failed, failed
    assert (FIXTURES / "images" / "gradient.png").is_file()

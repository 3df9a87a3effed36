"""Generate the committed fixtures: tiny Gemma 4 unified checkpoints, a tiny Gemma 4 (SigLIP vision)
checkpoint (``reference/gemma4/fixtures.py``) and the image battery.

Checkpoints are written by transformers' own ``save_pretrained`` (so the on-disk key layout is the
real one), after every parameter is re-randomised so that no convention passes by accident: norm
weights 1 + 0.1*N (not 1), LayerNorm biases 0.1*N (not 0), ``layer_scalar`` != 1. Everything is
seeded; regeneration is byte-identical (tests/test_fixtures.py checks it against the MANIFEST).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw

MANIFEST = "MANIFEST.json"

TOKEN_IDS = dict(boi_token_id=500, eoi_token_id=501, image_token_id=502, video_token_id=503,
                 audio_token_id=504, boa_token_id=505, eoa_token_index=506)

# Both keep the real patch geometry: 16 px patches merged 3x3 -> 48 px, 6912-wide raw patches,
# and the real position-table size 1120 (so every supported max_soft_tokens fits).
MODELS: dict[str, dict] = {
    "tiny": dict(
        seed=1,
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  sliding_window=8,  # shorter than any image block of the battery
                  final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=2, eos_token_id=1),
        vision=dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=32, output_proj_dims=32,
                    mm_posemb_size=1120),
        audio=dict(audio_embed_dim=640),
    ),
    "tiny-variant": dict(
        seed=2,
        text=dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
                  use_double_wide_mlp=True,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention",
                               "sliding_attention", "sliding_attention", "full_attention"],
                  sliding_window=12, final_logit_softcapping=None,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1),
        vision=dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=16, output_proj_dims=16,
                    mm_posemb_size=1120),
        audio=None,
    ),
    # transformers' own test-suite configuration (tests/models/gemma4_unified/test_modeling_gemma4_unified.py,
    # Gemma4UnifiedVision2TextModelTester on Gemma4UnifiedTextModelTester and CausalLMModelTester's
    # defaults): 5 px patches pooled 2x2, mm_embed_dim 64, four layers of which two reuse K/V, special
    # ids 4-8 inside the text range, untied lm_head (set here: the tester's class default ties it)
    "hf-test-config": dict(
        seed=3,
        text=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, global_head_dim=16,
                  num_kv_shared_layers=2, max_position_embeddings=512,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  use_bidirectional_attention="vision", pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision=dict(mm_embed_dim=64, output_proj_dims=64, patch_size=5, pooling_kernel_size=2),
        audio=None,
        tokens=dict(image_token_id=4, video_token_id=7, audio_token_id=8, boi_token_id=5, eoi_token_id=6,
                    mm_tokens_per_image=2),
        tie_word_embeddings=False,
    ),
    # a config that leaves everything it can to the config classes' defaults: config.json keeps only
    # what save_pretrained cannot leave out, without rope_parameters, and final_logit_softcapping null
    "config-defaults": dict(
        seed=4,
        text=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                  layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                  final_logit_softcapping=None),
        vision=dict(mm_embed_dim=16, output_proj_dims=16),
        audio=None,
        strip=("text_config.rope_parameters",),
    ),
}

# Gemma 4 with the SigLIP-style vision tower (model_type "gemma4"): name -> (seed, overrides of
# reference.gemma4.fixtures.tiny_config). The position table covers every image of the battery at every
# supported budget (the 40x400 panorama at max_soft_tokens 1120 reaches patch column 315).
GEMMA4_MODELS: dict[str, tuple[int, dict]] = {
    "gemma4-tiny": (0, {"vision": {"position_embedding_size": 1024, "pooling_kernel_size": 2}}),
}

_NORM_SUFFIXES = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "norm.weight",
                  "patch_ln1.weight", "patch_ln2.weight")


def _rerandomise(model: torch.nn.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied to embed_tokens
            shape = tuple(t.shape)
            if name.endswith("layer_scalar"):
                layer = int(name.split(".layers.")[1].split(".")[0])
                value = np.full(shape, (0.8, 0.9, 1.1, 1.2)[layer % 4])
            elif name.endswith(_NORM_SUFFIXES):
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name.endswith(".bias"):
                value = 0.1 * rng.standard_normal(shape)
            elif name.endswith("pos_embedding"):
                value = 0.5 * rng.standard_normal(shape)
            else:  # linears and the token embedding: N(0, 1/fan_in)
                value = rng.standard_normal(shape) / np.sqrt(shape[-1])
            t.copy_(torch.from_numpy(value.astype(np.float32)))


def build_model(name: str):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    spec = MODELS[name]
    config = Gemma4UnifiedConfig(text_config=spec["text"], vision_config=spec["vision"],
                                 audio_config=spec["audio"], **spec.get("tokens", TOKEN_IDS),
                                 tie_word_embeddings=spec.get("tie_word_embeddings", True))
    torch.manual_seed(spec["seed"])
    model = Gemma4UnifiedForConditionalGeneration(config).eval()
    _rerandomise(model, spec["seed"])
    return model


# ---------------------------------------------------------------------------------------------
# Image battery. (file name, how it is made); sizes are (H, W).

def _solid(rgb, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", (size[1], size[0]), rgb)


def _white_card() -> Image.Image:
    im = Image.new("RGB", (300, 200), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 299, 199], outline=(220, 0, 0), width=3)
    d.ellipse([110, 60, 190, 140], fill=(20, 20, 20))
    d.rectangle([60, 150, 240, 160], fill=(40, 40, 40))
    return im


def _gradient() -> Image.Image:
    y, x = np.mgrid[0:120, 0:160]
    rgb = np.stack([x * 255 // 159, y * 255 // 119, 255 - x * 255 // 159], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _checkerboard() -> Image.Image:
    y, x = np.mgrid[0:96, 0:96]
    v = (((x // 8) + (y // 8)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([v, v, v], -1))


def _scene(h: int, w: int) -> Image.Image:
    """Four coloured quadrants with a diagonal band: sharp edges, compresses well."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.where(x < w // 2, 200, 30)
    rgb[..., 1] = np.where(y < h // 2, 180, 60)
    rgb[..., 2] = np.where(np.abs(x * h - y * w) < 8 * max(h, w), 250, 90)
    return Image.fromarray(rgb)


def _photo(h: int, w: int) -> Image.Image:
    """A smooth scene with texture (sky gradient, sinusoidal ripples, a disc, hard edges): larger than
    every pixel budget, so the processor must downscale it (the antialiasing filter's widest taps)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.zeros((h, w, 3))
    rgb[..., 0] = 40 + 150 * x / w + 30 * np.sin(x / 7.0) * np.cos(y / 11.0)
    rgb[..., 1] = 60 + 120 * y / h + 25 * np.sin((x + y) / 13.0)
    rgb[..., 2] = 200 - 120 * y / h
    disc = (x - 0.6 * w) ** 2 + (y - 0.4 * h) ** 2 < (0.2 * min(h, w)) ** 2
    rgb[disc] = (250, 210, 40)
    rgb[int(0.75 * h):, : w // 3] = (20, 90, 30)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def _rgba() -> Image.Image:
    y, x = np.mgrid[0:80, 0:80]
    a = (x * 255 // 79).astype(np.uint8)
    rgba = np.stack([np.full_like(a, 30), np.full_like(a, 160), np.full_like(a, 40), a], -1)
    return Image.fromarray(rgba, "RGBA")


def _grayscale() -> Image.Image:
    y, x = np.mgrid[0:90, 0:90]
    return Image.fromarray(((x + y) * 255 // 178).astype(np.uint8), "L")


def _palette() -> Image.Image:
    im = Image.new("P", (96, 64))
    im.putpalette([255, 0, 0, 0, 160, 0, 0, 0, 255, 250, 220, 0] + [0] * (256 * 3 - 12))
    y, x = np.mgrid[0:64, 0:96]
    im.putdata(((x // 24) + 0 * y).ravel().astype(np.uint8).tolist())
    return im


IMAGES: dict[str, tuple[str, callable]] = {
    "solid-red.png": ("64x64 RGB (255,0,0)", lambda: _solid((255, 0, 0))),
    "solid-green.png": ("64x64 RGB (0,255,0)", lambda: _solid((0, 255, 0))),
    "solid-blue.png": ("64x64 RGB (0,0,255)", lambda: _solid((0, 0, 255))),
    "solid-yellow.png": ("64x64 RGB (255,255,0)", lambda: _solid((255, 255, 0))),
    "solid-white.png": ("64x64 RGB (255,255,255)", lambda: _solid((255, 255, 255))),
    "solid-gray.png": ("64x64 RGB (128,128,128)", lambda: _solid((128, 128, 128))),
    "solid-black.png": ("64x64 RGB (0,0,0)", lambda: _solid((0, 0, 0))),
    "white-card.png": ("200x300 white card, 3px red border, dark disc and bar in the centre", _white_card),
    "gradient.png": ("120x160 RGB gradient (R along x, G along y, B = 255 - R)", _gradient),
    "checkerboard.png": ("96x96 black/white checkerboard of 8px squares", _checkerboard),
    "wide-100x150.png": ("100x150 quadrant scene (needs resizing; the catalog's tiny test size)",
                         lambda: _scene(100, 150)),
    "tall-300x120.png": ("300x120 quadrant scene (needs resizing, portrait)", lambda: _scene(300, 120)),
    "panorama-40x400.png": ("40x400 quadrant scene (extreme aspect ratio)", lambda: _scene(40, 400)),
    "exact-672x960.png": ("672x960 quadrant scene: exactly 14x20 = 280 cells, not resized at "
                          "max_soft_tokens=280", lambda: _scene(672, 960)),
    "photo-1100x1400.png": ("1100x1400 textured scene: over the 280-token pixel budget, downscaled",
                            lambda: _photo(1100, 1400)),
    "sliver-4x1200.png": ("4x1200 quadrant scene: resized height rounds to 0, so one row of cells "
                          "(the processor's extreme-aspect branch)", lambda: _scene(4, 1200)),
    "sliver-1200x4.png": ("1200x4 quadrant scene: resized width rounds to 0, so one column of cells",
                          lambda: _scene(1200, 4)),
    "rgba-80x80.png": ("80x80 RGBA, green with alpha ramp 0..255 along x (composited on white)", _rgba),
    "grayscale-90x90.png": ("90x90 mode L diagonal ramp", _grayscale),
    "palette-64x96.png": ("64x96 mode P, four vertical bands red/green/blue/yellow", _palette),
}


def _strip(config: Path, keys: tuple[str, ...]) -> None:
    """Remove dotted ``keys`` from a written config.json, so that loading it relies on the defaults."""
    if not keys:
        return
    d = json.loads(config.read_text())
    for key in keys:
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node[part]
        node.pop(last, None)
    config.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(out: str | Path) -> dict:
    """Write models/, images/ and MANIFEST.json into the folder ``out`` (created if missing).
    ``rmlx-parity fixtures`` writes into a temporary folder and swaps the parts in (``parity.cli``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"generator": "rmlx-parity fixtures (reference/fixtures.py)",
                "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                             "numpy": np.__version__, "pillow": Image.__version__},
                "files": {}}
    for name, spec in MODELS.items():
        model = build_model(name)
        model.save_pretrained(out / "models" / name)
        _strip(out / "models" / name / "config.json", spec.get("strip", ()))
        for f in sorted((out / "models" / name).iterdir()):
            manifest["files"][f"models/{name}/{f.name}"] = {
                "sha256": _sha256(f), "how": f"save_pretrained of build_model('{name}'), seed {spec['seed']}"}
    from reference.gemma4.fixtures import make_tiny_checkpoint

    for name, (seed, overrides) in GEMMA4_MODELS.items():
        make_tiny_checkpoint(out / "models" / name, seed=seed, **overrides)
        for f in sorted((out / "models" / name).iterdir()):
            manifest["files"][f"models/{name}/{f.name}"] = {
                "sha256": _sha256(f), "how": f"reference.gemma4.fixtures.make_tiny_checkpoint, seed {seed}, "
                                             f"overrides {overrides}"}
    (out / "images").mkdir()
    for fname, (how, make) in IMAGES.items():
        path = out / "images" / fname
        make().save(path, format="PNG", optimize=False, compress_level=9)
        manifest["files"][f"images/{fname}"] = {"sha256": _sha256(path), "how": how}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest

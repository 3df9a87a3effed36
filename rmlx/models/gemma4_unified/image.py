"""Image preprocessing for Gemma 4 unified (catalog §1), in NumPy.

decode (Pillow, :mod:`rmlx.imagefile`) -> RGB uint8 HWC -> aspect-ratio-preserving resize (multiples of 48 px)
-> float32(x) * float32(1/255) -> 48x48x3 HWC patches in raster order, (x, y) positions
-> pad to max_soft_tokens (pixels 0, positions -1).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from rmlx.errors import InputError
from rmlx.imagefile import load_image, to_rgb  # noqa: F401  (the port's image entry points)
from rmlx.models.gemma4_unified.config import SUPPORTED_SOFT_TOKENS
from rmlx.resize import resize_bicubic_aa_uint8
from rmlx.tap import tap

RESAMPLERS = ("torchvision", "pil")


def check_max_soft_tokens(max_soft_tokens: int) -> int:
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise InputError(f"max_soft_tokens={max_soft_tokens} is not supported; choose one of "
                         f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")
    return max_soft_tokens


def target_size(height: int, width: int, max_soft_tokens: int, patch_size: int = 16, k: int = 3) -> tuple[int, int]:
    """HF's ``get_aspect_ratio_preserving_size``: the largest multiples of 48 px within the budget."""
    max_patches = max_soft_tokens * k * k
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = k * patch_size
    th = math.floor(factor * height / side) * side
    tw = math.floor(factor * width / side) * side
    if th == 0 and tw == 0:
        raise InputError(f"image of {height}x{width} cannot be resized to a {side}-px grid")
    max_side = (max_patches // k**2) * side
    if th == 0:
        th, tw = side, min(math.floor(width / height) * side, max_side)
    elif tw == 0:
        tw, th = side, min(math.floor(height / width) * side, max_side)
    if th * tw > target_px:
        raise InputError(f"image of {height}x{width} resized to {th}x{tw} exceeds {max_patches} patches")
    return th, tw


def resize(image: np.ndarray, height: int, width: int, resample: str = "torchvision") -> np.ndarray:
    """Bicubic antialiased resize of RGB uint8. ``torchvision`` is bit-exact with HF's processor;
    ``pil`` is Pillow's BICUBIC (within 2/255 of it, see tests/test_resize.py)."""
    if image.shape[:2] == (height, width):
        return image
    if resample == "torchvision":
        return resize_bicubic_aa_uint8(image, height, width)
    if resample == "pil":
        return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    raise InputError(f"resample={resample!r} is not one of {RESAMPLERS}")


def patchify(image01: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) -> patches (gh*gw, side*side*3) flattened HWC, raster order; positions (x, y)."""
    h, w, c = image01.shape
    gh, gw = h // side, w // side
    # (gh*side, gw*side, C) -> (gh, side, gw, side, C) -> (gh, gw, side, side, C)
    cells = image01[: gh * side, : gw * side].reshape(gh, side, gw, side, c).transpose(0, 2, 1, 3, 4)
    patches = np.ascontiguousarray(cells.reshape(gh * gw, side * side * c))
    gy, gx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    positions = np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.int64)  # (gh*gw, 2) as (x, y)
    return patches, positions


def preprocess(
    image: np.ndarray,
    max_soft_tokens: int = 280,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
    resample: str = "torchvision",
) -> tuple[np.ndarray, np.ndarray, int]:
    """RGB uint8 (H, W, 3) -> pixel_values (1, P, 6912) float32, position_ids (1, P, 2) int64, n_valid."""
    check_max_soft_tokens(max_soft_tokens)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    th, tw = target_size(image.shape[0], image.shape[1], max_soft_tokens, patch_size, pooling_kernel_size)
    resized = resize(image, th, tw, resample)
    image01 = resized.astype(np.float32) * np.float32(1 / 255)
    patches, positions = patchify(image01, patch_size * pooling_kernel_size)
    n = patches.shape[0]
    pixel_values = np.zeros((1, max_soft_tokens, patches.shape[1]), np.float32)
    position_ids = np.full((1, max_soft_tokens, 2), -1, np.int64)
    pixel_values[0, :n] = patches
    position_ids[0, :n] = positions
    return pixel_values, position_ids, n


def preprocess_batch(images: list[np.ndarray], max_soft_tokens: int = 280, patch_size: int = 16,
                     pooling_kernel_size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> pixel_values (num_images, P, 6912), position_ids (num_images, P, 2), as HF
    batches them (each image padded on its own); patch size and pooling kernel from the checkpoint's
    ``vision_config``. The two preprocessing stages are tapped here."""
    parts = [preprocess(im, max_soft_tokens, patch_size, pooling_kernel_size)[:2] for im in images]
    pixel_values = tap("image.pixel_values", np.concatenate([p[0] for p in parts]))
    position_ids = tap("image.position_ids", np.concatenate([p[1] for p in parts]))
    return pixel_values, position_ids

"""Image files: decoding with Pillow to RGB uint8, validated. Shared by every model with images (the
port's preprocessing and the parity harness both read images through it); nothing model-specific."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rmlx.errors import InputError


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3), compositing transparency on white like HF.

    Every failure is an ``InputError`` naming the file: missing, not an image, truncated, or over
    Pillow's decompression-bomb limit (the warning threshold counts as over).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    raise InputError(f"{path}: {im.mode} images (16/32-bit) are not supported: converting them "
                                     "to 8-bit RGB clips them (HF's processor does the same)")
                return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path}: refused, over Pillow's decompression-bomb limit ({e})") from None
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: corrupt or truncated image ({e})") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3): alpha (or a transparency key) is composited over opaque white."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(im.convert("RGB"))

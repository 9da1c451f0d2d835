"""Image augmentation: one definition for training (a parameter, recorded in params.json) and for the
crop-jitter consistency metric, so a study keeps "the same augmentation as the stage-3 winner"."""
from __future__ import annotations

import random

from PIL import Image, ImageEnhance


def crop_jitter(image: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """A random crop keeping at least 1 - 0.25*strength of each side, resized back, with mild colour jitter."""
    w, h = image.size
    keep = 1.0 - 0.25 * strength * rng.random()
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast):
        out = enhance(out).enhance(1.0 + 0.2 * strength * (2 * rng.random() - 1))
    return out


def make_augment(kind: str, strength: float, seed: int):
    """The training augmentation named by the `augmentation` parameter, or None for 'none'."""
    if kind == "none":
        return None
    if kind == "crop_jitter":
        rng = random.Random(seed)
        return lambda image: crop_jitter(image, rng, strength)
    raise ValueError(f"augmentation={kind!r}: expected 'none' or 'crop_jitter'")

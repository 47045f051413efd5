"""Colour agreement: does the flower have the petal colour its sentence names?

The rule (pure numpy, documented in docs/EVALUATION.md), applied to an RGB image:
1. HSV per pixel (h in degrees, s and v in [0, 1]).
2. Weight each pixel by a centred Gaussian (sigma = 0.2 x image side): flowers sit in the middle.
3. Drop what is not petal: dark pixels (v < 0.3: shadows, background), foliage
   (75 <= h < 165 with s >= 0.2) and dull greys (s < 0.2 and v < 0.6).
4. Name every remaining pixel: s < 0.2 -> white; otherwise by hue: [345, 15) red, or pink when it
   is pale (s < 0.5 and v >= 0.55); [15, 40) orange; [40, 75) yellow; [165, 250) blue;
   [250, 290) purple; [290, 345) pink.
5. The dominant colour is the name with the largest total weight (None if nothing is left).

A caption's colour is its first colour word among COLOURS and a few unambiguous synonyms; other
colour words (green, brown, black, and the ambiguous cream and magenta) are skipped over.

The thresholds were chosen once on the odd-numbered real images of the mirror against their
(substitute) captions, from a small grid (sigma 0.2-0.6, white saturation 0.15-0.25, dark
0.2-0.3, pale 0.4-0.6): 79.7 % there versus 76.9 % for the first guess; 80.2 % on the even-numbered
images that were not used.
"""

from __future__ import annotations

import re

import numpy as np

COLOURS = ("white", "yellow", "orange", "red", "pink", "purple", "blue")
SYNONYMS = {
    "maroon": "red", "crimson": "red", "scarlet": "red",
    "gold": "yellow", "golden": "yellow",
    "violet": "purple", "lavender": "purple", "lilac": "purple",
}
# Sentences the generator is asked for, per colour. The first is the commonest training phrasing;
# the others are rarer forms, so agreement is not only a memorised template.
PHRASINGS = (
    "this flower has {c} petals",
    "a {c} flower",
    "the petals are {c}",
    "a flower with {c} petals and a small centre",
)
_NAMES = COLOURS + ("unknown",)
_WORD = re.compile(r"[a-z]+")


def rgb_to_hsv(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> (h in degrees [0, 360), s, v in [0, 1])."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    c = v - x.min(axis=-1)
    s = np.where(v > 0, c / np.where(v > 0, v, 1), 0.0)
    safe = np.where(c > 0, c, 1)
    h = np.where(v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(c > 0, h * 60.0, 0.0) % 360.0
    return h, s, v


def centre_weights(h: int, w: int, sigma_frac: float = 0.2) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    sigma = sigma_frac * min(h, w)
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))


def pixel_names(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index into COLOURS per pixel, -1 for pixels the rule drops."""
    name = np.full(h.shape, -1, dtype=np.int64)
    idx = {c: i for i, c in enumerate(COLOURS)}
    chromatic = s >= 0.2
    name[~chromatic & (v >= 0.6)] = idx["white"]
    reddish = (h >= 345) | (h < 15)
    pale = (s < 0.5) & (v >= 0.55)
    for lo_hi, colour in (((15, 40), "orange"), ((40, 75), "yellow"), ((165, 250), "blue"),
                          ((250, 290), "purple"), ((290, 345), "pink")):
        name[chromatic & (h >= lo_hi[0]) & (h < lo_hi[1])] = idx[colour]
    name[chromatic & reddish & pale] = idx["pink"]
    name[chromatic & reddish & ~pale] = idx["red"]
    name[v < 0.3] = -1  # dark: shadow or background, whatever the hue says
    return name


def dominant_colours(images: np.ndarray) -> list[str | None]:
    """The dominant petal colour of each uint8 (N, H, W, 3) image, or None when no pixel counts."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    n, hh, ww, _ = images.shape
    weights = centre_weights(hh, ww)
    out: list[str | None] = []
    for img in images:
        names = pixel_names(*rgb_to_hsv(img))
        keep = names >= 0
        totals = np.bincount(names[keep], weights=weights[keep], minlength=len(COLOURS))
        out.append(COLOURS[int(np.argmax(totals))] if totals.sum() > 0 else None)
    return out


def caption_colour(caption: str) -> str | None:
    """The first colour word of a caption, mapped to COLOURS; None when it names none."""
    for word in _WORD.findall(caption.lower()):
        if word in COLOURS:
            return word
        if word in SYNONYMS:
            return SYNONYMS[word]
    return None


def colour_prompts(colours=COLOURS, phrasings=PHRASINGS) -> list[tuple[str, str, int]]:
    """(prompt, colour, phrasing index) for every colour and phrasing."""
    return [(p.format(c=c), c, k) for c in colours for k, p in enumerate(phrasings)]


def agreement(predicted: list[str | None], expected: list[str]) -> float:
    if not expected:
        return float("nan")
    return float(np.mean([p == e for p, e in zip(predicted, expected)]))


def agreement_by(predicted: list[str | None], expected: list[str], groups: list) -> dict[str, float]:
    """Agreement per group value (a colour, a phrasing...)."""
    out: dict[str, float] = {}
    for g in dict.fromkeys(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        out[str(g)] = agreement([predicted[i] for i in rows], [expected[i] for i in rows])
    return out

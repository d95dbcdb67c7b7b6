"""Measuring a model on shapes prompts.

`colour_at_position` is the analytic check behind the default model's headline number: does the
prompted colour appear at the prompted place? A pixel "has" a colour when that colour is its
nearest palette entry (the shapes palette plus the background) within `max_distance` in RGB;
the colour "appears at" a position when enough such pixels exist and their centroid is nearer to
that position's anchor than to any other anchor.
"""
from __future__ import annotations

import numpy as np

from .data import BACKGROUND, COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, parse_holdout

_PALETTE_NAMES = list(COLOURS) + ["background"]
_PALETTE = np.array(list(COLOURS.values()) + [BACKGROUND], dtype=np.float32)  # (K, 3)


def colour_labels(image: np.ndarray, max_distance: float = 90.0) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int: index into COLOURS of each pixel's colour, -1 for
    background or a colour too far from every palette entry."""
    distances = np.linalg.norm(image[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)  # (H, W, K)
    nearest = distances.argmin(-1)
    labels = np.where(distances.min(-1) <= max_distance, nearest, -1)
    labels[labels == len(COLOURS)] = -1
    return labels


def colour_at_position(image: np.ndarray, colour: str, position: str, min_fraction: float = 0.01) -> bool:
    """Whether `colour` covers at least `min_fraction` of the image and its pixels' centroid is
    nearest to the anchor of `position` (one of POSITIONS)."""
    labels = colour_labels(image)
    ys, xs = np.nonzero(labels == list(COLOURS).index(colour))
    if len(xs) < min_fraction * labels.size:
        return False
    H, W = labels.shape
    centroid = np.array([(xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H])
    nearest = min(POSITIONS, key=lambda name: np.linalg.norm(centroid - np.array(POSITIONS[name])))
    return nearest == position


def heldout_single_object_prompts(holdout: list[str], count: int = 50) -> list[tuple[str, str, str]]:
    """`count` prompts "a <colour> <shape> <position phrase>" cycling over the held-out pairs and
    the five positions; returns (prompt, colour, position) triples."""
    pairs = sorted(parse_holdout(holdout))
    if not pairs:
        pairs = [(c, s) for c in COLOURS for s in SHAPES]
    prompts = []
    for i in range(count):
        colour, shape = pairs[i % len(pairs)]
        position = list(POSITION_PHRASES)[(i // len(pairs)) % len(POSITION_PHRASES)]
        article = "an" if colour[0] in "aeiou" else "a"
        prompts.append((f"{article} {colour} {shape} {POSITION_PHRASES[position]}", colour, position))
    return prompts

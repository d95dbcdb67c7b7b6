"""Finding the objects in a shapes image and naming each one's colour, shape, size and position.

This is the instrument that checks generated images against their prompts, so it is built from
the generator's own definitions (`diffusion.data.shapes`) and measured on the generator's images.

Method, per image (numpy only, no training):

1. Colour and coverage of every pixel. A rendered pixel is a mix `BACKGROUND + a * (C - BACKGROUND)`
   of the background and one palette colour C, `a` being how much of the pixel the object covers
   (edges are antialiased). Each pixel is projected onto the six background->colour segments;
   the nearest segment gives its colour and `a` its coverage. A pixel belongs to an object when
   it is at least half covered (the ground-truth masks' rule) and lies within MAX_RESIDUAL of
   the segment. Unlike "nearest palette colour", this keeps edge pixels in their own colour (an
   orange edge half mixed with the background is nearer to red than to orange).
2. Objects. 4-connected regions of one colour. Two objects of one colour can touch: the
   generator keeps their boxes 1 px apart, which still lets a half-covered pixel of each sit side
   by side. So the regions are first taken over the pixels at least CORE_COVERAGE covered (the
   cores, which never touch), then grown back over the half-covered pixels; a region with no
   core pixel (a faint object) is its own seed. Regions smaller than MIN_AREA_FRACTION of the
   smallest object's area are noise and dropped.
3. Shape, size, centre: analysis by synthesis. Every shape at both sizes is drawn with the
   generator's own `draw_shape` at PHASES x PHASES sub-pixel centres (512 coverage templates
   per resolution, drawn once and cached: every image of a report reuses them). The object's
   coverage map (its pixels and their 4-neighbours of its colour, divided by its peak so that
   faint colours still fit) is compared with each template placed on the object's centroid; the
   least squared error names the shape and size, and the template's box centre is the object's
   centre. The position is the POSITIONS anchor nearest to that centre (the box centre is what
   the generator puts near the anchor; a triangle's centroid lies a sixth of its height lower).

`detector_accuracy` measures it on the generator's own scenes (every report carries the result;
the tests check it, also under added noise, blur and dimmed colours). A clean object and the
background's grain (`is_clean_object`, `grain`) are how edits are judged: an empty image or a
mottled blend of colours is never a drawn object.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from diffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesDataset,
    draw_shape,
)

# A pixel is an object's when at least this fraction of it is covered (the ground-truth rule).
MIN_COVERAGE = 0.5
# Pixels covered at least this much form the cores that separate touching objects of one colour.
CORE_COVERAGE = 0.75
# Largest RGB distance from a pixel to its background->colour segment for it to have that colour.
MAX_RESIDUAL = 80.0
# Regions smaller than this fraction of the smallest object's area (a small triangle) are noise.
MIN_AREA_FRACTION = 0.3
# Templates are drawn at centres 1/PHASES px apart, supersampled like `render_scene`'s default.
PHASES = 8
SUPERSAMPLE = 4
# A pixel further than this from the background colour (RGB distance) is paint of some kind.
FOREGROUND_DISTANCE = 40.0
# A clean object: its best shape template's relative error at most this. Far above the fit of the
# generator's own drawings (below 0.01, tests/test_detector.py), so that noise and a model's softer
# edges still pass; below a blob that is no shape (a bar: tested there too) ...
MAX_FIT_ERROR = 0.25
# ... and foreground pixels outside it at most this fraction of its area.
MAX_STRAY_FRACTION = 0.05

_COLOUR_NAMES = list(COLOURS)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array(list(COLOURS.values()), dtype=np.float32) - _BACKGROUND  # (K, 3)
_POSITION_NAMES = list(POSITIONS)
_ANCHORS = np.array(list(POSITIONS.values()), dtype=np.float32)  # (5, 2) fractions (x, y)
CATEGORIES = ("count", "colour", "shape", "size", "position")


@dataclass
class Detection:
    """One object found in an image. `colour`, `shape`, `size`, `position` are names from
    COLOURS, SHAPES, SIZES, POSITIONS; `center` is the (x, y) centre of the object's box in
    pixels (pixel i spans [i, i + 1)); `mask` (H, W) bool its pixels and `area` their number;
    `fit_error` how badly the best shape template explains its coverage (relative squared error)."""

    colour: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]
    mask: np.ndarray
    area: int
    fit_error: float = 0.0


# ---------------------------------------------------------------------------------------------
# Pixels and regions


def pixel_colours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (colour, coverage, residual), each (H, W): the index into COLOURS of the
    background->colour segment nearest to each pixel, the pixel's position along it (0 =
    background, 1 = the palette colour) and its RGB distance from it."""
    offset = image.astype(np.float32) - _BACKGROUND  # (H, W, 3)
    along = np.clip(offset @ _DIRECTIONS.T / (_DIRECTIONS**2).sum(1), 0.0, 1.0)  # (H, W, K)
    residuals = np.linalg.norm(offset[:, :, None] - along[..., None] * _DIRECTIONS, axis=-1)
    colour = residuals.argmin(-1)
    pick = colour[..., None]
    coverage = np.take_along_axis(along, pick, -1)[..., 0]
    return colour, coverage, np.take_along_axis(residuals, pick, -1)[..., 0]


def _neighbours(a: np.ndarray, fill) -> list[np.ndarray]:
    """The four 4-neighbours of every pixel of `a` (H, W), as four (H, W) arrays; `fill` beyond
    the border."""
    padded = np.pad(a, 1, constant_values=fill)
    return [padded[2:, 1:-1], padded[:-2, 1:-1], padded[1:-1, 2:], padded[1:-1, :-2]]


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected regions of equal labels >= 0: (H, W) int, each pixel's region named by the
    smallest flat index in it; -1 where labels < 0. Min-index propagation until stable."""
    H, W = labels.shape
    none = H * W
    ids = np.where(labels >= 0, np.arange(none).reshape(H, W), none)
    while True:
        new = ids
        for other_ids, other_labels in zip(_neighbours(ids, none), _neighbours(labels, -1)):
            new = np.where(other_labels == labels, np.minimum(new, other_ids), new)
        if np.array_equal(new, ids):
            return np.where(labels >= 0, ids, -1)
        ids = new


def _grow(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Extend the regions `ids` (-1 = none) into the unassigned pixels with labels >= 0, one
    pixel ring per step: a pixel joins the region of a 4-neighbour with its label."""
    while True:
        new = ids
        for other_ids, other_labels in zip(_neighbours(ids, -1), _neighbours(labels, -1)):
            joins = (new < 0) & (labels >= 0) & (other_labels == labels) & (other_ids >= 0)
            new = np.where(joins, other_ids, new)
        if np.array_equal(new, ids):
            return ids
        ids = new


# ---------------------------------------------------------------------------------------------
# Shape and size


@lru_cache(maxsize=8)
def _templates(side: int) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Coverage maps of every shape and size drawn by the generator in a `side` px image, at
    PHASES x PHASES sub-pixel centres. Returns maps (T, P, P) float32 in [0, 1], the (shape, size)
    of each, its box centre (T, 2) and its coverage centroid (T, 2), both (x, y) in patch pixels."""
    patch = int(np.ceil(2 * max(SIZES.values()) * side)) + 4
    big = (patch * SUPERSAMPLE,) * 2
    maps, kinds, centres = [], [], []
    for size, fraction in SIZES.items():
        for shape in SHAPES:
            for fy in range(PHASES):
                for fx in range(PHASES):
                    centre = (patch / 2 + fx / PHASES, patch / 2 + fy / PHASES)
                    obj = ShapeObject("red", shape, size, "centre", centre, fraction * side)
                    canvas = Image.new("L", big, 0)
                    draw_shape(ImageDraw.Draw(canvas), obj, SUPERSAMPLE, 255)
                    small = canvas.resize((patch, patch), Image.Resampling.BOX)
                    maps.append(np.asarray(small, dtype=np.float32) / 255.0)
                    kinds.append((shape, size))
                    centres.append(centre)
    maps = np.stack(maps)
    return maps, kinds, np.array(centres), np.stack(_centroid(maps), -1)


def _centroid(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage-weighted centre (x, y) of maps (..., H, W), in pixels."""
    H, W = maps.shape[-2:]
    mass = maps.sum((-2, -1))
    x = (maps * (np.arange(W) + 0.5)).sum((-2, -1)) / mass
    y = (maps * (np.arange(H) + 0.5)[:, None]).sum((-2, -1)) / mass
    return x, y


def _fit(coverage: np.ndarray, side: int) -> tuple[str, str, tuple[float, float], float]:
    """The template that best explains `coverage` (H, W), one object's coverage map scaled so
    that its peak is 1: (shape, size, box centre (x, y) in image pixels, relative error). Each
    template is placed where its centroid falls on the map's; the error counts the map outside the
    template's patch, and the relative error divides it by the map's own energy (0: a perfect
    fit; a blob that is no shape fits none of them well)."""
    maps, kinds, centres, centroids = _templates(side)
    patch = maps.shape[1]
    x, y = _centroid(coverage)
    left = np.round(x - centroids[:, 0]).astype(int)  # (T,) where each patch starts in the image
    top = np.round(y - centroids[:, 1]).astype(int)
    padded = np.pad(coverage, patch)
    rows = (top + patch)[:, None, None] + np.arange(patch)[:, None]  # (T, P, 1)
    cols = (left + patch)[:, None, None] + np.arange(patch)  # (T, 1, P)
    windows = padded[rows, cols]  # (T, P, P): the map under each placed template
    outside = (coverage**2).sum() - (windows**2).sum((1, 2))
    error = ((windows - maps) ** 2).sum((1, 2)) + outside
    best = int(error.argmin())
    shape, size = kinds[best]
    centre = (float(left[best] + centres[best, 0]), float(top[best] + centres[best, 1]))
    return shape, size, centre, float(error[best] / max((coverage**2).sum(), 1e-9))


# ---------------------------------------------------------------------------------------------
# Detection


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in a shapes image (H, W, 3) uint8 RGB with H == W, roughly in raster order.
    See the module docstring for the method."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {image.shape}")
    side = image.shape[0]
    colour, coverage, residual = pixel_colours(image)
    inside = (coverage >= MIN_COVERAGE) & (residual <= MAX_RESIDUAL)
    labels = np.where(inside, colour, -1)
    core = inside & (coverage >= CORE_COVERAGE)
    regions = _components(labels)
    seeds = core | (inside & ~np.isin(regions, regions[core]))  # coreless regions seed themselves
    regions = _grow(_components(np.where(seeds, colour, -1)), labels)

    min_area = MIN_AREA_FRACTION * 2 * (min(SIZES.values()) * side) ** 2  # triangle: 2 h^2
    own_colour = residual <= MAX_RESIDUAL
    detections = []
    for region in np.unique(regions[regions >= 0]):
        mask = regions == region
        area = int(mask.sum())
        if area < min_area:
            continue
        c = int(colour.flat[region])
        near = mask | np.logical_or.reduce(_neighbours(mask, False))  # with partly covered edges
        soft = np.where(near & own_colour & (colour == c), coverage, 0.0)
        shape, size, center, fit_error = _fit(soft / soft.max(), side)
        fraction = np.array(center) / side
        position = _POSITION_NAMES[int(np.linalg.norm(_ANCHORS - fraction, axis=1).argmin())]
        detections.append(Detection(_COLOUR_NAMES[c], shape, size, position, center, mask, area, fit_error))
    return detections


# ---------------------------------------------------------------------------------------------
# Scoring


def match(
    detections: list[Detection], objects: list[ShapeObject], masks: np.ndarray | None = None
) -> list[Detection | None]:
    """The detection found for each of `objects`, or None. Pairs are one-to-one and greedy: the
    object and detection with the largest mask overlap (`masks` (N, H, W) bool, the objects'
    ground-truth masks) are paired first, then the next largest among the rest, and so on;
    without masks, nearest centres are paired first. An object that overlaps no detection (or
    finds none left) gets None.
    """
    if not detections or not objects:
        return [None] * len(objects)
    if masks is not None:
        # (N, D) overlap in pixels; 0 means no pair.
        score = np.array([[float((m & d.mask).sum()) for d in detections] for m in masks])
    else:
        centres = np.array([d.center for d in detections])  # (D, 2)
        distance = np.linalg.norm(np.array([o.center for o in objects])[:, None] - centres, axis=-1)
        score = 1.0 / (1.0 + distance)  # (N, D), > 0 everywhere
    paired: list[Detection | None] = [None] * len(objects)
    while score.size and score.max() > 0:
        k, d = np.unravel_index(int(score.argmax()), score.shape)
        paired[k] = detections[d]
        score[k, :] = 0
        score[:, d] = 0
    return paired


def detector_accuracy(
    n: int = 500,
    seed: int = 12345,
    resolution: int = 32,
    min_objects: int = 1,
    max_objects: int = 4,
    noise_std: float = 0.0,
) -> dict[str, float]:
    """Accuracy of `detect` on `n` generator scenes (every colour-shape pair allowed).

    noise_std: standard deviation, in intensity levels, of Gaussian noise added to each image
        (seeded by `seed`), to mimic generated images.
    Returns {"count": fraction of images with as many detections as objects, and "colour",
    "shape", "size", "position": fraction of objects whose matched detection (`match`, by mask
    overlap) has the right one; an unmatched object is wrong in all four}.
    """
    dataset = ShapesDataset(
        resolution=resolution,
        num_samples=n,
        min_objects=min_objects,
        max_objects=max_objects,
        object_weights=None,
        seed=seed,
        holdout_mode="any",
    )
    rng = np.random.default_rng(seed)
    right = dict.fromkeys(CATEGORIES, 0)
    objects_seen = 0
    for i in range(n):
        sample = dataset.sample(i)
        image = sample.image
        if noise_std:
            noisy = image + rng.normal(0.0, noise_std, image.shape)
            image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        detections = detect(image)
        objects = sample.scene.objects
        right["count"] += len(detections) == len(objects)
        for obj, found in zip(objects, match(detections, objects, sample.masks)):
            objects_seen += 1
            for key in CATEGORIES[1:]:
                right[key] += found is not None and getattr(found, key) == getattr(obj, key)
    return {key: right[key] / (n if key == "count" else objects_seen) for key in CATEGORIES}


# ---------------------------------------------------------------------------------------------
# Image quality: clean objects and background grain


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` (H, W) bool grown by `steps` pixels in all eight directions (an antialiased corner
    touches its shape only diagonally)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        H, W = mask.shape
        mask = np.logical_or.reduce([padded[dy : dy + H, dx : dx + W] for dy in range(3) for dx in range(3)])
    return mask


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of `image` (H, W, 3) uint8 further than FOREGROUND_DISTANCE from
    the background colour in RGB, whatever colour they are (blends and grain included)."""
    return np.linalg.norm(image.astype(np.float32) - _BACKGROUND, axis=-1) > FOREGROUND_DISTANCE


def stray_pixels(image: np.ndarray, detections: list[Detection]) -> int:
    """Foreground pixels that belong to no detected object (its mask grown by one pixel for the
    antialiased edge): paint that the detector could not read as an object, e.g. a second colour
    mottled into a blend, or fragments too small to be an object."""
    covered = np.zeros(image.shape[:2], bool)
    for detection in detections:
        covered |= detection.mask
    return int((foreground(image) & ~_dilate(covered, 1)).sum())


def is_clean_object(image: np.ndarray, detections: list[Detection]) -> bool:
    """Whether `image` holds exactly one cleanly drawn object: one detection (one colour), whose
    coverage a shape template explains (fit error at most MAX_FIT_ERROR), with at most
    MAX_STRAY_FRACTION of its area in foreground pixels outside it. A mottled blend of colours
    fails: it is read as several objects, or one with much paint around it."""
    if len(detections) != 1:
        return False
    (detection,) = detections
    return (
        detection.fit_error <= MAX_FIT_ERROR and stray_pixels(image, detections) <= MAX_STRAY_FRACTION * detection.area
    )


def grain(image: np.ndarray, detections: list[Detection]) -> float:
    """Mean absolute deviation, in grey levels, of the background from its colour: over the
    pixels at least three pixels away from every detected object, and the three channels.
    0 for a clean background; noise or a tint over the background raises it."""
    covered = np.zeros(image.shape[:2], bool)
    for detection in detections:
        covered |= detection.mask
    background = ~_dilate(covered, 3)
    if not background.any():
        return 0.0
    return float(np.abs(image[background].astype(np.float32) - _BACKGROUND).mean())

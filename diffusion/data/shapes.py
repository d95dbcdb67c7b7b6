"""The procedural "shapes" dataset: scenes of coloured shapes, their captions, masks and word spans.

Scenes hold 1-4 coloured shapes on a dark background. A caption names each object's colour,
shape, optional size and position (absolute, or a relation between two objects that is true of
the drawing). Every sample also carries a ground-truth mask per object and the character spans
of the words naming it, so evaluation can check whether "red" really landed on the red
object's pixels, and training can ground each word's attention on its object.

Items are `{"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, "index": int}`;
`render_with_masks()` renders the whole set at once, in parallel processes.
"""

from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm

from diffusion.errors import UserError, check_int
from diffusion.images import to_pixel_values

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "orange": (250, 140, 30),
}  # name -> RGB
SHAPES = ("circle", "square", "triangle", "cross")
# Half-extent of the shape as a fraction of the image side. "small" is 0.10 rather than 0.12 so
# that three or four small objects can sit at neighbouring positions without touching at 32 px.
SIZES = {"small": 0.10, "large": 0.20}
POSITIONS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}  # name -> (x, y) as fractions of the image side
BACKGROUND = (24, 24, 24)

HOLDOUT_MODES = ("exclude", "only", "any")

# Each centre moves by up to this fraction of the side, so a position is a region, not a point.
JITTER = 0.03
# Minimum gap in output pixels between two objects' bounding boxes: with at least one pixel
# between them no pixel mixes two objects' colours, so masks are disjoint and colours clean.
GAP_PX = 1.0
# A relation ("to the left of", "above") is only captioned when the two drawn centres differ by
# at least this fraction of the side along its axis, so it is unambiguous to a viewer.
RELATION_MIN_OFFSET = 0.2
NO_POSITION_PROBABILITY = 0.15
RELATION_PROBABILITY = 0.5
# Placement is rejection sampling; crowded scenes at tiny resolutions may never fit.
MAX_PLACEMENT_ATTEMPTS = 10_000
# Arm width of a cross as a fraction of the shape's full width.
CROSS_ARM_FRACTION = 0.4

# The defaults of the config's data section (config.py), which ShapesDataset shares.
DEFAULT_HOLDOUT = ("red square", "green triangle", "blue cross", "yellow circle")
DEFAULT_OBJECT_WEIGHTS = (2.0, 5.0, 2.0, 1.0)
# The noun of an object whose shape the caption leaves out: "a red shape".
UNNAMED_SHAPE = "shape"

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_ALL_PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. `colour`, `shape`, `size`, `position` are names from COLOURS, SHAPES,
    SIZES, POSITIONS; `center` is (x, y) in pixels at the rendered resolution, after jitter;
    `half_extent` is half the object's width (and height) in pixels."""

    colour: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]
    half_extent: float


@dataclass
class Scene:
    """Objects plus their caption. For object k, `caption[slice(*colour_spans[k])] == colour`,
    likewise for `shape_spans` and `size_spans` ("small"/"large"); each is None where the caption
    leaves that attribute out (an unnamed shape is written "shape": "a red shape").
    `phrase_spans[k]` is the span of object k's whole noun phrase, "a small red circle"."""

    objects: list[ShapeObject]
    caption: str
    colour_spans: list[tuple[int, int] | None]
    shape_spans: list[tuple[int, int] | None]
    size_spans: list[tuple[int, int] | None]
    phrase_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ShapesSample:
    """A rendered scene: `image` is (H, W, 3) uint8; `masks` is (num_objects, H, W) bool, the
    visible pixels of each object in the order of `scene.objects`."""

    image: np.ndarray
    masks: np.ndarray
    scene: Scene


@dataclass(frozen=True)
class Omission:
    """How often a caption leaves an object's attribute out, so that a model trained on the
    captions learns what an unnamed attribute looks like (the prior a weight of 0 falls back to).
    Each is a probability per object: `colour` ("a circle"), `shape` ("a red shape"), `position`
    (the object's position phrase; relations are kept), and `size`, the share of objects whose
    size word is left out (half of them by default, as the set always had). Colour, shape and
    position are left out only in captions of at most `max_objects` objects, so that captions
    of more objects, which teach binding and composition, can stay whole. When in a run such
    captions are read is the caption curriculum's (data/captions.py)."""

    colour: float = 0.0
    shape: float = 0.0
    position: float = 0.0
    size: float = 0.5
    max_objects: int = 4

    def leaves_words_out(self) -> bool:
        """Whether some caption may leave a colour, shape or position out."""
        return any(p > 0 for p in (self.colour, self.shape, self.position))

    def writes_new_words(self) -> bool:
        """Whether some caption may write a word that whole captions never do: "shape", the
        noun of an unnamed shape. A caption without a colour or a position only has fewer words."""
        return self.shape > 0

    def draws_extra(self, count: int) -> bool:
        """Whether a caption of `count` objects may leave colour, shape or position out (each
        object then draws three numbers)."""
        return count <= self.max_objects and self.leaves_words_out()


# ---------------------------------------------------------------------------------------------
# Scene sampling


def parse_holdout(entries) -> set[tuple[str, str]]:
    """Turn "colour shape" strings (e.g. "red square") from `data.holdout` into (colour, shape)
    pairs, raising UserError on anything that is not a known pair."""
    if isinstance(entries, str):
        raise UserError(
            f"data.holdout must be a list of 'colour shape' strings, got the string {entries!r}; "
            f"write it as [{entries!r}]"
        )
    pairs = set()
    for entry in entries:
        words = entry.split() if isinstance(entry, str) else []
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise UserError(
                f"unknown holdout pair {entry!r} in data.holdout; write 'colour shape' with colour "
                f"one of {', '.join(COLOURS)} and shape one of {', '.join(SHAPES)}"
            )
        pairs.add((words[0], words[1]))
    return pairs


def _candidate_pairs(holdout: set[tuple[str, str]], holdout_mode: str) -> tuple[list, list]:
    """The (colour, shape) pairs objects may be drawn from, and the pairs of which "only" mode
    forces one per scene (empty in the other modes). Sorted, so that sampling does not depend on
    set iteration order (which changes between processes for strings)."""
    if holdout_mode not in HOLDOUT_MODES:
        raise UserError(f"unknown holdout_mode {holdout_mode!r}; use one of {', '.join(HOLDOUT_MODES)}")
    if holdout_mode == "exclude":
        allowed = [pair for pair in _ALL_PAIRS if pair not in holdout]
        if not allowed:
            raise UserError("data.holdout holds out every colour-shape pair; remove some entries")
        return allowed, []
    if holdout_mode == "only":
        forced = sorted(holdout)
        if not forced:
            raise UserError("holdout_mode 'only' needs at least one data.holdout pair; add one")
        return _ALL_PAIRS, forced
    return _ALL_PAIRS, []


def _separated(centers: list[tuple[float, float]], halves: list[float]) -> bool:
    """Whether every two boxes (center +- half) are at least GAP_PX apart along some axis."""
    for a in range(len(centers)):
        for b in range(a + 1, len(centers)):
            reach = halves[a] + halves[b] + GAP_PX
            if abs(centers[a][0] - centers[b][0]) < reach and abs(centers[a][1] - centers[b][1]) < reach:
                return False
    return True


def _place(rng: np.random.Generator, resolution: int, count: int):
    """Positions, sizes, centres (pixels) and half-extents (pixels) for `count` objects at
    distinct positions that do not touch. Rejection sampling: drawing everything afresh until it
    fits keeps the result an unbiased draw among the layouts that fit."""
    position_names, size_names = list(POSITIONS), list(SIZES)
    for _ in range(MAX_PLACEMENT_ATTEMPTS):
        positions = [position_names[k] for k in rng.choice(len(POSITIONS), count, replace=False)]
        sizes = [size_names[k] for k in rng.integers(len(SIZES), size=count)]
        jitter = rng.uniform(-JITTER, JITTER, size=(count, 2))  # (count, 2) fractions of the side
        centers = [
            ((POSITIONS[p][0] + jx) * resolution, (POSITIONS[p][1] + jy) * resolution)
            for p, (jx, jy) in zip(positions, jitter.tolist())
        ]
        halves = [SIZES[s] * resolution for s in sizes]
        if _separated(centers, halves):
            return positions, sizes, centers, halves
    raise UserError(
        f"could not place {count} non-overlapping objects in a {resolution} px image; "
        "lower data.max_objects or raise data.resolution"
    )


def _true_relations(objects: list[ShapeObject], resolution: int) -> list[tuple[int, int, str]]:
    """(subject index, reference index, phrase) for every relation between two objects that
    holds for their drawn centres, e.g. (0, 1, "to the left of")."""
    min_offset = RELATION_MIN_OFFSET * resolution
    relations = []
    for a, b in ((0, 1), (1, 0)):
        (ax, ay), (bx, by) = objects[a].center, objects[b].center
        if ax <= bx - min_offset:
            relations.append((a, b, "to the left of"))
        if ax >= bx + min_offset:
            relations.append((a, b, "to the right of"))
        if ay <= by - min_offset:
            relations.append((a, b, "above"))
        if ay >= by + min_offset:
            relations.append((a, b, "below"))
    return relations


class _CaptionWriter:
    """Builds a caption left to right, recording where each object's words land."""

    def __init__(
        self, objects: list[ShapeObject], with_size: list[bool], with_colour: list[bool], with_shape: list[bool]
    ):
        """`objects` are the scene's objects; `with_size[k]`, `with_colour[k]`, `with_shape[k]`
        say whether object k's phrase names its size, colour and shape."""
        self.objects = objects
        self.with_size = with_size
        self.with_colour = with_colour
        self.with_shape = with_shape
        self.text = ""
        self.colour_spans: list = [None] * len(objects)
        self.shape_spans: list = [None] * len(objects)
        self.size_spans: list = [None] * len(objects)
        self.phrase_spans: list = [None] * len(objects)

    def write(self, text: str) -> tuple[int, int]:
        """Append `text`; return its (start, end) span."""
        start = len(self.text)
        self.text += text
        return start, len(self.text)

    def object(self, k: int) -> None:
        """Append object k's noun phrase, e.g. "a small red circle", "an orange cross", "a circle",
        "a red shape"."""
        obj = self.objects[k]
        words = [(obj.size, "size_spans")] if self.with_size[k] else []
        if self.with_colour[k]:
            words.append((obj.colour, "colour_spans"))
        words.append((obj.shape, "shape_spans") if self.with_shape[k] else (UNNAMED_SHAPE, None))
        start = len(self.text)
        self.write("an " if words[0][0][0] in "aeiou" else "a ")
        for n, (word, spans) in enumerate(words):
            span = self.write(word)
            if spans is not None:
                getattr(self, spans)[k] = span
            if n < len(words) - 1:
                self.write(" ")
        self.phrase_spans[k] = (start, len(self.text))

    def scene(self) -> Scene:
        return Scene(self.objects, self.text, self.colour_spans, self.shape_spans, self.size_spans, self.phrase_spans)


def _caption(
    rng: np.random.Generator, objects: list[ShapeObject], resolution: int, omission: Omission = Omission()
) -> Scene:
    """Pick a caption template for `objects` (drawn at `resolution`) and write it, leaving
    attributes out as `omission` says."""
    count = len(objects)
    with_size = (rng.random(count) < 1 - omission.size).tolist()
    with_colour = with_shape = with_position = [True] * count
    if omission.draws_extra(count):  # draws nothing otherwise, so such captions stay as they always were
        kept = rng.random((count, 3)) >= [omission.colour, omission.shape, omission.position]  # (count, 3)
        with_colour, with_shape, with_position = (kept[:, j].tolist() for j in range(3))
    writer = _CaptionWriter(objects, with_size, with_colour, with_shape)

    def place(k: int) -> str:
        return " " + POSITION_PHRASES[objects[k].position] if with_position[k] else ""

    if count == 1:
        if rng.random() < NO_POSITION_PROBABILITY or not with_position[0]:
            writer.object(0)  # "a red circle"
        else:
            template = rng.integers(3)
            if template == 0:  # "a red circle on the left"
                writer.object(0)
                writer.write(place(0))
            elif template == 1:  # "on the left, a red circle"
                writer.write(place(0)[1:] + ", ")
                writer.object(0)
            else:  # "there is a red circle on the left"
                writer.write("there is ")
                writer.object(0)
                writer.write(place(0))
        return writer.scene()

    relations = _true_relations(objects, resolution) if count == 2 else []
    if relations and rng.random() < RELATION_PROBABILITY:  # "a red circle above a blue square"
        subject, reference, phrase = relations[rng.integers(len(relations))]
        writer.object(subject)
        writer.write(f" {phrase} ")
        writer.object(reference)
        return writer.scene()

    # "a red circle on the left, a green cross at the top and a blue square on the right", with
    # the objects in random order and the last one joined by "and" or a comma.
    last_joiner = " and " if rng.random() < 0.5 else ", "
    for n, k in enumerate(rng.permutation(count).tolist()):
        if n:
            writer.write(last_joiner if n == count - 1 else ", ")
        writer.object(k)
        writer.write(place(k))
    return writer.scene()


def sample_scene(
    rng: np.random.Generator,
    resolution: int,
    min_objects: int,
    max_objects: int,
    holdout: set[tuple[str, str]] | None,
    holdout_mode: str,
    object_weights: list[float] | None = None,
    omission: Omission = Omission(),
) -> Scene:
    """Draw a random scene and its caption.

    rng: the only source of randomness, so the scene is a function of its state.
    resolution: side of the image the scene will be rendered at, in pixels.
    min_objects, max_objects: the number of objects is in [min_objects, max_objects].
    holdout: (colour, shape) pairs kept apart for testing compositional generalisation.
    holdout_mode: "exclude" (no object is a held-out pair), "only" (at least one object is a
        held-out pair) or "any" (holdout is ignored).
    object_weights: relative frequencies of 1, 2, 3 and 4 objects, of which only the counts in
        [min_objects, max_objects] are drawn (None: uniform in that range).
    omission: how often the caption leaves each attribute of an object out. The objects do not
        depend on it, only the caption does.
    """
    allowed, forced = _candidate_pairs(holdout or set(), holdout_mode)
    if object_weights is None:
        count = int(rng.integers(min_objects, max_objects + 1))
    else:
        p = np.asarray(object_weights[min_objects - 1 : max_objects], dtype=float)
        count = min_objects + int(rng.choice(len(p), p=p / p.sum()))
    pairs = [allowed[k] for k in rng.integers(len(allowed), size=count)]
    if forced:
        pairs[rng.integers(count)] = forced[rng.integers(len(forced))]
    positions, sizes, centers, halves = _place(rng, resolution, count)
    objects = [
        ShapeObject(colour, shape, size, position, center, half)
        for (colour, shape), size, position, center, half in zip(pairs, sizes, positions, centers, halves)
    ]
    return _caption(rng, objects, resolution, omission)


# ---------------------------------------------------------------------------------------------
# Rendering


def draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: int, fill) -> None:
    """Draw `obj` with `fill` on a canvas `scale` times the resolution its coordinates are in."""
    cx, cy = obj.center[0] * scale, obj.center[1] * scale
    half = obj.half_extent * scale
    # PIL boxes are inclusive pixel ranges: the continuous box [x0, x1) covers pixels
    # round(x0) .. round(x1) - 1.
    x0, y0 = round(cx - half), round(cy - half)
    x1, y1 = round(cx + half) - 1, round(cy + half) - 1
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":  # upward, base along the bottom of the box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "cross":
        arm = CROSS_ARM_FRACTION * half  # half of the arm width
        draw.rectangle((x0, round(cy - arm), x1, round(cy + arm) - 1), fill=fill)
        draw.rectangle((round(cx - arm), y0, round(cx + arm) - 1, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, resolution: int, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Draw `scene` (sampled at `resolution`) and its per-object masks.

    supersample: the shapes are drawn this many times larger and box-filtered down, which
        antialiases the edges deterministically.
    Returns (image (H, W, 3) uint8, masks (num_objects, H, W) bool), where a mask holds the
    pixels at least half covered by the object and not covered by a later object.
    """
    big, small = (resolution * supersample,) * 2, (resolution, resolution)
    canvas = Image.new("RGB", big, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    coverage = []
    for obj in scene.objects:
        draw_shape(draw, obj, supersample, COLOURS[obj.colour])
        alone = Image.new("L", big, 0)
        draw_shape(ImageDraw.Draw(alone), obj, supersample, 255)
        coverage.append(np.asarray(alone.resize(small, Image.Resampling.BOX)))  # (H, W) uint8
    image = np.array(canvas.resize(small, Image.Resampling.BOX))  # (H, W, 3) uint8
    masks = np.stack(coverage) >= 128  # (N, H, W): at least half covered
    # Later objects are drawn on top, so they hide earlier ones.
    for k in range(len(masks) - 2, -1, -1):
        masks[k] &= ~masks[k + 1 :].any(axis=0)
    return image, masks


# ---------------------------------------------------------------------------------------------
# Datasets


class ShapesDataset(Dataset):
    """Procedural scenes of coloured shapes. Sample i is a pure function of (seed, i), so every
    process, worker and epoch sees the same data without storing it."""

    def __init__(
        self,
        resolution: int = 32,
        num_samples: int = 20000,
        min_objects: int = 1,
        max_objects: int = 4,
        seed: int = 0,
        holdout=DEFAULT_HOLDOUT,
        holdout_mode: str = "exclude",
        object_weights: list[float] | None = DEFAULT_OBJECT_WEIGHTS,
        omission: Omission = Omission(),
    ):
        """resolution: image side in pixels (>= 16).
        num_samples: number of distinct samples (the dataset's length).
        min_objects, max_objects: range of objects per scene, 1 <= min <= max <= 4.
        object_weights: relative frequencies of scenes with 1, 2, 3 and 4 objects (four
            non-negative weights; counts outside [min_objects, max_objects] are never drawn).
            None: uniform in [min_objects, max_objects].
        seed: selects the whole dataset; two seeds give different samples.
        holdout: iterable of "colour shape" strings, e.g. ["red square"].
        holdout_mode: "exclude", "only" or "any"; see `sample_scene`.
        omission: how often captions leave an object's colour, shape, position or size out.
        """
        check_int("data.resolution", resolution, 16)
        check_int("data.num_samples", num_samples, 1)
        check_int("data.min_objects", min_objects, 1, 4)
        check_int("data.max_objects", max_objects, min_objects, 4)
        check_int("data.seed", seed, 0)
        if object_weights is not None and (
            len(object_weights) != 4
            or min(object_weights) < 0
            or sum(object_weights[min_objects - 1 : max_objects]) <= 0
        ):
            raise UserError(
                f"data.object_weights must be 4 non-negative weights (of 1, 2, 3, 4 objects), with a "
                f"positive weight between data.min_objects={min_objects} and data.max_objects="
                f"{max_objects}; got {list(object_weights)}"
            )
        self.object_weights = None if object_weights is None else list(object_weights)
        self.resolution = resolution
        self.num_samples = num_samples
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.seed = seed
        self.holdout = parse_holdout(holdout)
        self.holdout_mode = holdout_mode
        self.omission = omission
        _candidate_pairs(self.holdout, holdout_mode)  # fail now, not at the first sample

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, i: int) -> Scene:
        """The scene of sample i, without rendering it."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, i])
        return sample_scene(
            rng,
            self.resolution,
            self.min_objects,
            self.max_objects,
            self.holdout,
            self.holdout_mode,
            self.object_weights,
            self.omission,
        )

    def sample(self, i: int) -> ShapesSample:
        """Sample i with its image, masks and scene."""
        scene = self.scene(i)
        image, masks = render_scene(scene, self.resolution)
        return ShapesSample(image, masks, scene)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        image, _ = render_scene(scene, self.resolution)
        return {"pixel_values": to_pixel_values(image), "caption": scene.caption, "index": i}

    def captions(self) -> list[str]:
        """Every sample's caption, in index order (samples scenes only, no rendering)."""
        return [scene.caption for scene in self.scenes()]

    def scenes(self) -> list[Scene]:
        """Every sample's scene, in index order, without rendering."""
        return [self.scene(i) for i in range(self.num_samples)]

    def render_all(self, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Render every sample once for training from memory (`render_with_masks`, without the masks).

        progress: show a tqdm bar.
        Returns (images (N, 3, H, W) uint8, captions).
        """
        rendered = self.render_with_masks(progress)
        return rendered.images, rendered.captions

    def render_with_masks(self, progress: bool = True, workers: int | None = None) -> RenderedShapes:
        """Render every sample once, with its object masks and scene, in index order.

        progress: show a tqdm bar.
        workers: processes that render in parallel (None: `torch.get_num_threads()`, the cores
            this process computes on; forked, so only on Linux). Sample i is a pure function of
            (seed, i), so the result does not depend on how many render it.
        """
        N, K, side = self.num_samples, self.max_objects, self.resolution
        images = torch.empty((N, 3, side, side), dtype=torch.uint8)
        masks = torch.zeros((N, K, side, side), dtype=torch.bool)
        captions, scenes = [], []
        chunks = [(start, min(start + RENDER_CHUNK, N)) for start in range(0, N, RENDER_CHUNK)]
        workers = min(torch.get_num_threads() if workers is None else workers, len(chunks))
        bar = tqdm(total=N, desc="rendering shapes", disable=not progress)
        # fork: the workers start at once, with this dataset, and import nothing
        with (
            multiprocessing.get_context("fork").Pool(workers)
            if workers > 1 and sys.platform == "linux"
            else _InProcess()
        ) as pool:
            for (start, stop), (chunk_images, chunk_masks, chunk_scenes) in zip(
                chunks, pool.imap(self._render_range, chunks)
            ):
                images[start:stop] = torch.from_numpy(chunk_images)
                masks[start:stop, : chunk_masks.shape[1]] = torch.from_numpy(chunk_masks)
                scenes.extend(chunk_scenes)
                captions.extend(scene.caption for scene in chunk_scenes)
                bar.update(stop - start)
        bar.close()
        return RenderedShapes(images, captions, masks, scenes)

    def _render_range(self, bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
        """Samples start..stop-1: images (n, 3, H, W) uint8, masks (n, max_objects, H, W) bool, scenes."""
        start, stop = bounds
        side = self.resolution
        images = np.empty((stop - start, 3, side, side), dtype=np.uint8)
        masks = np.zeros((stop - start, self.max_objects, side, side), dtype=bool)
        scenes = []
        for row, i in enumerate(range(start, stop)):
            scene = self.scene(i)
            image, object_masks = render_scene(scene, side)
            images[row] = image.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            masks[row, : len(object_masks)] = object_masks
            scenes.append(scene)
        return images, masks, scenes


RENDER_CHUNK = 500  # samples per rendering task


class RenderedShapes(NamedTuple):
    """A whole shapes dataset in memory (`ShapesDataset.render_with_masks`)."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    captions: list[str]  # N captions
    masks: torch.Tensor  # (N, max_objects, H, W) bool; object k of sample i is masks[i, k] (unused slots empty)
    scenes: list[Scene]  # N scenes: objects and the character spans of the words that name them


class _InProcess:
    """Stands in for a process pool with one worker: renders in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, function, items):
        return map(function, items)

"""Measuring a model trained on an image folder, without a detector (`evaluate.py --data FOLDER`).

The shapes evaluation reads every image back with a detector that knows the shapes; a folder of
real images (emoji, icons: objects on a white background, captioned with their names) has none.
Everything here is measured from pixels, from the folder itself and from the model's own maps.
Prompts are the folder's own captions (distinct ones, drawn with the run's seed); prompt k of a
list is drawn from noise seed `run.seed + k`, sampled with the run's `SamplingSettings`.

- Retrieval (faithfulness): each sample's nearest training images in a fixed feature space:
  the image's pixels at `feature_side(R)` = min(32, R) px (box-filtered down from the model's
  resolution R, 8-bit, RGB, flattened), with the root-mean-square difference of the pixels in
  [0, 1] as the distance (L2 divided by sqrt(dimensions): 0 for an exact copy, 1 for black
  against white). top-1: the nearest image's caption is the prompt; top-5: one of the 5
  nearest's is; chance top-1: the share of the folder's images that carry the prompt (what a
  random pick would score). Memorised: the nearest image is a near copy, RMS distance below
  NEAR_COPY_RMS = 0.05 (about 13 of 255 per channel): above what 8-bit rounding and a sampler's
  small noise cost, below what a shift of one feature pixel costs an emoji (0.1 and up on its
  edges). Captions are compared lower-cased, whitespace collapsed.
- Foreground: the pixels far from the white background, some channel below 255 -
  FOREGROUND_DISTANCE (40). An object is *drawn* when the foreground covers between MIN_AREA
  (0.02) and MAX_AREA (0.95) of the image: an empty (white) image never counts, nor a texture
  filling the frame. `reference` checks the rule on the folder's own images (against their masks,
  where metadata.jsonl names them: {"mask": "masks/x.png"}, white = object).
- Colour names (`colour_names`), per foreground pixel, from HSV (hue in degrees, s and v in [0, 1]):
  black v < 0.3; else white (v >= 0.75) or grey when s < 0.2; else brown when the hue is in
  [10, 40) and the pixel is dark (v < 0.65, or v < 0.8 with s < 0.7); pink for a light red (hue
  in [345, 15), s < 0.6, v >= 0.75); else by hue: red [345, 15), orange [15, 40), yellow [40,
  70), green [70, 165), blue [165, 260), purple [260, 300), pink [300, 345). The dominant colour
  of an image: the most common chromatic name (red ... brown) of its foreground when chromatic
  pixels are at least a third of it (an outline or a highlight does not win), else the most
  common of black, grey and white; its share is its count over the pixels it was chosen among.
  *One clean colour*: an object drawn whose dominant colour has a share >= CLEAN_SHARE (0.7; a
  real emoji's leaf, stem and highlights take up to about a quarter).
- Colour words: captions naming exactly one colour of COLOUR_WORDS ("gray" read as grey) before
  their last word. Each is drawn as a word swap (`Pipeline.swap`, the run's edit steps and keep
  layout): source = the caption, edit = the caption with the colour replaced by another colour
  word (one whose caption the folder also has when there is one, "red heart" -> "blue heart",
  else any colour word of the folder's captions). Named colour: the source draws an object whose
  dominant colour is the caption's. Swap: the edit draws an object of the new colour (new
  colour), not the old one (old gone), and its foreground IoU with the source's (mean, and the
  share >= 0.8); every pair is scored, an empty source scoring IoU 0. Weight 0: the caption with
  `(colour:0)`, scored as one clean colour (an object drawn, any colour); also how often the
  named colour stays anyway.
- Maps: the subject word (the caption's last word: "apple" in "red apple", "circle" in "large
  green circle") of each retrieval sample, its DAAM-style map (metrics.span_map) against the
  sample's own foreground (a training image's mask would not fit a new sample). IoU: the map's
  top-k pixels, k = the foreground's area, against the foreground; pointing: the map's maximum
  lies in it. Samples without a drawn object are left out (their count is reported).

Targets (TARGETS) are the issue's, for the attention weight mode; `folder_targets` checks them as
report.py's `targets` does.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion.control.prompts import format_prompt, split_words
from diffusion.data.image_folder import ImageFolderDataset
from diffusion.evaluation.edits import swap_pairs
from diffusion.evaluation.metrics import EVAL_SEED, EvaluationRun, pointing, sample_batches, sample_images, span_map
from diffusion.evaluation.report import fmt, report_value, target_lines
from diffusion.images import labelled_grid
from diffusion.sampling.settings import SamplingSettings

FEATURE_SIDE = 32  # retrieval compares pixels at min(this, the model's resolution)
NEAREST_K = 5
NEAR_COPY_RMS = 0.05
FOREGROUND_DISTANCE = 40
MIN_AREA, MAX_AREA = 0.02, 0.95
CLEAN_SHARE = 0.7
CHROMATIC_MIN = 1 / 3
SWAP_IOU = 0.8
REFERENCE_MAX = 1000  # training images the reference measures at most (every image is retrieved)

CHROMATIC = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
COLOUR_NAMES = (*CHROMATIC, "black", "grey", "white")
COLOUR_WORDS = {**{name: name for name in COLOUR_NAMES}, "gray": "grey"}  # caption word -> colour name
HUE_BINS = (("orange", 15, 40), ("yellow", 40, 70), ("green", 70, 165), ("blue", 165, 260), ("purple", 260, 300))

TARGETS = {
    "retrieval/top-1": 0.5,
    "retrieval/top-5": 0.8,
    "colour/named colour": 0.9,
    "maps/subject pointing": 0.9,
    "colour swap/new colour": 0.9,
    "colour swap/foreground iou": 0.8,
    "weight 0/one clean colour": 0.8,
}


# ---- pixels: features, foreground, colours ---------------------------------------------------


def feature_side(resolution: int) -> int:
    return min(FEATURE_SIDE, resolution)


def features(image: np.ndarray, side: int) -> np.ndarray:
    """(R, R, 3) uint8 -> the retrieval feature: (side * side * 3,) uint8, box-filtered down."""
    if image.shape[0] != side:
        image = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX))
    return image.reshape(-1)


def nearest(queries: np.ndarray, keys: torch.Tensor, k: int = NEAREST_K, chunk: int = 4096):
    """The `k` nearest keys of each query by RMS pixel distance in [0, 1]: (Q, D) and (N, D)
    uint8 features -> (distances (Q, k) float64, indices (Q, k)), nearest first, ties by index.
    Candidates come from a matrix product over `chunk` keys at a time (memory: Q x chunk); the
    distances of the k kept are then computed exactly (an exact copy is at 0)."""
    queries = torch.from_numpy(np.asarray(queries))
    q = queries.float() / 255
    k = min(k, len(keys))
    best_d, best_i = torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
    for start in range(0, len(keys), chunk):
        block = keys[start : start + chunk].float() / 255
        d2 = (q * q).sum(1, keepdim=True) + (block * block).sum(1) - 2 * q @ block.T
        d = torch.cat([best_d, d2], 1)
        i = torch.cat([best_i, torch.arange(start, start + len(block)).expand(len(q), -1)], 1)
        keep = torch.topk(d, min(d.shape[1], k + 4), largest=False).indices  # a few spare for float ties
        best_d, best_i = d.gather(1, keep), i.gather(1, keep)
    exact = ((queries[:, None, :].double() - keys[best_i].double()) / 255).pow(2).mean(-1).sqrt().numpy()
    indices = best_i.numpy()
    order = np.array([np.lexsort((row_i, row_d))[:k] for row_d, row_i in zip(exact, indices)]).reshape(len(q), k)
    return np.take_along_axis(exact, order, 1), np.take_along_axis(indices, order, 1)


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels with some channel more than FOREGROUND_DISTANCE below white."""
    return (255 - image.astype(np.int16)).max(-1) > FOREGROUND_DISTANCE


def is_drawn(mask: np.ndarray) -> bool:
    """Whether a foreground holds an object: between MIN_AREA and MAX_AREA of the image."""
    return MIN_AREA <= float(mask.mean()) <= MAX_AREA


def colour_names(image: np.ndarray) -> np.ndarray:
    """(H, W) indices into COLOUR_NAMES: each pixel's colour name (the module docstring's rules)."""
    rgb = image.astype(np.float32) / 255
    v, low = rgb.max(-1), rgb.min(-1)
    chroma = v - low
    s = np.where(v > 0, chroma / np.maximum(v, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (hue * 60) % 360
    names = np.full(v.shape, COLOUR_NAMES.index("pink"))  # hue in [300, 345)
    reddish = (hue >= 345) | (hue < 15)
    names[reddish] = COLOUR_NAMES.index("red")
    for name, start, end in HUE_BINS:
        names[(hue >= start) & (hue < end)] = COLOUR_NAMES.index(name)
    names[reddish & (s < 0.6) & (v >= 0.75)] = COLOUR_NAMES.index("pink")
    dark = (v < 0.65) | ((v < 0.8) & (s < 0.7))
    names[(hue >= 10) & (hue < 40) & dark] = COLOUR_NAMES.index("brown")
    names[s < 0.2] = np.where(v[s < 0.2] >= 0.75, COLOUR_NAMES.index("white"), COLOUR_NAMES.index("grey"))
    names[v < 0.3] = COLOUR_NAMES.index("black")
    return names


def dominant_colour(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[str | None, float]:
    """The dominant colour name of the foreground (`mask`, default `foreground(image)`) and its
    share (module docstring); (None, 0.0) for an empty foreground."""
    mask = foreground(image) if mask is None else mask
    counts = np.bincount(colour_names(image)[mask], minlength=len(COLOUR_NAMES))
    if not counts.sum():
        return None, 0.0
    chromatic = counts[: len(CHROMATIC)]
    pool = chromatic if chromatic.sum() >= CHROMATIC_MIN * counts.sum() else counts[len(CHROMATIC) :]
    offset = 0 if pool is chromatic else len(CHROMATIC)
    best = int(np.argmax(pool))
    return COLOUR_NAMES[offset + best], float(pool[best] / pool.sum())


def is_clean(image: np.ndarray) -> bool:
    """One clean colour: an object drawn whose dominant colour has a share of at least CLEAN_SHARE."""
    mask = foreground(image)
    return is_drawn(mask) and dominant_colour(image, mask)[1] >= CLEAN_SHARE


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def top_k_iou(word_map: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the map's top-k pixels (k = the mask's area; ties in row-major order) with the mask."""
    region = np.zeros(mask.size, bool)
    region[np.argsort(-word_map.reshape(-1), kind="stable")[: int(mask.sum())]] = True
    return mask_iou(region.reshape(mask.shape), mask)


# ---- captions ----------------------------------------------------------------------------------


def _normal(caption: str) -> str:
    return " ".join(caption.lower().split())


def same_caption(a: str, b: str) -> bool:
    """Whether two captions are the same, lower-cased and whitespace collapsed."""
    return _normal(a) == _normal(b)


def colour_word(caption: str):
    """The caption's one colour word (a `prompts.Word`) before its last word; None when it names
    no colour, or several."""
    words = split_words(caption)
    named = [w for w in words[:-1] if w.text.lower() in COLOUR_WORDS]
    return named[0] if len(named) == 1 else None


def subject_span(caption: str) -> tuple[int, int]:
    """The character span of the subject word: the caption's last word."""
    last = split_words(caption)[-1]
    return last.start, last.end


def as_prompt(caption: str, weights=()) -> str:
    """A caption as a prompt: its `( ) [ ] : \\` escaped, `weights` (start, end, weight) written in."""
    return format_prompt(caption, list(weights))


# ---- the folder --------------------------------------------------------------------------------


@dataclass
class FolderSet:
    """The training folder as the evaluation reads it, at the model's resolution."""

    dataset: ImageFolderDataset
    captions: list[str]
    keys: torch.Tensor  # (N, D) uint8 retrieval features
    masks: dict[int, str] = field(default_factory=dict)  # image index -> its mask file
    reference: dict = field(default_factory=dict)  # the measures on the folder's own images


def mask_files(root: Path) -> dict[str, str]:
    """{image path: mask path} of the metadata.jsonl lines naming an existing "mask" file (paths as
    ImageFolderDataset normalises them); {} without metadata.jsonl. Other lines are skipped."""
    metadata, out = root / "metadata.jsonl", {}
    if not metadata.is_file():
        return out
    base = root.resolve()
    for line in metadata.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("file_name"), str)
            and isinstance(record.get("mask"), str)
        ):
            mask = Path(os.path.normpath(base / record["mask"]))
            if mask.is_relative_to(base) and mask.is_file():
                out[os.path.normpath(base / record["file_name"])] = str(mask)
    return out


def load_mask(path: str, resolution: int) -> np.ndarray:
    """A mask file (white = object) centre-cropped square and resized to `resolution`: (R, R) bool."""
    with Image.open(path) as file:
        mask = file.convert("L")
    side = min(mask.size)
    left, top = (mask.width - side) // 2, (mask.height - side) // 2
    mask = mask.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(mask) >= 128


def read_folder(folder, resolution: int, progress: bool = True) -> FolderSet:
    """Every image of `folder` at `resolution` (ImageFolderDataset, centre crops, bad files
    skipped), its retrieval features and masks, and the reference measures of its first
    REFERENCE_MAX images: how often an image whose caption names a colour has that dominant
    colour (by colour), how many of them are one clean colour, and the foreground rule's IoU with
    the masks."""
    dataset = ImageFolderDataset(folder, resolution, skip_bad=True)
    captions = dataset.captions()
    by_path = mask_files(Path(folder))
    masks = {i: by_path[p] for i, p in enumerate(dataset.paths) if p in by_path}
    side = feature_side(resolution)
    keys = torch.empty((len(dataset), side * side * 3), dtype=torch.uint8)
    named, clean, ious = {}, [], []
    for i in tqdm(range(len(dataset)), desc="reading the folder", disable=not progress):
        image = dataset.image(i)
        keys[i] = torch.from_numpy(features(image, side).copy())
        if i >= REFERENCE_MAX:
            continue
        word = colour_word(captions[i])
        if word is not None:
            named.setdefault(COLOUR_WORDS[word.text.lower()], []).append(dominant_colour(image)[0])
            clean.append(is_clean(image))
        if i in masks:
            ious.append(mask_iou(foreground(image), load_mask(masks[i], resolution)))
    reference = {
        "n": min(len(dataset), REFERENCE_MAX),
        "named colour": _mean([c == name for name, found in named.items() for c in found]),
        "by colour": {
            name: {"n": len(found), "rate": _mean([c == name for c in found])} for name, found in sorted(named.items())
        },
        "one clean colour": _mean(clean),
        "masks": len(ious),
        "foreground iou with masks": _mean(ious),
    }
    return FolderSet(dataset, captions, keys, masks, reference)


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def draw_prompts(captions: list[str], n: int, seed: int) -> list[str]:
    """`n` distinct captions (all when fewer), drawn with `seed` from the sorted distinct ones."""
    distinct = sorted(set(captions))
    rng = np.random.default_rng(seed)
    return [distinct[k] for k in sorted(rng.choice(len(distinct), min(n, len(distinct)), replace=False))]


class ColourCase(NamedTuple):
    """A caption naming a colour, and its edits (the attributes `edits.swap_pairs` reads)."""

    caption: str
    old: str  # the colour name of the caption
    new: str  # the colour swapped in
    source: str  # the caption as a prompt
    edit: str  # the caption with the new colour, as a prompt
    weight0: str  # the caption with (colour:0)


def colour_cases(captions: list[str], n: int, seed: int) -> list[ColourCase]:
    """Up to `n` distinct colour captions drawn with `seed`, each with its swap (module docstring)."""
    named = [c for c in captions if colour_word(c) is not None]
    seen = {COLOUR_WORDS[colour_word(c).text.lower()] for c in named}
    folder = {_normal(c) for c in captions}
    rng = np.random.default_rng(seed + 1)
    cases = []
    for caption in draw_prompts(named, n, seed):
        word = colour_word(caption)
        old = COLOUR_WORDS[word.text.lower()]

        def replaced(colour, caption=caption, word=word):
            return caption[: word.start] + colour + caption[word.end :]

        options = sorted(c for c in seen if c != old and replaced(c).lower() in folder)
        options = options or sorted(c for c in seen if c != old) or [c for c in ("red", "blue") if c != old]
        new = options[int(rng.integers(len(options)))]
        weight0 = as_prompt(caption, [(word.start, word.end, 0.0)])
        cases.append(ColourCase(caption, old, new, as_prompt(caption), as_prompt(replaced(new)), weight0))
    return cases


# ---- the parts ---------------------------------------------------------------------------------


def retrieval_and_maps(run: EvaluationRun, folder: FolderSet, prompts: list[str]) -> tuple[dict, dict, list]:
    """Sample each prompt once (with maps): the retrieval rates, the subject word's map rates,
    and the examples (sample, its nearest index, distance, prompt)."""
    side, total = feature_side(run.resolution), len(folder.captions)
    counts = Counter(_normal(c) for c in folder.captions)
    top1, top5, copies, distances, chance, ious, hits, examples = [], [], [], [], [], [], [], []
    done = 0
    for images, token_maps, offsets in sample_batches(run, [as_prompt(p) for p in prompts], maps=True):
        batch_prompts = prompts[done : done + len(images)]
        done += len(images)
        found_d, found_i = nearest(np.stack([features(im, side) for im in images]), folder.keys)
        for prompt, image, maps, offs, dist, index in zip(batch_prompts, images, token_maps, offsets, found_d, found_i):
            matches = [same_caption(folder.captions[j], prompt) for j in index]
            top1.append(matches[0])
            top5.append(any(matches))
            copies.append(dist[0] < NEAR_COPY_RMS)
            distances.append(dist[0])
            chance.append(counts[_normal(prompt)] / total)
            if len(examples) < 8:
                examples.append((image, int(index[0]), float(dist[0]), prompt))
            mask = foreground(image)
            if is_drawn(mask):
                word_map = span_map(maps, offs, subject_span(prompt))
                ious.append(top_k_iou(word_map, mask))
                hits.append(pointing(word_map, mask))
    retrieval = {
        "n": len(prompts),
        "top-1": _mean(top1),
        "top-5": _mean(top5),
        "chance top-1": _mean(chance),
        "memorised": _mean(copies),
        "median distance": float(np.median(distances)) if distances else None,
        "near copy rms": NEAR_COPY_RMS,
    }
    maps = {"n": len(ious), "no object": len(prompts) - len(ious), "subject miou": _mean(ious)}
    maps["subject pointing"] = _mean(hits)
    return retrieval, maps, examples


def colour_parts(run: EvaluationRun, cases: list[ColourCase]) -> tuple[dict, list]:
    """The named colour, the colour swap and weight 0 rates of `cases` (module docstring), and
    examples (caption, source, weight 0, edit images, edit colour)."""
    pairs = swap_pairs(run, cases)
    zeroed = sample_images(run, [c.weight0 for c in cases]).images
    named, new, gone, ious, drawn, clean, kept = [], [], [], [], [], [], []
    for case, (source, edit), zero in zip(cases, pairs, zeroed):
        source_mask, edit_mask, zero_mask = foreground(source), foreground(edit), foreground(zero)
        named.append(is_drawn(source_mask) and dominant_colour(source, source_mask)[0] == case.old)
        edit_colour = dominant_colour(edit, edit_mask)[0] if is_drawn(edit_mask) else None
        new.append(edit_colour == case.new)
        gone.append(edit_colour is not None and edit_colour != case.old)
        ious.append(mask_iou(source_mask, edit_mask) if is_drawn(source_mask) else 0.0)
        drawn.append(is_drawn(source_mask))
        clean.append(is_clean(zero))
        kept.append(is_drawn(zero_mask) and dominant_colour(zero, zero_mask)[0] == case.old)
    report = {
        "colour": {"n": len(cases), "named colour": _mean(named)},
        "colour swap": {
            "n": len(cases),
            "source drawn": _mean(drawn),
            "new colour": _mean(new),
            "old gone": _mean(gone),
            "foreground iou": _mean(ious),
            f"iou >= {SWAP_IOU:g}": _mean([v >= SWAP_IOU for v in ious]),
            "edit_steps": run.settings.edit_steps,
        },
        "weight 0": {"n": len(cases), "one clean colour": _mean(clean), "named colour kept": _mean(kept)},
    }
    examples = [(c.caption, s, z, e, c.new) for c, (s, e), z in zip(cases[:4], pairs, zeroed)]
    return report, examples


class FolderEvaluation(NamedTuple):
    """`evaluate_folder`'s result."""

    report: dict  # JSON-ready
    retrieval_examples: list  # (sample, nearest training index, distance, prompt)
    colour_examples: list  # (caption, source, weight 0, edit, new colour)
    folder: FolderSet


def evaluate_folder(
    pipe,
    folder,
    settings: SamplingSettings | None = None,
    *,
    n: int = 100,
    seed: int = EVAL_SEED,
    batch_size: int = 50,
    progress: bool = True,
) -> FolderEvaluation:
    """The folder report: `n` retrieval prompts (distinct captions; their samples also give the
    maps) and up to `n` colour captions (each a swap pair and a weight-0 image), sampled with
    `settings` (None: the defaults, as sample.py's)."""
    started = time.time()
    run = EvaluationRun(pipe, settings or SamplingSettings(), seed, batch_size)
    data = read_folder(folder, run.resolution, progress)
    prompts, cases = draw_prompts(data.captions, n, seed), colour_cases(data.captions, n, seed)
    report = _header(run, data, folder)
    with tqdm(total=len(prompts) + 3 * len(cases), desc="evaluating (images)", disable=not progress) as bar:
        run = run.but(progress=bar)
        report["retrieval"], report["maps"], examples = retrieval_and_maps(run, data, prompts)
        colour, colour_examples = colour_parts(run, cases) if cases else (_no_colour(), [])
    report.update(colour)
    report["reference"] = data.reference
    report["targets"] = folder_targets(report)
    report["seconds"] = round(time.time() - started, 1)
    return FolderEvaluation(report, examples, colour_examples, data)


def _header(run: EvaluationRun, data: FolderSet, folder) -> dict:
    settings, side = run.settings, feature_side(run.resolution)
    return {
        "folder": str(Path(folder).resolve()),
        "images": len(data.captions),
        "captions": len(set(data.captions)),
        "masks": len(data.masks),
        "seed": run.seed,
        "resolution": run.resolution,
        "feature": f"pixels at {side} px, RMS distance in [0, 1]",
        "guidance": settings.guidance,
        "guidance_cutoff": settings.guidance_cutoff,
        "sampler": settings.sampler,
        "weight_mode": settings.weighting.mode,
        "mixed_precision": run.pipe.mixed_precision_of(settings),
    }


def _no_colour() -> dict:
    """The colour parts of a folder whose captions name no colour: nothing measured."""
    return {
        "colour": {"n": 0, "named colour": None},
        "colour swap": {"n": 0, "new colour": None, "foreground iou": None},
        "weight 0": {"n": 0, "one clean colour": None},
    }


def folder_targets(report: dict) -> dict:
    """Each of TARGETS with its value and whether it is met (None: not measured); scores k/n
    that equal a goal meet it (1e-9 of float error allowed)."""
    out = {}
    for key, target in TARGETS.items():
        value = report_value(report, key)
        out[key] = {"value": value, "target": target, "met": None if value is None else value >= target - 1e-9}
    return out


# ---- the printed table and the picture ---------------------------------------------------------


def format_folder_report(report: dict) -> str:
    """The folder report as evaluate.py prints it: the settings, a line per part, the targets."""
    r = report["retrieval"]
    lines = [
        f"folder evaluation: {report['folder']} ({report['images']} images, {report['captions']} captions, "
        f"{report['masks']} masks), seed {report['seed']}, {report['resolution']} px, guidance "
        f"{report['guidance']:g}, {report['sampler']} sampler, {report['weight_mode']} weights, "
        f"{report.get('seconds', 0):.0f} s",
        f"feature space: {report['feature']}; near copy below {r['near copy rms']:g}",
        "",
    ]
    for part in ("retrieval", "maps", "colour", "colour swap", "weight 0"):
        values = report[part]
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in values.items() if k not in ("n", "near copy rms", "by colour"))
        lines.append(f"{part} (n={values['n']}): {shown}")
    reference = report["reference"]
    lines.append(
        f"reference: the folder's own images (n={reference['n']}): named colour {fmt(reference['named colour'])}, "
        f"one clean colour {fmt(reference['one clean colour'])}, foreground iou with masks "
        f"{fmt(reference['foreground iou with masks'])} (n={reference['masks']})"
    )
    return "\n".join([*lines, "", *target_lines(report["targets"])])


def folder_picture(evaluation: FolderEvaluation) -> Image.Image:
    """Samples beside their nearest training images (4 pairs a row), then a row of colour edits:
    source | weight 0 | swap for each of the first colour captions."""
    grids = []
    pairs, labels = [], []
    for image, index, distance, prompt in evaluation.retrieval_examples:
        pairs += [Image.fromarray(image), Image.fromarray(evaluation.folder.dataset.image(index))]
        labels += [prompt, f"nearest ({distance:.3f}): {evaluation.folder.captions[index]}"]
    if pairs:
        grids.append(labelled_grid(pairs, labels, columns=8))
    edits, labels = [], []
    for caption, source, zero, edit, new in evaluation.colour_examples:
        edits += [Image.fromarray(source), Image.fromarray(zero), Image.fromarray(edit)]
        labels += [caption, "colour weight 0", f"-> {new}"]
    if edits:
        grids.append(labelled_grid(edits, labels, columns=min(len(edits), 12)))
    picture = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    top = 0
    for grid in grids:
        picture.paste(grid, (0, top))
        top += grid.height
    return picture

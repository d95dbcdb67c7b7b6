"""Measuring a model on shapes prompts: faithfulness, attention localisation, edit response and
samplers. `evaluate.py` is the command line over `evaluate()`.

Every number comes from images the model draws for prompts of the shapes generator with a seed
disjoint from training, read back by the project's detector (detector.py, whose own accuracy on
real generator images is part of the report). Faithfulness and edit response sample as
`sample.py` does by default (Euler, 20 steps, guidance 3; `sampler` chooses another).

- Faithfulness, scored like GenEval (a prompt passes only if every condition it states holds):
    single object    1 object: an object of the named colour and shape is drawn
    two objects      2 objects: both named shapes are drawn (as two objects)
    three objects    3 objects: all three named shapes are drawn
    colour binding   2 objects of different colours and shapes: each colour sits on its shape
    position         1-2 objects whose caption places them ("on the left", "above"): every
                     object drawn with its colour and shape, at its place / in its relation
    counting         1-4 objects: exactly as many objects drawn as the caption names
    held-out pairs   1 object of a colour-shape pair never seen in training: drawn right
- Attention localisation: per-word maps (DAAM-style: mean over heads, sum over layers and
  steps, conditional half) of colour and shape words against the object's mask. IoU: the map is
  divided by its maximum and thresholded at 0.4 (DAAM's rule); pointing: the map's maximum
  falls inside the mask. (a) on generated images, against the mask the detector finds for the
  object the words name (objects it does not find are skipped); (b) on dataset images with
  exact masks: the image is noised to t = 250, 500 and 750 (same noise) and one conditional
  pass at each t is recorded and summed.
- Edit response: one-object prompts, weight 0, 0.5, 1, 2, 4 on the colour or the shape word, in
  both weight modes (with the word faded out of the other words' states, `weight_context`): how
  often the attribute is present, how often any object is drawn at all, the area the objects
  cover, and the word's share of the cross-attention mass.
- Samplers: a mixed set of single-object and position prompts with each sampler at 5, 10, 20
  and 50 steps, against DPM-Solver++ at 250 steps.

`colour_at_position` is the analytic check of bench/heldout_positions.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .attention_control import AttentionRecorder
from .config import DEFAULT_SAMPLER, WEIGHT_CONTEXTS
from .shapes import (BACKGROUND, COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, Scene, ShapesDataset,
                   parse_holdout)
from .detector import Detection, detect, detector_accuracy
from .errors import UserError
from .images import font, uint8_images
from .pipeline import SAMPLERS, Weighting
from .prompts import parse_prompt

_PALETTE = np.array(list(COLOURS.values()) + [BACKGROUND], dtype=np.float32)  # (K, 3)

EVAL_SEED = 1_000_003  # scenes for evaluation; training uses data.seed (0 by default)
CATEGORIES = ("single object", "two objects", "three objects", "colour binding", "position", "counting",
              "held-out pairs")
RELATIONS = ("to the left of", "to the right of", "above", "below")
EDIT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
WEIGHT_ZERO_TARGET = 0.10  # issue 4: the colour at most this often with weight 0 on its word
SAMPLER_STEPS = (5, 10, 20, 50)
REFERENCE = ("dpm++", 250)
IOU_THRESHOLD = 0.4
LOCALISATION_TIMESTEPS = (250, 500, 750)

# report key -> the least value the default model should reach (README, issue 4)
TARGETS = {
    "faithfulness/single object": 0.99,
    "faithfulness/colour binding": 0.95,
    "faithfulness/three objects": 0.85,
    "faithfulness/position": 0.95,
    "faithfulness/counting": 0.90,
    "faithfulness/held-out pairs": 0.80,
    "localisation/dataset/shape miou": 0.70,
    "localisation/dataset/shape pointing": 0.95,
    "localisation/dataset/colour pointing": 0.90,
}


# ---- the analytic colour check (bench/heldout_positions.py) ---------------------------------

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


# ---- maps against masks ---------------------------------------------------------------------

def map_iou(word_map: np.ndarray, mask: np.ndarray, threshold: float = IOU_THRESHOLD) -> float:
    """IoU of the map's region (values >= threshold x its maximum) with a boolean mask."""
    top = float(word_map.max())
    region = word_map >= threshold * top if top > 0 else np.zeros(mask.shape, bool)
    union = np.logical_or(region, mask).sum()
    return float(np.logical_and(region, mask).sum() / union) if union else 0.0


def pointing(word_map: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum (its first, in row-major order) lies inside the mask."""
    y, x = np.unravel_index(int(np.argmax(word_map)), word_map.shape)
    return bool(mask[y, x])


def span_map(token_maps: torch.Tensor, offsets: torch.Tensor, span: tuple[int, int]) -> np.ndarray:
    """(T, R, R) token maps, (T, 2) character offsets -> (R, R) sum over the tokens of `span`."""
    begin, end = offsets[:, 0], offsets[:, 1]
    tokens = (begin < span[1]) & (end > span[0]) & (end > begin)
    return token_maps[tokens].sum(0).numpy()


class _Localisation:
    """Running IoU and pointing of colour and shape words."""

    def __init__(self):
        self.values = {f"{kind} {metric}": [] for kind in ("colour", "shape") for metric in ("iou", "pointing")}

    def add(self, kind: str, word_map: np.ndarray, mask: np.ndarray) -> None:
        if mask.any():
            self.values[f"{kind} iou"].append(map_iou(word_map, mask))
            self.values[f"{kind} pointing"].append(float(pointing(word_map, mask)))

    def summary(self) -> dict:
        out = {}
        for kind in ("shape", "colour"):
            ious, hits = self.values[f"{kind} iou"], self.values[f"{kind} pointing"]
            out[f"{kind} miou"] = float(np.mean(ious)) if ious else None
            out[f"{kind} pointing"] = float(np.mean(hits)) if hits else None
            out[f"{kind} words"] = len(ious)
        return out


# ---- prompts and their conditions -----------------------------------------------------------

@dataclass
class Case:
    category: str
    scene: Scene

    @property
    def prompt(self) -> str:
        return self.scene.caption


def stated_positions(scene: Scene) -> list[tuple]:
    """What a caption says about places: ("at", k, position) for absolute phrases and
    ("relation", a, b, phrase) for "a <phrase> b"; empty when it places nothing."""
    caption = scene.caption
    for phrase in RELATIONS:
        if f" {phrase} " in caption:
            first, second = sorted(range(len(scene.objects)), key=lambda k: scene.phrase_spans[k][0])
            return [("relation", first, second, phrase)]
    return [("at", k, obj.position) for k, obj in enumerate(scene.objects)
            if POSITION_PHRASES[obj.position] in caption]


def _relation_holds(a: Detection, b: Detection, phrase: str) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    return {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by, "below": ay > by}[phrase]


def _keep(category: str, scene: Scene) -> bool:
    objects = scene.objects
    if category == "colour binding":
        return len({o.colour for o in objects}) == 2 and len({o.shape for o in objects}) == 2
    if category == "position":
        return bool(stated_positions(scene))
    return True


_OBJECTS = {"single object": (1, 1), "two objects": (2, 2), "three objects": (3, 3), "colour binding": (2, 2),
            "position": (1, 2), "counting": (1, 4), "held-out pairs": (1, 1)}


def category_cases(category: str, n: int, seed: int, resolution: int, holdout: list[str]) -> list[Case]:
    """`n` scenes of `category` from the shapes generator (seed disjoint from training); empty
    for "held-out pairs" when the model holds nothing out."""
    if category == "held-out pairs" and not parse_holdout(holdout):
        return []
    low, high = _OBJECTS[category]
    dataset = ShapesDataset(resolution, num_samples=100 * n + 1000, min_objects=low, max_objects=high,
                            seed=seed + CATEGORIES.index(category), holdout=holdout,
                            holdout_mode="only" if category == "held-out pairs" else "exclude")
    cases, i = [], 0
    while len(cases) < n:
        scene = dataset.scene(i)
        if _keep(category, scene):
            cases.append(Case(category, scene))
        i += 1
    return cases


def match_objects(scene: Scene, detections: list[Detection], by_colour: bool = True) -> list[Detection | None]:
    """Each named object takes an unused detection of its shape (and colour), the nearest to where
    the generator would draw it; None when none is left."""
    used, matched = set(), []
    for obj in scene.objects:
        options = [k for k, d in enumerate(detections) if k not in used and d.shape == obj.shape
                   and (not by_colour or d.colour == obj.colour)]
        if not options:
            matched.append(None)
            continue
        best = min(options, key=lambda k: math.dist(detections[k].center, obj.center))
        used.add(best)
        matched.append(detections[best])
    return matched


def passes(case: Case, detections: list[Detection]) -> bool:
    """Whether every condition the prompt states holds in the detected objects."""
    scene = case.scene
    if case.category == "counting":
        return len(detections) == len(scene.objects)
    by_colour = case.category not in ("two objects", "three objects")
    matched = match_objects(scene, detections, by_colour)
    if any(m is None for m in matched):
        return False
    if case.category == "position":
        for fact in stated_positions(scene):
            if fact[0] == "at" and matched[fact[1]].position != fact[2]:
                return False
            if fact[0] == "relation" and not _relation_holds(matched[fact[1]], matched[fact[2]], fact[3]):
                return False
    return True


# ---- sampling -------------------------------------------------------------------------------

def _sample(pipe, prompts: list[str], seed: int, batch_size: int, maps: bool = False, sampler: str = DEFAULT_SAMPLER,
            steps: int = 20, guidance: float = 3.0, progress=None, weighting=None, negative_prompts=None):
    """Images (uint8 arrays) for `prompts` (weighting syntax allowed), prompt k with noise seed
    `seed + k` (and negative prompt k, if given); with `maps`, also (T, R, R) token maps and
    (T, 2) offsets per image."""
    images, token_maps, offsets = [], [], []
    for start in range(0, len(prompts), batch_size):
        parsed = [parse_prompt(p) for p in prompts[start:start + batch_size]]
        negatives = None if negative_prompts is None else list(negative_prompts[start:start + batch_size])
        settings = {"steps": steps, "guidance": guidance, "sampler": sampler, "negative_prompt": negatives}
        seeds = [seed + start + k for k in range(len(parsed))]
        recorder = AttentionRecorder(pipe.unet.config.sample_size) if maps else None
        x, _ = pipe.sample_batch(parsed, seeds, settings, None, weighting or Weighting(), recorder)
        images += list(uint8_images(x))
        texts = [p.text for p in parsed]
        if maps:
            token_maps += list(recorder.token_maps().cpu())
            offsets += list(pipe.text_encoder.tokenize(texts)["offsets"])
        if progress is not None:
            progress.update(len(parsed))
    return images, token_maps, offsets


# ---- the report ----------------------------------------------------------------------------

def faithfulness(pipe, cases_by_category: dict, seed: int, batch_size: int, progress,
                 guidance: float = 3.0, sampler: str = DEFAULT_SAMPLER) -> tuple[dict, dict, list]:
    """Scores per category, localisation on the generated images, and a few examples per category."""
    scores, localisation, examples = {}, _Localisation(), []
    for category, cases in cases_by_category.items():
        if not cases:
            scores[category] = None
            continue
        images, token_maps, offsets = _sample(pipe, [c.prompt for c in cases], seed, batch_size, maps=True,
                                              guidance=guidance, sampler=sampler, progress=progress)
        results = []
        for case, image, maps, offs in zip(cases, images, token_maps, offsets):
            detections = detect(image)
            ok = passes(case, detections)
            results.append(ok)
            if category != "counting":
                for k, det in enumerate(match_objects(case.scene, detections)):
                    if det is not None:
                        localisation.add("colour", span_map(maps, offs, case.scene.colour_spans[k]), det.mask)
                        localisation.add("shape", span_map(maps, offs, case.scene.shape_spans[k]), det.mask)
        scores[category] = {"score": float(np.mean(results)), "n": len(results)}
        if category == "counting":  # which counts fail
            by_count = {}
            for case, ok in zip(cases, results):
                by_count.setdefault(len(case.scene.objects), []).append(ok)
            scores[category]["by_count"] = {str(k): {"score": float(np.mean(v)), "n": len(v)}
                                            for k, v in sorted(by_count.items())}
        examples += [(Image.fromarray(image), f"{'ok' if ok else 'MISS'}: {case.prompt}")
                     for case, image, ok in list(zip(cases, images, results))[:4]]
    return scores, localisation.summary(), examples


@torch.no_grad()
def dataset_localisation(pipe, n: int, seed: int, holdout: list[str], batch_size: int) -> dict:
    """Maps of one conditional pass per noise level on dataset images, against exact masks."""
    resolution = pipe.unet.config.sample_size
    dataset = ShapesDataset(resolution, num_samples=n, min_objects=1, max_objects=2, seed=seed + 100,
                            holdout=holdout)
    scheduler = DDPMScheduler.from_config(pipe.scheduler_config)
    localisation = _Localisation()
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        samples = [dataset.sample(i) for i in range(start, min(n, start + batch_size))]
        captions = [s.scene.caption for s in samples]
        x0 = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples]).float() / 127.5 - 1
        noise = torch.randn(x0.shape, generator=generator)
        embeddings, key_mask = pipe.text_encoder.encode(captions)
        dtype = next(pipe.unet.parameters()).dtype
        recorder = AttentionRecorder(resolution)
        for t in LOCALISATION_TIMESTEPS:
            timesteps = torch.full((len(samples),), t)
            noisy = scheduler.add_noise(x0, noise, timesteps).to(pipe.device, dtype)
            with pipe.autocast():
                pipe.unet(noisy, timesteps.to(pipe.device), embeddings.to(pipe.device, dtype),
                          key_mask.to(pipe.device), attention_controller=recorder)
        token_maps = recorder.token_maps().cpu()
        offsets = pipe.text_encoder.tokenize(captions)["offsets"]
        for sample, maps, offs in zip(samples, token_maps, offsets):
            for k in range(len(sample.scene.objects)):
                localisation.add("colour", span_map(maps, offs, sample.scene.colour_spans[k]), sample.masks[k])
                localisation.add("shape", span_map(maps, offs, sample.scene.shape_spans[k]), sample.masks[k])
    return localisation.summary()


def edit_prompts(n: int, seed: int, holdout: list[str]) -> list[Scene]:
    """`n` one-object scenes "a <colour> <shape> <position>" of training pairs."""
    held = parse_holdout(holdout)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    rng = np.random.default_rng(seed + 200)
    out = []
    for _ in range(n):
        colour, shape = pairs[rng.integers(len(pairs))]
        position = list(POSITION_PHRASES)[rng.integers(len(POSITION_PHRASES))]
        article = "an" if colour[0] in "aeiou" else "a"
        out.append((colour, shape, f"{article} {colour} {shape} {POSITION_PHRASES[position]}"))
    return out


def edit_response(pipe, n: int, seed: int, holdout: list[str], batch_size: int, progress,
                  guidance: float = 3.0, sampler: str = DEFAULT_SAMPLER, context: str = WEIGHT_CONTEXTS[0]) -> list[dict]:
    """Rows (word, mode, weight, present, drawn, area, mass) averaged over `n` prompts: `drawn` is
    the share of images with any object at all, so an attribute that is absent because nothing
    was drawn is told apart from one replaced by another. Image k of every setting uses the same
    noise, so rows differ only by the weight. `context`: as `Weighting.context`."""
    prompts = edit_prompts(n, seed, holdout)
    rows = []
    plain = None
    for word in ("colour", "shape"):
        for mode in ("attention", "embedding"):
            for weight in EDIT_WEIGHTS:
                texts = []
                for colour, shape, text in prompts:
                    target = colour if word == "colour" else shape
                    texts.append(text.replace(f" {target}", f" ({target}:{weight:g})", 1))
                if weight == 1.0 and plain is not None:
                    images, token_maps, offsets = plain
                else:
                    images, token_maps, offsets = _sample(pipe, texts, seed, batch_size, maps=True, progress=progress, guidance=guidance,
                                                          sampler=sampler, weighting=Weighting(mode=mode, context=context))
                    if weight == 1.0:
                        plain = images, token_maps, offsets
                present, drawn, area, mass = [], [], [], []
                for (colour, shape, text), image, maps, offs in zip(prompts, images, token_maps, offsets):
                    detections = detect(image)
                    target = colour if word == "colour" else shape
                    present.append(any((d.colour if word == "colour" else d.shape) == target for d in detections))
                    drawn.append(bool(detections))
                    area.append(sum(d.area for d in detections) / image.shape[0] / image.shape[1])
                    start = text.index(f" {target}") + 1
                    mass.append(float(span_map(maps, offs, (start, start + len(target))).mean()))
                rows.append({"word": word, "mode": mode, "weight": weight, "present": float(np.mean(present)),
                             "drawn": float(np.mean(drawn)), "area": float(np.mean(area)), "mass": float(np.mean(mass))})
    return rows


def edit_baseline(pipe, n: int, seed: int, holdout: list[str], batch_size: int, progress,
                  guidance: float = 3.0, sampler: str = DEFAULT_SAMPLER) -> dict:
    """How often the edit prompts' colour (shape) is present when the word is deleted from the
    prompt: the model's own prior for it, the floor a weight of 0 reaches by removing the word.
    And, under "negative", when the deleted word is also the negative prompt, which guidance
    pushes away from. Same prompts and noise as `edit_response`."""
    prompts = edit_prompts(n, seed, holdout)
    out = {"n": n, "negative": {}}
    for word in ("colour", "shape"):  # also the names of a Detection's attributes
        named = [colour if word == "colour" else shape for colour, shape, _ in prompts]
        texts = [text.replace(f" {target}", "", 1) for target, (_, _, text) in zip(named, prompts)]
        for negatives, where in ((None, out), (named, out["negative"])):
            images, _, _ = _sample(pipe, texts, seed, batch_size, progress=progress, guidance=guidance,
                                   sampler=sampler, negative_prompts=negatives)
            where[word] = float(np.mean([any(getattr(d, word) == target for d in detect(image))
                                         for target, image in zip(named, images)]))
    return out


def sampler_sweep(pipe, cases: list[Case], seed: int, batch_size: int, progress, guidance: float = 3.0) -> dict:
    """Faithfulness of each sampler and step count on `cases`, and of the reference."""
    def score(sampler, steps):
        images, _, _ = _sample(pipe, [c.prompt for c in cases], seed, batch_size, sampler=sampler, steps=steps,
                               guidance=guidance, progress=progress)
        return float(np.mean([passes(c, detect(im)) for c, im in zip(cases, images)]))

    reference = score(*REFERENCE)
    table = {name: {str(steps): score(name, steps) for steps in SAMPLER_STEPS} for name in SAMPLERS}
    return {"reference": {"sampler": REFERENCE[0], "steps": REFERENCE[1], "score": reference},
            "n": len(cases), "scores": table}


def evaluate(pipe, n: int = 100, seed: int = EVAL_SEED, holdout: list[str] | None = None, training_seed: int = 0,
             n_edit: int = 16, n_samplers: int = 20, batch_size: int = 50, detector_n: int = 300, guidance: float = 3.0,
             parts: tuple[str, ...] = ("faithfulness", "localisation", "edit", "samplers"),
             sampler: str = DEFAULT_SAMPLER, weight_context: str = WEIGHT_CONTEXTS[0],
             categories: tuple[str, ...] | None = None) -> tuple[dict, list]:
    """The whole report as a JSON-ready dict, plus example (image, label) pairs for a grid.
    `categories`: the faithfulness categories scored (None: all); the others are left out of the
    report (their targets read "not measured")."""
    categories = CATEGORIES if categories is None else tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        what = f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}" if unknown \
            else "no category given"
        raise UserError(f"{what}; choose from {', '.join(CATEGORIES)}")
    if seed == training_seed:
        raise UserError(f"evaluation seed {seed} is the training data seed; choose another --seed")
    holdout = list(holdout or [])
    resolution = pipe.unet.config.sample_size
    started = time.time()
    report = {"n": n, "seed": seed, "resolution": resolution, "holdout": holdout, "guidance": guidance,
              "sampler": sampler,
              "mixed_precision": pipe.mixed_precision}
    report["detector"] = detector_accuracy(n=detector_n, seed=seed + 300, resolution=resolution)
    examples = []
    cases = {c: category_cases(c, n, seed, resolution, holdout) for c in CATEGORIES if c in categories}
    total = 0
    if "faithfulness" in parts:
        total += sum(len(c) for c in cases.values())
    if "edit" in parts:
        total += n_edit * (len(EDIT_WEIGHTS) * 4 - 3 + 4)  # weight 1 sampled once; deleted and negative, per word
    sweep_cases = []
    if "samplers" in parts:
        half = n_samplers // 2
        sweep = {c: cases.get(c) or category_cases(c, n, seed, resolution, holdout) for c in ("single object", "position")}
        sweep_cases = sweep["single object"][:half] + sweep["position"][:n_samplers - half]
        total += len(sweep_cases) * (1 + 4 * len(SAMPLER_STEPS))
    progress = tqdm(total=total, desc="evaluating (images)", dynamic_ncols=True)
    if "faithfulness" in parts:
        report["faithfulness"], generated, examples = faithfulness(pipe, cases, seed, batch_size, progress, guidance, sampler)
        report["localisation"] = {"generated": generated}
    if "localisation" in parts:
        report.setdefault("localisation", {})["dataset"] = dataset_localisation(pipe, n, seed, holdout, batch_size)
    if "edit" in parts:
        report["weight_context"] = weight_context
        report["edit_response"] = edit_response(pipe, n_edit, seed, holdout, batch_size, progress, guidance, sampler,
                                                weight_context)
        report["edit_baseline"] = edit_baseline(pipe, n_edit, seed, holdout, batch_size, progress, guidance, sampler)
    if "samplers" in parts:
        report["samplers"] = sampler_sweep(pipe, sweep_cases, seed, batch_size, progress, guidance)
    progress.close()
    report["targets"] = targets(report)
    report["seconds"] = round(time.time() - started, 1)
    return report, examples


def _lookup(report: dict, key: str):
    node = report
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node["score"] if isinstance(node, dict) and "score" in node else node


def targets(report: dict) -> dict:
    """Each target with the measured value and whether it is met (None when not measured).
    Scores are fractions k/n, so a score that equals a goal must meet it: the comparisons allow
    1e-9 of float error (0.85 - 0.83 is 0.020000000000000018)."""
    eps = 1e-9
    out = {}
    for key, target in TARGETS.items():
        value = _lookup(report, key)
        out[key] = {"value": value, "target": target, "met": None if value is None else value >= target - eps}
    rows = [r for r in report.get("edit_response", []) if r["word"] == "colour"]
    for mode in ("embedding", "attention"):
        zero = [r for r in rows if r["weight"] == 0 and r["mode"] == mode]
        if zero:
            key = f"edit/colour weight 0 present, {mode} mode (at most)"
            out[key] = {"value": zero[0]["present"], "target": WEIGHT_ZERO_TARGET,
                        "met": zero[0]["present"] <= WEIGHT_ZERO_TARGET + eps}
            if "drawn" in zero[0]:  # a colour absent because nothing was drawn is not an edit
                out[key]["object drawn"] = zero[0]["drawn"]
            if "edit_baseline" in report:  # the word deleted: the model's own rate for that colour
                out[key]["word deleted"] = report["edit_baseline"]["colour"]
                if "negative" in report["edit_baseline"]:
                    out[key]["word deleted, as negative prompt"] = report["edit_baseline"]["negative"]["colour"]
    if rows:
        attention = sorted((r["weight"], r["mass"]) for r in rows if r["mode"] == "attention")
        monotone = all(a[1] <= b[1] for a, b in zip(attention, attention[1:]))
        out["edit/attention mode mass monotone in weight"] = {"value": monotone, "target": True, "met": monotone}
    sweep = report.get("samplers")
    if sweep:
        gap = abs(sweep["scores"]["dpm++"]["20"] - sweep["reference"]["score"])
        out["samplers/dpm++ 20 steps gap to reference (at most)"] = {"value": gap, "target": 0.02,
                                                                      "met": gap <= 0.02 + eps}
    return out


# ---- presenting it -------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


SAMPLER_LABELS = {"dpm++": "DPM-Solver++ 2M", "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler"}


def format_report(report: dict) -> str:
    lines = [f"evaluation: n={report['n']} per category, seed {report['seed']}, {report['resolution']} px, "
             f"guidance {report.get('guidance', 3.0):g}, {SAMPLER_LABELS[report.get('sampler', 'dpm++')]} 20 steps, "
             f"mixed precision {report.get('mixed_precision', 'no')}, {report.get('seconds', 0):.0f} s", ""]
    lines.append("detector accuracy on generator images: " +
                 ", ".join(f"{k} {v:.3f}" for k, v in report["detector"].items() if k != "n"))
    if "faithfulness" in report:
        lines += ["", f"{'faithfulness':<20} {'score':>6} {'n':>5}"]
        for category, value in report["faithfulness"].items():
            lines.append(f"{category:<20} {_fmt(value and value['score']):>6} {value['n'] if value else 0:>5}")
            for count, part in ((value or {}).get("by_count") or {}).items():
                lines.append(f"  {count} object(s){'':<8} {part['score']:>6.3f} {part['n']:>5}")
    for where, values in report.get("localisation", {}).items():
        lines += ["", f"localisation ({where}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())]
    if "edit_response" in report:
        lines += ["", f"edit response (weight context: {report.get('weight_context', 'not recorded')})",
                  f"{'edit word':<10} {'mode':<10} {'weight':>6} {'present':>8} {'drawn':>6} {'area':>6} {'mass':>6}"]
        for r in report["edit_response"]:
            lines.append(f"{r['word']:<10} {r['mode']:<10} {r['weight']:>6g} {r['present']:>8.3f} "
                         f"{r.get('drawn', float('nan')):>6.3f} {r['area']:>6.3f} {r['mass']:>6.3f}")
    if "edit_baseline" in report:
        base = report["edit_baseline"]
        lines.append(f"word deleted from the prompt: colour present {base['colour']:.3f}, shape present "
                     f"{base['shape']:.3f} (the model's prior; weight 0 removing the word lands here)")
        if "negative" in base:
            lines.append(f"word deleted and given as the negative prompt: colour present {base['negative']['colour']:.3f}, "
                         f"shape present {base['negative']['shape']:.3f}")
    if "samplers" in report:
        sweep = report["samplers"]
        lines += ["", f"samplers (n={sweep['n']}; reference {sweep['reference']['sampler']} "
                      f"{sweep['reference']['steps']} steps: {sweep['reference']['score']:.3f})",
                  f"{'sampler':<8} " + " ".join(f"{s:>6}" for s in SAMPLER_STEPS)]
        for name, scores in sweep["scores"].items():
            lines.append(f"{name:<8} " + " ".join(f"{scores[str(s)]:>6.3f}" for s in SAMPLER_STEPS))
    lines += ["", f"{'target':<58} {'value':>6} {'goal':>6} met"]
    for key, t in report["targets"].items():
        line = f"{key:<58} {_fmt(t['value']):>6} {_fmt(t['target']):>6} {_fmt(t['met'])}"
        if "object drawn" in t:  # a colour can be absent because nothing was drawn at all
            line += f" (an object drawn in {t['object drawn']:.2f}"
            line += f"; word deleted {t['word deleted']:.2f})" if "word deleted" in t else ")"
        lines.append(line)
    return "\n".join(lines)


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, fill, dash: int = 5) -> None:
    for x in range(int(x0), int(x1), 2 * dash):
        draw.line([x, y, min(x + dash, x1), y], fill=fill, width=1)


def edit_plot(rows: list[dict], baseline: dict | None = None, width: int = 720, height: int = 240) -> Image.Image:
    """Three small line charts (present, area, mass against the weight), one line per word and
    mode. With `baseline` (`edit_baseline`), the present chart also shows, dashed, how often each
    attribute is present with its word deleted (the floor weight 0 reaches by removing the word)
    and the weight-0 target for the colour word."""
    styles = {("colour", "attention"): (220, 50, 50), ("colour", "embedding"): (240, 150, 150),
              ("shape", "attention"): (40, 80, 220), ("shape", "embedding"): (140, 170, 240)}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    label_font = font(11)
    panel_w = width // 3
    left, top, bottom = 40, 24, height - 56
    for p, metric in enumerate(("present", "area", "mass")):
        x0, x1 = p * panel_w + left, (p + 1) * panel_w - 12
        top_value = max([r[metric] for r in rows] + [1e-9]) if metric != "present" else 1.0
        draw.rectangle([x0, top, x1, bottom], outline=(160, 160, 160))
        draw.text((x0, 4), f"{metric} vs weight", fill="black", font=label_font)
        draw.text((x0 - 36, top - 6), f"{top_value:.2g}", fill="black", font=label_font)
        draw.text((x0 - 12, bottom - 6), "0", fill="black", font=label_font)
        def xy(weight, value):
            return (x0 + (x1 - x0) * weight / max(EDIT_WEIGHTS), bottom - (bottom - top) * value / top_value)
        for w in EDIT_WEIGHTS:
            draw.text((xy(w, 0)[0] - 6, bottom + 2), f"{w:g}", fill="black", font=label_font)
        if metric == "present" and baseline is not None:
            floors = [(baseline["colour"], (150, 20, 20), "colour word deleted"),
                      (baseline["shape"], (20, 40, 150), "shape word deleted"),
                      (WEIGHT_ZERO_TARGET, (120, 120, 120), "weight-0 target, colour")]
            for k, (value, colour, label) in enumerate(floors):
                _dashed(draw, x0, x1, xy(0, value)[1], colour)
                x = 10 + k * (width // 4)
                _dashed(draw, x, x + 20, height - 32, colour, dash=3)
                draw.text((x + 24, height - 38), f"{label} ({value:.2f})", fill="black", font=label_font)
        for (word, mode), colour in styles.items():
            points = [xy(r["weight"], r[metric]) for r in rows if r["word"] == word and r["mode"] == mode]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for k, ((word, mode), colour) in enumerate(styles.items()):
        x = 10 + k * (width // 4)
        draw.line([x, height - 14, x + 20, height - 14], fill=colour, width=3)
        draw.text((x + 24, height - 20), f"{word} word, {mode}", fill="black", font=label_font)
    return image

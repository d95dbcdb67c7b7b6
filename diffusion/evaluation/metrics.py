"""Measuring a model on shapes prompts: faithfulness, attention localisation and samplers
(edits: edits.py; the whole report: report.py, the command line: evaluate.py).

Every number comes from images the model draws for prompts of the shapes generator with a seed
disjoint from training, read back by the project's detector (detector.py, whose own accuracy on
real generator images is part of the report). Faithfulness samples as `sample.py` does by
default (Euler, 20 steps, guidance 3; the `SamplingSettings` of an `EvaluationRun` choose others).

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
- Samplers: a mixed set of single-object and position prompts with each sampler at 5, 10, 20
  and 50 steps, against DPM-Solver++ at 250 steps.

"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from diffusion.control.controllers import AttentionRecorder
from diffusion.control.prompts import parse_prompt
from diffusion.data.shapes import POSITION_PHRASES, Scene, ShapesDataset, parse_holdout
from diffusion.evaluation.detector import Detection, detect
from diffusion.images import uint8_images
from diffusion.sampling.samplers import SAMPLERS
from diffusion.sampling.settings import SamplingSettings

EVAL_SEED = 1_000_003  # scenes for evaluation; training uses data.seed (0 by default)
CATEGORIES = (
    "single object",
    "two objects",
    "three objects",
    "colour binding",
    "position",
    "counting",
    "held-out pairs",
)
RELATIONS = ("to the left of", "to the right of", "above", "below")
SAMPLER_STEPS = (5, 10, 20, 50)
REFERENCE = ("dpm++", 250)
IOU_THRESHOLD = 0.4
LOCALISATION_TIMESTEPS = (250, 500, 750)

# report key -> the least value the default model should reach
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
    return [("at", k, obj.position) for k, obj in enumerate(scene.objects) if POSITION_PHRASES[obj.position] in caption]


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


_OBJECTS = {
    "single object": (1, 1),
    "two objects": (2, 2),
    "three objects": (3, 3),
    "colour binding": (2, 2),
    "position": (1, 2),
    "counting": (1, 4),
    "held-out pairs": (1, 1),
}


def category_cases(category: str, n: int, seed: int, resolution: int, holdout: list[str]) -> list[Case]:
    """`n` scenes of `category` from the shapes generator (seed disjoint from training); empty
    for "held-out pairs" when the model holds nothing out."""
    if category == "held-out pairs" and not parse_holdout(holdout):
        return []
    low, high = _OBJECTS[category]
    dataset = ShapesDataset(
        resolution,
        num_samples=100 * n + 1000,
        min_objects=low,
        max_objects=high,
        object_weights=None,
        seed=seed + CATEGORIES.index(category),
        holdout=holdout,
        holdout_mode="only" if category == "held-out pairs" else "exclude",
    )
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
        options = [
            k
            for k, d in enumerate(detections)
            if k not in used and d.shape == obj.shape and (not by_colour or d.colour == obj.colour)
        ]
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


@dataclass(frozen=True)
class EvaluationRun:
    """What every part of the evaluation samples with, in one object that each part takes.

    pipe: the `Pipeline`; settings: the sampling settings of every image (a part changes only what
    it measures: the sampler sweep its sampler and steps, the edit part its weight mode, the swap
    its edit steps); seed: the scene seed, prompt k of a list drawn from noise seed `seed + k`
    (disjoint from training); batch_size: images denoised together (it does not change them);
    holdout: the model's held-out colour-shape pairs ("red square"), which the scenes leave out or
    keep to; progress: a tqdm bar the images are counted on (None: none)."""

    pipe: Any
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int = EVAL_SEED
    batch_size: int = 50
    holdout: list[str] = field(default_factory=list)
    progress: Any = None

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size

    def but(self, **changes) -> EvaluationRun:
        """A copy with `changes` (field names of this class)."""
        return dataclasses.replace(self, **changes)

    def sampling(self, **changes) -> EvaluationRun:
        """A copy whose settings have `changes` (field names of `SamplingSettings`)."""
        return self.but(settings=self.settings.but(**changes))


def sample_batches(run: EvaluationRun, prompts: list[str], maps: bool = False):
    """Yields, batch by batch, the images (uint8 arrays) of `prompts` (weighting syntax allowed),
    prompt k with noise seed `run.seed + k` (and negative prompt k, when the settings give one per
    prompt); with `maps`, also the (T, R, R) token maps and (T, 2) offsets of each image (else
    empty lists)."""
    settings, batch_size = run.settings, run.batch_size
    for start in range(0, len(prompts), batch_size):
        parsed = [parse_prompt(p) for p in prompts[start : start + batch_size]]
        if isinstance(settings.negative_prompt, list):  # one per prompt: this batch's
            batch_settings = settings.but(negative_prompt=settings.negative_prompt[start : start + batch_size])
        else:
            batch_settings = settings
        seeds = [run.seed + start + k for k in range(len(parsed))]
        recorder = AttentionRecorder(run.resolution) if maps else None
        x, _ = run.pipe.sample_batch(parsed, seeds, batch_settings, None, recorder)
        token_maps, offsets = [], []
        if maps:
            token_maps = list(recorder.token_maps().cpu())
            offsets = list(run.pipe.encoder.offsets([p.text for p in parsed]))
        if run.progress is not None:
            run.progress.update(len(parsed))
        yield list(uint8_images(x)), token_maps, offsets


class Sampled(NamedTuple):
    """`sample_images`' result: one entry per prompt in each list."""

    images: list[np.ndarray]  # (R, R, 3) uint8
    token_maps: list[torch.Tensor]  # (T, R, R); empty without maps
    offsets: list[torch.Tensor]  # (T, 2); empty without maps


def sample_images(run: EvaluationRun, prompts: list[str], maps: bool = False) -> Sampled:
    """`sample_batches` gathered."""
    sampled = Sampled([], [], [])
    for images, token_maps, offsets in sample_batches(run, prompts, maps):
        sampled.images.extend(images)
        sampled.token_maps.extend(token_maps)
        sampled.offsets.extend(offsets)
    return sampled


# ---- the report ----------------------------------------------------------------------------


class Faithfulness(NamedTuple):
    """`faithfulness`' result."""

    scores: dict  # category -> {"score", "n"} (counting also "by_count"); None for a category with no scenes
    localisation: dict  # the maps of the generated images against the detector's masks (`_Localisation`)
    examples: list  # (image, label) pairs: the first few of each category, labelled ok or MISS


def faithfulness(run: EvaluationRun, cases_by_category: dict[str, list[Case]]) -> Faithfulness:
    """Scores per category, localisation on the generated images, and a few examples per category."""
    scores, localisation, examples = {}, _Localisation(), []
    for category, cases in cases_by_category.items():
        if not cases:
            scores[category] = None
            continue
        results = []  # scored batch by batch: memory does not grow with the number of prompts
        for images, token_maps, offsets in sample_batches(run, [c.prompt for c in cases], maps=True):
            for image, maps, offs in zip(images, token_maps, offsets):
                case = cases[len(results)]
                detections = detect(image)
                results.append(passes(case, detections))
                if len(results) <= 4:
                    examples.append((Image.fromarray(image), f"{'ok' if results[-1] else 'MISS'}: {case.prompt}"))
                if category != "counting":
                    for k, det in enumerate(match_objects(case.scene, detections)):
                        if det is not None:
                            localisation.add("colour", span_map(maps, offs, case.scene.colour_spans[k]), det.mask)
                            localisation.add("shape", span_map(maps, offs, case.scene.shape_spans[k]), det.mask)
        scores[category] = {"score": float(np.mean(results)), "n": len(results)}
        if category == "counting":
            scores[category]["by_count"] = _by_count(cases, results)
    return Faithfulness(scores, localisation.summary(), examples)


def _by_count(cases: list[Case], results: list[bool]) -> dict:
    """The counting score split by the number of objects the prompt names: which counts fail."""
    by_count = {}
    for case, ok in zip(cases, results):
        by_count.setdefault(len(case.scene.objects), []).append(ok)
    return {str(k): {"score": float(np.mean(v)), "n": len(v)} for k, v in sorted(by_count.items())}


@torch.no_grad()
def dataset_localisation(run: EvaluationRun, n: int) -> dict:
    """Maps of one conditional pass per noise level on `n` dataset images, against exact masks."""
    pipe, seed, batch_size, resolution, holdout = run.pipe, run.seed, run.batch_size, run.resolution, run.holdout
    dataset = ShapesDataset(
        resolution, num_samples=n, min_objects=1, max_objects=2, object_weights=None, seed=seed + 100, holdout=holdout
    )
    scheduler = DDPMScheduler.from_config(pipe.scheduler_config)
    localisation = _Localisation()
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        samples = [dataset.sample(i) for i in range(start, min(n, start + batch_size))]
        captions = [s.scene.caption for s in samples]
        x0 = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples]).float() / 127.5 - 1
        noise = torch.randn(x0.shape, generator=generator)
        embeddings, key_mask = pipe.encoder.encode(captions)
        dtype = next(pipe.unet.parameters()).dtype
        recorder = AttentionRecorder(resolution)
        for t in LOCALISATION_TIMESTEPS:
            timesteps = torch.full((len(samples),), t)
            noisy = scheduler.add_noise(x0, noise, timesteps).to(pipe.device, dtype)
            with pipe.autocast():
                pipe.unet(
                    noisy,
                    timesteps.to(pipe.device),
                    embeddings.to(pipe.device, dtype),
                    key_mask.to(pipe.device),
                    attention_controller=recorder,
                )
        token_maps = recorder.token_maps().cpu()
        offsets = pipe.encoder.offsets(captions)
        for sample, maps, offs in zip(samples, token_maps, offsets):
            for k in range(len(sample.scene.objects)):
                localisation.add("colour", span_map(maps, offs, sample.scene.colour_spans[k]), sample.masks[k])
                localisation.add("shape", span_map(maps, offs, sample.scene.shape_spans[k]), sample.masks[k])
    return localisation.summary()


def sampler_sweep(run: EvaluationRun, cases: list[Case]) -> dict:
    """Faithfulness of each sampler and step count on `cases`, and of the reference; the other
    settings are the run's."""

    def score(sampler, steps):
        images = sample_images(run.sampling(sampler=sampler, steps=steps), [c.prompt for c in cases]).images
        return float(np.mean([passes(c, detect(im)) for c, im in zip(cases, images)]))

    reference = score(*REFERENCE)
    table = {name: {str(steps): score(name, steps) for steps in SAMPLER_STEPS} for name in SAMPLERS}
    return {
        "reference": {"sampler": REFERENCE[0], "steps": REFERENCE[1], "score": reference},
        "n": len(cases),
        "scores": table,
    }

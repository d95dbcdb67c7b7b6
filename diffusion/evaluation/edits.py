"""Measuring edits: what a word's weight does to the image, and what swapping a word changes.

Both sample one-word edits of shapes prompts (seed disjoint from training) and read every image
back with the detector. An object counts as *drawn* only if the image holds one clean object:
one colour, a shape the detector's templates explain, no stray paint around it
(`detector.is_clean_object`); an empty image, or a mottled blend of colours, is never a
successful edit.

Weight response (`weight_response`): one-object prompts "a red circle on the left", with weight
0, 0.5, 1, 1.5, 2 and 4 on the colour word or the shape word, in both weight modes, every
setting from the same noise. Per setting: how often the object is drawn, how often the named
attribute is present, the named attribute's area (its colour's pixels, or the area of objects of
its shape, as a fraction of the image), the word's share of the cross-attention, and the grain of
the background (`detector.grain`). Beside them, the same prompts with the word deleted: the
model's prior for that attribute, which a weight of 0 should fall back to. `weight_contract`
checks what a weight should mean:

- weight 0: an object drawn in at least 0.95 of the images, and, of the objects drawn, no more
  with the named attribute than with the word deleted, plus 0.05 (measured only when both draw
  an object in at least a quarter of the images: an empty image removes nothing);
- weights 0.5, 1, 1.5, 2: an object drawn and the attribute present, each in at least 0.95;
- the background at weight 2 at most 1.5 times as grainy as at weight 1;
- the attribute's area and the word's attention share rising with the weight from 0 to 2 (none
  below the one before by more than 5% of its value at weight 1: once the attribute is drawn
  whole its area stays, up to sampling noise).
Weight 4 is reported, not checked.

The prior (`prior_response`): what the model draws where the text names no colour. The
colour-deleted prompts ("a circle on the left") should draw one clean object, in colours spread
over the palette (each prompt over PRIOR_SEEDS noise seeds: the share of its most frequent
colour), and unconditional samples ("", guidance 1) should draw every object in one clean colour.

Word swap (`swap_response`): source prompts of one or two objects; one word of one object is
swapped (colour: red -> green; shape: circle -> triangle; size: small <-> large) or added
(refinement: "a circle" -> "a red circle"), and source and edit are drawn from the same noise
with Prompt-to-Prompt's attention injection for the first `edit_steps` of the steps. Pairs
whose source does not draw its objects are left out (the edit cannot keep a layout that is not
there; their number is reported). Per kind: the new attribute present on the edited object, the
old one gone, the edited object's mask IoU with the source's (its centre distance, for a
shape swap, whose mask must change), and the other objects' mask IoU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from diffusion.config import KEEP_LAYOUT
from diffusion.control.prompts import parse_prompt
from diffusion.data.shapes import COLOURS, POSITION_PHRASES, SHAPES, SIZES, Scene, ShapesDataset, parse_holdout
from diffusion.evaluation.detector import (
    MAX_FIT_ERROR,
    MAX_RESIDUAL,
    MAX_STRAY_FRACTION,
    MIN_COVERAGE,
    Detection,
    detect,
    grain,
    is_clean_object,
    pixel_colours,
    stray_pixels,
)
from diffusion.evaluation.metrics import EvaluationRun, match_objects, sample_images, span_map
from diffusion.images import uint8_images

WEIGHT_MODES_MEASURED = ("attention", "embedding")
EDIT_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 4.0)
CONTRACT_WEIGHTS = (0.5, 1.0, 1.5, 2.0)  # an object drawn and the attribute present at these
MONOTONE_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0)  # area and attention share rise over these
DRAWN_TARGET = 0.95
PRESENT_TARGET = 0.95
PRIOR_MARGIN = 0.05  # weight 0: the attribute at most this much more often than with the word deleted
PRIOR_MIN_DRAWN = 0.25  # ... compared only where both draw an object in at least this share of the images
GRAIN_RATIO = 1.5  # weight 2's grain at most this times weight 1's
RISE_SLACK = 0.05  # "rises": no value below the one before by more than this share of weight 1's

SWAP_KINDS = ("colour", "shape", "size", "add")
# What each scored swap pair is checked for; its rate over the pairs is reported per kind and edit steps
SWAP_MEASURES = (
    "new present",
    "old gone",
    "colour kept",
    "edited iou >= 0.8",
    "centre within 2 px",
    "others iou >= 0.9",
)
EDIT_STEPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# kind -> {measure: least rate}; size swaps and added words are reported, not targeted
SWAP_TARGETS = {
    "colour": {"new present": 0.95, "old gone": 0.95, "edited iou >= 0.8": 0.95, "others iou >= 0.9": 0.90},
    "shape": {"new present": 0.90, "colour kept": 0.95, "centre within 2 px": 0.90, "others iou >= 0.9": 0.90},
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(colour: str | None, shape: str, position: str, weighted: str | None = None, weight: float = 1.0) -> str:
    """ "a red circle on the left", with `weighted` ("colour" or "shape") written `(word:weight)`,
    and the colour left out when None ("a circle on the left"). The article agrees with the word
    after it."""
    words = ([colour] if colour else []) + [shape]
    first = words[0]
    if weighted is not None:
        index = 0 if weighted == "colour" else len(words) - 1
        words[index] = f"({words[index]}:{weight:g})"
    return f"{_article(first)} {' '.join(words)} {POSITION_PHRASES[position]}"


@dataclass(frozen=True)
class EditPrompt:
    colour: str
    shape: str
    position: str

    def text(self, weighted: str | None = None, weight: float = 1.0) -> str:
        return _phrase(self.colour, self.shape, self.position, weighted, weight)

    def deleted(self, word: str) -> str:
        """The prompt without its colour word ("a circle on the left") or shape word ("a red on the left" is
        not English, so the shape becomes the unnamed "shape": "a red shape on the left")."""
        if word == "colour":
            return _phrase(None, self.shape, self.position)
        return _phrase(self.colour, "shape", self.position)


def edit_prompts(n: int, seed: int, holdout: list[str]) -> list[EditPrompt]:
    """`n` one-object prompts of training colour-shape pairs at random positions."""
    held = parse_holdout(holdout)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    rng = np.random.default_rng(seed + 200)
    out = []
    for _ in range(n):
        colour, shape = pairs[rng.integers(len(pairs))]
        out.append(EditPrompt(colour, shape, list(POSITION_PHRASES)[rng.integers(len(POSITION_PHRASES))]))
    return out


def named_area(image: np.ndarray, detections: list[Detection], word: str, target: str) -> float:
    """The named attribute's area as a fraction of the image: the pixels of colour `target`
    (at least half covered, as the detector's objects), or the objects of shape `target`."""
    if word == "colour":
        colour, coverage, residual = pixel_colours(image)
        mine = (colour == list(COLOURS).index(target)) & (coverage >= MIN_COVERAGE) & (residual <= MAX_RESIDUAL)
        return float(mine.mean())
    return sum(d.area for d in detections if d.shape == target) / image.shape[0] / image.shape[1]


def _scores(prompts: list[EditPrompt], word: str, images, texts=None, token_maps=None, offsets=None) -> dict:
    """Drawn, present, area, grain (and, with maps, the word's attention share) over a setting's
    images; "named when drawn": of the images that draw a clean object, the share whose object has
    the named attribute (None if none does)."""
    drawn, present, area, grains, mass = [], [], [], [], []
    for k, (prompt, image) in enumerate(zip(prompts, images)):
        target = getattr(prompt, word)
        detections = detect(image)
        drawn.append(is_clean_object(image, detections))
        present.append(any(getattr(d, word) == target for d in detections))
        area.append(named_area(image, detections, word, target))
        grains.append(grain(image, detections))
        if token_maps is not None:
            plain = parse_prompt(texts[k]).text
            start = plain.index(f" {target} ") + 1
            mass.append(float(span_map(token_maps[k], offsets[k], (start, start + len(target))).mean()))
    named = [p for p, d in zip(present, drawn) if d]
    scores = {
        "drawn": float(np.mean(drawn)),
        "present": float(np.mean(present)),
        "named when drawn": float(np.mean(named)) if named else None,
        "area": float(np.mean(area)),
        "grain": float(np.mean(grains)),
    }
    if mass:
        scores["mass"] = float(np.mean(mass))
    return scores


def weight_response(
    run: EvaluationRun,
    n: int,
    modes: tuple[str, ...] = WEIGHT_MODES_MEASURED,
    weights: tuple[float, ...] = EDIT_WEIGHTS,
) -> dict:
    """Rows {word, mode, weight, drawn, present, area, grain, mass} over `n` prompts, image k of every
    setting from noise seed `run.seed + k`, and the word-deleted baseline {word: {drawn, present, area,
    grain}}. The run's weighting gives the context, steps window and resolutions; its mode is each
    of `modes` in turn. Weight 1 is the plain prompt, sampled once for both modes."""
    prompts = edit_prompts(n, run.seed, run.holdout)
    weighting = run.settings.weighting
    rows, deleted = [], {}
    for word in ("colour", "shape"):
        deleted[word] = _scores(prompts, word, sample_images(run, [p.deleted(word) for p in prompts]).images)
        plain = None
        for mode in modes:
            for weight in weights:
                texts = [p.text(word, weight) for p in prompts]
                if weight == 1.0 and plain is not None:
                    scores = plain
                else:
                    sampled = sample_images(run.sampling(weighting=replace(weighting, mode=mode)), texts, maps=True)
                    scores = _scores(prompts, word, sampled.images, texts, sampled.token_maps, sampled.offsets)
                    if weight == 1.0:
                        plain = scores
                rows.append({"word": word, "mode": mode, "weight": weight, **scores})
    return {"n": n, "rows": rows, "deleted": deleted}


def weight_contract(response: dict) -> dict:
    """Each clause of the weight contract (module docstring) per word and mode:
    {name: {"value", "target", "met"}}."""
    out, eps = {}, 1e-9
    rows = response["rows"]
    for word in ("colour", "shape"):
        for mode in sorted({r["mode"] for r in rows}):
            at = {r["weight"]: r for r in rows if r["word"] == word and r["mode"] == mode}
            name = f"edit/{word} word, {mode} mode"
            if 0.0 in at:
                out[f"{name}: weight 0 draws an object"] = {
                    "value": at[0.0]["drawn"],
                    "target": DRAWN_TARGET,
                    "met": at[0.0]["drawn"] >= DRAWN_TARGET - eps,
                }
                # of the objects drawn: an empty image names nothing, and must not pass for a removal
                zero, deleted = at[0.0], response["deleted"][word]
                named, prior = zero.get("named when drawn"), deleted.get("named when drawn")
                measurable = named is not None and prior is not None
                measurable = measurable and min(zero["drawn"], deleted["drawn"]) >= PRIOR_MIN_DRAWN - eps
                clause = f"{name}: weight 0 names it, of the objects drawn, no more than deleting the word"
                out[f"{clause} (+{PRIOR_MARGIN:g})"] = {
                    "value": named,
                    "target": round(prior + PRIOR_MARGIN, 6) if prior is not None else None,
                    "met": named <= prior + PRIOR_MARGIN + eps if measurable else None,
                }
            held = [w for w in CONTRACT_WEIGHTS if w in at]
            if held:
                least_drawn = min(at[w]["drawn"] for w in held)
                least_present = min(at[w]["present"] for w in held)
                label = "/".join(f"{w:g}" for w in held)
                out[f"{name}: weights {label} draw an object (least)"] = {
                    "value": least_drawn,
                    "target": DRAWN_TARGET,
                    "met": least_drawn >= DRAWN_TARGET - eps,
                }
                out[f"{name}: weights {label} keep the {word} (least)"] = {
                    "value": least_present,
                    "target": PRESENT_TARGET,
                    "met": least_present >= PRESENT_TARGET - eps,
                }
            if 1.0 in at and 2.0 in at:
                ratio = at[2.0]["grain"] / max(at[1.0]["grain"], 1e-9)
                out[f"{name}: background grain, weight 2 / weight 1 (at most)"] = {
                    "value": ratio,
                    "target": GRAIN_RATIO,
                    "met": ratio <= GRAIN_RATIO + eps,
                }
            curve = [w for w in MONOTONE_WEIGHTS if w in at]
            if len(curve) > 1:
                for measure in ("area", "mass"):
                    values = [at[w][measure] for w in curve]
                    # an attribute's area stops growing once it is drawn whole: a plateau with
                    # sampling noise on it still rises, a real step down does not
                    slack = RISE_SLACK * at.get(1.0, at[curve[-1]])[measure]
                    rising = all(a <= b + slack + eps for a, b in zip(values, values[1:]))
                    out[f"{name}: {measure} rises with the weight 0-2"] = {
                        "value": rising,
                        "target": True,
                        "met": rising,
                    }
    return out


# ---- word swap ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapCase:
    """A source prompt, its edit, and which object the edit is about."""

    kind: str  # one of SWAP_KINDS
    scene: Scene  # the scene the source prompt describes (its objects are what the source should draw)
    source: str  # the source prompt
    edit: str  # the edited prompt
    index: int  # the edited object
    old: str | None  # the attribute value swapped out (None for an added word)
    new: str  # the attribute value swapped in


def _replace(text: str, span: tuple[int, int], word: str) -> str:
    """`text` with `span` replaced by `word`, and the article of the phrase agreeing with its next word."""
    text = text[: span[0]] + word.strip() + text[span[1] :] if word else text[: span[0]] + text[span[1] + 1 :]
    return re.sub(r"\ban? (?=(\w))", lambda m: "an " if m.group(1) in "aeiou" else "a ", text)


def swap_cases(kind: str, n: int, seed: int, resolution: int, holdout: list[str]) -> list[SwapCase]:
    """`n` swap cases of `kind` on one- and two-object scenes of training colour-shape pairs (the
    edited pair too); for "size" only objects whose caption names their size; for "add" the
    source prompt is the caption with the edited object's colour deleted, the edit the caption."""
    held = parse_holdout(holdout)
    dataset = ShapesDataset(
        resolution,
        num_samples=100 * n + 1000,
        min_objects=1,
        max_objects=2,
        object_weights=None,
        seed=seed + 400 + SWAP_KINDS.index(kind),
        holdout=holdout,
    )
    rng = np.random.default_rng(seed + 500 + SWAP_KINDS.index(kind))
    cases, i = [], 0
    while len(cases) < n:
        scene = dataset.scene(i)
        i += 1
        k = int(rng.integers(len(scene.objects)))
        obj, caption = scene.objects[k], scene.caption
        if kind == "colour":
            options = [c for c in COLOURS if c != obj.colour and (c, obj.shape) not in held]
            new = options[rng.integers(len(options))]
            cases.append(
                SwapCase(kind, scene, caption, _replace(caption, scene.colour_spans[k], new), k, obj.colour, new)
            )
        elif kind == "shape":
            options = [s for s in SHAPES if s != obj.shape and (obj.colour, s) not in held]
            new = options[rng.integers(len(options))]
            cases.append(
                SwapCase(kind, scene, caption, _replace(caption, scene.shape_spans[k], new), k, obj.shape, new)
            )
        elif kind == "size":
            if scene.size_spans[k] is None:
                continue
            new = next(s for s in SIZES if s != obj.size)
            cases.append(SwapCase(kind, scene, caption, _replace(caption, scene.size_spans[k], new), k, obj.size, new))
        else:
            cases.append(
                SwapCase(kind, scene, _replace(caption, scene.colour_spans[k], ""), caption, k, None, obj.colour)
            )
    return cases


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def score_swap(case: SwapCase, source: np.ndarray, edit: np.ndarray) -> dict | None:
    """What the edit did, from the source and edit images; None when the source does not draw
    its objects (matched by colour and shape) and there is no layout to keep.

    Returns booleans: "new present" (the edited object, found in the edit where it was in the
    source, has the new attribute), "old gone" (and not the old one), "colour kept" (its colour
    is the source's), "edited iou >= 0.8" and "centre within 2 px" (of the source's object),
    "others iou >= 0.9" (every other object found again, same colour and shape, mask IoU >= 0.9)."""
    scene = case.scene
    source_objects = (
        _match_uncoloured(scene, detect(source), case.index)
        if case.kind == "add"
        else match_objects(scene, detect(source), by_colour=True)
    )
    if any(m is None for m in source_objects):
        return None
    edit_detections = detect(edit)
    mine = source_objects[case.index]
    found = max(edit_detections, key=lambda d: _iou(d.mask, mine.mask), default=None)
    if found is not None and _iou(found.mask, mine.mask) == 0:
        found = None
    attribute = {"colour": "colour", "shape": "shape", "size": "size", "add": "colour"}[case.kind]
    others = []
    for k, obj_detection in enumerate(source_objects):
        if k == case.index:
            continue
        same = [d for d in edit_detections if d.colour == obj_detection.colour and d.shape == obj_detection.shape]
        others.append(max((_iou(d.mask, obj_detection.mask) for d in same), default=0.0) >= 0.9)
    return {
        "new present": found is not None and getattr(found, attribute) == case.new,
        "old gone": found is not None and (case.old is None or getattr(found, attribute) != case.old),
        "colour kept": found is not None and found.colour == mine.colour,
        "edited iou >= 0.8": found is not None and _iou(found.mask, mine.mask) >= 0.8,
        "centre within 2 px": found is not None and math.dist(found.center, mine.center) <= 2.0,
        "others iou >= 0.9": all(others),
    }


def _match_uncoloured(scene: Scene, detections: list[Detection], index: int) -> list[Detection | None]:
    """`match_objects` where object `index`'s colour is unnamed: it matches by shape alone."""
    named = match_objects(scene, detections, by_colour=True)
    if named[index] is not None:
        return named
    used = {id(d) for k, d in enumerate(named) if k != index and d is not None}
    options = [d for d in detections if id(d) not in used and d.shape == scene.objects[index].shape]
    named[index] = min(options, key=lambda d: math.dist(d.center, scene.objects[index].center), default=None)
    return named


class SwapResponse(NamedTuple):
    """`swap_response`'s result."""

    rates: dict  # {"n", "edit_steps", "local_blend", "keep_layout", "kinds": {kind: {"n", "by_steps"}}}
    examples: dict  # {kind: [(source prompt, edit prompt, source image, edit image), ...]}


def swap_response(
    run: EvaluationRun,
    n: int,
    edit_steps: tuple[float, ...] = EDIT_STEPS,
    kinds: tuple[str, ...] = SWAP_KINDS,
    example_steps: float | None = None,
) -> SwapResponse:
    """The rates {"kinds": {kind: {"n": cases, "by_steps": {edit steps: {"scored": pairs with a
    faithful source, measure: rate}}}}} for `n` cases of each kind, pair k of a kind from noise
    seed `run.seed + k` for both images, at each of `edit_steps` (the settings' own edit steps
    are not used); and examples {kind: [(source prompt, edit prompt, source image, edit image)]}
    of the first cases at `example_steps` (None: the first of `edit_steps`). The settings'
    local_blend and keep_layout act as in `Pipeline.swap` (keep_layout None: auto)."""
    example_steps = edit_steps[0] if example_steps is None else example_steps
    settings = run.settings
    layout = next(name for name, value in KEEP_LAYOUT.items() if value is settings.keep_layout)
    rates = {"n": n, "edit_steps": list(edit_steps), "local_blend": settings.local_blend, "keep_layout": layout}
    rates["kinds"], examples = {}, {}
    for kind in kinds:
        cases = swap_cases(kind, n, run.seed, run.resolution, run.holdout)
        by_steps = {}
        for fraction in edit_steps:
            pairs = swap_pairs(run.sampling(edit_steps=fraction), cases)
            scores = [score_swap(c, s, e) for c, (s, e) in zip(cases, pairs)]
            scored = [s for s in scores if s is not None]
            measured = {key: float(np.mean([s[key] for s in scored])) if scored else None for key in SWAP_MEASURES}
            by_steps[f"{fraction:g}"] = {"scored": len(scored), **measured}
            if fraction == example_steps:
                examples[kind] = [(cases[k].source, cases[k].edit, *pairs[k]) for k in range(min(4, n))]
        rates["kinds"][kind] = {"n": n, "by_steps": by_steps}
    return SwapResponse(rates, examples)


def swap_pairs(run: EvaluationRun, cases: list[SwapCase]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (source, edit) images of each case, pair k from noise seed `run.seed + k`: half a batch
    of pairs at a time, since each pair is two images."""
    pairs = []
    chunk_size = max(1, run.batch_size // 2)
    for start in range(0, len(cases), chunk_size):
        chunk = cases[start : start + chunk_size]
        x, _ = run.pipe.swap_batch(
            run.pipe.swap_plan([(c.source, c.edit) for c in chunk], run.settings.keep_layout),
            [run.seed + start + k for k in range(len(chunk))],
            run.settings,
        )
        images = uint8_images(x)  # (2P, R, R, 3): source and edit of each pair in turn
        pairs += [(images[2 * k], images[2 * k + 1]) for k in range(len(chunk))]
        if run.progress is not None:
            run.progress.update(2 * len(chunk))
    return pairs


def swap_targets(response: dict, edit_steps: float) -> dict:
    """The swap targets (SWAP_TARGETS) at one edit-steps value: {name: {"value", "target", "met"}}."""
    out, eps = {}, 1e-9
    key = f"{edit_steps:g}"
    for kind, measures in SWAP_TARGETS.items():
        rates = response["kinds"].get(kind, {}).get("by_steps", {}).get(key)
        if rates is None:
            continue
        for measure, target in measures.items():
            value = rates[measure]
            out[f"swap/{kind} swap at edit steps {key}: {measure}"] = {
                "value": value,
                "target": target,
                "met": None if value is None else value >= target - eps,
            }
    return out


PRIOR_SEEDS = 16  # noise seeds per colour-deleted prompt for the palette spread
PRIOR_PROMPTS = 8  # colour-deleted prompts of the palette spread


def is_clean_scene(image: np.ndarray, detections: list[Detection]) -> bool:
    """Whether every object in `image` is drawn in one clean colour: at least one detection, each
    explained by a shape template, and little paint outside them. A blend of colours reads as
    several detections that no template explains."""
    if not detections:
        return False
    area = sum(d.area for d in detections)
    fits = all(d.fit_error <= MAX_FIT_ERROR for d in detections)
    return fits and stray_pixels(image, detections) <= MAX_STRAY_FRACTION * area


def palette_prompts(count: int = PRIOR_PROMPTS) -> list[str]:
    """`count` colour-deleted one-object prompts: every shape at positions taken in turn."""
    positions = list(POSITION_PHRASES)
    return [f"a {SHAPES[k % len(SHAPES)]} {POSITION_PHRASES[positions[k % len(positions)]]}" for k in range(count)]


def prior_response(run: EvaluationRun, n: int) -> dict:
    """What the model draws where the text names no colour: `n` colour-deleted prompts (those of
    the weight response) and their clean-object rate; the palette spread of PRIOR_PROMPTS such
    prompts over PRIOR_SEEDS seeds each (the colours of their clean objects, and the largest share
    one colour takes of a prompt's images); `n` unconditional samples at guidance 1 and the share
    whose every object is one clean colour. No word is weighted in these prompts, so the run's
    weighting does not act."""
    deleted = [p.deleted("colour") for p in edit_prompts(n, run.seed, run.holdout)]
    drawn = [is_clean_object(image, detect(image)) for image in sample_images(run, deleted).images]
    palette = []
    for k, prompt in enumerate(palette_prompts()):
        images = sample_images(run.but(seed=run.seed + 5000 + 100 * k), [prompt] * PRIOR_SEEDS).images
        counts = dict.fromkeys(COLOURS, 0)
        for image in images:
            detections = detect(image)
            if is_clean_object(image, detections):
                counts[detections[0].colour] += 1
        palette.append({"prompt": prompt, "colours": counts, "top share": max(counts.values()) / PRIOR_SEEDS})
    unconditional = sample_images(run.but(seed=run.seed + 9000).sampling(guidance=1.0), [""] * n).images
    clean = [is_clean_scene(image, detect(image)) for image in unconditional]
    return {
        "n": n,
        "colour deleted drawn": float(np.mean(drawn)),
        "palette": palette,
        "palette top share": max(p["top share"] for p in palette),
        "palette seeds": PRIOR_SEEDS,
        "unconditional clean": float(np.mean(clean)),
    }


def prior_targets(prior: dict) -> dict:
    """The prior's targets: {name: {"value", "target", "met"}} (a share "at most" for the palette)."""
    eps = 1e-9
    drawn, top, clean = prior["colour deleted drawn"], prior["palette top share"], prior["unconditional clean"]
    return {
        "prior/colour deleted: one clean object": {"value": drawn, "target": 0.9, "met": drawn >= 0.9 - eps},
        "prior/colour deleted: one colour's share of a prompt's 16 seeds (at most)": {
            "value": top,
            "target": 0.4,
            "met": top <= 0.4 + eps,
        },
        "prior/unconditional: every object one clean colour": {
            "value": clean,
            "target": 0.9,
            "met": clean >= 0.9 - eps,
        },
    }

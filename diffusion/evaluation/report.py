"""The evaluation report: run the parts `evaluate.py` asks for, check the targets, print the
table and draw the pictures.

Parts: faithfulness and localisation (evaluation.py), the weight response and the word swap
(edit_evaluation.py), the sampler sweep (evaluation.py). `targets` turns a report into one
verdict per target, `format_report` into the printed table; `edit_plot`, `swap_plot` and
`swap_strip` draw the edit curves and example pairs.
"""

from __future__ import annotations

import time

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_GUIDANCE_CUTOFF,
    DEFAULT_PARTS,
    DEFAULT_SAMPLER,
    DEFAULT_WEIGHT_STEPS,
)
from diffusion.errors import UserError
from diffusion.evaluation import edits
from diffusion.evaluation.detector import detector_accuracy
from diffusion.evaluation.metrics import (
    CATEGORIES,
    EVAL_SEED,
    SAMPLER_STEPS,
    TARGETS,
    category_cases,
    dataset_localisation,
    faithfulness,
    sampler_sweep,
)
from diffusion.images import font, labelled_grid
from diffusion.sampling.pipeline import Weighting

SAMPLER_LABELS = {"dpm++": "DPM-Solver++ 2M", "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler"}


def evaluate(
    pipe,
    n: int = 100,
    seed: int = EVAL_SEED,
    holdout: list[str] | None = None,
    training_seed: int = 0,
    n_edit: int = 16,
    n_swap: int = 16,
    n_samplers: int = 20,
    batch_size: int = 50,
    detector_n: int = 300,
    guidance: float = 3.0,
    guidance_cutoff: float = DEFAULT_GUIDANCE_CUTOFF,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    sampler: str = DEFAULT_SAMPLER,
    weighting: Weighting | None = None,
    edit_steps: float = DEFAULT_EDIT_STEPS,
    swap_sweep: bool = False,
    local_blend: bool = False,
    keep_layout: bool | None = None,
    categories: tuple[str, ...] | None = None,
) -> tuple[dict, list, dict]:
    """The whole report as a JSON-ready dict, example (image, label) pairs for a grid, and the
    swap examples {kind: [(source prompt, edit prompt, source image, edit image), ...]}.

    weighting: how the edit part's weights act (its mode is each mode in turn) and the swap's
    resolutions. edit_steps: the swap's injection fraction, whose rates the targets check;
    swap_sweep: also measure every fraction of edit_evaluation.EDIT_STEPS. keep_layout: as
    `Pipeline.swap`'s (None: auto). categories: the
    faithfulness categories scored (None: all); the others are left out of the report (their
    targets read "not measured")."""
    categories = CATEGORIES if categories is None else tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        what = (
            f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}"
            if unknown
            else "no category given"
        )
        raise UserError(f"{what}; choose from {', '.join(CATEGORIES)}")
    if seed == training_seed:
        raise UserError(f"evaluation seed {seed} is the training data seed; choose another --seed")
    weighting = weighting or Weighting()
    holdout = list(holdout or [])
    resolution = pipe.unet.config.sample_size
    started = time.time()
    report = {
        "n": n,
        "seed": seed,
        "resolution": resolution,
        "holdout": holdout,
        "guidance": guidance,
        "guidance_cutoff": guidance_cutoff,
        "sampler": sampler,
        "mixed_precision": pipe.mixed_precision,
    }
    report["detector"] = detector_accuracy(n=detector_n, seed=seed + 300, resolution=resolution)
    cases = (
        {c: category_cases(c, n, seed, resolution, holdout) for c in CATEGORIES if c in categories}
        if "faithfulness" in parts
        else {}
    )
    swap_fractions = tuple(sorted(set(edits.EDIT_STEPS) | {edit_steps})) if swap_sweep else (edit_steps,)
    sweep_cases = []
    if "samplers" in parts:
        half = n_samplers // 2
        sweep = {
            c: cases.get(c) or category_cases(c, n, seed, resolution, holdout) for c in ("single object", "position")
        }
        sweep_cases = sweep["single object"][:half] + sweep["position"][: n_samplers - half]
    total = {
        "faithfulness": sum(len(c) for c in cases.values()),
        "edit": n_edit * 2 * (1 + len(edits.WEIGHT_MODES_MEASURED) * (len(edits.EDIT_WEIGHTS) - 1) + 1),
        "prior": 2 * n_edit + edits.PRIOR_PROMPTS * edits.PRIOR_SEEDS,
        "swap": n_swap * 2 * len(edits.SWAP_KINDS) * len(swap_fractions),
        "samplers": len(sweep_cases) * (1 + 4 * len(SAMPLER_STEPS)),
    }
    progress = tqdm(total=sum(total.get(p, 0) for p in parts), desc="evaluating (images)", dynamic_ncols=True)
    examples, swap_examples = [], {}
    if "faithfulness" in parts:
        report["faithfulness"], generated, examples = faithfulness(
            pipe, cases, seed, batch_size, progress, guidance, sampler, guidance_cutoff
        )
        report["localisation"] = {"generated": generated}
    if "localisation" in parts:
        report.setdefault("localisation", {})["dataset"] = dataset_localisation(pipe, n, seed, holdout, batch_size)
    if {"edit", "swap"} & set(parts):
        report["weighting"] = {
            "context": weighting.context,
            "steps": None if weighting.steps is None else list(weighting.steps),  # None: each mode's default
            "resolutions": sorted(weighting.resolutions) if weighting.resolutions else None,
        }
    # what the edit and the swap parts sample with, as the faithfulness part does
    sampling = {
        "holdout": holdout,
        "batch_size": batch_size,
        "weighting": weighting,
        "progress": progress,
        "guidance": guidance,
        "sampler": sampler,
        "guidance_cutoff": guidance_cutoff,
    }
    if "edit" in parts:
        report["edit"] = edits.weight_response(pipe, n_edit, seed, **sampling)
    if "prior" in parts:  # no word is weighted in its prompts
        unweighted = {key: value for key, value in sampling.items() if key != "weighting"}
        report["prior"] = edits.prior_response(pipe, n_edit, seed, **unweighted)
    if "swap" in parts:
        report["swap"], swap_examples = edits.swap_response(
            pipe,
            n_swap,
            seed,
            edit_steps=swap_fractions,
            local_blend=local_blend,
            example_steps=edit_steps,
            keep_layout=keep_layout,
            **sampling,
        )
        report["swap"]["default_edit_steps"] = edit_steps
    if "samplers" in parts:
        report["samplers"] = sampler_sweep(pipe, sweep_cases, seed, batch_size, progress, guidance, guidance_cutoff)
    progress.close()
    report["targets"] = targets(report)
    report["seconds"] = round(time.time() - started, 1)
    return report, examples, swap_examples


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
    if "edit" in report:
        out.update(edits.weight_contract(report["edit"]))
    if "prior" in report:
        out.update(edits.prior_targets(report["prior"]))
    if "swap" in report:
        out.update(edits.swap_targets(report["swap"], report["swap"]["default_edit_steps"]))
    sweep = report.get("samplers")
    if sweep:
        gap = abs(sweep["scores"]["dpm++"]["20"] - sweep["reference"]["score"])
        out["samplers/dpm++ 20 steps gap to reference (at most)"] = {
            "value": gap,
            "target": 0.02,
            "met": gap <= 0.02 + eps,
        }
    return out


# ---- the printed table ----------------------------------------------------------------------


def fmt(value) -> str:
    """A value as the report's tables write it: 3 decimals, yes/no, '-' for nothing, a goal range
    (a tuple) as 'a to b'. tools/seeds.py and tools/results.py write their cells with it too."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return " to ".join(fmt(v) for v in value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_report(report: dict) -> str:
    lines = [
        f"evaluation: n={report['n']} per category, seed {report['seed']}, {report['resolution']} px, "
        f"guidance {report.get('guidance', 3.0):g} for {report.get('guidance_cutoff', 1.0):g} of the steps, "
        f"{SAMPLER_LABELS[report.get('sampler', 'dpm++')]} 20 steps, "
        f"mixed precision {report.get('mixed_precision', 'no')}, {report.get('seconds', 0):.0f} s",
        "",
    ]
    lines.append(
        "detector accuracy on generator images: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["detector"].items() if k != "n")
    )
    if "faithfulness" in report:
        lines += ["", f"{'faithfulness':<20} {'score':>6} {'n':>5}"]
        for category, value in report["faithfulness"].items():
            lines.append(f"{category:<20} {fmt(value and value['score']):>6} {value['n'] if value else 0:>5}")
            for count, part in ((value or {}).get("by_count") or {}).items():
                lines.append(f"  {count} object(s){'':<8} {part['score']:>6.3f} {part['n']:>5}")
    for where, values in report.get("localisation", {}).items():
        lines += ["", f"localisation ({where}): " + ", ".join(f"{k} {fmt(v)}" for k, v in values.items())]
    if "weighting" in report:
        w = report["weighting"]
        lines += [
            "",
            f"weighting: context {w['context']}, steps "
            + (
                f"{w['steps'][0]:g}-{w['steps'][1]:g}"
                if w["steps"]
                else ", ".join(f"{mode} {a:g}-{b:g}" for mode, (a, b) in DEFAULT_WEIGHT_STEPS.items())
            )
            + ", "
            f"resolutions {w['resolutions'] or 'all'}",
        ]
    if "edit" in report:
        edit = report["edit"]
        lines += [
            "",
            f"weight response (n={edit['n']}; drawn = one clean object)",
            f"{'word':<7} {'mode':<10} {'weight':>6} {'drawn':>6} {'present':>8} {'named|drawn':>11} {'area':>6} "
            f"{'mass':>6} {'grain':>6}",
        ]
        for word, base in edit["deleted"].items():
            lines.append(
                f"{word:<7} {'deleted':<10} {'-':>6} {base['drawn']:>6.3f} {base['present']:>8.3f} "
                f"{fmt(base.get('named when drawn')):>11} {base['area']:>6.3f} {'-':>6} {base['grain']:>6.2f}"
            )
        for r in edit["rows"]:
            lines.append(
                f"{r['word']:<7} {r['mode']:<10} {r['weight']:>6g} {r['drawn']:>6.3f} {r['present']:>8.3f} "
                f"{fmt(r.get('named when drawn')):>11} {r['area']:>6.3f} {r['mass']:>6.3f} {r['grain']:>6.2f}"
            )
    if "prior" in report:
        prior = report["prior"]
        lines += [
            "",
            f"prior (n={prior['n']}): colour-deleted prompts draw one clean object "
            f"{prior['colour deleted drawn']:.3f}; unconditional samples all clean {prior['unconditional clean']:.3f}",
            f"palette over {prior['palette seeds']} seeds (clean objects per colour): "
            + "; ".join(
                f"{p['prompt']}: " + " ".join(f"{c} {k}" for c, k in p["colours"].items() if k)
                for p in prior["palette"]
            ),
        ]
    if "swap" in report:
        swap = report["swap"]
        measures = edits.SWAP_MEASURES
        lines += [
            "",
            f"word swap (n={swap['n']} per kind; rates over the pairs whose source draws its objects"
            f"{'; local blend' if swap.get('local_blend') else ''}; keep layout {swap.get('keep_layout', 'off')})",
            f"{'kind':<7} {'steps':>5} {'scored':>6} " + " ".join(f"{m[:12]:>12}" for m in measures),
        ]
        for kind, values in swap["kinds"].items():
            for fraction, rates in values["by_steps"].items():
                lines.append(
                    f"{kind:<7} {fraction:>5} {rates['scored']:>6} "
                    + " ".join(f"{fmt(rates[m]):>12}" for m in measures)
                )
    if "samplers" in report:
        sweep = report["samplers"]
        lines += [
            "",
            f"samplers (n={sweep['n']}; reference {sweep['reference']['sampler']} "
            f"{sweep['reference']['steps']} steps: {sweep['reference']['score']:.3f})",
            f"{'sampler':<8} " + " ".join(f"{s:>6}" for s in SAMPLER_STEPS),
        ]
        for name, scores in sweep["scores"].items():
            lines.append(f"{name:<8} " + " ".join(f"{scores[str(s)]:>6.3f}" for s in SAMPLER_STEPS))
    width = max([len(k) for k in report["targets"]] + [40])
    lines += ["", f"{'target':<{width}} {'value':>6} {'goal':>6} met"]
    for key, t in report["targets"].items():
        lines.append(f"{key:<{width}} {fmt(t['value']):>6} {fmt(t['target']):>6} {fmt(t['met'])}")
    met = [t["met"] for t in report["targets"].values() if t["met"] is not None]
    lines.append(f"{sum(met)} of {len(met)} measured targets met")
    return "\n".join(lines)


# ---- pictures -------------------------------------------------------------------------------

STYLES = {
    ("colour", "attention"): (220, 50, 50),
    ("colour", "embedding"): (240, 150, 150),
    ("shape", "attention"): (40, 80, 220),
    ("shape", "embedding"): (140, 170, 240),
}


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, fill, dash: int = 5) -> None:
    for x in range(int(x0), int(x1), 2 * dash):
        draw.line([x, y, min(x + dash, x1), y], fill=fill, width=1)


def _line_panels(
    series: dict,
    metrics: list[str],
    xs: list[float],
    floors: dict | None = None,
    x_label: str = "weight",
    width: int = 960,
    height: int = 250,
) -> Image.Image:
    """Small line charts side by side, one per metric: `series` maps (label, colour) to
    {x: {metric: value}}; `floors` maps metric to [(value, colour, label)] drawn dashed."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    label_font = font(11)
    panel_w = width // len(metrics)
    left, top, bottom = 40, 24, height - 62
    for p, metric in enumerate(metrics):
        x0, x1 = p * panel_w + left, (p + 1) * panel_w - 12
        values = [v[metric] for points in series.values() for v in points.values() if v.get(metric) is not None]
        values += [f[0] for f in (floors or {}).get(metric, [])]
        top_value = (
            1.0
            if max(values, default=0) <= 1 and metric not in ("area", "mass", "grain")
            else max(values + [1e-9]) * 1.05
        )
        draw.rectangle([x0, top, x1, bottom], outline=(160, 160, 160))
        draw.text((x0, 4), f"{metric} vs {x_label}", fill="black", font=label_font)
        draw.text((x0 - 36, top - 6), f"{top_value:.2g}", fill="black", font=label_font)
        draw.text((x0 - 12, bottom - 6), "0", fill="black", font=label_font)

        def xy(x, value):  # called only within this iteration, so the loop variables it reads are this panel's
            x_pixel = x0 + (x1 - x0) * (x - min(xs)) / (max(xs) - min(xs))  # noqa: B023
            y_pixel = bottom - (bottom - top) * value / top_value  # noqa: B023
            return x_pixel, y_pixel

        for x in xs:
            draw.text((xy(x, 0)[0] - 6, bottom + 2), f"{x:g}", fill="black", font=label_font)
        for value, colour, _ in (floors or {}).get(metric, []):
            _dashed(draw, x0, x1, xy(min(xs), value)[1], colour)
        for (_, colour), points in series.items():
            coords = [xy(x, v[metric]) for x, v in sorted(points.items()) if v.get(metric) is not None]
            if len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            for x, y in coords:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    legend = [(label, colour, False) for label, colour in series]
    legend += [(label, colour, True) for floor in (floors or {}).values() for _, colour, label in floor]
    for k, (label, colour, dashed) in enumerate(dict.fromkeys(legend)):
        x, y = 10 + (k % 4) * (width // 4), height - 34 + 16 * (k // 4)
        if dashed:
            _dashed(draw, x, x + 20, y + 6, colour, dash=3)
        else:
            draw.line([x, y + 6, x + 20, y + 6], fill=colour, width=3)
        draw.text((x + 24, y), label, fill="black", font=label_font)
    return image


def edit_plot(edit: dict) -> Image.Image:
    """The weight response (`weight_response`): drawn, present, area, mass and grain against the
    weight, one line per word and mode; the word-deleted values dashed."""
    series = {}
    for (word, mode), colour in STYLES.items():
        points = {r["weight"]: r for r in edit["rows"] if r["word"] == word and r["mode"] == mode}
        if points:
            series[(f"{word} word, {mode}", colour)] = points
    xs = sorted({r["weight"] for r in edit["rows"]})
    deleted = edit["deleted"]
    floors = {
        metric: [
            (deleted[word][metric], tuple(c // 2 for c in STYLES[(word, "attention")]), f"{word} word deleted")
            for word in deleted
        ]
        for metric in ("drawn", "present", "area", "grain")
    }
    return _line_panels(series, ["drawn", "present", "area", "mass", "grain"], xs, floors)


def swap_plot(swap: dict) -> Image.Image:
    """Word-swap rates against the edit steps: one panel per measure, one line per kind."""
    colours = {"colour": (220, 50, 50), "shape": (40, 80, 220), "size": (60, 160, 60), "add": (200, 140, 20)}
    series = {
        (kind, colours[kind]): {float(f): rates for f, rates in values["by_steps"].items()}
        for kind, values in swap["kinds"].items()
    }
    xs = sorted({float(f) for values in swap["kinds"].values() for f in values["by_steps"]})
    if len(xs) == 1:
        xs = [0.0, 1.0]
    return _line_panels(
        series,
        ["new present", "old gone", "edited iou >= 0.8", "centre within 2 px", "others iou >= 0.9"],
        xs,
        x_label="edit steps",
    )


def swap_strip(examples: dict) -> Image.Image:
    """Source | edit pairs, a row per kind, each labelled with its prompt."""
    images, labels = [], []
    for kind, pairs in examples.items():
        for source_prompt, edit_prompt, source, edit in pairs[:2]:
            images += [Image.fromarray(source), Image.fromarray(edit)]
            labels += [f"{kind}: {source_prompt}", f"-> {edit_prompt}"]
    return labelled_grid(images, labels, columns=4, label_width_chars=24)

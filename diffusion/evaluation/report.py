"""The evaluation report: run the parts `evaluate.py` asks for, check the targets, print the
table and draw the pictures.

Parts: faithfulness and localisation (metrics.py), the weight response, the prior and the word
swap (edits.py), the sampler sweep (metrics.py); each takes one `EvaluationRun`. `targets` turns a report into one
verdict per target, `format_report` into the printed table; `edit_plot`, `swap_plot` and
`swap_strip` draw the edit curves and example pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from diffusion.config import DEFAULT_PARTS, DEFAULT_WEIGHT_STEPS
from diffusion.errors import UserError
from diffusion.evaluation import edits
from diffusion.evaluation.detector import detector_accuracy
from diffusion.evaluation.metrics import (
    CATEGORIES,
    EVAL_SEED,
    SAMPLER_STEPS,
    TARGETS,
    Case,
    EvaluationRun,
    category_cases,
    dataset_localisation,
    faithfulness,
    sampler_sweep,
)
from diffusion.images import font, labelled_grid
from diffusion.sampling.settings import SamplingSettings

SAMPLER_LABELS = {"dpm++": "DPM-Solver++ 2M", "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler"}


class Evaluation(NamedTuple):
    """`evaluate`'s result."""

    report: dict  # JSON-ready: what evaluate.py writes and tools/results.py reads
    examples: list  # (image, label) pairs of the faithfulness part, for a grid
    swap_examples: dict  # {kind: [(source prompt, edit prompt, source image, edit image), ...]}


@dataclass(frozen=True)
class Plan:
    """What `evaluate` samples: the parts, and the prompts' counts and scenes of each."""

    parts: tuple[str, ...]
    n: int  # prompts per faithfulness category, and dataset images of the localisation part
    cases: dict[str, list[Case]]  # the faithfulness scenes by category ({} without that part)
    n_edit: int  # prompts of the weight response and the prior
    n_swap: int  # source prompts per swap kind
    swap_fractions: tuple[float, ...]  # the edit steps the swap part measures
    sweep_cases: list[Case]  # the sampler sweep's scenes ([] without that part)

    def images(self) -> int:
        """How many images the parts draw: the progress bar's total."""
        per_part = {
            "faithfulness": sum(len(c) for c in self.cases.values()),
            "edit": self.n_edit * 2 * (1 + len(edits.WEIGHT_MODES_MEASURED) * (len(edits.EDIT_WEIGHTS) - 1) + 1),
            "prior": 2 * self.n_edit + edits.PRIOR_PROMPTS * edits.PRIOR_SEEDS,
            "swap": self.n_swap * 2 * len(edits.SWAP_KINDS) * len(self.swap_fractions),
            "samplers": len(self.sweep_cases) * (1 + 4 * len(SAMPLER_STEPS)),
        }
        return sum(per_part.get(p, 0) for p in self.parts)


def evaluate(
    pipe,
    settings: SamplingSettings | None = None,
    *,
    n: int = 100,
    seed: int = EVAL_SEED,
    holdout: list[str] | None = None,
    training_seed: int = 0,
    n_edit: int = 16,
    n_swap: int = 16,
    n_samplers: int = 20,
    batch_size: int = 50,
    detector_n: int = 300,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    swap_sweep: bool = False,
    categories: tuple[str, ...] | None = None,
) -> Evaluation:
    """The whole report as a JSON-ready dict, example (image, label) pairs for a grid, and the
    swap examples.

    settings: how every image is sampled (None: the defaults, as sample.py's); the edit part
    measures each weight mode in turn with the rest of its weighting, and the weighting's
    resolutions also limit the swap; settings.edit_steps is the swap's injection fraction, whose
    rates the targets check, and swap_sweep also measures every fraction of edits.EDIT_STEPS;
    local_blend and keep_layout act as in `Pipeline.swap`. seed: the scenes' (it must differ from
    the training data's, `training_seed`); holdout: the model's held-out colour-shape pairs;
    n, n_edit, n_swap, n_samplers, detector_n: how many prompts (or scenes) each part takes;
    categories: the faithfulness categories scored (None: all); the others are left out of the
    report (their targets read "not measured")."""
    categories = _check_categories(categories)
    if seed == training_seed:
        raise UserError(f"evaluation seed {seed} is the training data seed; choose another --seed")
    started = time.time()
    run = EvaluationRun(pipe, settings or SamplingSettings(), seed, batch_size, list(holdout or []))
    report = _header(run, n)
    report["detector"] = detector_accuracy(n=detector_n, seed=seed + 300, resolution=run.resolution)
    cases = {}
    if "faithfulness" in parts:
        cases = {c: category_cases(c, n, seed, run.resolution, run.holdout) for c in CATEGORIES if c in categories}
    edit_steps = run.settings.edit_steps
    swap_fractions = tuple(sorted(set(edits.EDIT_STEPS) | {edit_steps})) if swap_sweep else (edit_steps,)
    sweep_cases = _sweep_cases(run, n, n_samplers, cases) if "samplers" in parts else []
    plan = Plan(tuple(parts), n, cases, n_edit, n_swap, swap_fractions, sweep_cases)
    with tqdm(total=plan.images(), desc="evaluating (images)", dynamic_ncols=True) as progress:
        examples, swap_examples = _measure(run.but(progress=progress), plan, report)
    report["targets"] = targets(report)
    report["seconds"] = round(time.time() - started, 1)
    return Evaluation(report, examples, swap_examples)


def _check_categories(categories: tuple[str, ...] | None) -> tuple[str, ...]:
    """The faithfulness categories to score (None: all); a UserError for an unknown one or none."""
    categories = CATEGORIES if categories is None else tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        what = (
            f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}"
            if unknown
            else "no category given"
        )
        raise UserError(f"{what}; choose from {', '.join(CATEGORIES)}")
    return categories


def _header(run: EvaluationRun, n: int) -> dict:
    """The report's first keys: what was measured and how it was sampled."""
    settings = run.settings
    return {
        "n": n,
        "seed": run.seed,
        "resolution": run.resolution,
        "holdout": run.holdout,
        "guidance": settings.guidance,
        "guidance_cutoff": settings.guidance_cutoff,
        "sampler": settings.sampler,
        "mixed_precision": run.pipe.mixed_precision_of(settings),
    }


def _sweep_cases(run: EvaluationRun, n: int, n_samplers: int, cases: dict[str, list[Case]]) -> list[Case]:
    """The sampler sweep's scenes: the first half of `n_samplers` single-object scenes, the rest
    position scenes (the faithfulness part's, when it has them)."""
    half = n_samplers // 2
    sweep = {
        c: cases.get(c) or category_cases(c, n, run.seed, run.resolution, run.holdout)
        for c in ("single object", "position")
    }
    return sweep["single object"][:half] + sweep["position"][: n_samplers - half]


def _measure(run: EvaluationRun, plan: Plan, report: dict) -> tuple[list, dict]:
    """Run the plan's parts into `report`; returns the examples and the swap examples."""
    parts = plan.parts
    examples, swap_examples = [], {}
    if "faithfulness" in parts:
        faithful = faithfulness(run, plan.cases)
        report["faithfulness"], examples = faithful.scores, faithful.examples
        report["localisation"] = {"generated": faithful.localisation}
    if "localisation" in parts:
        report.setdefault("localisation", {})["dataset"] = dataset_localisation(run, plan.n)
    if {"edit", "swap"} & set(parts):
        weighting = run.settings.weighting
        report["weighting"] = {
            "context": weighting.context,
            "steps": None if weighting.steps is None else list(weighting.steps),  # None: each mode's default
            "resolutions": sorted(weighting.resolutions) if weighting.resolutions else None,
        }
    if "edit" in parts:
        report["edit"] = edits.weight_response(run, plan.n_edit)
    if "prior" in parts:
        report["prior"] = edits.prior_response(run, plan.n_edit)
    if "swap" in parts:
        edit_steps = run.settings.edit_steps
        swap = edits.swap_response(run, plan.n_swap, plan.swap_fractions, example_steps=edit_steps)
        report["swap"] = {**swap.rates, "default_edit_steps": edit_steps}
        swap_examples = swap.examples
    if "samplers" in parts:
        report["samplers"] = sampler_sweep(run, plan.sweep_cases)
    return examples, swap_examples


def report_value(report: dict, key: str):
    """The value at `key`, a path of the report's keys ("faithfulness/single object"): a part's
    score where it has one; None where the report has no such key."""
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
        value = report_value(report, key)
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
    """The report as the table evaluate.py prints: the settings, a section per part measured (each
    after a blank line), then the targets."""
    lines = _header_lines(report) + _faithfulness_lines(report)
    for key, section in PART_SECTIONS:
        if key in report:
            lines += ["", *section(report[key])]
    lines += ["", *target_lines(report["targets"])]
    return "\n".join(lines)


def _header_lines(report: dict) -> list[str]:
    return [
        f"evaluation: n={report['n']} per category, seed {report['seed']}, {report['resolution']} px, "
        f"guidance {report.get('guidance', 3.0):g} for {report.get('guidance_cutoff', 1.0):g} of the steps, "
        f"{SAMPLER_LABELS[report.get('sampler', 'dpm++')]} 20 steps, "
        f"mixed precision {report.get('mixed_precision', 'no')}, {report.get('seconds', 0):.0f} s",
        "",
        "detector accuracy on generator images: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["detector"].items() if k != "n"),
    ]


def _faithfulness_lines(report: dict) -> list[str]:
    lines = []
    if "faithfulness" in report:
        lines += ["", f"{'faithfulness':<20} {'score':>6} {'n':>5}"]
        for category, value in report["faithfulness"].items():
            lines.append(f"{category:<20} {fmt(value and value['score']):>6} {value['n'] if value else 0:>5}")
            for count, part in ((value or {}).get("by_count") or {}).items():
                lines.append(f"  {count} object(s){'':<8} {part['score']:>6.3f} {part['n']:>5}")
    for where, values in report.get("localisation", {}).items():
        lines += ["", f"localisation ({where}): " + ", ".join(f"{k} {fmt(v)}" for k, v in values.items())]
    return lines


def _weighting_lines(w: dict) -> list[str]:
    if w["steps"]:
        steps = f"{w['steps'][0]:g}-{w['steps'][1]:g}"
    else:  # each mode's own window
        steps = ", ".join(f"{mode} {a:g}-{b:g}" for mode, (a, b) in DEFAULT_WEIGHT_STEPS.items())
    return [f"weighting: context {w['context']}, steps {steps}, resolutions {w['resolutions'] or 'all'}"]


def _edit_lines(edit: dict) -> list[str]:
    lines = [
        f"weight response (n={edit['n']}; drawn = one clean object)",
        f"{'word':<7} {'mode':<10} {'weight':>6} {'drawn':>6} {'present':>8} {'named|drawn':>11} {'area':>6} "
        f"{'mass':>6} {'grain':>6}",
    ]
    lines += [_edit_row(word, "deleted", "-", base) for word, base in edit["deleted"].items()]
    return lines + [_edit_row(r["word"], r["mode"], f"{r['weight']:g}", r) for r in edit["rows"]]


def _edit_row(word: str, mode: str, weight: str, values: dict) -> str:
    """A row of the weight response: a weight's, or the word deleted (weight "-", no attention mass)."""
    mass = f"{values['mass']:.3f}" if "mass" in values else "-"
    return (
        f"{word:<7} {mode:<10} {weight:>6} {values['drawn']:>6.3f} {values['present']:>8.3f} "
        f"{fmt(values.get('named when drawn')):>11} {values['area']:>6.3f} {mass:>6} {values['grain']:>6.2f}"
    )


def _prior_lines(prior: dict) -> list[str]:
    palette = "; ".join(
        f"{p['prompt']}: " + " ".join(f"{c} {k}" for c, k in p["colours"].items() if k) for p in prior["palette"]
    )
    return [
        f"prior (n={prior['n']}): colour-deleted prompts draw one clean object "
        f"{prior['colour deleted drawn']:.3f}; unconditional samples all clean {prior['unconditional clean']:.3f}",
        f"palette over {prior['palette seeds']} seeds (clean objects per colour): {palette}",
    ]


def _swap_lines(swap: dict) -> list[str]:
    measures = edits.SWAP_MEASURES
    title = (
        f"word swap (n={swap['n']} per kind; rates over the pairs whose source draws its objects"
        f"{'; local blend' if swap.get('local_blend') else ''}; keep layout {swap.get('keep_layout', 'off')})"
    )
    rows = [
        f"{kind:<7} {fraction:>5} {rates['scored']:>6} " + " ".join(f"{fmt(rates[m]):>12}" for m in measures)
        for kind, values in swap["kinds"].items()
        for fraction, rates in values["by_steps"].items()
    ]
    return [title, f"{'kind':<7} {'steps':>5} {'scored':>6} " + " ".join(f"{m[:12]:>12}" for m in measures), *rows]


def _sampler_lines(sweep: dict) -> list[str]:
    reference = sweep["reference"]
    return [
        f"samplers (n={sweep['n']}; reference {reference['sampler']} {reference['steps']} steps: "
        f"{reference['score']:.3f})",
        f"{'sampler':<8} " + " ".join(f"{s:>6}" for s in SAMPLER_STEPS),
        *(
            f"{name:<8} " + " ".join(f"{scores[str(s)]:>6.3f}" for s in SAMPLER_STEPS)
            for name, scores in sweep["scores"].items()
        ),
    ]


# the report's parts after faithfulness and localisation, in the table's order, and their sections
PART_SECTIONS = (
    ("weighting", _weighting_lines),
    ("edit", _edit_lines),
    ("prior", _prior_lines),
    ("swap", _swap_lines),
    ("samplers", _sampler_lines),
)


def target_lines(targets: dict) -> list[str]:
    width = max([len(k) for k in targets] + [40])
    lines = [f"{'target':<{width}} {'value':>6} {'goal':>6} met"]
    lines += [
        f"{key:<{width}} {fmt(t['value']):>6} {fmt(t['target']):>6} {fmt(t['met'])}" for key, t in targets.items()
    ]
    met = [t["met"] for t in targets.values() if t["met"] is not None]
    return lines + [f"{sum(met)} of {len(met)} measured targets met"]


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

"""The evaluation report (diffusion/evaluation/report.py): targets and the printed table from hand-made
reports, the pictures, and evaluate() on the tiny model."""

import json
from itertools import product

import numpy as np
import pytest

from diffusion.errors import UserError
from diffusion.evaluation.edits import (
    EDIT_STEPS,
    EDIT_WEIGHTS,
    SWAP_KINDS,
    WEIGHT_MODES_MEASURED,
    swap_targets,
    weight_contract,
)
from diffusion.evaluation.metrics import CATEGORIES, TARGETS
from diffusion.evaluation.report import (
    STYLES,
    Evaluation,
    edit_plot,
    evaluate,
    format_report,
    swap_plot,
    swap_strip,
    targets,
)
from diffusion.sampling.pipeline import Pipeline, Weighting
from diffusion.sampling.settings import SamplingSettings

HOLDOUT = ["red square", "green triangle", "blue cross", "yellow circle"]
MEASURES = ("new present", "old gone", "colour kept", "edited iou >= 0.8", "centre within 2 px", "others iou >= 0.9")


def edit_part(colour_deleted: float = 0.5, shape_deleted: float = 0.25) -> dict:
    """A weight response that keeps the contract: rising area and mass, an object drawn
    everywhere; each word and mode a little apart (`k`), so that no line hides another."""
    series = list(product(("colour", "shape"), WEIGHT_MODES_MEASURED))
    rows = [
        {
            "word": word,
            "mode": mode,
            "weight": w,
            "drawn": 1.0 - 0.015 * k,
            "present": 0.1 if w == 0 else 1.0 - 0.015 * k,
            "named when drawn": 0.1 if w == 0 else 1.0,
            "area": 0.02 * (1 + w) + 0.01 * k,
            "mass": 0.05 * (1 + w) + 0.02 * k,
            "grain": 1.0 + 0.1 * w + 0.1 * k,
        }
        for k, (word, mode) in enumerate(series)
        for w in EDIT_WEIGHTS
    ]
    deleted = {
        "colour": {
            "drawn": 1.0,
            "present": colour_deleted,
            "named when drawn": colour_deleted,
            "area": 0.02,
            "grain": 1.0,
        },
        "shape": {
            "drawn": 0.9,
            "present": shape_deleted,
            "named when drawn": shape_deleted / 0.9,
            "area": 0.02,
            "grain": 1.0,
        },
    }
    return {"n": 8, "rows": rows, "deleted": deleted}


def swap_part(fractions=("0.2", "0.6")) -> dict:
    """A word-swap part measured at `fractions`: every rate of the k-th kind 0.25 (k + 1)."""
    kinds = {
        kind: {"n": 4, "by_steps": {f: {"scored": 4, **{m: 0.25 * (k + 1) for m in MEASURES}} for f in fractions}}
        for k, kind in enumerate(SWAP_KINDS)
    }
    return {
        "n": 4,
        "edit_steps": [float(f) for f in fractions],
        "local_blend": False,
        "kinds": kinds,
        "default_edit_steps": 0.6,
    }


def hand_made_report() -> dict:
    report = {
        "n": 200,
        "seed": 5,
        "resolution": 32,
        "guidance": 3.0,
        "sampler": "euler",
        "mixed_precision": "no",
        "detector": {"count": 1.0, "colour": 1.0, "shape": 0.99, "size": 1.0, "position": 1.0},
        "faithfulness": {"single object": {"score": 0.995, "n": 200}, "counting": {"score": 0.9, "n": 200}},
        "localisation": {"dataset": {"shape miou": 0.5}},
        "weighting": {"context": "keep", "steps": [0.0, 1.0], "resolutions": None},
        "edit": edit_part(),
        "swap": swap_part(),
        "samplers": {
            "n": 4,
            "reference": {"sampler": "dpm++", "steps": 250, "score": 0.85},
            "scores": {name: {str(s): 0.83 for s in (5, 10, 20, 50)} for name in ("dpm++", "ddim", "ddpm", "euler")},
        },
    }
    report["targets"] = targets(report)
    return report


# ---- targets and the table ---------------------------------------------------------------------


def test_targets_from_a_hand_made_report():
    report = hand_made_report()
    result = report["targets"]
    assert set(TARGETS) <= set(result)
    assert result["faithfulness/single object"]["met"] is True
    assert result["localisation/dataset/shape miou"]["met"] is False
    assert result["faithfulness/counting"]["met"] is True  # exactly at the goal
    assert result["faithfulness/position"]["met"] is None
    assert result["samplers/dpm++ 20 steps gap to reference (at most)"]["met"] is True  # 0.85 - 0.83 == 0.02
    contract = weight_contract(report["edit"])
    swaps = swap_targets(report["swap"], 0.6)
    assert contract and swaps
    assert {k: result[k] for k in contract} == contract and {k: result[k] for k in swaps} == swaps
    assert all(t["met"] for t in contract.values())
    # colour swaps at 0.25, shape swaps at 0.5: every swap target missed
    assert all(t["met"] is False for t in swaps.values())
    report["swap"]["default_edit_steps"] = 0.2  # the targets read the value the report names
    assert set(swap_targets(report["swap"], 0.2)) <= set(targets(report))
    assert not any("edit steps 0.6" in key for key in targets(report))
    for part in ("edit", "swap", "samplers"):
        del report[part]
    assert set(targets(report)) == set(TARGETS)  # parts not run add no targets


def test_format_report_prints_every_part_and_how_many_targets_are_met():
    report = hand_made_report()
    text = format_report(report)
    for fragment in (
        "weighting: context keep, steps 0-1, resolutions all",
        "weight response (n=8; drawn = one clean object)",
        "word swap (n=4 per kind",
        "samplers (n=4; reference dpm++ 250 steps: 0.850)",
        "single object",
    ):
        assert fragment in text
    lines = text.splitlines()
    assert sum(line.split()[:2] in (["colour", "deleted"], ["shape", "deleted"]) for line in lines) == 2
    assert sum(
        line.split()[:2] in [[w, m] for w in ("colour", "shape") for m in WEIGHT_MODES_MEASURED] for line in lines
    ) == len(report["edit"]["rows"])
    assert sum(
        line.split()[:2] in ([kind, f] for kind in SWAP_KINDS for f in ("0.2", "0.6")) for line in lines
    ) == 2 * len(SWAP_KINDS)
    for key, target in report["targets"].items():
        (line,) = [line for line in lines if line.startswith(key + " ")]
        assert line.endswith({True: "yes", False: "no", None: "-"}[target["met"]])
    measured = [t["met"] for t in report["targets"].values() if t["met"] is not None]
    assert lines[-1] == f"{sum(measured)} of {len(measured)} measured targets met"
    assert 0 < sum(measured) < len(measured)  # the count can tell met from missed
    assert "local blend" not in text
    report["swap"]["local_blend"] = True
    assert "; local blend; keep layout off)" in format_report(report)  # a report from before the option
    report["swap"]["keep_layout"] = "auto"
    assert "; local blend; keep layout auto)" in format_report(report)


# ---- pictures ----------------------------------------------------------------------------------


def test_edit_plot_draws_every_series_and_the_word_deleted_floors():
    plot = edit_plot(edit_part(colour_deleted=0.5, shape_deleted=0.25))
    pixels = np.asarray(plot)
    assert plot.size == (960, 250)
    panel = 960 // 5
    for colour in STYLES.values():  # every word and mode, in each of the five panels
        columns = np.nonzero((pixels[:188] == colour).all(-1))[1]
        assert {int(x) // panel for x in columns} == set(range(5)), colour
    # the present panel (the second): one dashed floor per word at its value, 0.5 above 0.25
    present = pixels[24:189, panel + 40 : 2 * panel - 12]
    floors = {
        word: np.nonzero((present == tuple(c // 2 for c in STYLES[(word, "attention")])).all(-1))[0]
        for word in ("colour", "shape")
    }
    assert len(floors["colour"]) and len(floors["shape"])
    assert np.median(floors["colour"]) < np.median(floors["shape"])  # smaller y: higher


def test_swap_plot_draws_a_line_per_kind():
    colours = {"colour": (220, 50, 50), "shape": (40, 80, 220), "size": (60, 160, 60), "add": (200, 140, 20)}
    for fractions in (("0", "0.6", "1"), ("0.6",)):  # a single value still draws
        pixels = np.asarray(swap_plot(swap_part(fractions)))
        for kind, colour in colours.items():
            assert (pixels[:188] == colour).all(-1).any(), (kind, fractions)
    unscored = swap_part(("0.6", "1"))  # no pair scored: no rates, still a picture
    unscored["kinds"]["colour"]["by_steps"]["0.6"].update({m: None for m in MEASURES}, scored=0)
    assert swap_plot(unscored).size == (960, 250)


def test_swap_strip_shows_the_first_two_pairs_of_each_kind():
    examples, colours = {}, {}
    for k, kind in enumerate(SWAP_KINDS):
        examples[kind] = []
        for pair in range(3):
            source = np.full((16, 16, 3), (40 * k + 10, 20 * pair + 5, 200), np.uint8)
            edit = np.full((16, 16, 3), (40 * k + 10, 20 * pair + 5, 100), np.uint8)
            examples[kind].append((f"{kind} source {pair}", f"{kind} edit {pair}", source, edit))
            colours[(kind, pair)] = [tuple(source[0, 0]), tuple(edit[0, 0])]
    pixels = np.asarray(swap_strip(examples))
    for (kind, pair), pair_colours in colours.items():
        for colour in pair_colours:
            count = int((pixels == colour).all(-1).sum())
            assert count == (128 * 128 if pair < 2 else 0), (kind, pair, count)  # scaled up to 128 px


# ---- evaluate() on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline.from_pretrained(tiny_model, device="cpu")


def small_evaluation(pipe, settings: SamplingSettings | None = None, **options) -> Evaluation:
    """evaluate() with the tests' held-out pairs and small sizes (a prompt, a detector scene); `options` over them."""
    return evaluate(pipe, settings, **{"n": 1, "holdout": HOLDOUT, "batch_size": 8, "detector_n": 1, **options})


def test_evaluate_smoke_on_the_tiny_model(pipe):
    report, examples, swap_examples = small_evaluation(
        pipe, n=2, n_samplers=2, detector_n=10, parts=("faithfulness", "localisation", "samplers")
    )
    assert set(report["faithfulness"]) == set(CATEGORIES)
    for value in report["faithfulness"].values():
        assert value["n"] == 2 and 0 <= value["score"] <= 1
    by_count = report["faithfulness"]["counting"]["by_count"]  # the counting score split by count
    assert set(by_count) <= {"1", "2", "3", "4"} and sum(v["n"] for v in by_count.values()) == 2
    assert sum(v["score"] * v["n"] for v in by_count.values()) == pytest.approx(
        2 * report["faithfulness"]["counting"]["score"]
    )
    assert set(report["localisation"]) == {"generated", "dataset"}
    assert {"shape miou", "shape pointing", "colour miou", "colour pointing"} <= set(report["localisation"]["dataset"])
    assert report["localisation"]["dataset"]["shape words"] > 0
    assert set(report["samplers"]["scores"]) == {"dpm++", "ddim", "ddpm", "euler"}
    assert set(TARGETS) <= set(report["targets"])
    assert not {"edit", "swap", "weighting"} & set(report)
    assert not any(key.startswith(("edit/", "swap/")) for key in report["targets"])
    assert min(report["detector"][k] for k in ("colour", "shape", "size", "position")) >= 0.9
    json.dumps(report)  # JSON-ready
    assert "faithfulness" in format_report(report) and examples and swap_examples == {}
    assert report["sampler"] == "euler" and "Euler 20 steps" in format_report(report)


@pytest.fixture(scope="module")
def edit_run(pipe):
    """evaluate() of the edit and swap parts with context "keep", and
    every batch it sampled: (prompts, weighted, weighting, swap)."""
    batches = []
    sample_batch = pipe.sample_batch

    def recording(prompts, seeds, settings, *args, **kwargs):
        weighted = any(w != 1 for p in prompts for _, _, w in p.weights)
        batches.append(([p.text for p in prompts], weighted, settings.weighting, kwargs.get("swap") is not None))
        return sample_batch(prompts, seeds, settings, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipe, "sample_batch", recording)
        settings = SamplingSettings(weighting=Weighting(context="keep"))
        report, examples, swap_examples = small_evaluation(pipe, settings, n_edit=1, n_swap=1, parts=("edit", "swap"))
    return report, examples, swap_examples, batches


def test_evaluate_measures_the_weight_response(edit_run):
    report, examples, _, _ = edit_run
    edit = report["edit"]
    assert edit["n"] == 1 and examples == [] and "faithfulness" not in report
    settings = [(r["word"], r["mode"], r["weight"]) for r in edit["rows"]]
    assert sorted(settings) == sorted(product(("colour", "shape"), ("attention", "embedding"), EDIT_WEIGHTS))
    for row in edit["rows"]:
        assert {"drawn", "present", "named when drawn", "area", "mass", "grain"} <= set(row)
        assert all(0 <= row[k] <= 1 for k in ("drawn", "present", "area", "mass")) and row["grain"] >= 0
    for word in ("colour", "shape"):  # weight 1 is the plain prompt, sampled once for both modes
        ones = [
            {k: v for k, v in r.items() if k != "mode"} for r in edit["rows"] if (r["word"], r["weight"]) == (word, 1)
        ]
        assert ones[0] == ones[1]
    assert set(edit["deleted"]) == {"colour", "shape"}
    for base in edit["deleted"].values():
        assert set(base) == {"drawn", "present", "named when drawn", "area", "grain"}


def test_evaluate_measures_every_swap_kind(edit_run):
    report, _, swap_examples, _ = edit_run
    swap = report["swap"]
    assert set(swap["kinds"]) == set(SWAP_KINDS)
    assert swap["default_edit_steps"] == 0.6 and swap["edit_steps"] == [0.6] and swap["local_blend"] is False
    for values in swap["kinds"].values():
        (rates,) = values["by_steps"].values()
        assert list(values["by_steps"]) == ["0.6"] and rates["scored"] in (0, 1)
        assert set(MEASURES) <= set(rates)
        assert all(rates[m] is None if rates["scored"] == 0 else rates[m] in (0.0, 1.0) for m in MEASURES)
    assert set(swap_examples) == set(SWAP_KINDS)
    for pairs in swap_examples.values():
        ((source_prompt, edit_prompt, source, edit),) = pairs
        assert source_prompt != edit_prompt and source.shape == edit.shape == (16, 16, 3)
    json.dumps(report)


def test_evaluate_records_and_uses_the_weighting_it_is_given(edit_run):
    report, _, _, batches = edit_run
    assert report["weighting"] == {"context": "keep", "steps": None, "resolutions": None}
    weighted = {(w.mode, w.context, w.window) for _, is_weighted, w, _ in batches if is_weighted}
    assert weighted == {("attention", "keep", (0.0, 1.0)), ("embedding", "keep", (0.0, 0.3))}  # each mode's window
    swaps = [(prompts, w) for prompts, _, w, swap in batches if swap]
    assert len(swaps) == len(SWAP_KINDS) and all(len(prompts) == 2 for prompts, _ in swaps)  # a source, an edit
    assert all(w.context == "keep" for _, w in swaps)
    # per word: the word deleted, five weights in each mode and weight 1 once
    assert sum(not swap for *_, swap in batches) == 2 * (1 + 2 * 5 + 1)


def test_evaluate_targets_and_table_hold_the_contract_and_the_swap(edit_run):
    report, *_ = edit_run
    contract = weight_contract(report["edit"])
    swaps = swap_targets(report["swap"], 0.6)
    assert len(contract) == 2 * 2 * 7 and len(swaps) == 8
    assert {k: report["targets"][k] for k in {**contract, **swaps}} == {**contract, **swaps}
    text = format_report(report)
    assert "weighting: context keep" in text
    for key in {**contract, **swaps}:
        assert key in text
    measured = [t["met"] for t in report["targets"].values() if t["met"] is not None]
    assert text.splitlines()[-1] == f"{sum(measured)} of {len(measured)} measured targets met"


def test_evaluate_sweeps_the_edit_steps_and_checks_the_value_it_is_given(pipe):
    settings = SamplingSettings(edit_steps=0.5, local_blend=True, keep_layout=True)
    report, _, swap_examples = small_evaluation(pipe, settings, n_swap=1, parts=("swap",), swap_sweep=True)
    swap = report["swap"]
    swept = sorted(set(EDIT_STEPS) | {0.5})
    assert swap["edit_steps"] == swept and swap["default_edit_steps"] == 0.5 and swap["local_blend"] is True
    for values in swap["kinds"].values():
        assert list(values["by_steps"]) == [f"{f:g}" for f in swept]
    swaps = {key for key in report["targets"] if key.startswith("swap/")}
    assert swaps == set(swap_targets(swap, 0.5)) and all("at edit steps 0.5:" in key for key in swaps)
    assert set(swap_examples) == set(SWAP_KINDS)
    assert swap["keep_layout"] == "on" and "; local blend; keep layout on)" in format_report(report)


def test_evaluate_scores_only_the_categories_it_is_given(pipe):
    report, _, _ = small_evaluation(
        pipe, n=3, n_samplers=2, parts=("faithfulness", "samplers"), categories=("single object",)
    )
    assert set(report["faithfulness"]) == {"single object"} and report["faithfulness"]["single object"]["n"] == 3
    assert report["targets"]["faithfulness/single object"]["value"] == report["faithfulness"]["single object"]["score"]
    assert report["targets"]["faithfulness/position"]["met"] is None  # not measured, not failed
    assert report["samplers"]["n"] == 2  # the sweep still finds its position prompts
    with pytest.raises(UserError, match="unknown category 'colour'"):
        small_evaluation(pipe, parts=("faithfulness",), categories=("colour",))
    with pytest.raises(UserError, match="training data seed"):
        small_evaluation(pipe, seed=4, training_seed=4, parts=("edit",))


def test_evaluate_samples_no_faithfulness_scenes_for_the_other_parts(pipe):
    """The faithfulness categories (100 scenes each by default, counting up to 4 objects) are not
    built when neither faithfulness nor the sampler sweep runs: four objects do not always fit in
    a 16 px image, and the word swap never needs them."""
    report, _, _ = small_evaluation(pipe, n=100, n_swap=1, parts=("swap",))
    assert set(report["swap"]["kinds"]) == set(SWAP_KINDS)

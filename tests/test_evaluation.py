"""The evaluation: metrics on hand-made maps, prompt conditions, a perfect "model" (the generator's
own images) scoring ~1, the report's schema, and evaluate.py on the tiny model."""
import json

import numpy as np
import pytest
import torch

from diffusion.shapes import render_scene
from diffusion.detector import Detection, detect
from diffusion.errors import UserError
from diffusion.evaluation import (CATEGORIES, TARGETS, Case, category_cases, edit_plot, evaluate, format_report,
                                  map_iou, passes, pointing, span_map, stated_positions, targets)

HOLDOUT = ["red square", "green triangle", "blue cross", "yellow circle"]


def box(side, y0, y1, x0, x1):
    mask = np.zeros((side, side), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_iou_and_pointing_on_hand_made_maps():
    mask = box(8, 2, 4, 2, 4)                      # 4 pixels
    exact = mask.astype(float)
    assert map_iou(exact, mask) == 1.0 and pointing(exact, mask)
    wide = box(8, 2, 4, 2, 6).astype(float)       # 8 pixels, half of them outside
    assert map_iou(wide, mask) == pytest.approx(0.5)
    faint = exact + 0.3 * box(8, 0, 8, 0, 8)       # below 0.4 x max outside the mask: not in the region
    assert map_iou(faint, mask) == 1.0
    elsewhere = box(8, 6, 8, 6, 8).astype(float)
    assert map_iou(elsewhere, mask) == 0.0 and not pointing(elsewhere, mask)
    assert map_iou(np.zeros((8, 8)), mask) == 0.0


def test_span_map_sums_the_tokens_of_a_character_span():
    maps = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2)
    offsets = torch.tensor([[0, 0], [0, 1], [2, 5], [6, 9]])  # start token, "a", "red", "box"
    assert np.array_equal(span_map(maps, offsets, (2, 5)), maps[2].numpy())
    assert np.array_equal(span_map(maps, offsets, (0, 5)), (maps[1] + maps[2]).numpy())


def test_stated_positions_reads_absolute_places_and_relations():
    cases = category_cases("position", 40, 7, 32, HOLDOUT)
    kinds = set()
    for case in cases:
        facts = stated_positions(case.scene)
        assert facts, case.prompt
        kinds.add(facts[0][0])
        for fact in facts:
            if fact[0] == "relation":
                a, b = case.scene.objects[fact[1]], case.scene.objects[fact[2]]
                subject = case.prompt.index(a.colour + " " + a.shape)
                assert subject < case.prompt.index(fact[3]) < case.prompt.rindex(b.colour + " " + b.shape)
            else:
                assert case.scene.objects[fact[1]].position == fact[2]
    assert kinds == {"at", "relation"}


def test_categories_are_deterministic_and_hold_what_they_say():
    for category in CATEGORIES:
        a = category_cases(category, 12, 5, 32, HOLDOUT)
        b = category_cases(category, 12, 5, 32, HOLDOUT)
        assert [c.prompt for c in a] == [c.prompt for c in b] and len(a) == 12
    held = {tuple(p.split()) for p in HOLDOUT}
    for case in category_cases("held-out pairs", 20, 5, 32, HOLDOUT):
        assert (case.scene.objects[0].colour, case.scene.objects[0].shape) in held
    for case in category_cases("single object", 20, 5, 32, HOLDOUT):
        assert (case.scene.objects[0].colour, case.scene.objects[0].shape) not in held
    assert {len(c.scene.objects) for c in category_cases("counting", 60, 5, 32, HOLDOUT)} == {1, 2, 3, 4}
    assert category_cases("held-out pairs", 5, 5, 32, []) == []


def detection(colour, shape, position, center, side=32):
    return Detection(colour, shape, "large", position, center, np.zeros((side, side), bool), 10)


def test_passes_needs_every_stated_condition():
    case = next(c for c in category_cases("position", 50, 3, 32, HOLDOUT)
                if len(c.scene.objects) == 1 and stated_positions(c.scene))
    obj = case.scene.objects[0]
    assert passes(case, [detection(obj.colour, obj.shape, obj.position, obj.center)])
    wrong_place = next(p for p in ("left", "right") if p != obj.position)
    assert not passes(case, [detection(obj.colour, obj.shape, wrong_place, obj.center)])
    other_colour = next(c for c in ("red", "blue") if c != obj.colour)
    assert not passes(case, [detection(other_colour, obj.shape, obj.position, obj.center)])
    assert not passes(case, [])
    counting = Case("counting", case.scene)
    assert passes(counting, [detection("red", "circle", "left", (1, 1))])
    assert not passes(counting, [detection("red", "circle", "left", (1, 1))] * 2)


def test_the_generators_own_images_pass_almost_every_prompt():
    """A model that drew exactly what the generator draws would score ~1: the conditions and the
    detector agree with the ground truth."""
    for category in CATEGORIES:
        cases = category_cases(category, 25, 11, 32, HOLDOUT)
        score = np.mean([passes(c, detect(render_scene(c.scene, 32)[0])) for c in cases])
        assert score >= 0.96, (category, score)


def test_targets_and_plot_from_a_report():
    rows = [{"word": w, "mode": m, "weight": x, "present": p, "drawn": 0.25 if x == 0 else 1.0, "area": 0.1, "mass": 0.05 * x}
            for w in ("colour", "shape") for m in ("attention", "embedding")
            for x, p in ((0.0, 0.05 if m == "embedding" else 0.5), (0.5, 0.5), (1.0, 1.0), (2.0, 1.0), (4.0, 1.0))]
    report = {"faithfulness": {"single object": {"score": 0.995, "n": 200}, "counting": {"score": 0.9, "n": 200}},
              "localisation": {"dataset": {"shape miou": 0.5}}, "edit_response": rows,
              "samplers": {"reference": {"score": 0.85}, "scores": {"dpm++": {"20": 0.83}}}}
    result = targets(report)
    assert result["faithfulness/single object"]["met"] is True
    assert result["localisation/dataset/shape miou"]["met"] is False
    assert result["faithfulness/counting"]["met"] is True  # exactly at the goal
    assert result["faithfulness/position"]["met"] is None
    assert result["edit/colour weight 0 present, embedding mode (at most)"]["met"] is True
    assert result["edit/colour weight 0 present, embedding mode (at most)"]["object drawn"] == 0.25
    assert result["edit/colour weight 0 present, attention mode (at most)"]["met"] is False
    assert result["samplers/dpm++ 20 steps gap to reference (at most)"]["met"] is True  # 0.85 - 0.83 == 0.02
    assert result["edit/attention mode mass monotone in weight"]["met"] is True
    rows[2]["mass"] = 1.0  # attention mode, weight 0.5: now above weight 1
    assert targets(report)["edit/attention mode mass monotone in weight"]["met"] is False
    plot = edit_plot(rows)
    assert plot.size == (720, 240) and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 5
    # with the word-deleted floors: one dashed line each in the present chart, at its value
    pixels = np.asarray(edit_plot(rows, {"colour": 0.5, "shape": 0.25}))
    colour_floor = np.nonzero((pixels[:, :240] == (150, 20, 20)).all(-1))[0]
    shape_floor = np.nonzero((pixels[:, :240] == (20, 40, 150)).all(-1))[0]
    assert len(colour_floor) and len(shape_floor)
    assert np.median(colour_floor) < np.median(shape_floor)  # 0.5 sits higher (smaller y) than 0.25


def test_evaluate_smoke_on_the_tiny_model(tiny_model):
    from diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    report, examples = evaluate(pipe, n=2, holdout=HOLDOUT, n_edit=1, n_samplers=2, batch_size=8, detector_n=10)
    assert set(report["faithfulness"]) == set(CATEGORIES)
    for value in report["faithfulness"].values():
        assert value["n"] == 2 and 0 <= value["score"] <= 1
    by_count = report["faithfulness"]["counting"]["by_count"]  # the counting score split by count
    assert set(by_count) <= {"1", "2", "3", "4"} and sum(v["n"] for v in by_count.values()) == 2
    assert sum(v["score"] * v["n"] for v in by_count.values()) == pytest.approx(2 * report["faithfulness"]["counting"]["score"])
    assert set(report["localisation"]) == {"generated", "dataset"}
    assert {"shape miou", "shape pointing", "colour miou", "colour pointing"} <= set(report["localisation"]["dataset"])
    assert report["localisation"]["dataset"]["shape words"] > 0
    assert len(report["edit_response"]) == 20
    for row in report["edit_response"]:
        assert set(row) == {"word", "mode", "weight", "present", "drawn", "area", "mass"}
        assert 0 <= row["present"] <= row["drawn"] <= 1  # an attribute is only present on a drawn object
        assert (row["area"] > 0) == (row["drawn"] > 0)
    assert set(report["edit_baseline"]) == {"n", "colour", "shape", "negative"} and 0 <= report["edit_baseline"]["colour"] <= 1
    assert set(report["edit_baseline"]["negative"]) == {"colour", "shape"}
    for mode in ("embedding", "attention"):
        entry = report["targets"][f"edit/colour weight 0 present, {mode} mode (at most)"]
        assert entry["word deleted"] == report["edit_baseline"]["colour"]
        assert entry["word deleted, as negative prompt"] == report["edit_baseline"]["negative"]["colour"]
    assert set(report["samplers"]["scores"]) == {"dpm++", "ddim", "ddpm", "euler"}
    assert set(TARGETS) <= set(report["targets"])
    assert min(report["detector"][k] for k in ("colour", "shape", "size", "position")) >= 0.9
    json.dumps(report)  # JSON-ready
    assert "faithfulness" in format_report(report) and examples
    assert report["sampler"] == "euler" and "Euler 20 steps" in format_report(report)
    assert report["weight_context"] == "fade" and "weight context: fade" in format_report(report)
    drawn = report["targets"]["edit/colour weight 0 present, attention mode (at most)"]["object drawn"]
    assert f"(an object drawn in {drawn:.2f}; word deleted" in format_report(report)


def test_evaluate_edits_with_the_weight_context_it_is_given(tiny_model, monkeypatch):
    from diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    used = set()  # (mode, context) of every batch that holds a weighted prompt
    sample_batch = pipe.sample_batch

    def recording(prompts, seeds, settings, maps, weighting, *args, **kwargs):
        if any(w != 1 for p in prompts for _, _, w in p.weights):
            used.add((weighting.mode, weighting.context))
        return sample_batch(prompts, seeds, settings, maps, weighting, *args, **kwargs)

    monkeypatch.setattr(pipe, "sample_batch", recording)
    report, _ = evaluate(pipe, n=1, holdout=HOLDOUT, n_edit=1, batch_size=8, detector_n=1, parts=("edit",),
                         weight_context="keep")
    assert report["weight_context"] == "keep"
    assert used == {("attention", "keep"), ("embedding", "keep")}


def test_evaluate_scores_only_the_categories_it_is_given(tiny_model):
    from diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model, device="cpu")
    report, _ = evaluate(pipe, n=3, holdout=HOLDOUT, n_samplers=2, batch_size=8, detector_n=1,
                         parts=("faithfulness", "samplers"), categories=("single object",))
    assert set(report["faithfulness"]) == {"single object"} and report["faithfulness"]["single object"]["n"] == 3
    assert report["targets"]["faithfulness/single object"]["value"] == report["faithfulness"]["single object"]["score"]
    assert report["targets"]["faithfulness/position"]["met"] is None  # not measured, not failed
    assert report["samplers"]["n"] == 2  # the sweep still finds its position prompts
    with pytest.raises(UserError, match="unknown category 'colour'"):
        evaluate(pipe, n=1, holdout=HOLDOUT, parts=("faithfulness",), categories=("colour",))


def test_evaluate_cli_writes_json_and_pictures(tiny_model, tmp_path, run_cli):
    out = tmp_path / "report.json"
    result = run_cli("evaluate.py", "--model", tiny_model, "--n", 1, "--n-edit", 1, "--n-samplers", 1,
                     "--parts", "faithfulness,edit", "--guidance", 5, "--mixed-precision", "no", "--sampler", "ddim",
                     "--weight-context", "keep", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "faithfulness" in report and "edit_response" in report and "samplers" not in report
    assert report["guidance"] == 5 and report["mixed_precision"] == "no" and report["sampler"] == "ddim"
    assert "DDIM 20 steps" in result.stdout and report["weight_context"] == "keep"
    assert (tmp_path / "report-examples.png").is_file() and (tmp_path / "report-edit.png").is_file()
    assert "single object" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--parts", "speed"], "unknown part"),
    (["--categories", "single object,shapes"], "unknown category 'shapes'; choose from single object"),
    (["--categories", ","], "no category given; choose from single object"),
    (["--seed", "0"], "training data seed"),
    (["--guidance", "-1"], "--guidance must be a finite number"),
    (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    (["--sampler", "plms"], "invalid choice: 'plms'"),
    (["--weight-context", "forget"], "invalid choice: 'forget'"),
])
def test_evaluate_cli_bad_input_is_one_line(tiny_model, run_cli, args, message):
    result = run_cli("evaluate.py", "--model", tiny_model, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

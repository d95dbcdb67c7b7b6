"""The evaluation: metrics on hand-made maps, prompt conditions, a perfect "model" (the generator's
own images) scoring ~1, and evaluate.py on the tiny model (the report itself: test_report.py)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.shapes import render_scene
from diffusion.evaluation.detector import Detection, detect
from diffusion.evaluation.edits import SWAP_KINDS, SWAP_MEASURES
from diffusion.evaluation.metrics import (
    CATEGORIES,
    Case,
    category_cases,
    map_iou,
    passes,
    pointing,
    span_map,
    stated_positions,
)

HOLDOUT = ["red square", "green triangle", "blue cross", "yellow circle"]


def box(side, y0, y1, x0, x1):
    mask = np.zeros((side, side), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_iou_and_pointing_on_hand_made_maps():
    mask = box(8, 2, 4, 2, 4)  # 4 pixels
    exact = mask.astype(float)
    assert map_iou(exact, mask) == 1.0 and pointing(exact, mask)
    wide = box(8, 2, 4, 2, 6).astype(float)  # 8 pixels, half of them outside
    assert map_iou(wide, mask) == pytest.approx(0.5)
    faint = exact + 0.3 * box(8, 0, 8, 0, 8)  # below 0.4 x max outside the mask: not in the region
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
    case = next(
        c
        for c in category_cases("position", 50, 3, 32, HOLDOUT)
        if len(c.scene.objects) == 1 and stated_positions(c.scene)
    )
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


def evaluate_cli(run_cli, model, out, options: str):
    """evaluate.py on `model` with `options` (a command line's, split at spaces) and --out `out`."""
    return run_cli("evaluate.py", "--model", model, *options.split(), "--out", out)


def assert_pictures(folder, names: list[str], report: dict) -> None:
    """`folder` holds the report and exactly the PNGs `names`, each naming the report's model."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    for name in names:
        if name.endswith(".png"):
            with Image.open(folder / name) as picture:
                assert picture.format == "PNG" and picture.info["model"] == report["model"]


def test_evaluate_cli_writes_json_and_pictures(tiny_model, tmp_path, run_cli):
    out = tmp_path / "new" / "report.json"  # the folder is created
    options = "--n 1 --n-edit 1 --n-samplers 1 --parts faithfulness,edit --guidance 5 --mixed-precision no "
    result = evaluate_cli(run_cli, tiny_model, out, options + "--sampler ddim --weight-context keep")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "faithfulness" in report and "edit" in report and not {"swap", "samplers"} & set(report)
    assert report["guidance"] == 5 and report["mixed_precision"] == "no" and report["sampler"] == "ddim"
    assert "DDIM 20 steps" in result.stdout and report["weighting"]["context"] == "keep"
    assert "weighting: context keep" in result.stdout and "measured targets met" in result.stdout
    assert "single object" in result.stdout
    assert_pictures(out.parent, ["report-edit.png", "report-examples.png", "report.json"], report)


def test_evaluate_cli_swap_options_and_pictures(tiny_model, tmp_path, run_cli):
    out = tmp_path / "swap.json"
    result = evaluate_cli(run_cli, tiny_model, out, "--n 1 --n-swap 1 --parts swap --local-blend --edit-steps 0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert not {"faithfulness", "edit", "samplers"} & set(report)
    assert report["swap"]["edit_steps"] == [0.5] and report["swap"]["default_edit_steps"] == 0.5
    assert set(report["swap"]["kinds"]) == set(SWAP_KINDS)
    assert all(list(values["by_steps"]) == ["0.5"] for values in report["swap"]["kinds"].values())
    assert report["swap"]["local_blend"] is True and "; local blend; keep layout auto)" in result.stdout
    assert report["swap"]["keep_layout"] == "auto"
    assert any(key.startswith("swap/colour swap at edit steps 0.5:") for key in report["targets"])
    assert_pictures(tmp_path, ["swap-swap-strip.png", "swap-swap.png", "swap.json"], report)


def test_evaluate_cli_hands_its_options_to_evaluate(tiny_model, tmp_path, monkeypatch):
    """In process, with evaluate() replaced: every edit and swap option reaches it, the sampling
    ones as its settings."""
    import diffusion.evaluation.report
    from diffusion.evaluation.report import Evaluation
    from diffusion.sampling.pipeline import Weighting
    from diffusion.sampling.settings import SamplingSettings

    spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).parents[1] / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    given = {}
    image = np.zeros((16, 16, 3), np.uint8)

    def fake_evaluate(pipe, settings, **kwargs):
        given.update(kwargs, settings=settings)
        unscored = {
            "scored": 0,
            **dict.fromkeys(SWAP_MEASURES),
        }
        swap = {
            "n": 3,
            "edit_steps": [0.0, 0.3],
            "local_blend": True,
            "default_edit_steps": 0.3,
            "kinds": {"colour": {"n": 3, "by_steps": {"0": unscored, "0.3": unscored}}},
        }
        report = {
            "n": 1,
            "seed": kwargs["seed"],
            "resolution": 16,
            "detector": {"count": 1.0},
            "swap": swap,
            "targets": {},
        }
        return Evaluation(report, [], {"colour": [("a red circle", "a blue circle", image, image)]})

    monkeypatch.setattr(diffusion.evaluation.report, "evaluate", fake_evaluate)
    out = tmp_path / "report.json"
    options = "--parts edit,swap --n-edit 2 --n-swap 3 --swap-sweep --local-blend --keep-layout off --edit-steps 0.3"
    cli.main(["--model", str(tiny_model), *options.split(), "--weight-context", "keep", "--out", str(out)])
    assert given["parts"] == ("edit", "swap") and given["n_edit"] == 2 and given["n_swap"] == 3
    assert given["swap_sweep"] is True
    settings = SamplingSettings(
        weighting=Weighting(context="keep"), edit_steps=0.3, local_blend=True, keep_layout=False
    )
    assert given["settings"] == settings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-swap-strip.png", "report-swap.png", "report.json"]
    cli.main(["--model", str(tiny_model), "--out", str(out)])
    assert given["swap_sweep"] is False
    assert given["settings"] == SamplingSettings()  # edit steps 0.6, no local blend, keep layout auto
    # the default run: every part but the sampler sweep, 16 prompts for the edits and each swap
    assert given["parts"] == ("faithfulness", "localisation", "edit", "prior", "swap")
    assert given["n_edit"] == 12 and given["n_swap"] == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be at least 1"),
        (["--parts", "speed"], "unknown part"),
        (["--categories", "single object,shapes"], "unknown category 'shapes'; choose from single object"),
        (["--categories", ","], "no category given; choose from single object"),
        (["--seed", "0"], "training data seed"),
        (["--guidance", "-1"], "--guidance must be a finite number"),
        (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        (["--sampler", "plms"], "invalid choice: 'plms'"),
        (["--weight-context", "forget"], "invalid choice: 'forget'"),
        (["--keep-layout", "yes"], "invalid choice: 'yes'"),
        (["--n-swap", "0"], "--n-swap must be at least 1"),
        (["--parts", "edit,swaps"], "unknown part(s) 'swaps'"),
        (["--edit-steps", "2"], "--edit-steps must be a fraction in [0, 1], got '2'"),
        (["--edit-steps", "x"], "--edit-steps must be a fraction in [0, 1], got 'x'"),
        (["--edit-steps", "nan"], "--edit-steps must be a fraction in [0, 1], got 'nan'"),
        (["--guidance-cutoff", "1.5"], "--guidance-cutoff must be a fraction in [0, 1], got '1.5'"),
        (["--guidance-cutoff", "x"], "--guidance-cutoff must be a fraction in [0, 1], got 'x'"),
    ],
)
def test_evaluate_cli_bad_input_is_one_line(tiny_model, run_cli, args, message):
    result = run_cli("evaluate.py", "--model", tiny_model, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

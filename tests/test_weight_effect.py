"""Edits measured on a model that follows its prompts (tests/assets/small-shapes, made by
tests/make_small_model.py): weight 0 on a colour word must lower that colour's share of the image."""

from pathlib import Path

import numpy as np
import pytest

from diffusion.data.shapes import COLOURS, POSITION_PHRASES, SHAPES
from diffusion.evaluation.detector import MIN_COVERAGE, pixel_colours
from diffusion.sampling.pipeline import Pipeline, Weighting

SMALL = Path(__file__).parent / "assets" / "small-shapes"


@pytest.fixture(scope="module")
def small():
    return Pipeline.from_pretrained(SMALL, device="cpu")


def colour_share(images, colour: str) -> float:
    """Mean fraction of pixels at least half covered by `colour` (the detector's reading of a pixel)."""
    index = list(COLOURS).index(colour)
    shares = []
    for image in images:
        colours, coverage, _ = pixel_colours(np.asarray(image))
        shares.append(((colours == index) & (coverage >= MIN_COVERAGE)).mean())
    return float(np.mean(shares))


def prompts_for(colour: str, weight: str) -> list[str]:
    return [f"a {weight} {shape} {phrase}" for shape in SHAPES for phrase in list(POSITION_PHRASES.values())[:3]]


@pytest.mark.parametrize("colour", ["red", "blue", "green"])
@pytest.mark.parametrize("mode", ["attention", "embedding"])
def test_weight_zero_on_a_colour_word_lowers_that_colours_share(small, colour, mode):
    plain = small(prompts_for(colour, colour), steps=10, progress=False).images
    removed = small(prompts_for(colour, f"({colour}:0)"), steps=10, progress=False, weighting=Weighting(mode)).images
    plain_share, removed_share = colour_share(plain, colour), colour_share(removed, colour)
    assert plain_share > 0.03, f"the model should draw {colour} when asked ({plain_share:.3f})"
    assert removed_share < 0.5 * plain_share, f"{colour}: {plain_share:.3f} -> {removed_share:.3f}"


def test_attention_weight_response_is_monotone(small):
    shares = []
    for weight in ("0", "0.5", "1"):
        images = small(prompts_for("red", f"(red:{weight})"), steps=10, progress=False).images
        shares.append(colour_share(images, "red"))
    assert shares[0] < shares[1] <= shares[2] + 0.01, shares


def test_weight_zero_keeps_an_object_and_leaves_the_colour_to_the_prior(small):
    """The edit contract as far as a 16 px model can hold it. It draws one clean object (one colour, a
    shape) in about 0.8 of plain prompts and 0.5 with the colour word deleted, so the thresholds are
    relative: weight 0 draws a clean object at least 0.75 as often as the deleted prompt does and at
    least 0.4 of the time (a model that erases the object, as one trained on full captions only
    did at 32 px, fails), and the named colour no more often than the deleted prompt, plus 0.1."""
    from diffusion.config import DataConfig
    from diffusion.evaluation.edits import weight_response
    from diffusion.evaluation.metrics import EvaluationRun

    run = EvaluationRun(small, seed=0, batch_size=48, holdout=DataConfig().holdout)
    result = weight_response(run, 24, weights=(0.0, 1.0))
    deleted = result["deleted"]["colour"]
    for row in result["rows"]:
        if row["word"] != "colour":
            continue
        if row["weight"] == 1.0:
            assert row["present"] >= 0.9, row
            continue
        assert row["drawn"] >= max(0.4, 0.75 * deleted["drawn"]), (row, deleted)
        assert row["present"] <= deleted["present"] + 0.1, (row, deleted)

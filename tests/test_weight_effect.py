"""Edits measured on a model that follows its prompts (tests/assets/small-shapes, made by
tests/make_small_model.py): weight 0 on a colour word must lower that colour's share of the image."""

from pathlib import Path

import numpy as np
import pytest

from diffusion.detector import MIN_COVERAGE, pixel_colours
from diffusion.pipeline import Pipeline, Weighting
from diffusion.shapes import COLOURS, POSITION_PHRASES, SHAPES

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

"""The shapes detector: accurate on generator images, robust to noise, silent on empty images."""
import numpy as np
import pytest

from diffusion.shapes import (
    BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject, render_scene,
)
from diffusion.detector import CATEGORIES, Detection, detect, detector_accuracy, match


def render(objects: list[ShapeObject], resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and masks (N, H, W) of a scene made of `objects`."""
    return render_scene(Scene(objects, "", [], [], []), resolution)


def placed(colour, shape, size, position, resolution=32, offset=(0.0, 0.0)) -> ShapeObject:
    """An object at its position's anchor (moved by `offset` pixels)."""
    x, y = POSITIONS[position]
    center = (x * resolution + offset[0], y * resolution + offset[1])
    return ShapeObject(colour, shape, size, position, center, SIZES[size] * resolution)


@pytest.mark.parametrize("resolution, n", [(32, 150), (64, 40)])
def test_accuracy_on_generator_scenes(resolution, n):
    accuracy = detector_accuracy(n=n, seed=7, resolution=resolution, min_objects=1, max_objects=4)
    assert set(accuracy) == set(CATEGORIES)
    for category, value in accuracy.items():
        assert value >= 0.99, (category, accuracy)


def test_accuracy_with_noise():
    """Generated images are noisy: Gaussian noise of 8 intensity levels must not matter much."""
    accuracy = detector_accuracy(n=100, seed=3, resolution=32, noise_std=8.0)
    for category, value in accuracy.items():
        assert value >= 0.97, (category, accuracy)


def test_empty_images_have_no_objects():
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    assert detect(blank) == []
    noisy = blank + np.random.default_rng(0).normal(0, 8, blank.shape)
    assert detect(np.clip(noisy, 0, 255).astype(np.uint8)) == []
    specks = blank.copy()  # single stray pixels of palette colours are not objects
    for (y, x), rgb in zip([(3, 3), (10, 20), (25, 8), (28, 28)], COLOURS.values()):
        specks[y, x] = rgb
    assert detect(specks) == []


def test_single_red_circle_on_the_left():
    obj = placed("red", "circle", "small", "left", offset=(0.3, -0.6))
    image, masks = render([obj])
    (found,) = detect(image)
    assert isinstance(found, Detection)
    named = (found.colour, found.shape, found.size, found.position)
    assert named == ("red", "circle", "small", "left")
    assert np.allclose(found.center, obj.center, atol=0.25)
    assert np.array_equal(found.mask, masks[0])
    assert found.area == masks[0].sum()


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_and_size(shape, size, resolution):
    obj = placed("purple", shape, size, "bottom", resolution, offset=(0.4, 0.2))
    (found,) = detect(render([obj], resolution)[0])
    named = (found.colour, found.shape, found.size, found.position)
    assert named == ("purple", shape, size, "bottom")


def test_touching_objects_of_one_colour_stay_apart():
    """Boxes exactly 1 px apart: the half-covered edge pixels of the two squares touch."""
    top = ShapeObject("blue", "square", "small", "top", (16.0, 8.3), 3.2)  # bottom edge at 11.5
    centre = ShapeObject("blue", "square", "small", "centre", (16.0, 15.7), 3.2)  # top edge at 12.5
    image, masks = render([top, centre])
    assert (masks[0][11] & masks[1][12]).any()  # the masks touch: one region by colour alone
    found = detect(image)
    assert sorted(d.position for d in found) == ["centre", "top"]
    assert all((d.colour, d.shape, d.size) == ("blue", "square", "small") for d in found)


def test_match_is_one_to_one_and_reports_missing_objects():
    objects = [
        placed("green", "cross", "large", "left"), placed("yellow", "triangle", "small", "right"),
    ]
    image, masks = render(objects)
    found = detect(image)
    assert [d.colour for d in match(found, objects, masks)] == ["green", "yellow"]
    assert [d.colour for d in match(found, objects)] == ["green", "yellow"]  # by centres
    only_green = [d for d in found if d.colour == "green"]
    assert [d and d.colour for d in match(only_green, objects, masks)] == ["green", None]
    assert match([], objects, masks) == [None, None]


def test_rejects_non_square_images():
    with pytest.raises(ValueError, match="square"):
        detect(np.zeros((32, 16, 3), dtype=np.uint8))

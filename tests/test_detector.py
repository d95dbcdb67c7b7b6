"""The shapes detector: accurate on generator images, robust to noise, silent on empty images;
clean objects, stray paint and background grain."""

from itertools import pairwise

import numpy as np
import pytest

from diffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    render_scene,
)
from diffusion.evaluation.detector import (
    CATEGORIES,
    MAX_FIT_ERROR,
    MAX_STRAY_FRACTION,
    Detection,
    detect,
    detector_accuracy,
    foreground,
    grain,
    is_clean_object,
    match,
    stray_pixels,
)


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
        placed("green", "cross", "large", "left"),
        placed("yellow", "triangle", "small", "right"),
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


# ---- image quality: clean objects and background grain ------------------------------------------


def noisy(image: np.ndarray, where: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """`image` with Gaussian noise of `std` grey levels added at the pixels `where` (H, W) bool
    (the same noise field for every std, so a larger std moves every pixel at least as far)."""
    field = np.random.default_rng(seed).normal(0.0, 1.0, image.shape)
    out = image.astype(np.float64)
    out[where] += std * field[where]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("shape", SHAPES)
def test_a_rendered_object_is_one_clean_object(shape, size):
    image, _ = render([placed("orange", shape, size, "centre", offset=(0.3, -0.2))])
    (found,) = detect(image)
    assert found.fit_error < 0.01  # a template of the generator explains the generator's drawing
    assert grain(image, [found]) == 0.0
    assert is_clean_object(image, [found])
    assert stray_pixels(image, [found]) == 0  # every painted pixel is the object's, edges included


def test_the_generators_single_objects_are_clean_objects():
    """A model that drew exactly what the generator draws must count as drawing one clean object
    every time, small triangles (whose base corners are antialiased diagonally) included."""
    dataset = ShapesDataset(32, num_samples=200, min_objects=1, max_objects=1, seed=3, holdout_mode="any")
    unclean = []
    for i in range(len(dataset)):
        sample = dataset.sample(i)
        found = detect(sample.image)
        if not is_clean_object(sample.image, found):
            unclean.append((i, sample.scene.caption, stray_pixels(sample.image, found), found[0].area))
    assert unclean == []


def test_a_blob_that_is_no_shape_fits_badly():
    bar = np.full((32, 32, 3), BACKGROUND, np.uint8)
    bar[14:18, 4:28] = COLOURS["red"]  # 24 x 4 px: as wide as no shape is tall
    found = detect(bar)
    assert len(found) == 1 and found[0].fit_error > MAX_FIT_ERROR
    assert not is_clean_object(bar, found)


def test_two_objects_are_not_one_clean_object():
    for second in (placed("red", "square", "small", "right"), placed("blue", "cross", "small", "right")):
        image, _ = render([placed("red", "circle", "small", "left"), second])
        found = detect(image)
        assert len(found) == 2 and stray_pixels(image, found) == 0
        assert not is_clean_object(image, found)
        assert all(is_clean_object(image, [d]) is False for d in found)  # the other one is stray paint


def test_an_object_with_a_blob_of_another_colour_touching_it_is_not_clean():
    image, masks = render([placed("red", "square", "small", "centre")])
    assert is_clean_object(image, detect(image))
    ys, xs = np.nonzero(masks[0])
    top, right = ys.min(), xs.max()
    small = image.copy()  # 2 x 3 px: too small to be an object, so it is paint outside the square
    small[top : top + 2, right + 1 : right + 4] = COLOURS["green"]
    found = detect(small)
    assert [d.colour for d in found] == ["red"]
    assert stray_pixels(small, found) == 4  # the column next to the square is its antialiased edge
    assert not is_clean_object(small, found)
    large = image.copy()  # 4 x 4 px: read as a second object
    large[top : top + 4, right + 1 : right + 5] = COLOURS["green"]
    found = detect(large)
    assert sorted(d.colour for d in found) == ["green", "red"]
    assert not is_clean_object(large, found)


def test_a_mottled_object_is_not_clean():
    """A blend that alternates pixels of two palette colours, as a model torn between two words
    might draw, is no single clean object, whatever the detector makes of it."""
    image, masks = render([placed("red", "square", "large", "centre")])
    rows, cols = np.indices(masks[0].shape)
    mottled = image.copy()
    mottled[masks[0] & ((rows + cols) % 2 == 0)] = COLOURS["green"]
    found = detect(mottled)
    assert not is_clean_object(mottled, found)
    assert stray_pixels(mottled, found) > MAX_STRAY_FRACTION * masks[0].sum()
    striped = image.copy()  # alternate rows: each colour is one thin region per row
    striped[masks[0] & (rows % 2 == 0)] = COLOURS["green"]
    assert not is_clean_object(striped, detect(striped))


def test_grain_rises_with_background_noise():
    obj = placed("blue", "circle", "large", "left")
    image, masks = render([obj])
    background = ~masks[0]
    grains = []
    for std in (0.0, 2.0, 4.0, 8.0, 16.0):
        rough = noisy(image, background, std)
        found = detect(rough)
        assert [(d.colour, d.shape) for d in found] == [("blue", "circle")]
        grains.append(grain(rough, found))
    assert grains[0] == 0.0
    assert all(a < b for a, b in pairwise(grains)), grains
    # without clipping, the mean absolute deviation of N(0, s) is s sqrt(2 / pi)
    assert grains[3] == pytest.approx(8.0 * np.sqrt(2 / np.pi), rel=0.1)


def test_grain_ignores_the_object_itself():
    image, masks = render([placed("yellow", "square", "large", "centre")])
    rough = noisy(image, masks[0], 16.0)
    found = detect(rough)
    assert len(found) == 1
    assert np.abs(rough.astype(float) - image).mean() > 1  # the noise is there ...
    assert grain(rough, found) == pytest.approx(0.0, abs=0.05)  # ... but not in the background


def test_foreground_is_any_paint_away_from_the_background():
    image = np.full((4, 4, 3), BACKGROUND, np.uint8)
    image[0, 0] = COLOURS["purple"]
    image[1, 1] = np.array(BACKGROUND) + (30, 0, 0)  # 30 levels away: still background
    image[2, 2] = np.array(BACKGROUND) + (30, 30, 30)  # 52 levels away, no palette colour: paint
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[2, 2] = True
    assert np.array_equal(foreground(image), expected)


def test_an_empty_image_has_no_clean_object():
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    assert not is_clean_object(blank, detect(blank))
    assert stray_pixels(blank, []) == 0 and grain(blank, []) == 0.0
    rough = noisy(blank, np.ones((32, 32), bool), 8.0)
    assert not is_clean_object(rough, detect(rough))
    assert grain(rough, detect(rough)) > 4  # with nothing detected, the whole image is background

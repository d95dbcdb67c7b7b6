"""Tests for diffusion/data/shapes.py: the procedural shapes dataset, its captions, masks and spans."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    UNNAMED_SHAPE,
    Omission,
    Scene,
    ShapeObject,
    ShapesDataset,
    parse_holdout,
    render_scene,
    sample_scene,
)
from diffusion.errors import UserError

# What each position must read as in a caption (the spec's wording, spelled "centre").
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
REPO_ROOT = Path(__file__).resolve().parent.parent


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a (H, W) mask's pixel centres."""
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5


def relation_of(scene) -> tuple[int, int, str] | None:
    """(subject, reference, phrase) if the caption relates two objects, else None."""
    if len(scene.objects) != 2:
        return None
    first, second = sorted(range(2), key=lambda k: scene.phrase_spans[k][0])
    between = scene.caption[scene.phrase_spans[first][1] : scene.phrase_spans[second][0]]
    for phrase in RELATIONS:
        if between == f" {phrase} ":
            return first, second, phrase
    return None


# ---------------------------------------------------------------------------------------------
# Shapes: determinism


def test_same_seed_and_index_give_identical_samples_and_indices_differ():
    a, b = ShapesDataset(num_samples=50, seed=3), ShapesDataset(num_samples=50, seed=3)
    for i in (0, 7, 49):
        first, second = a.sample(i), b.sample(i)
        assert np.array_equal(first.image, second.image)
        assert np.array_equal(first.masks, second.masks)
        assert first.scene == second.scene
    images = [a.sample(i).image for i in range(10)]
    assert all(not np.array_equal(images[0], image) for image in images[1:])
    assert len({a.scene(i).caption for i in range(50)}) > 30


def test_different_seeds_give_different_data():
    a, b = ShapesDataset(num_samples=20, seed=0), ShapesDataset(num_samples=20, seed=1)
    assert a.captions() != b.captions()
    assert sum(np.array_equal(a.sample(i).image, b.sample(i).image) for i in range(20)) < 3


def test_captions_do_not_depend_on_the_process_hash_seed():
    # Captions are cached across runs, so set iteration order (random per process for
    # strings) must not leak into sampling, e.g. through the holdout set.
    code = (
        "from diffusion.data.shapes import ShapesDataset; "
        "d = ShapesDataset(num_samples=200, max_objects=3, holdout=['red square', 'blue cross', "
        "'green circle'], holdout_mode='only'); print('\\n'.join(d.captions()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = ShapesDataset(
        num_samples=200,
        max_objects=3,
        holdout=["green circle", "blue cross", "red square"],
        holdout_mode="only",
    )
    assert result.stdout.splitlines() == here.captions()


# ---------------------------------------------------------------------------------------------
# Shapes: rendering and masks


@pytest.mark.parametrize("resolution", [32, 64])
def test_masks_match_objects_and_background_is_untouched(resolution):
    dataset = ShapesDataset(resolution=resolution, num_samples=120, max_objects=4, seed=5)
    for i in range(len(dataset)):
        sample = dataset.sample(i)
        objects = sample.scene.objects
        assert sample.image.shape == (resolution, resolution, 3)
        assert sample.image.dtype == np.uint8
        assert sample.masks.shape == (len(objects), resolution, resolution)
        assert sample.masks.dtype == bool
        assert sample.masks.any(axis=(1, 2)).all(), "every object must be visible"
        assert (sample.masks.sum(axis=0) <= 1).all(), "masks must be disjoint"

        centres = (np.arange(resolution) + 0.5)[None, :]  # pixel centres along one axis
        near_any = np.zeros((resolution, resolution), dtype=bool)
        for obj, mask in zip(objects, sample.masks):
            (cx, cy), reach = obj.center, obj.half_extent + 1.0
            near = (np.abs(centres - cy).T <= reach) & (np.abs(centres - cx) <= reach)
            assert not (mask & ~near).any(), "a mask spills outside its object's box"
            near_any |= near
            mean = sample.image[mask].mean(axis=0)
            if resolution == 64:
                assert np.abs(mean - COLOURS[obj.colour]).max() <= 40, (obj, mean)
            else:
                # At 32 px small shapes are mostly antialiased edge, so their mean is pulled
                # towards the background; it must still be nearest to the object's colour.
                palette = {**COLOURS, "background": BACKGROUND}
                nearest = min(palette, key=lambda name: np.abs(mean - palette[name]).sum())
                assert nearest == obj.colour, (obj, mean)
        assert (sample.image[~near_any] == BACKGROUND).all()


def test_mask_centroids_are_on_the_side_the_position_names():
    resolution = 64
    dataset = ShapesDataset(resolution=resolution, num_samples=150, max_objects=3, seed=11)
    seen = set()
    for i in range(len(dataset)):
        sample = dataset.sample(i)
        for obj, mask in zip(sample.scene.objects, sample.masks):
            x, y = (value / resolution for value in centroid(mask))
            seen.add(obj.position)
            if obj.position == "left":
                assert x < 0.35 and abs(y - 0.5) < 0.13
            elif obj.position == "right":
                assert x > 0.65 and abs(y - 0.5) < 0.13
            elif obj.position == "top":
                assert y < 0.4 and abs(x - 0.5) < 0.13
            elif obj.position == "bottom":
                assert y > 0.6 and abs(x - 0.5) < 0.13
            else:
                assert abs(x - 0.5) < 0.13 and abs(y - 0.5) < 0.13
    assert seen == set(POSITIONS)


def test_every_colour_shape_and_size_is_drawn_with_the_right_extent():
    dataset = ShapesDataset(resolution=64, num_samples=400, seed=2, holdout=())
    seen = set()
    for i in range(len(dataset)):
        for obj in dataset.scene(i).objects:
            seen.add((obj.colour, obj.shape, obj.size))
            assert obj.half_extent == pytest.approx(SIZES[obj.size] * 64)
    assert {(c, s) for c, s, _ in seen} == {(c, s) for c in COLOURS for s in SHAPES}
    assert {size for _, _, size in seen} == set(SIZES)


def test_shapes_are_told_apart_by_their_masks():
    # One large object of each shape at the same place: the masks must differ as the shapes do.
    areas = {}
    for shape in SHAPES:
        obj = ShapeObject("red", shape, "large", "centre", (32.0, 32.0), 12.8)
        _, masks = render_scene(Scene([obj], "a large red shape", [], [], []), 64)
        areas[shape] = masks[0].sum()
    box = 25.6**2
    assert areas["square"] == pytest.approx(box, rel=0.05)
    assert areas["circle"] == pytest.approx(box * np.pi / 4, rel=0.05)
    assert areas["triangle"] == pytest.approx(box / 2, rel=0.08)
    assert areas["cross"] == pytest.approx(box * (1 - 4 * 0.3**2), rel=0.08)


def test_getitem_and_render_all_agree_with_sample():
    dataset = ShapesDataset(num_samples=6, seed=4)
    images, captions = dataset.render_all(progress=False)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert captions == dataset.captions()
    for i in range(6):
        item = dataset[i]
        assert item["index"] == i and item["caption"] == captions[i]
        pixels = item["pixel_values"]
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        expected = torch.from_numpy(dataset.sample(i).image).permute(2, 0, 1)
        assert torch.equal(images[i], expected)
        assert torch.allclose((pixels + 1) * 127.5, expected.float(), atol=1e-3)
    with pytest.raises(IndexError):
        dataset[6]


# ---------------------------------------------------------------------------------------------
# Shapes: captions


def test_rendering_in_parallel_gives_the_serial_result():
    """Two forked workers and chunks that split the set unevenly: the same images, masks,
    captions and scenes, in index order, as rendering one sample at a time."""
    import diffusion.data.shapes as data

    dataset = ShapesDataset(num_samples=23, seed=2, max_objects=4)
    serial = dataset.render_with_masks(progress=False, workers=1)
    old_chunk = data.RENDER_CHUNK
    data.RENDER_CHUNK = 5
    try:
        parallel = dataset.render_with_masks(progress=False, workers=2)
    finally:
        data.RENDER_CHUNK = old_chunk
    assert torch.equal(serial.images, parallel.images) and torch.equal(serial.masks, parallel.masks)
    assert serial.captions == parallel.captions == dataset.captions()
    assert serial.scenes == parallel.scenes
    for i in (0, 7, 22):
        sample = dataset.sample(i)
        assert torch.equal(parallel.images[i], torch.from_numpy(sample.image).permute(2, 0, 1))
        count = len(sample.masks)
        assert torch.equal(parallel.masks[i, :count], torch.from_numpy(sample.masks))
        assert not parallel.masks[i, count:].any()


def test_caption_spans_point_at_the_words_and_positions_are_named():
    rng = np.random.default_rng(123)
    styles = set()
    for _ in range(300):
        scene = sample_scene(rng, 32, 1, 4, None, "any")
        caption = scene.caption
        assert caption == caption.lower() and "  " not in caption and caption == caption.strip()
        assert len(scene.colour_spans) == len(scene.shape_spans) == len(scene.size_spans)
        assert len(scene.objects) == len(scene.colour_spans)
        relation = relation_of(scene)
        for k, obj in enumerate(scene.objects):
            assert caption[slice(*scene.colour_spans[k])] == obj.colour
            assert caption[slice(*scene.shape_spans[k])] == obj.shape
            assert scene.shape_spans[k][0] == scene.colour_spans[k][1] + 1
            size_span = scene.size_spans[k]
            if size_span is not None:
                assert caption[slice(*size_span)] == obj.size
                assert size_span[1] + 1 == scene.colour_spans[k][0]
            styles.add(("size", size_span is not None))
            phrase = POSITION_PHRASES[obj.position]
            after = caption[scene.shape_spans[k][1] :]
            if len(scene.objects) > 1 and relation is None:
                assert after.startswith(" " + phrase), caption
            if len(scene.objects) == 1:
                styles.add(("single", phrase in caption, caption.startswith(phrase)))
        if relation is not None:
            styles.add(("relation", relation[2]))
    # Every caption form turns up: sizes with and without, positions before, after and absent.
    assert {("size", True), ("size", False)} <= styles
    assert {("single", True, True), ("single", True, False), ("single", False, False)} <= styles
    assert {("relation", phrase) for phrase in RELATIONS} <= styles


# sha256 of the first 3,000 scenes' captions and spans of two datasets, computed by the code before
# captions could leave attributes out: with no colour, shape or position left out they must not move.
CAPTIONS_BEFORE_OMISSION = {
    (4, (2, 5, 2, 1)): "f70417dafe2684151c64fe7cec5be0893e89def750758395b28ff0dd406b761a",
    (2, None): "41606ff75f8de26b18842336df9308ee564ef8dbe4d2b3956f7250582ea41743",
}


@pytest.mark.parametrize("max_objects, weights", list(CAPTIONS_BEFORE_OMISSION))
def test_no_omission_gives_the_captions_the_set_always_had(max_objects, weights):
    dataset = ShapesDataset(
        32,
        3000,
        1,
        max_objects,
        0,
        ["red square"],
        object_weights=weights,
        omission=Omission(colour=0, shape=0, position=0),
    )
    text = "\n".join(
        f"{s.caption}|{s.colour_spans}|{s.shape_spans}|{s.size_spans}" for s in map(dataset.scene, range(3000))
    )
    assert hashlib.sha256(text.encode()).hexdigest() == CAPTIONS_BEFORE_OMISSION[max_objects, weights]


def named_words(caption: str) -> tuple[set, set, set]:
    words = set(re.findall(r"[a-z]+", caption))
    return words & set(COLOURS), words & set(SHAPES), words & set(SIZES)


def test_omitted_attributes_keep_captions_true_and_spans_exact():
    omission = Omission(colour=0.3, shape=0.2, position=0.4, size=0.5)
    dataset = ShapesDataset(32, 1500, 1, 4, seed=5, omission=omission)
    plain = ShapesDataset(32, 1500, 1, 4, seed=5)
    left_out = {"colour": 0, "shape": 0, "position": 0}
    objects = listed = 0
    for i in range(len(dataset)):
        scene, reference = dataset.scene(i), plain.scene(i)
        assert scene.objects == reference.objects  # only the caption depends on the omission
        caption = scene.caption
        assert caption == caption.strip() and "  " not in caption
        colours, shapes, sizes = named_words(caption)
        # never names something absent
        assert colours <= {o.colour for o in scene.objects} and shapes <= {o.shape for o in scene.objects}
        assert sizes <= {o.size for o in scene.objects}
        # one noun phrase per object: a named shape or the word "shape"
        nouns = re.findall(rf"\b({'|'.join(SHAPES)}|{UNNAMED_SHAPE})\b", caption)
        assert len(nouns) == len(scene.objects), caption
        for k, obj in enumerate(scene.objects):
            objects += 1
            for attribute, spans in (
                ("colour", scene.colour_spans),
                ("shape", scene.shape_spans),
                ("size", scene.size_spans),
            ):
                if spans[k] is not None:
                    assert caption[slice(*spans[k])] == getattr(obj, attribute)
            left_out["colour"] += scene.colour_spans[k] is None
            left_out["shape"] += scene.shape_spans[k] is None
            if len(scene.objects) > 1 and relation_of(scene) is None:  # a list: each object has its phrase
                listed += 1
                left_out["position"] += POSITION_PHRASES[obj.position] not in caption
        # articles still agree with the word after them
        for article, word in re.findall(r"\b(an?) (\w+)", caption):
            assert (article == "an") == (word[0] in "aeiou"), caption
    assert abs(left_out["colour"] / objects - 0.3) < 0.03
    assert abs(left_out["shape"] / objects - 0.2) < 0.03
    assert abs(left_out["position"] / listed - 0.4) < 0.03
    # the grounding targets tie only the words the caption names
    from diffusion.training.grounding import grounding_targets

    scenes = [dataset.scene(i) for i in range(50)]

    def offsets(captions):  # one "token" per word, as character spans
        spans = [[m.span() for m in re.finditer(r"\w+", c)] for c in captions]
        length = max(map(len, spans))
        return torch.tensor([s + [(0, 0)] * (length - len(s)) for s in spans])

    targets = grounding_targets(scenes, offsets)
    for scene, row in zip(scenes, targets):
        words = [m.group() for m in re.finditer(r"\w+", scene.caption)]
        for word, k in zip(words, row.tolist()):
            if k >= 0:
                assert word in (scene.objects[k].colour, scene.objects[k].shape)
        named = sum(span is not None for spans in (scene.colour_spans, scene.shape_spans) for span in spans)
        assert int((row >= 0).sum()) == named


def test_omission_can_be_kept_to_captions_of_few_objects():
    omission = Omission(colour=0.8, shape=0.5, position=0.5, max_objects=1)
    dataset = ShapesDataset(32, 600, 1, 4, seed=3, omission=omission)
    plain = ShapesDataset(32, 600, 1, 4, seed=3)
    single_left_out = 0
    for i in range(len(dataset)):
        scene = dataset.scene(i)
        if len(scene.objects) > 1:  # whole, and exactly the caption the set always had
            assert scene.caption == plain.scene(i).caption
        else:
            single_left_out += scene.colour_spans[0] is None
    singles = sum(len(dataset.scene(i).objects) == 1 for i in range(len(dataset)))
    assert singles > 50 and abs(single_left_out / singles - 0.8) < 0.1


def test_omission_probabilities_are_config_keys():
    from diffusion.config import config_from_dict
    from diffusion.data.datasets import build_dataset

    cfg = config_from_dict({"data": {"omit_colour": 0.2, "omit_shape": 1.0, "num_samples": 10}})
    dataset = build_dataset(cfg.data)
    assert dataset.omission == Omission(colour=0.2, shape=1.0, position=0.0, size=0.5)
    assert all(UNNAMED_SHAPE in dataset.scene(i).caption for i in range(10))
    with pytest.raises(UserError, match="data.omit_colour must be a probability in"):
        config_from_dict({"data": {"omit_colour": 1.5}})
    with pytest.raises(UserError, match="data.omit_max_objects must be positive"):
        config_from_dict({"data": {"omit_max_objects": 0}})


def test_relation_captions_are_true_of_the_drawing():
    resolution = 64
    dataset = ShapesDataset(resolution=resolution, num_samples=400, min_objects=2, seed=8)
    checked = 0
    for i in range(len(dataset)):
        scene = dataset.scene(i)
        relation = relation_of(scene)
        if relation is None:
            continue
        subject, reference, phrase = relation
        (sx, sy), (rx, ry) = scene.objects[subject].center, scene.objects[reference].center
        offset = 0.2 * resolution
        holds = {
            "to the left of": rx - sx >= offset,
            "to the right of": sx - rx >= offset,
            "above": ry - sy >= offset,
            "below": sy - ry >= offset,
        }
        assert holds[phrase], scene.caption
        if checked < 40:  # also on the pixels; triangles' centroids sit low, hence 0.1
            masks = render_scene(scene, resolution)[1]
            (mx, my), (nx, ny) = centroid(masks[subject]), centroid(masks[reference])
            pixel_offset = {"to the left of": nx - mx, "to the right of": mx - nx, "above": ny - my, "below": my - ny}[
                phrase
            ]
            assert pixel_offset >= 0.1 * resolution, scene.caption
        checked += 1
    assert checked > 50


def test_articles_agree_with_the_next_word():
    rng = np.random.default_rng(1)
    captions = " ".join(sample_scene(rng, 32, 1, 2, None, "any").caption for _ in range(300))
    assert "an orange" in captions
    assert "a orange" not in captions and "an red" not in captions


# ---------------------------------------------------------------------------------------------
# Shapes: holdout and validation


def test_holdout_exclude_never_draws_a_held_out_pair_and_only_always_does():
    holdout = parse_holdout(["red square", "blue circle"])
    assert holdout == {("red", "square"), ("blue", "circle")}
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng, 32, 1, 3, holdout, "exclude")
        assert not any((o.colour, o.shape) in holdout for o in scene.objects)
    seen = set()
    for _ in range(500):
        scene = sample_scene(rng, 32, 1, 3, holdout, "only")
        pairs = {(o.colour, o.shape) for o in scene.objects}
        assert pairs & holdout, scene.caption
        seen |= pairs & holdout
    assert seen == holdout
    anything = {(o.colour, o.shape) for _ in range(500) for o in sample_scene(rng, 32, 1, 2, holdout, "any").objects}
    assert holdout <= anything


def test_dataset_holdout_applies_to_its_samples():
    dataset = ShapesDataset(num_samples=300, holdout=["green cross"], holdout_mode="only")
    assert all("green cross" in caption for caption in dataset.captions())
    dataset = ShapesDataset(num_samples=300, holdout=["green cross"])
    assert not any("green cross" in caption for caption in dataset.captions())


@pytest.mark.parametrize(
    "holdout, fragment",
    [
        (["red hexagon"], "red hexagon"),
        (["pink square"], "pink square"),
        (["red"], "'red'"),
        ("red square", "must be a list"),
    ],
)
def test_unknown_holdout_names_raise_user_error(holdout, fragment):
    with pytest.raises(UserError, match=fragment) as error:
        ShapesDataset(holdout=holdout)
    assert "\n" not in str(error.value)


def test_impossible_holdout_modes_raise_user_error():
    with pytest.raises(UserError, match="only"):
        ShapesDataset(holdout=(), holdout_mode="only")
    with pytest.raises(UserError, match="holdout_mode"):
        ShapesDataset(holdout_mode="sometimes")
    everything = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    with pytest.raises(UserError, match="every"):
        ShapesDataset(holdout=everything)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"resolution": 8}, "data.resolution"),
        ({"num_samples": 0}, "data.num_samples"),
        ({"min_objects": 0}, "data.min_objects"),
        ({"max_objects": 5}, "data.max_objects"),
        ({"min_objects": 3, "max_objects": 2}, "data.max_objects"),
        ({"resolution": 32.0}, "data.resolution"),
        ({"max_objects": 4, "object_weights": [1, 2]}, "data.object_weights"),
        ({"max_objects": 2, "object_weights": [1, -1, 1, 1]}, "data.object_weights"),
        ({"max_objects": 2, "object_weights": [0, 0, 1, 1]}, "data.object_weights"),
    ],
)
def test_bad_shapes_arguments_name_the_config_key(kwargs, key):
    with pytest.raises(UserError, match=re.escape(key)):
        ShapesDataset(**kwargs)


def test_object_weights_set_how_often_each_count_is_drawn():
    def counts(**kwargs):
        dataset = ShapesDataset(num_samples=800, seed=3, **kwargs)
        return np.bincount([len(dataset.scene(i).objects) for i in range(len(dataset))], minlength=5)

    assert counts(min_objects=1, max_objects=4, object_weights=[0, 0, 1, 0])[3] == 800
    # weights need not sum to 1, and counts outside [min_objects, max_objects] are never drawn
    mixed = counts(min_objects=2, max_objects=3, object_weights=[5, 1, 3, 5])
    assert mixed[2] + mixed[3] == 800 and 150 < mixed[2] < 250  # a quarter has 2 objects (expected 200)
    uniform = counts(min_objects=1, max_objects=4, object_weights=None)
    assert all(150 < c < 250 for c in uniform[1:])


def test_four_objects_fit_at_32_px_and_never_touch():
    dataset = ShapesDataset(num_samples=30, min_objects=4, max_objects=4, seed=6)
    for i in range(len(dataset)):
        objects = dataset.scene(i).objects
        assert len(objects) == 4 and len({o.position for o in objects}) == 4
        for a in range(4):
            for b in range(a + 1, 4):
                (ax, ay), (bx, by) = objects[a].center, objects[b].center
                reach = objects[a].half_extent + objects[b].half_extent + 1
                assert abs(ax - bx) >= reach or abs(ay - by) >= reach


def test_only_an_unnamed_shape_writes_a_word_whole_captions_never_write():
    """The small CLIP's tokenizer learns the UNet's captions only when they may hold new words
    (`Omission.writes_new_words`): captions without colours or positions hold none."""
    whole = ShapesDataset(num_samples=600, seed=3)
    words = {word for caption in whole.captions() for word in re.findall(r"[a-z]+", caption)}
    partial = ShapesDataset(num_samples=600, seed=3, omission=Omission(colour=0.6, position=0.6))
    assert not partial.omission.writes_new_words()
    partial_words = {word for caption in partial.captions() for word in re.findall(r"[a-z]+", caption)}
    assert partial_words <= words and partial.captions() != whole.captions()
    unnamed = ShapesDataset(num_samples=600, seed=3, omission=Omission(shape=0.3))
    assert unnamed.omission.writes_new_words()
    assert UNNAMED_SHAPE not in words and any(UNNAMED_SHAPE in caption for caption in unnamed.captions())

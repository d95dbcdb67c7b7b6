"""The folder evaluation (diffusion/evaluation/folder.py): retrieval, colour and map measures on
hand-made images, and `evaluate.py --data` on a tiny model trained on a tiny folder."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.evaluation.folder import (
    COLOUR_NAMES,
    NEAR_COPY_RMS,
    TARGETS,
    colour_cases,
    colour_names,
    colour_word,
    dominant_colour,
    draw_prompts,
    evaluate_folder,
    features,
    folder_picture,
    foreground,
    format_folder_report,
    is_clean,
    is_drawn,
    mask_files,
    mask_iou,
    nearest,
    read_folder,
    subject_span,
    top_k_iou,
)
from diffusion.evaluation.metrics import pointing

RGB = {"red": (221, 46, 68), "blue": (93, 173, 236), "green": (120, 177, 89), "yellow": (253, 203, 88)}
WHITE = (255, 255, 255)


def square(colour, side=32, box=(8, 24, 8, 24)):
    image = np.full((side, side, 3), 255, np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = colour
    return image


def disk(colour, side=32, radius=9, centre=(16, 16)):
    y, x = np.mgrid[:side, :side]
    image = np.full((side, side, 3), 255, np.uint8)
    image[(y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2] = colour
    return image


def keys_of(images, side=32):
    return torch.from_numpy(np.stack([features(im, side) for im in images]))


TRAINING = [square(RGB["red"]), disk(RGB["blue"]), square(RGB["green"], box=(4, 14, 4, 14)), disk(RGB["yellow"])]


# ---- retrieval ------------------------------------------------------------------------------------


def test_an_exact_copy_retrieves_itself_at_distance_zero_and_counts_as_memorised():
    distances, indices = nearest(np.stack([features(TRAINING[1], 32)]), keys_of(TRAINING), k=3)
    assert indices[0, 0] == 1 and distances[0, 0] == 0.0 and distances[0, 0] < NEAR_COPY_RMS
    assert list(distances[0]) == sorted(distances[0]) and len(set(indices[0])) == 3


def test_a_shifted_or_noised_copy_retrieves_it_but_only_slight_noise_is_a_near_copy():
    shifted = np.roll(TRAINING[0], 2, axis=1)
    rng = np.random.default_rng(0)
    slight = np.clip(TRAINING[0] + rng.normal(0, 3, TRAINING[0].shape), 0, 255).astype(np.uint8)
    queries = np.stack([features(im, 32) for im in (shifted, slight)])
    distances, indices = nearest(queries, keys_of(TRAINING))
    assert list(indices[:, 0]) == [0, 0]
    assert distances[0, 0] > NEAR_COPY_RMS  # two pixels of shift: not a copy
    assert distances[1, 0] < NEAR_COPY_RMS  # 8-bit noise of sd 3: still a copy


def test_nearest_in_chunks_matches_one_block_and_breaks_ties_by_index():
    rng = np.random.default_rng(1)
    keys = torch.from_numpy(rng.integers(0, 256, (50, 12), dtype=np.uint8))
    keys[30] = keys[7]  # a duplicate: equal distances, the lower index first
    queries = np.stack([keys[7].numpy(), rng.integers(0, 256, 12, dtype=np.uint8)])
    whole = nearest(queries, keys, k=5, chunk=4096)
    chunked = nearest(queries, keys, k=5, chunk=3)
    assert np.array_equal(whole[1], chunked[1]) and np.allclose(whole[0], chunked[0])
    assert list(whole[1][0, :2]) == [7, 30] and whole[0][0, 1] == 0.0
    assert nearest(queries, keys[:2], k=5)[1].shape == (2, 2)  # k capped at the number of keys


def test_features_are_box_filtered_to_the_feature_side():
    image = square(RGB["red"], side=64, box=(0, 32, 0, 64))
    small = features(image, 32).reshape(32, 32, 3)
    assert small.shape == (32, 32, 3) and tuple(small[0, 0]) == RGB["red"] and tuple(small[-1, -1]) == WHITE


# ---- colours and foregrounds --------------------------------------------------------------------


def test_colour_names_of_emoji_and_shapes_colours():
    expected = {
        (221, 46, 68): "red",
        (244, 144, 12): "orange",
        (253, 203, 88): "yellow",
        (120, 177, 89): "green",
        (93, 173, 236): "blue",
        (170, 142, 214): "purple",
        (255, 120, 146): "pink",
        (193, 105, 79): "brown",
        (49, 55, 61): "black",
        (153, 170, 181): "grey",
        (230, 40, 40): "red",
        (250, 140, 30): "orange",
        (240, 220, 40): "yellow",
        (160, 60, 220): "purple",
    }
    image = np.array([list(expected)], np.uint8)
    assert [COLOUR_NAMES[k] for k in colour_names(image)[0]] == list(expected.values())


def test_a_recoloured_image_changes_its_dominant_colour_and_is_scored_by_it():
    red = disk(RGB["red"])
    blue = red[..., ::-1].copy()  # red <-> blue channels: the hue moves from red to blue
    assert dominant_colour(red) == ("red", 1.0) and dominant_colour(blue)[0] == "blue"
    cases = colour_cases(["red circle", "blue circle"], 2, seed=0)
    case = next(c for c in cases if c.old == "red")
    assert case.new == "blue" and dominant_colour(blue)[0] == case.new != case.old
    assert mask_iou(foreground(red), foreground(blue)) == 1.0


def test_an_outline_or_highlight_does_not_win_and_a_mottled_object_is_not_clean():
    outlined = disk((20, 20, 20), radius=11)
    outlined[foreground(disk(WHITE, radius=9)) | foreground(disk(RGB["red"], radius=9))] = RGB["red"]
    assert dominant_colour(outlined)[0] == "red" and is_clean(outlined)
    mottled = square(RGB["red"])
    mottled[8:24:2, 8:24] = RGB["blue"]
    assert not is_clean(mottled) and is_drawn(foreground(mottled))
    black = disk((30, 30, 30))
    assert dominant_colour(black)[0] == "black" and is_clean(black)


def test_a_white_image_or_a_filled_frame_is_no_object():
    white = np.full((32, 32, 3), 255, np.uint8)
    assert not foreground(white).any() and not is_drawn(foreground(white))
    assert dominant_colour(white) == (None, 0.0) and not is_clean(white)
    filled = np.full((32, 32, 3), RGB["red"], np.uint8)
    assert not is_drawn(foreground(filled)) and not is_clean(filled)
    faint = np.full((32, 32, 3), 230, np.uint8)  # an off-white background is background
    assert not foreground(faint).any()


def test_foreground_iou_of_known_masks():
    a = foreground(square(RGB["red"], box=(0, 16, 0, 16)))
    b = foreground(square(RGB["red"], box=(0, 16, 8, 24)))
    assert mask_iou(a, b) == pytest.approx(128 / 384)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 0.0


# ---- maps -----------------------------------------------------------------------------------------


def test_top_k_iou_and_pointing_on_synthetic_maps():
    mask = foreground(square(RGB["red"], side=16, box=(4, 8, 4, 8)))  # 16 pixels
    on_it = np.where(mask, 1.0, 0.1)
    assert top_k_iou(on_it, mask) == 1.0 and pointing(on_it, mask)
    elsewhere = np.zeros((16, 16))
    elsewhere[10:14, 10:14] = 1.0
    assert top_k_iou(elsewhere, mask) == 0.0 and not pointing(elsewhere, mask)
    half = np.zeros((16, 16))
    half[4:8, 6:10] = 1.0  # half the map's top 16 inside: IoU 8 / 24
    assert top_k_iou(half, mask) == pytest.approx(8 / 24)


# ---- captions -------------------------------------------------------------------------------------


def test_colour_words_subject_words_and_the_prompts_of_a_colour_caption():
    assert colour_word("large green circle").text == "green"
    assert colour_word("Gray cat").text == "Gray"
    assert colour_word("red and blue ball") is None and colour_word("red") is None
    assert colour_word("dog face") is None
    caption = "red apple (fruit)"
    assert caption[slice(*subject_span(caption))] == "fruit"
    (case,) = colour_cases([caption, "green apple (fruit)", "green book"], 1, seed=3)
    assert case.weight0 == r"(red:0) apple \(fruit\)" and case.new == "green"
    assert case.source == r"red apple \(fruit\)" and case.edit == r"green apple \(fruit\)"
    prompts = draw_prompts(["b", "a", "b", "c"], 2, seed=0)
    assert len(set(prompts)) == 2 and prompts == draw_prompts(["c", "b", "a"], 2, seed=0)
    assert sorted(draw_prompts(["b", "a", "b"], 9, seed=0)) == ["a", "b"]


# ---- a folder and a model -----------------------------------------------------------------------

SHAPES = {"square": square, "circle": disk}


def write_folder(root: Path, masks: bool = True) -> Path:
    """Coloured squares and circles on white, 32 px, captioned "red square" ..., with masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for colour in RGB:
        for shape, draw in SHAPES.items():
            image = draw(RGB[colour])
            name = f"{colour}-{shape}.png"
            Image.fromarray(image).save(root / "images" / name)
            line = {"file_name": f"images/{name}", "text": f"{colour} {shape}"}
            if masks:
                Image.fromarray(foreground(image).astype(np.uint8) * 255).save(root / "masks" / name)
                line["mask"] = f"masks/{name}"
            lines.append(json.dumps(line))
    # a second red square, without a mask: masks are optional
    Image.fromarray(square(RGB["red"], box=(6, 22, 6, 22))).save(root / "images" / "red-square-2.png")
    lines.append(json.dumps({"file_name": "images/red-square-2.png", "text": "red square"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_read_folder_features_masks_and_its_reference(tmp_path):
    data = read_folder(write_folder(tmp_path / "folder"), 16, progress=False)
    assert len(data.captions) == 9 and data.keys.shape == (9, 16 * 16 * 3) and data.keys.dtype == torch.uint8
    assert len(data.masks) == 8 and 8 not in data.masks  # the last image has none
    reference = data.reference
    assert reference["named colour"] == 1.0 and reference["one clean colour"] == 1.0
    assert reference["masks"] == 8 and reference["foreground iou with masks"] > 0.9
    assert reference["by colour"]["red"]["n"] == 3
    lines = ['{"file_name": "images/red-square.png", "mask": "masks/gone.png"}', "not json", '{"mask": 3}']
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metadata.jsonl").write_text("\n".join(lines))
    assert mask_files(tmp_path / "other") == {}  # a mask that is not there, bad lines: skipped


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """A tiny model trained 4 steps on the folder of `write_folder`; (folder, model folder)."""
    from conftest import TINY

    from diffusion.config import config_from_dict
    from diffusion.training.loop import train

    root = tmp_path_factory.mktemp("folder-eval")
    folder = write_folder(root / "folder")
    config = copy.deepcopy(TINY)
    config["data"].update(kind="imagefolder", path=str(folder), embedding_cache=str(root / "cache"))
    config["train"].update(grounding_weight=0, grounding_pixel_weight=0, validation_prompts=["red square"])
    train(config_from_dict(config), root / "run")
    return folder, root / "run" / "model"


def test_evaluate_folder_end_to_end_on_a_tiny_model(folder_model):
    from diffusion.sampling.pipeline import Pipeline
    from diffusion.sampling.settings import SamplingSettings

    folder, model = folder_model
    pipe = Pipeline.from_pretrained(model, device="cpu")
    result = evaluate_folder(pipe, folder, SamplingSettings(steps=4), n=3, batch_size=2, progress=False)
    report = result.report
    assert {"retrieval", "maps", "colour", "colour swap", "weight 0", "reference", "targets"} <= set(report)
    assert report["images"] == 9 and report["captions"] == 8 and report["masks"] == 8
    assert report["retrieval"]["n"] == 3 and report["colour"]["n"] == 3 and report["maps"]["n"] <= 3
    drawn = draw_prompts(result.folder.captions, 3, report["seed"])  # red square is 2 of the 9 images
    assert report["retrieval"]["chance top-1"] == pytest.approx(np.mean([(p == "red square") + 1 for p in drawn]) / 9)
    assert 0 <= report["retrieval"]["top-1"] <= report["retrieval"]["top-5"] <= 1
    assert set(report["targets"]) == set(TARGETS)
    assert all(set(t) == {"value", "target", "met"} for t in report["targets"].values())
    json.dumps(report)
    table = format_folder_report(report)
    assert "retrieval (n=3)" in table and "measured targets met" in table and "pixels at 16 px" in table
    picture = folder_picture(result)
    assert picture.width > 0 and len(result.retrieval_examples) == 3 and len(result.colour_examples) == 3


def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).parents[1] / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_evaluate_cli_with_data_writes_the_report_and_its_picture(folder_model, tmp_path, run_cli):
    folder, model = folder_model
    out = tmp_path / "report.json"
    result = run_cli("evaluate.py", "--model", model, "--data", folder, "--n", 2, "--out", out, "--batch-size", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["retrieval"]["n"] == 2 and report["model"] == str(model.resolve())
    assert "folder evaluation:" in result.stdout and "measured targets met" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-examples.png", "report.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "was trained on data.kind=imagefolder, which the shapes evaluation cannot measure; pass --data FOLDER"),
        ([], "the image folder it was trained on (it was trained on data/emoji)"),
        (["--data", "DATA", "--parts", "edit"], "--parts measures shapes models; with --data"),
        (["--data", "DATA", "--n-edit", "3", "--swap-sweep"], "--n-edit, --swap-sweep measure shapes models"),
        (["--data", "nowhere"], "--data 'nowhere' is not a folder"),
        (["--data", ""], "--data '' is not a folder"),
    ],
)
def test_evaluate_cli_folder_errors_are_one_line(tmp_path, capsys, args, message):
    """A model folder whose config says imagefolder: refused before its weights are read."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.yaml").write_text("data:\n  kind: imagefolder\n  path: data/emoji\n")
    args = [str(tmp_path) if a == "DATA" else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        load_cli().main(["--model", str(model), "--out", str(tmp_path / "r.json"), *args])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "r.json").exists()


def test_a_model_that_draws_its_training_images_meets_every_target_and_is_all_memorised(tmp_path, monkeypatch):
    """Wiring: with the sampling replaced by the folder's own images (the prompt's, the edit's),
    every rate is 1 and the maps, the foreground itself, point and overlap exactly."""
    from types import SimpleNamespace

    import diffusion.evaluation.folder as folder_module
    from diffusion.control.prompts import parse_prompt

    data = read_folder(write_folder(tmp_path / "folder"), 16, progress=False)

    def image_of(prompt):
        return data.dataset.image(data.captions.index(parse_prompt(prompt).text))

    def batches(run, prompts, maps=False):
        images = [image_of(p) for p in prompts]
        token_maps = [torch.from_numpy(np.stack([foreground(im)] * 4).astype(np.float32)) for im in images]
        yield images, token_maps, [torch.tensor([[0, 99]] * 4) for _ in images]

    monkeypatch.setattr(folder_module, "sample_batches", batches)
    monkeypatch.setattr(
        folder_module, "sample_images", lambda run, ps: SimpleNamespace(images=[image_of(p) for p in ps])
    )
    monkeypatch.setattr(
        folder_module, "swap_pairs", lambda run, cases: [(image_of(c.source), image_of(c.edit)) for c in cases]
    )
    pipe = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=16)), mixed_precision_of=lambda s: "no"
    )
    report = evaluate_folder(pipe, tmp_path / "folder", n=8, progress=False).report
    assert all(t["met"] for t in report["targets"].values()) and report["retrieval"]["n"] == 8
    assert report["retrieval"]["memorised"] == 1.0 and report["retrieval"]["median distance"] == 0.0
    assert report["maps"]["subject miou"] == 1.0 and report["colour swap"]["old gone"] == 1.0

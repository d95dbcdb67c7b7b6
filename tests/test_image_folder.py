"""Tests for diffusion/data/image_folder.py: a folder of captioned images."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.image_folder import ImageFolderDataset, PackedStrings
from diffusion.errors import UserError

# ---------------------------------------------------------------------------------------------
# Image folder


def write_png(path: Path, size=(24, 20), colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_metadata(root: Path, records) -> None:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_image_folder_with_metadata_jsonl(tmp_path):
    write_png(tmp_path / "a.png", (40, 20))
    write_png(tmp_path / "sub" / "b.jpg", (18, 50), (10, 10, 200))
    write_png(tmp_path / "unlisted.png")  # not in metadata.jsonl, so not used
    write_metadata(
        tmp_path,
        [{"file_name": "a.png", "text": "a red  thing\n"}, {"file_name": "sub/b.jpg", "text": "a blue thing"}, ""],
    )
    dataset = ImageFolderDataset(tmp_path, 16)
    assert len(dataset) == 2
    assert dataset.captions() == ["a red thing", "a blue thing"]
    for i in range(2):
        item = dataset[i]
        assert item["index"] == i and item["caption"] == dataset.captions()[i]
        assert item["pixel_values"].shape == (3, 16, 16)
        assert item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert dataset[1]["pixel_values"][2].mean() > 0.5  # blue channel of the blue image
    images, captions = dataset.render([1, 0, 1], np.random.default_rng(0), progress=False)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert captions == ["a blue thing", "a red thing", "a blue thing"]
    assert torch.equal(images[0], images[2])
    assert torch.equal(images[1], torch.from_numpy(dataset.image(0)).permute(2, 0, 1))


def test_image_folder_with_txt_captions_searched_recursively(tmp_path):
    write_png(tmp_path / "one.PNG", (16, 16))
    (tmp_path / "one.txt").write_text("first caption\n")
    write_png(tmp_path / "deep" / "er" / "two.jpeg", (32, 17))
    (tmp_path / "deep" / "er" / "two.txt").write_text("second caption")
    (tmp_path / "notes.md").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, 16)
    assert sorted(dataset.captions()) == ["first caption", "second caption"]
    assert all(dataset[i]["pixel_values"].shape == (3, 16, 16) for i in range(2))


def test_center_crop_random_crop_and_flip(tmp_path):
    # 48x16 stripes: red | green | blue, each 16 px wide; the short side is already 16.
    stripes = np.zeros((16, 48, 3), dtype=np.uint8)
    stripes[:, :16, 0] = stripes[:, 16:32, 1] = stripes[:, 32:, 2] = 255
    stripes[:, 16:32, 0] = np.arange(16) * 10  # a ramp, so a flip is visible
    Image.fromarray(stripes).save(tmp_path / "s.png")
    (tmp_path / "s.txt").write_text("stripes")

    centre = ImageFolderDataset(tmp_path, 16).image(0)
    assert np.array_equal(centre, stripes[:, 16:32])

    torch.manual_seed(0)
    random_crop = ImageFolderDataset(tmp_path, 16, center_crop=False)
    lefts = set()
    for _ in range(20):
        crop = ((random_crop[0]["pixel_values"] + 1) * 127.5).round().byte().permute(1, 2, 0)
        windows = [torch.from_numpy(stripes[:, x : x + 16]) for x in range(33)]
        matches = [x for x, window in enumerate(windows) if torch.equal(crop, window)]
        assert len(matches) == 1
        lefts.add(matches[0])
    assert len(lefts) > 3

    flipping = ImageFolderDataset(tmp_path, 16, random_flip=True)
    crops = {tuple(flipping[0]["pixel_values"][0, 0].tolist()) for _ in range(20)}
    assert len(crops) == 2
    unflipped = ImageFolderDataset(tmp_path, 16)
    assert len({tuple(unflipped[0]["pixel_values"][0, 0].tolist()) for _ in range(5)}) == 1

    # image(i, rng): the crop and the flip come from the generator it is given
    both = ImageFolderDataset(tmp_path, 16, center_crop=False, random_flip=True)
    draws = [both.image(0, np.random.default_rng(seed)) for seed in range(30)]
    assert all(np.array_equal(both.image(0, np.random.default_rng(seed)), draws[seed]) for seed in range(30))
    assert len({image.tobytes() for image in draws}) > 10
    torch.manual_seed(1)
    first = [random_crop[0]["pixel_values"] for _ in range(3)]
    torch.manual_seed(1)
    assert all(torch.equal(a, random_crop[0]["pixel_values"]) for a in first)  # dataset[i] follows torch's seed


def test_corrupt_image_raises_naming_it_or_is_skipped_and_counted(tmp_path, caplog):
    write_png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("good")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "broken.txt").write_text("broken")
    truncated = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "truncated.txt").write_text("truncated")
    with pytest.raises(UserError, match="broken.png") as error:
        ImageFolderDataset(tmp_path, 16)
    assert "\n" not in str(error.value) and "skip_bad" in str(error.value)

    with caplog.at_level(logging.WARNING, logger="diffusion.data.image_folder"):
        dataset = ImageFolderDataset(tmp_path, 16, skip_bad=True)
    assert dataset.captions() == ["good"]
    assert sorted(Path(path).name for path, _ in dataset.skipped) == ["broken.png", "truncated.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2" in warnings[0].getMessage()


@pytest.mark.parametrize("file_name", ["../x.png", "sub/../../x.png", "/etc/x.png"])
def test_file_name_outside_the_folder_raises(tmp_path, file_name):
    root = tmp_path / "data"
    write_png(root / "ok.png")
    write_png(tmp_path / "x.png")  # exists, but outside the folder
    write_metadata(root, [{"file_name": "ok.png", "text": "ok"}, {"file_name": file_name, "text": "escape"}])
    with pytest.raises(UserError, match="outside") as error:
        ImageFolderDataset(root, 16)
    assert "line 2" in str(error.value)
    assert len(ImageFolderDataset(root, 16, skip_bad=True)) == 1


def test_missing_caption_raises_or_is_skipped(tmp_path):
    write_png(tmp_path / "captioned.png")
    (tmp_path / "captioned.txt").write_text("yes")
    write_png(tmp_path / "lonely.png")
    with pytest.raises(UserError, match=r"lonely\.png.*lonely\.txt"):
        ImageFolderDataset(tmp_path, 16)
    dataset = ImageFolderDataset(tmp_path, 16, skip_bad=True)
    assert len(dataset) == 1 and dataset.skipped[0][1] == "no caption"


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "line 2.*not valid JSON"),
        ('{"file_name": "a.png"}', "line 2.*text"),
        ('{"file_name": "gone.png", "text": "t"}', "gone.png.*not found"),
    ],
)
def test_bad_metadata_lines_raise_naming_the_line(tmp_path, line, fragment):
    write_png(tmp_path / "a.png")
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "fine"}, line])
    with pytest.raises(UserError, match=fragment):
        ImageFolderDataset(tmp_path, 16)
    assert ImageFolderDataset(tmp_path, 16, skip_bad=True).captions() == ["fine"]


def test_unusable_folders_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        ImageFolderDataset(tmp_path / "nope", 16)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images found"):
        ImageFolderDataset(tmp_path, 16)
    write_png(tmp_path / "lonely.png")
    with pytest.raises(UserError, match="no usable images"):
        ImageFolderDataset(tmp_path, 16, skip_bad=True)


def test_txt_captions_come_in_sorted_path_order(tmp_path):
    names = ["b.png", "a/z.png", "a-c.png", "a.png", "a/sub/y.png", "A.png"]
    for name in names:
        write_png(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    assert ImageFolderDataset(tmp_path, 16).captions() == [
        str(p.relative_to(tmp_path)) for p in sorted(tmp_path / name for name in names)
    ]


def test_packed_strings_round_trip_any_text():
    texts = ["", "a red circle", "héllo ☃ 猫", "bad \udcff bytes in a file name", "x" * 1000, ""]
    packed = PackedStrings()
    for text in texts:
        packed.append(text)
    assert len(packed) == len(texts) and list(packed) == texts and packed[3] == texts[3]


def test_the_dataset_keeps_no_python_object_per_image(tmp_path):
    """Only the packed paths and captions grow with the folder (what DataLoader workers read)."""
    for i in range(30):
        write_png(tmp_path / f"{i}.png")
    write_metadata(tmp_path, [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(30)])
    dataset = ImageFolderDataset(tmp_path, 16)
    assert len(dataset) == 30 and dataset.captions()[7] == "caption 7"
    per_image = {
        name: value
        for name, value in vars(dataset).items()
        if isinstance(value, (list, dict, tuple, set)) and len(value) >= 30
    }
    assert per_image == {}
    assert dataset.paths[7] == str(tmp_path / "7.png")


# ---------------------------------------------------------------------------------------------
# Transparency and masks


def transparent_disc(size=32, colour=(200, 30, 30), stored=(0, 0, 0)) -> Image.Image:
    """An RGBA image: an opaque disc on transparent pixels that store `stored` (often black),
    half-transparent along one row."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 3) ** 2
    pixels = np.zeros((size, size, 4), dtype=np.uint8)
    pixels[..., :3] = stored
    pixels[inside] = (*colour, 255)
    pixels[0, :] = (*colour, 128)  # top row: half transparent
    return Image.fromarray(pixels, "RGBA")


def test_transparent_pixels_are_composited_on_white_not_dropped(tmp_path):
    disc = transparent_disc()
    disc.save(tmp_path / "rgba.png")
    disc.convert("LA").save(tmp_path / "la.png")
    palette = disc.convert("RGB").quantize(4)  # P with a transparent palette entry
    background = palette.getpixel((1, 5))
    palette.info["transparency"] = background
    palette.save(tmp_path / "p.png", transparency=background)
    write_png(tmp_path / "opaque.png", (32, 32), (0, 0, 0))
    names = ["rgba.png", "la.png", "p.png", "opaque.png"]
    write_metadata(tmp_path, [{"file_name": name, "text": name} for name in names])
    dataset = ImageFolderDataset(tmp_path, 32)
    rgba, la, p, opaque = (dataset.image(i) for i in range(4))
    for image in (rgba, la, p):
        assert (image[5, 1] == 255).all()  # transparent, though it stores black: white
    assert tuple(rgba[16, 16]) == (200, 30, 30)  # the opaque disc keeps its colour
    assert np.abs(rgba[0, 16].astype(int) - (228, 143, 143)).max() <= 1  # half alpha: half way to white
    assert (opaque == 0).all()  # no alpha: unchanged
    assert dataset[0]["pixel_values"][:, 5, 1].tolist() == [1.0, 1.0, 1.0]


def masked_folder(root: Path, sizes=((32, 32),)) -> Path:
    """A folder of transparent discs with their alpha as masks in metadata.jsonl."""
    records = []
    for i, size in enumerate(sizes):
        disc = transparent_disc(size[0]).resize(size)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        disc.save(root / "images" / f"{i}.png")
        disc.getchannel("A").point(lambda a: 255 if a >= 128 else 0).save(root / "masks" / f"{i}.png")
        records.append({"file_name": f"images/{i}.png", "text": f"disc {i}", "mask": f"masks/{i}.png"})
    write_metadata(root, records)
    return root


def test_masks_come_resized_cropped_and_flipped_like_their_images(tmp_path):
    # 48x16 (no resize at 16 px): an object in irregular columns, so any crop or flip shows
    columns = np.random.default_rng(0).random(48) < 0.5
    alpha = np.repeat(columns[None] * 255, 16, axis=0).astype(np.uint8)
    pixels = np.dstack([np.full((16, 48, 3), (10, 120, 200), np.uint8), alpha])
    Image.fromarray(pixels, "RGBA").save(tmp_path / "object.png")
    Image.fromarray(alpha).save(tmp_path / "object-mask.png")
    masked_folder(tmp_path / "discs", [(64, 40)])
    write_metadata(
        tmp_path,
        [
            {"file_name": "object.png", "text": "object", "mask": "object-mask.png"},
            {"file_name": "discs/images/0.png", "text": "disc", "mask": "discs/masks/0.png"},
        ],
    )
    dataset = ImageFolderDataset(tmp_path, 16, center_crop=False, random_flip=True)
    assert dataset.masked == 2
    placements = set()
    for seed in range(20):
        image = dataset.image(0, np.random.default_rng(seed))
        mask = dataset.mask(0, np.random.default_rng(seed))
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert np.array_equal((image == 255).all(axis=2), ~mask)  # white exactly off the object
        placements.add(mask.tobytes())
    assert len(placements) > 5  # the crops and flips did vary

    # resized (nearest): still a mask, on the disc
    disc = ImageFolderDataset(tmp_path, 20)
    image, mask = disc.image(1), disc.mask(1)
    assert mask.shape == (20, 20) and 0.2 < mask.mean() < 0.6
    assert (image[mask] < 240).any(axis=1).mean() > 0.95 and (image[~mask] > 200).all(axis=1).mean() > 0.9
    with Image.open(tmp_path / "discs" / "masks" / "0.png") as file:  # at its own size: exact
        assert np.array_equal(ImageFolderDataset(tmp_path / "discs", 40).mask(0), np.array(file)[:, 12:52] == 255)

    torch.manual_seed(0)
    items = ImageFolderDataset(tmp_path, 16, center_crop=False, random_flip=True, masks=True)
    for _ in range(5):
        item = items[0]
        assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.bool
        assert torch.equal((item["pixel_values"] == 1).all(dim=0), ~item["mask"])


def test_a_folder_without_masks_is_unchanged(tmp_path):
    write_png(tmp_path / "a.png")
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "a"}])
    dataset = ImageFolderDataset(tmp_path, 16)
    assert dataset.masked == 0 and dataset.mask(0) is None
    assert set(dataset[0]) == {"pixel_values", "caption", "index"}
    with pytest.raises(UserError, match="a.png: no mask"):
        ImageFolderDataset(tmp_path, 16, masks=True)


@pytest.mark.parametrize(
    "mask, fragment",
    [
        ("masks/gone.png", "gone.png: mask file not found"),
        ("../m.png", "line 1.*mask '../m.png' points outside"),
        (3, "line 1.*mask must be a path"),
        ("masks/small.png", "small.png: mask is 8x8 px but its image 32x32"),
        ("masks/broken.png", "broken.png: cannot be read as an image"),
    ],
)
def test_bad_masks_raise_naming_them_or_are_skipped(tmp_path, mask, fragment):
    masked_folder(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "small.png")
    (tmp_path / "masks" / "broken.png").write_bytes(b"not a png")
    write_metadata(
        tmp_path,
        [{"file_name": "images/0.png", "text": "bad", "mask": mask}, {"file_name": "images/0.png", "text": "ok"}],
    )
    with pytest.raises(UserError, match=fragment):
        ImageFolderDataset(tmp_path, 16)
    assert ImageFolderDataset(tmp_path, 16, skip_bad=True).captions() == ["ok"]

"""Tests for diffusion/data/fetch.py on a small fake npm package built here: no network."""

import base64
import hashlib
import io
import json
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.data import fetch
from diffusion.data.image_folder import ImageFolderDataset
from diffusion.errors import UserError

PACKAGE = fetch.SOURCES["emoji"].packages["twitter"]


def emoji_png(colour, opaque=True) -> bytes:
    """A 16x16 RGBA PNG: an opaque square of `colour` (or a transparent one) on transparent
    pixels that store black."""
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[4:12, 4:12] = (*colour, 255 if opaque else 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def entry(name, image, category="Objects", **more):
    return {
        "name": name,
        "image": image,
        "category": category,
        "unified": image[:-4].upper(),
        "has_img_twitter": True,
        **more,
    }


INDEX = [
    entry("RED APPLE", "1f34e.png", "Food & Drink", skin_variations={"1F3FB": {"image": "1f34e-1f3fb.png"}}),
    entry("DOG FACE", "1f436.png", "Animals & Nature"),
    entry("Egypt Flag", "1f1ea-1f1ec.png", "Flags"),
    entry("RESCUE WORKER\u2019S  HELMET", "26d1.png"),
    entry("EMOJI MODIFIER FITZPATRICK TYPE-3", "1f3fc.png", "Component"),
    entry("REGIONAL INDICATOR SYMBOL LETTER E", "1f1ea.png", "Symbols"),
    entry("NOT DRAWN BY TWITTER", "1f9a0.png", has_img_twitter=False),
    entry("BROKEN THING", "1f4a5.png"),
    entry("GHOST OF AN IMAGE", "1f47b.png"),
    entry("INVISIBLE THING", "1f4a8.png"),
    {"name": "NO IMAGE FIELD"},
]
FILES = {
    "1f34e.png": emoji_png((220, 30, 30)),
    "1f34e-1f3fb.png": emoji_png((240, 200, 160)),  # a skin-tone variation: not an image of its own
    "1f436.png": emoji_png((160, 110, 60)),
    "1f1ea-1f1ec.png": emoji_png((200, 0, 0)),
    "26d1.png": emoji_png((230, 0, 0)),
    "1f3fc.png": emoji_png((230, 180, 140)),
    "1f1ea.png": emoji_png((0, 80, 200)),
    "1f9a0.png": emoji_png((0, 200, 0)),
    "1f4a5.png": b"\x89PNG\r\n\x1a\nnot really a png",  # corrupt
    # 1f47b.png: missing from the package
    "1f4a8.png": emoji_png((90, 90, 90), opaque=False),  # fully transparent: nothing drawn
}


def make_tarball(path: Path) -> Path:
    members = {"package/emoji.json": json.dumps(INDEX).encode(), "package/LICENSE": b"MIT License, Cal Henderson\n"}
    members |= {PACKAGE.images + name: data for name, data in FILES.items()}
    members["package/img/twitter/sheets/64.png"] = b"a sprite sheet, not read"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def publish(registry: Path, tarball: Path, **dist) -> None:
    """Write the registry's description of PACKAGE, pointing at `tarball` (a file:// URL)."""
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    dist = {"tarball": tarball.as_uri(), "integrity": f"sha512-{digest}", **dist}
    (registry / PACKAGE.name).mkdir(parents=True, exist_ok=True)
    (registry / PACKAGE.name / PACKAGE.version).write_text(json.dumps({"name": PACKAGE.name, "dist": dist}))


@pytest.fixture
def registry(tmp_path) -> str:
    root = tmp_path / "registry"
    publish(root, make_tarball(tmp_path / "package.tgz"))
    return root.as_uri()


def run(registry, dest, **options):
    return fetch.fetch("emoji", dest, ["twitter"], registry=registry, progress=False, **options)


def test_fetch_writes_an_image_folder_with_masks_captions_and_licence(registry, tmp_path):
    dest = tmp_path / "out" / "emoji"
    report = run(registry, dest)
    assert report.written == {"twitter": 4}
    lines = [json.loads(line) for line in (dest / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == ["red apple", "dog face", "egypt flag", "rescue worker's helmet"]
    assert lines[0] == {
        "file_name": "images/twitter-1f34e.png",
        "text": "red apple",
        "mask": "masks/twitter-1f34e.png",
        "set": "twitter",
        "category": "Food & Drink",
    }
    assert sorted(p.name for p in (dest / "images").iterdir()) == sorted(Path(line["file_name"]).name for line in lines)
    with Image.open(dest / "images" / "twitter-1f34e.png") as image, Image.open(dest / "masks/twitter-1f34e.png") as m:
        assert image.mode == "RGB" and m.mode == "L"
        pixels, mask = np.array(image), np.array(m)
    assert set(np.unique(mask)) == {0, 255}
    assert (mask[4:12, 4:12] == 255).all() and mask.sum() == 64 * 255  # the mask is the alpha
    assert (pixels[mask == 0] == 255).all() and (pixels[mask == 255] == (220, 30, 30)).all()  # on white

    assert report.skipped == {
        "Component: a modifier (skin tone, hair) of another emoji, not a thing to draw": 1,
        "a regional indicator letter: half a flag, not a thing to draw": 1,
        "no twitter image": 1,
        "an entry without a name, image or category": 1,
    }
    reasons = dict(report.bad)
    assert reasons.keys() == {"twitter/1f4a5.png", "twitter/1f47b.png", "twitter/1f4a8.png"}
    assert reasons["twitter/1f4a5.png"].startswith("unreadable image (")
    assert reasons["twitter/1f47b.png"] == "missing from the package"
    assert reasons["twitter/1f4a8.png"] == "blank: no pixel is opaque"

    licence = (dest / "LICENSE.md").read_text(encoding="utf-8")
    assert "CC-BY 4.0" in licence and "MIT License, Cal Henderson" in licence and "Apache" not in licence
    assert sorted(p.name for p in dest.parent.iterdir()) == ["emoji"]  # no temporary folder left
    assert not (dest / "download.tgz").exists()

    # the folder trains as it is: images on white, masks beside them
    dataset = ImageFolderDataset(dest, 16, masks=True)
    assert len(dataset) == 4 and dataset.masked == 4
    assert dataset[0]["mask"].sum() == 64 and dataset[0]["pixel_values"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_the_command_line_prints_what_it_wrote_and_skipped(registry, tmp_path, capsys):
    fetch.main(["emoji", str(tmp_path / "emoji"), "--sets", "twitter", "--registry", registry])
    out = capsys.readouterr().out
    assert "wrote 4 images" in out and "(twitter 4)" in out
    assert "skipped 1 entries: Component" in out
    assert "skipped 3 images that could not be used:" in out and "twitter/1f47b.png: missing from the package" in out
    with pytest.raises(SystemExit) as error:
        fetch.main(["emoji", str(tmp_path / "other"), "--sets", "twitter,apple"])
    assert error.value.code == 2
    assert "no set 'apple'; choose from twitter, google" in capsys.readouterr().err


def test_a_tampered_tarball_fails_its_integrity_check(registry, tmp_path):
    tarball = tmp_path / "package.tgz"
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 1
    tarball.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the registry's sha512 hash"):
        run(registry, tmp_path / "emoji")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package.tgz", "registry"]


def test_the_sha1_shasum_checks_packages_without_an_integrity_hash(tmp_path):
    tarball = make_tarball(tmp_path / "package.tgz")
    good = hashlib.sha1(tarball.read_bytes()).hexdigest()
    fetch.verify(tarball, {"shasum": good}, "url")
    with pytest.raises(UserError, match="sha1 hash"):
        fetch.verify(tarball, {"shasum": "0" * 40}, "url")
    with pytest.raises(UserError, match="no sha512 or sha1 hash"):
        fetch.verify(tarball, {"integrity": "md5-abc"}, "url")


def test_an_existing_folder_is_replaced_only_with_force(registry, tmp_path):
    dest = tmp_path / "emoji"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; pass --force"):
        run(registry, dest)
    assert (dest / "mine.txt").read_text() == "keep me"
    run(registry, dest, force=True)
    assert not (dest / "mine.txt").exists() and (dest / "metadata.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji", "package.tgz", "registry"]


def test_a_failure_mid_write_leaves_no_folder(registry, tmp_path, monkeypatch):
    written = fetch.write_item

    def fail_on_the_third(*args):
        fail_on_the_third.calls += 1
        if fail_on_the_third.calls == 3:
            raise KeyboardInterrupt
        return written(*args)

    fail_on_the_third.calls = 0
    monkeypatch.setattr(fetch, "write_item", fail_on_the_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(registry, out / "emoji")
    assert list(out.iterdir()) == []
    # and with --force, the old folder stays whole
    (out / "emoji").mkdir()
    (out / "emoji" / "old.txt").write_text("old")
    fail_on_the_third.calls = 0
    with pytest.raises(KeyboardInterrupt):
        run(registry, out / "emoji", force=True)
    assert [p.name for p in out.iterdir()] == ["emoji"] and (out / "emoji" / "old.txt").read_text() == "old"


def test_no_network_is_one_line_naming_the_url(tmp_path, monkeypatch):
    def offline(url, timeout):
        assert timeout == fetch.TIMEOUT
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as error:
        fetch.fetch("emoji", tmp_path / "emoji", progress=False)
    message = str(error.value)
    assert message.startswith(f"cannot download {fetch.REGISTRY}/{PACKAGE.name}/{PACKAGE.version} (")
    assert "name resolution" in message and "check the network" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_registry_answer_that_is_not_a_package_description(tmp_path):
    root = tmp_path / "registry" / PACKAGE.name
    root.mkdir(parents=True)
    (root / PACKAGE.version).write_text("<html>not found</html>")
    with pytest.raises(UserError, match="is not the registry's description of emoji-datasource-twitter"):
        run((tmp_path / "registry").as_uri(), tmp_path / "emoji")
    with pytest.raises(UserError, match="cannot download file:"):
        run((tmp_path / "nowhere").as_uri(), tmp_path / "emoji")


def test_the_emoji_config_trains_on_a_fetched_folder_offline_with_no_hand_edits(registry, tmp_path):
    """configs/emoji.yaml as a user runs it (only its size shrunk to the tests' tiny model): the
    small CLIP on the folder's captions, no hub, no grounding keys to zero."""
    from conftest import TINY

    from diffusion.config import load_config
    from diffusion.sampling.pipeline import Pipeline
    from diffusion.training.loop import train

    folder = tmp_path / "emoji"
    run(registry, folder)
    tiny = [
        f"{section}.{key}={json.dumps(TINY[section][key])}" for section in ("model", "text") for key in TINY[section]
    ]
    shrunk = [*tiny, "data.resolution=16", "train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0"]
    cache = tmp_path / "cache"
    cfg = load_config("configs/emoji.yaml", [*shrunk, f"data.path={folder}", f"data.embedding_cache={cache}"])
    assert cfg.text.pretrained is None and cfg.train.grounding_weight == 0 == cfg.train.grounding_pixel_weight
    train(cfg, tmp_path / "run")
    pipe = Pipeline.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert len(pipe("red apple", steps=2, progress=False).images) == 1

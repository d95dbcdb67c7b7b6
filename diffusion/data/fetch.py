"""Fetch a captioned image set that a public package registry ships, and write it as an image folder.

    python -m diffusion.data.fetch emoji runs/emoji                  # Twemoji and Noto Emoji
    python -m diffusion.data.fetch emoji runs/emoji --sets twitter   # one artist's set only

The folder, which image_folder.py reads (data.kind=imagefolder data.path=DIR):
    images/<set>-<code>.png  RGB, transparency composited on white
    masks/<set>-<code>.png   the object's mask: the alpha channel thresholded at half ("L", 0 or 255)
    metadata.jsonl           {"file_name", "text" (the caption), "mask", "set", "category"} per image
    LICENSE.md               which licence covers which images, and the attribution they ask for

Each set is one npm package, downloaded over HTTPS and checked against the registry's integrity
hash (sha512) before it is read. The folder is written under a temporary name beside DIR and
renamed into place at the end, so an interrupted fetch leaves no DIR, and an existing DIR is
replaced only with --force. An image that cannot be used (missing, unreadable, blank) is skipped
and listed with its reason at the end.

A new set is an entry of SOURCES: its packages, the member that lists the images, and a function
turning that list into images and captions.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm import tqdm

from diffusion.cli import ArgumentParser
from diffusion.errors import UserError, exit_on_user_error, one_line

REGISTRY = "https://registry.npmjs.org"
TIMEOUT = 60  # seconds a connection may wait for the registry before giving up


class Item(NamedTuple):
    """One image a source lists."""

    file: str  # its file name in the package's image folder
    caption: str
    fields: dict  # more metadata.jsonl fields, e.g. {"category": "Food & Drink"}


@dataclass(frozen=True)
class Package:
    """One artist's set: an npm package and the licence of its images."""

    name: str
    version: str
    images: str  # the tarball folder holding its images
    licence: str  # LICENSE.md's section: the images' licence and the attribution it asks for


@dataclass(frozen=True)
class Source:
    """A captioned image set that registry packages ship, one package per set."""

    packages: dict[str, Package]  # set name -> its package
    index: str  # the tarball member listing the images (JSON)
    items: Callable[[object, str], Iterator[Item | str]]  # (index, set) -> each image, or why an entry is skipped
    notice: str  # the tarball member with the package's own licence (copied into LICENSE.md)
    captions: str  # LICENSE.md: where the captions come from (the notice's licence covers them)


# Emoji categories that are not a thing to draw: the skin-tone swatches (and hair components) only
# modify another emoji. Skin-tone variations of an emoji are not separate images either.
SKIPPED_CATEGORIES = {"Component": "a modifier (skin tone, hair) of another emoji, not a thing to draw"}
# The letters that pair into flags (U+1F1E6-1F1FF), as emoji.json's "unified" writes them: half a flag, alone.
REGIONAL_INDICATORS = {f"{code:X}" for code in range(0x1F1E6, 0x1F200)}


def emoji_items(index, set_name: str) -> Iterator[Item | str]:
    """Each emoji of emoji-datasource's emoji.json with an image in `set_name`, captioned with its
    name in lower case ("RED APPLE" -> "red apple", "Egypt Flag" -> "egypt flag"); the reason,
    for each entry skipped."""
    for entry in index if isinstance(index, list) else []:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("name", "image", "category"))):
            yield "an entry without a name, image or category"
        elif entry["category"] in SKIPPED_CATEGORIES:
            yield f"{entry['category']}: {SKIPPED_CATEGORIES[entry['category']]}"
        elif str(entry.get("unified")).upper() in REGIONAL_INDICATORS:
            yield "a regional indicator letter: half a flag, not a thing to draw"
        elif not entry.get(f"has_img_{set_name}"):
            yield f"no {set_name} image"
        else:
            caption = " ".join(entry["name"].replace("\u2019", "'").lower().split())
            yield Item(entry["image"], caption, {"category": entry["category"]})


SOURCES = {
    "emoji": Source(
        packages={
            "twitter": Package(
                "emoji-datasource-twitter",
                "16.0.0",
                "package/img/twitter/64/",
                "Twemoji, Copyright Twitter, Inc and other contributors (https://github.com/jdecked/twemoji), "
                "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/). CC-BY allows any use, "
                "training included, with attribution: where you share these images or images made from them, "
                'credit "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0", link the licence, and say '
                "they were changed (composited on white, masks from their alpha). Twemoji accepts a mention "
                "in a README or an About page.",
            ),
            "google": Package(
                "emoji-datasource-google",
                "16.0.0",
                "package/img/google/64/",
                "Noto Emoji, Copyright Google Inc. (https://github.com/googlefonts/noto-emoji), licensed under "
                "the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0), which allows any use, "
                "training included. Where you redistribute these images, include a copy of that licence and "
                "say they were changed (composited on white, masks from their alpha).",
            ),
        },
        index="package/emoji.json",
        items=emoji_items,
        notice="package/LICENSE",
        captions="The captions (the emoji's names) and categories come from emoji.json of iamcal/emoji-data",
    ),
}


@dataclass
class Report:
    """What a fetch wrote and left out."""

    written: Counter = field(default_factory=Counter)  # set -> images written
    skipped: Counter = field(default_factory=Counter)  # reason -> entries the source's rules leave out
    bad: list[tuple[str, str]] = field(default_factory=list)  # (set/file, reason): images that could not be used
    seconds: float = 0.0


def fetch(
    name: str, dest, sets: list[str] | None = None, force: bool = False, registry: str = REGISTRY, progress=True
) -> Report:
    """Fetch source `name` (a key of SOURCES) into the image folder `dest`. sets: which of its
    packages (default all); force: replace an existing dest; registry: the npm registry's URL;
    progress: show tqdm bars."""
    start = time.perf_counter()
    source = SOURCES[name]
    sets = list(dict.fromkeys(sets or source.packages))
    unknown = [s for s in sets if s not in source.packages]
    if unknown:
        raise UserError(f"{name} has no set {unknown[0]!r}; choose from {', '.join(source.packages)}")
    dest = Path(dest)
    if _exists(dest) and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it, or choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        report, notices = Report(), {}
        (work / "images").mkdir()
        (work / "masks").mkdir()
        with open(work / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for set_name in sets:
                notices[set_name] = write_set(source, set_name, work, metadata, report, registry, progress)
        (work / "LICENSE.md").write_text(licence_text(name, source, sets, notices), encoding="utf-8")
        _move_into_place(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already, unless the fetch failed
    report.seconds = time.perf_counter() - start
    return report


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _move_into_place(work: Path, dest: Path) -> None:
    """Rename the finished folder `work` to `dest`, replacing what is there (--force) only once
    the new folder is complete."""
    if not _exists(dest):
        os.rename(work, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.replace(dest, old / dest.name)
    try:
        os.rename(work, dest)
    except OSError:
        os.replace(old / dest.name, dest)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_set(
    source: Source, set_name: str, folder: Path, metadata, report: Report, registry: str, progress: bool
) -> str:
    """Download one set's package and write its images, masks and metadata lines into `folder`,
    counting them in `report`; returns the package's licence notice."""
    package = source.packages[set_name]
    tarball = download(package, registry, folder / "download.tgz", progress)
    members = read_members(tarball, lambda m: m in (source.index, source.notice) or m.startswith(package.images))
    tarball.unlink()
    try:
        index = json.loads(members[source.index])
    except (KeyError, ValueError):
        raise UserError(f"{package.name} {package.version} has no readable {source.index}") from None
    for item in tqdm(list(source.items(index, set_name)), desc=f"writing {set_name}", disable=not progress):
        if isinstance(item, str):
            report.skipped[item] += 1
            continue
        reason = write_item(folder, set_name, item, members.get(package.images + item.file), metadata)
        if reason:
            report.bad.append((f"{set_name}/{item.file}", reason))
        else:
            report.written[set_name] += 1
    return members.get(source.notice, b"").decode("utf-8", "replace")


def write_item(folder: Path, set_name: str, item: Item, data: bytes | None, metadata) -> str | None:
    """Write one image, its mask and its metadata line; or return why it cannot be used."""
    from diffusion.data.image_folder import on_white  # here: it imports torch, which --help need not load

    if data is None:
        return "missing from the package"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgba = image.convert("RGBA")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"unreadable image ({one_line(' '.join(str(error).split()))})"
    mask = rgba.getchannel("A").point(lambda alpha: 255 if alpha >= 128 else 0)
    if not mask.getbbox():
        return "blank: no pixel is opaque"
    stem = f"{set_name}-{Path(item.file).stem}"
    on_white(rgba).save(folder / "images" / f"{stem}.png")
    mask.save(folder / "masks" / f"{stem}.png")
    line = {"file_name": f"images/{stem}.png", "text": item.caption, "mask": f"masks/{stem}.png", "set": set_name}
    metadata.write(json.dumps(line | item.fields, ensure_ascii=False) + "\n")
    return None


def download(package: Package, registry: str, path: Path, progress: bool) -> Path:
    """Download `package`'s tarball to `path`, checked against the registry's integrity hash."""
    meta_url = f"{registry.rstrip('/')}/{package.name}/{package.version}"
    with _open(meta_url) as response:
        text = b"".join(iter(lambda: _read(response, meta_url), b""))
    try:
        dist = json.loads(text)["dist"]
        url = dist["tarball"]
    except (ValueError, KeyError, TypeError):
        url = None
    if not isinstance(url, str):
        raise UserError(f"{meta_url} is not the registry's description of {package.name} {package.version}")
    with _open(url) as response, open(path, "wb") as file:
        size = int(response.headers.get("Content-Length") or 0) or None
        desc = f"{package.name}@{package.version}"
        with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
            while chunk := _read(response, url):
                file.write(chunk)
                bar.update(len(chunk))
    verify(path, dist, url)
    return path


def _open(url: str):
    """urlopen, any failure one line naming the URL."""
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise _network_error(url, error) from None


def _read(response, url: str) -> bytes:
    try:
        return response.read(1 << 20)
    except OSError as error:  # a timeout or a dropped connection mid-download
        raise _network_error(url, error) from None


def _network_error(url: str, error: Exception) -> UserError:
    reason = getattr(error, "reason", None) or error
    detail = f"HTTP {error.code} {reason}" if isinstance(error, urllib.error.HTTPError) else str(reason)
    return UserError(
        one_line(f"cannot download {url} ({detail or type(error).__name__}); check the network connection")
    )


def verify(path: Path, dist: dict, url: str) -> None:
    """Raise UserError unless the file's hash is the registry's: dist's sha512 integrity, or for
    old packages that lack one, its sha1 shasum."""
    hashes = dict(item.partition("-")[::2] for item in str(dist.get("integrity") or "").split())
    data = path.read_bytes()
    if "sha512" in hashes:
        algorithm, expected = "sha512", hashes["sha512"]
        actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    elif dist.get("shasum"):
        algorithm, expected, actual = "sha1", str(dist["shasum"]).lower(), hashlib.sha1(data).hexdigest()
    else:
        raise UserError(f"the registry gives no sha512 or sha1 hash for {url}, so it cannot be checked")
    if actual != expected:
        raise UserError(f"{url} does not match the registry's {algorithm} hash: the download is corrupt; try again")


def read_members(tarball: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of a .tgz whose names `wanted` accepts, read in one pass."""
    try:
        with tarfile.open(tarball, "r|gz") as archive:
            return {m.name: archive.extractfile(m).read() for m in archive if m.isfile() and wanted(m.name)}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise UserError(one_line(f"{tarball.name} is not a readable .tgz ({error})")) from None


def licence_text(name: str, source: Source, sets: list[str], notices: dict[str, str]) -> str:
    """LICENSE.md: each set's images and their licence, then the package's own licence."""
    lines = [f"# Licences of this folder ({name})", ""]
    lines += ["Written by `python -m diffusion.data.fetch` from these npm packages; the images were changed:"]
    lines += ["composited on white (images/), their alpha thresholded into masks (masks/).", ""]
    for set_name in sets:
        package = source.packages[set_name]
        lines += [f"## {set_name}: images/{set_name}-*.png, masks/{set_name}-*.png", ""]
        lines += [f"From the npm package {package.name} {package.version}. {package.licence}", ""]
    lines += ["## The captions and metadata", "", f"{source.captions}, under this licence:", ""]
    notice = next((text for text in notices.values() if text.strip()), "(the package shipped no licence file)")
    return "\n".join(lines) + "\n" + "\n".join(f"    {line}".rstrip() for line in notice.splitlines()) + "\n"


def summary(report: Report, dest) -> str:
    """What a fetch wrote and skipped, for the command line."""
    per_set = ", ".join(f"{s} {n:,}" for s, n in report.written.items())
    lines = [f"wrote {sum(report.written.values()):,} images to {dest} ({per_set}) in {report.seconds:.0f} s"]
    for reason, count in report.skipped.most_common():
        lines.append(f"skipped {count:,} entries: {reason}")
    lines.append(f"skipped {len(report.bad)} images that could not be used" + (":" if report.bad else ""))
    lines += [f"  {member}: {reason}" for member, reason in report.bad]
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(
        prog="python -m diffusion.data.fetch",
        description="Fetch a captioned image set from a package registry and write it as an image folder "
        "(images/, masks/, metadata.jsonl, LICENSE.md) for data.kind=imagefolder.",
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="the set: emoji (Twemoji and Noto Emoji, named)")
    parser.add_argument("dir", help="the folder to write (it must not exist, unless --force)")
    parser.add_argument("--sets", help="the artists' sets, comma-separated (emoji: twitter,google; default: all)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--registry", default=REGISTRY, help=f"the npm registry, or a mirror (default {REGISTRY})")
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()] if args.sets else None
    report = fetch(args.name, args.dir, sets, force=args.force, registry=args.registry)
    print(summary(report, args.dir))


if __name__ == "__main__":
    main()

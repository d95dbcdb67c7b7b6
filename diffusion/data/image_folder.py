"""A folder of captioned images as a training set.

Captions come from `metadata.jsonl` (lines of {"file_name": ..., "text": ...}, the imagefolder
convention of diffusers' training examples) or from a `.txt` file beside each image. Items are
`{"pixel_values": (3, H, W) float32 in [-1, 1], "caption": str, "index": int}`. A metadata line may
also name an object mask ("mask": a greyscale image, white on the object), which `mask` returns
cropped and flipped like its image (python -m diffusion.data.fetch writes such folders).

Images with an alpha channel are composited on white (`on_white`): icons and emoji are drawn to be
seen on a light page, and dropping the alpha, as diffusers' training scripts do, shows whatever
colour the transparent pixels happen to store (often black).

Nothing per image is kept but its path and caption, packed into two byte buffers, so a folder of
millions of images costs tens of megabytes; the pixels are decoded when a batch needs them
(`image`, from the training DataLoader's workers).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from diffusion.errors import UserError, check_int, one_line
from diffusion.images import to_pixel_values

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PackedStrings:
    """A list of strings stored as one UTF-8 byte buffer and the end offset of each.

    A Python list of N strings costs about 60 bytes per string on top of the text, and a forked
    DataLoader worker that reads it copies the memory pages it touches (reading a str writes its
    reference count); a buffer and an offset array have neither cost."""

    def __init__(self):
        self._buffer = bytearray()
        self._ends = array("q")

    def append(self, text: str) -> None:
        # surrogatepass: any str round-trips, even file names that are not valid UTF-8
        self._buffer += text.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._buffer))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self._buffer[start : self._ends[i]].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


class ImageFolderDataset(Dataset):
    """A folder of images with captions, from `metadata.jsonl` (lines of
    {"file_name": ..., "text": ...}, the imagefolder convention, and optionally "mask": ...) or
    else from a `.txt` file beside each image. Every image (and mask) is decoded once up front, so
    a bad file fails at start-up, not hours into training; only its path and caption are kept."""

    def __init__(
        self,
        root,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        skip_bad: bool = False,
        masks: bool = False,
    ):
        """root: the folder (searched recursively when there is no metadata.jsonl).
        resolution: side of the square images produced, in pixels (>= 16).
        center_crop: crop the centre after resizing the short side; False crops at a random
            place (drawn from the generator `image` is given).
        random_flip: flip horizontally with probability 0.5. Off by default because captions
            may say "left" or "right".
        skip_bad: skip unreadable or uncaptioned files, listing them in `self.skipped` as
            (path, reason), instead of raising UserError.
        masks: items carry "mask", (H, W) bool, cropped and flipped like the image; every
            metadata line must then name one.
        """
        check_int("data.resolution", resolution, 16)
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(
                f"data.path {str(root)!r} is not a directory; point data.path at a folder of images with captions"
            )
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.masks = masks
        # the mask path of each image, "" where it has none
        self.paths, self._captions, self._masks = PackedStrings(), PackedStrings(), PackedStrings()
        self.masked = 0  # how many images have a mask

        metadata = self.root / "metadata.jsonl"
        found = 0
        for path, caption, mask in self._from_metadata(metadata) if metadata.is_file() else self._from_txt():
            found += 1
            if masks and not mask:
                self._reject(path, "no mask", f'name its mask ("mask": ...) in {metadata}, or leave masks off')
            elif self._usable(path, mask):
                self.paths.append(path)
                self._captions.append(caption)
                self._masks.append(mask)
                self.masked += bool(mask)
        if not found and not self.skipped:
            raise UserError(
                one_line(
                    f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                    "add images, or point data.path at the right folder"
                )
            )
        if self.skipped:
            logger.warning(
                "skipped %d bad files in %s (listed in dataset.skipped); first: %s: %s",
                len(self.skipped),
                one_line(str(self.root)),
                *(one_line(text) for text in self.skipped[0]),
            )
        if not self.paths:
            raise UserError(
                one_line(
                    f"no usable images in {self.root}: all {len(self.skipped)} were bad (first: "
                    f"{self.skipped[0][0]}: {self.skipped[0][1]}); fix the files or data.path"
                )
            )

    def _reject(self, path, reason: str, fix: str) -> None:
        """Record a bad file when skipping, else raise a one-line UserError about it (a line
        break in its name or reason written as an escape)."""
        if self.skip_bad:
            self.skipped.append((str(path), one_line(reason)))
        else:
            raise UserError(one_line(f"{path}: {reason}; {fix}, or set data.skip_bad to skip bad files"))

    def _from_metadata(self, metadata: Path) -> Iterator[tuple[str, str, str]]:
        """(image path, caption, mask path or "") for each usable line of metadata.jsonl, read
        line by line."""
        root = self.root.resolve()
        fix = 'make each line {"file_name": "<path relative to the folder>", "text": "<caption>"}'
        with metadata.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                where = f"{metadata} line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._reject(where, "not valid UTF-8", f"save {metadata.name} as UTF-8 text")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self._reject(where, "not valid JSON", fix)
                    continue
                if not (
                    isinstance(record, dict)
                    and isinstance(record.get("file_name"), str)
                    and isinstance(record.get("text"), str)
                ):
                    self._reject(where, "needs string fields file_name and text", fix)
                    continue
                if not isinstance(record.get("mask", ""), str):
                    self._reject(
                        where, "mask must be a path (a string)", "write the mask's path relative to the folder"
                    )
                    continue
                path = self._inside(root, record["file_name"], where, "file_name")
                mask = self._inside(root, record["mask"], where, "mask") if record.get("mask") else ""
                if path is None or mask is None:
                    continue
                if not os.path.isfile(path):
                    self._reject(path, "image file not found", f"fix file_name on {where}")
                elif mask and not os.path.isfile(mask):
                    self._reject(mask, "mask file not found", f"fix mask on {where}")
                elif not record["text"].strip():
                    self._reject(path, "empty caption", f"write its caption in the text field on {where}")
                else:
                    yield path, " ".join(record["text"].split()), mask

    def _inside(self, root: Path, name: str, where: str, field: str) -> str | None:
        """root / name, or None (rejected) where it points outside root. Normalised lexically
        rather than resolving symlinks: snapshot folders (e.g. the Hugging Face cache) link to
        files elsewhere, which is fine; "..", and absolute paths, are not."""
        path = Path(os.path.normpath(root / name))
        if path.is_relative_to(root):
            return str(path)
        self._reject(where, f"{field} {name!r} points outside {root}", "use a path relative to the folder")
        return None

    def _from_txt(self) -> Iterator[tuple[str, str, str]]:
        """(image path, caption, "": no mask) for each image under root with a same-stem .txt
        beside it, in the order of sorted paths."""
        for path in _images_under(str(self.root)):
            caption_file = Path(path).with_suffix(".txt")
            if not caption_file.is_file():
                self._reject(path, "no caption", f"write the caption to {caption_file} or add metadata.jsonl")
                continue
            try:
                caption = caption_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                self._reject(caption_file, f"caption cannot be read ({error})", "save it as UTF-8 text")
                continue
            if not caption.strip():
                self._reject(path, "empty caption", f"write the caption to {caption_file}")
                continue
            yield path, " ".join(caption.split()), ""

    def _usable(self, path: str, mask: str) -> bool:
        """Whether the image, and its mask if it has one, can be decoded and are the same size;
        rejects the image otherwise."""
        size = self._readable(path)
        if not mask or size is None:
            return size is not None
        mask_size = self._readable(mask)
        if mask_size is not None and mask_size != size:
            self._reject(
                mask,
                f"mask is {mask_size[0]}x{mask_size[1]} px but its image {size[0]}x{size[1]}",
                "make them the same size",
            )
            return False
        return mask_size is not None

    def _readable(self, path: str) -> tuple[int, int] | None:
        """The image's size if PIL can decode it fully; else None, rejecting it. An image of more
        pixels than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 million) is
        rejected before it is decoded, where PIL would only warn below twice the limit."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.load()
                    return image.size
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as error:
            # Some decoder messages span lines; the UserError must stay on one.
            detail = " ".join(str(error).split())
            self._reject(path, f"cannot be read as an image ({detail})", "replace or remove it")
            return None

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Image i resized so its short side is `resolution`, cropped square and maybe flipped;
        (H, W, 3) uint8. rng: where the random crop's place (center_crop off) and the flip
        (random_flip on) are drawn from; needed only for those."""
        with Image.open(self.paths[i]) as file:
            return np.array(self._fit(_rgb(file), rng, Image.Resampling.BICUBIC))

    def mask(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray | None:
        """Image i's object mask, (H, W) bool, resized (nearest), cropped and flipped as `image`
        does given a generator in the same state; None where the image has none."""
        if not self._masks[i]:
            return None
        with Image.open(self._masks[i]) as file:
            mask = file.convert("L")
        return np.array(self._fit(mask, rng, Image.Resampling.NEAREST)) >= 128

    def _fit(self, image: Image.Image, rng: np.random.Generator | None, resample) -> Image.Image:
        """`image` resized so its short side is `resolution`, cropped square and maybe flipped, the
        crop's place and the flip drawn from `rng` in a fixed order (so an image and its mask,
        given generators in the same state, get the same ones)."""
        width, height = image.size
        scale = self.resolution / min(width, height)
        # max() guards against rounding the short side below the crop size.
        size = (
            max(self.resolution, round(width * scale)),
            max(self.resolution, round(height * scale)),
        )
        image = image.resize(size, resample)
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = int(rng.integers(spare_x + 1)), int(rng.integers(spare_y + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __getitem__(self, i: int) -> dict:
        # Random crops and flips follow torch's global RNG here (torch.manual_seed repeats them).
        seed = int(torch.randint(2**62, ()))
        pixel_values = to_pixel_values(self.image(i, np.random.default_rng(seed)))
        item = {"pixel_values": pixel_values, "caption": self._captions[i], "index": i}
        if self.masks:
            item["mask"] = torch.from_numpy(self.mask(i, np.random.default_rng(seed)))
        return item

    def captions(self) -> list[str]:
        """Every caption, in index order (no image decoding)."""
        return list(self._captions)

    def render(self, indices, rng: np.random.Generator, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Decode the images at `indices` into memory, their random crops and flips drawn from
        `rng`. progress: show a tqdm bar. Returns (images (n, 3, H, W) uint8, their captions)."""
        images = torch.empty((len(indices), 3, self.resolution, self.resolution), dtype=torch.uint8)
        for row, i in enumerate(tqdm(indices, desc="loading images", disable=not progress)):
            images[row] = torch.from_numpy(self.image(int(i), rng)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        return images, [self._captions[int(i)] for i in indices]


def _rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB. 16-bit greyscale ("I;16", and "I" as older PILs read it) keeps its top 8
    bits: PIL's own conversion clips every value above 255 to white. Transparency is composited
    on white (`on_white`)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((values.clip(0, 65535) >> 8).astype(np.uint8))
    return on_white(image)


def on_white(image: Image.Image) -> Image.Image:
    """`image` in RGB, any transparency (an alpha channel: RGBA, LA, PA; or a transparent
    palette entry or colour) composited on white; an image without it only converted."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image.convert("RGB")


def _images_under(folder: str) -> Iterator[str]:
    """The image files under `folder`, recursively, in the order of their sorted paths (each
    folder's entries sorted by name, a subfolder's files at its place), one folder listed at a
    time. Symlinked folders are not followed."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:  # an unreadable subfolder holds nothing we can use
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _images_under(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            yield entry.path

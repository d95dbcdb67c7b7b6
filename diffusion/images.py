"""Turning tensors into pictures: PIL conversion, labelled grids, PNGs with text metadata.

PIL and numpy only: torchvision is deliberately not a dependency (a broken install of it breaks
transformers' and diffusers' imports).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from diffusion.errors import UserError


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [-1, 1] -> B RGB images."""
    return [Image.fromarray(a) for a in uint8_images(images)]


def to_pixel_values(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], the model's pixel range."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


def font(size: int):
    """PIL's default font at `size` px (or its fixed size where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def labelled_grid(
    images: list[Image.Image],
    labels: list[str] | None = None,
    columns: int | None = None,
    scale: int | None = None,
    label_width_chars: int = 22,
) -> Image.Image:
    """Tile `images` in a grid, each with its (wrapped) label underneath. Small images are scaled
    up with nearest-neighbour (default: to about 128 px) so they can be looked at."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or min(len(images), 8)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    scale = scale or max(1, 128 // max(w, h))
    cell_w, cell_h = w * scale, h * scale
    label_font = font(11)
    wrapped = [textwrap.wrap(label, label_width_chars)[:4] for label in (labels or [""] * len(images))]
    text_h = 13 * max((len(lines) for lines in wrapped), default=0) + (4 if labels else 0)
    pad = 4
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + text_h + pad)
        grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell_h + 2 + 13 * j), line, fill="black", font=label_font)
    return grid


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temporary name, then rename) with text metadata chunks."""
    path = Path(path)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        image.save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except OSError as error:
        raise UserError(f"cannot write '{path}': {error.strerror or error}; choose a writable output path") from None
    return path


def check_writable(path: str | Path) -> None:
    """Fail early, before any long work, if `path` (a file to be written) cannot be created."""
    path = Path(path)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if path.is_dir():
        raise UserError(f"output path '{path}' is a folder; give a file name such as out.png")
    if not parent.is_dir():
        raise UserError(
            f"output path '{path}' cannot be written: '{parent}' is a file, not a folder; choose another --out"
        )
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"output path '{path}' cannot be written (permission denied); choose another --out")


def uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# A perceptually ordered colour map (dark blue -> purple -> orange -> yellow) for heat maps,
# interpolated between a few anchors so matplotlib is not needed.
_HEAT_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    position = np.clip(values, 0, 1) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * _HEAT_ANCHORS[low] + frac * _HEAT_ANCHORS[low + 1]).round().astype(np.uint8)


def attention_shares(word_maps: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each word's share of the attention mass that all the words' maps hold together."""
    total = sum(float(m.sum()) for m in word_maps.values()) or 1.0
    return {label: float(m.sum()) / total for label, m in word_maps.items()}


def heat_overlay(image: Image.Image, word_map: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """`image` with the heat colours of `word_map` (scaled to its own [min, max]) blended over it;
    a map smaller than the image is resized bilinearly."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    values = word_map.float().numpy()
    values = (values - values.min()) / max(values.max() - values.min(), 1e-12)
    heat = heat_colours(values).astype(np.float32)
    if heat.shape[:2] != base.shape[:2]:
        heat = np.asarray(Image.fromarray(heat.astype(np.uint8)).resize(image.size, Image.BILINEAR), np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).round().astype(np.uint8))


def attention_panel(
    image: Image.Image, word_maps: dict[str, torch.Tensor], title: str = "", alpha: float = 0.6
) -> Image.Image:
    """The image, then one heat-map overlay per word (`heat_overlay`), labelled with the word and
    the share of the attention mass it holds (`attention_shares`)."""
    shares = attention_shares(word_maps)
    tiles = [image] + [heat_overlay(image, word_map, alpha) for word_map in word_maps.values()]
    labels = [title or "image"] + [f"{label} ({shares[label]:.0%})" for label in word_maps]
    return labelled_grid(tiles, labels, columns=len(tiles), label_width_chars=16)


def write_attention_maps(out_dir: Path, stem: str, result, common: dict, first: int = 0) -> None:
    """One labelled panel (image + a heat-map overlay per word) and the raw maps per image; the
    images of `result` are numbered from `first`."""
    from safetensors.torch import save_file

    from diffusion.checkpoint import default_file_modes

    for i, (image, prompt, seed, maps) in enumerate(
        zip(result.images, result.prompts, result.seeds, result.attention_maps), start=first
    ):
        name = f"{stem}-{i:03d}"
        save_png(
            attention_panel(image, maps, f"seed {seed}"),
            out_dir / f"{name}.png",
            {"prompt": prompt, "seed": seed, **common},
        )
        save_file(
            {word: m.contiguous() for word, m in maps.items()},
            str(out_dir / f"{name}.safetensors"),
            metadata={"prompt": prompt, "seed": str(seed)},
        )
        default_file_modes(out_dir / f"{name}.safetensors")

"""The caption curriculum of a shapes run: which captions the small CLIP and the UNet learn from, and when.

A shapes caption may leave an object's colour, shape or position out, at the rates data.omit_colour,
data.omit_shape and data.omit_position (`shapes.Omission` writes such captions). From them the UNet
learns what an object whose colour, shape or place is not named looks like: the prior that a weight
of 0 on a word ("a (red:0) circle") falls back to. Captions that leave words out from the first step
cost composition and binding, so the words come out in stages:

1. The small CLIP learns from whole captions only: every object's colour, shape and position named,
   every object count equally likely (`clip_training_data`). It learns every word that the UNet's
   captions may leave out, and long captions weigh as much as short ones.
2. The UNet's first data.omit_from of the steps read whole captions of its images
   (`whole_captions`): composition and binding first.
3. From there on it reads the same images with the configured captions, which leave words out at
   the configured rates (`LaterCaptions`, from draw `CaptionCurriculum.later_from_draw` on).

With data.omit_from 0, or rates that leave no colour, shape or position out, there is one stage for
the UNet: the configured captions throughout. Leaving size words out (data.omit_size) is not part
of the curriculum: every stage does it. An image folder's captions are its own: no curriculum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from diffusion.config import Config
from diffusion.data.datasets import build_dataset
from diffusion.data.shapes import ShapesDataset


def whole_captions(data_config):
    """`data_config` (the config's `data` section) with every object's colour, shape and position
    named in every caption: what the small CLIP learns from, and the curriculum's first captions."""
    return dataclasses.replace(data_config, omit_colour=0.0, omit_shape=0.0, omit_position=0.0)


def clip_training_data(cfg: Config, images: torch.Tensor, captions: list[str], main: bool):
    """Images and captions for the small CLIP: the training set, except that a shapes set is
    drawn again with every object count equally likely and every object's colour, shape and place
    named. Long captions then weigh as much as short ones in what the CLIP learns, and words the
    UNet's captions may leave out (data.omit_*) are always there to be learnt; a CLIP trained on
    the UNet's own mix encoded long captions and partial ones worse (three objects, colour binding)."""
    if cfg.data.kind != "shapes":
        return images, captions
    full = dataclasses.replace(whole_captions(cfg.data), object_weights=None)
    if full == cfg.data:
        return images, captions
    return build_dataset(full).render_all(progress=main)


class LaterCaptions(NamedTuple):
    """Other captions of the same images, read from draw `first_draw` on (the curriculum's last stage)."""

    captions: list[str]  # N strings
    token_object: torch.Tensor | None  # (N, T) int8 for the grounding loss (None without it)
    first_draw: int


@dataclasses.dataclass(frozen=True)
class CaptionCurriculum:
    """The UNet's stages for one shapes set: `first` is the set its first steps read (whole
    captions while a later stage follows), `later` the configured set read from step `later_from`
    on, which is batch draw `later_from_draw` (one draw per micro-batch); `later` None: one stage.
    The two sets hold the same images; only their captions differ."""

    first: ShapesDataset
    later: ShapesDataset | None = None
    later_from: int = 0
    later_from_draw: int = 0

    def later_captions(self, captions: list[str], token_object: torch.Tensor | None) -> LaterCaptions:
        """The later stage's captions (and grounding targets) of the images, for `InMemoryData`."""
        return LaterCaptions(captions, token_object, self.later_from_draw)


def caption_curriculum(cfg: Config, dataset: ShapesDataset) -> CaptionCurriculum:
    """The stages of `dataset`, the shapes set `cfg.data` describes, for a run of `cfg`."""
    if cfg.data.omit_from <= 0 or not dataset.omission.leaves_words_out():
        return CaptionCurriculum(dataset)
    later_from = math.ceil(cfg.data.omit_from * cfg.train.max_steps)
    first = build_dataset(whole_captions(cfg.data))
    return CaptionCurriculum(first, dataset, later_from, later_from * cfg.train.gradient_accumulation_steps)

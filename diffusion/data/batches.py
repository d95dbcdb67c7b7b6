"""The batches the UNet trains on, and how a run makes them from its data set.

A `Batch` is B training samples on the training device: the images in [-1, 1], the text states
of their captions (the text encoder is frozen, so each caption is encoded once, before training)
with the mask of the tokens cross-attention may read, and for the grounding loss each token's
object and the objects' masks. Both sources below give endless batches with one contract,
`batches(generator, first_draw, batch_size, world, rank)`: draw d is one global batch, of which
each process takes its slice, and a run resumed at draw d makes the same batches as one that
never stopped.

- A shapes set is rendered into memory once (`InMemoryData`): the images as uint8 on the device,
  the text states of each distinct caption, the grounding targets; its captions change at the
  caption curriculum's stages (captions.py).
- An image folder is streamed from disk (`StreamingData`): DataLoader workers decode each
  batch's images (`FolderDraws`), and for grounding their masks, and read its captions' text
  states from an on-disk cache (text_states.py), so memory does not grow with the folder.

`prepare_data` makes either from a config's data set, training or loading the text encoder on
the way (it learns from the same images and captions); `drop_captions` empties some captions of a
batch for classifier-free guidance.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from diffusion.config import Config
from diffusion.data.captions import LaterCaptions, caption_curriculum, clip_training_data
from diffusion.data.image_folder import ImageFolderDataset
from diffusion.data.text_states import EmbeddingCache, EmbeddingStore, cache_folder
from diffusion.model.text_encoder import TextEncoder
from diffusion.training.clip import prepare_text_encoder
from diffusion.training.grounding import caption_targets, grounding_targets


@dataclass
class Batch:
    """One training batch (B images), on the training device."""

    x0: torch.Tensor  # (B, 3, R, R) images in [-1, 1]
    embeddings: torch.Tensor  # (B, T, D) text states of the captions
    key_mask: torch.Tensor  # (B, T) bool: the tokens cross-attention may read
    token_object: torch.Tensor | None = None  # (B, T) long: the object each token names, -1 none (grounding)
    object_masks: torch.Tensor | None = None  # (B, K, R, R) float object masks (grounding)


class InMemoryData:
    """The training set held on the device: images as uint8, the text states of each distinct
    caption once (the encoder is frozen), and for grounding each token's object and the masks.
    With `later`, the draws from later.first_draw on read the same images with later.captions
    (the caption curriculum's last stage, captions.py).

    `batch(index, later)` gathers the samples at `index` (B,) into a `Batch`."""

    def __init__(
        self,
        images: torch.Tensor,
        captions: list[str],
        encoder: TextEncoder,
        device,
        token_object: torch.Tensor | None = None,
        object_masks: torch.Tensor | None = None,
        later: LaterCaptions | None = None,
    ):
        """images: (N, 3, R, R) uint8; captions: N strings; token_object: (N, T) int8 and
        object_masks: (N, K, R, R) bool for the grounding loss (None without it)."""
        self.distinct = sorted(set(captions) | set(later.captions if later else ()))
        row_of = {caption: i for i, caption in enumerate(self.distinct)}
        cache = EmbeddingCache(encoder)
        embeddings, key_mask = cache.get(self.distinct)  # (U, T, D), (U, T)
        empty_embedding, empty_mask = cache.get([""])
        self.caption_rows = torch.tensor([row_of[c] for c in captions])  # (N,)
        self.embeddings, self.key_mask = embeddings.to(device), key_mask.to(device)
        self.empty = empty_embedding.to(device), empty_mask.to(device)  # (1, T, D), (1, T): dropped captions
        self.images = images.to(device)
        self.token_object = None if token_object is None else token_object.to(device)
        self.object_masks = None if object_masks is None else object_masks.to(device)
        self.device = device
        self.later_from = None if later is None else later.first_draw
        if later is not None:
            self.later_rows = torch.tensor([row_of[c] for c in later.captions])  # (N,)
            self.later_token_object = None if later.token_object is None else later.token_object.to(device)

    def __len__(self) -> int:
        return len(self.caption_rows)

    @property
    def distinct_count(self) -> int:
        return len(self.distinct)

    def batches(
        self, generator: torch.Generator, first_draw: int, batch_size: int, world: int, rank: int
    ) -> Iterator[Batch]:
        """Endless batches from draw `first_draw` on: every process draws the same global batch
        of `batch_size` x `world` indices from `generator` (the run's data-order generator,
        restored on resume) and takes slice `rank` of it. The draw's number only says which
        captions it reads."""
        for draw in itertools.count(first_draw):
            index = torch.randint(len(self), (batch_size * world,), generator=generator)
            later = self.later_from is not None and draw >= self.later_from
            yield self.batch(index[rank * batch_size : (rank + 1) * batch_size], later)

    def batch(self, index: torch.Tensor, later: bool = False) -> Batch:
        on_device = index.to(self.device)
        rows = (self.later_rows if later else self.caption_rows)[index].to(self.device)
        token_object = self.later_token_object if later else self.token_object
        return Batch(
            self.images[on_device].float() / 127.5 - 1,
            self.embeddings[rows],
            self.key_mask[rows],
            None if token_object is None else token_object[on_device].long(),
            None if self.object_masks is None else self.object_masks[on_device].float(),
        )


class StreamingData:
    """An image folder read from disk while training: DataLoader workers decode each batch's
    images (`FolderDraws`) and read its captions' text states from the on-disk cache
    (text_states.py). Memory does not grow with the folder beyond its paths and captions.

    `batches(...)` has InMemoryData's contract: endless `Batch`es, this process's slice of each."""

    def __init__(
        self,
        folder: ImageFolderDataset,
        store: EmbeddingStore,
        caption_rows: np.ndarray,
        empty_row: int,
        seed: int,
        workers: int,
        device,
        token_object: torch.Tensor | None = None,
    ):
        """caption_rows: (N,) each image's row in `store`; empty_row: the row of the empty
        caption; seed: train.seed, which with the draw number fixes every batch; workers: the
        DataLoader's processes (0: decode in this one); token_object: (rows of `store`, T) int8,
        the object each token of each stored caption names (`caption_targets`), for the
        grounding loss on the folder's masks (None without it)."""
        self.folder, self.store, self.caption_rows, self.seed, self.workers = folder, store, caption_rows, seed, workers
        self.token_object = token_object
        self.device = torch.device(device)
        self.distinct_count = len(store) - (empty_row not in caption_rows)
        empty_embedding, empty_mask = store.get([empty_row])
        self.empty = empty_embedding.to(self.device), empty_mask.to(self.device)  # (1, T, D), (1, T): dropped captions

    def __len__(self) -> int:
        return len(self.folder)

    def batches(
        self, generator: torch.Generator, first_draw: int, batch_size: int, world: int, rank: int
    ) -> Iterator[Batch]:
        """Endless batches from draw `first_draw` on (`generator` is not needed: each draw is
        seeded by its number, see FolderDraws), prefetched by data.workers processes."""
        draws = FolderDraws(
            self.folder, self.store, self.caption_rows, self.seed, batch_size, world, rank, self.token_object
        )
        # The loader seeds its workers from `generator=`, not from torch's global RNG, which must
        # draw the run's noise exactly as an uninterrupted run would.
        loader = torch.utils.data.DataLoader(
            draws,
            batch_size=None,
            sampler=itertools.count(first_draw),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )
        for images, embeddings, key_mask, *grounding in loader:
            token_object, object_masks = (t.to(self.device) for t in grounding) if grounding else (None, None)
            yield Batch(
                images.to(self.device).float() / 127.5 - 1,
                embeddings.to(self.device),
                key_mask.to(self.device),
                None if token_object is None else token_object.long(),
                None if object_masks is None else object_masks.float(),
            )


class FolderDraws(torch.utils.data.Dataset):
    """Item d is this process's slice of global batch d of an image folder, decoded from disk:
    (images (B, 3, R, R) uint8, embeddings (B, T, D) float32, key mask (B, T) bool), and with
    `token_object` (grounding) also (token_object (B, T) int8, object masks (B, 1, R, R) bool):
    each image's mask is its one object, and an image without a mask grounds no token.

    Draw d is a pure function of (seed, d): its B x world indices (with replacement) come from a
    generator seeded by (seed, d), and each image's random crop and flip from one seeded by
    (seed, d, its place in the global batch). So the batches do not depend on how many workers
    make them or how far they prefetch, and a run resumed at draw d makes the same ones."""

    def __init__(
        self,
        folder: ImageFolderDataset,
        store: EmbeddingStore,
        caption_rows: np.ndarray,
        seed: int,
        batch_size: int,
        world: int,
        rank: int,
        token_object: torch.Tensor | None = None,
    ):
        self.folder, self.store, self.caption_rows, self.seed = folder, store, caption_rows, seed
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.token_object = token_object  # (rows of store, T) int8, or None: no grounding

    def __getitem__(self, draw: int) -> tuple[torch.Tensor, ...]:
        B = self.batch_size
        first = self.rank * B  # this slice's place in the global batch
        drawn = np.random.default_rng([self.seed, draw, 0]).integers(len(self.folder), size=B * self.world)
        index = drawn[first : first + B]  # (B,)

        def rng(place: int) -> np.random.Generator:  # an image's crop and flip; its mask's the same
            return np.random.default_rng([self.seed, draw, 1, first + place])

        images = np.stack([self.folder.image(int(i), rng(place)) for place, i in enumerate(index)])  # (B, R, R, 3)
        rows = self.caption_rows[index]
        embeddings, key_mask = self.store.get(rows)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if self.token_object is None:
            return images, embeddings, key_mask
        R = self.folder.resolution
        masks = [self.folder.mask(int(i), rng(place)) for place, i in enumerate(index)]  # (R, R) bool or None
        token_object = self.token_object[torch.from_numpy(rows)].clone()  # (B, T)
        token_object[[mask is None for mask in masks]] = -1
        object_masks = torch.from_numpy(
            np.stack([np.zeros((R, R), bool) if mask is None else mask for mask in masks])[:, None]
        )  # (B, 1, R, R)
        return images, embeddings, key_mask, token_object, object_masks


def drop_captions(batch: Batch, dropped: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor]) -> Batch:
    """`batch` with the captions where `dropped` (B,) is True replaced by the empty prompt's states
    (classifier-free guidance learns the unconditional model from them) and grounding nothing."""
    empty_embedding, empty_mask = empty
    token_object = batch.token_object
    if token_object is not None:
        token_object = token_object.masked_fill(dropped[:, None], -1)
    return Batch(
        batch.x0,
        torch.where(dropped[:, None, None], empty_embedding, batch.embeddings),
        torch.where(dropped[:, None], empty_mask, batch.key_mask),
        token_object,
        batch.object_masks,
    )


def prepare_data(
    cfg: Config, dataset, output_dir: Path, accelerator: Accelerator
) -> tuple[InMemoryData | StreamingData, TextEncoder]:
    """Render or load the training set, train or load the text encoder, and embed the captions:
    all in memory for a shapes set, on disk for an image folder (`prepare_folder_data`). A shapes
    set's captions follow the caption curriculum (captions.py)."""
    if isinstance(dataset, ImageFolderDataset):
        return prepare_folder_data(cfg, dataset, output_dir, accelerator)
    main = accelerator.is_main_process
    grounded = cfg.train.grounding_weight > 0  # the masks come with the rendered images
    curriculum = caption_curriculum(cfg, dataset)
    if grounded:
        images, captions, object_masks, scenes = curriculum.first.render_with_masks(progress=main)
    else:
        images, captions = curriculum.first.render_all(progress=main)  # (N, 3, R, R) uint8, N strings
        object_masks = None
    later_scenes = curriculum.later.scenes() if curriculum.later is not None else []
    later_captions = [scene.caption for scene in later_scenes]
    # The tokenizer learns the UNet's captions too only when they may hold words the CLIP's full
    # captions never write ("a red shape"); otherwise its vocabulary stays that of the CLIP's captions.
    encoder = prepare_text_encoder(
        cfg,
        output_dir,
        lambda: clip_training_data(cfg, images, captions, main),
        accelerator,
        captions + later_captions if dataset.omission.writes_new_words() else (),
    )
    encoder.to(accelerator.device)

    def offsets(caption: str) -> torch.Tensor:
        return encoder.tokenize(caption)["offsets"]

    token_object = grounding_targets(scenes, offsets) if grounded else None
    later = None
    if curriculum.later is not None:
        later = curriculum.later_captions(
            later_captions, grounding_targets(later_scenes, offsets) if grounded else None
        )
        accelerator.print(
            f"captions may leave words out from step {curriculum.later_from} on (data.omit_from {cfg.data.omit_from:g})"
        )
    return InMemoryData(images, captions, encoder, accelerator.device, token_object, object_masks, later), encoder


def folder_clip_data(cfg: Config, folder: ImageFolderDataset, progress: bool) -> tuple[torch.Tensor, list[str]]:
    """Images and captions for the small CLIP from an image folder, decoded into memory: at most
    text.steps x text.batch_size of them (as many as its training draws), from a larger folder a
    random subset (seeded by text.seed), so that memory does not grow with the folder here either."""
    count = cfg.text.steps * cfg.text.batch_size
    rng = np.random.default_rng(cfg.text.seed)
    indices = np.arange(len(folder)) if len(folder) <= count else np.sort(rng.choice(len(folder), count, replace=False))
    return folder.render(indices, rng, progress)


def prepare_folder_data(
    cfg: Config, folder: ImageFolderDataset, output_dir: Path, accelerator: Accelerator
) -> tuple[StreamingData, TextEncoder]:
    """Train or load the text encoder, and write (or reuse) the on-disk text states of the
    folder's distinct captions; the images stay on disk."""
    main = accelerator.is_main_process
    encoder = prepare_text_encoder(cfg, output_dir, lambda: folder_clip_data(cfg, folder, main), accelerator)
    encoder.to(accelerator.device)
    captions = folder.captions()
    distinct = sorted(set(captions) | {""})  # "": the dropped captions' row
    with accelerator.main_process_first():  # the main process writes the store, the others then read it
        store = EmbeddingStore.open(cache_folder(cfg.data.embedding_cache), encoder, distinct, progress=main)
    accelerator.print(
        f"text embeddings: {len(distinct)} captions, {store.path.stat().st_size / 2**20:.1f} MiB, "
        f"{'written to' if store.built else 'read from'} {store.path}"
    )
    row_of = {caption: row for row, caption in enumerate(distinct)}
    caption_rows = np.array([row_of[caption] for caption in captions], dtype=np.int64)  # (N,)
    # Grounding (on for a folder with masks only where the config sets it: datasets.build_dataset)
    # ties every word of a caption to its image's mask; "" grounds nothing, having no token.
    token_object = caption_targets(distinct, encoder.offsets) if cfg.train.grounding_weight > 0 else None
    return StreamingData(
        folder, store, caption_rows, row_of[""], cfg.train.seed, cfg.data.workers, accelerator.device, token_object
    ), encoder

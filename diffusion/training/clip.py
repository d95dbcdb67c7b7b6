"""The offline default text encoder: a small CLIP trained here, contrastively, on the training
images and captions.

`fit_tokenizer` fits a CLIP-format byte-level BPE vocabulary to the captions; `train_clip` trains
a small CLIPModel (text and vision towers) and saves its text half and the tokenizer in the
transformers format, so `TextEncoder.from_pretrained` loads it exactly like a pretrained CLIP.
`prepare_text_encoder` is a run's text encoder stage: the pretrained CLIP a config names, or the
small one trained once into the run's folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from diffusion import checkpoint as ckpt
from diffusion.errors import UserError
from diffusion.model.text_encoder import BYTE_ALPHABET, TextEncoder, quiet_transformers
from diffusion.precision import autocast

if TYPE_CHECKING:  # for the annotations only: fitting a tokenizer or training a CLIP needs no accelerate
    from accelerate import Accelerator

    from diffusion.config import Config

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# Every byte symbol plain and with the end-of-word suffix, plus the two special tokens: a BPE
# vocabulary cannot be smaller than this without producing unknown tokens.
MIN_VOCAB_SIZE = 2 * len(BYTE_ALPHABET) + 2

TEXT_HEADS = 4
VISION_WIDTH = 128
VISION_LAYERS = 2
PROJECTION_DIM = 128
# The small CLIP's MLP activation: PyTorch's fused GELU, one pass each way. CLIP's own quick_gelu,
# x * sigmoid(1.702 x), runs as three elementwise passes forward and five backward over the CLIP's
# largest activations, which made it a large share of a contrastive step (docs/what-we-tried.md).
ACTIVATION = "gelu"


def fit_tokenizer(captions: list[str], vocab_size: int = 1024, model_max_length: int = 32) -> CLIPTokenizer:
    """Fit a CLIP-format byte-level BPE tokenizer on the training captions.

    captions: the training captions; frequent words become single tokens.
    vocab_size: the largest vocabulary size, special tokens included; at least 514 (the byte
        alphabet twice, plus two special tokens). Merges stop early when no pair of symbols
        occurs twice, so a small caption set gives a smaller vocabulary.
    model_max_length: tokens per prompt, start and end tokens included.

    Returns a `transformers.CLIPTokenizer`; `save_pretrained` writes it in the standard format.
    The vocabulary is laid out like OpenAI CLIP's vocab.json: the 256 byte symbols, the same with
    `</w>`, the learned merges in priority order, then `<|startoftext|>` and `<|endoftext|>`
    (which is also the pad token). Text is lowercased, and any text tokenizes without unknowns.
    """
    if not captions or not all(isinstance(caption, str) for caption in captions):
        raise UserError("fit_tokenizer needs a non-empty list of caption strings; check the dataset captions")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE} (CLIP's byte alphabet)")
    if model_max_length < 3:
        raise UserError(f"max_length {model_max_length} is too small; use at least 3 (start, one word, end)")

    # Learn merges on exactly the text CLIPTokenizer will see: reuse its normalizer (whitespace
    # squashing, lowercasing) and pre-tokenizer (CLIP's word regex, then bytes to symbols).
    clip_pipeline = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(BPE(end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = clip_pipeline.normalizer
    bpe.pre_tokenizer = clip_pipeline.pre_tokenizer
    merge_budget = vocab_size - MIN_VOCAB_SIZE
    trainer = trainers.BpeTrainer(
        # The trainer counts its alphabet into vocab_size; this is enough room for merge_budget merges.
        vocab_size=len(BYTE_ALPHABET) * 2 + merge_budget,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    # A prefix of a BPE merge list is itself a valid merge list, so cutting it keeps the tokenizer consistent.
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]][:merge_budget]

    tokens = BYTE_ALPHABET + [symbol + END_OF_WORD for symbol in BYTE_ALPHABET]
    tokens += [left + right for left, right in merges] + [BOS, EOS]
    # Two merges can spell the same token ("ab"+"c", "a"+"bc"); it needs one id.
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def clip_text_config(tokenizer: CLIPTokenizer, width: int, layers: int, heads: int, **options) -> CLIPTextConfig:
    """A CLIP text tower of `width` (feed-forward 4x unless `intermediate_size` says otherwise),
    `layers` and `heads`, whose vocabulary, positions and special tokens are `tokenizer`'s."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=options.pop("intermediate_size", 4 * width),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )


def train_clip(
    images: torch.Tensor,
    captions: list[str],
    tokenizer: CLIPTokenizer,
    config,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    mixed_precision: str = "no",
) -> CLIPModel:
    """Train a small CLIP contrastively on images and captions; save its text half for the UNet.

    images: uint8 images, (N, 3, H, W) with H == W.
    captions: N captions, one per image.
    tokenizer: the tokenizer from `fit_tokenizer`; its `model_max_length` sets the text length.
    config: any object with `width` (text hidden size), `layers` (text layers), `steps`,
        `batch_size`, `lr` (peak AdamW learning rate) and `seed`.
    out_dir: folder to write `tokenizer/` and `text_encoder/` into.
    device: where to train.
    progress: show a tqdm bar with the loss.
    mixed_precision: autocast of the towers' forward passes, as resolved by
        `precision.resolve_mixed_precision` ("no", "bf16", "fp16"); the loss, the logits and the
        weights stay float32.

    Writes `out_dir/text_encoder` (a `CLIPTextModel`, safetensors) and `out_dir/tokenizer`, which
    `TextEncoder.from_pretrained(out_dir)` loads. Returns the trained `CLIPModel` (both towers,
    eval mode, on `device`), e.g. to check retrieval.
    """
    patch = _check_clip_settings(images, captions, config)
    model = _new_clip(tokenizer, config, images.shape[-1], patch, device)
    generator = torch.Generator().manual_seed(config.seed)
    text = _CaptionTokens(captions, tokenizer, device)
    images = images.to(device)
    optimizer, schedule = _optimizer_and_schedule(model, config)

    batch_size = min(config.batch_size, len(captions))
    model.train()
    bar = tqdm(range(config.steps), desc="clip", disable=not progress)
    for _ in bar:
        picks = torch.randint(len(captions), (batch_size,), generator=generator)  # (B,)
        pixels = images[picks.to(device)].float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        loss = _contrastive_loss(model, text, picks, pixels, torch.device(device), mixed_precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    model.eval()
    out_dir = Path(out_dir)
    with quiet_transformers():
        model.text_model.save_pretrained(out_dir / "text_encoder")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return model


def _check_clip_settings(images, captions, config) -> int:
    """Raise UserError unless the images, captions and `config` make a CLIP; returns the side of
    the vision tower's patches."""
    _check_training_data(images, captions)
    if config.width % TEXT_HEADS:
        raise UserError(f"clip width {config.width} must be a multiple of {TEXT_HEADS} (attention heads)")
    if config.steps < 1 or config.batch_size < 2:
        raise UserError(f"clip needs steps >= 1 and batch_size >= 2, got {config.steps} and {config.batch_size}")
    size = images.shape[-1]
    patch = 8 if size >= 64 else 4
    if size % patch:
        raise UserError(f"clip images of {size} px do not split into {patch}-px patches; use a multiple of {patch}")
    return patch


def _new_clip(tokenizer: CLIPTokenizer, config, size: int, patch: int, device) -> CLIPModel:
    """A freshly initialised small CLIP for `tokenizer`'s vocabulary and images of `size` px, on
    `device`, seeded by config.seed."""
    text_config = clip_text_config(tokenizer, config.width, config.layers, TEXT_HEADS, hidden_act=ACTIVATION)
    vision_config = CLIPVisionConfig(
        image_size=size,
        patch_size=patch,
        hidden_size=VISION_WIDTH,
        intermediate_size=4 * VISION_WIDTH,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        hidden_act=ACTIVATION,
    )
    clip_config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=PROJECTION_DIM
    )
    # Seed the initialisation without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return CLIPModel(clip_config).to(device)


class _CaptionTokens:
    """The training captions, each distinct one tokenized once: a batch refers to them by row.

    caption_rows (N,): each caption's row; ids, mask (U_all, T): the rows' token ids and
    attention mask, padded on the right; lengths (U_all,): their lengths in tokens."""

    def __init__(self, captions: list[str], tokenizer: CLIPTokenizer, device):
        max_length = tokenizer.model_max_length
        distinct = list(dict.fromkeys(captions))
        row_of = {caption: row for row, caption in enumerate(distinct)}
        self.caption_rows = torch.tensor([row_of[caption] for caption in captions])  # (N,)
        too_long = sum(len(ids) > max_length for ids in tokenizer(distinct, verbose=False)["input_ids"])
        if too_long:
            warnings.warn(
                f"{too_long} of {len(distinct)} distinct captions are longer than {max_length} tokens "
                f"and are truncated; raise max_length to keep them whole"
            )
        tokens = tokenizer(
            distinct,
            padding="max_length",
            padding_side="right",  # trimming a batch to its longest caption cuts from the right
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.ids = tokens["input_ids"].to(device)  # (U_all, T)
        self.mask = tokens["attention_mask"].to(device)  # (U_all, T)
        self.lengths = self.mask.sum(1)  # (U_all,)


def _optimizer_and_schedule(model: CLIPModel, config):
    """AdamW (weight decay on the matrices only) and its schedule: linear warm-up over a tenth of
    the steps (at most 100), then cosine decay to 0."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, norms, logit scale
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )
    warmup = max(1, min(100, config.steps // 10))

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _contrastive_loss(
    model: CLIPModel,
    text: _CaptionTokens,
    picks: torch.Tensor,
    pixels: torch.Tensor,
    device: torch.device,
    mixed_precision: str,
) -> torch.Tensor:
    """The symmetric contrastive loss of the images `pixels` (B, 3, H, W) and their captions,
    `picks` (B,) the captions' indices."""
    # Procedural captions repeat a lot within a batch, and an image must not be pushed away
    # from a caption identical to its own. So the text side is de-duplicated: each image is
    # classified among the batch's U distinct captions (no false negatives), and each caption
    # must pick out all of its images (a soft target spread evenly over them).
    rows, caption_of_image = torch.unique(text.caption_rows[picks], return_inverse=True)  # (U,), (B,)
    rows, caption_of_image = rows.to(device), caption_of_image.to(device)
    length = int(text.lengths[rows].max())  # causal attention: trimming trailing padding changes nothing
    with autocast(device, mixed_precision):
        text_out = model.text_model(input_ids=text.ids[rows, :length], attention_mask=text.mask[rows, :length])
        vision = model.vision_model(pixel_values=pixels)
    text_embeds = F.normalize(model.text_projection(text_out.pooler_output.float()), dim=-1)  # (U, P)
    image_embeds = F.normalize(model.visual_projection(vision.pooler_output.float()), dim=-1)  # (B, P)
    # CLIP caps the temperature at 100 so the logits cannot blow up.
    logits = model.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # (B, U)
    image_loss = F.cross_entropy(logits, caption_of_image)
    images_of_caption = F.one_hot(caption_of_image, len(rows)).T.float()  # (U, B)
    text_loss = F.cross_entropy(logits.T, images_of_caption / images_of_caption.sum(1, keepdim=True))
    return (image_loss + text_loss) / 2


def _check_training_data(images, captions):
    """Raise UserError unless `images` is uint8 (N, 3, S, S) and `captions` holds N strings."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError("clip training images must be a uint8 tensor (N, 3, H, W); check the dataset loader")
    n, channels, height, width = images.shape
    if channels != 3 or height != width:
        raise UserError(f"clip training images must be square RGB, got shape {tuple(images.shape)}; resize the dataset")
    if len(captions) != n or not all(isinstance(caption, str) for caption in captions):
        raise UserError(f"clip training needs one caption string per image, got {len(captions)} for {n} images")


def prepare_text_encoder(
    cfg: Config, output_dir: Path, clip_data, accelerator: Accelerator, captions: list[str] = ()
) -> TextEncoder:
    """Load the pretrained CLIP named by text.pretrained, or train the small one on
    `clip_data()` (images, captions), once: a finished `output_dir/clip` is reused on resume.
    captions: the UNet's captions, which the small CLIP's tokenizer covers too."""
    options = {
        "hidden_layer": cfg.text.hidden_layer,
        "mask_eos": cfg.text.mask_eos,
        "concat_token_embeddings": cfg.text.concat_token_embeddings,
    }
    if cfg.text.pretrained:
        try:
            return TextEncoder.from_pretrained(cfg.text.pretrained, max_length=None, **options)
        except UserError as error:
            if Path(cfg.text.pretrained).expanduser().is_dir():
                raise
            # offline, a hub id cannot load: say that training needs none
            raise UserError(
                f"{error}; or train without it: text.pretrained=null trains the small CLIP on the "
                "training captions, offline"
            ) from None
    clip_dir = output_dir / "clip"
    if accelerator.is_main_process and not (clip_dir / "text_encoder").is_dir():
        start = time.time()
        images, clip_captions = clip_data()
        tokenizer = fit_tokenizer(
            clip_captions + list(captions) + cfg.train.validation_prompts, cfg.text.vocab_size, cfg.text.max_length
        )
        temporary = output_dir / ".clip.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        with ckpt.writing(temporary, f"the text encoder '{clip_dir}'"):
            train_clip(
                images,
                clip_captions,
                tokenizer,
                cfg.text,
                temporary,
                device=accelerator.device,
                # float32: a CLIP trained in bf16 cost the UNet composition (docs/what-we-tried.md)
                mixed_precision="no",
            )
            ckpt.default_file_modes(temporary)
            os.replace(temporary, clip_dir)
        accelerator.print(f"text encoder: trained a small CLIP in {time.time() - start:.0f} s -> {clip_dir}")
    accelerator.wait_for_everyone()
    return TextEncoder.from_pretrained(str(clip_dir), max_length=cfg.text.max_length, **options)

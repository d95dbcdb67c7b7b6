"""Configuration: typed dataclasses with defaults, YAML files merged over them, dotted overrides.

A config file only needs the keys it changes. Every key is checked: an unknown key or a value of
the wrong type is a `UserError` naming the key and, for a typo, the closest valid key. The
resolved config is written beside every checkpoint and export, so a model folder alone is enough
to sample from it.

    cfg = load_config("configs/shapes.yaml", ["train.max_steps=3000", "model.channels=[32,64,128]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffusion.errors import UserError


@dataclass
class ModelConfig:
    """The UNet (model/unet.py, or model/unet2d.py with kind unet2d)."""

    kind: str = "unet"  # unet (model/unet.py) or unet2d (diffusers' UNet2DConditionModel: no position embedding)
    channels: list[int] = field(  # width of each level; level i works at data.resolution / 2**i (multiples of 8)
        default_factory=lambda: [32, 64, 128]
    )
    blocks_per_level: int = 1  # ResNet (+ transformer) blocks per level on the way down (1-3)
    attention_resolutions: list[int] = field(  # sides (px) of the levels with self- and cross-attention
        default_factory=lambda: [16, 8]
    )
    attention_heads: int = 4  # heads per attention layer; head width = channels / heads
    dropout: float = 0.0  # dropout in the ResNet blocks (0-0.2; the shapes data is plentiful)
    position_embedding: bool = True  # fixed 2D sine-cosine embeddings in transformer blocks tell queries where they are
    values_from_token_embeddings: bool = False  # values read each word's own token embedding; keys read its context too
    token_value_resolutions: list[int] | None = None  # values_from_token_embeddings at these sides only (null: all)
    self_conditioning: bool = False  # the UNet also reads its previous estimate of the clean image (Chen et al. 2022)
    pooled_text: bool = False  # the text states' mean also joins the timestep embedding (a path attention weights miss)


@dataclass
class TextConfig:
    """The frozen CLIP text encoder (model/text_encoder.py) and, without `pretrained`, the small CLIP
    trained here first (training/clip.py)."""

    pretrained: str | None = None  # CLIP hub id or folder, e.g. openai/clip-vit-base-patch32 (null: train a small CLIP)
    hidden_layer: int = -1  # encoder layer giving the keys and values: -1 the last, -2 the penultimate ("clip skip")
    concat_token_embeddings: bool = True  # append each token's embedding to its state (small CLIPs blur left and right)
    mask_eos: bool = True  # the UNet may not attend to the end-of-text token (padding is always masked)
    max_length: int = 40  # tokens per prompt, start and end included (four-object captions need up to 33)
    vocab_size: int = 1024  # small CLIP: BPE vocabulary fitted to the captions (>= 514: 256 bytes twice, 2 specials)
    width: int = 128  # small CLIP: transformer width
    layers: int = 4  # small CLIP: text transformer layers
    steps: int = 150  # small CLIP: contrastive training steps
    batch_size: int = 256  # small CLIP: image-caption pairs per step
    lr: float = 1e-3  # small CLIP: peak AdamW learning rate
    seed: int = 0  # small CLIP: initialisation and batch order


@dataclass
class DataConfig:
    """The training set: the procedural shapes (data/shapes.py) or a folder of captioned images
    (data/image_folder.py)."""

    kind: str = "shapes"  # shapes (the built-in procedural set) or imagefolder
    path: str | None = None  # imagefolder: a folder with images and metadata.jsonl or a .txt caption beside each
    resolution: int = 32  # image side in pixels
    num_samples: int = 20000  # shapes: images in the training set (rendered once, kept in memory)
    min_objects: int = 1  # shapes: fewest objects per image (1-4)
    max_objects: int = 4  # shapes: most objects per image (1-4)
    object_weights: list[float] | None = field(  # shapes: relative frequency of 1-4 objects, UNet only (null: uniform)
        default_factory=lambda: [2.0, 5.0, 2.0, 1.0]
    )
    omit_colour: float = 0.35  # shapes: chance a caption omits an object's colour ("a circle"): unnamed colours
    omit_shape: float = 0.0  # shapes: the same for its shape ("a red shape")
    omit_position: float = 0.0  # shapes: the same for its position phrase (relations between two objects are kept)
    omit_size: float = 0.5  # shapes: the same for its size word ("small", "large")
    omit_max_objects: int = 4  # shapes: leave colour, shape, position out only in captions of at most this many objects
    omit_from: float = 0.7  # shapes: captions leave colour, shape, position out only after this fraction of the steps
    seed: int = 0  # shapes: the dataset is a pure function of this seed
    holdout: list[str] = field(  # shapes: colour-shape pairs never shown in training
        default_factory=lambda: ["red square", "green triangle", "blue cross", "yellow circle"]
    )
    center_crop: bool = True  # imagefolder: crop the centre after resizing (false: a random crop, drawn anew each time)
    random_flip: bool = False  # imagefolder: horizontal flips, drawn anew each time (wrong for left/right captions)
    skip_bad: bool = False  # imagefolder: skip unreadable or uncaptioned files (counted in the log) instead of failing
    workers: int = 2  # imagefolder: processes decoding images while training (0: in the training process)
    embedding_cache: str | None = None  # imagefolder: folder caching caption text states across runs (null: user cache)


@dataclass
class TrainConfig:
    """The UNet's training (training/loop.py)."""

    seed: int = 0  # noise, timesteps and data order
    max_steps: int = 2400  # optimizer steps (76,800 images: the fewest that held the faithfulness targets at 4 seeds)
    batch_size: int = 32  # images per step and process
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay to 0 after the warm-up)
    warmup_steps: int = 400  # linear learning-rate warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "auto"  # auto (bf16 autocast where the device has native bf16, else float32), no, fp16, bf16
    prediction_type: str = "v_prediction"  # epsilon or v_prediction (v weighs the noisiest steps, which set the layout)
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting, e.g. 5 (null: plain MSE)
    num_train_timesteps: int = 1000  # DDPM noise levels
    beta_schedule: str = "squaredcos_cap_v2"  # linear, scaled_linear, squaredcos_cap_v2 (cosine, best for small images)
    cond_dropout: float = 0.1  # probability that a caption is replaced by "" (for classifier-free guidance)
    timestep_bias_multiplier: float = 3.0  # draw the noisiest timesteps this many times as often as others (1: uniform)
    timestep_bias_portion: float = 0.5  # the share of the timesteps, the noisiest, that the multiplier applies to
    grounding_weight: float = 0.05  # token grounding loss on attention maps (0: off; needs masks; folders: only if set)
    grounding_pixel_weight: float = 0.05  # TokenCompose's pixel loss: a word's map should cover its object too (0: off)
    grounding_resolutions: list[int] | None = None  # sides the grounding losses act on (null: every attention level)
    ema_decay: float = 0.999  # EMA decay ceiling (it warms up with the step count)
    checkpoint_every: int = 800  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    validate_every: int = 800  # steps between validation grids (samples/step-XXXXXX.png)
    log_every: int = 50  # steps between loss and speed updates of the progress bar and TensorBoard
    validation_prompts: list[str] = field(  # the validation grid's prompts, the same noise each time
        default_factory=lambda: [
            "a red circle on the left",
            "a blue square on the right",
            "a green cross at the top",
            "a yellow triangle at the bottom",
            "a purple circle in the centre",
            "a red square to the left of a blue circle",
            "an orange triangle above a green square",
            "a small yellow cross on the right",
        ]
    )
    validation_seed: int = 0  # the validation grid's noise seed
    validation_steps: int = 20  # sampler steps of the validation grid (the default sampler)
    validation_guidance: float = 3.0  # guidance scale of the validation grid


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # also sample.py's and evaluate.py's --mixed-precision
# The samplers of diffusion.sampling.samplers.SAMPLERS by name, here so the command lines need not import torch.
SAMPLER_NAMES = ("dpm++", "ddim", "ddpm", "euler")
# The default sampler: at 20 steps Euler was more faithful than DPM-Solver++ 2M on the default
# config at every training seed tried (docs/what-we-tried.md).
DEFAULT_SAMPLER = "euler"
# Classifier-free guidance acts in the first this fraction of the sampling steps only; the rest
# denoise the conditional rows alone (diffusers' SDCFGCutoffCallback, cutoff_step_ratio). The
# layout and the attributes are set in the noisy early steps, so later guidance buys nothing here
# and costs a second UNet row per image; 0.7 held every measured target (docs/what-we-tried.md).
DEFAULT_GUIDANCE_CUTOFF = 0.7
# A word swap (Prompt-to-Prompt) gives the edit the source's attention maps for this fraction of
# the steps: enough to keep the layout, late enough for the swapped word to change its thing
# (evaluate.py --parts swap --swap-sweep measures 0-1).
DEFAULT_EDIT_STEPS = 0.6
# Whether the words a swap keeps hold the source's maps at every step (sample.py's and
# evaluate.py's --keep-layout, Pipeline.swap's keep_layout). auto keeps them for recolourings,
# where the user means the same outlines; for resizings it keeps the other objects' words and
# draws the resized object anew (its old maps hold its old outline); other swaps, whose new shape
# needs its outline free, keep them for --edit-steps only. The first is the default.
KEEP_LAYOUT = {"auto": None, "on": True, "off": False}
# How (word:w) weights act (diffusion/sampling/pipeline.py's Weighting; sample.py's --weight-mode and
# --weight-context): the first of each is the default.
WEIGHT_MODES = ("attention", "embedding")
WEIGHT_CONTEXTS = ("fade", "keep")
# The window of sampling steps (fractions start, end) in which weights act, per mode, unless
# --weight-steps sets one. Embedding-mode states beyond weight 1 (or between 0 and 1) are states
# the model never read in training: acting early they set the object's colour and shape, and the
# plain states after them let it draw cleanly, without the grain they leave when they act at every
# step (the windows measured: docs/what-we-tried.md).
DEFAULT_WEIGHT_STEPS = {"attention": (0.0, 1.0), "embedding": (0.0, 0.3)}
# evaluate.py's parts (evaluation/report.py), here so the command line need not import torch. The sampler
# sweep (each sampler at 5-50 steps against DPM++ at 250) checks the samplers rather than the
# model and costs as much as the rest, so the default run leaves it out.
EVALUATION_PARTS = ("faithfulness", "localisation", "edit", "prior", "swap", "samplers")
DEFAULT_PARTS = ("faithfulness", "localisation", "edit", "prior", "swap")
CHOICES = {
    "model.kind": ("unet", "unet2d"),
    "data.kind": ("shapes", "imagefolder"),
    "train.mixed_precision": MIXED_PRECISION,
    "train.prediction_type": ("epsilon", "v_prediction"),
    "train.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}
POSITIVE = {
    "data.omit_max_objects",
    "model.blocks_per_level",
    "model.attention_heads",
    "text.max_length",
    "text.vocab_size",
    "text.width",
    "text.layers",
    "text.steps",
    "text.batch_size",
    "text.lr",
    "data.resolution",
    "data.num_samples",
    "train.max_steps",
    "train.batch_size",
    "train.lr",
    "train.gradient_accumulation_steps",
    "train.num_train_timesteps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.validate_every",
    "train.log_every",
    "train.validation_steps",
}
NON_NEGATIVE = {
    "train.timestep_bias_multiplier",
    "train.grounding_weight",
    "train.grounding_pixel_weight",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "train.snr_gamma",
    "model.dropout",
    "train.validation_guidance",
    # seeds: numpy's generators (the folder's batches, the CLIP's caption subset) take none below 0
    "text.seed",
    "data.seed",
    "train.seed",
    "train.validation_seed",
}
# The grounding loss's weights: off by themselves for an image folder unless set (_data_defaults).
GROUNDING_KEYS = ("train.grounding_weight", "train.grounding_pixel_weight")
PROBABILITIES = {"data.omit_colour", "data.omit_shape", "data.omit_position", "data.omit_size"}
FRACTIONS = {"data.omit_from", "train.timestep_bias_portion", "train.cond_dropout", "train.ema_decay", "model.dropout"}


# Integers in a config must fit in 64 bits: torch's generators, tensors and counters hold nothing
# larger (train.seed=10**30 would fail deep in training, not here).
INT_RANGE = (-(2**63), 2**63 - 1)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 8, 8, 80, 80


def shown(value) -> str:
    """A value as an error message quotes it: its repr, on one line, cut short (a YAML alias can
    make a list of millions of items). Keys and paths are quoted whole, with repr()."""
    if isinstance(value, int) and value.bit_length() > 64:  # repr() refuses ints of over 4300 digits
        return f"an integer of {value.bit_length()} bits"
    text = _SHORT.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _coerce(key: str, value, annotation):
    """Check `value` against the field's type annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except UserError:
                pass
        raise UserError(f"{key} must be {' or '.join(_type_name(o) for o in options)}, got {shown(value)}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list of {item_type.__name__}, got {shown(value)}")
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond the largest float, e.g. 10**400
            raise UserError(f"{key} must be a finite number, got {shown(value)}") from None
    if annotation is str and isinstance(value, str):
        return value
    if annotation is str and value is False and "no" in CHOICES.get(key, ()):
        return "no"  # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        if not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise UserError(f"{key} must be an integer that fits in 64 bits, got {shown(value)}")
        return value
    if isinstance(value, annotation) and annotation is not int:
        return value
    raise UserError(f"{key} must be {annotation.__name__}, got {shown(value)}")


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=1)
    if close:
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return UserError(f"unknown config key {key!r}; did you mean {prefix + close[0]!r}?")
    return UserError(f"unknown config key {key!r} (valid: {', '.join(valid)})")


def _merge(section, values: dict, prefix: str) -> None:
    """Set the fields of dataclass instance `section` from a (possibly nested) dict."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, [f"{prefix}{f}" for f in fields])
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{key} must be a mapping of keys, got {shown(value)}")
            _merge(current, value, f"{key}.")
        else:
            setattr(section, name, _coerce(key, value, hints[name]))


def _validate(cfg: Config) -> None:
    """Raise UserError for the first setting, or combination of settings, that cannot run: each
    value on its own first, then the UNet's shape, then the options that need one another."""
    _check_values(cfg)
    levels = _check_levels(cfg)
    _check_combinations(cfg)
    _check_resolutions(cfg, levels)


def _check_values(cfg: Config) -> None:
    """Each value on its own: finite, one of its choices, within its range."""
    flat = {}
    for section in dataclasses.fields(cfg):
        for name, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            flat[f"{section.name}.{name}"] = value
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise UserError(f"{key} must hold finite numbers, got {shown(value)}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key in POSITIVE and value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
        if key in NON_NEGATIVE and value is not None and value < 0:
            raise UserError(f"{key} must not be negative, got {value}")
        if key in FRACTIONS and not 0 <= value < 1:
            raise UserError(f"{key} must be in [0, 1), got {value}")
        if key in PROBABILITIES and not 0 <= value <= 1:
            raise UserError(f"{key} must be a probability in [0, 1], got {value}")
    if cfg.data.workers < 0:
        raise UserError(
            f"data.workers must be 0 (decode images in the training process) or a number of worker "
            f"processes such as 2, got {cfg.data.workers}"
        )


def _check_levels(cfg: Config) -> list[int]:
    """The UNet's widths and the image side they halve; returns each level's side in pixels."""
    if not cfg.model.channels or any(c <= 0 for c in cfg.model.channels):
        raise UserError(f"model.channels must be a non-empty list of positive widths, got {cfg.model.channels}")
    for c in cfg.model.channels:
        if c % cfg.model.attention_heads or c % 8:
            raise UserError(
                f"model.channels entries must be multiples of 8 and of model.attention_heads "
                f"({cfg.model.attention_heads}), got {c}"
            )
    if cfg.data.resolution % 2 ** (len(cfg.model.channels) - 1):
        raise UserError(
            f"data.resolution ({cfg.data.resolution}) must be divisible by "
            f"2^(levels-1) = {2 ** (len(cfg.model.channels) - 1)} for model.channels"
        )
    return [cfg.data.resolution // 2**i for i in range(len(cfg.model.channels))]


def _check_combinations(cfg: Config) -> None:
    """Options that need another option, or another kind of data."""
    if cfg.train.grounding_pixel_weight > 0 and cfg.train.grounding_weight == 0:
        raise UserError(
            "train.grounding_pixel_weight is part of the grounding loss, which is off; "
            "set train.grounding_pixel_weight=0 too, or train.grounding_weight > 0 (e.g. 0.05)"
        )
    for option in ("values_from_token_embeddings", "pooled_text"):
        if cfg.model.kind == "unet2d" and getattr(cfg.model, option):
            raise UserError(
                f"model.{option} is an option of this project's UNet, which model.kind unet2d "
                "(a diffusers UNet2DConditionModel) does not have: remove it, or set model.kind=unet"
            )
    if cfg.model.values_from_token_embeddings and not cfg.text.concat_token_embeddings:
        raise UserError(
            "model.values_from_token_embeddings reads the token embeddings that "
            "text.concat_token_embeddings appends; set text.concat_token_embeddings=true too"
        )
    train = cfg.train
    if (
        train.timestep_bias_multiplier == 0
        and train.timestep_bias_portion > 0
        and biased_timestep_count(train) == train.num_train_timesteps
    ):
        raise UserError(
            f"train.timestep_bias_multiplier=0 with train.timestep_bias_portion={train.timestep_bias_portion} "
            "leaves no timestep to train on; lower the portion (e.g. 0.5) or raise the multiplier"
        )


def _check_resolutions(cfg: Config, levels: list[int]) -> None:
    """The lists of sides (px) that pick UNet levels: each must name a level that has what it asks for."""
    for r in cfg.train.grounding_resolutions or []:
        if r not in cfg.model.attention_resolutions:
            raise UserError(
                f"train.grounding_resolutions has {r}, which is not in model.attention_resolutions "
                f"{cfg.model.attention_resolutions}"
            )
    for r in cfg.model.attention_resolutions:
        if r not in levels:
            raise UserError(
                f"model.attention_resolutions has {r}, but the UNet's levels are at "
                f"{levels} px for data.resolution {cfg.data.resolution}"
            )
    if cfg.model.token_value_resolutions is None:
        return
    if not cfg.model.values_from_token_embeddings:
        raise UserError(
            "model.token_value_resolutions picks the levels of model.values_from_token_embeddings, "
            "which is off; set model.values_from_token_embeddings=true or remove it"
        )
    if not cfg.model.token_value_resolutions:
        raise UserError(
            "model.token_value_resolutions is empty, which would apply the option nowhere; "
            "list sides such as [16], or set it to null for every cross-attention"
        )
    attended = set(cfg.model.attention_resolutions) | {levels[-1]}  # the middle block always attends
    for r in cfg.model.token_value_resolutions:
        if r not in attended:
            raise UserError(
                f"model.token_value_resolutions has {r}, but cross-attention runs at "
                f"{sorted(attended, reverse=True)} px"
            )


def field_comments(section) -> dict[str, str]:
    """The comment written after each field of a config dataclass in this file: name -> comment."""
    comments = {}
    for line in inspect.getsource(section).splitlines():
        match = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


DEFAULTS_HEADER = """The default: procedural coloured shapes at 32 px, sized for a laptop CPU.
Written from diffusion/config.py, the one source of the defaults and their comments, by
    python tools/write_default_config.py
Every key is optional in a config file; keys left out take these defaults. Override any key on
the command line: python train.py train.max_steps=3000"""


def commented_defaults() -> str:
    """The defaults as a YAML config file, each key with its comment from this file: what
    configs/shapes.yaml holds (tools/write_default_config.py writes it; a test compares)."""
    lines = [f"# {line}".rstrip() for line in DEFAULTS_HEADER.splitlines()]
    for section in dataclasses.fields(Config):
        values = dataclasses.asdict(getattr(Config(), section.name))
        comments = field_comments(section.type if isinstance(section.type, type) else globals()[section.type])
        lines += ["", f"{section.name}:"]
        for name, value in values.items():
            if isinstance(value, list) and value and all(isinstance(v, str) and " " in v for v in value):
                lines.append(f"  {name}:".ljust(36) + f"# {comments[name]}")
                lines += [f"    - {item}" for item in value]
            else:
                lines.append(f"  {name}: {_yaml_value(value)}".ljust(35) + f" # {comments[name]}")
    return "\n".join(lines) + "\n"


def biased_timestep_count(train) -> int:
    """How many of the noisiest training timesteps `train.timestep_bias_multiplier` applies to."""
    return max(1, round(train.num_train_timesteps * train.timestep_bias_portion))


def parse_override(text: str) -> tuple[str, object]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value, for example train.max_steps=3000")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except YAML_ERRORS:
        raise UserError(f"override {shown(text)}: cannot parse the value {shown(raw)}") from None
    # YAML reads "1e-4" as a string; accept it as the number people mean.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


# What yaml.safe_load raises for a malformed document: YAMLError, and for some explicit tags plain
# Python errors from its constructors ('!!int x', '!!bool x', '!!timestamp x', a 13th month in
# 2001-13-01, '!!float ""'); RecursionError for brackets nested thousands deep.
YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, LookupError, AttributeError, RecursionError)


def _nest(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _dotted_keys(values: dict, prefix: str = "") -> set[str]:
    """The dotted keys a nested dict sets: {"train": {"lr": 1}} -> {"train", "train.lr"}."""
    keys = set()
    for name, value in values.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{name}.")
    return keys


def _data_defaults(cfg: Config, given: set[str]) -> None:
    """Defaults that depend on the data. The grounding loss needs object masks: the shapes draw
    them, a folder has them only if its metadata names them, which a config cannot see. So for a
    folder the grounding weights left unset are 0 (grounding off) and any folder trains with no
    hand edits; a weight set explicitly turns grounding on, and datasets.build_dataset refuses it
    in one line for a folder without masks."""
    if cfg.data.kind != "shapes":
        for key in GROUNDING_KEYS:
            if key not in given:
                setattr(cfg.train, key.split(".")[1], 0.0)


def config_from_dict(values: dict, overrides: list[str] = ()) -> Config:
    """Defaults, then `values` (a nested dict), then dotted `overrides`; the defaults that depend
    on the data for keys neither set; validated."""
    cfg = Config()
    values = values or {}
    _merge(cfg, values, "")
    given = _dotted_keys(values)
    for override in overrides:
        key, value = parse_override(override)
        _merge(cfg, _nest(key, value), "")
        given |= _dotted_keys(_nest(key, value))
    _data_defaults(cfg, given)
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config file (None: the built-in defaults) and apply dotted overrides."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"config file {str(path)!r} not found; pass an existing YAML file to --config (see configs/)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise UserError(f"config file {str(path)!r} cannot be read ({reason})") from None
        try:
            values = yaml.safe_load(text)
        except YAML_ERRORS as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {str(path)!r} is not valid YAML{where}") from None
        if values is not None and not isinstance(values, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of sections (model, text, data, train)")
    return config_from_dict(values, overrides)

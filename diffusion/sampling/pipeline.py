"""The text-to-image pipeline: load an exported model folder, sample images from prompts.

    from diffusion import Pipeline
    pipe = Pipeline.from_pretrained("runs/shapes/model").to("cpu")
    out = pipe(["a red circle on the left"], num_images_per_prompt=4, seed=0)
    out.images[0].save("circle.png")

`Pipeline` is a diffusers `DiffusionPipeline`: its components are `unet`, `text_encoder` (a
CLIPTextModel), `tokenizer` and `scheduler` (the training noise schedule), saved in diffusers'
folder layout beside `model_index.json` and a `pipeline.py` that names this class, so
`diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it too.
`encoder` wraps the text encoder and tokenizer with this model's text options (`TextEncoder`).
Samplers are diffusers schedulers sharing one contract (`set_timesteps`, `scale_model_input`,
`step`); classifier-free guidance runs the unconditional and conditional halves in one batch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion.checkpoint import default_file_modes, replace_folder, writing
from diffusion.config import DEFAULT_GUIDANCE_CUTOFF, DEFAULT_SAMPLER
from diffusion.control.controllers import (
    AttentionInjector,
    AttentionRecorder,
    AttentionReweighter,
    ControllerChain,
    LocalBlend,
    step_in_window,
)
from diffusion.control.prompts import (
    WeightedPrompt,
    parse_prompt,
    split_words,
    token_word_index,
)
from diffusion.control.swaps import SwapPlan, plan_swaps
from diffusion.control.weighting import Weighting, condition, token_weights
from diffusion.errors import UserError
from diffusion.images import to_pil
from diffusion.model.attention import AttentionController
from diffusion.model.text_encoder import TextEncoder
from diffusion.model.unet import UNet, estimate_clean
from diffusion.model.unet2d import DiffusersUNet
from diffusion.precision import autocast, resolve_mixed_precision
from diffusion.sampling.model_folder import FORMAT_VERSION, PIPELINE_FILE, check_index
from diffusion.sampling.samplers import make_sampler, sampler_timesteps, set_sampler_timesteps
from diffusion.sampling.settings import SamplingSettings

# The denoisers an exported folder's unet/ may hold, by the class name in its config.json
# (model.kind unet and unet2d); folders exported before unet2d hold a UNet.
UNET_CLASSES = {"UNet": UNet, "DiffusersUNet": DiffusersUNet}


def unet_class(folder: Path) -> type[UNet] | type[DiffusersUNet]:
    """The class of the UNet saved in `folder` (an exported model's unet/), from its config.json."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "UNet")
    except (OSError, ValueError):
        return UNet  # no readable config: UNet.from_pretrained says what is wrong in its one line
    if name not in UNET_CLASSES:
        raise UserError(f"cannot load '{folder}': its UNet class {name!r} is none of {', '.join(UNET_CLASSES)}")
    return UNET_CLASSES[name]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_counts(num_images_per_prompt: int, batch_size: int) -> None:
    """UserError unless both are at least 1 (sample.py checks them before loading the model)."""
    if num_images_per_prompt < 1:
        raise UserError(f"the number of images per prompt must be at least 1, got {num_images_per_prompt}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")


def as_generators(generators) -> list[torch.Generator] | torch.Generator:
    """One generator for all, or one per image (seeds become generators)."""
    if isinstance(generators, torch.Generator):
        return generators
    return [g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(int(g)) for g in generators]


def initial_noise(generators: list[torch.Generator] | torch.Generator, count: int, size: int) -> torch.Tensor:
    """(count, 3, size, size) standard normal noise: from one generator in turn, or image k's from
    generators[k], so an image's noise does not depend on the batch it is in."""
    if isinstance(generators, torch.Generator):
        return torch.randn(count, 3, size, size, generator=generators, device=generators.device)
    return torch.stack([torch.randn(3, size, size, generator=g, device=g.device) for g in generators])


OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class PipelineOutput:
    """What a call returns. `images`: one per (prompt, image index), prompt-major: PIL images, or
    with output_type "pt" a (B, 3, R, R) tensor, "np" a (B, R, R, 3) array, both in [0, 1]."""

    images: list[Image.Image] | torch.Tensor | np.ndarray
    prompts: list[str]  # the prompt of each image, as given (weights included)
    seeds: list[int | None]  # the noise seed of each image (None: from a caller's generator)
    settings: dict = field(default_factory=dict)  # sampler, steps, guidance, negative prompt, ...
    attention_maps: list[dict[str, torch.Tensor]] | None = None  # per image: word label -> (R, R)


@dataclass
class MapOptions:
    """Which cross-attention calls per-word maps aggregate: a [start, end) fraction of the
    sampling steps and the feature-map sides (None: every attention resolution)."""

    steps: tuple[float, float] = (0.0, 1.0)
    resolutions: set[int] | None = None


class TextStates(NamedTuple):
    """What the UNet reads from the text at each step of `Pipeline.denoise`."""

    states: torch.Tensor  # (rows, T, D): the negative prompts' rows first when guided
    outside: torch.Tensor | None  # the same, read outside the weights' window of steps (None: `states`)
    key_mask: torch.Tensor  # (rows, T) which tokens the cross-attention reads
    guided: bool  # classifier-free guidance on: rows = 2B, else B
    conditional: slice  # the prompts' rows
    dtype: torch.dtype  # the UNet's parameters'

    def at_step(self, step: int, num_steps: int, window: tuple[float, float]) -> torch.Tensor:
        if self.outside is not None and not step_in_window(step, num_steps, window):
            return self.outside
        return self.states


class PromptSampling:
    """Prompts, word weights, per-word maps and word swaps on top of a `denoise`: the part of a
    pipeline that does not depend on the model. `Pipeline` (this project's UNet) and
    `sampling.stock.StockPipeline` (a diffusers Stable Diffusion pipeline) share it.

    A class using it provides: `denoise(prompts, generators, settings, attention_controller,
    token_weights, callback_on_step_end, progress)` -> images; `convert_images(images,
    output_type)`; `encoder` (`encode`, `offsets`, `token_ids`: a `TextEncoder` or one that reads
    the same); `scheduler_config`; `map_size` (the side, or (height, width), of the maps);
    `precision` and `device`.
    """

    @property
    def mixed_precision(self) -> str:
        """The UNet's autocast here: `precision` ("auto", "no", "bf16", "fp16") resolved for the
        pipeline's device; "auto" is bf16 where the device computes it natively, as in training."""
        return resolve_mixed_precision(self.precision, self.device)

    def mixed_precision_of(self, settings: SamplingSettings) -> str:
        """The autocast a render with `settings` runs in: theirs, else the pipeline's, resolved."""
        return resolve_mixed_precision(settings.mixed_precision or self.precision, self.device)

    def autocast(self, device: torch.device | None = None, mixed_precision: str | None = None):
        """The autocast context the UNet calls of a render run in (see `mixed_precision`; a
        render's own setting, when given, instead of the pipeline's). device: the pipeline's,
        when the caller has already read it (reading it walks every module)."""
        device = device or self.device
        return autocast(device, resolve_mixed_precision(mixed_precision or self.precision, device))

    def sample_batch(
        self,
        prompts: list[WeightedPrompt],
        generators,
        settings: SamplingSettings,
        maps: MapOptions | None = None,
        attention_controller: AttentionController | None = None,
        swap: SwapPlan | None = None,
        callback_on_step_end=None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """One batch: build the controllers for weights, swaps and maps, denoise, merge maps into
        words. generators: as `denoise`'s (seeds, generators, or one generator); swap: the plan of
        a word swap (`swap_plan`), whose source maps are injected into its edits."""
        weighting = settings.weighting
        texts = [p.text for p in prompts]
        offsets = self.encoder.offsets(texts)  # (B, T, 2)
        weights = token_weights(prompts, offsets)  # (B, T)
        weighted = bool((weights != 1).any())
        controllers = []
        if swap is not None:
            injector = AttentionInjector(swap.mapping, settings.edit_steps, weighting.resolutions, swap.keep)
            controllers.append(injector)
        if weighted and weighting.mode == "attention":
            controllers.append(AttentionReweighter(weights, weighting.window, weighting.resolutions))
        recorder = None
        if maps is not None:
            recorder = AttentionRecorder(self.map_size, maps.steps, maps.resolutions)
            controllers.append(recorder)
        if attention_controller is not None:
            controllers.append(attention_controller)
        x = self.denoise(
            texts,
            generators,
            settings,
            ControllerChain(controllers) if controllers else None,
            weights if weighted else None,
            callback_on_step_end,
            progress,
        )
        word_maps = None
        if recorder is not None:
            token_maps = recorder.token_maps().cpu()  # (B, T, R, R)
            word_maps = [merge_word_maps(m, text, o) for m, text, o in zip(token_maps, texts, offsets)]
        return x, word_maps

    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 3.0,
        guidance_cutoff: float = DEFAULT_GUIDANCE_CUTOFF,
        sampler: str = DEFAULT_SAMPLER,
        negative_prompt: str | list[str] | None = None,
        batch_size: int = 16,
        attention_maps: MapOptions | bool = False,
        weighting: Weighting | None = None,
        attention_controller: AttentionController | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
        settings: SamplingSettings | None = None,
    ) -> PipelineOutput:
        """Sample `num_images_per_prompt` images for each prompt; image i of a prompt uses noise
        seed `seed + i`, whatever the batch size.

        steps ... weighting: the sampling settings as diffusers' keywords (`SamplingSettings` says
        what each does), or all of them at once as `settings` (not both).
        Prompts may use the weighting syntax `a (red:1.5) circle` (see diffusion/control/prompts.py);
        `weighting` chooses how weights act (default: reweight the cross-attention probabilities).
        attention_maps: True (or a MapOptions) also returns one dict per image, word label ->
        (R, R) map (DAAM-style aggregate over heads, layers and steps).
        generator: as in diffusers, instead of `seed`: one torch.Generator for all the images
        (drawn in order, so an image then depends on the ones before it) or a list with one per
        image; output_type: "pil", "pt" or "np" (see PipelineOutput); callback_on_step_end: as
        `denoise`. `generate` gives the images batch by batch."""
        keywords = SamplingSettings(
            steps, guidance, guidance_cutoff, sampler, negative_prompt, weighting or Weighting()
        )
        if settings is not None and keywords != SamplingSettings():
            raise UserError("pass the sampling settings as keywords (steps=, guidance=, ...) or as settings=, not both")
        batches = list(
            self.generate(
                prompt,
                settings or keywords,
                num_images_per_prompt=num_images_per_prompt,
                seed=seed,
                batch_size=batch_size,
                attention_maps=attention_maps,
                attention_controller=attention_controller,
                generator=generator,
                output_type=output_type,
                callback_on_step_end=callback_on_step_end,
                progress=progress,
            )
        )
        images = [b.images for b in batches]
        if output_type == "pil":
            images = [image for batch in images for image in batch]
        else:
            images = torch.cat(images) if output_type == "pt" else np.concatenate(images)
        maps = [m for b in batches for m in b.attention_maps] if batches[0].attention_maps is not None else None
        return PipelineOutput(
            images,
            [p for b in batches for p in b.prompts],
            [s for b in batches for s in b.seeds],
            batches[0].settings,
            maps,
        )

    def generate(
        self,
        prompt: str | list[str],
        settings: SamplingSettings | None = None,
        *,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        attention_maps: MapOptions | bool = False,
        attention_controller: AttentionController | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        progress: bool = True,
        **changes,
    ) -> Iterator[PipelineOutput]:
        """`__call__` one batch at a time: yields a PipelineOutput of at most `batch_size` images
        per batch, in order (prompt-major), so that any number of images can be written out as
        they are made without holding them all. settings: None is the defaults, `changes` its
        fields given as keywords; the other arguments as `__call__`'s."""
        settings = (settings or SamplingSettings()).but(**changes)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        parsed = self._check_call(prompts, settings, num_images_per_prompt, batch_size, output_type)
        maps = MapOptions() if attention_maps is True else (attention_maps or None)
        total = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise UserError(f"{len(generator)} generators for {total} images; pass one per image, or one for all")
        recorded = settings.record(self.mixed_precision_of(settings))
        starts = range(0, total, batch_size)
        for start in tqdm(starts, desc="batches", disable=not progress or len(starts) == 1):
            jobs = [divmod(j, num_images_per_prompt) for j in range(start, min(total, start + batch_size))]
            if generator is None:
                seeds = [seed + i for _, i in jobs]
                generators = [torch.Generator().manual_seed(s) for s in seeds]
            else:
                seeds = [None] * len(jobs)
                generators = (
                    generator if isinstance(generator, torch.Generator) else generator[start : start + len(jobs)]
                )
            x, batch_maps = self.sample_batch(
                [parsed[k] for k, _ in jobs],
                generators,
                settings,
                maps,
                attention_controller,
                callback_on_step_end=callback_on_step_end,
                progress=progress,
            )
            yield PipelineOutput(
                self.convert_images(x, output_type), [prompts[k] for k, _ in jobs], seeds, recorded, batch_maps
            )

    def _check_call(
        self, prompts: list, settings: SamplingSettings, images_per_prompt: int, batch_size: int, output_type: str
    ) -> list[WeightedPrompt]:
        """The prompts parsed; UserError for what `SamplingSettings` cannot check without the model."""
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise UserError("no prompt given; pass at least one prompt string")
        check_counts(images_per_prompt, batch_size)
        sampler_timesteps(settings.steps, self.scheduler_config["num_train_timesteps"])  # too many steps
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"unknown output_type '{output_type}'; choose one of {', '.join(OUTPUT_TYPES)}")
        return [parse_prompt(p) for p in prompts]

    def swap(
        self,
        source: str,
        edit: str,
        settings: SamplingSettings | None = None,
        *,
        num_images: int = 1,
        seed: int = 0,
        attention_maps: MapOptions | bool = False,
        batch_size: int = 8,
        progress: bool = True,
        **changes,
    ) -> tuple[PipelineOutput, PipelineOutput]:
        """Prompt-to-Prompt word swap / refinement: draw `source` and `edit` from the same noise,
        injecting the source's cross-attention maps into the edit for the first
        `settings.edit_steps` fraction of the steps, so the layout stays and the swapped words
        change. Tokens of the two prompts are aligned word by word (prompts.align_tokens); added
        words keep their own maps. settings.local_blend: outside the changed words' maps the edit
        keeps the source's pixels (`LocalBlend`). settings.keep_layout: the other words keep the
        source's maps at every step, not only in the first `edit_steps`, so the outlines stay and
        only the swapped word's thing changes within them. None (auto, `prompts.swap_kind`): on
        for a recolouring; for a resizing, the other objects' words keep the source's maps at
        every step and the resized object's words (`prompts.object_phrase`) take none, so it is
        drawn anew at its new size; off for other swaps, since a new shape needs its outline
        free. The output settings record it as "on", "off" or "redraw object". batch_size: pairs
        denoised together; `changes`: fields of `settings` given as keywords
        (`swap(a, b, edit_steps=0.4)`). Returns (source output, edit output)."""
        settings = (settings or SamplingSettings()).but(**changes)
        maps = MapOptions() if attention_maps is True else (attention_maps or None)
        parsed = self._check_call([source, edit], settings, num_images, batch_size, "pil")
        plan = self.swap_plan([(parsed[0], parsed[1])], settings.keep_layout)
        outputs = ([], []), ([], [])
        starts = range(0, num_images, batch_size)
        for start in tqdm(starts, desc="pairs", disable=not progress or len(starts) == 1):
            count = min(batch_size, num_images - start)
            seeds = [seed + start + k for k in range(count)]
            x, pair_maps = self.swap_batch(plan.repeat(count), seeds, settings, maps, progress)
            for k, image in enumerate(self.convert_images(x, "pil")):
                outputs[k % 2][0].append(image)
                outputs[k % 2][1].append(pair_maps[k] if pair_maps else None)
        recorded = {
            **settings.record(self.mixed_precision_of(settings)),
            "edit_steps": settings.edit_steps,
            "local_blend": settings.local_blend,
            "keep_layout": plan.layouts[0],
        }
        return tuple(
            PipelineOutput(
                images,
                [text] * num_images,
                [seed + i for i in range(num_images)],
                recorded,
                word_maps if maps is not None else None,
            )
            for (images, word_maps), text in zip(outputs, (source, edit))
        )

    def swap_batch(
        self,
        plan: SwapPlan,
        seeds: list[int],
        settings: SamplingSettings,
        maps: MapOptions | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """The pairs of a `swap_plan` in one batch, pair k from noise seed seeds[k] for both images
        (see `swap`). Returns the images (2P, 3, R, R), source and edit of each pair in turn, and
        their word maps when `maps` is given."""
        blend = LocalBlend(plan.changed, self.map_size) if settings.local_blend else None
        seeds = [seed for seed in seeds for _ in range(2)]
        return self.sample_batch(
            plan.prompts, seeds, settings, maps, blend, swap=plan, callback_on_step_end=blend, progress=progress
        )

    def swap_plan(
        self, pairs: list[tuple[WeightedPrompt | str, WeightedPrompt | str]], keep_layout: bool | None = None
    ) -> SwapPlan:
        """How a word swap acts on each (source, edit) pair with this model's tokens (`plan_swaps`)."""
        return plan_swaps(self.encoder, pairs, keep_layout)


class Pipeline(PromptSampling, DiffusionPipeline):
    def __init__(
        self,
        unet: UNet | DiffusersUNet,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
        text_encoder_options: dict | None = None,
        format_version: int = FORMAT_VERSION,
    ):
        """unet: the denoiser; text_encoder, tokenizer: the frozen CLIP text model and its
        tokenizer; scheduler: the training noise schedule (samplers are built on its config);
        text_encoder_options: `TextEncoder`'s max_length, hidden_layer, mask_eos,
        concat_token_embeddings; format_version: of the folder layout (model_index.json)."""
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(text_encoder_options=dict(text_encoder_options or {}), format_version=format_version)
        self.encoder = TextEncoder(tokenizer, text_encoder, **(text_encoder_options or {}))
        self.unet.eval()
        self.precision = "auto"
        # A stand-in for the UNet, called as it is, that `denoise` uses when set: the editor
        # attaches its compiled UNet here (diffusion/editor/compiled.py).
        self.fast_unet = None

    @classmethod
    def from_parts(
        cls,
        unet: UNet | DiffusersUNet,
        encoder: TextEncoder,
        scheduler_config: dict,
        device: torch.device | str | None = None,
        mixed_precision: str = "auto",
    ) -> Pipeline:
        """A pipeline of a UNet and a `TextEncoder` in memory (training's validation grids and export)."""
        pipe = cls(
            unet, encoder.model, encoder.tokenizer, DDPMScheduler.from_config(scheduler_config), encoder.options()
        )
        pipe.encoder = encoder
        pipe.precision = mixed_precision
        return pipe.to(device if device is not None else default_device())

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, mixed_precision: str = "auto"
    ) -> Pipeline:
        """Load an exported model folder. Every problem with it is a one-line UserError; weights
        are read from safetensors only, never unpickled. device: where to run (None: the best
        available); mixed_precision: autocast of the UNet (`mixed_precision`)."""
        path = Path(path)
        index = check_index(path)
        resolve_mixed_precision(mixed_precision, torch.device("cpu"))  # an unknown setting fails before loading
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # our one-line error, not diffusers' log
        try:
            unet = unet_class(path / "unet").from_pretrained(path / "unet", use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"cannot load '{path / 'unet'}': {str(error).splitlines()[0]}") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        encoder = TextEncoder.from_pretrained(str(path), **index.get("text_encoder_options", {}))
        return cls.from_parts(unet, encoder, DDPMScheduler.load_config(path / "scheduler"), device, mixed_precision)

    def save_pretrained(self, path: str | Path, extra_files: dict[str, str] | None = None) -> None:
        """Write the pipeline folder atomically: a temporary folder is filled, then swapped in
        (`checkpoint.replace_folder`), so an interrupted export (killed, or a full disk: a
        UserError) never leaves a half-written model, or none, where a good one was."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        with writing(temporary, f"the model folder '{path}'"):
            self._write_folder(temporary, extra_files)
            replace_folder(temporary, path)

    def _write_folder(self, temporary: Path, extra_files: dict[str, str] | None) -> None:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        self.unet.save_pretrained(temporary / "unet")
        self.encoder.save_pretrained(temporary)
        self.scheduler.save_pretrained(temporary / "scheduler")
        index = {
            "_class_name": ["pipeline", "Pipeline"],  # the class in pipeline.py, for diffusers
            "_diffusers_version": diffusers.__version__,
            "format_version": FORMAT_VERSION,
            "unet": ["diffusion", type(self.unet).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder_options": self.encoder.options(),
        }
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (temporary / "pipeline.py").write_text(PIPELINE_FILE)
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
        default_file_modes(temporary)

    # ---- sampling -----------------------------------------------------------------------
    @property
    def scheduler_config(self) -> dict:
        """The training noise schedule, which every sampler is built on."""
        return dict(self.scheduler.config)

    @torch.no_grad()
    def denoise(
        self,
        prompts: list[str],
        generators: list[torch.Generator] | torch.Generator,
        settings: SamplingSettings | None = None,
        attention_controller: AttentionController | None = None,
        token_weights: torch.Tensor | None = None,
        callback_on_step_end=None,
        progress: bool = False,
        **changes,
    ) -> torch.Tensor:
        """Sample one image per prompt in one batch. Returns (B, 3, R, R) in [-1, 1].

        prompts: plain prompts (no weighting syntax); generators: one torch.Generator (or a seed
        to make one from) per prompt, its image's noise, so an image does not depend on the batch
        it is in; or one generator for all; settings: steps, guidance and the rest (None: the
        defaults), with `changes` to its fields given as keywords (`denoise(p, g, steps=5)`);
        attention_controller: sees every cross-attention call (`site.conditional` marks the
        conditional rows); token_weights: (B, T) per-token weights, applied to the text states as
        `settings.weighting` says (`weighting.condition`; None: no weighting). Attention-mode
        weights act through the controller (`AttentionReweighter`), which the caller passes in.
        callback_on_step_end: called after each step as diffusers does,
        `callback_on_step_end(pipeline, step, timestep, {"latents": x})`; a "latents" entry in
        the dict it returns replaces the images being denoised (B, 3, R, R)."""
        settings = (settings or SamplingSettings()).but(**changes)
        # DiffusionPipeline.device walks every module, at a cost per read: read it once
        device = self.device
        scheduler = make_sampler(settings.sampler, self.scheduler_config)
        set_sampler_timesteps(scheduler, settings.steps, device)
        generators = as_generators(generators)
        x = (
            initial_noise(generators, len(prompts), self.unet.config.sample_size).to(device)
            * scheduler.init_noise_sigma
        )
        text = self.text_states(prompts, settings, token_weights, device)
        unet = self.fast_unet or self.unet
        # Self-conditioning: each call also reads the clean image the previous step's (guided)
        # prediction implied, zeros at the first step.
        self_conditioning = self.unet.config.get("self_conditioning", False)
        estimate = torch.zeros_like(x)
        steps, B = settings.steps, len(prompts)
        # One autocast region for all the steps: it casts each weight to the lower precision once
        # and keeps it, where a region per UNet call would cast every weight again at every step.
        # The guidance, the sampler's step and the callback run outside it, in float32.
        with self.autocast(device, settings.mixed_precision):
            for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
                guided = text.guided and step_in_window(i, steps, (0.0, settings.guidance_cutoff))
                scaled = scheduler.scale_model_input(x, t)
                model_input = torch.cat([scaled, estimate], dim=1) if self_conditioning else scaled
                model_input = (torch.cat([model_input, model_input]) if guided else model_input).to(text.dtype)
                context = text.at_step(i, steps, settings.weighting.window)
                # unguided (past the cutoff, or guidance 1): the conditional rows alone
                rows = slice(None) if guided else text.conditional
                prediction = unet(
                    model_input,
                    t,
                    context[rows],
                    text.key_mask[rows],
                    attention_controller=attention_controller,
                    step=i,
                    num_steps=steps,
                    conditional=text.conditional if guided else slice(0, B),
                ).float()
                with torch.autocast(device.type, enabled=False):
                    if guided:
                        unconditional, conditional_prediction = prediction.chunk(2)
                        prediction = unconditional + settings.guidance * (conditional_prediction - unconditional)
                    if self_conditioning:
                        alphas = self.scheduler.alphas_cumprod[int(t)].expand(B)
                        estimate = estimate_clean(prediction, scaled, alphas, self.scheduler.config.prediction_type)
                    x = scheduler.step(prediction, t, x, generator=generators).prev_sample
                    if callback_on_step_end is not None:
                        x = callback_on_step_end(self, i, t, {"latents": x}).get("latents", x)
        return x.clamp(-1, 1)

    def text_states(
        self, prompts: list[str], settings: SamplingSettings, token_weights: torch.Tensor | None, device
    ) -> TextStates:
        """The keys and values the UNet reads for `prompts`: their text states, weighted as
        `settings.weighting` says, with the negative prompt's rows first when guidance is on."""
        B, weighting = len(prompts), settings.weighting
        plain = self.encoder.encode(prompts)  # (B, T, D), (B, T)
        embeddings, key_mask = condition(self.encoder, prompts, token_weights, weighting, encoded=plain)
        # Weights act within their window of steps (`Weighting.window`), and so do the states
        # they make; outside it the UNet reads the plain encoding (in embedding mode, with the
        # words at 0 still deleted).
        outside = None
        if token_weights is not None and weighting.acts_within_window():
            late = weighting.outside_weights(token_weights)
            outside = condition(self.encoder, prompts, late, weighting, encoded=plain)[0]
        guided = settings.guidance != 1.0
        if guided:  # unconditional half first, conditional second
            negative_prompt = settings.negative_prompt
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * B
            if len(negatives) != B:
                raise UserError(f"{len(negatives)} negative prompts for {B} prompts; pass one for all, or one each")
            negative, negative_mask = self.encoder.encode(negatives)
            embeddings = torch.cat([negative, embeddings])
            outside = None if outside is None else torch.cat([negative, outside])
            key_mask = torch.cat([negative_mask, key_mask])
        dtype = next(self.unet.parameters()).dtype
        return TextStates(
            embeddings.to(device, dtype),
            None if outside is None else outside.to(device, dtype),
            key_mask.to(device),
            guided,
            slice(B, 2 * B) if guided else slice(0, B),
            dtype,
        )

    @property
    def map_size(self) -> int:
        """The side of the per-word maps and of a local blend's region: the image's (pixel space)."""
        return self.unet.config.sample_size

    def convert_images(self, x: torch.Tensor, output_type: str):
        """`denoise`'s images, (B, 3, R, R) in [-1, 1], as `output_type` asks (`convert`)."""
        return convert(x, output_type)

    def with_precision(self, mixed_precision: str) -> Pipeline:
        """A pipeline of these modules (none copied) whose UNet runs in `mixed_precision`."""
        return Pipeline.from_parts(self.unet, self.encoder, self.scheduler_config, self.device, mixed_precision)


def convert(x: torch.Tensor, output_type: str):
    """(B, 3, R, R) in [-1, 1] as `output_type` asks (see PipelineOutput)."""
    if output_type == "pil":
        return to_pil(x)
    if output_type == "pt":
        return (x.float().cpu() + 1) / 2
    return ((x.float().cpu() + 1) / 2).permute(0, 2, 3, 1).numpy()


def merge_word_maps(token_maps: torch.Tensor, prompt: str, offsets: torch.Tensor) -> dict[str, torch.Tensor]:
    """(T, R, R) token maps of one prompt -> {word label: (R, R)}: the sum of the maps of the
    word's tokens (tied by character offsets), start/end/padding tokens left out."""
    words = split_words(prompt)
    merged = {}
    for t, w in enumerate(token_word_index(offsets, words)):
        if w is not None:
            label = words[w].label
            merged[label] = merged[label] + token_maps[t] if label in merged else token_maps[t].clone()
    return merged

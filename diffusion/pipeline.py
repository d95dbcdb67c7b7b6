"""The text-to-image pipeline: load an exported model folder, sample images from prompts.

    from diffusion import Pipeline
    pipe = Pipeline.from_pretrained("runs/shapes/model")
    out = pipe(["a red circle on the left"], num_images_per_prompt=4, seed=0)
    out.images[0].save("circle.png")

The folder has diffusers' pipeline layout: `model_index.json`, `unet/`, `text_encoder/`,
`tokenizer/`, `scheduler/`. Samplers are diffusers schedulers sharing one contract
(`set_timesteps`, `scale_model_input`, `step`); classifier-free guidance runs the unconditional
and conditional halves in one batch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler)
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from tqdm.auto import tqdm

from .attention import AttentionController
from .attention_control import (AttentionInjector, AttentionRecorder, AttentionReweighter, ControllerChain,
                                LocalBlend, changed_tokens, step_in_window)
from .checkpoint import default_file_modes
from .config import DEFAULT_SAMPLER, WEIGHT_CONTEXTS, WEIGHT_MODES
from .errors import UserError
from .images import to_pil
from .precision import autocast, resolve_mixed_precision
from .prompts import (WeightedPrompt, align_tokens, delete_tokens, parse_prompt, split_words, token_word_index,
                      word_token_weights)
from .text_encoder import TextEncoder
from .unet import UNet

FORMAT_VERSION = 1

# name -> (scheduler class, settings over the training scheduler's config).
# Every sampler visits the same timesteps, DDIM's "leading" ones: (K-1)r, ..., r, 0 with
# r = num_train_timesteps // K (see `sampler_timesteps`). Not the last timestep: the cosine
# schedule's t = 999 has alpha_bar ~ 2e-9, where an epsilon model's x0 estimate explodes and
# samplers that do not clip x0 (DPM++, Euler) end in noise. DPM++ gets these timesteps passed in:
# its own "leading" rule divides by K + 1 and starts low, at t = 750 for 250 steps, so it began
# from pure noise labelled as a quarter-clean image and left grain and extra objects (measured).
# DPM++ also clips x0 by dynamic thresholding to [-1, 1]. DDIM must not clip (clip_sample is on
# in the training scheduler's config): it clips x0 but keeps the unclipped noise estimate, and with
# guidance the two disagree at every step (measured: faithfulness 0.80 at 5 steps fell to 0.23 at 50;
# unclipped, DDIM gives Euler's images, as the ODE says it must; tests/test_pipeline.py).
SAMPLERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                            "thresholding": True, "sample_max_value": 1.0}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "leading", "clip_sample": False}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "leading"}),
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_sampler(name: str, scheduler_config: dict):
    """A fresh diffusers scheduler for sampler `name`, built on the training noise schedule."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    cls, settings = SAMPLERS[name]
    return cls.from_config(scheduler_config, **settings)


def sampler_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The `steps` timesteps every sampler visits, noisiest first: DDIM's "leading" spacing."""
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"steps must be between 1 and the model's {num_train_timesteps} training timesteps, got {steps}")
    ratio = num_train_timesteps // steps
    return [k * ratio for k in reversed(range(steps))]


def set_sampler_timesteps(scheduler, steps: int, device=None) -> None:
    """`scheduler.set_timesteps` for `steps` steps on the timesteps of `sampler_timesteps`."""
    timesteps = sampler_timesteps(steps, scheduler.config.num_train_timesteps)  # also the range check
    if isinstance(scheduler, DPMSolverMultistepScheduler):  # its own "leading" rule differs
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:  # DDIM takes no `timesteps`; "leading" spacing gives these same ones (tested)
        scheduler.set_timesteps(steps, device=device)


def check_sampling_args(steps: int, guidance: float, num_images_per_prompt: int, batch_size: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive whole number, got {steps}")
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"guidance must be a finite number >= 0, got {guidance}")
    if num_images_per_prompt < 1:
        raise UserError(f"the number of images per prompt must be at least 1, got {num_images_per_prompt}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")


@dataclass
class PipelineOutput:
    images: list[Image.Image]          # one per (prompt, image index), prompt-major
    prompts: list[str]                 # the prompt of each image, as given (weights included)
    seeds: list[int]                   # the noise seed of each image
    settings: dict = field(default_factory=dict)  # sampler, steps, guidance, negative prompt, ...
    attention_maps: list[dict[str, torch.Tensor]] | None = None  # per image: word label -> (R, R)


@dataclass
class MapOptions:
    """Which cross-attention calls per-word maps aggregate: a [start, end) fraction of the
    sampling steps and the feature-map sides (None: every attention resolution)."""

    steps: tuple[float, float] = (0.0, 1.0)
    resolutions: set[int] | None = None


@dataclass
class Weighting:
    """How prompt weights act. mode "attention": scale the weighted tokens' cross-attention
    probabilities (Prompt-to-Prompt reweighting), within `steps` (fraction window) and at
    `resolutions` (None: all); mode "embedding": scale their text embeddings relative to the
    empty prompt's (compel / AUTOMATIC1111 style). `resolutions` also limits word-swap injection.
    context "fade": in either mode, a word weighted below 1 also fades out of the other tokens'
    text states, where the causal CLIP wrote it (see `Pipeline.condition`); "keep": leave those
    states as encoded (plain Prompt-to-Prompt reweighting or embedding scaling)."""

    mode: str = WEIGHT_MODES[0]  # "attention"
    steps: tuple[float, float] = (0.0, 1.0)
    resolutions: set[int] | None = None
    context: str = WEIGHT_CONTEXTS[0]  # "fade"

    def check(self) -> None:
        if self.mode not in WEIGHT_MODES:
            raise UserError(f"unknown weight mode '{self.mode}'; choose {' or '.join(WEIGHT_MODES)}")
        if self.context not in WEIGHT_CONTEXTS:
            raise UserError(f"unknown weight context '{self.context}'; choose {' or '.join(WEIGHT_CONTEXTS)}")
        start, end = self.steps
        if not (0 <= start < end <= 1):
            raise UserError(f"weight steps must be a window 0 <= start < end <= 1, got {start},{end}")


class Pipeline:
    def __init__(self, unet: UNet, text_encoder: TextEncoder, scheduler_config: dict,
                 device: torch.device | str | None = None, mixed_precision: str = "auto"):
        """unet: the denoiser; text_encoder: the frozen CLIP text encoder; scheduler_config: the
        training noise schedule (a DDPMScheduler config dict); mixed_precision: autocast of the
        UNet (auto, no, fp16, bf16; auto: bf16 where the device does it natively, as in training)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.mixed_precision = resolve_mixed_precision(mixed_precision, self.device)
        self.unet = unet.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device)
        self.scheduler_config = dict(scheduler_config)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        mixed_precision: str = "auto") -> "Pipeline":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"model folder '{path}' not found; pass the folder train.py exported (e.g. runs/shapes/model)")
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise UserError(f"'{path}' is not a model folder: model_index.json is missing; "
                            "pass the folder train.py exported (e.g. runs/shapes/model)")
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"'{index_file}' is corrupt (not JSON); export the model again") from None
        version = index.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"'{path}' was written by an incompatible version (format {version}, this code reads "
                            f"{FORMAT_VERSION}); export it again with this version")
        for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not (path / part).is_dir():
                raise UserError(f"model folder '{path}' is missing '{part}/'; export the model again")
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # our one-line error, not diffusers' log
        try:  # safetensors only: never fall back to unpickling a .bin
            unet = UNet.from_pretrained(path / "unet", use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"cannot load '{path / 'unet'}': {str(error).splitlines()[0]}") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        options = index.get("text_encoder_options", {})
        text_encoder = TextEncoder.from_pretrained(str(path), **options)
        scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        return cls(unet, text_encoder, scheduler_config, device, mixed_precision)

    def save_pretrained(self, path: str | Path, extra_files: dict[str, str] | None = None) -> None:
        """Write the pipeline folder atomically: a temporary folder is filled, then swapped in,
        so an interrupted export never leaves a half-written model where a good one was."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        self.unet.save_pretrained(temporary / "unet")
        self.text_encoder.save_pretrained(temporary)
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(temporary / "scheduler")
        index = {
            "_class_name": "Pipeline",
            "format_version": FORMAT_VERSION,
            "unet": ["diffusion", "UNet"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder_options": {"max_length": self.text_encoder.max_length,
                                     "hidden_layer": self.text_encoder.hidden_layer,
                                     "mask_eos": self.text_encoder.mask_eos,
                                     "concat_token_embeddings": self.text_encoder.concat_token_embeddings},
        }
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
        default_file_modes(temporary)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
        shutil.rmtree(old, ignore_errors=True)

    # ---- sampling -----------------------------------------------------------------------
    def autocast(self):
        """The autocast context every UNet call of this pipeline runs in (see `mixed_precision`)."""
        return autocast(self.device, self.mixed_precision)

    @torch.no_grad()
    def denoise(self, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.0,
                sampler: str = DEFAULT_SAMPLER, negative_prompt: str | list[str] | None = None,
                attention_controller: AttentionController | None = None,
                token_weights: torch.Tensor | None = None, weighting: Weighting | None = None,
                callback_on_step_end=None, progress: bool = False) -> torch.Tensor:
        """Sample one image per (prompt, seed) pair in one batch. Returns (B, 3, R, R) in [-1, 1].

        prompts: plain prompts (no weighting syntax); seeds: one noise seed per prompt;
        negative_prompt: replaces the empty prompt of the unconditional half, one for all or a
        list with one per prompt;
        attention_controller: sees every cross-attention call (`site.conditional` marks the
        conditional rows); token_weights: (B, T) per-token weights, applied to the text states as
        `weighting` says (see `condition`; None: no weighting). Attention-mode weights act through
        the controller (`AttentionReweighter`), which the caller passes in.
        callback_on_step_end: called after each step as diffusers does,
        `callback_on_step_end(pipeline, step, timestep, {"latents": x})`; a "latents" entry in
        the dict it returns replaces the images being denoised (B, 3, R, R).

        The noise of each image comes from its own generator seeded with its seed, so an image
        does not depend on what else is in the batch."""
        scheduler = make_sampler(sampler, self.scheduler_config)
        set_sampler_timesteps(scheduler, steps, self.device)
        size = self.unet.config.sample_size
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(3, size, size, generator=g) for g in generators])
        x = noise.to(self.device) * scheduler.init_noise_sigma

        B = len(prompts)
        plain = self.text_encoder.encode(prompts)  # (B, T, D), (B, T)
        embeddings, key_mask = self.condition(prompts, token_weights, weighting, encoded=plain)
        # Attention-mode weights act within their window of steps, and so does their fading of
        # the other words' states: outside it the UNet reads the plain encoding.
        outside = None
        if token_weights is not None and weighting is not None and weighting.mode == "attention" \
                and weighting.context == "fade" and tuple(weighting.steps) != (0.0, 1.0):
            outside = plain[0]
        use_guidance = guidance != 1.0
        conditional = slice(B, 2 * B) if use_guidance else slice(0, B)
        if use_guidance:  # unconditional half first, conditional second
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * B
            if len(negatives) != B:
                raise ValueError(f"{len(negatives)} negative prompts for {B} prompts")
            negative, negative_mask = self.text_encoder.encode(negatives)
            embeddings = torch.cat([negative, embeddings])
            outside = None if outside is None else torch.cat([negative, outside])
            key_mask = torch.cat([negative_mask, key_mask])
        dtype = next(self.unet.parameters()).dtype
        embeddings = embeddings.to(self.device, dtype)
        outside = None if outside is None else outside.to(self.device, dtype)
        key_mask = key_mask.to(self.device)

        # One autocast region for all the steps: it casts each weight to the lower precision once
        # and keeps it, where a region per UNet call would cast every weight again at every step.
        # The guidance, the sampler's step and the callback run outside it, in float32.
        with self.autocast():
            for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
                model_input = torch.cat([x, x]) if use_guidance else x
                model_input = scheduler.scale_model_input(model_input, t).to(dtype)
                context = outside if outside is not None and not step_in_window(i, steps, weighting.steps) \
                    else embeddings
                prediction = self.unet(model_input, t, context, key_mask, attention_controller=attention_controller,
                                       step=i, num_steps=steps, conditional=conditional).float()
                with torch.autocast(self.device.type, enabled=False):
                    if use_guidance:
                        unconditional, conditional_prediction = prediction.chunk(2)
                        prediction = unconditional + guidance * (conditional_prediction - unconditional)
                    x = scheduler.step(prediction, t, x, generator=generators).prev_sample
                    if callback_on_step_end is not None:
                        x = callback_on_step_end(self, i, t, {"latents": x}).get("latents", x)
        return x.clamp(-1, 1)

    def condition(self, prompts: list[str], token_weights: torch.Tensor | None = None,
                  weighting: Weighting | None = None,
                  encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The text states (B, T, D) the UNet attends to for `prompts` and their key mask (B, T),
        under per-token weights (B, T) (None: the plain encoding). encoded: the plain encoding of
        `prompts` when the caller already has it.

        With context "fade", a word weighted below 1 fades out of the other tokens' states: they
        become e_without + s (e - e_without), where e_without is the encoding of the prompt with
        the down-weighted words deleted (token by token aligned back onto this prompt) and s is
        the prompt's smallest weight. The causal CLIP writes "red" into the state of "circle" in
        "a red circle"; without this, weight 0 on "red" still draws red, in either mode. The
        weighted tokens' own states are left to the mode.
        In embedding mode a weighted token's own state moves from the empty prompt's,
        e0 + w (e - e0), and with "fade" a word at weight 0 is no longer a key either, so weight
        0 gives exactly the prompt with the word deleted (as compel's down-weighting does). In
        attention mode the states are only faded; the controller scales the probabilities."""
        embeddings, key_mask = encoded if encoded is not None else self.text_encoder.encode(prompts)
        if token_weights is None or bool((token_weights == 1).all()):
            return embeddings, key_mask
        weighting = weighting or Weighting()
        weights = token_weights.to(embeddings.device)
        down = weights < 1  # (B, T)
        fade = weighting.context == "fade" and bool(down.any())
        if fade:
            T, D = embeddings.shape[1:]
            offsets = self._offsets(prompts)
            deleted = [delete_tokens(p, o, d) for p, o, d in zip(prompts, offsets, down.tolist())]
            without, _ = self.text_encoder.encode(deleted)
            # where each of this prompt's tokens sits in the deleted prompt (-1: a deleted word)
            mapping = torch.stack([align_tokens(o_without, text_without, o, p, T) for o_without, text_without, o, p
                                   in zip(self._offsets(deleted), deleted, offsets, prompts)]).to(embeddings.device)
            without = torch.gather(without, 1, mapping.clamp(min=0)[:, :, None].expand(-1, -1, D))
            without = torch.where((mapping >= 0)[:, :, None], without, embeddings)
            scale = weights.masked_fill(~down, 1.0).amin(dim=1)[:, None, None]  # (B, 1, 1)
            context = without + scale * (embeddings - without)
            embeddings = torch.where(down[:, :, None], embeddings, context)
        if weighting.mode == "embedding":
            if fade:
                key_mask = key_mask & (weights != 0)
            empty, _ = self.text_encoder.encode([""])
            embeddings = empty + weights[:, :, None] * (embeddings - empty)
        return embeddings, key_mask

    def _offsets(self, texts: list[str]) -> torch.Tensor:
        """Token character offsets (B, T, 2), without the truncation warning: denoise() encodes the
        same prompts and warns once."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.text_encoder.tokenize(texts)["offsets"]

    def sample_batch(self, prompts: list[WeightedPrompt], seeds: list[int], settings: dict, maps: MapOptions | None,
                      weighting: Weighting, attention_controller: AttentionController | None,
                      swap_mapping: torch.Tensor | None = None, swap_fraction: float = 0.0,
                      callback_on_step_end=None,
                      progress: bool = False) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """One batch: build the controllers for weights, swaps and maps, denoise, merge maps into words."""
        texts = [p.text for p in prompts]
        offsets = self._offsets(texts)  # (B, T, 2)
        T = offsets.shape[1]
        token_weights = torch.stack([word_token_weights(p, o, T) for p, o in zip(prompts, offsets)])  # (B, T)
        weighted = bool((token_weights != 1).any())
        controllers = []
        if swap_mapping is not None:
            controllers.append(AttentionInjector(swap_mapping, swap_fraction, weighting.resolutions))
        if weighted and weighting.mode == "attention":
            controllers.append(AttentionReweighter(token_weights, weighting.steps, weighting.resolutions))
        recorder = None
        if maps is not None:
            recorder = AttentionRecorder(self.unet.config.sample_size, maps.steps, maps.resolutions)
            controllers.append(recorder)
        if attention_controller is not None:
            controllers.append(attention_controller)
        controller = ControllerChain(controllers) if controllers else None
        x = self.denoise(texts, seeds, attention_controller=controller,
                         token_weights=token_weights if weighted else None, weighting=weighting,
                         callback_on_step_end=callback_on_step_end, progress=progress, **settings)
        word_maps = None
        if recorder is not None:
            token_maps = recorder.token_maps().cpu()  # (B, T, R, R)
            word_maps = [merge_word_maps(m, text, o) for m, text, o in zip(token_maps, texts, offsets)]
        return x, word_maps

    def _prepare(self, prompts, steps, guidance, sampler, negative_prompt, num_images_per_prompt, batch_size,
                 weighting: Weighting) -> tuple[list[WeightedPrompt], dict]:
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise UserError("no prompt given; pass at least one prompt string")
        check_sampling_args(steps, guidance, num_images_per_prompt, batch_size)
        make_sampler(sampler, self.scheduler_config)  # fail on an unknown name before any work
        sampler_timesteps(steps, self.scheduler_config["num_train_timesteps"])  # and on too many steps
        weighting.check()
        parsed = [parse_prompt(p) for p in prompts]
        return parsed, {"steps": steps, "guidance": guidance, "sampler": sampler, "negative_prompt": negative_prompt}

    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1, seed: int = 0,
                 steps: int = 20, guidance: float = 3.0, sampler: str = DEFAULT_SAMPLER,
                 negative_prompt: str | None = None, batch_size: int = 16,
                 attention_maps: MapOptions | bool = False, weighting: Weighting | None = None,
                 attention_controller: AttentionController | None = None,
                 progress: bool = True) -> PipelineOutput:
        """Sample `num_images_per_prompt` images for each prompt; image i of a prompt uses noise
        seed `seed + i`, whatever the batch size.

        Prompts may use the weighting syntax `a (red:1.5) circle` (see diffusion/prompts.py);
        `weighting` chooses how weights act (default: scale the cross-attention probabilities).
        attention_maps: True (or a MapOptions) also returns one dict per image, word label ->
        (R, R) map (DAAM-style aggregate over heads, layers and steps).
        Returns PIL images with their prompts and seeds; `generate` gives them batch by batch."""
        batches = list(self.generate(prompt, num_images_per_prompt, seed, steps, guidance, sampler, negative_prompt,
                                     batch_size, attention_maps, weighting, attention_controller, progress))
        maps = [m for b in batches for m in b.attention_maps] if batches[0].attention_maps is not None else None
        return PipelineOutput([image for b in batches for image in b.images], [p for b in batches for p in b.prompts],
                              [s for b in batches for s in b.seeds], batches[0].settings, maps)

    def generate(self, prompt: str | list[str], num_images_per_prompt: int = 1, seed: int = 0,
                 steps: int = 20, guidance: float = 3.0, sampler: str = DEFAULT_SAMPLER,
                 negative_prompt: str | None = None, batch_size: int = 16,
                 attention_maps: MapOptions | bool = False, weighting: Weighting | None = None,
                 attention_controller: AttentionController | None = None,
                 progress: bool = True) -> Iterator[PipelineOutput]:
        """`__call__` one batch at a time: yields a PipelineOutput of at most `batch_size` images
        per batch, in order (prompt-major), so that any number of images can be written out as
        they are made without holding them all. Arguments as `__call__`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        weighting = weighting or Weighting()
        maps = MapOptions() if attention_maps is True else (attention_maps or None)
        parsed, settings = self._prepare(prompts, steps, guidance, sampler, negative_prompt,
                                         num_images_per_prompt, batch_size, weighting)
        recorded = {**settings, "negative_prompt": negative_prompt or "", "weight_mode": weighting.mode,
                    "weight_context": weighting.context, "mixed_precision": self.mixed_precision}
        total = len(prompts) * num_images_per_prompt
        starts = range(0, total, batch_size)
        for start in tqdm(starts, desc="batches", disable=not progress or len(starts) == 1):
            jobs = [divmod(j, num_images_per_prompt) for j in range(start, min(total, start + batch_size))]
            x, batch_maps = self.sample_batch([parsed[k] for k, _ in jobs], [seed + i for _, i in jobs], settings,
                                               maps, weighting, attention_controller, progress=progress)
            yield PipelineOutput(to_pil(x), [prompts[k] for k, _ in jobs], [seed + i for _, i in jobs], recorded,
                                 batch_maps if maps is not None else None)

    def swap(self, source: str, edit: str, num_images: int = 1, seed: int = 0, edit_steps: float = 0.6,
             steps: int = 20, guidance: float = 3.0, sampler: str = DEFAULT_SAMPLER, negative_prompt: str | None = None,
             attention_maps: MapOptions | bool = False, weighting: Weighting | None = None,
             local_blend: bool = False, batch_size: int = 8,
             progress: bool = True) -> tuple[PipelineOutput, PipelineOutput]:
        """Prompt-to-Prompt word swap / refinement: draw `source` and `edit` from the same noise,
        injecting the source's cross-attention maps into the edit for the first `edit_steps`
        fraction of the steps, so the layout stays and the swapped words change. Tokens of the
        two prompts are aligned word by word (prompts.align_tokens); added words keep their own
        maps. local_blend: outside the changed words' maps the edit keeps the source's pixels
        (`LocalBlend`). batch_size: pairs denoised together. Returns (source output, edit output)."""
        weighting = weighting or Weighting()
        maps = MapOptions() if attention_maps is True else (attention_maps or None)
        parsed, settings = self._prepare([source, edit], steps, guidance, sampler, negative_prompt, num_images,
                                         batch_size, weighting)
        outputs = ([], []), ([], [])
        starts = range(0, num_images, batch_size)
        for start in tqdm(starts, desc="pairs", disable=not progress or len(starts) == 1):
            count = min(batch_size, num_images - start)
            x, pair_maps = self.swap_batch([(parsed[0], parsed[1])] * count, [seed + start + k for k in range(count)],
                                           edit_steps, settings, weighting, maps, local_blend, progress)
            for k, image in enumerate(to_pil(x)):
                outputs[k % 2][0].append(image)
                outputs[k % 2][1].append(pair_maps[k] if pair_maps else None)
        settings = {**settings, "negative_prompt": negative_prompt or "", "edit_steps": edit_steps,
                    "local_blend": local_blend}
        return tuple(PipelineOutput(images, [text] * num_images, [seed + i for i in range(num_images)],
                                    settings, word_maps if maps is not None else None)
                     for (images, word_maps), text in zip(outputs, (source, edit)))

    def swap_batch(self, pairs: list[tuple[WeightedPrompt | str, WeightedPrompt | str]], seeds: list[int],
                   edit_steps: float, settings: dict, weighting: Weighting, maps: MapOptions | None = None,
                   local_blend: bool = False,
                   progress: bool = False) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """Several (source, edit) pairs in one batch, pair k from noise seed seeds[k] for both
        images (see `swap`). Returns the images (2P, 3, R, R), source and edit of each pair in
        turn, and their word maps when `maps` is given."""
        if not 0 <= edit_steps <= 1 or not math.isfinite(edit_steps):
            raise UserError(f"edit steps must be a fraction in [0, 1], got {edit_steps}")
        parsed = [p if isinstance(p, WeightedPrompt) else parse_prompt(p) for pair in pairs for p in pair]
        texts = [p.text for p in parsed]
        offsets = self._offsets(texts)  # (2P, T, 2)
        T = offsets.shape[1]
        mapping = torch.stack([align_tokens(offsets[2 * k], texts[2 * k], offsets[2 * k + 1], texts[2 * k + 1], T)
                               for k in range(len(pairs))])  # (P, T)
        blend = None
        if local_blend:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ids = self.text_encoder.tokenize(texts)["input_ids"]
            blend = LocalBlend(changed_tokens(ids, offsets, mapping), self.unet.config.sample_size)
        seeds = [seed for seed in seeds for _ in range(2)]
        return self.sample_batch(parsed, seeds, settings, maps, weighting, blend, swap_mapping=mapping,
                                 swap_fraction=edit_steps, callback_on_step_end=blend, progress=progress)


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

"""The project's prompt tools on a stock diffusers Stable Diffusion pipeline (1.x, 2.x, SDXL).

    from diffusion.sampling.stock import load_pipeline
    pipe = load_pipeline("models/sd15", device="cuda")       # a local folder; no hub download
    out = pipe("a (red:1.5) car on a road", steps=30, guidance=7.5, attention_maps=True)
    source, edit = pipe.swap("a red car", "a blue car", edit_steps=0.6, local_blend=True)

`StockPipeline` holds a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (`pipe`)
and renders through that pipeline's own `__call__`, so with no controller and every weight 1 its
images are the stock pipeline's bit for bit (same generators, same scheduler). What it adds:

- per-word maps, attention-mode weights and a word swap's injected maps: the project's controllers
  on the UNet's cross-attention layers through `AttentionAdapter` (diffusion/model/
  diffusers_adapter.py: attention processors, nothing patched), at every resolution the UNet has
  and for as many tokens as its tokenizer gives; maps come at the latent resolution;
- embedding-mode weights and the faded context of `--weight-context fade`: the text states as
  `weighting.condition` computes them, passed as `prompt_embeds`;
- what changes between steps (a weight's window, the guidance cutoff, local blend on the latents):
  diffusers' `callback_on_step_end`, which may replace `latents` and `prompt_embeds` (and SDXL's
  `add_text_embeds`, `add_time_ids`);
- prompts, batches, seeds, swap plans and words: `PromptSampling`, shared with the project's
  `Pipeline`.

SDXL has two text encoders, and each token position reads both: its state is the two encoders'
hidden states of that token concatenated (768 + 1280 features), and the UNet's keys are made from
the concatenation. So a token's map is one map, and a weight acts on that position, in both
encoders' features at once: in attention mode on the one probability of that key; in embedding
mode each encoder's part of the state moves from the empty prompt's by the same weight (the
interpolation is per feature, so interpolating the concatenation is interpolating each). Words
are tied to positions by the first tokenizer's offsets; both tokenizers must split a prompt alike
(they do in SDXL: the same BPE vocabulary), else a one-line error. The pooled embedding (the second
encoder's projection of its end token, SDXL's `add_text_embeds`) is one vector for the whole
prompt, like the end token's state, which the causal encoder writes every word into: no weight
acts on it as a token, and with context "fade" the words weighted below 1 fade out of it as they
fade out of the other tokens' states, pooled(without them) + s (pooled - pooled(without them)), s
the smallest weight; with context "keep" it stays the prompt's.

Stock models were trained reading every token position (padding too), so no key is masked: an
embedding-mode weight of 0 leaves the position holding the empty prompt's state. `mixed_precision`
is an autocast around the whole call (text encoders, UNet and VAE), as diffusers' first examples
ran it, not of the UNet alone as in the project's pipeline.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from diffusion.control.controllers import step_in_window
from diffusion.control.prompts import delete_tokens
from diffusion.control.weighting import Weighting, condition
from diffusion.errors import UserError
from diffusion.model.diffusers_adapter import check_supported, controlled
from diffusion.model.text_encoder import RecentResults, quiet_transformers
from diffusion.precision import resolve_mixed_precision
from diffusion.sampling.pipeline import Pipeline, PromptSampling, as_generators, default_device
from diffusion.sampling.samplers import make_sampler, sampler_timesteps
from diffusion.sampling.settings import SamplingSettings

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

# The diffusers pipelines `StockPipeline` drives, by class name. Imported when a folder is loaded:
# importing them makes transformers log about its image processors (for the safety checker),
# which sample.py on this project's own model must not print.
STOCK_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


class StockTextEncoder:
    """A stock pipeline's prompt encoding (its own `encode_prompt`) read as the project's
    `TextEncoder` is read, `encode`, `offsets`, `token_ids`, so that `weighting.condition` and
    `swaps.plan_swaps` work on it unchanged. `pooled` gives SDXL's pooled embeddings."""

    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline):
        self.pipe = pipe
        self.xl = type(pipe).__name__ == "StableDiffusionXLPipeline"
        self.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        # one render encodes its prompts, the empty prompt and the prompts without a word
        self._remembered = RecentResults(4)

    def remember(self, calls: int) -> None:
        """Keep the last `calls` encodings (at least the few one render asks for again)."""
        self._remembered.resize(max(calls, 4))

    def _tokenize(self, prompts: list[str], tokenizer=None) -> dict:
        tokenizer = tokenizer or self.tokenizers[0]
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )

    def offsets(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, 2) each token's character span ((0, 0) for start, end and padding tokens)."""
        offsets = [self._tokenize(prompts, t)["offset_mapping"] for t in self.tokenizers]
        if any(o.shape != offsets[0].shape or not torch.equal(o, offsets[0]) for o in offsets[1:]):
            raise UserError(
                "the pipeline's two tokenizers split this prompt differently; per-word weights and maps need "
                "one token per position in both"
            )
        return offsets[0]

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """(B, T) the first tokenizer's token ids."""
        return self._tokenize(prompts)["input_ids"]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) the states the UNet reads, as the pipeline computes them (SDXL: both
        encoders' concatenated), and the key mask (B, T): all True, every position is read."""
        states, _ = self._encoded(prompts)
        return states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)

    def pooled(self, prompts: list[str]) -> torch.Tensor | None:
        """(B, P) SDXL's pooled embeddings (`add_text_embeds`); None for a pipeline without."""
        return self._encoded(prompts)[1]

    @torch.no_grad()
    def _encoded(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The states and pooled embeddings (None for SD), remembered per prompts and autocast
        (the editor renders in two precisions with one encoder)."""
        device = self.pipe.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        states, pooled = self._remembered.get((tuple(prompts), autocast), lambda: self._encode(prompts))
        return states.clone(), None if pooled is None else pooled.clone()

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.xl:
            states, _, pooled, _ = self.pipe.encode_prompt(
                list(prompts), device=self.pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return states, pooled
        states, _ = self.pipe.encode_prompt(list(prompts), self.pipe.device, 1, False)
        return states, None


def pooled_condition(
    encoder: StockTextEncoder, prompts: list[str], weights: torch.Tensor | None, weighting: Weighting
) -> torch.Tensor | None:
    """SDXL's pooled embeddings (B, P) under per-token `weights` (B, T) (module docstring): with
    context "fade", the words weighted below 1 fade out of it as out of the other tokens' states
    (`weighting.condition`); None for a pipeline without pooled embeddings."""
    pooled = encoder.pooled(prompts)
    if pooled is None or weights is None or weighting.context != "fade" or not bool((weights < 1).any()):
        return pooled
    down = weights < 1
    deleted = [delete_tokens(p, o, d) for p, o, d in zip(prompts, encoder.offsets(prompts), down.tolist())]
    without = encoder.pooled(deleted)
    scale = weights.masked_fill(~down, 1.0).amin(dim=1)[:, None].to(pooled.device, pooled.dtype)  # (B, 1)
    return without + scale * (pooled - without)


def stock_sampler(name: str, scheduler_config: dict):
    """Sampler `name` (samplers.SAMPLERS) on a stock pipeline's noise schedule. Without clipping x0
    (DPM++'s thresholding, DDPM's clip_sample): the range [-1, 1] they clip to is the pixels', and
    a latent model's x0 is latents."""
    scheduler = make_sampler(name, scheduler_config)
    clipping = {key: False for key in ("thresholding", "clip_sample") if scheduler.config.get(key)}
    return type(scheduler).from_config(scheduler.config, **clipping) if clipping else scheduler


class StockPipeline(PromptSampling):
    """A stock Stable Diffusion (1.x / 2.x / XL) pipeline with the project's prompt tools: weights,
    per-word maps, swaps (see the module docstring). Called as the project's `Pipeline` is:
    `__call__`, `generate`, `swap`; `pipe` is the diffusers pipeline itself."""

    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, mixed_precision: str = "auto"):
        if type(pipe).__name__ not in STOCK_PIPELINES:
            check_supported(getattr(pipe, "transformer", None) or pipe)
            raise UserError(
                f"{type(pipe).__name__} is not supported: the attention tools drive {' and '.join(STOCK_PIPELINES)}"
            )
        self.pipe = pipe
        self.unet = pipe.unet
        self.encoder = StockTextEncoder(pipe)
        self.adapter = controlled(pipe.unet)
        self.precision = mixed_precision

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, mixed_precision: str = "auto"
    ) -> StockPipeline:
        """Load a diffusers pipeline folder (model_index.json naming one of STOCK_PIPELINES), its
        weights from safetensors only; every problem a one-line UserError."""
        path = Path(path)
        index = diffusers_index(path) or {}
        name = index.get("_class_name")
        if isinstance(index.get("transformer"), list):
            check_supported(str(index["transformer"][-1]))  # SD3, Flux: one line
        if name not in STOCK_PIPELINES:
            raise UserError(
                f"'{path}' holds a {name or 'folder without a diffusers model_index.json'}; the attention tools "
                f"load {' and '.join(STOCK_PIPELINES)} folders"
            )
        resolve_mixed_precision(mixed_precision, torch.device("cpu"))  # an unknown setting fails before loading
        verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # our one-line error, not diffusers' log
        diffusers_logging.disable_progress_bar()
        try:
            with quiet_transformers():
                pipe = getattr(diffusers, name).from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot load the {name} in '{path}': {detail}") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
            if bars:
                diffusers_logging.enable_progress_bar()
        return cls(pipe.to(device if device is not None else default_device()), mixed_precision)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def scheduler_config(self) -> dict:
        """The model's noise schedule, which every sampler is built on."""
        return dict(self.pipe.scheduler.config)

    @property
    def map_size(self) -> int | tuple[int, int]:
        """The latents' side (or (height, width)): the resolution of the per-word maps and of a
        local blend's region, since it acts on the latents."""
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else tuple(size)

    def with_precision(self, mixed_precision: str) -> StockPipeline:
        """This pipeline (its modules shared) run in `mixed_precision`."""
        shared = copy.copy(self)
        shared.precision = mixed_precision
        return shared

    def convert_images(self, x: torch.Tensor, output_type: str):
        """`denoise`'s images, (B, 3, H, W) in [0, 1] as diffusers gives them, as `output_type`
        asks ("pil", "pt", "np"), through the pipeline's own image processor, so a PIL image is the
        stock pipeline's bit for bit."""
        x = x.float().cpu()
        if output_type == "pt":
            return x
        array = self.pipe.image_processor.pt_to_numpy(x)
        return array if output_type == "np" else self.pipe.image_processor.numpy_to_pil(array)

    @torch.no_grad()
    def denoise(
        self,
        prompts: list[str],
        generators,
        settings: SamplingSettings | None = None,
        attention_controller=None,
        token_weights: torch.Tensor | None = None,
        callback_on_step_end=None,
        progress: bool = False,
        **changes,
    ) -> torch.Tensor:
        """One image per prompt through the stock pipeline's `__call__`; (B, 3, H, W) in [0, 1].
        The arguments as `Pipeline.denoise`'s: plain prompts; a generator (or seed) per image, or
        one for all; settings with `changes`; a controller that sees every cross-attention call;
        per-token weights (B, T), acting as `settings.weighting` says; a callback after each step
        that may replace "latents"."""
        settings = (settings or SamplingSettings()).but(**changes)
        B, steps, weighting = len(prompts), settings.steps, settings.weighting
        # diffusers' rule: guidance only above 1, and never for a guidance-distilled UNet
        guided = settings.guidance > 1 and self.unet.config.time_cond_proj_dim is None

        def guided_at(step: int) -> bool:
            return guided and step_in_window(step, steps, (0.0, settings.guidance_cutoff))

        with self.autocast(self.device, settings.mixed_precision):
            states, pooled = self._text_states(prompts, token_weights, weighting, steps)

            def after_step(pipe, step: int, timestep, tensors: dict) -> dict:
                """Local blend (the caller's callback) on the latents; then what the next step
                reads, where it changes: the weights' window, and past the guidance cutoff the
                conditional rows alone."""
                if callback_on_step_end is not None:
                    tensors = {**tensors, **callback_on_step_end(pipe, step, timestep, tensors)}
                if step + 1 >= steps:
                    return tensors
                was, now = guided_at(step), guided_at(step + 1)
                if was and not now:
                    pipe._guidance_scale = 0.0  # as diffusers' SDCFGCutoffCallback turns guidance off
                    if "add_time_ids" in tensors:
                        tensors["add_time_ids"] = tensors["add_time_ids"][B:]
                for key, per_step in (("prompt_embeds", states), ("add_text_embeds", pooled)):
                    if per_step is None or (was == now and per_step(step + 1) is per_step(step)):
                        continue
                    conditional = per_step(step + 1)
                    tensors[key] = torch.cat([tensors[key][:B], conditional]) if now else conditional
                return tensors

            negative = settings.negative_prompt
            negatives = None if negative is None else negative if isinstance(negative, list) else [negative] * B
            if negatives is not None and len(negatives) != B:
                raise UserError(f"{len(negatives)} negative prompts for {B} prompts; pass one for all, or one each")
            keywords = {"prompt_embeds": states(0), "negative_prompt": negatives}
            inputs = ["latents", "prompt_embeds"]
            if pooled is not None:
                keywords["pooled_prompt_embeds"] = pooled(0)
                inputs += ["add_text_embeds", "add_time_ids"]
            scheduler = stock_sampler(settings.sampler, self.scheduler_config)
            if isinstance(scheduler, DPMSolverMultistepScheduler):  # as samplers.set_sampler_timesteps
                keywords["timesteps"] = sampler_timesteps(steps, scheduler.config.num_train_timesteps)
            else:
                keywords["num_inference_steps"] = steps
            self.pipe.set_progress_bar_config(disable=not progress, leave=False)
            with self._scheduler(scheduler), self.adapter.sampling(attention_controller, steps, guided, batch=B):
                images = self.pipe(
                    guidance_scale=settings.guidance if guided_at(0) else 1.0,
                    generator=as_generators(generators),
                    output_type="pt",
                    callback_on_step_end=after_step,
                    callback_on_step_end_tensor_inputs=inputs,
                    **keywords,
                ).images
        return images

    def _text_states(self, prompts: list[str], token_weights: torch.Tensor | None, weighting: Weighting, steps: int):
        """The prompts' states (B, T, D) and SDXL's pooled embeddings (B, P), each a function of
        the step (pooled: None for SD): under the weights inside their window, the plain ones (in
        embedding mode with the words at 0 still deleted) outside it, as `Pipeline.text_states`."""
        plain = self.encoder.encode(prompts)
        inside = condition(self.encoder, prompts, token_weights, weighting, encoded=plain)[0]
        inside_pooled = pooled_condition(self.encoder, prompts, token_weights, weighting)
        outside, outside_pooled = inside, inside_pooled
        if token_weights is not None and weighting.acts_within_window():
            late = weighting.outside_weights(token_weights)
            outside = condition(self.encoder, prompts, late, weighting, encoded=plain)[0]
            outside_pooled = pooled_condition(self.encoder, prompts, late, weighting)

        def per_step(inside: torch.Tensor | None, outside: torch.Tensor | None):
            if inside is None:
                return None
            return lambda step: inside if step_in_window(step, steps, weighting.window) else outside

        return per_step(inside, outside), per_step(inside_pooled, outside_pooled)

    @contextmanager
    def _scheduler(self, scheduler):
        """The stock pipeline with `scheduler` for one call; its own back after it."""
        own = self.pipe.scheduler
        self.pipe.scheduler = scheduler
        try:
            yield
        finally:
            self.pipe.scheduler = own


def diffusers_index(path: Path) -> dict | None:
    """A diffusers pipeline folder's model_index.json, or None where `path` holds none (or not a
    diffusers one: the project's own export names its class ["pipeline", "Pipeline"])."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("_class_name"), str) else None


def load_pipeline(
    path: str | Path, device: torch.device | str | None = None, mixed_precision: str = "auto"
) -> Pipeline | StockPipeline:
    """The pipeline of a model folder: this project's export (`Pipeline`) or a diffusers Stable
    Diffusion / SDXL folder (`StockPipeline`); any other diffusers pipeline (SD3, Flux) is a
    one-line UserError."""
    if diffusers_index(Path(path)) is not None:
        return StockPipeline.from_pretrained(path, device, mixed_precision)
    return Pipeline.from_pretrained(path, device=device, mixed_precision=mixed_precision)

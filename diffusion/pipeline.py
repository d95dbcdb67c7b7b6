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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler)
from PIL import Image
from tqdm.auto import tqdm

from .attention import AttentionController
from .errors import UserError
from .images import to_pil
from .text_encoder import TextEncoder
from .unet import UNet

FORMAT_VERSION = 1

# name -> (scheduler class, settings over the training scheduler's config)
SAMPLERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
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
    prompts: list[str]                 # the prompt of each image
    seeds: list[int]                   # the noise seed of each image
    settings: dict = field(default_factory=dict)  # sampler, steps, guidance, negative prompt


class Pipeline:
    def __init__(self, unet: UNet, text_encoder: TextEncoder, scheduler_config: dict,
                 device: torch.device | str | None = None):
        """unet: the denoiser; text_encoder: the frozen CLIP text encoder; scheduler_config: the
        training noise schedule (a DDPMScheduler config dict)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.unet = unet.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device)
        self.scheduler_config = dict(scheduler_config)

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None) -> "Pipeline":
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
        try:
            unet = UNet.from_pretrained(path / "unet")
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"cannot load '{path / 'unet'}': {str(error).splitlines()[0]}") from None
        options = index.get("text_encoder_options", {})
        text_encoder = TextEncoder.from_pretrained(str(path), **options)
        scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        return cls(unet, text_encoder, scheduler_config, device)

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
                                     "mask_eos": self.text_encoder.mask_eos},
        }
        (temporary / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(temporary, path)
        shutil.rmtree(old, ignore_errors=True)

    # ---- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.0,
                sampler: str = "dpm++", negative_prompt: str | None = None,
                attention_controller: AttentionController | None = None, progress: bool = False) -> torch.Tensor:
        """Sample one image per (prompt, seed) pair in one batch. Returns (B, 3, R, R) in [-1, 1].

        The noise of each image comes from its own generator seeded with its seed, so an image
        does not depend on what else is in the batch."""
        scheduler = make_sampler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        size = self.unet.config.sample_size
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(3, size, size, generator=g) for g in generators])
        x = noise.to(self.device) * scheduler.init_noise_sigma

        embeddings, key_mask = self.text_encoder.encode(prompts)
        use_guidance = guidance != 1.0
        if use_guidance:  # unconditional half first, conditional second
            negative, negative_mask = self.text_encoder.encode([negative_prompt or ""] * len(prompts))
            embeddings = torch.cat([negative, embeddings])
            key_mask = torch.cat([negative_mask, key_mask])
        dtype = next(self.unet.parameters()).dtype
        embeddings = embeddings.to(self.device, dtype)
        key_mask = key_mask.to(self.device)

        for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
            model_input = torch.cat([x, x]) if use_guidance else x
            model_input = scheduler.scale_model_input(model_input, t).to(dtype)
            prediction = self.unet(model_input, t, embeddings, key_mask,
                                   attention_controller=attention_controller, step=i).float()
            if use_guidance:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance * (conditional - unconditional)
            x = scheduler.step(prediction, t, x, generator=generators).prev_sample
        return x.clamp(-1, 1)

    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1, seed: int = 0,
                 steps: int = 20, guidance: float = 3.0, sampler: str = "dpm++",
                 negative_prompt: str | None = None, batch_size: int = 16,
                 attention_controller: AttentionController | None = None,
                 progress: bool = True) -> PipelineOutput:
        """Sample `num_images_per_prompt` images for each prompt; image i of a prompt uses noise
        seed `seed + i`, whatever the batch size. Returns PIL images with their prompts and seeds."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise UserError("no prompt given; pass at least one prompt string")
        check_sampling_args(steps, guidance, num_images_per_prompt, batch_size)
        make_sampler(sampler, self.scheduler_config)  # fail on an unknown name before any work
        jobs = [(p, seed + i) for p in prompts for i in range(num_images_per_prompt)]
        images = []
        batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
        for batch in tqdm(batches, desc="batches", disable=not progress or len(batches) == 1):
            x = self.denoise([p for p, _ in batch], [s for _, s in batch], steps, guidance, sampler,
                             negative_prompt, attention_controller, progress=progress)
            images.extend(to_pil(x))
        settings = {"sampler": sampler, "steps": steps, "guidance": guidance,
                    "negative_prompt": negative_prompt or ""}
        return PipelineOutput(images, [p for p, _ in jobs], [s for _, s in jobs], settings)

"""Lets diffusers load this model: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).
The class is tiny-t2i-diffusion's Pipeline (pip install -e . in its repository)."""

from diffusion.pipeline import Pipeline  # noqa: F401

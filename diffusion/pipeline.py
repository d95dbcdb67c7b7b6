"""Where `Pipeline` lived before the package had folders: model folders exported then carry a
pipeline.py that imports it from here (diffusers' DiffusionPipeline loads those through it)."""

from diffusion.sampling.pipeline import Pipeline  # noqa: F401

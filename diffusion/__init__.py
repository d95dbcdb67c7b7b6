"""A small text-to-image pixel diffusion model whose cross-attention can be read and edited.

    from diffusion import Pipeline
    images = Pipeline.from_pretrained("runs/shapes/model")("a red circle on the left").images

Names are imported lazily, so `diffusion.config` (used to check command lines) does not pull in
torch and diffusers.
"""

import importlib

_EXPORTS = {
    "AttentionController": "model.attention",
    "AttentionSite": "model.attention",
    "Config": "config",
    "load_config": "config",
    "Pipeline": "sampling.pipeline",
    "PipelineOutput": "sampling.pipeline",
    "UNet": "model.unet",
    "DiffusersUNet": "model.unet2d",
    "UserError": "errors",
    "Weighting": "control.weighting",
    # diffusers' DiffusionPipeline.from_pretrained finds how to load a component (["diffusion", "UNet"]
    # in model_index.json) by looking its base class up in the component's library: this one
    "ModelMixin": "model.unet",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)

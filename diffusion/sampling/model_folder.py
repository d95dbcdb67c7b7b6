"""An exported model folder: diffusers' pipeline layout, read back with one-line errors.

model/
  model_index.json     the components and their classes, format_version, text_encoder_options
  pipeline.py          one import, so diffusers' DiffusionPipeline.from_pretrained finds the class
  unet/ text_encoder/ tokenizer/ scheduler/    each component's config and safetensors weights
  config.yaml          the training config (evaluate.py reads the data section)
"""

import json
from pathlib import Path

from diffusion.errors import UserError

FORMAT_VERSION = 1

# The pipeline.py written beside model_index.json: how diffusers' DiffusionPipeline.from_pretrained
# finds this class (model_index.json's _class_name names the file and the class).
PIPELINE_FILE = '''"""Lets diffusers load this model: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).
The class is tiny-t2i-diffusion's Pipeline (pip install -e . in its repository)."""

from diffusion import Pipeline  # noqa: F401
'''


def check_index(path: Path) -> dict:
    """The model_index.json of an exported model folder; UserError naming what is wrong."""
    if not path.is_dir():
        raise UserError(f"model folder '{path}' not found; pass the folder train.py exported (e.g. runs/shapes/model)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(
            f"'{path}' is not a model folder: model_index.json is missing; "
            "pass the folder train.py exported (e.g. runs/shapes/model)"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{index_file}' is corrupt (not JSON); export the model again") from None
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"'{path}' was written by an incompatible version (format {version}, this code reads "
            f"{FORMAT_VERSION}); export it again with this version"
        )
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise UserError(f"model folder '{path}' is missing '{part}/'; export the model again")
    return index

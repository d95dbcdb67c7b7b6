"""Train the small shapes model that tests/assets/small-shapes holds (a few minutes on 2 cores).

    python tests/make_small_model.py

Tests that need a model which actually follows its prompts (e.g. "weight 0 on a colour word
lowers that colour's share of the image and keeps an object") use this one; the session's
4-step model in conftest.py is only good for plumbing. 16 px, one object per image, grounding
loss on, captions that leave a colour or a shape out now and then (so weight 0 has a prior).
"""

import shutil
import tempfile
from pathlib import Path

from diffusion.config import config_from_dict
from diffusion.training.loop import train

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "model": {
        "channels": [32, 64],
        "attention_resolutions": [16, 8],
        "attention_heads": 4,
        "position_embedding": False,
    },
    "data": {
        "resolution": 16,
        "num_samples": 5000,
        "max_objects": 1,
        "omit_colour": 0.35,
        "omit_shape": 0.15,
        "omit_from": 0.0,
    },
    "text": {
        "width": 64,
        "layers": 2,
        "hidden_layer": -3,
        "concat_token_embeddings": False,
        "steps": 150,
        "batch_size": 256,
        "vocab_size": 600,
        "max_length": 16,
    },
    "train": {
        "max_steps": 800,
        "batch_size": 64,
        "lr": 0.002,
        "warmup_steps": 50,
        "checkpoint_every": 800,
        "validate_every": 800,
        "grounding_weight": 0.01,
        "grounding_pixel_weight": 0.0,
        "grounding_resolutions": [16, 8],
        "validation_prompts": [
            "a red circle on the left",
            "a blue square on the right",
            "a green cross at the top",
            "a yellow triangle in the centre",
        ],
    },
}
TARGET = REPO / "tests" / "assets" / "small-shapes"


def main():
    with tempfile.TemporaryDirectory() as run:
        model = train(config_from_dict(SMALL), Path(run) / "run")
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(model, TARGET)
        shutil.copy(Path(run) / "run" / "samples" / "step-000800.png", TARGET.parent / "small-shapes-samples.png")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()

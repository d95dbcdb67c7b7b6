"""Export the EMA weights of a training checkpoint as a model folder, to evaluate a point of a run.

    python tools/export_checkpoint.py runs/shapes/model runs/shapes/checkpoints/step-000400 runs/shapes-step400/model

MODEL is the run's exported model (for the text encoder, scheduler and UNet config), CHECKPOINT a
`checkpoints/step-XXXXXX` folder of the same run, OUT the new model folder (with the run's
config.yaml, so evaluate.py reads its holdout pairs).
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion.cli import ArgumentParser
from diffusion.errors import UserError, exit_on_user_error
from diffusion.sampling.pipeline import Pipeline


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the run's model folder (e.g. runs/shapes/model)")
    parser.add_argument("checkpoint", help="a checkpoint folder of the same run")
    parser.add_argument("out", help="the model folder to write")
    args = parser.parse_args(argv)
    weights = Path(args.checkpoint) / "ema.safetensors"
    if not weights.is_file():
        raise UserError(f"'{weights}' not found; pass a checkpoints/step-XXXXXX folder")
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    ema = load_file(weights)
    names = [name for name, _ in pipe.unet.named_parameters()]
    if set(names) != set(ema):
        raise UserError(f"'{args.checkpoint}' does not hold the weights of '{args.model}'s UNet; same run?")
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            parameter.copy_(ema[name])
    pipe.save_pretrained(args.out)
    if (Path(args.model) / "config.yaml").is_file():
        shutil.copy(Path(args.model) / "config.yaml", Path(args.out) / "config.yaml")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Train the text-to-image model.

python train.py                                   # the default: configs/shapes.yaml, CPU-sized
python train.py --config configs/shapes-gpu.yaml --output-dir runs/gpu train.max_steps=20000
python train.py --output-dir runs/shapes --resume latest
accelerate launch --num_processes 4 train.py --config configs/shapes-gpu.yaml
"""

from pathlib import Path

from diffusion.cli import ArgumentParser, one_line_warnings, tune_malloc
from diffusion.config import load_config
from diffusion.errors import exit_on_user_error

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "shapes.yaml"


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Train a text-conditioned pixel diffusion model.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/shapes.yaml)")
    parser.add_argument(
        "--output-dir", help="where checkpoints, samples and the model go (default: runs/<config name>)"
    )
    parser.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=3000")
    args = parser.parse_args(argv)
    one_line_warnings()
    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)

    from diffusion.training.loop import train  # imported late: a bad argument fails without loading torch

    train(cfg, output_dir, resume=args.resume)


if __name__ == "__main__":
    tune_malloc()  # PyTorch on CPU: reuse freed blocks rather than fault fresh pages in (diffusion/cli.py)
    main()

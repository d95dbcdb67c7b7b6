"""How often does the default model put the prompted colour at the prompted position, on
colour-shape pairs it never saw in training?

    python bench/heldout_positions.py --model runs/shapes/model [--n 50] [--out runs/shapes/heldout.png]

Prompts: "a <colour> <shape> <position>" over the config's held-out pairs and the five
positions; one image each (seed = its index); checked with diffusion.evaluation.colour_at_position.
Also reports the same on pairs seen in training, for comparison. Writes a labelled grid.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.shapes import COLOURS, SHAPES  # noqa: E402
from diffusion.evaluation import colour_at_position, colour_labels, heldout_single_object_prompts  # noqa: E402
from diffusion.images import labelled_grid, save_png, to_pil  # noqa: E402
from diffusion.pipeline import DEFAULT_SAMPLER, Pipeline  # noqa: E402


def score(pipe, prompts, args):
    """One image per prompt, prompt k with noise seed args.seed + k (independent noise)."""
    images = []
    for start in range(0, len(prompts), 25):
        batch = prompts[start:start + 25]
        x = pipe.denoise([p for p, _, _ in batch], [args.seed + start + k for k in range(len(batch))],
                         steps=args.steps, guidance=args.guidance)
        images += to_pil(x)
    hits = [colour_at_position(np.asarray(img), c, pos) for img, (_, c, pos) in zip(images, prompts)]
    # the colour anywhere: its pixels cover at least 1% of the image
    present = [(colour_labels(np.asarray(img)) == list(COLOURS).index(c)).mean() >= 0.01
               for img, (_, c, _) in zip(images, prompts)]
    return images, hits, present


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", default=None, help="grid PNG (default: <model>/../heldout.png)")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    cfg = yaml.safe_load((Path(args.model) / "config.yaml").read_text())
    holdout = cfg["data"]["holdout"]
    seen = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in holdout]
    results = {}
    for name, pairs in (("held-out pairs", holdout), ("training pairs", seen)):
        prompts = heldout_single_object_prompts(pairs, args.n)
        images, hits, present = score(pipe, prompts, args)
        results[name] = (images, prompts, hits)
        print(f"{name}: colour at the prompted position in {sum(hits)}/{len(hits)} = {np.mean(hits):.2f}; "
              f"colour present anywhere in {sum(present)}/{len(present)} = {np.mean(present):.2f}")
    images, prompts, hits = results["held-out pairs"]
    labels = [f"{'ok' if h else 'MISS'}: {p}" for (p, _, _), h in zip(prompts, hits)]
    path = Path(args.out) if args.out else Path(args.model).parent / "heldout.png"
    save_png(labelled_grid(images, labels, columns=10), path,
             {"sampler": DEFAULT_SAMPLER, "steps": args.steps, "guidance": args.guidance, "seed": args.seed})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

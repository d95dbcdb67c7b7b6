"""Sample images from a trained model.

    python sample.py --model runs/shapes/model "a red circle on the left" -n 4 --out out/circle.png
    python sample.py --model runs/shapes/model --prompt-file prompts.txt --sampler ddim --steps 50

Writes a labelled grid at --out and each image beside it (<stem>-000.png, ...); the prompt, seed
and settings are stored in every PNG's text metadata.
"""
from pathlib import Path

from diffusion.cli import ArgumentParser, one_line_warnings
from diffusion.errors import UserError, exit_on_user_error

SAMPLER_NAMES = ("dpm++", "ddim", "ddpm", "euler")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompt-file '{args.prompt_file}': {getattr(error, 'strerror', None) or error}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError('no prompt given; pass a prompt such as "a red circle on the left" or --prompt-file')
    return prompts


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Sample images from a trained text-to-image model.")
    parser.add_argument("prompts", nargs="*", help="one or more prompts")
    parser.add_argument("--model", required=True, help="model folder written by train.py (e.g. runs/shapes/model)")
    parser.add_argument("--out", default="samples/grid.png", help="grid PNG path; images are written beside it")
    parser.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i of each prompt uses noise seed seed+i")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--sampler", default="dpm++", choices=SAMPLER_NAMES, help="default dpm++ (DPM-Solver++ 2M)")
    parser.add_argument("--negative-prompt", default=None, help="used instead of the empty prompt for guidance")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line")
    parser.add_argument("--batch-size", type=int, default=16, help="images denoised together (does not change them)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    args = parser.parse_args(argv)
    one_line_warnings()
    prompts = read_prompts(args)

    from diffusion.images import check_writable, labelled_grid, save_png
    from diffusion.pipeline import Pipeline, check_sampling_args

    check_sampling_args(args.steps, args.guidance, args.num_images, args.batch_size)
    out = Path(args.out)
    check_writable(out)
    pipeline = Pipeline.from_pretrained(args.model, device=args.device)
    result = pipeline(prompts, num_images_per_prompt=args.num_images, seed=args.seed, steps=args.steps,
                      guidance=args.guidance, sampler=args.sampler, negative_prompt=args.negative_prompt,
                      batch_size=args.batch_size)
    common = {**result.settings, "model": str(Path(args.model).resolve())}
    for i, (image, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds)):
        save_png(image, out.with_name(f"{out.stem}-{i:03d}.png"), {"prompt": prompt, "seed": seed, **common})
    grid = labelled_grid(result.images, [f"{p} (seed {s})" for p, s in zip(result.prompts, result.seeds)],
                         columns=args.num_images if args.num_images > 1 else min(len(prompts), 8))
    save_png(grid, out, {"prompts": "\n".join(prompts), "seed": args.seed, **common})
    print(f"wrote {out} and {len(result.images)} images beside it")


if __name__ == "__main__":
    main()

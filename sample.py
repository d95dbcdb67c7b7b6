"""Sample images from a trained model.

    python sample.py --model runs/shapes/model "a red circle on the left" -n 4 --out out/circle.png
    python sample.py --model runs/shapes/model --prompt-file prompts.txt --sampler ddim --steps 50

Writes each image beside --out as soon as it is made (<stem>-000.png, ...) and a labelled grid of
the first 64 at --out; the prompt, seed and settings are stored in every PNG's text metadata.

    python sample.py --model M "a (red:2) circle on the left" --attention maps/    # per-word maps
    python sample.py --model M "a red circle on the left" --edit "a red square on the left"

--model also takes a local diffusers Stable Diffusion or SDXL folder (model_index.json naming
StableDiffusionPipeline or StableDiffusionXLPipeline), with the same options:

    python sample.py --model models/sd15 "a (red:1.3) car on a road" --steps 30 --guidance 7.5 --attention maps/
"""

from pathlib import Path

from diffusion.cli import (
    SAMPLING_OPTIONS,
    ArgumentParser,
    add_model_options,
    add_sampling_options,
    check_device,
    one_line_warnings,
    sampling_settings,
    tune_malloc,
)
from diffusion.errors import UserError, exit_on_user_error

GRID_LIMIT = 64  # images shown in the grid; every image is written beside it
SEEDS = (-(2**63), 2**64 - 1)  # the seeds torch.Generator.manual_seed takes


def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(
                f"cannot read --prompt-file '{args.prompt_file}': {getattr(error, 'strerror', None) or error}"
            ) from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError('no prompt given; pass a prompt such as "a red circle on the left" or --prompt-file')
    return prompts


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Sample images from a trained text-to-image model.")
    parser.add_argument("prompts", nargs="*", help="one or more prompts")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line")
    parser.add_argument("--out", default="samples/grid.png", help="grid PNG path; images are written beside it")
    parser.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i of each prompt uses noise seed seed+i")
    parser.add_argument("--batch-size", type=int, default=16, help="images denoised together (does not change them)")
    parser.add_argument("--attention", metavar="OUT_DIR", help="write per-word attention panels and raw maps here")
    parser.add_argument(
        "--edit",
        metavar="PROMPT",
        help="Prompt-to-Prompt: draw this prompt from the same noise as the (single) prompt, keeping its layout",
    )
    add_model_options(parser)
    add_sampling_options(parser, list(SAMPLING_OPTIONS))
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    one_line_warnings()
    prompts = read_prompts(args)

    from diffusion.control.prompts import parse_prompt
    from diffusion.images import check_writable
    from diffusion.sampling.pipeline import check_counts
    from diffusion.sampling.stock import load_pipeline

    settings = sampling_settings(args)
    check_counts(args.num_images, args.batch_size)
    if not SEEDS[0] <= args.seed <= args.seed + args.num_images - 1 <= SEEDS[1]:
        raise UserError(
            f"--seed {args.seed} gives image i the seed {args.seed} + i, which must lie in [-2**63, 2**64 - 1] "
            f"for all {args.num_images} images"
        )
    check_device(args.device)
    for prompt in prompts + ([args.edit] if args.edit else []):
        parse_prompt(prompt)  # a malformed prompt fails before the model is loaded
    if args.edit and len(prompts) != 1:
        raise UserError(f"--edit takes exactly one source prompt, got {len(prompts)}")
    out = Path(args.out)
    check_writable(out)
    attention_dir = Path(args.attention) if args.attention else None
    if attention_dir:
        check_writable(attention_dir / "panel.png")
    maps = bool(attention_dir)
    if maps and args.attention_resolutions:
        from diffusion.sampling.pipeline import MapOptions

        maps = MapOptions(resolutions=args.attention_resolutions)
    pipeline = load_pipeline(args.model, device=args.device, mixed_precision=args.mixed_precision)
    common = {"model": str(Path(args.model).resolve())}
    if args.edit:
        batches = swap_batches(pipeline, prompts[0], args, maps, settings)
    else:
        outputs = pipeline.generate(
            prompts,
            settings,
            num_images_per_prompt=args.num_images,
            seed=args.seed,
            batch_size=args.batch_size,
            attention_maps=maps,
        )
        batches = ((output,) for output in outputs)
    write_outputs(batches, out, attention_dir, prompts, args, common)


def write_outputs(batches, out: Path, attention_dir: Path | None, prompts: list[str], args, common: dict) -> None:
    """Write each image as soon as it is made (and its maps, with --attention), then a grid of the
    first GRID_LIMIT; only the grid's images are kept. batches: tuples (output,), or (source
    output, edit output) with --edit."""
    from diffusion.images import labelled_grid, save_png, write_attention_maps

    names = ("source", "edit") if args.edit else ("",)
    grid, count, settings = [], 0, {}
    for results in batches:
        for name, result in zip(names, results):
            settings = {**result.settings, **common}
            stem = f"{out.stem}-{name}" if name else out.stem
            for i, (image, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds), start=count):
                save_png(image, out.with_name(f"{stem}-{i:03d}.png"), {"prompt": prompt, "seed": seed, **settings})
            if attention_dir:
                write_attention_maps(attention_dir, stem, result, settings, first=count)
        count += len(results[0].images)
        # in order; with --edit each source beside its edit, one pair per row
        for row in zip(*(zip(r.images, r.prompts, r.seeds) for r in results)):
            for image, prompt, seed in row:
                if len(grid) < GRID_LIMIT:
                    grid.append((image, f"{prompt} (seed {seed})"))
    columns = 2 if args.edit else args.num_images if args.num_images > 1 else min(len(prompts), 8)
    images, labels = zip(*grid)
    save_png(
        labelled_grid(list(images), list(labels), columns=min(columns, len(images))),
        out,
        {"prompts": "\n".join(prompts + ([args.edit] if args.edit else [])), "seed": args.seed, **settings},
    )
    total = count * len(names)
    shown = f"; the grid shows the first {len(grid)}" if len(grid) < total else ""
    print(
        f"wrote {out} and {total} images beside it{shown}"
        + (f"; attention maps in {attention_dir}" if attention_dir else "")
    )


def swap_batches(pipeline, source: str, args, maps, settings):
    """(source output, edit output) for args.num_images pairs, args.batch_size pairs at a time."""
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        yield pipeline.swap(
            source,
            args.edit,
            settings,
            num_images=count,
            seed=args.seed + start,
            attention_maps=maps,
            batch_size=count,
            progress=False,
        )


if __name__ == "__main__":
    tune_malloc()  # PyTorch on CPU: faster steps (diffusion/cli.py)
    main()

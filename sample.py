"""Sample images from a trained model.

    python sample.py --model runs/shapes/model "a red circle on the left" -n 4 --out out/circle.png
    python sample.py --model runs/shapes/model --prompt-file prompts.txt --sampler ddim --steps 50

Writes each image beside --out as soon as it is made (<stem>-000.png, ...) and a labelled grid of
the first 64 at --out; the prompt, seed and settings are stored in every PNG's text metadata.

    python sample.py --model M "a (red:2) circle on the left" --attention maps/    # per-word maps
    python sample.py --model M "a red circle on the left" --edit "a red square on the left"
"""

from pathlib import Path

from diffusion.cli import ArgumentParser, check_device, one_line_warnings, tune_malloc
from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_GUIDANCE_CUTOFF,
    DEFAULT_SAMPLER,
    KEEP_LAYOUT,
    MIXED_PRECISION,
    SAMPLER_NAMES,
    WEIGHT_CONTEXTS,
    WEIGHT_MODES,
)
from diffusion.errors import UserError, exit_on_user_error


def fraction_window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"expected a window like 0,0.5 (two fractions), got '{text}'") from None
    return start, end


def resolution_set(text: str) -> set[int]:
    try:
        return {int(v) for v in text.split(",")}
    except ValueError:
        raise UserError(f"expected feature-map sides like 16,8, got '{text}'") from None


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
    parser.add_argument("--model", required=True, help="model folder written by train.py (e.g. runs/shapes/model)")
    parser.add_argument("--out", default="samples/grid.png", help="grid PNG path; images are written beside it")
    parser.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i of each prompt uses noise seed seed+i")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument(
        "--guidance-cutoff",
        type=float,
        default=DEFAULT_GUIDANCE_CUTOFF,
        help="guidance acts in this first fraction of the steps; the rest denoise without the unconditional "
        f"half, at half the work (default {DEFAULT_GUIDANCE_CUTOFF:g}; 1: every step)",
    )
    parser.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        choices=SAMPLER_NAMES,
        help="euler (default), dpm++ (DPM-Solver++ 2M), ddim, ddpm",
    )
    parser.add_argument("--negative-prompt", default=None, help="used instead of the empty prompt for guidance")
    parser.add_argument("--prompt-file", help="a text file with one prompt per line")
    parser.add_argument("--batch-size", type=int, default=16, help="images denoised together (does not change them)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=MIXED_PRECISION,
        help="autocast of the UNet (default auto: bf16 where the device does it natively, else float32)",
    )
    parser.add_argument("--attention", metavar="OUT_DIR", help="write per-word attention panels and raw maps here")
    parser.add_argument(
        "--weight-mode",
        default=WEIGHT_MODES[0],
        choices=WEIGHT_MODES,
        help="how (word:w) weights act: scale cross-attention (default) or text embeddings",
    )
    parser.add_argument(
        "--weight-context",
        default=WEIGHT_CONTEXTS[0],
        choices=WEIGHT_CONTEXTS,
        help="fade (default): a word weighted below 1 also fades out of the other words' text "
        "states, where the causal CLIP wrote it; keep: leave them (plain Prompt-to-Prompt)",
    )
    parser.add_argument(
        "--weight-steps",
        default=None,
        type=fraction_window,
        help="window of steps (fractions start,end) where weights act (default 0,1 in attention mode, "
        "0,0.3 in embedding mode, where a word at 0 stays deleted after it)",
    )
    parser.add_argument(
        "--attention-resolutions",
        type=resolution_set,
        default=None,
        help="feature-map sides (e.g. 16,8) where weights, swaps and map recording act (default all)",
    )
    parser.add_argument(
        "--edit",
        metavar="PROMPT",
        help="Prompt-to-Prompt: draw this prompt from the same noise as the (single) prompt, keeping its layout",
    )
    parser.add_argument(
        "--edit-steps",
        type=float,
        default=DEFAULT_EDIT_STEPS,
        help=f"fraction of steps during which the source's maps are injected (default {DEFAULT_EDIT_STEPS:g})",
    )
    parser.add_argument(
        "--local-blend",
        action="store_true",
        help="with --edit: keep the source's pixels outside the changed words' maps (Prompt-to-Prompt's local blend)",
    )
    parser.add_argument(
        "--keep-layout",
        default="auto",
        choices=KEEP_LAYOUT,
        help="with --edit: the other words keep the source's maps at every step, so outlines stay (auto: on "
        "when only colour words change; when only size words change, the resized object is drawn anew and the "
        "rest kept; off for other swaps, whose new shape needs its outline free)",
    )
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    one_line_warnings()
    prompts = read_prompts(args)

    from diffusion.control.prompts import parse_prompt
    from diffusion.images import check_writable
    from diffusion.sampling.pipeline import Pipeline, Weighting, check_sampling_args

    check_sampling_args(args.steps, args.guidance, args.num_images, args.batch_size, args.guidance_cutoff)
    if not SEEDS[0] <= args.seed <= args.seed + args.num_images - 1 <= SEEDS[1]:
        raise UserError(
            f"--seed {args.seed} gives image i the seed {args.seed} + i, which must lie in [-2**63, 2**64 - 1] "
            f"for all {args.num_images} images"
        )
    check_device(args.device)
    weighting = Weighting(args.weight_mode, args.weight_steps, args.attention_resolutions, args.weight_context)
    weighting.check()
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
    pipeline = Pipeline.from_pretrained(args.model, device=args.device, mixed_precision=args.mixed_precision)
    common = {"model": str(Path(args.model).resolve())}
    if args.edit:
        batches = swap_batches(pipeline, prompts[0], args, maps, weighting)
    else:
        batches = (
            (result,)
            for result in pipeline.generate(
                prompts,
                num_images_per_prompt=args.num_images,
                seed=args.seed,
                steps=args.steps,
                guidance=args.guidance,
                guidance_cutoff=args.guidance_cutoff,
                sampler=args.sampler,
                negative_prompt=args.negative_prompt,
                batch_size=args.batch_size,
                attention_maps=maps,
                weighting=weighting,
            )
        )
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


def swap_batches(pipeline, source: str, args, maps, weighting):
    """(source output, edit output) for args.num_images pairs, args.batch_size pairs at a time."""
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        yield pipeline.swap(
            source,
            args.edit,
            num_images=count,
            seed=args.seed + start,
            edit_steps=args.edit_steps,
            steps=args.steps,
            guidance=args.guidance,
            guidance_cutoff=args.guidance_cutoff,
            sampler=args.sampler,
            negative_prompt=args.negative_prompt,
            attention_maps=maps,
            weighting=weighting,
            local_blend=args.local_blend,
            keep_layout=KEEP_LAYOUT[args.keep_layout],
            batch_size=count,
            progress=False,
        )


if __name__ == "__main__":
    tune_malloc()  # PyTorch on CPU: faster steps (diffusion/cli.py)
    main()

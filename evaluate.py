"""Measure a trained model: a shapes model's faithfulness, attention localisation, weight edits,
word swaps and samplers; or, with --data, a model trained on an image folder.

    python evaluate.py --model runs/shapes/model
    python evaluate.py --model runs/shapes/model --n 200 --n-edit 64 --n-swap 64 --swap-sweep
    python evaluate.py --model runs/shapes/model --parts edit,swap
    python evaluate.py --model runs/shapes/model --n 1000 --parts faithfulness --categories "single object"

Prints a table and writes the same numbers as JSON (--out, default <model>/../report.json), with
pictures beside it: example images, the weight-response and word-swap curves, and source | edit
pairs. What each number means: diffusion/evaluation/metrics.py and diffusion/evaluation/edits.py.

    python evaluate.py --model runs/emoji/model --data data/emoji --n 100

measures a model trained on an image folder without a detector (diffusion/evaluation/folder.py):
retrieval of each sample's nearest training image, the colour of captions naming one (and its
weight 0 and swaps), and the subject word's map against the sample's foreground; it writes the
report and a picture (<out stem>-examples.png: samples beside their nearest training images, and
colour edits). The shapes-only options (--parts, --n-edit, --n-swap, --n-samplers, --categories,
--swap-sweep) do not apply to it.
"""

import json
import math
from pathlib import Path

from diffusion import cli
from diffusion.cli import ArgumentParser, check_device, one_line_warnings, tune_malloc
from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_GUIDANCE_CUTOFF,
    DEFAULT_PARTS,
    DEFAULT_SAMPLER,
    EVALUATION_PARTS,
    WEIGHT_CONTEXTS,
    YAML_ERRORS,
)
from diffusion.errors import UserError, exit_on_user_error


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parts_list(text: str) -> tuple[str, ...]:
    parts = comma_list(text)
    unknown = [p for p in parts if p not in EVALUATION_PARTS]
    if unknown or not parts:
        raise UserError(f"unknown part(s) {', '.join(unknown) or text!r}; choose from {', '.join(EVALUATION_PARTS)}")
    return parts


# the options that count prompts or images: each at least 1, and each a keyword of `report.evaluate`
COUNTS = ("n", "n_edit", "n_swap", "n_samplers", "batch_size")

# evaluate.py's help texts of the sampling options it shares with sample.py (diffusion/cli.py)
SAMPLING_HELPS = {
    "--guidance": "classifier-free guidance scale of every sample (default 3.0, as sample.py)",
    "--guidance-cutoff": "guidance acts in this first fraction of the steps "
    f"(default {DEFAULT_GUIDANCE_CUTOFF:g}, as sample.py)",
    "--sampler": f"sampler of the faithfulness and edit parts, 20 steps (default {DEFAULT_SAMPLER}, as sample.py); "
    "the sampler sweep measures all four",
    "--weight-context": "how the edit part's weights treat the other words' text states (default "
    f"{WEIGHT_CONTEXTS[0]}, as sample.py's --weight-context)",
    "--edit-steps": "the swap's injection fraction the swap targets check "
    f"(default {DEFAULT_EDIT_STEPS:g}, as sample.py)",
    "--keep-layout": "word swaps: the other words keep the source's maps at every step (auto: for recolourings and "
    "resizings, as sample.py)",
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Evaluate a trained shapes model, or (--data) a model of an image folder.")
    cli.add_model_options(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="the image folder the model was trained on: measure it on its captions without the shapes detector "
        "(diffusion/evaluation/folder.py)",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=100,
        help="prompts per faithfulness category (default 100); with --data, the folder's captions sampled for "
        "retrieval and maps, and at most as many naming a colour",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="evaluation scene seed (default 1000003; must differ from the training data seed)",
    )
    parser.add_argument("--out", default=None, help="JSON report path (default: <model>/../report.json)")
    parser.add_argument("--n-edit", type=int, default=12, help="prompts of the weight-response sweep (default 12)")
    parser.add_argument("--n-swap", type=int, default=12, help="source prompts per word-swap kind (default 12)")
    parser.add_argument("--n-samplers", type=int, default=20, help="prompts of the sampler sweep (default 20)")
    cli.add_sampling_options(
        parser,
        ["--guidance", "--guidance-cutoff", "--sampler", "--weight-context", "--edit-steps"],
        SAMPLING_HELPS,
    )
    parser.add_argument(
        "--swap-sweep",
        action="store_true",
        help="also measure the swap at edit steps 0, 0.2, ..., 1 (a table and a plot)",
    )
    cli.add_sampling_options(parser, ["--local-blend", "--keep-layout"], SAMPLING_HELPS)
    parser.add_argument("--batch-size", type=int, default=50, help="images denoised together (does not change them)")
    parser.add_argument(
        "--parts",
        type=parts_list,
        default=DEFAULT_PARTS,
        help=f"comma list of {','.join(EVALUATION_PARTS)} (default {','.join(DEFAULT_PARTS)})",
    )
    parser.add_argument(
        "--categories",
        type=comma_list,
        default=None,
        help="comma list of the faithfulness categories to score (default all), e.g. "
        "--categories 'single object' --n 1000",
    )
    return parser


def model_data_config(config_file: Path) -> dict:
    """The data section of a model folder's config.yaml ({} without the file); a one-line
    UserError if it is not a config (not UTF-8, not YAML, not a mapping of sections)."""
    import yaml

    if not config_file.is_file():
        return {}
    problem = f"'{config_file}' is not a config"
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{problem} (not UTF-8 text); export the model again") from None
    except YAML_ERRORS:
        raise UserError(f"{problem} (not valid YAML); export the model again") from None
    data = config.get("data", {}) if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise UserError(f"{problem} (expected a mapping of sections, data among them); export the model again")
    return data


# the options that only the shapes evaluation reads; --data refuses them when they are not the default
SHAPES_ONLY = ("parts", "n_edit", "n_swap", "n_samplers", "categories", "swap_sweep")


def check_arguments(args, parser: ArgumentParser) -> dict[str, int]:
    """The counts of COUNTS by name, after checking them and the other numbers (UserError)."""
    counts = {name: getattr(args, name) for name in COUNTS}
    for name, count in counts.items():
        if count < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {count}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.seed is not None and not 0 <= args.seed <= 2**63 - 1:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.data is not None:
        if not args.data or not Path(args.data).is_dir():
            raise UserError(f"--data {args.data!r} is not a folder; pass the image folder the model was trained on")
        given = [name for name in SHAPES_ONLY if getattr(args, name) != parser.get_default(name)]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserError(
                f"{options} measure{'s' if len(given) == 1 else ''} shapes models; with --data the folder "
                "evaluation takes --n, --seed, --batch-size and the sampling options"
            )
    return counts


def check_data_kind(model: Path, data: dict, folder: str | None) -> None:
    """Without --data, a model trained on anything but shapes is refused, naming --data (UserError)."""
    kind = data.get("kind", "shapes")
    if folder is None and kind != "shapes":
        path = data.get("path")
        hint = f" (it was trained on {path})" if isinstance(path, str) and path else ""
        raise UserError(
            f"'{model}' was trained on data.kind={kind}, which the shapes evaluation cannot measure; "
            f"pass --data FOLDER, the image folder it was trained on{hint}"
        )


@exit_on_user_error
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    one_line_warnings()
    counts = check_arguments(args, parser)
    check_device(args.device)

    from diffusion.evaluation.metrics import EVAL_SEED
    from diffusion.images import check_writable
    from diffusion.sampling.pipeline import Pipeline

    settings = cli.sampling_settings(args)
    model = Path(args.model)
    out = Path(args.out) if args.out else model.parent / "report.json"
    data = model_data_config(model / "config.yaml")
    check_data_kind(model, data, args.data)
    check_writable(out)
    pipe = Pipeline.from_pretrained(model, device=args.device, mixed_precision=args.mixed_precision)
    seed = EVAL_SEED if args.seed is None else args.seed
    if args.data is not None:
        written = evaluate_folder(pipe, settings, args, seed, model, out)
    else:
        written = evaluate_shapes(pipe, settings, data, args, seed, counts, model, out)
    print("wrote " + ", ".join(str(p) for p in written))


def evaluate_shapes(pipe, settings, data: dict, args, seed: int, counts: dict, model: Path, out: Path) -> list[Path]:
    """The shapes evaluation: print its table, write the report and its pictures; returns their paths."""
    from diffusion.evaluation.report import evaluate, format_report

    result = evaluate(
        pipe,
        settings,
        seed=seed,
        holdout=data.get("holdout", []),
        training_seed=data.get("seed", 0),
        parts=args.parts,
        swap_sweep=args.swap_sweep,
        categories=args.categories,
        **counts,
    )
    report = result.report
    report["model"] = str(model.resolve())
    print(format_report(report))
    return write_outputs(result, out)


def evaluate_folder(pipe, settings, args, seed: int, model: Path, out: Path) -> list[Path]:
    """The folder evaluation (diffusion/evaluation/folder.py) of --data: print its table, write
    the report and its picture; returns their paths."""
    from diffusion.evaluation.folder import evaluate_folder as measure
    from diffusion.evaluation.folder import folder_picture, format_folder_report
    from diffusion.images import save_png

    result = measure(pipe, args.data, settings, n=args.n, seed=seed, batch_size=args.batch_size)
    report = result.report
    report["model"] = str(model.resolve())
    print(format_folder_report(report))
    write_report(report, out)
    picture = save_png(folder_picture(result), out.with_name(f"{out.stem}-examples.png"), {"model": report["model"]})
    return [out, picture]


def write_report(report: dict, out: Path) -> None:
    """The report as JSON at `out`: written whole, then moved into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(out)


def write_outputs(result, out: Path) -> list[Path]:
    """The report at `out` (written whole, then moved into place) and its pictures beside it:
    the faithfulness examples, the weight-response and word-swap curves, source | edit pairs.
    Returns the paths written."""
    from diffusion.evaluation.report import edit_plot, swap_plot, swap_strip
    from diffusion.images import labelled_grid, save_png

    report = result.report
    write_report(report, out)
    written = [out]
    metadata = {"model": report["model"]}
    pictures = {}
    if result.examples:
        images, labels = zip(*result.examples)
        pictures["examples"] = labelled_grid(list(images), list(labels), columns=8)
    if "edit" in report:
        pictures["edit"] = edit_plot(report["edit"])
    if "swap" in report:
        pictures["swap"] = swap_plot(report["swap"])
        pictures["swap-strip"] = swap_strip(result.swap_examples)
    for name, picture in pictures.items():
        written.append(save_png(picture, out.with_name(f"{out.stem}-{name}.png"), metadata))
    return written


if __name__ == "__main__":
    tune_malloc()  # PyTorch on CPU: faster steps (diffusion/cli.py)
    main()

"""Faithfulness and localisation against training length, from evaluate.py reports.

    python tools/training_curve.py --out docs/training-curve.png \
        25600=runs/curve-400/report.json 51200=runs/shapes/report.json 102400=runs/curve-1600/report.json

    python tools/training_curve.py --ymin 0.85 --mark "55500=15 min at 74 images/s" --out docs/training-length.png \
        25600=runs/st800/report.json+runs/st800/single-1000.json ...   (README: "Training length")

Each argument is IMAGES=REPORT: the number of training images the model saw and its report.json;
REPORT+REPORT... merges several reports of one model, the later ones' scores taking precedence
(e.g. all categories at n = 200, then `evaluate.py --n 1000 --categories "single object"`).
Prints a markdown table (one row per model, one column per target) and draws one line chart
with a line per target metric against the training images (log scale), each target marked at the
right edge; --ymin zooms in (values below it sit on the floor, marked by a hollow dot), --mark
draws a labelled vertical line (a time budget). It answers "would more training reach the
targets, and how much more?".
"""

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from diffusion.cli import ArgumentParser
from diffusion.errors import UserError, exit_on_user_error
from diffusion.evaluation.metrics import TARGETS
from diffusion.evaluation.report import report_value
from diffusion.images import font, save_png

COLOURS = [
    (220, 50, 50),
    (240, 150, 30),
    (200, 180, 0),
    (40, 160, 60),
    (40, 120, 220),
    (120, 60, 200),
    (200, 60, 160),
    (90, 90, 90),
    (0, 160, 160),
    (150, 100, 50),
]


def merge(base: dict, later: dict) -> dict:
    """`base` with `later`'s values in its place, section by section (nested dicts merged)."""
    out = dict(base)
    for key, value in later.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict) and "score" not in value
            else value
        )
    return out


def load(points: list[str]) -> list[tuple[int, dict]]:
    out = []
    for point in points:
        images, sep, paths = point.partition("=")
        if not sep or not images.isdigit() or int(images) < 1 or not paths:
            raise UserError(f"'{point}' is not IMAGES=REPORT (e.g. 51200=runs/shapes/report.json)")
        report = {}
        for path in paths.split("+"):
            try:
                report = merge(report, json.loads(Path(path).read_text()))
            except (OSError, ValueError) as error:
                raise UserError(f"cannot read report '{path}': {error}") from None
        out.append((int(images), report))
    return sorted(out, key=lambda p: p[0])


def table(points: list[tuple[int, dict]], keys: list[str]) -> str:
    short = [k.split("/")[-1] for k in keys]
    lines = ["| training images | " + " | ".join(short) + " |", "|---" * (len(keys) + 1) + "|"]
    lines.append("| target | " + " | ".join(f"{TARGETS[k]:g}" for k in keys) + " |")
    for images, report in points:
        values = [report_value(report, k) for k in keys]
        lines.append(f"| {images:,} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def chart(
    points: list[tuple[int, dict]],
    keys: list[str],
    width: int = 760,
    height: int = 340,
    ymin: float = 0.0,
    marks: list[tuple[int, str]] = (),
) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    label_font = font(11)
    left, right, top, bottom = 40, 230, 20, height - 34
    lo, hi = math.log2(points[0][0]), math.log2(points[-1][0])
    span = max(hi - lo, 1e-9)

    def xy(images, value):
        x = left + (width - right - left) * ((math.log2(images) - lo) / span if hi > lo else 0.5)
        return x, bottom - (bottom - top) * (max(value, ymin) - ymin) / (1 - ymin)

    draw.rectangle([left, top, width - right, bottom], outline=(160, 160, 160))
    for v in sorted({ymin, (ymin + 1) / 2, 1.0}):
        draw.text((8, xy(points[0][0], v)[1] - 6), f"{v:g}", fill="black", font=label_font)
    for images, label in marks:
        if not points[0][0] <= images <= points[-1][0]:
            continue  # outside the measured range
        x, _ = xy(images, ymin)
        for y in range(top, bottom, 8):
            draw.line([x, y, x, min(y + 4, bottom)], fill=(90, 90, 90))
        draw.text((x + 4, bottom - 15), label, fill=(60, 60, 60), font=label_font)
    for images, _ in points:
        x, _ = xy(images, 0)
        draw.text((x - 16, bottom + 4), f"{images // 1000}k", fill="black", font=label_font)
    draw.text(
        (left, height - 14),
        "training images (log scale); ticks at the right edge: targets",
        fill="black",
        font=label_font,
    )
    for k, key in enumerate(keys):
        colour = COLOURS[k % len(COLOURS)]
        values = [(images, v) for images, report in points if (v := report_value(report, key)) is not None]
        line = [xy(images, v) for images, v in values]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for (x, y), (_, v) in zip(line, values):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="white" if v < ymin else colour, outline=colour)
        if TARGETS[key] >= ymin:  # a target below the axis has no tick
            _, ty = xy(points[-1][0], TARGETS[key])
            draw.line([width - right, ty, width - right + 10, ty], fill=colour, width=3)
        draw.line([width - right + 20, top + 6 + 16 * k, width - right + 36, top + 6 + 16 * k], fill=colour, width=3)
        draw.text(
            (width - right + 40, top + 16 * k),
            key.replace("faithfulness/", "").replace("localisation/", ""),
            fill="black",
            font=label_font,
        )
    return image


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("points", nargs="+", help="IMAGES=REPORT pairs (training images seen, report.json)")
    parser.add_argument("--out", default="training-curve.png", help="chart PNG path (default training-curve.png)")
    parser.add_argument("--ymin", type=float, default=0.0, help="bottom of the value axis (default 0)")
    parser.add_argument(
        "--mark",
        action="append",
        default=[],
        metavar="IMAGES=LABEL",
        help="a labelled vertical line, e.g. '51200=15 min at 74 images/s' (repeatable)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.ymin < 1:
        raise UserError(f"--ymin must be in [0, 1), got {args.ymin}")
    marks = []
    for mark in args.mark:
        images, sep, label = mark.partition("=")
        if not sep or not images.isdigit() or int(images) < 1:
            raise UserError(f"--mark '{mark}' is not IMAGES=LABEL (e.g. '51200=15 min at 74 images/s')")
        marks.append((int(images), label))
    points = load(args.points)
    keys = [k for k in TARGETS if any(report_value(r, k) is not None for _, r in points)]
    print(table(points, keys))
    print(f"wrote {save_png(chart(points, keys, ymin=args.ymin, marks=marks), args.out)}")


if __name__ == "__main__":
    main()

"""Write docs/results.md, and the results table of README.md, from the measurements themselves.

    python tools/results.py

Reads docs/report.json (`evaluate.py --model runs/shapes/model --n 200 --n-edit 64 --n-swap 64
--swap-sweep --out docs/report.json`), docs/unet2d/ (the same for the model of
configs/shapes-unet2d.yaml with its config.yaml, and bench/bench_training.py of both models: "On a
diffusers UNet"), the bench outputs in docs/bench/ (each bench's --json) and docs/what-we-tried.md
(the one hand-written part: what was tried, what it did, kept or not), so that no number is copied
by hand. README.md's table sits between the two RESULTS markers.
Where they exist, also the reports of tools/seeds.py (docs/seeds/<tag>/seed-K.json: "Training
seeds") and docs/seeds/curve.json ([{"images", "seed", "report": path from docs/}]: "Training images").
"""

import json
import re
from pathlib import Path

from seeds import load_reports, summarise, summary_table  # tools/seeds.py: this script's folder is on sys.path

from diffusion.config import load_config
from diffusion.evaluation.edits import SWAP_MEASURES
from diffusion.evaluation.report import fmt

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = DOCS.parent / "README.md"
MARKERS = ("<!-- RESULTS: written by tools/results.py -->", "<!-- /RESULTS -->")


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]


def machine(benches: dict) -> str:
    training = benches.get("training")
    if not training:
        return "the machine is not recorded (run bench/bench_training.py --json docs/bench/training.json)"
    return (
        f"{training.get('cpu', 'a CPU')}, {training['threads']} threads: the default's UNet trains at "
        f"{training['images/s']:.0f} images/s there (bench/bench_training.py)"
    )


def faithfulness_rows(report: dict) -> list[list]:
    targets = report["targets"]
    rows = []
    for category, value in report.get("faithfulness", {}).items():
        target = targets.get(f"faithfulness/{category}", {})
        rows.append([category, value and value["score"], value and value["n"], target.get("target"), target.get("met")])
    return rows


def edit_section(report: dict, pictures: str = "report") -> list[str]:
    """The weight table of `report`; pictures: its PNGs' names less "-edit.png", from docs/."""
    edit = report["edit"]
    lines = [f"### Weights ({edit['n']} one-object prompts; drawn = one clean object)", ""]
    header = ["word", "mode", "weight", "drawn", "present", "named, of drawn", "area", "attention share", "grain"]
    keys = ["drawn", "present", "named when drawn", "area", "mass", "grain"]
    rows = [
        [word, "word deleted", "-", *(base.get(key, "-") for key in keys)] for word, base in edit["deleted"].items()
    ]
    rows += [[r["word"], r["mode"], r["weight"], *(r.get(key) for key in keys)] for r in edit["rows"]]
    lines += table(header, rows)
    lines += ["", f"![weight response]({pictures}-edit.png)", ""]
    return lines


def swap_section(report: dict, pictures: str = "report") -> list[str]:
    """The word-swap table of `report`; pictures: its PNGs' names less "-swap.png", from docs/."""
    swap = report["swap"]
    measures = SWAP_MEASURES
    lines = [
        f"### Word swaps ({swap['n']} source prompts per kind; rates over the pairs whose source draws "
        f"its objects{'; local blend' if swap.get('local_blend') else ''}; keep layout "
        f"{swap.get('keep_layout', 'off')})",
        "",
    ]
    rows = [
        [kind, steps, rates["scored"], *[rates[m] for m in measures]]
        for kind, values in swap["kinds"].items()
        for steps, rates in values["by_steps"].items()
    ]
    lines += table(["kind", "edit steps", "scored", *measures], rows)
    lines += [
        "",
        f"![swap rates]({pictures}-swap.png)",
        "",
        f"![source and edit]({pictures}-swap-strip.png)",
        "",
    ]
    return lines


def bench_section(benches: dict) -> list[str]:
    lines = []
    if "training" in benches:
        t = benches["training"]
        lines += [
            "### Training speed (bench/bench_training.py)",
            "",
            f"- matmul peak: bf16 {t['bf16 peak GFLOP/s']:.0f} GFLOP/s, float32 {t['float32 peak GFLOP/s']:.0f}",
            f"- UNet training step: {t['images/s']:.0f} images/s, {t['GFLOP per image']:.2f} GFLOP per image, "
            f"{t['step GFLOP/s']:.0f} GFLOP/s = {t['share of the bf16 peak']:.0%} of the bf16 peak",
            f"- small CLIP step: float32 {t['clip float32 s/step']:.3f} s, bf16 {t['clip bf16 s/step']:.3f} s",
            "",
        ]
    if "sampling" in benches:
        keys = ["latency ms", "latency with maps ms", "images/s at 16", "images/s at 50"]
        lines += ["### Sampling speed (bench/bench_sampling.py)", ""]
        lines += table(
            ["code", *keys], [[name, *[values[k] for k in keys]] for name, values in benches["sampling"].items()]
        )
        lines += [""]
    if "memory" in benches:
        lines += ["### Memory against the work (bench/bench_memory.py)", ""]
        rows = [
            [command, n, values["peak MiB"], values["seconds"]]
            for command, runs in benches["memory"].items()
            for n, values in runs.items()
        ]
        lines += table(["command", "n", "peak MiB", "seconds"], rows) + [""]
    if "editor" in benches:
        e = benches["editor"]
        lines += [
            "### The editor (bench/bench_editor.py)",
            "",
            "- one update (1 image, 20 steps, guidance as sample.py's, every word's map at every step, "
            f"{e['precision']}, "
            f"{'compiled' if e['compiled'] else 'uncompiled'}): median {e['update median ms']:.0f} ms, "
            f"p90 {e['update p90 ms']:.0f} ms on {e['threads']} threads"
            + (
                f"; uncompiled (`--no-compile`, timed in turn with it): "
                f"median {e['uncompiled update median ms']:.0f} ms, "
                f"p90 {e['uncompiled update p90 ms']:.0f} ms"
                if e.get("compiled")
                else ""
            ),
            *(
                [
                    "- compiled renders timed at start-up to choose the precision: "
                    + ", ".join(f"{p} {ms} ms" for p, ms in e["compiled render ms by precision"].items())
                ]
                if e.get("compiled render ms by precision")
                else []
            ),
            f"- start-up: model loaded, precision timed and warm in {e['start-up s']:.1f} s"
            + ("" if e.get("compile s") is None else f"; compiling took {e['compile s']:.0f} s with an empty cache")
            + (
                ""
                if e["page answers s"] is None
                else f"; `python app.py` answers after {e['page answers s']:.1f} s"
                + (" with the compiled code cached" if e.get("compiled") else "")
            ),
            "",
        ]
    if "image_folder" in benches:
        folder = benches["image_folder"]
        lines += [f"### Image folders (bench/bench_image_folder.py, {folder['steps']} steps of batch 32 at 64 px)", ""]
        rows = [
            [r["images"], r["path"], r["store"], r["peak_rss_mib"], r["workers_peak_rss_mib"], r["images_per_s"]]
            for r in folder["results"]
        ]
        lines += table(["images", "data path", "text states", "peak MiB", "largest worker MiB", "images/s"], rows)
        lines += [""]
    return lines


def reliability_section(benches: dict) -> list[str]:
    """Fuzz cases and tracebacks per property, the faults injected and what survived
    (bench/bench_reliability.py), and the editor under load (bench/bench_editor_load.py)."""
    lines = []
    if "reliability" in benches:
        r = benches["reliability"]
        lines += fuzz_lines(r) + fault_lines(r["faults"])
        security = r["security"]
        lines += [
            "",
            f"Loading: {security['tests'] - security['failed']} of {security['tests']} security tests pass "
            "(safetensors and JSON only, no torch.load or pickle in the package; tests/test_load_security.py).",
            "",
        ]
    if "editor_load" in benches:
        lines += editor_load_lines(benches["editor_load"])
    return lines


def fuzz_lines(bench: dict) -> list[str]:
    """The fuzzing of bench/bench_reliability.py: cases and tracebacks per property."""
    fuzz = bench["fuzz"]
    lines = [
        f"### Fuzzing (bench/bench_reliability.py: hypothesis, the same cases on every run; {bench['seconds']} s)",
        "",
        f"{fuzz['cases']} cases over {len(fuzz['properties'])} properties, **{fuzz['tracebacks']} "
        f"tracebacks**; {fuzz['tests'] - fuzz['tests_failed']} of {fuzz['tests']} fuzz tests "
        "(properties and the regressions they found) pass.",
        "",
    ]
    return lines + table(
        ["property", "cases", "tracebacks"], [[p["property"], p["cases"], p["failed"]] for p in fuzz["properties"]]
    )


def fault_lines(faults: list[dict]) -> list[str]:
    """The injected faults of bench/bench_reliability.py, a row per test (its variants together)."""
    survived = sum(f["outcome"] == "passed" for f in faults)
    lines = [
        "",
        f"### Injected faults: the last good state survived {survived} of {len(faults)}",
        "",
        "Each a test on the tiny model (tests/test_faults.py and the corrupt-file tests of "
        "tests/test_training.py and tests/test_embedding_store.py).",
        "",
    ]
    groups: dict[tuple, list] = {}  # a test's variants (its parameters) in one row
    for fault in faults:
        groups.setdefault((fault["file"], fault["fault"]), []).append((fault["variant"], fault["outcome"] == "passed"))
    rows = [
        [
            file.removeprefix("tests/"),
            name,
            ", ".join(v for v, _ in variants if v) or "-",
            f"{sum(ok for _, ok in variants)} of {len(variants)}",
        ]
        for (file, name), variants in groups.items()
    ]
    return lines + table(["test file", "fault, and what must survive it", "variants", "passed"], rows)


LOAD_COLUMNS = {  # the editor-load table: header -> the cell of a round
    "clients x renders": lambda r: f"{r['clients']} x {r['renders per client']}",
    "answered": lambda r: f"{r['answered']} of {r['requests']}",
    "errors": lambda r: r["errors"] + r["download errors"],
    "p50 s": lambda r: f"{r['p50 s']:.1f}",
    "p95 s": lambda r: f"{r['p95 s']:.1f}",
    "renders/s": lambda r: f"{r['renders/s']:.2f}",
    "queue order": lambda r: "kept" if r["queue order kept"] else f"{r['order inversions']} inversions",
    "server MiB after": lambda r: f"{r['rss after MiB']:.0f}",
}


def editor_load_lines(e: dict) -> list[str]:
    """The editor under load (bench/bench_editor_load.py): a row per round of clients, then
    its memory, the malformed calls, where it listens and the files it refused."""
    settings = e["parameters"]
    lines = [
        f"### The editor under load (bench/bench_editor_load.py, model {e['model']})",
        "",
        f"`app.py {settings['app.py']}`, {settings['steps']} {settings['sampler']} steps, one image a "
        f"render; {e['machine']}. Each client asks for its renders one after another and fetches "
        f"each one's downloads; queue order: {e['queue order checked']}.",
        "",
    ]
    lines += table(list(LOAD_COLUMNS), [[cell(r) for cell in LOAD_COLUMNS.values()] for r in e["rounds"]])
    calls = e["malformed"]["calls"]
    answered = sum(c["outcome"] in ("error", "error message", "refused") for c in calls)
    files = e["files"]["refused"]
    return lines + [
        "",
        f"Server memory {e['rss start MiB']:.0f} MiB at start, {e['rss end MiB']:.0f} MiB at the end: it "
        "keeps the last render of the 32 newest tabs (`app.py --sessions`), so it levels off. "
        f"Malformed calls (wrong types, a 100 kB prompt, weights of 1e30, NaN): {answered} of {len(calls)} "
        f"answered with an error, {sum(c['app.py traceback'] for c in calls)} tracebacks, a render served "
        f"after them: {'yes' if e['malformed']['renders afterwards'] else 'no'}. Listens on "
        f"{', '.join(e['binding']['listening'])} only: {'yes' if e['binding']['loopback only'] else 'no'}; "
        f"{sum(files.values())} of {len(files)} requests for files it did not write refused.",
        "",
    ]


def prior_lines(reports: dict[int, dict]) -> list[str]:
    """Where the text names no colour, per seed: the colour-deleted prompts' clean objects, the
    colours of each palette prompt's clean objects over its seeds, and the clean unconditional samples."""
    rows = []
    for seed, report in reports.items():
        prior = report.get("prior")
        if prior:
            palette = "; ".join(
                f"{p['prompt']}: " + (", ".join(f"{c} {k}" for c, k in p["colours"].items() if k) or "none")
                for p in prior["palette"]
            )
            rows.append([seed, prior["n"], prior["colour deleted drawn"], prior["unconditional clean"], palette])
    if not rows:
        return []
    header = ["seed", "n", "colour deleted: one clean object", "unconditional: all clean", "clean objects per colour"]
    seeds = reports[rows[0][0]]["prior"]["palette seeds"]
    return (
        [f"Where the text names no colour (palette: each prompt over {seeds} noise seeds):", ""]
        + table(header, rows)
        + [""]
    )


def seed_sections(docs: Path) -> list[str]:
    """ "Training seeds" and "Training images", from what tools/seeds.py wrote under docs/seeds
    (nothing where it wrote nothing): the targets over training seeds, so that one lucky or unlucky
    run is not read as the config's result."""
    folder = docs / "seeds"
    tags = sorted({path.parent.name for path in folder.glob("*/seed-*.json")}, key=lambda tag: (tag != "default", tag))
    lines = []
    if tags:
        lines += [
            "## Training seeds",
            "",
            "Each tag's settings trained at several `train.seed`s and each model evaluated (`python tools/seeds.py`; "
            "docs/seeds/<tag>/seed-K.json). Worst: the least value over the seeds (the greatest for a target "
            "that is at most or no more than a goal); a goal that differs between seeds is given as a range.",
            "",
        ]
        for tag in tags:
            reports = load_reports(folder / tag)
            lines += [f"### {tag}", ""]
            if tag == "default":
                cfg = load_config(None, [])
                train, text = cfg.train, cfg.text
                lines += [
                    f"The default config (configs/shapes.yaml): {train.max_steps:,} steps of {train.batch_size}, "
                    f"{train.max_steps * train.batch_size:,} UNet images; the small CLIP {text.steps} steps of "
                    f"{text.batch_size}, {text.steps * text.batch_size:,} image-caption pairs.",
                    "",
                ]
            lines += summary_table(summarise(reports)) + [""] + prior_lines(reports)
    curve = folder / "curve.json"
    if curve.is_file():
        by_images = {}
        for point in json.loads(curve.read_text()):
            path = docs / point["report"]
            if not path.is_file():  # a point not measured yet
                continue
            merged = load_reports(path.parent).get(point["seed"]) if path.name == f"seed-{point['seed']}.json" else None
            by_images.setdefault(point["images"], {})[point["seed"]] = merged or json.loads(path.read_text())
        summaries = {images: summarise(by_images[images]) for images in sorted(by_images)}
        names = list(dict.fromkeys(name for summary in summaries.values() for name in summary))
        rows = []
        for name in names:
            cells = []
            for summary in summaries.values():
                t = summary.get(name)
                n = t and sum(v is not None for v in t["values"].values())
                cells.append(f"{fmt(t['worst'])} ({n} seed{'s' * (n != 1)})" if n else "-")
            rows.append([name, *cells])
        lines += [
            "## Training images",
            "",
            "Each target's worst value over the training seeds (and how many seeds measured it) against the "
            "number of training images the model saw (docs/seeds/curve.json).",
            "",
        ]
        lines += table(["target", *[f"{images:,} images" for images in summaries]], rows) + [""]
    return lines


def folder_curve(folder: Path) -> tuple[list[int], list[dict]]:
    """The `evaluate.py --data` reports in `folder`, report-<images>.json, each named by the UNet
    images its model had trained on: (those image counts, the reports), in order of images."""
    curve = sorted(folder.glob("report-*.json"), key=lambda f: int(f.stem.split("-")[1]))
    return [int(f.stem.split("-")[1]) for f in curve], [json.loads(f.read_text()) for f in curve]


def curve_table(images: list[int], points: list[dict], views_of: int | None = None) -> list[str]:
    """Each target of the last report against the image counts (and, given the folder's size
    `views_of`, how many times each image was seen)."""
    report = points[-1]
    header = [f"{n:,} images" + (f" ({n // views_of} views)" if views_of else "") for n in images]
    return table(
        ["target", *header, "goal", "met"],
        [
            [key, *[p["targets"][key]["value"] for p in points], t["target"], t["met"]]
            for key, t in report["targets"].items()
        ],
    )


def folder_section(docs: Path) -> list[str]:
    """The emoji set (`evaluate.py --data`): docs/emoji/report-<images>.json, one per checkpoint of
    the run configs/emoji.yaml makes, named by the UNet images it had trained on; the last is the
    exported model's. Then the same recipe on 100 of the names (docs/emoji/subset-100/), where
    there is such a curve. Nothing when none has been measured."""
    images, points = folder_curve(docs / "emoji")
    if not points:
        return []
    report = points[-1]
    lines = [
        "## Real images: the emoji set",
        "",
        f"`configs/emoji.yaml`: {images[-1]:,} UNet images; `evaluate.py --data` on {report['images']} "
        f"images ({report['captions']} captions), seed {report['seed']}, {report['sampler']} sampler, guidance "
        f"{report['guidance']:g}; feature space: {report['feature']}.",
        "",
    ]
    lines += curve_table(images, points) + [""]
    for part in ("retrieval", "maps", "colour", "colour swap", "weight 0", "reference"):
        values = report.get(part, {})
        shown = ", ".join(f"{k} {fmt(v)}" for k, v in values.items() if not isinstance(v, (dict, list)))
        lines.append(f"- {part}: {shown}")
    picture = f"emoji/report-{images[-1]}-examples.png"
    lines += ["", f"![emoji samples beside their nearest training images]({picture})", ""]
    images, points = folder_curve(docs / "emoji" / "subset-100")
    if points:
        subset = points[-1]
        lines += [
            "### The same recipe on 100 of the names: how many views of each image it needs",
            "",
            f"`configs/emoji.yaml` on a folder of 100 names drawn at random ({subset['images']} images, each "
            "name in both styles; the text encoder the full set's run trained), `evaluate.py --data` on that "
            f"folder (retrieval among its {subset['images']} images, chance top-1 "
            f"{fmt(subset['retrieval']['chance top-1'])}; colour n = {subset['colour']['n']}). Views: the "
            "times each image was seen; the full set's 96,000 images are 25 views.",
            "",
            *curve_table(images, points, views_of=subset["images"]),
            "",
            f"- retrieval at {images[-1]:,}: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in subset["retrieval"].items() if k != "n"),
            "",
        ]
    return lines


def merged(reports: list[dict]) -> dict:
    """One report from evaluate.py runs of one model over different --parts: each part from the
    run that measured it, the targets of all, the seconds added up."""
    report = {key: value for part in reports for key, value in part.items()}
    report["targets"] = {key: value for part in reports for key, value in part["targets"].items()}
    report["seconds"] = sum(part["seconds"] for part in reports)
    return report


def unet2d_section(docs: Path, default: dict) -> list[str]:
    """The default recipe on a diffusers UNet2DConditionModel (configs/shapes-unet2d.yaml), its
    controllers reached through the attention adapter, beside the default: docs/unet2d/report*.json
    (evaluate.py, one run or several over different --parts) with the run's config.yaml, the
    default's report and, where tools/seeds.py measured the default at the same number of training
    images (docs/seeds/images-<images>), its mean over the seeds; both models' training speed timed
    alike (docs/unet2d/bench-unet.json, bench-unet2d.json: bench/bench_training.py). Nothing when it
    has not been measured."""
    folder = docs / "unet2d"
    parts = [json.loads(f.read_text()) for f in sorted(folder.glob("report*.json"))]
    if not parts:
        return []
    report = merged(parts)
    trained = folder / "config.yaml"  # the resolved config of the run (its model folder's)
    cfg = load_config(trained if trained.is_file() else docs.parent / "configs" / "shapes-unet2d.yaml")
    images = cfg.train.max_steps * cfg.train.batch_size
    lines = [
        "## On a diffusers UNet (model.kind unet2d)",
        "",
        f"`configs/shapes-unet2d.yaml`: the default recipe on a diffusers `UNet2DConditionModel` of widths "
        f"{cfg.model.channels} (the default's UNet: {load_config(None).model.channels}), {images:,} training "
        f"images; the recorder, weights, swaps and grounding loss reach its cross-attention through "
        f"diffusion/model/diffusers_adapter.py. Evaluated as the default's report, at n = {report['n']} "
        f"prompts per category (the default's: {default['n']}), {report['sampler']} 20 steps, guidance "
        f"{report['guidance']:g}, {report['mixed_precision']}, {report['seconds']:.0f} s; the weight and swap "
        "tables give their own n.",
        "",
    ]
    speed = [json.loads(f.read_text()) for kind in ("unet", "unet2d") if (f := folder / f"bench-{kind}.json").is_file()]
    if speed:
        lines += [
            "Training speed, both timed the same way (bench/bench_training.py, "
            f"{speed[0]['threads']} thread of {speed[0]['cpu']}, the default's batch of 32): "
            + ", ".join(f"{t['model.kind']} {t['images/s']:.0f} images/s" for t in speed)
            + ".",
            "",
        ]
    same_images = docs / "seeds" / f"images-{images}"
    baseline = summarise(load_reports(same_images)) if list(same_images.glob("seed-*.json")) else {}
    recipe = load_config(None).train  # the default's report is of the default config
    header = [
        "target",
        f"default ({recipe.max_steps * recipe.batch_size:,} images)",
        *([f"default, {images:,} images (mean of seeds)"] * bool(baseline)),
    ]
    header += ["unet2d", "goal", "unet2d met"]
    rows = []
    for key in dict.fromkeys([*default["targets"], *report["targets"]]):
        a, b = default["targets"].get(key, {}), report["targets"].get(key, {})
        same = [baseline[key]["mean"] if key in baseline else "-"] if baseline else []
        rows.append(
            [key, a.get("value", "-"), *same, b.get("value", "-"), b.get("target", a.get("target")), b.get("met", "-")]
        )
    met = [t["met"] for t in report["targets"].values() if t["met"] is not None]
    lines += [f"**unet2d: {sum(met)} of {len(met)} measured targets met.**", ""]
    lines += table(header, rows) + ["", "### Faithfulness (unet2d)", ""]
    lines += table(["category", "score", "n", "target", "met"], faithfulness_rows(report))
    lines += ["", "### Attention localisation (unet2d)", ""]
    for where, values in report.get("localisation", {}).items():
        lines.append(f"- {where} images: " + ", ".join(f"{k} {fmt(v)}" for k, v in values.items()))
    lines += [""]
    if "edit" in report:
        lines += edit_section(report, "unet2d/report-edits")  # evaluate.py --parts edit,swap --out report-edits.json
    if "swap" in report:
        lines += swap_section(report, "unet2d/report-edits")
    return lines


def results(report: dict, benches: dict, tried: str, seeds: list[str] = ()) -> str:
    lines = [
        "# Results",
        "",
        "Written by `python tools/results.py` from docs/report.json and docs/bench/; do not edit by hand.",
        "",
        f"Measured on {machine(benches)}. Evaluation: n = {report['n']} prompts per category, seed "
        f"{report['seed']}, {report['sampler']} 20 steps, guidance {report['guidance']:g} in the first "
        f"{report.get('guidance_cutoff', 1.0):g} of them, mixed precision "
        f"{report['mixed_precision']}, {report['seconds']:.0f} s.",
        "",
    ]
    met = [t["met"] for t in report["targets"].values() if t["met"] is not None]
    lines += [f"**{sum(met)} of {len(met)} measured targets met.**", "", "## Targets", ""]
    lines += table(
        ["target", "value", "goal", "met"],
        [[key, t["value"], t["target"], t["met"]] for key, t in report["targets"].items()],
    )
    lines += ["", *seeds, "## Faithfulness", ""]
    lines += table(["category", "score", "n", "target", "met"], faithfulness_rows(report))
    lines += ["", "![examples](report-examples.png)", "", "## Attention localisation", ""]
    for where, values in report.get("localisation", {}).items():
        lines.append(f"- {where} images: " + ", ".join(f"{k} {fmt(v)}" for k, v in values.items()))
    lines += ["", "## Edits", ""]
    if "edit" in report:
        lines += edit_section(report)
    if "swap" in report:
        lines += swap_section(report)
    if "samplers" in report:
        sweep = report["samplers"]
        lines += [
            "## Samplers",
            "",
            f"Reference: {sweep['reference']['sampler']} {sweep['reference']['steps']} steps, "
            f"{sweep['reference']['score']:.3f} (n = {sweep['n']}).",
            "",
        ]
        steps = list(next(iter(sweep["scores"].values())))
        lines += table(
            ["sampler", *[f"{s} steps" for s in steps]],
            [[name, *[scores[s] for s in steps]] for name, scores in sweep["scores"].items()],
        ) + [""]
    lines += folder_section(DOCS)
    lines += unet2d_section(DOCS, report)
    lines += ["## Speed and memory", ""] + bench_section(benches)
    reliability = reliability_section(benches)
    if reliability:
        lines += ["## Reliability", "", *reliability]
    lines += ["## What we tried", "", tried.strip(), ""]
    return "\n".join(lines)


def readme_table(report: dict, benches: dict) -> str:
    """The short table for README.md: the targets, grouped."""
    targets = report["targets"]
    met = [t["met"] for t in targets.values() if t["met"] is not None]
    rows = [[category, score, target, ok] for category, score, _, target, ok in faithfulness_rows(report)]
    lines = table(["faithfulness", "score", "target", "met"], rows)
    edit = [t for key, t in targets.items() if key.startswith("edit/")]
    swap = [t for key, t in targets.items() if key.startswith("swap/")]
    measured = [t for t in edit if t["met"] is not None]
    unmeasured = f" ({len(edit) - len(measured)} not measurable)" if len(measured) < len(edit) else ""
    lines += [
        "",
        f"Weight contract: {sum(bool(t['met']) for t in measured)} of {len(measured)} measured clauses met"
        f"{unmeasured}; word swaps: "
        f"{sum(bool(t['met']) for t in swap)} of {len(swap)}; in all {sum(met)} of {len(met)} measured targets "
        f"([docs/results.md](docs/results.md)). Measured on {machine(benches)}.",
    ]
    return "\n".join(lines)


def main() -> None:
    report = json.loads((DOCS / "report.json").read_text())
    benches = {path.stem: json.loads(path.read_text()) for path in sorted((DOCS / "bench").glob("*.json"))}
    tried = (DOCS / "what-we-tried.md").read_text()
    (DOCS / "results.md").write_text(results(report, benches, tried, seed_sections(DOCS)))
    readme = README.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"error: README.md has no {start} ... {end} section; add the two markers where the table goes")
    README.write_text(pattern.sub(lambda _: f"{start}\n{readme_table(report, benches)}\n{end}", readme))
    print(f"wrote {DOCS / 'results.md'} and the table of {README}")


if __name__ == "__main__":
    main()

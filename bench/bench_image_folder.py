"""Peak memory and speed of training on image folders of growing size: memory should stay flat.

    python bench/bench_image_folder.py [--sizes 1000,10000,100000] [--steps 200] [--json F]
    python bench/bench_image_folder.py --sizes 1000,10000 --compare-with /tmp/old   # and the old in-memory path

Folders of 64 px shapes (`ShapesDataset(resolution=64)`, the default mix; sample i is a pure
function of i, so the first N of the largest set are the N-image set) are written once under
`runs/bench_image_folder/`: one `images/` folder of PNGs, rendered by several processes, and a
`folder-N/` per size with `metadata.jsonl` and a link to the images. The text encoder is a local,
untrained tiny CLIP (`text-encoder/`: width 64, 2 layers, 40 tokens; its tokens' states plus
token embeddings are 40 x 128 float32, 20 KiB per caption), loaded through `text.pretrained` like
any CLIP folder, so the measurement is of the data path, not of training a CLIP. The text states
go to `runs/bench_image_folder/embeddings/`: a rerun reads them instead of writing them.

Each size trains `--steps` steps of a small UNet (channels 32/64/128, attention at 16 px, batch
32, data.workers as configured: 2 by default) in a fresh process, run the way train.py runs (malloc
kept on the heap, `cli.tune_malloc`), which reports its own peak resident memory (`getrusage` ru_maxrss of
RUSAGE_SELF, and of RUSAGE_CHILDREN: the largest DataLoader worker), its images/s over
`Trainer.run` (the validation grid and checkpoint at the end included, both tiny here) and its
start-up time (the image check, the text states, the model). `--compare-with DIR` runs the same
on another checkout of the package (e.g. `git archive <commit> | tar -x -C /tmp/old`, before
the streaming data path: every image and text state held in memory). A CPU shared with other
jobs makes images/s noisy; the memory figures are not affected.
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "runs" / "bench_image_folder"
# where the text-state store lives in a checkout (its newer config keys come with it), by layout
STORE_FILES = ("embedding_store.py", "data/text_states.py")
RESOLUTION = 64
TOKENS = 40
CHUNK = 1000  # images per rendering task


def shapes(count: int):
    """The bench's shapes set: the default mix at 64 px."""
    import dataclasses

    from diffusion.config import Config
    from diffusion.data.datasets import build_dataset

    return build_dataset(dataclasses.replace(Config().data, resolution=RESOLUTION, num_samples=count))


def write_chunk(bounds: tuple[int, int]) -> list[str]:
    """Write images start..stop-1 that are missing (through a temporary name); their captions."""
    from PIL import Image

    from diffusion.data.shapes import render_scene

    start, stop = bounds
    dataset = shapes(stop)
    captions = []
    for i in range(start, stop):
        scene = dataset.scene(i)
        path = BENCH_DIR / "images" / f"{i:06d}.png"
        if not path.exists():
            temporary = path.with_name(f".{path.name}.tmp")
            Image.fromarray(render_scene(scene, RESOLUTION)[0]).save(temporary, format="PNG")
            os.replace(temporary, path)
        captions.append(scene.caption)
    return captions


def make_folders(sizes: list[int], processes: int) -> dict[int, Path]:
    """folder-N/ (metadata.jsonl + images link) for every size, rendering what is missing."""
    folders = {size: BENCH_DIR / f"folder-{size}" for size in sizes}
    missing = [size for size, folder in folders.items() if not (folder / "metadata.jsonl").is_file()]
    if missing:
        (BENCH_DIR / "images").mkdir(parents=True, exist_ok=True)
        chunks = [(start, min(start + CHUNK, max(missing))) for start in range(0, max(missing), CHUNK)]
        begin = time.time()
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            captions = [caption for chunk in pool.imap(write_chunk, chunks) for caption in chunk]
        print(
            f"rendered {max(missing)} images with {processes} processes in {time.time() - begin:.0f} s", file=sys.stderr
        )
        for size in missing:
            folder = folders[size]
            folder.mkdir(exist_ok=True)
            if not (folder / "images").exists():
                (folder / "images").symlink_to(Path("..") / "images")
            temporary = folder / ".metadata.jsonl.tmp"
            temporary.write_text(
                "".join(
                    json.dumps({"file_name": f"images/{i:06d}.png", "text": captions[i]}) + "\n" for i in range(size)
                )
            )
            os.replace(temporary, folder / "metadata.jsonl")  # last: marks the folder complete
    return folders


def make_text_encoder() -> Path:
    """A tiny untrained CLIP text encoder in text-encoder/ (tokenizer fitted to 2,000 captions)."""
    folder = BENCH_DIR / "text-encoder"
    if not (folder / "text_encoder").is_dir():
        import torch
        from transformers import CLIPTextModel

        from diffusion.model.text_encoder import TextEncoder
        from diffusion.training.clip import clip_text_config, fit_tokenizer

        tokenizer = fit_tokenizer(shapes(2000).captions(), vocab_size=1024, model_max_length=TOKENS)
        torch.manual_seed(0)
        model = CLIPTextModel(clip_text_config(tokenizer, 64, 2, 4))
        TextEncoder(tokenizer, model).save_pretrained(folder)
    return folder


def bench_config(folder: Path, steps: int, new_keys: bool) -> dict:
    """The small config trained on `folder`; `new_keys`: the code knows data.embedding_cache."""
    data = {"kind": "imagefolder", "path": str(folder), "resolution": RESOLUTION}
    if new_keys:
        data["embedding_cache"] = str(BENCH_DIR / "embeddings")
    return {
        "model": {"channels": [32, 64, 128], "attention_resolutions": [16], "attention_heads": 4},
        "text": {"pretrained": str(BENCH_DIR / "text-encoder")},
        "data": data,
        "train": {
            "max_steps": steps,
            "batch_size": 32,
            "warmup_steps": 0,
            "checkpoint_every": steps,
            "validate_every": steps,
            "keep_checkpoints": 1,
            "log_every": steps,
            "validation_steps": 2,
            "validation_prompts": ["a red circle on the left"],
            "grounding_weight": 0,
            "grounding_pixel_weight": 0,
            "timestep_bias_multiplier": 1.0,
        },
    }


def child(code: str, config_file: str, output_dir: str) -> None:
    """Train one config with the package at `code`; print a RESULT line of JSON."""
    sys.path.insert(0, code)
    from diffusion.cli import tune_malloc

    tune_malloc()
    begin = time.time()
    try:
        from diffusion.training import loop as training
    except ImportError:  # --compare-with a checkout from before the package had folders
        from diffusion import training
    from diffusion.config import config_from_dict

    cfg = config_from_dict(json.loads(Path(config_file).read_text()))
    timing = {}
    run = training.Trainer.run

    def timed_run(trainer):
        timing["start"] = time.time()
        run(trainer)
        timing["run_s"] = time.time() - timing["start"]

    training.Trainer.run = timed_run
    training.train(cfg, output_dir)
    images = cfg.train.max_steps * cfg.train.batch_size
    print(
        "RESULT "
        + json.dumps(
            {
                "startup_s": timing["start"] - begin,
                "images_per_s": images / timing["run_s"],
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "workers": getattr(cfg.data, "workers", 0),
            }
        )
    )


def measure(code: Path, folder: Path, steps: int, label: str) -> dict:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as scratch:
        config_file = Path(scratch) / "config.json"
        config_file.write_text(
            json.dumps(
                bench_config(folder, steps, new_keys=any((code / "diffusion" / f).is_file() for f in STORE_FILES))
            )
        )
        env = {**os.environ, "PYTHONPATH": str(code)}
        command = [sys.executable, __file__, "--child", str(code), str(config_file), str(Path(scratch) / "run")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code, check=False)
        shutil.rmtree(Path(scratch) / "run", ignore_errors=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        sys.exit(f"{label} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    store = next(
        (line.split(",")[-1].split()[0] for line in result.stdout.splitlines() if line.startswith("text embeddings:")),
        "in memory",
    )
    return {"path": label, "store": store, **json.loads(lines[-1][len("RESULT ") :])}


def machine() -> str:
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="folder sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="training steps per size")
    parser.add_argument("--compare-with", help="another checkout of the package to run on the same folders")
    parser.add_argument("--compare-sizes", default="1000,10000", help="the sizes to run --compare-with on")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="processes rendering the images")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    folders = make_folders(sizes, args.processes)
    make_text_encoder()

    runs = [(ROOT, "streaming", size) for size in sizes]
    if args.compare_with:
        runs += [
            (Path(args.compare_with).resolve(), f"old: {args.compare_with}", int(size))
            for size in args.compare_sizes.split(",")
            if int(size) in folders
        ]
    results = []
    for code, label, size in runs:
        begin = time.time()
        results.append({"images": size, **measure(code, folders[size], args.steps, label)})
        print(f"{label}, {size} images: {time.time() - begin:.0f} s", file=sys.stderr)

    print(f"{machine()}; {args.steps} steps of batch 32 at {RESOLUTION} px per run")
    print("| images | data path | text states | peak RSS (MiB) | largest worker (MiB) | images/s | start-up (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        worker = f"{r['workers_peak_rss_mib']:.0f}" if r["workers_peak_rss_mib"] else "-"
        print(
            f"| {r['images']:,} | {r['path']} | {r['store']} | {r['peak_rss_mib']:.0f} | {worker} | "
            f"{r['images_per_s']:.1f} | {r['startup_s']:.0f} |"
        )
    streaming = [r for r in results if r["path"] == "streaming"]
    if len(streaming) > 1:
        low, high = streaming[0], streaming[-1]
        print(
            f"streaming peak RSS, {high['images']:,} vs {low['images']:,} images: "
            f"{high['peak_rss_mib'] - low['peak_rss_mib']:+.0f} MiB "
            f"({high['peak_rss_mib'] / low['peak_rss_mib']:.3f}x)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "steps": args.steps, "results": results}, indent=2)
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()

"""Sampling speed: images per second at batch 16 and 50, and the latency of one image.

    python bench/bench_sampling.py --model runs/shapes/model
    python bench/bench_sampling.py --model runs/shapes/model --baseline /tmp/old   # side by side with another checkout

Each measurement runs `Pipeline.__call__` as sample.py does (Euler, 20 steps, guidance 3, the
default mixed precision) in a fresh process, on this code and, with --baseline, on the package of
another checkout (e.g. `git archive <commit> | tar -x -C /tmp/old`), taking turns so that a busy
neighbour hurts both alike; the best of --rounds is kept. It also checks that both give the same
images bit for bit. Prints a table and, with --json, writes it.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
import numpy as np, torch
import diffusion.cli
if hasattr(diffusion.cli, "tune_malloc"):  # as the command lines set malloc up
    diffusion.cli.tune_malloc()
from diffusion.sampling.pipeline import Pipeline
model, repeats = sys.argv[1], int(sys.argv[2])
pipe = Pipeline.from_pretrained(model, device="cpu")
prompt = "a red circle on the left"
for _ in range(2):  # oneDNN builds its kernels on the first calls
    pipe(prompt, progress=False)
    pipe([prompt], num_images_per_prompt=16, batch_size=16, steps=2, progress=False)
latency, maps = [], []
for i in range(repeats):
    start = time.perf_counter()
    pipe(prompt, seed=i, progress=False)
    latency.append(time.perf_counter() - start)
    start = time.perf_counter()
    pipe(prompt, seed=i, attention_maps=True, progress=False)
    maps.append(time.perf_counter() - start)
rates = {}
for batch in (16, 50):
    start = time.perf_counter()
    pipe([prompt], num_images_per_prompt=batch, batch_size=batch, progress=False)
    rates[batch] = batch / (time.perf_counter() - start)
images = pipe(["a red circle on the left", "a blue square above a green cross"], num_images_per_prompt=3, seed=3,
              progress=False).images
print(json.dumps({"latency ms": 1000 * statistics.median(latency),
                  "latency with maps ms": 1000 * statistics.median(maps),
                  "images/s at 16": rates[16], "images/s at 50": rates[50],
                  "pixels": np.stack([np.asarray(im) for im in images]).tolist()}))
"""


# What older checkouts' command lines set malloc up with, by starting themselves again.
OLD_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


def measure(code: Path, model: str, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    if "relaunch_with_huge_pages" in (code / "diffusion" / "cli.py").read_text():
        env["GLIBC_TUNABLES"] = OLD_TUNABLES
    result = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(repeats)], capture_output=True, text=True, env=env, cwd=code
    )
    if result.returncode:
        sys.exit(f"error: the measurement on {code} failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/shapes/model", help="an exported model folder")
    parser.add_argument("--baseline", help="another checkout to measure beside this one")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per checkout, taking turns; the best is kept")
    parser.add_argument("--repeats", type=int, default=10, help="single images timed per round (the median is kept)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = str(Path(args.model).resolve())
    codes = {"this checkout": Path(__file__).resolve().parents[1]}
    if args.baseline:
        codes["baseline"] = Path(args.baseline).resolve()
    runs = {name: [] for name in codes}
    for _ in range(args.rounds):
        for name, code in codes.items():
            runs[name].append(measure(code, model, args.repeats))
    table = {}
    for name, results in runs.items():
        table[name] = {
            key: (min if "ms" in key else max)(r[key] for r in results)
            for key in ("latency ms", "latency with maps ms", "images/s at 16", "images/s at 50")
        }
        table[name]["pixels"] = results[0]["pixels"]
    keys = ("latency ms", "latency with maps ms", "images/s at 16", "images/s at 50")
    print(f"{'':<16}" + "".join(f"{key:>22}" for key in keys))
    for name, values in table.items():
        print(f"{name:<16}" + "".join(f"{values[key]:>22.1f}" for key in keys))
    if args.baseline:
        new, old = table["this checkout"], table["baseline"]
        print(
            f"{'speed-up':<16}"
            + "".join(f"{(old[key] / new[key] if 'ms' in key else new[key] / old[key]):>21.2f}x" for key in keys)
        )
        print(f"the same images bit for bit: {'yes' if new['pixels'] == old['pixels'] else 'no'}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {name: {k: v for k, v in values.items() if k != "pixels"} for name, values in table.items()}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

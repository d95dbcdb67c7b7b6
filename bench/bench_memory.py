"""Peak memory against the amount of work: sample.py -n and evaluate.py --n.

    python bench/bench_memory.py --model runs/shapes/model
    python bench/bench_memory.py --model runs/shapes/model --sample-n 100,10000 --evaluate-n 100,2000

Runs each command in its own process and reads its peak resident memory (ru_maxrss of the
child). sample.py runs with --steps 2: memory does not depend on the steps, and 10,000 images
then take a minute; evaluate.py scores the single-object category only (--parts faithfulness
--categories "single object"). Memory flat in the work means the largest run within 1.5x of the
smallest.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Runs a command and prints its peak resident memory: a fresh parent per command, so that
# RUSAGE_CHILDREN holds that command alone.
WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def peak_kib(command: list[str]) -> tuple[int, float]:
    """Run `command` from the repository root; its peak resident memory (KiB) and seconds."""
    start = time.time()
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {' '.join(command[1:3])} failed: {result.stderr.strip().splitlines()[-1]}")
    return int(result.stdout.strip().splitlines()[-1]), time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/shapes/model", help="an exported model folder")
    parser.add_argument("--sample-n", default="100,10000", help="comma list of sample.py -n values")
    parser.add_argument("--evaluate-n", default="100,2000", help="comma list of evaluate.py --n values")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {"sample.py -n": {}, "evaluate.py --n": {}}
    with tempfile.TemporaryDirectory() as folder:
        for n in [int(v) for v in args.sample_n.split(",")]:
            results["sample.py -n"][n] = peak_kib(
                [
                    sys.executable,
                    "sample.py",
                    "--model",
                    args.model,
                    "a red circle",
                    "-n",
                    str(n),
                    "--steps",
                    "2",
                    "--batch-size",
                    "50",
                    "--out",
                    f"{folder}/s{n}/grid.png",
                ]
            )
        for n in [int(v) for v in args.evaluate_n.split(",")]:
            results["evaluate.py --n"][n] = peak_kib(
                [
                    sys.executable,
                    "evaluate.py",
                    "--model",
                    args.model,
                    "--n",
                    str(n),
                    "--parts",
                    "faithfulness",
                    "--categories",
                    "single object",
                    "--out",
                    f"{folder}/e{n}/report.json",
                ]
            )
    for command, runs in results.items():
        sizes = sorted(runs)
        for n in sizes:
            print(f"{command} {n:>6}: peak {runs[n][0] / 1024:7.0f} MiB, {runs[n][1]:6.0f} s")
        ratio = runs[sizes[-1]][0] / runs[sizes[0]][0]
        print(
            f"{command}: {sizes[-1]} against {sizes[0]}: {ratio:.2f}x the memory "
            f"({'flat' if ratio <= 1.5 else 'NOT flat'}: the target is at most 1.5x)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    c: {str(n): {"peak MiB": kib / 1024, "seconds": s} for n, (kib, s) in runs.items()}
                    for c, runs in results.items()
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

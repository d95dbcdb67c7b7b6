"""Train one config at several training seeds, one after another, evaluate each, and summarise.

    python tools/seeds.py --seeds 0,1,2,3
    python tools/seeds.py --seeds 0,1,2,3 --tag short --eval "--n 100 --n-edit 32 --n-swap 32" train.max_steps=3000

One training run is one draw: a target met at train.seed=0 may be missed at 1. For each seed K this
runs, from the repository root,

    python train.py --config CONFIG --output-dir OUT/TAG/seed-K --resume latest train.seed=K OVERRIDES
    python evaluate.py --model OUT/TAG/seed-K/model EVAL --out REPORTS/TAG/seed-K.json

(TAG: --tag, else "default"), then prints each target's value at every seed of the tag, the worst,
the mean and whether it is met at every seed; `python tools/results.py` puts the same table in
docs/results.md (with the default --reports, docs/seeds).

The small CLIP does not depend on train.seed (text.seed seeds it, data.seed its data), so once the
first seed has trained, its clip/ folder is copied into each later seed's output folder before that
seed trains, and train.py reuses a finished <output_dir>/clip: each later seed skips the CLIP's
training, and the seeds differ in the UNet's training only.

Re-runnable after an interruption: a seed whose model folder and report both exist is skipped, one
with a model but no report is only evaluated, and one stopped while training resumes from its
latest checkpoint (--resume latest starts afresh where there is none). So keep a tag for one set of
settings: a resumed run would not notice changed train.* overrides.
--eval's value holds spaces, or is given as --eval=--swap-sweep, so that argparse takes it as a value.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffusion.cli import ArgumentParser
from diffusion.config import load_config
from diffusion.errors import UserError, exit_on_user_error
from diffusion.evaluation.report import fmt

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EVAL = "--n 200 --n-edit 64 --n-swap 64"
# Targets that are better when lower: "(at most)" in the name, and the weight contract's
# "weight 0 names it ... no more than deleting the word (+0.05)" (diffusion/evaluation/edits.py).
LOWER_IS_BETTER = ("(at most)", "no more than")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else (empty, not an integer, negative, repeated) is a UserError."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise UserError(f"--seeds must be a comma-separated list of integers >= 0, e.g. 0,1,2,3; got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def run_command(command: list[str]) -> None:
    """Run one step with its output streamed; a failure stops the tool (rerun it to go on)."""
    print("$ " + shlex.join(command), flush=True)
    start = time.time()
    status = subprocess.run(command).returncode
    print(f"({Path(command[1]).name} took {time.time() - start:.0f} s)", flush=True)
    if status != 0:
        raise UserError(
            f"{Path(command[1]).name} exited with status {status}; rerun tools/seeds.py to go on from there"
        )


def copy_clip(source: Path, output_dir: Path) -> None:
    """Give `output_dir` the first seed's finished CLIP (a folder with text_encoder/, as train.py
    checks), unless it has one; through a temporary folder, so an interruption leaves none or all."""
    target = output_dir / "clip"
    if not (source / "text_encoder").is_dir() or target.exists():
        return
    temporary = output_dir / ".clip.copy.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(source, temporary)
    temporary.replace(target)
    print(f"copied the CLIP of {source.parent.name} to {target}")


def report_path(reports: Path, seed: int, k: int) -> Path:
    """The k-th evaluation's report of a seed: seed-K.json, then seed-K.2.json, seed-K.3.json, ..."""
    return reports / (f"seed-{seed}.json" if k == 0 else f"seed-{seed}.{k + 1}.json")


def load_reports(folder: Path) -> dict[int, dict]:
    """The reports seed-K.json in `folder`, by seed (not the pictures evaluate.py writes beside them),
    each with the measured targets of its later evaluations (seed-K.2.json, ...) in place of its own,
    and the prior part of the latest evaluation that measured one."""
    found = {}
    for path in folder.glob("seed-*.json"):
        match = re.fullmatch(r"seed-(\d+)(?:\.(\d+))?\.json", path.name)
        if match:
            found.setdefault(int(match[1]), {})[int(match[2] or 1)] = json.loads(path.read_text())
    reports = {}
    for seed, by_order in sorted(found.items()):
        if 1 not in by_order:
            continue
        report = dict(by_order[1], targets=dict(by_order[1]["targets"]))
        for order in sorted(by_order)[1:]:
            measured = {k: t for k, t in by_order[order]["targets"].items() if t.get("value") is not None}
            report["targets"].update({k: t for k, t in measured.items() if k in report["targets"]})
            if by_order[order].get("prior"):  # its details too (results.md's palette table reads them)
                report["prior"] = by_order[order]["prior"]
        reports[seed] = report
    return reports


def summarise(reports: dict[int, dict]) -> dict:
    """Each target over the seeds: {name: {"values": {seed: value}, "worst", "mean", "goal",
    "met at every seed"}}, targets in the order the reports list them.

    worst: the least value (the greatest where lower is better, LOWER_IS_BETTER); for a yes/no
    target, no if any seed says no. mean: None for yes/no targets or when no seed measured it.
    goal: the goal, or (lowest, highest) where it differs between seeds (a goal set from a measured
    baseline). met at every seed: False if any seed misses it, else None if any seed did not measure
    it (value None, met None, or no such target), else True."""
    seeds = sorted(reports)
    names = list(dict.fromkeys(name for seed in seeds for name in reports[seed]["targets"]))
    out = {}
    for name in names:
        entries = {seed: reports[seed]["targets"].get(name, {}) for seed in seeds}
        values = {seed: entry.get("value") for seed, entry in entries.items()}
        measured = [v for v in values.values() if v is not None]
        goals = sorted({entry["target"] for entry in entries.values() if entry.get("target") is not None})
        if not measured:
            worst = mean = None
        elif all(isinstance(v, bool) for v in measured):
            worst, mean = all(measured), None
        else:
            lower = any(marker in name for marker in LOWER_IS_BETTER)
            worst, mean = (max if lower else min)(measured), sum(measured) / len(measured)
        met = [entry.get("met") for entry in entries.values()]
        out[name] = {
            "values": values,
            "worst": worst,
            "mean": mean,
            "goal": goals[0] if len(goals) == 1 else (goals[0], goals[-1]) if goals else None,
            "met at every seed": False if False in met else None if None in met else True,
        }
    return out


def summary_table(summary: dict) -> list[str]:
    """Markdown lines: one row per target, a column per seed, then the count of targets met at every seed."""
    seeds = sorted({seed for target in summary.values() for seed in target["values"]})
    header = ["target", *[f"seed {seed}" for seed in seeds], "worst", "mean", "goal", "met at every seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, t in summary.items():
        cells = [*[t["values"].get(seed) for seed in seeds], t["worst"], t["mean"], t["goal"], t["met at every seed"]]
        lines.append("| " + " | ".join([name, *map(fmt, cells)]) + " |")
    met = [t["met at every seed"] for t in summary.values() if t["met at every seed"] is not None]
    return lines + ["", f"{sum(met)} of {len(met)} measured targets met at every seed"]


@exit_on_user_error
def main(argv=None, run=run_command):
    """`run` runs one command (a list); the tests pass a fake one."""
    parser = ArgumentParser(description="Train a config at several training seeds and evaluate each.")
    parser.add_argument("--seeds", required=True, help="comma-separated training seeds, e.g. 0,1,2,3")
    parser.add_argument("--config", default=str(REPO / "configs" / "shapes.yaml"), help="default: configs/shapes.yaml")
    parser.add_argument("--out", default=str(REPO / "runs" / "seeds"), help="runs go to OUT/TAG/seed-K")
    parser.add_argument(
        "--eval",
        action="append",
        help=f"evaluate.py's arguments (default: {DEFAULT_EVAL!r}); given again, another evaluation of each seed "
        "(report seed-K.2.json, ...) whose measured targets replace the earlier ones', e.g. single objects at n 1000",
    )
    parser.add_argument("--reports", default=str(REPO / "docs" / "seeds"), help="reports go to REPORTS/TAG/seed-K.json")
    parser.add_argument("--tag", help="names this set of settings (default: 'default')")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every seed")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    tag = args.tag or "default"
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", tag):
        raise UserError(f"--tag must be a folder name of letters, digits, '.', '_' and '-'; got {tag!r}")
    if any(o.partition("=")[0].strip() == "train.seed" for o in args.overrides):
        raise UserError("train.seed is set by --seeds; leave it out of the overrides")
    # a bad config, override or seed fails here, before any training
    load_config(args.config, [*args.overrides, f"train.seed={max(seeds)}"])
    evals = []
    for text in args.eval or [DEFAULT_EVAL]:
        try:
            evals.append(shlex.split(text))
        except ValueError as error:
            raise UserError(f"--eval {text!r}: {error}") from None

    runs, reports = Path(args.out) / tag, Path(args.reports) / tag
    first_clip = runs / f"seed-{seeds[0]}" / "clip"
    for seed in seeds:
        output_dir, model = runs / f"seed-{seed}", runs / f"seed-{seed}" / "model"
        paths = [report_path(reports, seed, k) for k in range(len(evals))]
        if model.is_dir() and all(p.is_file() for p in paths):
            print(f"seed {seed}: {model} and its reports exist, skipped")
            continue
        if not model.is_dir():
            output_dir.mkdir(parents=True, exist_ok=True)
            copy_clip(first_clip, output_dir)
            train = [sys.executable, str(REPO / "train.py"), "--config", args.config, "--output-dir", str(output_dir)]
            run([*train, "--resume", "latest", f"train.seed={seed}", *args.overrides])
        reports.mkdir(parents=True, exist_ok=True)
        evaluate = [sys.executable, str(REPO / "evaluate.py"), "--model", str(model)]
        for eval_args, report in zip(evals, paths):
            if not report.is_file():
                run([*evaluate, *eval_args, "--out", str(report)])

    print(f"\n{tag}: the targets over the seeds of {reports}\n")
    print("\n".join(summary_table(summarise(load_reports(reports)))))


if __name__ == "__main__":
    main()

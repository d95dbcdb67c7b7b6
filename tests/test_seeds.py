"""tools/seeds.py and its sections in tools/results.py, with a fake command runner: nothing trains here."""

import json
import sys
from pathlib import Path

import pytest

from diffusion.config import load_config

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))  # as when the scripts run: `python tools/seeds.py` has tools/ on sys.path
import results  # noqa: E402
import seeds  # noqa: E402


def _report(**targets) -> dict:
    """A report as evaluate.py writes it, reduced to its targets: name=(value, target, met)."""
    return {"targets": {name: dict(zip(("value", "target", "met"), t)) for name, t in targets.items()}}


class FakeRun:
    """Stands for run_command: records each command, and makes what train.py and evaluate.py would
    (train: clip/ if missing, then model/; evaluate: the report), noting whether clip/ was there."""

    def __init__(self):
        self.calls = []

    def __call__(self, command):
        script = Path(command[1]).name
        if script == "train.py":
            output_dir = Path(command[command.index("--output-dir") + 1])
            clip = output_dir / "clip"
            self.calls.append((script, output_dir.name, (clip / "text_encoder" / "weights").is_file()))
            if not clip.exists():
                (clip / "text_encoder").mkdir(parents=True)
                (clip / "text_encoder" / "weights").write_text(output_dir.name)
            (output_dir / "model").mkdir()
        else:
            out = Path(command[command.index("--out") + 1])
            self.calls.append((script, out.name))
            seed, _, order = out.stem.removeprefix("seed-").partition(".")
            value = 0.9 + int(seed) / 100 + (0.05 if order else 0)  # seed K scores 0.9 + K/100, a later eval +0.05
            out.write_text(json.dumps(_report(position=(value, 0.95, value >= 0.95))))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds="], "comma-separated list of integers"),
        (["--seeds", "0,x"], "comma-separated list of integers"),
        (["--seeds", "0,,1"], "comma-separated list of integers"),
        (["--seeds", "-1"], "comma-separated list of integers"),
        (["--seeds", "1,1"], "twice"),
        (["--seeds", "0", "train.seed=3"], "train.seed is set by --seeds"),
        (["--seeds", "0", "train.nonsense=1"], "train.nonsense"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, run_cli, tmp_path):
    result = run_cli("tools/seeds.py", *args, "--out", tmp_path / "runs", "--reports", tmp_path / "docs", timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_trains_and_evaluates_each_seed_with_the_first_seeds_clip(tmp_path, capsys):
    run = FakeRun()
    argv = ["--seeds", "3,1", "--out", str(tmp_path / "runs"), "--reports", str(tmp_path / "docs"), "train.lr=0.001"]
    seeds.main(argv, run=run)
    assert run.calls == [
        ("train.py", "seed-3", False),  # the first seed trains its CLIP
        ("evaluate.py", "seed-3.json"),
        ("train.py", "seed-1", True),  # the later one finds it copied in before training
        ("evaluate.py", "seed-1.json"),
    ]
    assert (tmp_path / "runs/default/seed-1/clip/text_encoder/weights").read_text() == "seed-3"
    out = capsys.readouterr().out
    assert "| position | 0.910 | 0.930 | 0.910 | 0.920 | 0.950 | no |" in out  # seed 1, seed 3, worst, mean
    assert "0 of 1 measured targets met at every seed" in out


def test_command_lines(tmp_path, monkeypatch):
    commands = []
    argv = ["--seeds", "2", "--tag", "short", "--out", "r", "--reports", "d", "--eval", "--n 10 --parts edit"]
    monkeypatch.chdir(tmp_path)
    seeds.main([*argv, "train.max_steps=5"], run=commands.append)  # relative folders: from the current one
    train, evaluate = [c[1:] for c in commands]
    assert Path(train[0]).name == "train.py" and Path(evaluate[0]).name == "evaluate.py"
    config = str(seeds.REPO / "configs" / "shapes.yaml")
    assert train[1:] == ["--config", config, "--output-dir", "r/short/seed-2", "--resume", "latest"] + [
        "train.seed=2",
        "train.max_steps=5",
    ]
    assert evaluate[1:] == ["--model", "r/short/seed-2/model", "--n", "10", "--parts", "edit", "--out"] + [
        "d/short/seed-2.json"
    ]


def test_a_finished_seed_is_skipped_and_a_trained_one_only_evaluated(tmp_path):
    runs, docs = tmp_path / "runs" / "default", tmp_path / "docs" / "default"
    (runs / "seed-0" / "model").mkdir(parents=True)
    (runs / "seed-1" / "model").mkdir(parents=True)
    docs.mkdir(parents=True)
    (docs / "seed-0.json").write_text(json.dumps(_report(position=(0.97, 0.95, True))))
    run = FakeRun()
    seeds.main(["--seeds", "0,1,2", "--out", str(tmp_path / "runs"), "--reports", str(tmp_path / "docs")], run=run)
    assert run.calls == [("evaluate.py", "seed-1.json"), ("train.py", "seed-2", False), ("evaluate.py", "seed-2.json")]


def test_summarise():
    named = "weight 0 names it, no more than deleting the word (+0.05)"  # lower is better, a goal per seed
    columns = {  # target: (value, goal, met) at seeds 0, 1, 2
        "a": [(0.9, 0.85, True), (0.8, 0.85, False), (0.95, 0.85, True)],
        "grain (at most)": [(1.0, 1.5, True), (1.2, 1.5, True), (0.9, 1.5, True)],
        named: [(0.2, 0.25, True), (0.1, 0.15, True), (0.15, 0.2, True)],
        "rises": [(True, True, True), (False, True, False), (True, True, True)],
        "gone": [(None, 0.9, None)] * 3,
    }
    reports = {seed: _report(**{name: column[seed] for name, column in columns.items()}) for seed in range(3)}
    reports[2]["targets"]["seed 2 only"] = {"value": 0.5, "target": 0.4, "met": True}
    summary = seeds.summarise(reports)
    assert list(summary) == [*columns, "seed 2 only"]
    a, grain, weight0, rises, gone, partial = summary.values()
    assert a["values"] == {0: 0.9, 1: 0.8, 2: 0.95} and a["worst"] == 0.8 and a["goal"] == 0.85
    assert a["mean"] == pytest.approx(0.88333333) and a["met at every seed"] is False
    assert grain["worst"] == 1.2 and grain["mean"] == pytest.approx(1.0333333) and grain["met at every seed"] is True
    assert weight0["worst"] == 0.2 and weight0["goal"] == (0.15, 0.25) and weight0["met at every seed"] is True
    assert rises["worst"] is False and rises["mean"] is None and rises["met at every seed"] is False
    assert gone["worst"] is None and gone["mean"] is None and gone["met at every seed"] is None
    assert partial["values"] == {0: None, 1: None, 2: 0.5} and partial["worst"] == 0.5
    assert partial["met at every seed"] is None  # not measured at every seed
    lines = seeds.summary_table(summary)
    assert f"| {named} | 0.200 | 0.100 | 0.150 | 0.200 | 0.150 | 0.150 to 0.250 | yes |" in lines
    assert "| rises | yes | no | yes | no | - | yes | no |" in lines
    assert lines[-1] == "2 of 4 measured targets met at every seed"


def test_results_sections(tmp_path):
    docs = tmp_path / "docs"
    assert results.seed_sections(docs) == []  # no seed reports: results.md as before
    for tag, values in {"default": (0.9, 0.8), "aaa": (0.99, 0.98)}.items():
        (docs / "seeds" / tag).mkdir(parents=True)
        for seed, value in enumerate(values):
            targets = {"position": (value, 0.85, value >= 0.85), "grain (at most)": (1.0 + seed, 1.5, seed == 0)}
            (docs / "seeds" / tag / f"seed-{seed}.json").write_text(json.dumps(_report(**targets)))
    curve = [
        {"images": 51200, "seed": 0, "report": "seeds/default/seed-0.json"},
        {"images": 51200, "seed": 1, "report": "seeds/default/seed-1.json"},
        {"images": 25600, "seed": 0, "report": "seeds/aaa/seed-0.json"},
    ]
    (docs / "seeds" / "curve.json").write_text(json.dumps(curve))
    lines = results.seed_sections(docs)
    text = "\n".join(lines)
    assert lines[0] == "## Training seeds" and text.index("### default") < text.index("### aaa")
    default = lines[lines.index("### default") :]
    cfg = load_config(None)
    train, clip = cfg.train, cfg.text
    assert default[2] == (
        f"The default config (configs/shapes.yaml): {train.max_steps:,} steps of {train.batch_size}, "
        f"{train.max_steps * train.batch_size:,} UNet images; the small CLIP {clip.steps} steps of "
        f"{clip.batch_size}, {clip.steps * clip.batch_size:,} image-caption pairs."
    )
    default = default[2:]
    assert default[2:6] == [
        "| target | seed 0 | seed 1 | worst | mean | goal | met at every seed |",
        "|---|---|---|---|---|---|---|",
        "| position | 0.900 | 0.800 | 0.800 | 0.850 | 0.850 | no |",
        "| grain (at most) | 1.000 | 2.000 | 2.000 | 1.500 | 1.500 | no |",
    ]
    assert default[7] == "0 of 2 measured targets met at every seed"
    assert "| position | 0.990 | 0.980 | 0.980 | 0.985 | 0.850 | yes |" in lines
    assert "1 of 2 measured targets met at every seed" in lines
    images = lines[lines.index("## Training images") :]
    assert images[4:8] == [
        "| target | 25,600 images | 51,200 images |",
        "|---|---|---|",
        "| position | 0.990 (1 seed) | 0.800 (2 seeds) |",
        "| grain (at most) | 1.000 (1 seed) | 2.000 (2 seeds) |",
    ]


def test_a_failed_step_stops_the_tool():
    with pytest.raises(seeds.UserError, match="exited with status 3; rerun tools/seeds.py"):
        seeds.run_command([sys.executable, "-c", "exit(3)"])


def test_a_second_evaluation_replaces_the_targets_it_measured(tmp_path):
    folders = ["--seeds", "0,1", "--out", str(tmp_path / "runs"), "--reports", str(tmp_path / "docs")]
    run = FakeRun()
    seeds.main([*folders, "--eval", "--n 2", "--eval", "--n 5 --parts faithfulness"], run=run)
    assert [c[1] for c in run.calls if c[0] == "evaluate.py"] == [
        "seed-0.json",
        "seed-0.2.json",
        "seed-1.json",
        "seed-1.2.json",
    ]
    loaded = seeds.load_reports(tmp_path / "docs" / "default")
    assert loaded[0]["targets"]["position"]["value"] == pytest.approx(0.95)
    assert loaded[1]["targets"]["position"]["value"] == pytest.approx(0.96)
    again = FakeRun()
    seeds.main([*folders, "--eval", "--n 2", "--eval", "--n 5"], run=again)
    assert again.calls == []  # every report there: nothing reruns


def test_the_prior_of_each_seed_is_tabled_with_its_palette():
    prior = {
        "n": 64,
        "colour deleted drawn": 0.5,
        "unconditional clean": 0.25,
        "palette seeds": 16,
        "palette": [
            {"prompt": "a circle on the left", "colours": {"red": 3, "blue": 0, "green": 9}, "top share": 9 / 16},
            {"prompt": "a cross at the top", "colours": {"red": 0, "blue": 0, "green": 0}, "top share": 0.0},
        ],
    }
    lines = results.prior_lines({2: {"prior": prior, "targets": {}}, 3: {"targets": {}}})
    assert lines[0].startswith("Where the text names no colour") and "16 noise seeds" in lines[0]
    assert lines[-2] == ("| 2 | 64 | 0.500 | 0.250 | a circle on the left: red 3, green 9; a cross at the top: none |")
    assert results.prior_lines({0: {"targets": {}}}) == []  # reports without the prior part: no table


def test_a_later_evaluation_of_the_prior_replaces_its_details(tmp_path):
    def report(n: int, drawn: float) -> dict:
        target = {"value": drawn, "target": 0.9, "met": drawn >= 0.9}
        prior = {"n": n, "colour deleted drawn": drawn, "palette": []}
        return {"targets": {"prior/colour deleted: one clean object": target}, "prior": prior}

    (tmp_path / "seed-0.json").write_text(json.dumps(report(12, 0.25)))
    (tmp_path / "seed-0.2.json").write_text(json.dumps({"targets": {}}))  # measured no prior
    (tmp_path / "seed-0.3.json").write_text(json.dumps(report(64, 0.5)))
    (tmp_path / "seed-1.json").write_text(json.dumps(report(12, 0.75)))
    loaded = seeds.load_reports(tmp_path)
    assert loaded[0]["prior"]["n"] == 64 and loaded[0]["prior"]["colour deleted drawn"] == 0.5
    assert loaded[0]["targets"]["prior/colour deleted: one clean object"]["value"] == 0.5
    assert loaded[1]["prior"]["n"] == 12  # no later evaluation: its own


def test_the_unet2d_section_merges_its_reports_beside_the_default(tmp_path):
    docs = tmp_path / "docs"
    default = {"n": 200, "targets": {"faithfulness/position": {"value": 1.0, "target": 0.95, "met": True}}}
    assert results.unet2d_section(docs, default) == []  # not measured: results.md as before
    (docs / "unet2d").mkdir(parents=True)
    config = "model: {kind: unet2d, channels: [24, 48, 96]}\ntrain: {max_steps: 1600}\n"
    (docs / "unet2d" / "config.yaml").write_text(config)  # the run's, as its model folder has it
    base = {"n": 100, "sampler": "euler", "guidance": 3.0, "mixed_precision": "bf16"}
    faithfulness = {"faithfulness/position": {"value": 0.65, "target": 0.95, "met": False}}
    swap = {"swap/colour swap at edit steps 0.6: old gone": {"value": 1.0, "target": 0.95, "met": True}}
    (docs / "unet2d" / "report.json").write_text(json.dumps({**base, "seconds": 10, "targets": faithfulness}))
    (docs / "unet2d" / "report-edits.json").write_text(json.dumps({**base, "seconds": 5, "targets": swap}))
    lines = results.unet2d_section(docs, default)
    text = "\n".join(lines)
    assert "**unet2d: 1 of 2 measured targets met.**" in text and "bf16, 15 s" in text and "51,200 training" in text
    assert "| faithfulness/position | 1.000 | 0.650 | 0.950 | no |" in text
    assert "| swap/colour swap at edit steps 0.6: old gone | - | 1.000 | 0.950 | yes |" in text

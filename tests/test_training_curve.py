"""tools/training_curve.py: merged reports, the zoomed chart, and one-line errors."""

import json

import pytest
from PIL import Image


def _report(path, **scores):
    path.write_text(
        json.dumps({"faithfulness": {k.replace("_", " "): {"score": v, "n": 200} for k, v in scores.items()}})
    )
    return path


def test_merges_reports_and_draws_the_zoomed_chart(tmp_path, run_cli):
    a = _report(tmp_path / "a.json", single_object=0.985, position=0.98)
    a1000 = _report(tmp_path / "a1000.json", single_object=0.989)  # the same model, more single-object prompts
    b = _report(tmp_path / "b.json", single_object=0.7, position=0.5)
    out = tmp_path / "curve.png"
    result = run_cli(
        "tools/training_curve.py",
        "--ymin",
        0.85,
        "--mark",
        "40000=budget",
        "--out",
        out,
        f"51200={a}+{a1000}",
        f"25600={b}",
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| training images | single object | position |"
    assert rows[2:] == ["| 25,600 | 0.700 | 0.500 |", "| 51,200 | 0.989 | 0.980 |"]  # sorted; the later report wins
    assert Image.open(out).size == (760, 340)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ymin", "1", "1={good}"], "--ymin must be in [0, 1), got 1.0"),
        (["--mark", "budget", "1={good}"], "--mark 'budget' is not IMAGES=LABEL"),
        (["51200="], "'51200=' is not IMAGES=REPORT"),
        (["51200={good}+missing.json"], "cannot read report 'missing.json'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, run_cli, args, message):
    good = _report(tmp_path / "a.json", single_object=0.9)
    result = run_cli("tools/training_curve.py", "--out", tmp_path / "c.png", *(a.format(good=good) for a in args))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "c.png").exists()

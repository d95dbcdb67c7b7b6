"""README.md is a short user's guide whose commands run as written: the fast ones (sampling, and
the Python example) are run here on the session's tiny model, placed where the README expects
the default model."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands(script: str) -> list[list[str]]:
    """The README's shell commands that run `script`, split as a shell would (comments dropped)."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:2] == ["python", script]:
                    found.append(words)
    return found


def test_the_readme_is_a_short_guide():
    assert len(README.splitlines()) <= 250
    assert "<!-- RESULTS: written by tools/results.py -->" in README  # the one results table, generated


@pytest.fixture(scope="module")
def checkout(tiny_model, tmp_path_factory):
    """A folder laid out like the checkout after `python train.py`, with the tiny model as the default
    and as the emoji run's model (the README samples that too)."""
    work = tmp_path_factory.mktemp("readme")
    for run in ("shapes", "emoji-cpu"):
        (work / "runs" / run).mkdir(parents=True)
        (work / "runs" / run / "model").symlink_to(tiny_model)
    for name in ("sample.py", "evaluate.py", "train.py", "app.py"):
        (work / name).symlink_to(REPO / name)
    (work / "prompts.txt").write_text("a red circle on the left\na blue square\n")
    return work


def run_python(folder: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    """`python arguments...` in `folder`, on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *arguments], cwd=folder, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("command", commands("sample.py"), ids=lambda words: " ".join(words[2:])[:60])
def test_the_sampling_commands_run_as_written(checkout, command):
    result = run_python(checkout, command[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote samples/grid.png" in result.stdout


def test_the_python_example_runs_as_written(checkout):
    (example,) = [block for block in blocks("python") if "Pipeline.from_pretrained" in block]
    result = run_python(checkout, ["-c", example])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (checkout / "circle.png").is_file()


def test_every_command_line_the_readme_names_exists():
    for script in ("train.py", "sample.py", "evaluate.py", "app.py", "tools/results.py"):
        assert (REPO / script).is_file() and f"python {script}" in README

"""Tests for train.py and sample.py as a user runs them: exit codes, one-line errors, outputs."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

SENTINEL = b"an earlier grid that a failed run must not touch"


def assert_one_line_error(result, *fragments):
    """Exit status 2, and stderr is exactly one line 'error: ...' holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    """Copies of the tiny model folder, each broken in one way."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(tiny_model, root / "old-version")
    index = json.loads((root / "old-version" / "model_index.json").read_text())
    (root / "old-version" / "model_index.json").write_text(json.dumps({**index, "format_version": 99}))
    shutil.copytree(tiny_model, root / "no-unet-weights")
    for weights in (root / "no-unet-weights" / "unet").glob("*.safetensors"):
        weights.unlink()
    shutil.copytree(tiny_model, root / "no-text-weights")
    for weights in (root / "no-text-weights" / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    return root


# ---- train.py -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config", "configs/nope.yaml"], ["config file 'configs/nope.yaml' not found"]),
        (["train.max_step=3"], ["unknown config key 'train.max_step'", "did you mean 'train.max_steps'"]),
        (["train.max_steps=-1"], ["train.max_steps must be positive"]),
        (["train.batch_size=0"], ["train.batch_size must be positive"]),
        (["train.lr=inf"], ["train.lr must be a finite number"]),
        (["model.attention_resolutions=[5]"], ["model.attention_resolutions has 5"]),
        (["train.max_steps"], ["must look like key=value"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
        (["data.max_objects=7"], ["data.max_objects must be an integer between 1 and 4"]),
        (["data.object_weights=[1,2]"], ["data.object_weights must be 4 non-negative weights"]),
    ],
    ids=[
        "missing-config",
        "unknown-key",
        "negative-steps",
        "zero-batch",
        "infinite-lr",
        "attention-not-a-level",
        "override-without-value",
        "unknown-option",
        "too-many-objects",
        "object-weights-length",
    ],
)
def test_train_rejects_bad_arguments_in_one_line(run_cli, tmp_path, args, fragments):
    result = run_cli("train.py", "--output-dir", tmp_path / "out", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_train_rejects_malformed_yaml(run_cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train: {max_steps: 3\n")
    assert_one_line_error(run_cli("train.py", "--config", config, "--output-dir", tmp_path / "out"), "not valid YAML")


def test_train_resume_from_a_corrupt_checkpoint(run_cli, tiny_run, tmp_path, tiny_overrides):
    checkpoint = tmp_path / "step-000004"
    shutil.copytree(tiny_run / "checkpoints" / "step-000004", checkpoint)
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    result = run_cli(
        "train.py", "--output-dir", tmp_path / "out", "--resume", checkpoint, *tiny_overrides, "train.max_steps=6"
    )
    assert_one_line_error(result, f"checkpoint '{checkpoint}' is corrupt")
    assert not (tmp_path / "out").exists()


# ---- sample.py errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--guidance", "inf", "a red circle"], ["guidance must be a finite number"]),
        (["--guidance", "nan", "a red circle"], ["guidance must be a finite number"]),
        (["--guidance-cutoff", "1.5", "a red circle"], ["--guidance-cutoff must be a fraction in [0, 1], got '1.5'"]),
        (["--steps", "0", "a red circle"], ["steps must be a positive whole number, got 0"]),
        (["--steps", "5000", "a red circle"], ["steps must be between 1 and the model's", "got 5000"]),
        (["-n", "0", "a red circle"], ["images per prompt must be at least 1, got 0"]),
        ([], ["no prompt given"]),
        (["--prompt-file", "/nonexistent/prompts.txt"], ["cannot read --prompt-file"]),
        (["--sampler", "plms", "a red circle"], ["invalid choice: 'plms'"]),
        (["-n", "two", "a red circle"], ["invalid int value: 'two'"]),
        (["--mixed-precision", "fp8", "a red circle"], ["invalid choice: 'fp8'"]),
        (["--weight-context", "forget", "a (red:0) circle"], ["invalid choice: 'forget'"]),
        (["--edit", "a blue circle", "--keep-layout", "yes", "a red circle"], ["invalid choice: 'yes'"]),
    ],
    ids=[
        "guidance-inf",
        "guidance-nan",
        "guidance-cutoff-over-1",
        "steps-0",
        "steps-over-training",
        "n-0",
        "no-prompt",
        "missing-prompt-file",
        "unknown-sampler",
        "n-not-a-number",
        "unknown-mixed-precision",
        "unknown-weight-context",
        "unknown-keep-layout",
    ],
)
def test_sample_rejects_bad_arguments_and_keeps_the_old_grid(run_cli, tiny_model, tmp_path, args, fragments):
    out = tmp_path / "grid.png"
    out.write_bytes(SENTINEL)
    result = run_cli("sample.py", "--model", tiny_model, "--out", out, *args)
    assert_one_line_error(result, *fragments)
    assert out.read_bytes() == SENTINEL
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no images written beside it


@pytest.mark.parametrize(
    "model, fragments",
    [
        ("missing", ["not found"]),
        ("old-version", ["incompatible version", "format 99"]),
        ("no-unet-weights", ["cannot load", "unet"]),
        ("no-text-weights", ["could not load a CLIP text encoder"]),
    ],
    ids=["missing", "old-version", "no-unet-weights", "no-text-weights"],
)
def test_sample_rejects_bad_model_folders_and_keeps_the_old_grid(run_cli, broken_models, tmp_path, model, fragments):
    out = tmp_path / "grid.png"
    out.write_bytes(SENTINEL)
    result = run_cli("sample.py", "--model", broken_models / model, "--out", out, "a red circle")
    assert_one_line_error(result, str(broken_models / model), *fragments)
    assert out.read_bytes() == SENTINEL
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.parametrize("out", ["afile/out.png", "adir"])
def test_sample_output_path_that_cannot_be_written(run_cli, tiny_model, tmp_path, out):
    (tmp_path / "afile").write_text("a file where a folder should be")
    (tmp_path / "adir").mkdir()
    result = run_cli("sample.py", "--model", tiny_model, "--out", tmp_path / out, "a red circle", "--steps", "2")
    assert_one_line_error(result, str(tmp_path / out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert list((tmp_path / "adir").iterdir()) == []


# ---- sample.py success ------------------------------------------------------------------------------
def test_sample_writes_a_grid_and_images_with_metadata(run_cli, tiny_model, tmp_path):
    from diffusion.sampling.pipeline import Pipeline

    out = tmp_path / "new" / "grid.png"  # the folder is created
    prompts = ["a red circle on the left", "a blue square"]
    result = run_cli(
        "sample.py",
        "--model",
        tiny_model,
        *prompts,
        "-n",
        "2",
        "--seed",
        "5",
        "--steps",
        "3",
        "--sampler",
        "ddim",
        "--guidance",
        "2.5",
        "--mixed-precision",
        "no",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    assert f"wrote {out} and 4 images beside it" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "grid-000.png",
        "grid-001.png",
        "grid-002.png",
        "grid-003.png",
        "grid.png",
    ]
    with Image.open(out) as grid:
        assert grid.text["prompts"] == "\n".join(prompts)
        assert grid.text["seed"] == "5" and grid.text["sampler"] == "ddim"
        assert grid.width > 2 * 16 and grid.height > 2 * 16

    expected = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")(
        prompts, num_images_per_prompt=2, seed=5, steps=3, guidance=2.5, sampler="ddim", progress=False
    )
    for i, (prompt, seed) in enumerate([(prompts[0], 5), (prompts[0], 6), (prompts[1], 5), (prompts[1], 6)]):
        with Image.open(out.with_name(f"grid-{i:03d}.png")) as image:
            assert image.size == (16, 16)
            assert image.text["prompt"] == prompt
            assert image.text["seed"] == str(seed)
            assert image.text["sampler"] == "ddim"
            assert image.text["steps"] == "3" and image.text["guidance"] == "2.5"
            assert image.text["mixed_precision"] == "no"
            assert image.text["model"] == str(tiny_model.resolve())
            # the file holds the image the pipeline makes for this prompt and seed
            written, made = np.asarray(image.convert("RGB")).astype(int), np.asarray(expected.images[i]).astype(int)
            assert np.abs(written - made).max() <= 1


def test_sample_writes_attention_panels_and_raw_maps(run_cli, tiny_model, tmp_path):
    from safetensors.torch import load_file

    maps = tmp_path / "maps"
    result = run_cli(
        "sample.py",
        "--model",
        tiny_model,
        "a red circle",
        "-n",
        "1",
        "--steps",
        "2",
        "--out",
        tmp_path / "grid.png",
        "--attention",
        maps,
    )
    assert result.returncode == 0, result.stderr
    assert f"attention maps in {maps}" in result.stdout
    assert sorted(p.name for p in maps.iterdir()) == ["grid-000.png", "grid-000.safetensors"]
    words = load_file(maps / "grid-000.safetensors")
    assert {"red", "circle"} <= set(words)
    for word, m in words.items():
        assert m.ndim == 2 and m.min() >= 0, word
    with Image.open(maps / "grid-000.png") as panel:
        assert panel.text["prompt"] == "a red circle"
    # the raw maps are as readable as the panel beside them (safetensors alone would write them 0o600)
    assert (maps / "grid-000.safetensors").stat().st_mode & 0o777 == (maps / "grid-000.png").stat().st_mode & 0o777


def test_sample_with_a_too_long_prompt_warns_once_and_succeeds(run_cli, tiny_model, tmp_path):
    prompt = "a red circle on the left " * 8 + "and a purple zebra"
    out = tmp_path / "long.png"
    out.write_bytes(SENTINEL)  # a successful run replaces an earlier grid
    result = run_cli("sample.py", "--model", tiny_model, prompt, "-n", "1", "--steps", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    cut = re.search(r'cut: "(.*)"$', warnings[0]).group(1)
    assert cut.endswith("and a purple zebra") and prompt.endswith(cut)
    assert not any(line.startswith("error:") for line in lines)
    with Image.open(out) as grid:
        assert grid.text["prompts"] == prompt
    assert out.with_name("long-000.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long-000.png", "long.png"]  # no temporary files left


# ---- malloc set up for PyTorch ---------------------------------------------------------------------
FAULTS = """
import resource, sys, torch
from diffusion.cli import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else False
for _ in range(3):
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)  # 64 MiB: above the largest threshold glibc would mmap from
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tuned_malloc_reuses_freed_memory_instead_of_faulting_it_in_again():
    def faults(mode: str, **env) -> tuple[str, int]:
        result = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env={**os.environ, **env}
        )
        assert result.returncode == 0, result.stderr
        applied, count = result.stdout.split()
        return applied, int(count)

    applied, tuned = faults("tuned")
    _, plain = faults("plain")
    assert applied == "True"
    assert plain > 20 * 10_000  # each fresh 64 MiB mmap faults its 16,384 pages in again
    assert tuned < plain / 2
    # a malloc set up through GLIBC_TUNABLES is left alone: that is also how to opt out
    applied, _ = faults("tuned", GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
    assert applied == "False"


def test_sample_streams_many_images_and_grids_only_the_first_64(run_cli, tiny_model, tmp_path):
    from diffusion.sampling.pipeline import Pipeline

    out = tmp_path / "grid.png"
    result = run_cli(
        "sample.py",
        "--model",
        tiny_model,
        "a red circle",
        "-n",
        "70",
        "--batch-size",
        "16",
        "--steps",
        "2",
        "--mixed-precision",
        "no",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} and 70 images beside it; the grid shows the first 64" in result.stdout
    assert len(list(tmp_path.glob("grid-*.png"))) == 70
    # the images are the pipeline's own, whatever the batches they were made in
    expected = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")(
        "a red circle", num_images_per_prompt=70, batch_size=70, steps=2, progress=False
    )
    for i in (0, 15, 16, 69):
        with Image.open(out.with_name(f"grid-{i:03d}.png")) as image:
            assert np.array_equal(np.asarray(image), np.asarray(expected.images[i]))
    with Image.open(out) as grid:  # 64 tiles of 16 px shown at 128 px in 70 columns' worth: one row of 64
        assert grid.width < 70 * 128 and grid.width >= 64 * 128


PEAK_MEMORY = """
import resource, sys
sys.argv = ["sample.py"] + sys.argv[1:]
import sample
sample.main(sys.argv[1:])
print("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_sample_peak_memory_does_not_grow_with_the_number_of_images(run_cli, tiny_model, tmp_path):
    def peak(n: int) -> int:
        result = run_cli(
            "-c",
            PEAK_MEMORY,
            "--model",
            tiny_model,
            "a red circle",
            "-n",
            n,
            "--batch-size",
            100,
            "--steps",
            "1",
            "--mixed-precision",
            "no",
            "--out",
            tmp_path / f"n{n}" / "grid.png",
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split("peak")[-1])

    small, large = peak(100), peak(3000)
    # 3000 images of 16 px held in memory would be 3000 PIL images (and their PNG buffers); the
    # streaming writer keeps 64 whatever -n is
    assert large <= small * 1.1 + 5_000, (small, large)  # kilobytes

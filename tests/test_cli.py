"""Tests for train.py and sample.py as a user runs them: exit codes, one-line errors, outputs."""
import json
import re
import shutil
from pathlib import Path

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
@pytest.mark.parametrize("args, fragments", [
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
], ids=["missing-config", "unknown-key", "negative-steps", "zero-batch", "infinite-lr", "attention-not-a-level",
        "override-without-value", "unknown-option", "too-many-objects", "object-weights-length"])
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
    result = run_cli("train.py", "--output-dir", tmp_path / "out", "--resume", checkpoint,
                     *tiny_overrides, "train.max_steps=6")
    assert_one_line_error(result, f"checkpoint '{checkpoint}' is corrupt")
    assert not (tmp_path / "out").exists()


# ---- sample.py errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--guidance", "inf", "a red circle"], ["guidance must be a finite number"]),
    (["--guidance", "nan", "a red circle"], ["guidance must be a finite number"]),
    (["--steps", "0", "a red circle"], ["steps must be a positive whole number, got 0"]),
    (["--steps", "5000", "a red circle"], ["steps must be between 1 and the model's", "got 5000"]),
    (["-n", "0", "a red circle"], ["images per prompt must be at least 1, got 0"]),
    ([], ["no prompt given"]),
    (["--prompt-file", "/nonexistent/prompts.txt"], ["cannot read --prompt-file"]),
    (["--sampler", "plms", "a red circle"], ["invalid choice: 'plms'"]),
    (["-n", "two", "a red circle"], ["invalid int value: 'two'"]),
    (["--mixed-precision", "fp8", "a red circle"], ["invalid choice: 'fp8'"]),
    (["--weight-context", "forget", "a (red:0) circle"], ["invalid choice: 'forget'"]),
], ids=["guidance-inf", "guidance-nan", "steps-0", "steps-over-training", "n-0", "no-prompt", "missing-prompt-file", "unknown-sampler",
        "n-not-a-number", "unknown-mixed-precision", "unknown-weight-context"])
def test_sample_rejects_bad_arguments_and_keeps_the_old_grid(run_cli, tiny_model, tmp_path, args, fragments):
    out = tmp_path / "grid.png"
    out.write_bytes(SENTINEL)
    result = run_cli("sample.py", "--model", tiny_model, "--out", out, *args)
    assert_one_line_error(result, *fragments)
    assert out.read_bytes() == SENTINEL
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no images written beside it


@pytest.mark.parametrize("model, fragments", [
    ("missing", ["not found"]),
    ("old-version", ["incompatible version", "format 99"]),
    ("no-unet-weights", ["cannot load", "unet"]),
    ("no-text-weights", ["could not load a CLIP text encoder"]),
], ids=["missing", "old-version", "no-unet-weights", "no-text-weights"])
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
    from diffusion.pipeline import Pipeline

    out = tmp_path / "new" / "grid.png"  # the folder is created
    prompts = ["a red circle on the left", "a blue square"]
    result = run_cli("sample.py", "--model", tiny_model, *prompts, "-n", "2", "--seed", "5", "--steps", "3",
                     "--sampler", "ddim", "--guidance", "2.5", "--mixed-precision", "no", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    assert f"wrote {out} and 4 images beside it" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid-000.png", "grid-001.png", "grid-002.png",
                                                            "grid-003.png", "grid.png"]
    with Image.open(out) as grid:
        assert grid.text["prompts"] == "\n".join(prompts)
        assert grid.text["seed"] == "5" and grid.text["sampler"] == "ddim"
        assert grid.width > 2 * 16 and grid.height > 2 * 16

    expected = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")(
        prompts, num_images_per_prompt=2, seed=5, steps=3, guidance=2.5, sampler="ddim", progress=False)
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
    result = run_cli("sample.py", "--model", tiny_model, "a red circle", "-n", "1", "--steps", "2",
                     "--out", tmp_path / "grid.png", "--attention", maps)
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


# ---- huge pages: the command lines start themselves again with glibc.malloc.hugetlb=1 --------------
@pytest.fixture
def exec_calls(monkeypatch):
    """Record os.execv instead of replacing the test process; huge pages count as supported."""
    import diffusion.cli as cli
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append((path, list(argv))))
    monkeypatch.setattr(cli, "huge_pages_supported", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # recorded, so that teardown removes what the tests set
    monkeypatch.delenv("GLIBC_TUNABLES")
    return calls


def test_relaunch_runs_the_same_command_again_with_the_tunable(exec_calls, monkeypatch):
    import os
    import sys

    from diffusion.cli import MALLOC_TUNABLES, relaunch_with_huge_pages
    relaunch_with_huge_pages()
    assert exec_calls == [(sys.executable, sys.orig_argv)]
    assert os.environ["GLIBC_TUNABLES"] == MALLOC_TUNABLES

    exec_calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the user's own tunables are kept
    relaunch_with_huge_pages()
    assert len(exec_calls) == 1
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + MALLOC_TUNABLES


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=1", "glibc.malloc.hugetlb=0",
                                      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"])
def test_relaunch_happens_once_and_can_be_switched_off(exec_calls, monkeypatch, tunables):
    import os

    from diffusion.cli import relaunch_with_huge_pages
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    relaunch_with_huge_pages()
    assert exec_calls == [] and os.environ["GLIBC_TUNABLES"] == tunables


def test_no_relaunch_where_huge_pages_are_unsupported(exec_calls, monkeypatch):
    import os

    import diffusion.cli as cli
    monkeypatch.setattr(cli, "huge_pages_supported", lambda: False)
    cli.relaunch_with_huge_pages()
    assert exec_calls == [] and "GLIBC_TUNABLES" not in os.environ


def test_a_failed_relaunch_runs_on_with_the_environment_unchanged(monkeypatch):
    import os

    import diffusion.cli as cli

    def refuse(path, argv):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cli.os, "execv", refuse)
    monkeypatch.setattr(cli, "huge_pages_supported", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    monkeypatch.delenv("GLIBC_TUNABLES")
    cli.relaunch_with_huge_pages()
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    cli.relaunch_with_huge_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_huge_pages_supported_reads_the_platform(monkeypatch):
    import diffusion.cli as cli
    monkeypatch.setattr(cli.sys, "platform", "darwin")
    assert not cli.huge_pages_supported()
    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.setattr(cli.os, "confstr", lambda name: "glibc 2.31")  # before glibc.malloc.hugetlb
    assert not cli.huge_pages_supported()
    monkeypatch.setattr(cli.os, "confstr", lambda name: "musl 1.2")
    assert not cli.huge_pages_supported()


def test_a_script_really_starts_again_with_the_tunable(tmp_path):
    """A real exec: the script's output comes from the second start, with its arguments intact."""
    import os
    import subprocess
    import sys

    from diffusion.cli import MALLOC_TUNABLES, huge_pages_supported
    if not huge_pages_supported():
        pytest.skip("no glibc >= 2.35 with transparent huge pages here")
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\nfrom diffusion.cli import relaunch_with_huge_pages\n"
                      "print('start', os.getpid(), flush=True)\n"
                      "relaunch_with_huge_pages()\n"
                      "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(script), "a b", "--c"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == lines[1]  # started twice, in the same process (exec keeps the pid)
    assert lines[2] == MALLOC_TUNABLES + " ['a b', '--c']"


def test_sample_streams_many_images_and_grids_only_the_first_64(run_cli, tiny_model, tmp_path):
    from diffusion.pipeline import Pipeline

    out = tmp_path / "grid.png"
    result = run_cli("sample.py", "--model", tiny_model, "a red circle", "-n", "70", "--batch-size", "16",
                     "--steps", "2", "--mixed-precision", "no", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} and 70 images beside it; the grid shows the first 64" in result.stdout
    assert len(list(tmp_path.glob("grid-*.png"))) == 70
    # the images are the pipeline's own, whatever the batches they were made in
    expected = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")(
        "a red circle", num_images_per_prompt=70, batch_size=70, steps=2, progress=False)
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
        result = run_cli("-c", PEAK_MEMORY, "--model", tiny_model, "a red circle", "-n", n, "--batch-size", 100,
                         "--steps", "1", "--mixed-precision", "no", "--out", tmp_path / f"n{n}" / "grid.png")
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split("peak")[-1])

    small, large = peak(100), peak(3000)
    # 3000 images of 16 px held in memory would be 3000 PIL images (and their PNG buffers); the
    # streaming writer keeps 64 whatever -n is
    assert large <= small * 1.1 + 5_000, (small, large)  # kilobytes

"""Injected faults on the tiny model: a loss that turns NaN, a disk that fills while a checkpoint
or the export is written, a process killed at any point of an export. In each the last good
state survives. (A corrupt newest checkpoint and a corrupt text-embedding cache are tested with
their modules: tests/test_training.py, tests/test_embedding_store.py.)"""

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusion import checkpoint as ckpt
from diffusion.config import config_from_dict
from diffusion.errors import UserError
from diffusion.sampling.pipeline import Pipeline
from diffusion.training import loop as training
from diffusion.training.loop import train


def tree_digest(folder):
    """{relative path: sha256} of every file under `folder` but the run's config.yaml (a resumed
    run rewrites it with its own max_steps)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / "config.yaml"
    }


def leftovers(run):
    """Temporary files and folders under `run` (what an interrupted write could leave)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith((".tmp", ".old")))


# ---- a loss that is not finite ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_loss_that_is_not_finite_stops_training_naming_the_step(run_copy, tiny_dict, monkeypatch, bad):
    """Step 5's images are made non-finite (as a diverged step would be): the run stops with one
    line naming step 5 before anything is written from the weights that took its update."""
    step_call = training.TrainStep.__call__
    calls = []

    def poisoned(self, batch):
        calls.append(1)
        if len(calls) == 1:  # the first step after resuming at step 4
            batch = dataclasses.replace(batch, x0=batch.x0 * bad)
        return step_call(self, batch)

    monkeypatch.setattr(training.TrainStep, "__call__", poisoned)
    before = tree_digest(run_copy)
    tiny_dict["train"]["max_steps"] = 8
    with pytest.raises(UserError, match="the loss was not finite at step 5; the newest checkpoint, step-000004") as e:
        train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert "\n" not in str(e.value)
    assert tree_digest(run_copy) == before  # no checkpoint, grid or export from the poisoned weights
    ckpt.load_checkpoint(run_copy / "checkpoints" / "step-000004")


def test_a_loss_that_is_not_finite_between_log_steps_is_caught_before_the_next_checkpoint(
    run_copy, tiny_dict, monkeypatch
):
    """Logging every 100 steps, checkpoints every 2: the check still runs before each save."""
    step_call = training.TrainStep.__call__
    calls = []

    def poisoned(self, batch):
        calls.append(1)
        if len(calls) == 2:  # step 6
            batch = dataclasses.replace(batch, x0=batch.x0 * float("nan"))
        return step_call(self, batch)

    monkeypatch.setattr(training.TrainStep, "__call__", poisoned)
    tiny_dict["train"].update(max_steps=10, log_every=100)
    with pytest.raises(UserError, match="not finite at step 6; the newest checkpoint, step-000004"):
        train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert [p.name for p in ckpt.list_checkpoints(run_copy / "checkpoints")] == ["step-000002", "step-000004"]


# ---- a full disk --------------------------------------------------------------------------------
def disk_full_after(calls_allowed):
    """A safetensors writer that writes `calls_allowed` files, then half of one, then raises ENOSPC."""
    from safetensors.torch import save_file

    calls = []

    def writer(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > calls_allowed:
            with open(path, "wb") as file:
                file.write(b"\x00" * 100)  # what got onto the disk before it filled
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_file(tensors, path, *args, **kwargs)

    return writer


@pytest.mark.parametrize("file_number", [0, 2, 3], ids=["at-model", "at-optimizer", "at-rng"])
def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(
    run_copy, tiny_dict, monkeypatch, file_number
):
    monkeypatch.setattr(ckpt, "save_file", disk_full_after(file_number))
    before = tree_digest(run_copy)
    tiny_dict["train"]["max_steps"] = 6
    with pytest.raises(UserError, match="cannot write checkpoint .*step-000006.: the disk is full; free") as e:
        train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert "\n" not in str(e.value)
    assert leftovers(run_copy) == []
    after = tree_digest(run_copy)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written before is changed
    assert [p.name for p in ckpt.list_checkpoints(run_copy / "checkpoints")] == ["step-000002", "step-000004"]

    monkeypatch.undo()  # space freed: the run goes on from step 4
    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert [p.name for p in ckpt.list_checkpoints(run_copy / "checkpoints")] == ["step-000004", "step-000006"]


def test_a_full_disk_while_the_model_is_exported_keeps_the_previous_export(run_copy, tiny_dict, monkeypatch):
    from diffusion.model import text_encoder

    save = text_encoder.TextEncoder.save_pretrained

    def disk_full(self, folder):
        save(self, folder)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(text_encoder.TextEncoder, "save_pretrained", disk_full)
    model_before = tree_digest(run_copy / "model")
    tiny_dict["train"]["max_steps"] = 6
    with pytest.raises(UserError, match=r"cannot write the model folder '.*model': the disk is full"):
        train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert leftovers(run_copy) == []
    assert tree_digest(run_copy / "model") == model_before
    Pipeline.from_pretrained(run_copy / "model")

    monkeypatch.undo()  # the training finished; rerunning exports its last step
    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert tree_digest(run_copy / "model") != model_before and leftovers(run_copy) == []


def test_a_full_disk_while_a_validation_grid_is_written_is_one_line(run_copy, tiny_dict, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "samples/step-000006.png")

    monkeypatch.setattr(training, "labelled_grid", disk_full)
    tiny_dict["train"]["max_steps"] = 6
    with pytest.raises(UserError, match="cannot write 'samples/step-000006.png': the disk is full"):
        train(config_from_dict(tiny_dict), run_copy, resume="latest")


def test_a_full_tmpfs_leaves_the_previous_checkpoints_and_export(tiny_run, tiny_dict, tmp_path):
    """The real thing, where the system allows mounting a small tmpfs (root in a container with
    CAP_SYS_ADMIN): a run continued on a disk with room for a few files only."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = sum(p.stat().st_size for p in tiny_run.rglob("*") if p.is_file())
    one = sum(p.stat().st_size for p in (tiny_run / "checkpoints" / "step-000002").iterdir())
    room = size + int(2.5 * one)  # the run's files, two more checkpoints and half of a third
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run = mount / "run"
        shutil.copytree(tiny_run, run)
        before = tree_digest(run)
        tiny_dict["train"].update(max_steps=40, checkpoint_every=2, keep_checkpoints=40, validate_every=1000)
        with pytest.raises(UserError, match="the disk is full"):
            train(config_from_dict(tiny_dict), run, resume="latest")
        assert leftovers(run) == []
        checkpoints = ckpt.list_checkpoints(run / "checkpoints")
        assert len(checkpoints) == 4  # two were written before the disk filled
        for checkpoint in checkpoints:
            ckpt.load_checkpoint(checkpoint)
        assert {k: v for k, v in tree_digest(run).items() if k in before and k.startswith("model")} == {
            k: v for k, v in before.items() if k.startswith("model")
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # lazy: even with a file left open


# ---- killed during the export -------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from diffusion.sampling.pipeline import Pipeline
    source, target = sys.argv[1], sys.argv[2]
    pipeline = Pipeline.from_pretrained(source)
    WATCHED = {"_write_folder", "replace_folder", "_exchange", "rmtree", "replace", "rename", "mkdir",
               "save_file", "save_pretrained", "write_text", "default_file_modes"}

    def watcher(limit, counter):
        def profile(frame, event, arg):
            if event in ("c_call", "c_return"):  # the os module's own calls only, not str.replace
                name = arg.__name__ if getattr(arg, "__module__", None) in ("posix", "nt") else None
            else:
                name = frame.f_code.co_name
            if name in WATCHED:
                counter[0] += 1
                if counter[0] == limit:
                    os.kill(os.getpid(), signal.SIGKILL)
        return profile

    counter = [0]
    sys.setprofile(watcher(0, counter))
    pipeline.save_pretrained(target)  # how many watched events an export over a folder passes
    sys.setprofile(None)
    events = counter[0]
    killed = []
    for limit in range(1, events + 1):
        pid = os.fork()
        if pid == 0:
            sys.setprofile(watcher(limit, [0]))
            pipeline.save_pretrained(target)
            sys.setprofile(None)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed.append(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
        Pipeline.from_pretrained(target)  # raises if the folder at `target` does not load
    print(json.dumps({"events": events, "killed": sum(killed)}))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_9_at_any_point_of_an_export_leaves_a_model_that_loads(tiny_model, tmp_path):
    """A child process exports over an existing model folder and is killed (SIGKILL) at the k-th
    file-system step of the export, for every k: after each kill the folder still loads."""
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tiny_model), str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["events"] >= 20 and counts["killed"] == counts["events"]
    Pipeline.from_pretrained(target)
    assert torch.equal(
        Pipeline.from_pretrained(target).unet.conv_in.weight, Pipeline.from_pretrained(tiny_model).unet.conv_in.weight
    )


def test_without_an_atomic_exchange_the_export_still_replaces_the_folder(tiny_model, tmp_path, monkeypatch):
    """Where the system cannot exchange two folders in one step, the old one is moved aside."""
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    (target / "stale.txt").write_text("from the old export")
    Pipeline.from_pretrained(tiny_model).save_pretrained(target)
    assert not (target / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    Pipeline.from_pretrained(target)


def test_a_kill_during_a_checkpoint_save_leaves_a_temporary_folder_the_next_save_removes(run_copy, tiny_dict):
    checkpoints = run_copy / "checkpoints"
    stale = checkpoints / "step-000005.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    tiny_dict["train"]["max_steps"] = 6
    train(config_from_dict(tiny_dict), run_copy, resume="latest")
    assert leftovers(run_copy) == [] and (checkpoints / "step-000006").is_dir()


def test_the_kill_script_would_notice_a_folder_that_does_not_load(tmp_path):
    """The check after each kill is real: a model folder missing its UNet does not load."""
    with pytest.raises(UserError):
        Pipeline.from_pretrained(tmp_path)

"""Training checkpoints as safetensors + JSON (no pickle), written atomically.

A checkpoint is a folder `checkpoints/step-000500/` holding
    model.safetensors      the UNet weights being trained
    ema.safetensors        the EMA weights (same names)
    optimizer.safetensors  the optimizer's tensors ("state.<param index>.<name>")
    rng.safetensors        torch RNG states (CPU, CUDA) and the data-order generator
    state.json             step, optimizer hyper-parameters, LR schedule, EMA counters,
                           Python/numpy RNG states, the resolved config
It is written to `step-000500.tmp/` and renamed when complete, so an interrupted save never
replaces or corrupts the last good one; `state.json` is written last, marks it complete and holds
the SHA-256 of every other file, so a file changed on disk afterwards (truncated, a flipped bit) is
found when the checkpoint is read. A save that fails (a full disk) removes its temporary folder.
`--resume latest` takes the newest checkpoint that reads back whole, saying which it passed over.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffusion.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHT_FILES = ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"]


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def default_file_modes(path: Path) -> None:
    """Give the .safetensors files at `path` (a file, or a folder searched recursively) the mode
    an ordinary new file gets (0o666 less the umask). safetensors 0.8 writes through a temporary
    file created private (0o600), then renamed: without this a saved model would be readable by its
    owner only, beside config files that everyone may read."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    for file in [path] if path.is_file() else path.rglob("*.safetensors"):
        os.chmod(file, 0o666 & ~umask)


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    ema,
    optimizer,
    lr_scheduler,
    data_generator: torch.Generator,
    config: dict,
) -> Path:
    """Write checkpoint `directory/step-XXXXXX` atomically; returns its path. A failed write (a
    full disk) leaves no temporary folder behind and is a UserError; the older checkpoints stay."""
    final = directory / f"step-{step:06d}"
    for stale in directory.glob("step-*.tmp") if directory.is_dir() else []:  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    temporary = directory / f"step-{step:06d}.tmp"
    with writing(temporary, f"checkpoint '{final}'"):
        _write_checkpoint(temporary, step, model, ema, optimizer, lr_scheduler, data_generator, config)
    if final.exists():
        shutil.rmtree(final)
    temporary.rename(final)
    return final


WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a failed write as its own error


def disk_full(error: Exception) -> bool:
    """Whether a failed write failed for want of space (safetensors says so only in its message)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"os error {errno.ENOSPC})" in str(error) or f"os error {errno.EDQUOT})" in str(error)


@contextmanager
def writing(temporary: Path, what: str):
    """Fill the folder `temporary` in the block: a write that fails (one of WRITE_ERRORS) removes
    it and is a UserError naming `what` and the problem (`write_problem`)."""
    try:
        yield
    except WRITE_ERRORS as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise UserError(f"cannot write {what}: {write_problem(error)}") from None


def write_problem(error: Exception) -> str:
    """What a failed write (one of WRITE_ERRORS) says to the user: the disk is full, or the reason."""
    if disk_full(error):
        return "the disk is full; free some space and rerun with --resume latest"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
    return f"{reason}; rerun with --resume latest once it can be written"


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or its file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(temporary: Path, path: Path) -> None:
    """Put the complete folder `temporary` at `path`, replacing what is there, so that a reader
    (or a process killed at any instant) finds either the old folder or the new one at `path`,
    never none: the two are exchanged in one step, then the old one is removed. Where the system
    cannot exchange them, the old folder is first moved aside to `.<name>.old`."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists() and _exchange(temporary, path):
        shutil.rmtree(temporary, ignore_errors=True)  # now the old folder
        return
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    shutil.rmtree(old, ignore_errors=True)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checkpoint(
    temporary: Path, step: int, model, ema, optimizer, lr_scheduler, data_generator, config: dict
) -> None:
    temporary.mkdir(parents=True)  # save_checkpoint has removed any left by a killed save
    names = [name for name, _ in model.named_parameters()]
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, temporary / "model.safetensors"
    )
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}, temporary / "ema.safetensors"
    )
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(optimizer_tensors, temporary / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, temporary / "rng.safetensors")
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "step": step,
        "optimizer": optimizer_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "config": config,
        "files": {name: file_digest(temporary / name) for name in WEIGHT_FILES},
    }
    (temporary / "state.json").write_text(json.dumps(state))
    default_file_modes(temporary)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)


def resolve_resume(resume: str, directory: Path) -> Path | None:
    """'latest' -> the newest complete checkpoint in `directory` (None if there is none);
    otherwise a checkpoint folder path that must exist."""
    if resume == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"checkpoint '{resume}' not found; pass a checkpoint folder or --resume latest")
    return path


def load_checkpoint(path: Path) -> dict:
    """Read and check every file of a checkpoint; a missing or corrupt file is a UserError."""
    for name in [*WEIGHT_FILES, "state.json"]:
        if not (path / name).is_file():
            raise UserError(f"checkpoint '{path}' is incomplete: {name} is missing; resume from another checkpoint")
    try:
        state = json.loads((path / "state.json").read_text())
        step = int(state["step"])
        for name, expected in state.get("files", {}).items():  # absent from older checkpoints
            if name not in WEIGHT_FILES or file_digest(path / name) != expected:
                raise ValueError(f"{name} changed since it was saved")
        loaded = {name.split(".")[0]: load_file(path / name) for name in WEIGHT_FILES}
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        SafetensorError,
        KeyError,
        TypeError,
        ValueError,
        OSError,
    ) as error:
        reason = str(error) if "changed since" in str(error) else type(error).__name__
        raise UserError(f"checkpoint '{path}' is corrupt ({reason}); resume from another checkpoint") from None
    return {**loaded, "state": state, "step": step}


def load_latest(directory: Path) -> dict | None:
    """The newest checkpoint in `directory` that reads back whole (`load_checkpoint`), with its
    "path"; each newer one that does not is named on stderr and passed over. None if there is
    none; a UserError if there are checkpoints but none is whole."""
    found = list_checkpoints(directory)
    problems = []
    for path in reversed(found):
        try:
            checkpoint = load_checkpoint(path)
        except UserError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            print(f"warning: {problem.split('; ')[0]}; resuming from '{path}' instead", file=sys.stderr)
        return {**checkpoint, "path": path}
    if problems:
        raise UserError(
            f"no checkpoint in '{directory}' reads back whole (newest: {problems[0].split('; ')[0]}); "
            "start afresh in another --output-dir"
        )
    return None


def restore_rng(checkpoint: dict, data_generator: torch.Generator) -> None:
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    data_generator.set_state(rng["data"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, keys, position = checkpoint["state"]["python_rng"]
    random.setstate((version, tuple(keys), position))
    name, keys, *rest = checkpoint["state"]["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def restore_optimizer(checkpoint: dict, optimizer) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(checkpoint["optimizer"], checkpoint["state"]["optimizer"]))

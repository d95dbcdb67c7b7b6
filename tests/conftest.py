"""Shared test setup: the tiny config, one tiny trained run per session, a CLI runner."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The models here are tiny: a second thread only adds synchronisation (several times slower on 2 cores).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# A model small enough to train (text encoder included) in a few seconds on one CPU core.
TINY = {
    "model": {"channels": [16, 32], "attention_resolutions": [8], "attention_heads": 2},
    "data": {"resolution": 16, "num_samples": 64},
    "text": {"steps": 3, "batch_size": 16, "width": 32, "layers": 1, "vocab_size": 600},
    "train": {
        "max_steps": 4,
        "batch_size": 4,
        "warmup_steps": 0,
        "checkpoint_every": 2,
        "validate_every": 4,
        "keep_checkpoints": 2,
        "validation_steps": 2,
        "validation_prompts": ["a red circle on the left", "a blue square"],
    },
}


def pytest_configure(config):
    # diffusers' schedulers trip a numpy 2 deprecation on every set_timesteps; it is not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def tiny_dict():
    """The tiny config as a nested dict (a fresh copy: edit it freely)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_overrides():
    """The tiny config as command-line overrides: ["model.channels=[16, 32]", ...]."""
    return [f"{section}.{key}={json.dumps(value)}" for section, values in TINY.items() for key, value in values.items()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 4-step run of the tiny config (checkpoints at steps 2 and 4). Read-only: copy it to change it."""
    from diffusion.config import config_from_dict
    from diffusion.training.loop import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(config_from_dict(copy.deepcopy(TINY)), out)
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the session's tiny run (checkpoints at steps 2 and 4, an export) that a test may change."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    """The exported model folder of the tiny run."""
    return tiny_run / "model"


@pytest.fixture
def run_cli():
    """Run `python <script> args...` from the repository root; returns the CompletedProcess."""

    def run(script, *args, timeout=300):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, script, *map(str, args)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run

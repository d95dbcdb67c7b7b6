"""Two-process data-parallel training on the CPU (torchrun, gloo): the ranks stay in sync."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_end_with_identical_weights(tmp_path, tiny_overrides):
    # prefer the torchrun of this interpreter's environment (a venv's bin/ need not be on PATH)
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    torchrun = shutil.which("torchrun", path=search)
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a fresh job, whatever launched pytest
    # torch.distributed's teardown is known to hang now and then (pytorch/pytorch#75097; seen once
    # in CI, after the model was exported): a run that hung after its export (a rank's faulthandler
    # dump) is tried once more in a fresh folder; a second such hang, or any other, fails.
    hangs = []
    for attempt in range(2):
        out = tmp_path / f"ddp-{attempt}"
        result = subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                str(REPO / "tests" / "ddp_worker.py"),
                str(out),
                *tiny_overrides,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if "Timeout (0:" not in result.stderr or "exported the EMA model" not in result.stdout:
            break
        hangs.append(result.stderr[-3000:])
    assert len(hangs) < 2, "\n\n".join(hangs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "2 process(es)" in result.stdout

    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    saved = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")  # written by rank 0 only
    assert rank0.keys() == rank1.keys() == saved.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved[name]), name
    # the ranks did train: the weights moved since the step-2 checkpoint
    earlier = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert any(not torch.equal(earlier[name], rank0[name]) for name in rank0)
    assert (out / "model" / "model_index.json").is_file()

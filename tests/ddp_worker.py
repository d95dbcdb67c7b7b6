"""Run by tests/test_multiprocess.py under torchrun: train like train.py, then let every rank
write its final (trained, not EMA) UNet weights to OUTPUT_DIR/rank<k>.safetensors.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR key=value ...

A rank still running after HANG_SECONDS (the run takes about 10) prints every thread's stack and
exits, so a hang shows where it is instead of running into the test's timeout.
"""

import faulthandler
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from diffusion.config import load_config
from diffusion.training import loop as training

HANG_SECONDS = 120
UNet = training.UNet
created = []


def recording_unet(*args, **kwargs):
    """UNet(...), remembering the instance so its weights can be read after train()."""
    unet = UNet(*args, **kwargs)
    created.append(unet)
    return unet


def main():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    output_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    training.UNet = recording_unet
    training.train(load_config(None, overrides), output_dir)
    (unet,) = created
    rank = int(os.environ["RANK"])
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, output_dir / f"rank{rank}.safetensors"
    )


if __name__ == "__main__":
    main()

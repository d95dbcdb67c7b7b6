"""Helpers shared by the command lines: one-line warnings and errors, malloc set up for PyTorch, and
the model and sampling options sample.py, evaluate.py and app.py have in common."""

import argparse
import ctypes
import ctypes.util
import math
import os
import warnings

from diffusion.config import (
    DEFAULT_EDIT_STEPS,
    DEFAULT_GUIDANCE_CUTOFF,
    DEFAULT_SAMPLER,
    KEEP_LAYOUT,
    MIXED_PRECISION,
    SAMPLER_NAMES,
    WEIGHT_CONTEXTS,
    WEIGHT_MODES,
)
from diffusion.errors import UserError


def one_line_warnings() -> None:
    """Print warnings as 'warning: message' instead of a file/line dump."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line `UserError` (exit 2 through exit_on_user_error)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def check_device(device: str | None) -> None:
    """A one-line UserError unless `device` (a --device value; None: the best available, always
    fine) names a device this PyTorch can hold tensors on: before a model is loaded onto it."""
    if device is None:
        return
    import torch  # here: the command lines parse their arguments without loading torch

    try:
        kind = torch.device(device).type
        torch.empty(0, device=device)
    except Exception as error:  # torch raises RuntimeError, AssertionError (no CUDA), ModuleNotFoundError, ...
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise UserError(f"--device {device!r} cannot be used here ({detail}); choose cpu, or cuda or mps") from None
    if kind == "meta":
        raise UserError("--device 'meta' holds no data, so nothing can be computed on it; choose cpu, or cuda or mps")


# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def tune_malloc() -> bool:
    """Set glibc's malloc up for PyTorch on a CPU, in this process: every block from the heap,
    never from a fresh mmap, and freed memory kept there for reuse.

    PyTorch on CPU frees and allocates activation-sized blocks at every step. By default glibc
    serves large ones from fresh mmaps, which the kernel zeroes and faults in again, 4 KiB at a
    time, each time: a training step spends much of its time in page faults. Kept on the heap, the
    blocks are reused, a step faults nothing and runs faster, with the same results bit for bit
    (the measurement: docs/what-we-tried.md).
    Returns whether it applied: not off glibc, and not when GLIBC_TUNABLES already sets malloc up
    (which is also the way to opt out: GLIBC_TUNABLES=glibc.malloc.mmap_max=65536)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# ---- the options sample.py, evaluate.py and app.py share -------------------------------------
def fraction(option: str):
    """An argparse type: a fraction in [0, 1], else a one-line error naming `option`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise UserError(f"{option} must be a fraction in [0, 1], got '{text}'")
        return value

    return parse


def fraction_window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"expected a window like 0,0.5 (two fractions), got '{text}'") from None
    return start, end


def resolution_set(text: str) -> set[int]:
    try:
        return {int(v) for v in text.split(",")}
    except ValueError:
        raise UserError(f"expected feature-map sides like 16,8, got '{text}'") from None


def add_model_options(parser: argparse.ArgumentParser, required: bool = True, precision_help: str | None = None):
    """--model, --device and --mixed-precision."""
    model_help = (
        "model folder written by train.py (e.g. runs/shapes/model), or a local diffusers Stable Diffusion "
        "or SDXL pipeline folder"
    )
    parser.add_argument("--model", required=required, help=model_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=MIXED_PRECISION,
        help=precision_help
        or "autocast of the UNet (default auto: bf16 where the device does it natively, else float32)",
    )


SAMPLING_OPTIONS = {  # option -> argparse keywords; `SamplingSettings` says what each does
    "--steps": dict(type=int, default=20, help="sampling steps (default 20)"),
    "--guidance": dict(type=float, default=3.0, help="classifier-free guidance scale (default 3; 1 = off)"),
    "--guidance-cutoff": dict(
        type=fraction("--guidance-cutoff"),
        default=DEFAULT_GUIDANCE_CUTOFF,
        help="guidance acts in this first fraction of the steps; the rest denoise without the unconditional "
        f"half, at half the work (default {DEFAULT_GUIDANCE_CUTOFF:g}; 1: every step)",
    ),
    "--sampler": dict(
        default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES, help="euler (default), dpm++ (DPM-Solver++ 2M), ddim, ddpm"
    ),
    "--negative-prompt": dict(default=None, help="used instead of the empty prompt for guidance"),
    "--weight-mode": dict(
        default=WEIGHT_MODES[0],
        choices=WEIGHT_MODES,
        help="how (word:w) weights act: scale cross-attention (default) or text embeddings",
    ),
    "--weight-context": dict(
        default=WEIGHT_CONTEXTS[0],
        choices=WEIGHT_CONTEXTS,
        help="fade (default): a word weighted below 1 also fades out of the other words' text "
        "states, where the causal CLIP wrote it; keep: leave them (plain Prompt-to-Prompt)",
    ),
    "--weight-steps": dict(
        default=None,
        type=fraction_window,
        help="window of steps (fractions start,end) where weights act (default 0,1 in attention mode, "
        "0,0.3 in embedding mode, where a word at 0 stays deleted after it)",
    ),
    "--attention-resolutions": dict(
        type=resolution_set,
        default=None,
        help="feature-map sides (e.g. 16,8) where weights, swaps and map recording act (default all)",
    ),
    "--edit-steps": dict(
        type=fraction("--edit-steps"),
        default=DEFAULT_EDIT_STEPS,
        help=f"word swaps: the fraction of steps the source's maps are injected in (default {DEFAULT_EDIT_STEPS:g})",
    ),
    "--local-blend": dict(
        action="store_true",
        help="word swaps keep the source's pixels outside the changed words' maps (Prompt-to-Prompt's local blend)",
    ),
    "--keep-layout": dict(
        default="auto",
        choices=KEEP_LAYOUT,
        help="word swaps: the other words keep the source's maps at every step, so outlines stay (auto: on "
        "when only colour words change; when only size words change, the resized object is drawn anew and the "
        "rest kept; off for other swaps, whose new shape needs its outline free)",
    ),
}


def add_sampling_options(parser: argparse.ArgumentParser, options: list[str], helps: dict[str, str] | None = None):
    """The `options` of SAMPLING_OPTIONS, with `helps` in place of their help texts."""
    for option in options:
        keywords = dict(SAMPLING_OPTIONS[option])
        keywords["help"] = (helps or {}).get(option, keywords["help"])
        parser.add_argument(option, **keywords)


def sampling_settings(args: argparse.Namespace):
    """The `SamplingSettings` of parsed sampling options; those a command line lacks keep their defaults."""
    from diffusion.control.weighting import Weighting  # here: parsing a command line does not load torch
    from diffusion.sampling.settings import SamplingSettings

    given = vars(args)
    weighting = Weighting(
        given.get("weight_mode", WEIGHT_MODES[0]),
        given.get("weight_steps"),
        given.get("attention_resolutions"),
        given.get("weight_context", WEIGHT_CONTEXTS[0]),
    )
    names = ("steps", "guidance", "guidance_cutoff", "sampler", "negative_prompt", "edit_steps", "local_blend")
    settings = {name: given[name] for name in names if name in given}
    if "keep_layout" in given:
        settings["keep_layout"] = KEEP_LAYOUT[given["keep_layout"]]
    return SamplingSettings(weighting=weighting, **settings)

"""Helpers shared by the command lines: one-line warnings and errors, and malloc set up for PyTorch."""

import argparse
import ctypes
import ctypes.util
import os
import warnings

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

"""Helpers shared by the command lines: one-line warnings and errors, and huge pages."""
import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError


def one_line_warnings() -> None:
    """Print warnings as 'warning: message' instead of a file/line dump."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line `UserError` (exit 2 through exit_on_user_error)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


# 2 MiB pages for malloc's blocks; every block from the heap, never from a fresh mmap (which
# the kernel must zero and fault in again at each allocation); freed memory kept for reuse
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


def huge_pages_supported() -> bool:
    """Linux with glibc 2.35 or newer (the first that reads glibc.malloc.hugetlb), and
    transparent huge pages not switched off ('always' or 'madvise' in sysfs)."""
    if sys.platform != "linux":
        return False
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        if libc != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
            return False
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except (ValueError, OSError, AttributeError):
        return False


def relaunch_with_huge_pages() -> None:
    """Start this command again, once, with glibc's malloc set up for PyTorch on a CPU
    (GLIBC_TUNABLES=`MALLOC_TUNABLES`), then run it there.

    PyTorch on CPU frees and allocates activation-sized blocks at every step. By default glibc
    serves large ones from fresh mmaps and hands freed heap back to the kernel, so each step faults
    its memory in again, 4 KiB at a time, zeroed (20,000 minor faults per training step of the
    default, 160,000 per step of the small CLIP). Kept in a heap of transparent huge pages, a
    step faults nothing: on the 2-core Intel machine the UNet trained 1.19x as fast, the CLIP
    1.14x and sampling 1.11x (`python bench/bench_huge_pages.py`), with the same results bit for
    bit. glibc reads the tunables only when a process starts, hence the exec: call this first
    thing under `__main__`, before torch is imported. It does nothing off Linux and glibc 2.35+,
    where transparent huge pages are off, or when GLIBC_TUNABLES already names
    glibc.malloc.hugetlb (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts out)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not sys.executable or not huge_pages_supported():
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLES}" if tunables else MALLOC_TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # the interpreter cannot be started again: run here, with 4 KiB pages
        os.environ["GLIBC_TUNABLES"] = tunables
        if not tunables:
            del os.environ["GLIBC_TUNABLES"]

"""The C library's memory allocator, tuned so that a training step stops paying the kernel for its memory.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands a block above its mmap
threshold (128 KiB at start, raised as such blocks are freed) out as fresh pages from the kernel, and
gives the free top of its heap back to the kernel once it exceeds the trim threshold. A training step
allocates and frees the same few-MB activations on every step, so the kernel zeroes and maps the same
pages again and again. Measured on the project's 2-core box (`benchmarks/bench_allocator.py`, six
alternating whole runs, medians; benchmarks/results/allocator_epyc.md): a 3-epoch yolov5n run at 320 px
took 2.76 M minor page faults and 9.9 s of system time; with both thresholds raised (`keep_freed_memory`)
freed blocks stay in the process for the next step: 0.36 M faults (about the first touch of the peak
memory), 3.5 s of system time, the training epochs 15 % faster (12 % for the demo's distillation),
peak RSS 5-7 % higher. The default's fault count also varies from run to run (2.0-3.8 M), and with it
the run's speed.

Only the thresholds change, through glibc's ``mallopt``: nothing is replaced or preloaded. Setting
both matters: a fixed trim threshold alone also freezes the mmap threshold at 128 KiB (9 M faults
in one epoch of that run).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**30  # free heap kept before any is returned: more than a step's activations

# A user's own allocator choice wins: environment variables that set these thresholds, or a
# preloaded allocator (jemalloc, tcmalloc) whose malloc glibc's mallopt would not reach anyway.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def _user_setting() -> str:
    """The environment variable through which the user already chose the allocator's behaviour, or ''."""
    for name in _USER_SETTINGS:
        if os.environ.get(name):
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return ""


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds so freed tensor memory is reused, not returned to the kernel.

    Called once by each command-line entry point (training, val.py, detect.py); process-wide and
    harmless to repeat. Returns what was done, for logs and tests: 'kept' when both thresholds were
    set, otherwise why not ('not glibc', 'left to <VARIABLE>', 'mallopt refused').
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    user = _user_setting()
    if user:
        return f"left to {user}"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mmap first: setting any threshold ends glibc's dynamic adjustment, and the trim threshold
    # alone would leave every block over 128 KiB to fresh kernel pages.
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "kept" if ok else "mallopt refused"


__all__ = ["keep_freed_memory"]

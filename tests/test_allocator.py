"""utils.allocator: freed memory is reused instead of re-faulted, and a user's own allocator choice wins."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import detect
import train_distill
import utils.allocator as allocator
import val

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate and free a step's worth of 1-7 MiB blocks (as a forward and backward pass do) 20 times,
# counting the minor page faults, before and after keep_freed_memory(). numpy, not torch: same malloc,
# faster start.
_CHURN = """
import resource, sys
import numpy as np
from utils.allocator import keep_freed_memory

def faults_of_churn(rounds=20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        blocks = [np.ones((k % 7 + 1) * 2**18, np.float32) for k in range(24)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

faults_of_churn(3)
default = faults_of_churn()
outcome = keep_freed_memory()
faults_of_churn(3)
print(outcome, default, faults_of_churn())
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", _CHURN], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    outcome, default, kept = proc.stdout.split()
    assert outcome == "kept"
    # 20 rounds of 96 MiB: glibc's defaults hand most of it back and fault it in again (~24 k pages a
    # round); kept, the blocks are served from the process's own heap.
    assert int(default) > 100_000
    assert int(kept) < int(default) / 20


@pytest.mark.parametrize(("variable", "value"), [
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("MALLOC_MMAP_THRESHOLD_", "65536"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
])
def test_a_users_own_allocator_settings_win(monkeypatch, variable, value):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert allocator.keep_freed_memory() == f"left to {variable}"


def test_unrelated_glibc_tunables_do_not_count_as_a_choice(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert allocator._user_setting() == ""


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() == "not glibc"


@pytest.mark.parametrize(("module", "patch_target", "argv"), [
    (train_distill, allocator, ["--data", "no/such/data.yaml", "--cfg", "models/yolov5p.yaml", "--epochs", "1"]),
    (val, val, ["--data", "no/such/data.yaml", "--weights", "no/such/model.pt"]),
    (detect, detect, ["--weights", "no/such/model.pt", "--source", "no/such/images"]),
])
def test_every_entry_point_keeps_freed_memory(monkeypatch, tmp_path, module, patch_target, argv):
    calls = []
    monkeypatch.setattr(patch_target, "keep_freed_memory", lambda: calls.append(1) or "kept")
    monkeypatch.chdir(tmp_path)  # nothing of a failed start lands in the repository
    with contextlib.suppress(SystemExit):  # val.py exits with status 2 on the missing files
        module.main(argv)
    assert calls == [1]

"""Freed host memory kept for reuse: a step's large tensors stop costing page faults."""

import platform
import subprocess
import sys

import pytest

# Allocates and frees a 48 MiB tensor (above glibc's largest mmap threshold, 32 MiB)
# 30 times and prints the minor page faults of the last 10 allocations together.
_SCRIPT = """
import resource, sys, torch
from d9d.core.host_memory import reuse_freed_host_memory
print(reuse_freed_host_memory() if sys.argv[1] == "reuse" else "defaults")
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(24 * 2**20, dtype=torch.bfloat16).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-10:]))
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    note, count = out.stdout.strip().splitlines()
    return note, int(count)


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the setting is glibc's; elsewhere it is a no-op"
)
def test_reuse_removes_the_page_faults_of_large_tensors():
    # 48 MiB is 12,288 pages of 4 KiB: glibc's defaults map them afresh every time.
    _, default_faults = _faults("defaults")
    assert default_faults > 10 * 10_000, default_faults
    note, reuse_faults = _faults("reuse")
    assert note.startswith("glibc malloc keeps freed memory for reuse"), note
    assert reuse_faults < 1_000, reuse_faults


def test_reuse_is_a_no_op_outside_glibc(monkeypatch):
    from d9d.core import host_memory

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.reuse_freed_host_memory() is None

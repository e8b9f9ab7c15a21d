"""The malloc policy of model processes (ops/malloc_policy.cpp): under `lean` (the default) torch's
CPU allocator advises transparent huge pages for tensors of 4 MB or more, where the kernel offers
them, so that such a tensor faults in per 2 MB instead of per 4 KB; `system` leaves allocation
alone. Each case runs in a fresh process (the policy is per process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from efa_deploy.ops import OPS_LIBRARY

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = r"""
import ctypes, json, re
import torch
import efa_deploy  # loads the operators and applies EFA_DEPLOY_MALLOC
from efa_deploy.ops import OPS_LIBRARY
advice = ctypes.CDLL(str(OPS_LIBRARY)).efa_huge_page_advice()
t = torch.ones(16 << 20)  # 64 MB
inner = t.data_ptr() + (32 << 20)  # inside the advised, 2 MB-aligned interior
eligible = None
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= inner < int(head.group(2), 16)
        elif inside and line.startswith("THPeligible:"):
            eligible = int(line.split()[1])
print(json.dumps({"advice": advice, "eligible": eligible, "sum": float(t.sum())}))
"""


def thp_mode() -> str:
    try:
        return re.search(r"\[(\w+)\]", THP.read_text()).group(1)
    except (OSError, AttributeError):
        return "absent"


def probe(policy: str) -> dict:
    env = dict(os.environ, EFA_DEPLOY_MALLOC=policy, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")
def test_lean_policy_advises_huge_pages_for_large_tensors_and_system_does_not():
    mode = thp_mode()
    lean, system = probe("lean"), probe("system")
    assert lean["sum"] == system["sum"] == float(16 << 20)
    assert system["advice"] == 0
    if mode not in ("madvise", "always"):
        assert lean["advice"] == 0  # nothing offered, nothing wrapped
        pytest.skip(f"transparent huge pages are {mode} on this kernel")
    assert lean["advice"] == 1
    if lean["eligible"] is None:
        pytest.skip("this kernel's smaps has no THPeligible field")
    assert lean["eligible"] == 1
    if mode == "madvise":  # negative control: without the advice the same tensor's memory is not eligible
        assert system["eligible"] == 0

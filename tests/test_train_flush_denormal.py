"""``flush_denormal``: every intra-op thread treats denormal floats as zero, which only holds when
the mode is set before the thread pool starts (threads inherit it when they are created)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = """
import torch
from omegaconf import OmegaConf
from attnlab.train import _set_flush_denormal
torch.set_num_threads(2)
def surviving():
    # the smallest denormal, made without float arithmetic (which the mode would already flush);
    # a two-thread product: each thread computes half, integer compares count what survived
    denormals = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)
    return int(((denormals * 1.0).view(torch.int32) != 0).sum())
if {pool_first}:
    surviving()  # starts the pool before the mode is set
_set_flush_denormal(OmegaConf.create({{"flush_denormal": True}}))
print(surviving())
"""


def surviving_denormals(pool_first: bool) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(pool_first=pool_first)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
def test_flush_denormal_reaches_every_thread_when_set_first():
    assert surviving_denormals(pool_first=False) == 0
    # set after the pool exists, the worker thread keeps computing denormals
    assert surviving_denormals(pool_first=True) > 0

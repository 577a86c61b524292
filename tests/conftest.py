"""Shared fixtures: a tiny model config, the real data folder when present, and a runner for
``train.py`` in a subprocess (the way users run it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Tests never reach the network: Hugging Face libraries must fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The real WikiText-2 / GPT-2 files, present beside the repository in CI.
SHARED_DATA = Path(os.environ.get("ATTNLAB_SHARED_DATA", ROOT.parent / "shared" / "data"))

TINY_MODEL = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=64, vocab_size=97,
                  dropout=0.0, attn_dropout=0.0, pos_encoding="rope", loss_chunk_size=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def threads(request):
    """``torch.set_num_threads(N)`` for one test (``@pytest.mark.parametrize("threads", [N], indirect=True)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_cfg():
    from attnlab.config import ModelConfig

    return ModelConfig(**TINY_MODEL)


def has_shared_data() -> bool:
    return (SHARED_DATA / "wikitext-2" / "wiki.train.tokens").is_file()


def has_gpt2_ranks() -> bool:
    return (SHARED_DATA / "tokenizers" / "gpt2.tiktoken").is_file()


def run_train(args: list[str], tmp_path: Path, *, env: dict | None = None, check: bool = True,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` from the repository root, writing under ``tmp_path``."""
    full_env = {**os.environ, "ATTNLAB_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    cmd = [sys.executable, "train.py", *args, f"paths.log_dir={tmp_path / 'outputs'}"]
    if not any(a.startswith("hydra.run.dir") or a == "-m" or a == "--multirun" for a in args):
        cmd.append(f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc

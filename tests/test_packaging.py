"""attnlab installed as a package, the way a project that depends on it installs it.

A wheel is built from this checkout (and one from its sdist: the same files), installed into a
fresh virtualenv with no checkout on its path, and used from another directory: every preset
through the Python API, a sweep through ``attnlab-train`` with the report at its end,
``attnlab-report``, ``attnlab-bench`` and ``attnlab-sample``, and the example project of the README
(tests/example_project: its own mechanism, presets and experiment in a user config directory).

No network: the build runs without isolation, and instead of installing torch and the other
dependencies again the fresh virtualenv sees this environment's site-packages through a ``.pth``
line. Only the site directories' own ``.pth`` files are processed, not those of a directory a
``.pth`` line adds, so the editable install of this checkout does not leak in.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

EXAMPLE = ROOT / "tests" / "example_project"
TINY = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=64, vocab_size=100)
FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=4", "data.max_eval_tokens=512",
        "logger=none", "callbacks=none"]

#: Run by the installed interpreter: where attnlab comes from, every preset built and run, and
#: the example project's preset (a MoAS over one of its own) found through ATTNLAB_CONFIG_PATH.
PYTHON_API = """
import json, os, sys
from pathlib import Path
import torch
import attnlab, attnlab.model
from attnlab.attention import preset_names
from attnlab.model import GPT
from attnlab.paths import CONF_DIR

venv = Path(sys.prefix).resolve()
for location in (attnlab.__file__, attnlab.model.__file__, CONF_DIR):
    assert Path(location).resolve().is_relative_to(venv), (location, venv)
expected, dims = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert preset_names() == expected, (preset_names(), expected)
idx = torch.randint(0, dims["vocab_size"], (2, 16))
for name in expected:
    loss = GPT.from_config(dims, name)(idx, idx).loss
    assert torch.isfinite(loss), name

import my_project.my_attention
os.environ["ATTNLAB_CONFIG_PATH"] = "my_conf"
model = GPT.from_config(dims, "my_moas")
branch = model.blocks[0].attn.branches[1]
assert type(branch).__name__ == "MyAttention" and branch.cfg.temperature == 2.0, branch
assert torch.isfinite(model(idx, idx).loss)
print("python api ok:", len(expected), "presets")
"""


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _copy_sources(dest: Path) -> Path:
    """What a build reads, copied so that its build/ and *.egg-info never land in the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", dest / "src", symlinks=True, ignore=ignore)  # src/attnlab/conf stays a link
    shutil.copytree(ROOT / "conf", dest / "conf", ignore=ignore)
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, source],
         cwd=source)
    (wheel,) = out.glob("attnlab-*.whl")
    return wheel


def _wheel_from_sdist(source: Path, tmp_path: Path) -> Path:
    sdists = tmp_path / "sdist"
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(sdists)!r})"],
         cwd=source)
    (sdist,) = sdists.glob("attnlab-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(sdists, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = sdists / sdist.name.removesuffix(".tar.gz")
    assert not any(p.is_symlink() for p in unpacked.rglob("*")), "the sdist must hold the configs as files"
    return _build_wheel(unpacked, tmp_path / "wheel-from-sdist")


def _fresh_venv(path: Path, wheel: Path) -> Path:
    """A virtualenv with only ``wheel`` installed, seeing this environment's dependencies."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
         cwd=path.parent)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path.parent)
    parent = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (Path(purelib.stdout.strip()) / "parent_env.pth").write_text("\n".join(parent) + "\n")
    return path / "bin"


@pytest.mark.slow
def test_installed_wheel_from_another_directory(tmp_path):
    source = _copy_sources(tmp_path / "source")
    wheel = _build_wheel(source, tmp_path / "wheel")
    files = zipfile.ZipFile(wheel).namelist()
    configs = sorted(f"attnlab/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml"))
    assert sorted(f for f in files if f.startswith("attnlab/conf/")) == configs
    # the C sources built on first use: the sparse mechanism's CPU kernels, the decoding kernel and its operator
    for name in ("selected.c", "decode.c", "decode_op.cpp"):
        assert f"attnlab/attention/csrc/{name}" in files
    assert sorted(zipfile.ZipFile(_wheel_from_sdist(source, tmp_path)).namelist()) == sorted(files)
    entry_points = zipfile.ZipFile(wheel).read(next(f for f in files if f.endswith("entry_points.txt"))).decode()
    assert all(f"attnlab-{name} = attnlab.cli:{name}" in entry_points for name in ("train", "bench", "sample", "report"))

    bin_dir = _fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "work"  # the user's project: no checkout, no attnlab/ folder
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATTNLAB_CONFIG_PATH", "ATTNLAB_CACHE_DIR")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")

    presets = sorted(p.stem for p in (ROOT / "conf" / "attention").glob("*.yaml"))
    proc = _run([bin_dir / "python", "-c", PYTHON_API, json.dumps(presets), json.dumps(TINY)], cwd=work, env=env)
    assert "python api ok" in proc.stdout

    # a sweep over a packaged preset and the project's MoAS preset (whose branch is the project's
    # preset, found through --config-dir), its mechanism imported by the experiment's `imports`
    project_env = {**env, "PYTHONPATH": str(work)}
    _run([bin_dir / "attnlab-train", "--config-dir", "my_conf", "-m", "experiment=my_experiment",
          "attention=gqa_2,my_moas", *FAST], cwd=work, env=project_env)
    (sweep,) = (work / "outputs" / "my_experiment" / "multiruns").iterdir()  # under ./outputs of the working directory
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir() if d.is_dir() and d.name[0].isdigit()}
    assert sorted(metrics) == ["0_gqa_2_seed1337", "1_my_moas_seed1337"]
    assert all(m["status"] == "completed" and m["steps"] == 4 for m in metrics.values()), metrics
    assert metrics["1_my_moas_seed1337"]["attention"] == {"name": "moas", "branches": ["mha", "my_attention"]}
    assert sorted(json.loads((sweep / "report.json").read_text())["ranking"]) == ["gqa_2", "my_moas"]
    assert (work / ".cache" / "attnlab").is_dir()  # the token cache too

    report = _run([bin_dir / "attnlab-report", sweep, "--reference", "gqa_2", "--out", work / "report"], cwd=work, env=env)
    assert "my_moas" in report.stdout and (work / "report" / "results.md").is_file()
    bench = _run([bin_dir / "attnlab-bench", "bench=quick", "--cfg", "job"], cwd=work, env=env)
    assert "name: quick" in bench.stdout  # conf/bench/quick.yaml ships with the package
    # attnlab-sample composes the packaged sample config; bad input: one line, exit status 2
    assert "attnlab-sample" in _run([bin_dir / "attnlab-sample", "--help"], cwd=work, env=env).stdout
    missing = subprocess.run([bin_dir / "attnlab-sample", "ckpt_path=missing.ckpt", "prompt=hi"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stdout == "", missing
    assert missing.stderr.strip().splitlines() == [
        "error: ckpt_path='missing.ckpt': file not found; allowed: an existing checkpoint file"]

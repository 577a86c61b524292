"""``attnlab-sample`` / ``scripts/sample.py``: sampling from a checkpoint of a tiny run trained through train.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab import sample
from attnlab.checkpoint import atomic_torch_save, load_checkpoint
from attnlab.data.tokenizers import tokenizer_from_spec
from tests.conftest import ROOT, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-layer character model with learned positions (context 64) after 20 steps on the synthetic corpus."""
    tmp_path = tmp_path_factory.mktemp("sample")
    run_train(["experiment=smoke", "trainer.max_steps=20", "trainer.val_check_interval=20", "data.max_eval_tokens=1024",
               "logger=none", "attention=gqa_2", "model.pos_encoding=learned"], tmp_path)
    return tmp_path / "run"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("sample", overrides=overrides)


def sample_run(overrides: list[str]) -> tuple[dict, str, str]:
    out, err = io.StringIO(), io.StringIO()
    result = sample.sample(compose(overrides), out=out, err=err)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_greedy_sampling_equals_eager_generate(trained_run, compile):
    """Greedy tokens through the cached path (compiled with compile=true) equal model.generate
    decoding eagerly; the text streamed is the prompt and the decoded tokens."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    torch._dynamo.reset()
    result, out, err = sample_run([f"ckpt_path={ckpt}", "prompt=the cat", "max_new_tokens=30", "temperature=0",
                                   f"compile={str(compile).lower()}"])
    checkpoint = load_checkpoint(ckpt)
    model = sample.load_model(checkpoint, str(ckpt))
    tokenizer = tokenizer_from_spec(checkpoint["attnlab"]["tokenizer"])
    prompt = torch.tensor([result["prompt_ids"]])
    assert result["prompt_ids"] == tokenizer.encode("the cat").tolist()
    expected = model.generate(prompt, max_new_tokens=30, temperature=0)[0, prompt.shape[1]:].tolist()
    assert result["new_ids"] == expected
    assert out == "the cat" + tokenizer.decode(expected) + "\n"
    assert "30 tokens" in err and "tokens/s" in err


@pytest.mark.slow
def test_sampling_is_seeded_and_stays_in_top_k(trained_run):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "prompt=a", "max_new_tokens=20", "temperature=1.0", "top_k=1"]
    first, _, _ = sample_run([*args, "seed=1"])
    assert first["new_ids"] == sample_run([*args, "seed=2"])[0]["new_ids"]  # top_k=1 is greedy
    args[-1] = "top_k=null"
    assert sample_run([*args, "seed=3"])[0]["new_ids"] == sample_run([*args, "seed=3"])[0]["new_ids"]


@pytest.mark.slow
def test_checkpoints_without_a_tokenizer_record_use_the_run_config(trained_run, tmp_path):
    """Checkpoints written before the record: the run directory's config.json rebuilds the tokenizer."""
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    spec = checkpoint["attnlab"].pop("tokenizer")
    old = tmp_path / "checkpoints" / "old.ckpt"
    atomic_torch_save(checkpoint, old)
    (tmp_path / "config.json").write_text((trained_run / "config.json").read_text())
    rebuilt, run_cfg = sample.tokenizer_spec(load_checkpoint(old), str(old))
    assert rebuilt == spec and run_cfg is not None
    result, _, _ = sample_run([f"ckpt_path={old}", "prompt=the", "max_new_tokens=5", "temperature=0"])
    assert len(result["new_ids"]) == 5


def error_line(overrides: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        sample.run(compose(overrides))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_bad_input_stops_with_one_line(trained_run, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert error_line([f"ckpt_path={tmp_path / 'missing.ckpt'}", "prompt=a"], capsys).startswith(
        f"error: ckpt_path='{tmp_path / 'missing.ckpt'}': file not found")
    assert error_line([f"ckpt_path={ckpt}", "prompt=''"], capsys) == (
        "error: prompt='': empty prompt; allowed: a non-empty string")
    assert error_line([f"ckpt_path={ckpt}"], capsys).startswith("error: prompt=None")
    # learned positions: the model's context is 64 tokens (characters here)
    assert error_line([f"ckpt_path={ckpt}", f"prompt={'a' * 65}"], capsys) == (
        "error: prompt: 65 tokens, longer than the model's context of 64 tokens (learned absolute positions)")
    assert error_line([f"ckpt_path={ckpt}", "prompt=abc", "max_new_tokens=62"], capsys) == (
        "error: max_new_tokens=62: the prompt's 3 tokens and 62 new ones exceed the model's context of 64 tokens "
        "(learned absolute positions)")

    checkpoint = load_checkpoint(ckpt)
    checkpoint["attnlab"]["tokenizer"] = {"name": "sentencepiece", "vocab_size": 32000}
    unknown = tmp_path / "unknown.ckpt"
    atomic_torch_save(checkpoint, unknown)
    assert error_line([f"ckpt_path={unknown}", "prompt=a"], capsys) == (
        "error: tokenizer: unknown tokenizer 'sentencepiece'; known: gpt2, char")

    del checkpoint["attnlab"]["tokenizer"]
    orphan = tmp_path / "orphan.ckpt"  # no tokenizer record and no run config beside it
    atomic_torch_save(checkpoint, orphan)
    assert "records no tokenizer and there is no run config" in error_line([f"ckpt_path={orphan}", "prompt=a"], capsys)


@pytest.mark.slow
def test_the_command_exits_with_status_2_on_bad_input(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "scripts/sample.py", f"ckpt_path={tmp_path / 'none.ckpt'}", "prompt=hi"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: ckpt_path='{tmp_path / 'none.ckpt'}': file not found; allowed: an existing checkpoint file"]
    assert proc.stdout == ""

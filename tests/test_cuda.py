"""The CUDA paths against the CPU float32 paths: every preset's forward on the GPU (memory-efficient
and flash SDPA, compiled flex attention for sliding windows, flash-linear-attention kernels under
bf16), cached decoding (eager, and the compiled static step with CUDA graphs), bf16 training
steps, and ``train.py trainer=gpu``. Skipped without a GPU
(CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from attnlab.attention import AttentionContext, load_preset, preset_names, resolve_attention
from attnlab.attention import sliding as sliding_module
from attnlab.config import ModelConfig
from attnlab.model import GPT
from attnlab.profiling import count_flops
from tests.conftest import TINY_MODEL, run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PRESETS = preset_names()
#: Long enough that sliding_256 leaves its window (flex attention) and sparse_256 selects.
LONG = 300


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """TF32 off: CUDA float32 must then agree with the CPU to float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cpu_and_cuda(preset: str, dtype=torch.float32, **model) -> tuple[GPT, GPT]:
    """The same weights on the CPU and on the GPU."""
    torch.manual_seed(0)
    cpu = GPT.from_config({**TINY_MODEL, "max_seq_len": LONG, **model}, load_preset(preset)).to(dtype).eval()
    return cpu, copy.deepcopy(cpu).cuda()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm()).item()


@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_forward_matches_cpu(preset):
    # top-k selections (sparse's indexer over 300 keys) flip on float32 near-ties between the two
    # devices' rounding; float64 keeps the comparison about the algorithm
    dtype = torch.float64 if preset.startswith("sparse") else torch.float32
    cpu, gpu = _cpu_and_cuda(preset, dtype)
    idx = torch.randint(0, 97, (2, LONG))
    with torch.no_grad():
        want, got = cpu(idx).logits, gpu(idx.cuda()).logits
    assert _relative_error(got, want) < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_stays_close_to_float32(preset):
    _, gpu = _cpu_and_cuda(preset)
    idx = torch.randint(0, 97, (2, LONG), device="cuda")
    with torch.no_grad():
        want = gpu(idx).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu(idx).logits
    assert torch.isfinite(got).all()
    assert _relative_error(got.float(), want) < 3e-2


@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_cached_decoding_equals_full_forward(preset):
    _, gpu = _cpu_and_cuda(preset)
    idx = torch.randint(0, 97, (2, 40), device="cuda")
    with torch.no_grad():
        full = gpu(idx).logits
        cache = gpu.init_cache(2, 40)
        parts = [gpu(idx[:, :17], cache=cache).logits, gpu(idx[:, 17:22], cache=cache).logits]
        parts += [gpu(idx[:, t:t + 1], cache=cache).logits for t in range(22, 40)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == gpu.cache_bytes(2, 40)


@pytest.mark.parametrize("attention", ["mha", "gqa_2", "mqa", "mla", "linear", "moh", "static_moas",
                                       {"name": "sliding", "window": 8}, {"name": "sparse", "top_k": 8}],
                         ids=lambda a: a if isinstance(a, str) else a["name"])
def test_compiled_step_with_cuda_graphs_equals_the_full_forward(attention):
    """GPT.step(compile=True) on CUDA: mode="reduce-overhead" (CUDA graphs) over caches whose
    addresses are marked static; one graph for 40 positions (the window wrapping, the top-k
    selection starting), the full forward's logits, the cache still its closed form."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    gpu = GPT.from_config(TINY_MODEL, attention).cuda().eval()
    idx = torch.randint(0, 97, (2, 48), device="cuda")
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        full = gpu(idx).logits
        cache = gpu.init_cache(2, 48)
        gpu(idx[:, :8], cache=cache)
        steps = [gpu.step(idx[:, t:t + 1], cache, compile=True) for t in range(8, 48)]
    assert counters["stats"]["unique_graphs"] - graphs == 1
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 8:], atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == gpu.cache_bytes(2, 48)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_training_step_reaches_every_parameter(preset):
    _, gpu = _cpu_and_cuda(preset)
    gpu.train()
    idx = torch.randint(0, 97, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(idx, targets=torch.roll(idx, -1, dims=1))
        loss = out.loss + sum(out.aux_losses.values(), torch.zeros((), device="cuda"))
    loss.backward()
    assert math.isfinite(loss.item())
    missing = [n for n, p in gpu.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("preset", PRESETS)
def test_flop_count_on_cuda_equals_the_cpu_count(preset):
    """The CUDA kernels' FLOP formulas (grouped K/V, causal triangle) and the sliding window's
    fallback under the counter give the CPU's count of a training step."""
    cpu, gpu = _cpu_and_cuda(preset)
    idx = torch.randint(0, 97, (2, LONG))

    def step(model, idx):
        model(idx, targets=torch.roll(idx, -1, dims=1)).loss.backward()

    want, _ = count_flops(lambda: step(cpu.train(), idx))
    got, _ = count_flops(lambda: step(gpu.train(), idx.cuda()))
    assert abs(got - want) <= 1e-3 * want  # routed mixtures: a near-tie may route one token differently


@pytest.mark.skipif(sliding_module.flex_attention is None, reason="flex attention not in this torch")
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_sliding_window_takes_flex_attention_and_matches_the_cpu_band(n_kv_heads, monkeypatch):
    """Outside its window the CUDA module runs compiled flex attention; the CPU one the blocked band."""
    calls = []
    compiled = sliding_module._compiled_flex_attention
    monkeypatch.setattr(sliding_module, "_compiled_flex_attention", lambda: calls.append(1) or compiled())
    model = ModelConfig(**{**TINY_MODEL, "max_seq_len": 256})
    torch.manual_seed(0)
    cpu_attn = resolve_attention({"name": "sliding", "window": 40, "n_kv_heads": n_kv_heads}, model).build(model, 0)
    gpu_attn = copy.deepcopy(cpu_attn).cuda()
    x = torch.randn(2, 150, 64)
    with torch.no_grad():
        want = cpu_attn(x, AttentionContext(None))
        got = gpu_attn(x.cuda(), AttentionContext(None))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = gpu_attn(x.cuda(), AttentionContext(None))
    assert len(calls) == 2
    assert _relative_error(got, want) < 1e-5
    assert _relative_error(got_bf16.float(), want) < 2e-2


@pytest.mark.slow
def test_train_py_on_the_gpu_in_bf16(tmp_path):
    run_train(["experiment=smoke", "trainer=gpu", "trainer.max_steps=20", "trainer.val_check_interval=10",
               "data.max_eval_tokens=1024", "logger=csv", "attention=moh"], tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 20
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["precision"] == "bf16-mixed"
    assert metrics["peak_gpu_memory_mb"] > 0
    assert math.isfinite(metrics["test_loss"]) and metrics["val_curve"][-1]["loss"] < metrics["val_curve"][0]["loss"]

"""``scripts/bench.py`` end to end (quick mode, in a subprocess) and the measurements it is built on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab import bench
from attnlab.attention import registered_names
from attnlab.config import ConfigError, ModelConfig, OptimConfig, from_dict
from attnlab.model import GPT
from tests.conftest import ROOT, TINY_MODEL

QUICK_LENGTHS = [64, 128]


def run_bench(args: list[str], tmp_path: Path, timeout: int = 600) -> dict:
    """Run ``python scripts/bench.py <args>`` (one thread: the test machine's cores are shared) and
    return its bench.json."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "scripts/bench.py", "bench=quick", "bench.threads=1", *args,
           f"paths.log_dir={tmp_path / 'outputs'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"bench.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads((run_dir / "bench.json").read_text())


@pytest.fixture
def one_thread():
    """In-process measurements on one thread (shared cores make OpenMP threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matmul_params(params: dict, model: dict) -> int:
    """Weights used in matmuls by the MHA model: attention and feed-forward, plus the (tied) LM head."""
    return params["attention"] + params["feed_forward"] + model["vocab_size"] * model["d_model"]


@pytest.mark.slow
def test_quick_run_reports_every_field_for_every_mechanism(tmp_path):
    result = run_bench([], tmp_path)
    assert result["status"] == "completed"
    machine = result["machine"]
    for key in ("device_name", "torch_version", "threads", "matmul_peak_gflops"):
        assert machine[key], key
    assert machine["threads"] == 1
    assert machine["matmul_peak_gflops"]["float32"] > 0

    assert sorted(result["mechanisms"]) == registered_names()
    for label, m in result["mechanisms"].items():
        assert set(m) == set(bench.MECHANISM_FIELDS), label
        assert m["error"] is None, (label, m["error"])
        assert m["params"]["total"] > 0
        assert [e["seq_len"] for e in m["train"]] == QUICK_LENGTHS
        assert [e["context_len"] for e in m["decode"]] == QUICK_LENGTHS
        assert [e["context_len"] for e in m["cache"]] == QUICK_LENGTHS
        for entry, fields in [*((e, bench.TRAIN_FIELDS) for e in m["train"]),
                              *((e, bench.DECODE_FIELDS) for e in m["decode"]),
                              *((e, bench.CACHE_FIELDS) for e in m["cache"])]:
            assert set(entry) == set(fields), (label, entry)
            assert entry["error"] is None, (label, entry)
        for e in m["train"]:
            assert e["batch_size"] * e["seq_len"] == e["tokens_per_step"] == 256  # quick tokens_per_step
            assert e["tokens_per_s_min"] <= e["tokens_per_s"] <= e["tokens_per_s_max"]
            assert e["mfu"] > 0 and e["flops_per_token"] > 0
            # at least parameters, gradients and the two AdamW moments are alive at the peak
            assert e["peak_memory_bytes"] > 4 * 4 * m["params"]["total"]
            assert e["peak_memory_method"] == "live_tensor_bytes"
        for e in m["decode"]:
            assert e["tokens_per_s"] > 0 and e["batch_size"] == 1
        for e in m["cache"]:
            assert e["matches_closed_form"], (label, e)

    # FLOPs of the MHA model, counted independently: 6 per matmul weight and token (forward,
    # and the two gradient matmuls), plus causal attention per layer: 4*C per (query, key) pair
    # forward (QK^T, PV) and 2.5 times that backward (torch's count for the fused kernels'
    # backward), over the T (T + 1) / 2 pairs of the causal triangle.
    model = result["settings"]["model"]
    mha = result["mechanisms"]["mha"]
    for e in mha["train"]:
        attention = model["n_layers"] * 14 * model["d_model"] * (e["seq_len"] + 1) / 2  # T (T + 1) / 2 pairs / T tokens
        assert e["flops_per_token"] == pytest.approx(6 * matmul_params(mha["params"], model) + attention, rel=1e-6)

    run = tmp_path / "run"
    markdown = (run / "bench.md").read_text()
    for label in result["mechanisms"]:
        assert f"| {label} |" in markdown
    for name in ("throughput.png", "memory.png", "decode.png"):
        assert (run / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_reference_mode_compares_attnlab_with_a_bare_loop(tmp_path):
    result = run_bench(["bench.reference=true"], tmp_path)
    assert result["mechanisms"] == {}
    runs = result["reference"]["runs"]
    assert [(r["path"], r["compile"], r["dropout"]) for r in runs] == [
        ("bare", False, 0.1), ("attnlab", False, 0.1), ("attnlab", True, 0.1),
        ("bare", False, 0.0), ("attnlab", False, 0.0), ("attnlab", True, 0.0)]
    for r in runs:
        assert set(r) == set(bench.REFERENCE_FIELDS)
        assert (r["batch_size"], r["seq_len"]) == (2, 128)
        if r["compile"] and r["error"]:  # compilation may be unavailable; it must be reported, not crash
            continue
        assert r["error"] is None, r
        assert r["tokens_per_s"] > 0
    eager = [r for r in runs if not r["compile"]]
    assert all(r["peak_memory_bytes"] > 0 for r in eager)
    # the bare loop materialises the full logits (plain cross-entropy), attnlab's chunked loss does not
    assert eager[0]["peak_memory_bytes"] > eager[1]["peak_memory_bytes"]
    ratios = result["reference"]["ratios"]
    assert [r["name"] for r in ratios] == [r["name"] for r in runs if r["path"] == "attnlab"]
    first = ratios[0]
    assert first["tokens_per_s_ratio"] == pytest.approx(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"])
    assert first["peak_memory_ratio"] == pytest.approx(runs[1]["peak_memory_bytes"] / runs[0]["peak_memory_bytes"])
    effects = result["reference"]["dropout_effect"]
    assert [(e["path"], e["compile"], e["dropout"], e["versus_dropout"]) for e in effects] == [
        ("bare", False, 0.0, 0.1), ("attnlab", False, 0.0, 0.1), ("attnlab", True, 0.0, 0.1)]
    assert "Ratios (attnlab / bare loop)" in (tmp_path / "run" / "bench.md").read_text()


@pytest.mark.parametrize("name", registered_names())
def test_measured_cache_bytes_equal_the_closed_form(name):
    model = GPT.from_config(TINY_MODEL, name)
    for context in (17, TINY_MODEL["max_seq_len"]):
        entry = bench.measure_cache(model, context)
        assert entry["error"] is None
        assert entry["matches_closed_form"], entry
        assert entry["measured_bytes_per_token"] == model.cache_bytes(1, context) / context


def test_mha_cache_is_two_vectors_per_layer_and_token():
    model = GPT.from_config(TINY_MODEL, "mha")
    entry = bench.measure_cache(model, 32)
    assert entry["measured_bytes_per_token"] == 2 * TINY_MODEL["n_layers"] * TINY_MODEL["d_model"] * 4
    assert entry["used_bytes_per_token"] is None and entry["dtype"] == "float32"


def test_used_bytes_are_reported_where_a_cache_class_offers_them(monkeypatch):
    from attnlab.attention import KVCache

    monkeypatch.setattr(KVCache, "used_nbytes", lambda self: 100, raising=False)
    model = GPT.from_config(TINY_MODEL, "mha")
    entry = bench.measure_cache(model, 50)
    assert entry["used_bytes_per_token"] == TINY_MODEL["n_layers"] * 100 / 50
    assert entry["matches_closed_form"]


def _settings(**overrides) -> bench.BenchSettings:
    return bench.BenchSettings(**{"lengths": [32], "tokens_per_step": 64, "decode_steps": 2, "warmup": 1,
                                  "repeats": 1, **overrides})


def test_a_failing_mechanism_is_recorded_and_the_others_go_on(monkeypatch, one_thread):
    from attnlab.attention.gqa import GroupedQueryAttention

    def broken(self, x, ctx, cache=None):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(GroupedQueryAttention, "forward", broken)
    settings = _settings()
    result = bench.bench_mechanism("mha", "mha", dict(TINY_MODEL), OptimConfig(), settings, torch.device("cpu"),
                                   "32-true", None)
    assert result["params"]["total"] > 0
    for entry in [*result["train"], *result["decode"], *result["cache"]]:
        assert entry["error"] == "RuntimeError: kernel exploded"
    assert result["train"][0]["tokens_per_s"] is None

    unknown = bench.bench_mechanism("nope", "no_such_preset", dict(TINY_MODEL), OptimConfig(), settings,
                                    torch.device("cpu"), "32-true", None)
    assert "no_such_preset" in unknown["error"]
    assert set(unknown["train"][0]) == set(bench.TRAIN_FIELDS) and unknown["train"][0]["error"] == unknown["error"]

    identity = bench.bench_mechanism("identity", "identity", dict(TINY_MODEL), OptimConfig(), settings,
                                     torch.device("cpu"), "32-true", None)
    assert identity["train"][0]["error"] is None and identity["train"][0]["tokens_per_s"] > 0


def test_rounds_pool_every_timed_call(one_thread):
    """A later round (``timing_only``) times the steps again and measures nothing else; pooled,
    every figure is the one of all the rounds' timed calls together (medians, spreads and MFU
    recomputed by hand here), and round 1's memory, FLOPs, floors and cache stand."""
    import statistics

    settings = _settings(repeats=3, decode_compile=True, decode_steps=2)
    args = ("mha", "mha", dict(TINY_MODEL), OptimConfig(), settings, torch.device("cpu"), "32-true", 50.0)
    first = bench.bench_mechanism(*args)
    later = bench.bench_mechanism(*args, timing_only=True)
    assert later["cache"] == [] and later["train"][0]["peak_memory_bytes"] is None
    assert later["train"][0]["flops_per_step"] is None and later["decode"][0]["step_read_ms"] is None
    assert len(later["train"][0]["step_seconds"]) == len(later["decode_compiled"][0]["call_seconds"]) == 3
    samples = {kind: [*first[kind][0][key], *later[kind][0][key]]
               for kind, key in (("train", "step_seconds"), ("decode", "call_seconds"),
                                 ("decode_compiled", "call_seconds"))}
    kept = {k: first["train"][0][k] for k in ("peak_memory_bytes", "flops_per_token")}
    pooled = bench.pool_rounds(first, later, 50.0)

    train = pooled["train"][0]
    assert train["step_seconds"] == samples["train"]
    assert train["step_ms"] == pytest.approx(1e3 * statistics.median(samples["train"]))
    assert train["tokens_per_s"] == pytest.approx(64 / statistics.median(samples["train"]))
    assert train["tokens_per_s_min"] == pytest.approx(64 / max(samples["train"]))
    assert train["mfu"] == pytest.approx(kept["flops_per_token"] * train["tokens_per_s"] / 50e9)
    assert {k: train[k] for k in kept} == kept
    for kind in ("decode", "decode_compiled"):
        entry = pooled[kind][0]
        assert entry["call_seconds"] == samples[kind]
        assert entry["ms_per_token"] == pytest.approx(1e3 * statistics.median(samples[kind]) / 2)
        assert entry["x_step_read"] == pytest.approx(entry["ms_per_token"] / entry["step_read_ms"])
    assert pooled["decode_compiled"][0]["recompiles"] == 0 and pooled["cache"][0]["matches_closed_form"]


@pytest.mark.slow
def test_rounds_run_round_after_round_over_the_mechanisms(tmp_path):
    result = run_bench(["bench.attention=[mha,mqa]", "bench.rounds=2", "bench.lengths=[64]",
                        "bench.decode_lengths=[64]", "bench.plots=false"], tmp_path)
    assert result["status"] == "completed" and result["settings"]["rounds"] == 2
    for label, m in result["mechanisms"].items():
        assert len(m["train"][0]["step_seconds"]) == len(m["decode"][0]["call_seconds"]) == 2 * 2, label
        assert m["train"][0]["peak_memory_bytes"] > 0 and m["cache"][0]["matches_closed_form"]
    assert "2 round(s) x 2 after 1 untimed" in (tmp_path / "run" / "bench.md").read_text()


def test_lengths_beyond_max_seq_len(one_thread):
    """Rotary models get a longer max_seq_len; learned positions stop at their table."""
    settings = _settings(lengths=[32, 96], decode_lengths=[96])
    rope = bench.bench_mechanism("mha", "mha", dict(TINY_MODEL), OptimConfig(), settings, torch.device("cpu"),
                                 "32-true", None)
    assert all(e["error"] is None for e in [*rope["train"], *rope["decode"], *rope["cache"]])
    learned = bench.bench_mechanism("mha", "mha", {**TINY_MODEL, "pos_encoding": "learned"}, OptimConfig(), settings,
                                    torch.device("cpu"), "32-true", None)
    assert learned["train"][0]["error"] is None
    assert "exceeds the limit" in learned["train"][1]["error"]
    assert "exceeds the limit" in learned["decode"][0]["error"]


def test_layer_attention_models_are_benchmarked_once():
    settings = _settings()
    labels = bench.mechanisms_to_run(settings, {**TINY_MODEL, "layer_attention": ["mha", "mqa"]})
    assert list(labels) == ["layers:mha,mqa"]
    assert list(bench.mechanisms_to_run(_settings(attention=["gqa_2", "mla"]), dict(TINY_MODEL))) == ["gqa_2", "mla"]
    assert list(bench.mechanisms_to_run(settings, dict(TINY_MODEL))) == registered_names()
    # `attention=gqa_2` on the command line: that one preset
    chosen = {"name": "gqa", "n_kv_heads": 2}
    assert bench.mechanisms_to_run(settings, dict(TINY_MODEL), chosen, "gqa_2") == {"gqa_2": chosen}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("bench", overrides=overrides)


def test_default_config_benchmarks_exp10_with_the_gpt2_vocabulary():
    settings, model, optim = bench.load_settings(_compose([]))
    assert model["name"] == "exp10" and model["vocab_size"] == bench.GPT2_VOCAB_SIZE
    assert settings.lengths == [256, 1024, 4096] and settings.attention is None
    assert optim.lr > 0


def test_quick_config_applies_and_command_line_overrides_win():
    settings, model, _ = bench.load_settings(_compose(["bench=quick"]))
    assert settings.lengths == QUICK_LENGTHS and (settings.tokens_per_step, settings.decode_steps) == (256, 4)
    assert (model["name"], model["n_layers"], model["d_model"], model["vocab_size"]) == ("quick", 2, 64, 512)
    assert model["loss_chunk_size"] == 256  # what conf/bench/quick.yaml leaves alone stays the model's
    for overrides in (["bench=quick", "bench.lengths=[32]", "model.d_model=32"],
                      ["bench.lengths=[32]", "model.d_model=32", "bench=quick"]):  # whatever the order
        settings, model, _ = bench.load_settings(_compose(overrides))
        assert settings.lengths == [32] and model["d_model"] == 32
        assert settings.decode_steps == 4 and (model["name"], model["n_layers"]) == ("quick", 2)


@pytest.mark.parametrize("field, value", [
    ("lengths", []), ("lengths", [0, 64]), ("decode_lengths", [-1]), ("attention", []), ("warmup", 0),
    ("repeats", 0), ("rounds", 0), ("batch_size", 0), ("threads", 0), ("device", "tpu"), ("precision", "fp8"),
    ("reference_dropouts", [1.5]),
])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^bench\.{field}="):
        from_dict(bench.BenchSettings, {field: value}, "bench")


def test_bench_model_config_raises_max_seq_len_only_for_rope():
    assert bench.bench_model_config(dict(TINY_MODEL), 4096).max_seq_len == 4096
    assert bench.bench_model_config(dict(TINY_MODEL), 16).max_seq_len == TINY_MODEL["max_seq_len"]
    learned = bench.bench_model_config({**TINY_MODEL, "pos_encoding": "learned"}, 4096)
    assert isinstance(learned, ModelConfig) and learned.max_seq_len == TINY_MODEL["max_seq_len"]


def test_compiled_decoding_is_measured_beside_eager_decoding(one_thread):
    """bench.decode_compile: the compiled static step, one graph for every timed step; a mechanism
    without a static step is recorded as such, and the tables show both with the speed-up."""
    settings = _settings(decode_lengths=[16], decode_steps=3, repeats=2, decode_compile=True)
    result = bench.bench_mechanism("gqa_2", "gqa_2", dict(TINY_MODEL), OptimConfig(), settings, torch.device("cpu"),
                                   "32-true", None)
    (eager,), (compiled,) = result["decode"], result["decode_compiled"]
    assert set(compiled) == set(bench.COMPILED_DECODE_FIELDS) and compiled["error"] is None, compiled
    assert compiled["context_len"] == eager["context_len"] == 16
    assert compiled["tokens_per_s"] > 0 and compiled["compile_s"] > 0
    assert (compiled["graphs_compiled"], compiled["recompiles"]) == (1, 0)
    # each step beside reading its bytes once: the weights that multiply the token (attention,
    # feed-forward, norms and the tied V x C head; not the embedding table) and the K/V cache
    model = TINY_MODEL
    head_dim, kv_heads = model["d_model"] // model["n_heads"], model["n_heads"] // 2
    cache = 2 * kv_heads * head_dim * 16 * model["n_layers"]
    params = result["params"]
    weights = params["attention"] + params["feed_forward"] + params["norms"] + model["vocab_size"] * model["d_model"]
    for entry in (eager, compiled):
        assert entry["step_bytes"] == 4 * (weights + cache)
        assert entry["step_read_ms"] > 0
        assert entry["x_step_read"] == pytest.approx(entry["ms_per_token"] / entry["step_read_ms"])

    routed = bench.bench_mechanism("moas_top1", "moas_top1", dict(TINY_MODEL), OptimConfig(),
                                   _settings(decode_lengths=[16], decode_compile=True), torch.device("cpu"),
                                   "32-true", None)
    (entry,) = routed["decode_compiled"]
    assert entry["error"].startswith("no static decoding step: layer 0 (moas): routed top_k=1")
    assert entry["tokens_per_s"] is None and routed["decode"][0]["error"] is None

    # a rolling window's cache has one shape at every context: each context still compiles its
    # own step, counted from zero (the precompiled step of the first one is forgotten)
    window = bench.bench_mechanism("sliding", {"name": "sliding", "window": 4}, dict(TINY_MODEL), OptimConfig(),
                                   _settings(decode_lengths=[8, 16], decode_steps=2, decode_compile=True),
                                   torch.device("cpu"), "32-true", None)
    assert [(e["graphs_compiled"], e["recompiles"]) for e in window["decode_compiled"]] == [(1, 0), (1, 0)]

    lm_head = bench.measure_lm_head(dict(TINY_MODEL), settings, torch.device("cpu"), repeats=3, flush_bytes=2**20)
    assert set(lm_head) == set(bench.LM_HEAD_FIELDS) and lm_head["bytes"] == 97 * 64 * 4
    assert min(lm_head["read_ms"], lm_head["cold_read_ms"], lm_head["matvec_ms"]) > 0
    tables = {title.split(",")[0].split(";")[0]: (header, rows) for title, header, rows in bench.mechanism_tables(
        {"mechanisms": {"gqa_2": result, "moas_top1": routed}, "lm_head": lm_head})}
    header, rows = tables["Decode tokens/s with the cache"]
    assert header == ["mechanism", "context 16", "compiled, context 16"]
    speedup = compiled["tokens_per_s"] / eager["tokens_per_s"]
    assert rows[0][2].endswith(f", {speedup:.2f}x, 1+0 graphs") and rows[1][2] == "n/a"
    for prefix in ("Decode ms per token against reading", "Decode ms per token against one read"):
        header, rows = next(v for k, v in tables.items() if k.startswith(prefix))
        assert [row[:3] for row in rows] == [["gqa_2", "eager", "16"], ["gqa_2", "compiled", "16"],
                                             ["moas_top1", "eager", "16"]]
    header, rows = next(v for k, v in tables.items() if k.startswith("Decode ms per token against reading"))
    assert header[-3:] == ["MiB read", "read ms", "x the read"]
    assert rows[0][-1] == f"{eager['x_step_read']:,.1f}"

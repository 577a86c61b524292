"""The ``bench`` config section, validated: :class:`BenchSettings`, the model and the optimizer.

``bench=quick`` (conf/bench/quick.yaml) is an ordinary Hydra config: it sets a tiny model and short
lengths, and command-line overrides win over it as over any config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.config import MATMUL_PRECISIONS, ConfigError, ModelConfig, OptimConfig, from_dict, require, to_container

GPT2_VOCAB_SIZE = 50257
#: The precisions a measured step runs in: the bench's own loops autocast to bf16 for
#: "bf16-mixed" and run everything else in the parameters' float32, so Lightning's other
#: precisions (attnlab.config.PRECISIONS) would be measured as fp32 under another name.
BENCH_PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class BenchSettings:
    """The ``bench`` config section (see conf/bench.yaml for each option's meaning)."""

    attention: list | None = None
    lengths: list = field(default_factory=lambda: [256, 1024, 4096])
    batch_size: int | None = None
    tokens_per_step: int = 4096
    decode_lengths: list | None = None
    decode_steps: int = 32
    decode_batch_size: int = 1
    decode_compile: bool = False
    warmup: int = 2
    compile_warmup: int = 3
    repeats: int = 5
    rounds: int = 1
    device: str | None = None
    precision: str | None = None
    compile: bool = False
    threads: int | None = None
    matmul_size: int | None = None
    matmul_repeats: int = 5
    plots: bool = True
    reference: bool = False
    reference_batch_size: int = 4
    reference_seq_len: int = 1024
    reference_dropouts: list = field(default_factory=lambda: [0.1, 0.0])
    reference_compile: bool = True

    def __post_init__(self) -> None:
        p = "bench"
        for name in ("lengths", "decode_lengths"):
            values = getattr(self, name)
            if values is not None:
                require(len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                for v in values),
                        f"{p}.{name}", values, "a non-empty list of integers >= 1")
        if self.attention is not None:
            require(len(self.attention) > 0 and all(isinstance(a, str) for a in self.attention), f"{p}.attention",
                    self.attention, "null (every registered mechanism) or a non-empty list of preset names")
        for name in ("tokens_per_step", "decode_steps", "decode_batch_size", "warmup", "compile_warmup", "repeats",
                     "rounds", "matmul_repeats", "reference_batch_size", "reference_seq_len"):
            value = getattr(self, name)
            require(value >= 1, f"{p}.{name}", value, "an integer >= 1")
        for name in ("batch_size", "threads", "matmul_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{p}.{name}", value, "null or an integer >= 1")
        require(self.device in (None, "cpu", "cuda"), f"{p}.device", self.device,
                "null (cuda when available) | cpu | cuda")
        require(self.precision in (None, *BENCH_PRECISIONS), f"{p}.precision", self.precision,
                "null (32-true on cpu, bf16-mixed on cuda) | " + " | ".join(BENCH_PRECISIONS))
        require(len(self.reference_dropouts) > 0 and all(isinstance(d, (int, float)) and 0 <= d < 1
                                                         for d in self.reference_dropouts),
                f"{p}.reference_dropouts", self.reference_dropouts, "a non-empty list of probabilities in [0, 1)")


def load_settings(cfg: Any) -> tuple[BenchSettings, dict[str, Any], OptimConfig]:
    """Validated bench settings, model values (``vocab_size`` filled in) and optimizer config."""
    settings = from_dict(BenchSettings, to_container(cfg.bench), "bench")
    model_values = to_container(cfg.model)
    if model_values.get("vocab_size") is None:
        model_values["vocab_size"] = GPT2_VOCAB_SIZE
    from_dict(ModelConfig, model_values, "model")  # fail early on a bad model
    optim = from_dict(OptimConfig, to_container(cfg.get("optim") or {}), "optim")
    matmul_precision = cfg.get("matmul_precision", "high")
    require(matmul_precision in MATMUL_PRECISIONS, "matmul_precision", matmul_precision, " | ".join(MATMUL_PRECISIONS))
    return settings, model_values, optim


def pick_device(settings: BenchSettings) -> torch.device:
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device", "cuda", "cpu | null", reason="CUDA is not available on this machine")
    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def warmup_steps(settings: BenchSettings, compiled: bool) -> int:
    """Untimed steps: compiled models get ``compile_warmup`` at least (compilation and the
    recompilations of the first steps)."""
    return max(settings.warmup, settings.compile_warmup) if compiled else settings.warmup


def bench_model_config(model_values: dict[str, Any], needed_len: int) -> ModelConfig:
    """The model config, with ``max_seq_len`` raised to ``needed_len`` for rotary models (learned
    positions cannot go beyond their table)."""
    model = from_dict(ModelConfig, model_values, "model")
    if model.pos_encoding == "rope" and needed_len > model.max_seq_len:
        model = dataclasses.replace(model, max_seq_len=needed_len)
    return model

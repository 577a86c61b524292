"""Typed, validated configuration.

Hydra composes plain dictionaries; this module turns the parts that shape the model into
dataclasses, checking every field once at start-up. Every failure is a :class:`ConfigError`
that names the field, the bad value and what is allowed, so a typo in a sweep fails before
any data is loaded or any step is run.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from attnlab.errors import InputError


class ConfigError(InputError, ValueError):
    """An invalid configuration value: ``<field>=<value>: <reason>; allowed: <allowed>``."""

    def __init__(self, field: str, value: Any, allowed: str, reason: str | None = None):
        self.field, self.value, self.allowed, self.reason = field, value, allowed, reason
        message = f"{field}={value!r}"
        if reason:
            message += f": {reason}"
        message += f"; allowed: {allowed}"
        super().__init__(message)


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted where floats are)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(name, value, _type_name(tp))
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(name, value, _type_name(tp))
    if tp is type(None):
        if value is not None:
            raise ConfigError(name, value, "null")
        return None
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, "a list")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "true | false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "a string")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(name, value, "a mapping")
        return dict(value)
    return value


def from_dict(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and ill-typed values.

    ``prefix`` is the dotted config path used in error messages (e.g. ``"model"``).
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}", values[unknown[0]], "the fields " + ", ".join(sorted(known)),
            reason=f"unknown option for {prefix}",
        )
    kwargs = {}
    for name, f in known.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{prefix}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{name}", None, _type_name(hints[name]), reason="required")
    return cls(**kwargs)


#: Lightning's ``Trainer(precision=...)`` values.
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
#: ``torch.set_float32_matmul_precision`` values (the ``matmul_precision`` of train.py and the benchmark).
MATMUL_PRECISIONS = ("highest", "high", "medium")


def require(condition: bool, field: str, value: Any, allowed: str, reason: str | None = None) -> None:
    if not condition:
        raise ConfigError(field, value, allowed, reason)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def import_modules(modules: Any, field: str = "imports") -> None:
    """Import the modules of the top-level ``imports`` list (``[my_project.my_attention]``), so the
    mechanisms they register exist before the rest of the config is validated."""
    require(modules is None or (isinstance(modules, (list, tuple))
                                and all(isinstance(m, str) and m for m in modules)),
            field, modules, "a list of module names, e.g. [my_project.my_attention]")
    for i, name in enumerate(modules or []):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"{field}[{i}]", name,
                              "a module importable from sys.path (an installed package, or a directory on PYTHONPATH)",
                              reason=f"import failed: {error}") from error


@dataclass
class ModelConfig:
    """The GPT skeleton shared by every mechanism (the attention choice lives in ``attention``)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    vocab_size: int | None = None  # None: taken from the tokenizer
    dropout: float = 0.0  # embeddings and residual branches
    attn_dropout: float = 0.0  # on attention probabilities (forces SDPA's unfused path when > 0)
    pos_encoding: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    tie_embeddings: bool = True
    bias: bool = False
    init_std: float = 0.02
    # Per-layer attention: None (every layer uses ``attention``) or one entry per layer, each a
    # preset name from conf/attention, a registered mechanism name, or a mapping with ``name``.
    layer_attention: list | None = None
    # Rows of the (B*T, vocab) logits computed at once by the fused LM-head loss; 0 = plain loss.
    loss_chunk_size: int = 256
    name: str = "custom"
    # Parameter matching target: a reference mechanism whose parameter count d_ff is tuned to match.
    match_params: str | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self) -> None:
        p = "model"
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            require(value >= 1, f"{p}.{name}", value, "an integer >= 1")
        require(self.d_model % self.n_heads == 0, f"{p}.n_heads", self.n_heads,
                f"divisors of model.d_model={self.d_model}: {divisors(self.d_model)}",
                reason="must divide model.d_model")
        if self.pos_encoding == "rope":
            require(self.head_dim % 2 == 0, f"{p}.n_heads", self.n_heads,
                    "a head count giving an even head dimension",
                    reason=f"RoPE needs an even head dimension, got d_model/n_heads={self.head_dim}")
        if self.vocab_size is not None:
            require(self.vocab_size >= 2, f"{p}.vocab_size", self.vocab_size, "an integer >= 2 or null")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{p}.{name}", value, "a probability in [0, 1)")
        require(self.rope_theta > 0, f"{p}.rope_theta", self.rope_theta, "a number > 0")
        require(self.norm_eps > 0, f"{p}.norm_eps", self.norm_eps, "a number > 0")
        require(self.init_std > 0, f"{p}.init_std", self.init_std, "a number > 0")
        require(self.loss_chunk_size >= 0, f"{p}.loss_chunk_size", self.loss_chunk_size,
                "0 (plain loss) or a positive number of rows")
        if self.layer_attention is not None:
            require(len(self.layer_attention) == self.n_layers, f"{p}.layer_attention",
                    self.layer_attention, f"null or a list of exactly model.n_layers={self.n_layers} entries")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    fused: bool | None = None  # None: fused AdamW wherever the device supports it

    def __post_init__(self) -> None:
        p = "optim"
        require(self.lr > 0, f"{p}.lr", self.lr, "a number > 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{p}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{p}.betas", self.betas,
                "two numbers in [0, 1)")
        require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")
        require(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "an integer >= 0")
        if self.grad_clip is not None:
            require(self.grad_clip > 0, f"{p}.grad_clip", self.grad_clip, "a number > 0 or null (no clipping)")


@dataclass
class EvalConfig:
    """The ``eval`` group: evaluation of the final weights at other window lengths."""

    #: Window lengths (tokens) at which the validation split is evaluated after the test split.
    lengths: list = field(default_factory=list)
    #: At most this many tokens per evaluation forward (batches are split by rows); None: as loaded.
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        p = "eval"
        lengths_ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.lengths)
        require(lengths_ok and len(set(self.lengths)) == len(self.lengths), f"{p}.lengths", self.lengths,
                "a list of distinct integers >= 1 (window lengths in tokens), e.g. [2048, 4096]")
        if self.max_batch_tokens is not None:
            require(self.max_batch_tokens >= 1, f"{p}.max_batch_tokens", self.max_batch_tokens,
                    "null (batches as loaded) or an integer >= 1")


def to_container(cfg: Any) -> Any:
    """An OmegaConf node (or anything) as plain Python containers with interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg

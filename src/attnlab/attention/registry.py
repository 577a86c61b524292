"""Name -> mechanism registry, and resolution of attention configs into validated specs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnlab.config import ConfigError, ModelConfig, from_dict
from attnlab.paths import config_dirs, describe_config_dirs

from .base import Attention, AttentionConfig


@dataclass(frozen=True)
class Registration:
    name: str
    cls: type[Attention]
    #: Config fields this name pins (e.g. ``mqa`` pins ``n_kv_heads=1``).
    fixed: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Registration] = {}


def register_attention(name: str, **fixed: Any):
    """Class decorator: make ``cls`` selectable as ``attention.name=<name>``.

    Keyword arguments pin config fields for this name, so one implementation can serve several
    names (``mha``, ``gqa`` and ``mqa`` are one class with different ``n_kv_heads``).
    """

    def decorator(cls: type[Attention]) -> type[Attention]:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise TypeError(f"@register_attention({name!r}) needs an Attention subclass, got {cls!r}")
        known = {f for f in cls.Config.__dataclass_fields__}
        unknown = set(fixed) - known
        if unknown:
            raise TypeError(f"@register_attention({name!r}) pins unknown fields {sorted(unknown)} of {cls.__name__}")
        previous = _REGISTRY.get(name)
        if previous is not None and previous.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"attention name {name!r} is already registered by {previous.cls.__qualname__}")
        _REGISTRY[name] = Registration(name, cls, dict(fixed))
        return cls

    return decorator


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_registration(name: str, field: str = "attention.name") -> Registration:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(field, name, "registered mechanisms " + ", ".join(registered_names()),
                          reason="unknown attention mechanism") from None


def _preset_files() -> dict[str, Any]:
    """Preset name -> its ``attention/<name>.yaml``; the first config directory that has a name
    wins, as in Hydra (:func:`attnlab.paths.config_dirs`: the packaged configs, then the user's)."""
    found: dict[str, Any] = {}
    for root in config_dirs():
        folder = root / "attention"
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.endswith(".yaml") and entry.is_file():
                    found.setdefault(entry.name[: -len(".yaml")], entry)
    return found


def preset_names() -> list[str]:
    """The attention presets: ``attention/*.yaml`` in the config directories (the packaged
    ``conf/attention/`` and the user's, see :func:`attnlab.paths.config_dirs`)."""
    return sorted(_preset_files())


def _read(preset_file: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(preset_file.read_text()), resolve=True)  # type: ignore[return-value]


def load_preset(name: str) -> dict[str, Any]:
    """The options of the attention preset ``name`` (see :func:`preset_names`)."""
    presets = _preset_files()
    if name not in presets:
        raise ConfigError("attention", name, "presets " + ", ".join(sorted(presets)),
                          reason=f"unknown attention preset, {describe_config_dirs('attention')}")
    return _read(presets[name])


@dataclass(frozen=True)
class AttentionSpec:
    """A validated choice of mechanism: its registration and typed config."""

    registration: Registration
    config: AttentionConfig

    @property
    def name(self) -> str:
        return self.registration.name

    def build(self, model: ModelConfig, layer_idx: int) -> Attention:
        return self.registration.cls(self.config, model, layer_idx)

    def to_config(self) -> dict[str, Any]:
        """The mapping that resolves to this spec again (a checkpoint's ``attention`` hyperparameter)."""
        return {**dataclasses.asdict(self.config), "name": self.name}


def attention_options(spec: str | Mapping[str, Any], field: str = "attention") -> dict[str, Any]:
    """The options (``name`` included) of a config entry: a mapping with ``name`` as it is, or a
    string: a preset from ``conf/attention/`` or a user's config directory (``"gqa_2"``, see
    :func:`preset_names`) or a registered name with default options (``"mqa"``)."""
    if isinstance(spec, str):
        presets = _preset_files()
        if spec in presets:
            spec = _read(presets[spec])
        elif spec in _REGISTRY:
            spec = {"name": spec}
        else:
            raise ConfigError(field, spec, "presets " + ", ".join(sorted(presets))
                              + "; registered mechanisms " + ", ".join(registered_names()),
                              reason=f"unknown attention preset or mechanism; presets {describe_config_dirs('attention')}")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(field, spec, "a preset name or a mapping with a 'name' key")
    return dict(spec)


def resolve_attention(spec: str | Mapping[str, Any], model: ModelConfig, field: str = "attention") -> AttentionSpec:
    """Turn a config entry (see :func:`attention_options`) into a validated :class:`AttentionSpec`."""
    values = attention_options(spec, field)
    registration = get_registration(values["name"], f"{field}.name")
    for key, pinned in registration.fixed.items():
        if key in values and values[key] != pinned:
            raise ConfigError(f"{field}.{key}", values[key], repr(pinned),
                              reason=f"fixed for '{registration.name}'; choose another mechanism to change it")
        values[key] = pinned
    config = from_dict(registration.cls.Config, values, prefix=field)
    config.validate(model, field)
    return AttentionSpec(registration, config)


def resolve_layer_attention(attention: str | Mapping[str, Any], model: ModelConfig) -> list[AttentionSpec]:
    """One spec per layer: ``model.layer_attention`` when given, else ``attention`` everywhere."""
    if model.layer_attention is None:
        spec = resolve_attention(attention, model, "attention")
        return [spec] * model.n_layers
    return [resolve_attention(entry, model, f"model.layer_attention[{i}]")
            for i, entry in enumerate(model.layer_attention)]

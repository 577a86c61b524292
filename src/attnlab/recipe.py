"""What a training run is built from, in one place for ``train.py`` and the benchmark: the model
(its attention resolved once and its parameters matched to a reference), the optimizer (AdamW
with decay and no-decay groups, and groups for mechanisms' own learning rates), the
learning-rate schedule and the loss that is minimised."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.attention import Attention, AttentionSpec, resolve_layer_attention
from attnlab.config import ModelConfig, OptimConfig, from_dict


@dataclass(frozen=True)
class ModelRecipe:
    """A validated model: its config (``d_ff`` already matched when ``match_params`` is set), one
    attention spec per layer, and the parameter matching's record (None without matching)."""

    model: ModelConfig
    attention: list[AttentionSpec]
    param_matching: dict[str, Any] | None = None

    def build(self):
        """The :class:`~attnlab.model.GPT` this recipe describes (``model.vocab_size`` must be set)."""
        from attnlab.model import GPT

        return GPT(self.model, self.attention)

    def with_model(self, **changes: Any) -> ModelRecipe:
        """The same attention and matching with ``model`` fields changed (say, ``vocab_size``)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

    def attention_config(self) -> dict[str, Any]:
        """The ``attention`` group this recipe's layers resolve from again (checkpoint hyperparameters):
        the first layer's mechanism; per-layer choices live in ``model.layer_attention``."""
        return self.attention[0].to_config()


def model_recipe(model: ModelConfig | Mapping[str, Any], attention: Any) -> ModelRecipe:
    """Validate ``model`` (a config or the ``model`` group) with ``attention`` (the ``attention``
    group: a preset name or a mapping), and match parameters when ``model.match_params`` is set."""
    if not isinstance(model, ModelConfig):
        model = from_dict(ModelConfig, dict(model), "model")
    specs = resolve_layer_attention(attention, model)
    if model.match_params is None:
        return ModelRecipe(model, specs)
    matching = match_parameters(model, specs, model.match_params)
    return ModelRecipe(dataclasses.replace(model, d_ff=matching["d_ff"]), specs, matching)


def match_parameters(model: ModelConfig, attention: list[AttentionSpec], reference: str) -> dict[str, Any]:
    """The ``d_ff`` that brings this model's non-embedding parameters closest to those of the same
    model with the ``reference`` mechanism (a preset or registered name) at the configured ``d_ff``.

    Embeddings are left out: at GPT-2's vocabulary they dominate the total and would make any two
    mechanisms "match". Parameters are linear in ``d_ff``, so two probes give the exact solution."""
    from attnlab.model import GPT

    def count(cfg: ModelConfig, specs: list[AttentionSpec]) -> int:
        # a two-token vocabulary: embeddings are not counted and the model is cheap to build
        return GPT(dataclasses.replace(cfg, vocab_size=2, match_params=None), specs).parameter_counts()["non_embedding"]

    reference_cfg = dataclasses.replace(model, layer_attention=None)
    target = count(reference_cfg, resolve_layer_attention(reference, reference_cfg))
    at_1 = count(dataclasses.replace(model, d_ff=1), attention)
    at_2 = count(dataclasses.replace(model, d_ff=2), attention)
    per_unit = at_2 - at_1
    d_ff = max(1, round(1 + (target - at_1) / per_unit))
    params = at_1 + (d_ff - 1) * per_unit
    return {"reference": reference, "reference_params": target, "d_ff": d_ff, "params": params,
            "relative_diff": (params - target) / target}


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """AdamW's groups: matrices decay; norms, biases, gates and embeddings do not. Parameters that
    a mechanism hints at (:meth:`~attnlab.attention.Attention.parameter_group_hints`) with a
    learning-rate multiplier other than 1 get groups of their own, ``lr * multiplier``, split by the
    same decay rule (named ``<hint>`` and ``<hint>/no_decay``); with none there are exactly the
    two groups, so checkpoints of earlier runs still load. A schedule (``LambdaLR``) scales each
    group's own learning rate."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    hinted: dict[int, tuple[str, float]] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            for hint in module.parameter_group_hints():
                if hint.lr_multiplier != 1.0:
                    hinted.update({id(p): (hint.name, hint.lr_multiplier) for p in hint.params})
    # (hint name, multiplier, decays) -> parameters; the two plain groups first, even when empty
    groups: dict[tuple[str, float, bool], list[torch.nn.Parameter]] = {("", 1.0, True): [], ("", 1.0, False): []}
    for p in model.parameters():
        if p.requires_grad:
            name, multiplier = hinted.get(id(p), ("", 1.0))
            decays = p.dim() >= 2 and id(p) not in embedding_params
            groups.setdefault((name, multiplier, decays), []).append(p)
    out = []
    for (name, multiplier, decays), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * multiplier}
        if name:
            group["name"] = name if decays else f"{name}/no_decay"
        out.append(group)
    return out


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """The AdamW every run trains with (fused wherever ``device`` supports it unless ``cfg.fused`` says)."""
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at optimizer step ``s``: linear warmup, then cosine to ``min_lr_ratio``."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def training_loss(out: Any) -> torch.Tensor:
    """The loss minimised: the task loss plus the mechanisms' auxiliary losses (load balance, indexer)."""
    return out.loss + sum(out.aux_losses.values()) if out.aux_losses else out.loss

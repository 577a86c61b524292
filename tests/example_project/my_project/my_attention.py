"""Softmax attention with a temperature, registered from outside attnlab: ``softmax(t q·k / sqrt(d))``.

Grouped-query attention whose queries are scaled by ``t`` before the fused kernel, so the logits
are; the cache is GQA's.
"""

from dataclasses import dataclass

from attnlab.attention import register_attention
from attnlab.attention.gqa import GQAConfig, GroupedQueryAttention
from attnlab.config import require


@dataclass
class MyConfig(GQAConfig):
    #: multiplies the attention logits (1.0: plain MHA/GQA)
    temperature: float = 1.0

    def validate(self, model, field):
        super().validate(model, field)
        require(self.temperature > 0, f"{field}.temperature", self.temperature, "a number > 0")


@register_attention("my_attention")
class MyAttention(GroupedQueryAttention):
    Config = MyConfig

    def project(self, x, ctx):
        q, k, v = super().project(x, ctx)
        return q * self.cfg.temperature, k, v

"""A graph pass for the compiled CPU decoding step: its matrix products on the C kernel.

A decoding step multiplies one row per sequence by every weight matrix (17 products in the exp10
step), each a read of the weight. ATen's CPU ``mm`` takes about 10 us for a 128 x 128 weight
even when it is in cache, and its threads do not split the reads of the others.
:class:`FewRowLinears` rewrites, in the graph inductor compiles for
:meth:`attnlab.model.GPT.static_step`, every ``mm(x, W.T)`` and ``addmm(add, x, W.T)`` with at
most :data:`MAX_ROWS` rows of float32 on the CPU into ``attnlab::decode_linear(x, W, add)``
(``attention/csrc/decode.c``, weights of 64 KiB or more split over the threads): the same
products and sums. Measured in one process, blocks of 32 tokens alternating with the ATen
products (exp10 width, vocabulary 256, context 4,096, 2 threads, 12 pairs): ``identity`` 1.09x
the tokens/s, ``mha`` 1.07x, ``gqa_2`` 1.02x, ``mla`` 1.01x.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

#: Rows (sequences in a decoding batch) up to which a product goes to the C kernel.
MAX_ROWS = 8

aten = torch.ops.aten


def _weight_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """``W`` when ``node`` is ``W.T`` of a contiguous 2-D ``W`` (``permute(W, [1, 0])`` or ``t(W)``)."""
    if node.op != "call_function":
        return None
    if node.target == aten.permute.default and list(node.args[1]) == [1, 0]:
        weight = node.args[0]
    elif node.target == aten.t.default:
        weight = node.args[0]
    else:
        return None
    value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    return weight if value is not None and value.dim() == 2 and value.is_contiguous() else None


def _few_cpu_rows(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return (value is not None and value.device.type == "cpu" and value.dtype == torch.float32
            and isinstance(value.shape[0], int) and value.shape[0] <= MAX_ROWS)


class FewRowLinears(CustomGraphPass):
    """``mm``/``addmm`` of few CPU float32 rows by a transposed weight -> ``attnlab::decode_linear``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
                continue
            if node.target == aten.addmm.default:
                if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                    continue
                add, rows, transposed = node.args[:3]
                if add.meta["val"].dim() not in (1, 2) or add.meta["val"].dtype != torch.float32:
                    continue
            else:
                add, (rows, transposed) = None, node.args[:2]
            weight = _weight_of(transposed)
            if weight is None or not _few_cpu_rows(rows):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(torch.ops.attnlab.decode_linear.default, (rows, weight, add))
            product.meta.update(node.meta)
            node.replace_all_uses_with(product)
            graph.erase_node(node)
        graph.eliminate_dead_code()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))

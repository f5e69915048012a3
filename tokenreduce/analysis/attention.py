"""Find self-attention in a traced graph.

Two spellings are recognised, with no per-model adapter:

* ``F.scaled_dot_product_attention(q, k, v, ...)``: the fused kernel (timm's default);
* ``softmax(q @ k.transpose(-2, -1) * scale [+ bias], dim=-1)``: an explicit attention; the
  softmax node is recorded, since its output is the probability matrix.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import data_args, shape_of
from .model_map import Attention

__all__ = ["find_attention"]

_SDPA = {F.scaled_dot_product_attention, getattr(torch._C._nn, "scaled_dot_product_attention", None)}
_SOFTMAX_FNS = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm}
# ops allowed between the q @ k^T product and the softmax: scaling, bias, casts
_SCORE_FNS = {operator.mul, operator.truediv, operator.add, torch.mul, torch.add, torch.div}
_SCORE_METHODS = {"mul", "div", "add", "float", "to", "type_as", "mul_", "add_", "div_"}


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _SOFTMAX_FNS:
        dim = _arg(node, 1, "dim")
    elif node.op == "call_method" and node.target == "softmax":
        dim = _arg(node, 1, "dim")
    else:
        return False
    shape = shape_of(node)
    return shape is not None and dim is not None and dim in (-1, len(shape) - 1)


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FNS) or (
        node.op == "call_method" and node.target in ("matmul", "bmm", "__matmul__")
    )


def _untranspose(node: fx.Node) -> fx.Node | None:
    """``k`` for a node computing ``k.transpose(-2, -1)`` (or ``.mT``), else None."""
    rank = len(shape_of(node) or ())
    if node.op == "call_method" and node.target == "transpose" or (
        node.op == "call_function" and node.target is torch.transpose
    ):
        dims = {d % rank for d in node.args[1:3] if isinstance(d, int)}
        if dims == {rank - 2, rank - 1}:
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _heads(q: fx.Node) -> tuple[int, int, int]:
    """(heads, queries, head_dim) of a (B, H, N, d) or (B, N, d) query node."""
    shape = shape_of(q)
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    return 1, shape[-2], shape[-1]


def _sdpa(node: fx.Node) -> Attention | None:
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    if not all(isinstance(t, fx.Node) and shape_of(t) for t in (q, k, v)):
        return None
    heads, nq, d = _heads(q)
    return Attention(
        kind="sdpa", node=node, q=q, k=k, v=v, scale=node.kwargs.get("scale"),
        num_heads=heads, head_dim=d, num_queries=nq, num_keys=shape_of(k)[-2],
    )


def _explicit(softmax: fx.Node) -> Attention | None:
    node = softmax.args[0]
    for _ in range(6):  # walk back over scale / bias / cast to the q @ k^T product
        if not isinstance(node, fx.Node):
            return None
        if _is_matmul(node):
            break
        is_score_op = (node.op == "call_function" and node.target in _SCORE_FNS) or (
            node.op == "call_method" and node.target in _SCORE_METHODS
        )
        if not is_score_op:
            return None
        # follow the operand that has the scores' shape (a bias may broadcast)
        same = [a for a in data_args(node) if shape_of(a) == shape_of(softmax)]
        if len(same) != 1:
            return None
        node = same[0]
    else:
        return None
    q, kt = node.args[0], node.args[1]
    k = _untranspose(kt) if isinstance(kt, fx.Node) else None
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)) or len(shape_of(q) or ()) < 3:
        return None
    v = None
    for user in softmax.users:  # probabilities (maybe after dropout) @ v
        cur = user
        if cur.op == "call_module" or (cur.op == "call_function" and cur.target is F.dropout):
            cur = next(iter(cur.users), None)
        if cur is not None and _is_matmul(cur):
            v = cur.args[1]
    heads, nq, d = _heads(q)
    return Attention(
        kind="softmax", node=softmax, q=q, k=k, v=v, scale=None,
        num_heads=heads, head_dim=d, num_queries=nq, num_keys=shape_of(k)[-2],
    )


def find_attention(graph: fx.Graph) -> list[Attention]:
    """Every self-attention in ``graph``, in execution order."""
    found = []
    for node in graph.nodes:
        att = None
        if node.op == "call_function" and node.target in _SDPA:
            att = _sdpa(node)
        elif _is_softmax(node):
            att = _explicit(node)
        if att is not None:
            found.append(att)
    return found

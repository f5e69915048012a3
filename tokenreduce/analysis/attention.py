"""Find self-attention in a traced graph.

Two spellings are recognised, with no per-model adapter:

* ``F.scaled_dot_product_attention(q, k, v, ...)``: the fused kernel (timm's default);
* ``softmax(q @ k.transpose(-2, -1) * scale [+ bias], dim=-1)``: an explicit attention; the
  softmax node is recorded, since its output is the probability matrix. The scale may come
  before the product (``(q * scale) @ k^T``, timm's ``fused_attn=False``) or after it, and any
  shape-preserving ops may sit between the product and the softmax (casts, a broadcast bias, a
  mask, or a traced-opaque helper such as timm's ``maybe_add_mask``). The softmax may be a
  function, a method or an ``nn.Softmax`` module (Swin, Twins).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._found import FoundAttention as Attention
from .graph import data_args, shape_of
from .model_map import Attention as Record

__all__ = ["find_attention"]

_SDPA = {F.scaled_dot_product_attention, getattr(torch._C._nn, "scaled_dot_product_attention", None)}
_SOFTMAX_FNS = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm}
_MUL_FNS = {operator.mul, torch.mul, operator.imul}
_DIV_FNS = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
# how far back from the softmax the q @ k^T product may be, and how far ahead the probs @ v
_MAX_SCORE_OPS = 8
_MAX_PROB_OPS = 6


def _arg(node: fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _softmax_module(node: fx.Node) -> nn.Softmax | None:
    """The ``nn.Softmax`` a ``call_module`` node runs (Swin, Twins write the softmax as a module)."""
    if node.op != "call_module" or node.graph.owning_module is None:
        return None
    try:
        module = node.graph.owning_module.get_submodule(str(node.target))
    except AttributeError:
        return None
    return module if isinstance(module, nn.Softmax) else None


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _SOFTMAX_FNS:
        dim = _arg(node, 1, "dim")
    elif node.op == "call_method" and node.target == "softmax":
        dim = _arg(node, 1, "dim")
    elif _softmax_module(node) is not None:
        dim = _softmax_module(node).dim
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
    if (
        node.op == "call_method"
        and node.target == "transpose"
        or (node.op == "call_function" and node.target is torch.transpose)
    ):
        dims = {d % rank for d in node.args[1:3] if isinstance(d, int)}
        if dims == {rank - 2, rank - 1}:
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _found(kind: str, node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node | None, scale: float | None) -> Attention:
    """The attention computed at ``node`` (the sdpa call or the softmax) from the (B, H, N, d) or
    (B, N, d) query and key nodes ``q``, ``k`` (and ``v`` when known), with logit ``scale``."""
    shape = shape_of(q)
    heads, nq, d = (shape[1], shape[2], shape[3]) if len(shape) == 4 else (1, shape[-2], shape[-1])
    record = Record(
        kind=kind, node=node.name, scale=scale, num_heads=heads, head_dim=d, num_queries=nq, num_keys=shape_of(k)[-2]
    )
    return Attention(record=record, node=node, q=q, k=k, v=v)


def _sdpa(node: fx.Node) -> Attention | None:
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    if not all(isinstance(t, fx.Node) and shape_of(t) for t in (q, k, v)):
        return None
    return _found("sdpa", node, q, k, v, node.kwargs.get("scale"))


def _is_number(a: object) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _factor(node: fx.Node) -> float | None | bool:
    """What ``node`` multiplies its tensor operand by: a float for ``x * c``, ``c * x`` or ``x / c``
    with a Python number ``c``; None for a product or quotient by a tensor (an unknown factor);
    False for any other op (no factor)."""
    if node.op == "call_function":
        is_mul, is_div = node.target in _MUL_FNS, node.target in _DIV_FNS
    elif node.op == "call_method":
        is_mul, is_div = node.target in ("mul", "mul_"), node.target in ("div", "div_", "true_divide")
    else:
        return False
    if not (is_mul or is_div) or len(node.args) != 2:
        return False
    a, b = node.args
    if is_mul and (_is_number(a) or _is_number(b)):
        return float(a if _is_number(a) else b)
    if is_div and _is_number(b) and b != 0:
        return 1.0 / float(b)
    return None


def _times(scale: float | None, factor: float | None | bool) -> float | None:
    if factor is False:
        return scale
    return None if scale is None or factor is None else scale * factor


def _score_product(node: object, shape: tuple[int, ...], depth: int) -> tuple[fx.Node, float | None] | None:
    """Walk back from a softmax's input to the ``q @ k^T`` product that the scores come from.

    Every op on the way must keep the scores' ``shape`` (B, H, N, N) or permute it (a talking-heads
    Linear or conv over the heads, as in CaiT or EfficientFormer-v2, is walked through); at each op the walk follows
    the operands of that shape (a bias or mask may broadcast; one of full shape that leads to no
    product, such as a learned bias, is a dead end). Returns the product and the numeric factor
    applied on the way (1.0 for none, None when a tensor factor makes it unknown).
    """
    if depth < 0 or not isinstance(node, fx.Node) or shape_of(node) is None:
        return None
    if shape_of(node) != shape:  # talking heads (CaiT): permute -> Linear over heads -> permute back
        if sorted(shape_of(node)) != sorted(shape) or _is_matmul(node):
            return None
    elif _is_matmul(node):
        return node, 1.0
    if node.op not in ("call_function", "call_method", "call_module") or _is_softmax(node):
        return None
    for arg in data_args(node):
        found = _score_product(arg, shape, depth - 1)
        if found is not None:
            return found[0], _times(found[1], _factor(node))
    return None


def _unscaled(q: fx.Node) -> tuple[fx.Node, float | None | bool]:
    """``(q0, c)`` for a query computed as ``q0 * c`` (a Python number, as timm scales q first),
    else ``(q, False)``."""
    factor = _factor(q)
    if isinstance(factor, float):
        inner = [a for a in data_args(q) if shape_of(a) == shape_of(q)]
        if len(inner) == 1:
            return inner[0], factor
    return q, False


def _explicit(softmax: fx.Node) -> Attention | None:
    found = _score_product(softmax.args[0], shape_of(softmax), _MAX_SCORE_OPS)
    if found is None:
        return None
    node, scale = found
    q, kt = node.args[0], node.args[1]
    k = _untranspose(kt) if isinstance(kt, fx.Node) else None
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)) or len(shape_of(q) or ()) < 3:
        return None
    q, factor = _unscaled(q)
    scale = _times(scale, factor)
    product = _probs_product(softmax)
    v = product.args[1] if product is not None else None
    return _found("softmax", softmax, q, k, v, scale)


def _probs_product(softmax: fx.Node) -> fx.Node | None:
    """The ``probs @ v`` product that reads ``softmax``'s probabilities: straight away or after
    ops that keep their (B, H, N, N) shape (dropout, a renormalisation, a mix with another
    probability map, as ConViT's gated positional attention adds one and renormalises)."""
    shape = shape_of(softmax)
    frontier, seen = [softmax], {softmax}
    for _ in range(_MAX_PROB_OPS):
        ahead = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if _is_matmul(user):
                    if user.args[0] is node:
                        return user
                elif user.op in ("call_function", "call_method", "call_module") and shape_of(user) == shape:
                    ahead.append(user)
        frontier = ahead
    return None


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

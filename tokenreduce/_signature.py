"""The traced forward's signature: one input, the image batch.

torch.fx makes a placeholder of every forward argument. timm's ``forward(x, attn_mask=None,
is_causal=False)`` would leave two dead inputs in the graph (ONNX export then fails); binding
them to their defaults with ``concrete_args`` and erasing the placeholders and input checks
torch.fx leaves for them gives a graph whose only input is the image batch.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn

from .errors import TokenReduceError

__all__ = ["bound_defaults", "drop_bound_placeholders"]


def bound_defaults(model: nn.Module) -> dict[str, Any]:
    """``concrete_args`` binding every forward argument after the image batch to its default."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # drop self
    if not params:
        raise TokenReduceError(
            f"capture: {type(model).__name__}.forward takes no input; tokenreduce traces forward(x) with an image "
            f"batch x. Wrap the model in a module whose forward(x) calls it."
        )
    first, rest = params[0], params[1:]
    if first.kind in (first.VAR_POSITIONAL, first.VAR_KEYWORD, first.KEYWORD_ONLY):
        raise TokenReduceError(
            f"capture: {type(model).__name__}.forward's first argument is '{first}', not a positional image "
            f"batch; wrap the model in a module whose forward(x) calls it."
        )
    required = [p.name for p in rest if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise TokenReduceError(
            f"capture: {type(model).__name__}.forward needs argument(s) {', '.join(map(repr, required))} besides "
            f"the image batch '{first.name}'; tokenreduce traces single-input models. Give them defaults, or wrap "
            f"the model in a module whose forward(x) passes them."
        )
    return {p.name: p.default for p in rest if p.default is not p.empty}


# unwrapped: while another thread traces, torch.fx has these module globals wrapped
_INPUT_CHECKS = frozenset(inspect.unwrap(f) for f in (torch._assert, fx._symbolic_trace._assert_is_none, operator.eq))


def drop_bound_placeholders(graph: fx.Graph) -> None:
    """Erase every placeholder after the first (bound defaults, unused ``*args``) and the input
    checks torch.fx adds for bound arguments; a placeholder the model really reads is an error."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        dead: list[fx.Node] = []
        todo = list(ph.users)
        while todo:
            node = todo.pop()
            if node in dead:
                continue
            dead.append(node)
            todo.extend(node.users)
        real = [n for n in dead if n.op != "call_function" or inspect.unwrap(n.target) not in _INPUT_CHECKS]
        if real:
            raise TokenReduceError(
                f"capture: forward argument '{ph.target}' is read by the traced graph (node {real[0].name}); "
                f"tokenreduce traces single-input models. Wrap the model in a module whose forward(x) calls it."
            )
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(dead, key=order.__getitem__, reverse=True):
            graph.erase_node(node)
        graph.erase_node(ph)

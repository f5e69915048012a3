"""What every pass shares: lint and recompile on the way out, and errors that name the node."""

from __future__ import annotations

import functools
from typing import Callable

import torch.fx as fx

from ..errors import TokenReduceError

__all__ = ["graph_pass", "tag", "tags"]

META_KEY = "tokenreduce"


def graph_pass(fn: Callable[..., fx.GraphModule]) -> Callable[..., fx.GraphModule]:
    """Decorate a ``GraphModule -> GraphModule`` pass: lint + recompile after it, and wrap any
    failure in a TokenReduceError that names the pass."""

    @functools.wraps(fn)
    def run(gm: fx.GraphModule, *args, **kwargs) -> fx.GraphModule:
        try:
            out = fn(gm, *args, **kwargs)
            out.graph.lint()
            out.recompile()
        except TokenReduceError:
            raise
        except Exception as exc:  # noqa: BLE001
            node = getattr(exc, "node", None)  # fx lint errors and some passes carry the node
            where = f" at {node.format_node()}" if isinstance(node, fx.Node) else ""
            raise TokenReduceError(
                f"pass {fn.__name__} failed{where}: {type(exc).__name__}: {exc}. This is a tokenreduce "
                f"bug or an unsupported graph shape; tokenreduce.inspect(model) shows what analysis found."
            ) from exc
        return out

    return run


def tag(node: fx.Node, **info) -> None:
    """Record a pass decision on ``node`` (read back by inspect/summary and tests)."""
    node.meta.setdefault(META_KEY, {}).update(info)


def tags(node: fx.Node) -> dict:
    return node.meta.get(META_KEY, {})

"""What every pass shares: lint and recompile on the way out, a record of the passes that ran,
preconditions checked in code, and errors that name the node and the passes before."""

from __future__ import annotations

import functools
from typing import Callable

import torch.fx as fx

from ..anchors import META_KEY
from ..errors import TokenReduceError

__all__ = ["graph_pass", "require", "tag", "tags", "passes_run", "site_states", "state_before"]

HISTORY_KEY = "tokenreduce_passes"


def passes_run(gm: fx.GraphModule) -> list[str]:
    """Names of the passes that ran on ``gm``, in order."""
    return list(gm.meta.get(HISTORY_KEY, ()))


def require(gm: fx.GraphModule, pass_name: str, *needed: str) -> None:
    """Raise a TokenReduceError unless every pass in ``needed`` already ran on ``gm``."""
    missing = [p for p in needed if p not in passes_run(gm)]
    if missing:
        raise TokenReduceError(
            f"pass {pass_name} expects {', '.join(missing)} to have run first "
            f"(ran so far: {', '.join(passes_run(gm)) or 'none'})"
        )


def graph_pass(fn: Callable[..., fx.GraphModule]) -> Callable[..., fx.GraphModule]:
    """Decorate a ``GraphModule -> GraphModule`` pass: lint + recompile after it, record it in
    ``gm.meta``, and wrap any failure in a TokenReduceError naming the pass and those before."""

    @functools.wraps(fn)
    def run(gm: fx.GraphModule, *args, **kwargs) -> fx.GraphModule:
        before = passes_run(gm)
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
                f"pass {fn.__name__} failed{where} (after {', '.join(before) or 'no other pass'}): "
                f"{type(exc).__name__}: {exc}. This is a tokenreduce bug or an unsupported graph shape; "
                f"tokenreduce.inspect(model) shows what analysis found."
            ) from exc
        out.meta[HISTORY_KEY] = [*before, fn.__name__]
        return out

    return run


def tag(node: fx.Node, **info) -> None:
    """Record a pass decision on ``node`` (read back by inspect/summary and tests)."""
    node.meta.setdefault(META_KEY, {}).update(info)


def tags(node: fx.Node) -> dict:
    return node.meta.get(META_KEY, {})


def site_states(graph: fx.Graph) -> list[fx.Node]:
    """The sites' ``TokenState`` nodes (tagged ``state_of`` by :func:`insert_sites`), in graph order."""
    return [n for n in graph.nodes if "state_of" in tags(n)]


def state_before(
    states: list[fx.Node], order: dict[fx.Node, int], stages: int | tuple[int, ...], node: fx.Node
) -> fx.Node | None:
    """The last of ``states`` (graph order) of ``stages`` (one stage, or a token stream's stages)
    before ``node`` (``order``: a node's place in the graph); None when no such site comes before it."""
    stages = (stages,) if isinstance(stages, int) else stages
    return next((s for s in reversed(states) if tags(s)["stage"] in stages and order[s] < order[node]), None)

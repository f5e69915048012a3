"""The module ``apply`` returns: a ``GraphModule`` that is also a first-class timm model.

timm's optimizer factory, EMA and layer decay read ``no_weight_decay()`` and ``group_matcher()``;
training code reads ``forward_features`` / ``forward_head`` / ``reset_classifier``. A reduced
model answers them as the dense model did, with its score heads (``reduce_sites.i``) grouped
with the block their site belongs to. It pickles (``torch.save(reduced)``) and deep-copies with
its graph marks intact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._graph_state import graph_from_records, graph_records
from .analysis import ModelMap
from .anchors import find
from .errors import TokenReduceError
from .plan import Plan

__all__ = ["Reduction", "ReducedModel"]


@dataclass(frozen=True)
class Reduction:
    """What ``apply`` did, kept in ``reduced.meta["tokenreduce"]``: plain data only.

    ``model_name`` is the timm architecture when the model had one (``load`` rebuilds from it),
    else the class name; ``gflops_dense`` / ``params_dense`` the dense model's cost for one image
    of ``example_shape``; ``head`` the classifier's module path (None: no classifier found);
    ``no_weight_decay`` and ``group_matchers`` (fine, coarse) what the dense model declared;
    ``transformers`` the class name and config dict of a Hugging Face model (``load`` rebuilds
    from them), else None.
    """

    plan: Plan
    model_map: ModelMap
    example_shape: tuple[int, ...]
    aux: bool
    model_name: str
    gflops_dense: float
    params_dense: int
    head: str | None
    no_weight_decay: tuple[str, ...]
    group_matchers: tuple[dict | None, dict | None]
    transformers: dict | None = None


def _rebuild(body: dict, records: list[dict], class_name: str) -> ReducedModel:
    """Unpickle: the same modules, attributes and graph (names and marks included)."""
    root = nn.Module()
    root.__dict__.update(body)
    gm = ReducedModel(root, graph_from_records(records), class_name)
    for key, value in body.items():
        if key not in gm.__dict__ or key in ("meta", "training"):
            gm.__dict__[key] = value
    return gm


class ReducedModel(fx.GraphModule):
    """A reduced vision transformer; see :func:`tokenreduce.apply`."""

    @property
    def reduction(self) -> Reduction:
        return self.meta["tokenreduce"]

    def __reduce__(self):
        body = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_graph", "_code", "_split_cache") and not k.startswith("_lineno")
        }
        return _rebuild, (body, graph_records(self.graph), self._get_name())

    # -- timm's model interface ---------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """The dense model's ``no_weight_decay()`` names (class token, position embedding, ...)."""
        return set(self.reduction.no_weight_decay)

    def group_matcher(self, coarse: bool = False) -> dict:
        """The dense model's parameter groups (timm's layer decay), each site's score head in the
        group of the block it reduces."""
        matcher = self.reduction.group_matchers[1 if coarse else 0]
        if matcher is None:
            raise TokenReduceError(
                f"group_matcher: {self.reduction.model_name} declares no group_matcher(), so its "
                f"reduced model has none either; timm falls back to automatic grouping without it"
            )
        return _with_sites(matcher, self)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._head_path("get_classifier"))

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        """Replace the classifier with a fresh ``Linear(in, num_classes)`` (``Identity`` for 0)."""
        if global_pool is not None and global_pool != getattr(self, "global_pool", global_pool):
            raise TokenReduceError(
                "reset_classifier: changing global_pool changes the traced graph; reset it on the dense "
                "model and apply again"
            )
        path = self._head_path("reset_classifier")
        old = self.get_submodule(path)
        if not isinstance(old, (nn.Linear, nn.Identity)):
            raise TokenReduceError(
                f"reset_classifier: the classifier '{path}' is a {type(old).__name__}, "
                f"not a Linear; reset it on the dense model and apply again"
            )
        in_features = old.in_features if isinstance(old, nn.Linear) else getattr(self, "num_features", None)
        if num_classes > 0 and in_features is None:
            raise TokenReduceError(
                "reset_classifier: the classifier is an Identity and the model has no num_features to size a new one"
            )
        ref = next(self.parameters())
        new = nn.Linear(in_features, num_classes).to(ref.device, ref.dtype) if num_classes > 0 else nn.Identity()
        parent, _, name = path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, name, new)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, N_final, C): the final tokens before pooling, reduced."""
        return self._split("features")(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N_final, C) final tokens -> logits (or the pooled features with ``pre_logits``)."""
        return self._split("pre_logits" if pre_logits else "head")(x)

    # -- helpers -------------------------------------------------------------------------------

    def _head_path(self, user: str) -> str:
        if self.reduction.head is None:
            raise TokenReduceError(
                f"{user}: {self.reduction.model_name} has no classifier that "
                f"tokenreduce could find (no get_classifier())"
            )
        return self.reduction.head

    def _split(self, kind: str) -> fx.GraphModule:
        """A graph module for one part of the forward, built once per generated code."""
        cache = self.__dict__.setdefault("_split_cache", {})
        key = (kind, self.code)
        if key not in cache:
            if self.reduction.model_map.final_tokens is None:
                raise TokenReduceError(
                    f"forward_{'features' if kind == 'features' else 'head'}: analysis "
                    f"found no final tokens in {self.reduction.model_name}"
                )
            tokens = find(self.graph, "tokens", 0, user=f"forward_{kind}")
            graph = _features_graph(self.graph, tokens) if kind == "features" else _head_graph(self, tokens, kind)
            part = fx.GraphModule(self, graph, f"{self._get_name()}_{kind}")
            part.graph.eliminate_dead_code()
            part.recompile()
            cache.clear()
            cache[key] = part
        return cache[key]


def _features_graph(graph: fx.Graph, tokens: fx.Node) -> fx.Graph:
    new, env = fx.Graph(), {}
    for node in graph.nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
        if node is tokens:
            break
    new.output(env[tokens])
    return new


def _head_graph(gm: ReducedModel, tokens: fx.Node, kind: str) -> fx.Graph:
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    target = out_node.args[0][0] if gm.reduction.aux else out_node.args[0]
    if kind == "pre_logits":
        head = [n for n in graph.nodes if n.op == "call_module" and n.target == gm._head_path("forward_head")]
        if len(head) != 1:
            raise TokenReduceError("forward_head(pre_logits=True): the classifier is not called once in the graph")
        target = head[0].args[0]
    needed: set[fx.Node] = set()  # what the output reads, back to the final tokens
    stack: list[fx.Node] = []
    fx.node.map_arg(target, stack.append)
    while stack:
        node = stack.pop()
        if node in needed or node is tokens:
            continue
        if node.op == "placeholder":
            raise TokenReduceError(
                "forward_head: the head reads the model input besides the final tokens; use the whole model instead"
            )
        needed.add(node)
        stack.extend(node.all_input_nodes)
    new = fx.Graph()
    env = {tokens: new.placeholder("x")}
    for node in graph.nodes:
        if node in needed:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(fx.node.map_arg(target, lambda n: env[n]))
    return new


def _with_sites(matcher: dict, gm: ReducedModel) -> dict:
    """``matcher`` plus one rule per site: ``reduce_sites.i.*`` takes the group (and the layer
    number) of the first parameter of the block that site i reduces."""
    specs = {name: ([(spec, None)] if isinstance(spec, str) else list(spec or ())) for name, spec in matcher.items()}
    names = [n for n, _ in gm.named_parameters()]
    for site in gm.reduction.plan.sites:
        own = next((n for n in names if n.startswith(site.path + ".")), None)
        if own is None or not any(n.startswith(f"reduce_sites.{site.index}.") for n in names):
            continue
        for group, rules in specs.items():
            hit = next((re.match(r, own) for r, _ in rules if re.match(r, own)), None)
            if hit is not None:
                suffix = tuple(int(g) for g in hit.groups() if g is not None and g.isdigit())
                rules.insert(0, (rf"^reduce_sites\.{site.index}\.", suffix or None))
                break
    return {name: rules if rules else None for name, rules in specs.items()}


def dense_cost(model: nn.Module, example: Tensor) -> tuple[float, int]:
    """GFLOPs (multiply-adds, one image) and parameters of the dense ``model``."""
    from .flops import gflops

    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        return gflops(model, example), params

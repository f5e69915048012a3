"""Hugging Face ``transformers`` vision models: how they are captured.

``transformers`` no longer supports ``torch.fx`` (its models branch on shapes and dtypes in
Python, and their attention is dispatched through a registry), so a model of it is captured in
three steps, after which the one analysis reads it like any other graph:

1. Its attention is served by ``"tokenreduce"``, an attention function registered with
   ``transformers.AttentionInterface``: ``F.scaled_dot_product_attention`` on the (B, H, N, d)
   query, key and value, which the analysis recognises. Only the working copy is switched; the
   user's model keeps its own setting. Models that write their attention out (``softmax(q @
   k^T)``, as Data2Vec-Vision and PVT do) are traced as they are.
2. It is traced through a one-input root, ``forward(pixel_values)``, by
   :class:`~tokenreduce._value_tracer.ValueTracer`, which decides Python control flow by the
   example batch. The root returns ``logits`` when the model has a head, else
   ``pooler_output`` (CLIP and SigLIP vision towers, DINOv2 backbones), else
   ``last_hidden_state``: the reduced model returns that tensor, not the ``ModelOutput``.
3. The graph is rebased onto the model itself, so parameter names, module paths and
   ``state_dict`` keys are the model's own (``vit.encoder.layer.3...``).

Stochastic depth modules (``*DropPath``) stay opaque, so they follow ``train()`` / ``eval()``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import TokenReduceError

__all__ = ["ATTENTION", "ImageRoot", "build", "input_size", "is_hf_model", "leaf_types", "prepare", "rebase", "source"]

ATTENTION = "tokenreduce"
_PREFIX = "model."
_OUTPUTS = ("logits", "pooler_output", "last_hidden_state")


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``transformers`` attention interface: q, k, v (B, H, N, d) -> ((B, N, H, d), None)."""
    if kwargs.get("is_causal") or getattr(module, "is_causal", False):
        raise TokenReduceError(
            f"apply: {type(module).__name__} is causal attention; token reduction serves vision encoders "
            f"(bidirectional attention over image tokens)"
        )
    if key.shape[1] != query.shape[1]:
        raise TokenReduceError(
            f"apply: {type(module).__name__} has {query.shape[1]} query heads and {key.shape[1]} key heads "
            f"(grouped-query attention); tokenreduce serves attention with one key head per query head"
        )
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


def prepare(model: nn.Module) -> None:
    """Switch ``model`` (the working copy) to tokenreduce's traceable attention."""
    if not getattr(model, "_supports_attention_backend", False):
        return  # its attention is written out in the model (softmax(q @ k^T)): traced as it is
    _register()
    try:
        model.set_attn_implementation(ATTENTION)
    except (AttributeError, ValueError) as exc:
        raise TokenReduceError(
            f"apply: {type(model).__name__} does not take a custom attention implementation "
            f"(set_attn_implementation: {exc}); tokenreduce serves transformers models whose attention "
            f"goes through transformers.AttentionInterface (transformers >= 4.56)"
        ) from exc


class ImageRoot(nn.Module):
    """``forward(pixel_values)`` of a ``transformers`` model: its first present output of
    ``logits``, ``pooler_output``, ``last_hidden_state``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, return_dict=True)
        for name in _OUTPUTS:
            value = out.get(name)
            if value is not None:
                return value
        raise TokenReduceError(
            f"apply: {type(self.model).__name__} returned none of {', '.join(_OUTPUTS)}; tokenreduce serves "
            f"image classifiers and vision encoders"
        )


def leaf_types(model: nn.Module) -> tuple[type, ...]:
    """Classes kept opaque: stochastic depth, whose Python branch on ``self.training`` would be
    frozen into the graph."""
    return tuple({type(m) for m in model.modules() if type(m).__name__.endswith("DropPath")})


def rebase(root: ImageRoot, graph: fx.Graph) -> dict[str, Any]:
    """Make a graph traced through :class:`ImageRoot` address the model itself: strip the
    root's ``model.`` from targets and recorded module paths. Returns what the targets name
    (modules, parameters, and the constants tracing made, which live on the root) for
    ``fx.GraphModule(returned, graph)``."""
    owned: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            obj: Any = root
            for part in target.split("."):
                obj = getattr(obj, part)
            node.target = target.removeprefix(_PREFIX)
            owned[node.target] = obj
        stack = node.meta.get("nn_module_stack")
        if stack:
            rebased = {}
            for key, (path, cls) in stack.items():  # keys are module paths too
                if path != "model":  # the model's own forward is the top level
                    rebased[key.removeprefix(_PREFIX)] = (path.removeprefix(_PREFIX), cls)
            node.meta["nn_module_stack"] = rebased
    return owned


def input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from the model's config (``num_channels``, ``image_size``), if it has them."""
    cfg: Any = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", cfg)
    size, chans = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", 3)
    if isinstance(size, int):
        return (int(chans), size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (int(chans), int(size[0]), int(size[1]))
    return None


def source(model: nn.Module) -> dict | None:
    """What rebuilds ``model`` with random weights: its class name and config dict (plain data)."""
    if not is_hf_model(model):
        return None
    return {"class": type(model).__name__, "config": model.config.to_dict()}


def build(spec: dict) -> nn.Module:
    """The model :func:`source` describes, with random weights."""
    import transformers

    cls = getattr(transformers, spec["class"], None)
    if cls is None:
        raise TokenReduceError(
            f"load: transformers {transformers.__version__} has no class {spec['class']!r}; build the dense model "
            f"yourself and pass it: tokenreduce.load(path, model=...)"
        )
    return cls(cls.config_class.from_dict(spec["config"]))

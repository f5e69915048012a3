"""The public entry points: ``apply`` and ``inspect``."""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from torch import nn

from . import hf
from .analysis import ModelMap, analyze
from .capture import capture
from .errors import TokenReduceError
from .methods import Method, get_method
from .passes import add_aux_output, gather_positions, insert_sites, pad_spatial, route_policy
from .plan import Loc, make_plan
from .reduced import ReducedModel, Reduction, dense_cost
from .runtime.site import ReductionSite

__all__ = ["apply", "inspect"]

log = logging.getLogger(__name__)

_COPIED_ATTRS = (int, float, str, bool, tuple, dict, type(None))


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """``example_input``, or a random batch of 2 at the size the model declares: timm's
    ``pretrained_cfg["input_size"]``, with the patch embedding's own input channels and image size
    where it has them (``in_chans=`` / ``img_size=`` overrides are not reflected in the config)."""
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input: expected a tensor batch, got {type(example_input).__name__}")
        return example_input
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") or (hf.input_size(model) if hf.is_hf_model(model) else None)
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    first = cfg.get("first_conv")  # the input convolution, as timm's config names it
    conv = model.get_submodule(first) if isinstance(first, str) and first in dict(model.named_modules()) else None
    in_chans = getattr(conv if conv is not None else getattr(embed, "proj", None), "in_channels", None)
    if size is None:
        raise ValueError(
            f"example_input: {type(model).__name__} has no timm pretrained_cfg['input_size'] (nor a transformers "
            f"config image_size); pass "
            f"example_input=torch.randn(2, 3, H, W) with the input size the model takes"
        )
    c, h, w = size
    if isinstance(in_chans, int):
        c = in_chans
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        h, w = img_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(2, c, h, w, device=device, dtype=dtype)


def _weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors, so
    ``train()``/``eval()`` on the result never flips the original's modules."""
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _method(method: str | Method) -> Method:
    if isinstance(method, Method):
        return method
    return get_method(method)


def _timm_facts(model: nn.Module) -> dict:
    """What timm's training helpers ask of a model, read once from the dense one."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = None
    if callable(getattr(model, "get_classifier", None)):
        classifier = model.get_classifier()
        head = next((name for name, m in model.named_modules() if m is classifier and name), None)
    matchers: tuple = (None, None)
    if callable(getattr(model, "group_matcher", None)):
        fine, coarse = model.group_matcher(coarse=False), model.group_matcher(coarse=True)
        matchers = (fine if isinstance(fine, dict) else None, coarse if isinstance(coarse, dict) else None)
    nwd = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    return {
        "model_name": cfg.get("architecture") or type(model).__name__,
        "head": head,
        "no_weight_decay": tuple(sorted(nwd)),
        "group_matchers": matchers,
    }


def apply(
    model: nn.Module,
    method: str | Method = "etps",
    locs: Sequence[Loc] | None = None,
    keep_ratio: float | Sequence[float] = 0.7,
    *,
    example_input: torch.Tensor | None = None,
    aux: bool = False,
) -> ReducedModel:
    """Return ``model`` with token reduction inserted at ``locs``; ``model`` is left untouched.

    Args:
        model: a vision transformer (timm's, a hybrid, your own that ``torch.fx`` can trace, or
            a Hugging Face ``transformers`` vision model: see :mod:`tokenreduce.hf`).
        method: ``"etps"``, ``"evit"``, ``"dtps"``, ``"dynamicvit"`` or a registered method.
        locs: 0-based block indices (counted over all stages) or block paths (``"blocks.3"``,
            ``"stages.2.blocks.3"``); default: the model's ``default_reduction_locs`` if it has
            one, else the paper's sites ([3, 6, 9] of 12 blocks; the start of every stage after
            the first for PVT-like models), see :func:`tokenreduce.plan.default_locs`.
        keep_ratio: a float in (0, 1] or one per site. eTPS/EViT: relative to the tokens entering
            each site (keep ``ceil(rho * n)``). dTPS/DynamicViT: cumulative over the original
            tokens, the s-th site keeping ``int(n * rho ** s)``; a list gives those cumulative
            fractions (``[0.7, 0.49, 0.343]``).
        example_input: a batch the model takes (default: timm's config input size, with the
            patch embedding's channels and image size; a transformers config's ``image_size``
            and ``num_channels``).
        aux: also return :class:`tokenreduce.Aux`: ``out, aux = reduced(x)`` (keep masks, final
            tokens, host maps).

    Returns:
        A :class:`ReducedModel` (a ``torch.fx.GraphModule``) sharing ``model``'s parameters and
        buffers (dTPS adds score heads under ``reduce_sites``), in the same train/eval mode. To
        fine-tune without touching ``model``, pass ``copy.deepcopy(model)``. In eval mode (and for
        eTPS/EViT in train mode) tokens are really removed; dTPS/DynamicViT in train mode keep full
        length with straight-through Gumbel masks and policy-masked attention.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, ReducedModel) or "tokenreduce" in getattr(model, "meta", {}):
        raise TokenReduceError(
            f"apply: {type(model).__name__} is already reduced by tokenreduce; apply to the dense model "
            f"instead (sites of both calls can go in one `locs` list)"
        )
    if not isinstance(aux, bool):
        raise TypeError(f"apply: aux must be a bool, got {aux!r}")
    m = _method(method)
    example = _example(model, example_input)
    work = _weight_sharing_copy(model).eval()  # trace in eval: no dropout branch frozen in
    name = type(model).__name__
    traced = capture(work, example)
    gm = ReducedModel(traced, traced.graph, name)
    model_map = analyze(gm, tuple(example.shape), name)
    if locs is None:  # a backbone may declare its paper's sites
        locs = getattr(model, "default_reduction_locs", None)
    plan = make_plan(model_map, m, locs, keep_ratio)

    param = next(model.parameters(), None)
    sites = [ReductionSite(s, m, model_map.block(s.block).dim) for s in plan.sites]
    if param is not None:
        sites = [s.to(device=param.device, dtype=param.dtype) for s in sites]
    gm = insert_sites(gm, model_map, plan, sites)
    if model_map.positions:  # rotary tables, relative position bias follow the tokens
        gm = gather_positions(gm, model_map)
    if model_map.to_grid:
        gm = pad_spatial(gm, model_map)
    if m.scorer.learned:
        gm = route_policy(gm, model_map, plan)
    if aux:
        gm = add_aux_output(gm, model_map, plan)
    for key, value in vars(model).items():
        if not key.startswith("_") and isinstance(value, _COPIED_ATTRS) and not hasattr(gm, key):
            setattr(gm, key, copy.copy(value))
    gflops_dense, params_dense = dense_cost(work, example)
    gm.meta["tokenreduce"] = Reduction(
        plan=plan,
        model_map=model_map,
        example_shape=tuple(example.shape),
        aux=aux,
        gflops_dense=gflops_dense,
        params_dense=params_dense,
        **_timm_facts(model),
        transformers=hf.source(model),
    )
    gm.train(model.training)
    log.info("tokenreduce.apply: %s", plan.table().replace("\n", " | "))
    return gm


def inspect(model: nn.Module, example_input: torch.Tensor | None = None) -> ModelMap:
    """Trace ``model`` and describe it: blocks, attention, prefix tokens, valid sites.

    The returned :class:`ModelMap` prints as a table (``print(tokenreduce.inspect(model))``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect: model must be an nn.Module, got {type(model).__name__}")
    example = _example(model, example_input)
    work = _weight_sharing_copy(model).eval()
    gm = capture(work, example)
    return analyze(gm, tuple(example.shape), type(model).__name__)

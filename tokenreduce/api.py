"""The public entry points: ``apply``, ``inspect``, ``summary``."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from .analysis import ModelMap, analyze
from .capture import capture
from .flops import gflops
from .methods import SCORERS, get_method
from .passes import add_aux_output, insert_sites, pad_spatial, route_policy
from .passes.infra import tags
from .plan import Loc, Plan, make_plan
from .site import ReductionSite

__all__ = ["apply", "inspect", "summary", "Reduction", "Summary"]

log = logging.getLogger(__name__)

_COPIED_ATTRS = (int, float, str, bool, tuple, dict, type(None))


@dataclass(frozen=True)
class Reduction:
    """What ``apply`` did, kept in ``reduced.meta["tokenreduce"]``."""

    plan: Plan
    model_map: ModelMap
    example_shape: tuple[int, ...]
    aux: bool


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input: expected a tensor batch, got {type(example_input).__name__}")
        return example_input
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        size = (size[0], *img_size)  # timm's `img_size=` override is not reflected in pretrained_cfg
    if size is None:
        raise ValueError(
            f"example_input: {type(model).__name__} has no timm pretrained_cfg['input_size']; pass "
            f"example_input=torch.randn(2, 3, H, W) with the input size the model takes"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(2, *size, device=device, dtype=dtype)


def _weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors, so
    ``train()``/``eval()`` on the result never flips the original's modules."""
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def apply(
    model: nn.Module,
    method: str = "etps",
    locs: Sequence[Loc] | None = None,
    keep_ratio: float | Sequence[float] = 0.7,
    *,
    example_input: torch.Tensor | None = None,
    aux: bool = False,
) -> fx.GraphModule:
    """Return ``model`` with token reduction inserted at ``locs``; ``model`` is left untouched.

    Args:
        model: a vision transformer (timm's, a hybrid, or your own) that ``torch.fx`` can trace.
        method: ``"etps"``, ``"evit"``, ``"dtps"``, ``"dynamicvit"`` or a registered method.
        locs: 0-based block indices (counted over all stages) or block paths (``"blocks.3"``,
            ``"stages.2.blocks.3"``); default: the model's ``default_reduction_locs`` if it has
            one, else the paper's sites ([3, 6, 9] of 12 blocks; the start of every stage after
            the first for PVT-like models), see :func:`tokenreduce.plan.default_locs`.
        keep_ratio: a float in (0, 1] or one per site. eTPS/EViT: relative to the tokens entering
            each site (keep ``ceil(rho * n)``). dTPS/DynamicViT: cumulative over the original
            tokens, the s-th site keeping ``int(n * rho ** s)``; a list gives those cumulative
            fractions (``[0.7, 0.49, 0.343]``).
        example_input: a batch the model takes (default: timm's ``pretrained_cfg`` input size).
        aux: also return the per-site keep masks: ``out, keeps = reduced(x)``, each (B, n).

    Returns:
        A ``torch.fx.GraphModule`` sharing ``model``'s parameters and buffers (dTPS adds score
        heads under ``reduce_sites``), in the same train/eval mode. In eval mode (and for
        eTPS/EViT in train mode) tokens are really removed; dTPS/DynamicViT in train mode keep full
        length with straight-through Gumbel masks and policy-masked attention.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be an nn.Module, got {type(model).__name__}")
    m = get_method(method)
    example = _example(model, example_input)
    work = _weight_sharing_copy(model).eval()  # trace in eval: no dropout branch frozen in
    name = type(model).__name__
    gm = capture(work, example)
    model_map = analyze(gm, tuple(example.shape), name)
    if locs is None:  # a backbone may declare its paper's sites
        locs = getattr(model, "default_reduction_locs", None)
    plan = make_plan(model_map, m, locs, keep_ratio)

    param = next(model.parameters(), None)
    sites = [ReductionSite(s, m, model_map.block(s.block).dim) for s in plan.sites]
    if param is not None:
        sites = [s.to(device=param.device, dtype=param.dtype) for s in sites]
    gm = insert_sites(gm, model_map, plan, sites)
    if model_map.to_grid:
        gm = pad_spatial(gm, model_map)
    if SCORERS[m.scorer].learned:
        gm = route_policy(gm, model_map, plan)
    if aux:
        gm = add_aux_output(gm)
    for key, value in vars(model).items():
        if not key.startswith("_") and isinstance(value, _COPIED_ATTRS) and not hasattr(gm, key):
            setattr(gm, key, copy.copy(value))
    gm.meta["tokenreduce"] = Reduction(plan=plan, model_map=model_map, example_shape=tuple(example.shape), aux=aux)
    gm.meta["tokenreduce_dense"] = work  # unregistered: for summary's dense FLOPs only
    gm.train(model.training)
    log.info("tokenreduce.apply: %s", plan.table().replace("\n", " | "))
    return gm


def inspect(model: nn.Module, example_input: torch.Tensor | None = None) -> ModelMap:
    """Trace ``model`` and describe it: blocks, attention, prefix tokens, valid sites.

    The returned :class:`ModelMap` prints as a table (``print(tokenreduce.inspect(model))``).
    """
    example = _example(model, example_input)
    work = _weight_sharing_copy(model).eval()
    gm = capture(work, example)
    return analyze(gm, tuple(example.shape), type(model).__name__)


@dataclass(frozen=True)
class Summary:
    """Tokens per block and the cost of a reduced model, for one image of the example size."""

    rows: tuple[tuple[int, str, int, int], ...]  # (block, path, attention tokens, mlp tokens)
    gflops_dense: float
    gflops_reduced: float
    params_dense: int
    params_reduced: int
    plan: Plan

    def __str__(self) -> str:
        width = max(len("path"), *(len(path) for _, path, _, _ in self.rows))
        lines = [self.plan.table(), "", f"{'block':<5}  {'path':<{width}}  attn tokens  mlp tokens"]
        for i, path, na, nm in self.rows:
            lines.append(f"{i:<5}  {path:<{width}}  {na:>11}  {nm:>10}")
        lines += [
            "",
            f"GFLOPs (multiply-adds, 1 image): dense {self.gflops_dense:.3f}  reduced {self.gflops_reduced:.3f}"
            f"  ({self.gflops_reduced / self.gflops_dense:.1%})",
            f"params: dense {self.params_dense / 1e6:.2f} M  reduced {self.params_reduced / 1e6:.2f} M",
        ]
        return "\n".join(lines)

    __repr__ = __str__


def summary(reduced: fx.GraphModule, example_input: torch.Tensor | None = None) -> Summary:
    """Tokens entering every block's attention and MLP, GFLOPs before/after, parameter counts."""
    info = reduced.meta.get("tokenreduce") if isinstance(reduced, fx.GraphModule) else None
    if info is None:
        raise TypeError("summary: expected a module returned by tokenreduce.apply")
    dense = reduced.meta["tokenreduce_dense"]
    param = next(reduced.parameters(), None)
    example = example_input if example_input is not None else torch.randn(
        1, *info.example_shape[1:], device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32)

    from torch.fx.passes.shape_prop import ShapeProp

    from .analysis.graph import shape_of

    was_training = reduced.training
    reduced.eval()
    try:
        with torch.no_grad():
            ShapeProp(reduced).propagate(example[:1])
    finally:
        reduced.train(was_training)
    attn_tokens: dict[int, int] = {}
    mlp_tokens: dict[int, int] = {}
    for node in reduced.graph.nodes:
        t = tags(node)
        if t.get("role") == "query":
            attn_tokens[t["block"]] = shape_of(node)[-2]
        elif t.get("role") == "attn_residual":
            mlp_tokens[t["block"]] = shape_of(node)[1]
    # an after-attention site changes the stream right after the attention residual
    for site in info.plan.sites:
        if site.placement == "after_attn":
            mlp_tokens[site.block] = site.num_prefix + site.n_out
    rows = tuple((b.index, b.path, attn_tokens[b.index], mlp_tokens[b.index]) for b in info.model_map.blocks)
    return Summary(
        rows=rows,
        gflops_dense=gflops(dense, example),
        gflops_reduced=gflops(reduced, example),
        params_dense=sum(p.numel() for p in dense.parameters()),
        params_reduced=sum(p.numel() for p in reduced.parameters()),
        plan=info.plan,
    )

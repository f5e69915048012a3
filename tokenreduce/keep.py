"""Keep ratios after ``apply``: the targets a ratio loss pulls towards, and changing them
(EViT's keep-rate warm-up, a schedule over fine-tuning)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .plan import make_plan
from .reduced import ReducedModel

__all__ = ["keep_targets", "set_keep_ratio"]


def _check(reduced: ReducedModel, user: str) -> None:
    if not isinstance(reduced, ReducedModel):
        raise TypeError(f"{user}: expected a module returned by tokenreduce.apply, got {type(reduced).__name__}")


def keep_targets(reduced: ReducedModel) -> tuple[float, ...]:
    """Per site, the fraction of its stage's original patch tokens meant to be alive after it:
    rho ** s for dTPS/DynamicViT's scalar rho (the list as given otherwise); the product of the
    per-site ratios so far for eTPS/EViT. What :func:`tokenreduce.losses.ratio_loss` compares
    ``aux.keeps`` with."""
    _check(reduced, "keep_targets")
    plan = reduced.reduction.plan
    if plan.method.counts == "cumulative":
        return tuple(s.ratio for s in plan.sites)
    targets, running = [], {}
    for s in plan.sites:
        running[s.stage] = running.get(s.stage, 1.0) * s.ratio
        targets.append(running[s.stage])
    return tuple(targets)


def set_keep_ratio(reduced: ReducedModel, keep_ratio: float | Sequence[float]) -> ReducedModel:
    """Change the keep ratios of ``reduced``'s sites in place (same conventions as ``apply``);
    returns ``reduced``. Sites and methods stay; token counts follow. A compiled model
    recompiles when a token count changes (each distinct count is one more graph)."""
    _check(reduced, "set_keep_ratio")
    info = reduced.reduction
    plan = make_plan(info.model_map, info.plan.method, [s.block for s in info.plan.sites], keep_ratio)
    for module, site in zip(reduced.reduce_sites, plan.sites):
        module.ratio = site.ratio
    reduced.meta["tokenreduce"] = dataclasses.replace(info, plan=plan)
    return reduced

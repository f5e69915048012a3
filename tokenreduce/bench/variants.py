"""The variants of one model that a run compares: dense, each method's limit, each reduced model.

A variant that cannot be built (a method the model does not support, a limit that is not
defined for it) gets a row whose ``note`` says why; the others are measured.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from torch import nn

from .limit import limit_key, limit_of
from .protocol import Row, Variant

__all__ = ["build_variants", "short_error", "tokens_after_sites"]

log = logging.getLogger(__name__)


def short_error(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:400]


def tokens_after_sites(reduced: nn.Module) -> list[int]:
    """Tokens in the stream (prefix included) right after each site of ``reduced``'s plan."""
    return [s.num_prefix + s.n_out for s in reduced.meta["tokenreduce"].plan.sites]


def _variant_row(model_name: str, variant: Variant, **extra) -> Row:
    """The row of ``variant`` of ``model_name``: its name, kind, method and ratio, and ``extra``."""
    return Row(
        model=model_name, variant=variant.name, kind=variant.kind, method=variant.method, ratio=variant.ratio, **extra
    )


def _reduced_row(model_name: str, variant: Variant, reduced: nn.Module) -> Row:
    sites = reduced.meta["tokenreduce"].plan.sites
    return _variant_row(
        model_name,
        variant,
        locs=[s.block for s in sites],
        sites=[s.path for s in sites],
        tokens=tokens_after_sites(reduced),
    )


def build_variants(
    model_name: str,
    dense: nn.Module,
    methods: Sequence[str] = ("etps",),
    ratios: Sequence[float] = (0.7,),
    locs: Sequence[int | str] | None = None,
    example: torch.Tensor | None = None,
    reduced: nn.Module | None = None,
    limits: bool = True,
) -> tuple[dict[str, nn.Module], list[Row]]:
    """Modules to time (variant name -> eval module) and one row per variant, dense first, then
    the limits, then the reduced models.

    ``reduced``: an already reduced model of ``dense`` (from a checkpoint); then it is the only
    reduced variant and ``methods`` / ``ratios`` / ``locs`` are not used. Methods whose plans
    have the same limit (:func:`~tokenreduce.bench.limit.limit_key`: dTPS and DynamicViT) share
    one limit row, named after the first of them. ``limits=False`` leaves the limits out.
    """
    import tokenreduce

    if not methods and reduced is None:
        raise ValueError("methods: give at least one method (e.g. etps)")
    if any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"keep ratios: each must be in (0, 1], got {list(ratios)}")
    dense = dense.eval()
    modules: dict[str, nn.Module] = {"dense": dense}
    rows = [Row(model=model_name, variant="dense", kind="dense")]
    built: list[tuple[Variant, nn.Module | None, str | None]] = []
    if reduced is not None:
        plan = reduced.meta["tokenreduce"].plan
        ratio = plan.sites[0].ratio if plan.sites else 1.0
        built.append((Variant("reduced", plan.method.name, round(ratio, 6)), reduced.eval(), None))
    else:
        for method in methods:
            for rho in ratios:
                torch.manual_seed(0)  # learned scorers: the same random head in every run
                try:
                    m = tokenreduce.apply(
                        dense,
                        method=method,
                        locs=None if locs is None else list(locs),
                        keep_ratio=rho,
                        example_input=example,
                    ).eval()
                    built.append((Variant("reduced", method, rho), m, None))
                except (tokenreduce.TokenReduceError, ValueError, TypeError) as err:
                    built.append((Variant("reduced", method, rho), None, short_error(err)))
    limit_rows: dict[tuple, Row] = {}
    reduced_rows = []
    for variant, m, error in built:
        if m is None:
            reduced_rows.append(_variant_row(model_name, variant, note=f"unsupported: {error}"))
            continue
        row = _reduced_row(model_name, variant, m)
        if limits:
            key = limit_key(m)
            if key not in limit_rows:
                lv = Variant("limit", variant.method, variant.ratio)
                try:
                    limit = limit_of(copy.deepcopy(m)).eval()
                    limit_rows[key] = _reduced_row(model_name, lv, limit)
                    modules[lv.name] = limit
                except tokenreduce.TokenReduceError as err:
                    limit_rows[key] = _variant_row(model_name, lv, note=f"n/a: {short_error(err)}")
            if limit_rows[key].note is None:
                row.limit = limit_rows[key].variant
        modules[variant.name] = m
        reduced_rows.append(row)
    rows += sorted(limit_rows.values(), key=lambda r: (r.method, -r.ratio)) + reduced_rows
    log.info("%s: %d variant(s) to time, %d not built", model_name, len(modules), len(rows) - len(modules))
    return modules, rows

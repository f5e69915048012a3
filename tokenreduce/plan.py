"""Plan: the user's request, validated against a ModelMap, as frozen typed records.

Keep-ratio conventions (tps-reference.md, Sec. 2):

* per-site methods (``etps``, ``evit``): ``keep_ratio`` rho is relative to the patch tokens
  entering each site; a site keeps ``ceil(rho * n_in)``.
* cumulative methods (``dtps``, ``dynamicvit``): the s-th site of a stage (s = 1, 2, ...) keeps
  ``int(n * rho ** s)`` of the stage's original ``n`` patch tokens (137 / 96 / 67 of 196 at 0.7).
  A list gives those cumulative fractions directly (``[0.7, 0.49, 0.343]``), non-increasing.

Either form accepts one float for every site or a list with one value per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

from .analysis import ModelMap
from .errors import TokenReduceError

if TYPE_CHECKING:
    from .methods import Method

__all__ = ["Site", "Plan", "make_plan", "keep_count", "default_locs"]

Loc = Union[int, str]


def keep_count(counts: str, ratio: float, n_in: int, n_ref: int) -> int:
    """Patch tokens a site keeps, in [1, n_in]. Rounding guards against float noise
    (0.7 * 200 = 140.00000000000003 must keep 140, not 141)."""
    n_in, n_ref = int(n_in), int(n_ref)  # sizes arrive as 0-dim tensors under TorchScript tracing
    if counts == "per_site":
        k = math.ceil(round(ratio * n_in, 6))
    else:
        k = int(round(ratio * n_ref, 6))
    return max(1, min(n_in, k))


@dataclass(frozen=True)
class Site:
    """One reduction. Counts are for the example input; at run time they are recomputed from the
    actual token count with :func:`keep_count`, so other input sizes work."""

    index: int
    block: int
    path: str
    stage: int
    placement: str
    ratio: float
    num_prefix: int
    n_in: int
    keep: int
    extra: int

    @property
    def n_out(self) -> int:
        """Patch tokens leaving the site (kept plus any appended token)."""
        return self.keep + self.extra


@dataclass(frozen=True)
class Plan:
    method: Method
    sites: tuple[Site, ...]
    model_name: str

    def table(self) -> str:
        rows = [("site", "block", "placement", "ratio", "patches in", "kept", "out")]
        for s in self.sites:
            rows.append((str(s.index), s.path, s.placement, f"{s.ratio:.4g}", str(s.n_in), str(s.keep), str(s.n_out)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([f"{self.method.name} on {self.model_name}", *lines])


def default_locs(model_map: ModelMap) -> list[int]:
    """The paper's sites: [3, 6, 9] of 12 blocks; a quarter, half and three quarters of the depth
    otherwise. Hierarchical models: the first block of every stage after the first (PVT), unless
    the last stage holds most blocks (CvT), which then gets the quarter points of its own."""
    blocks = model_map.blocks
    stages = sorted({b.stage for b in blocks})
    if len(stages) > 1:
        last = [b.index for b in blocks if b.stage == stages[-1]]
        if len(last) * 2 < len(blocks):
            return [next(b.index for b in blocks if b.stage == s) for s in stages[1:]]
        blocks = tuple(blocks[i] for i in last)
    depth = len(blocks)
    if depth < 2:
        raise TokenReduceError(
            f"locs: {model_map.model_name} has {depth} block(s) in its last stage, too few for default "
            f"sites (the first one sits a quarter of the way down); pass locs explicitly, e.g. "
            f"locs=[{blocks[0].index}] (dtps: before that block)"
        )
    picks = sorted({max(1, min(depth - 1, round(depth * q))) for q in (0.25, 0.5, 0.75)})
    return [blocks[p].index for p in picks]


def _resolve_loc(loc: Loc, model_map: ModelMap) -> int:
    paths = model_map.paths
    n = len(paths)
    valid = f"valid: block indices 0..{n - 1} or paths {', '.join(repr(p) for p in paths)}"
    if isinstance(loc, bool) or not isinstance(loc, (int, str)):
        raise TypeError(f"locs: each entry must be a block index (int) or a block path (str), got {loc!r}; {valid}")
    if isinstance(loc, int):
        if not 0 <= loc < n:
            raise ValueError(f"locs: block index {loc} is out of range; {valid}")
        return loc
    if loc not in paths:
        raise ValueError(f"locs: no block at path {loc!r}; {valid}")
    return paths.index(loc)


def _ratios(keep_ratio: float | Sequence[float], n_sites: int) -> list[float]:
    if isinstance(keep_ratio, (int, float)) and not isinstance(keep_ratio, bool):
        values = [float(keep_ratio)] * n_sites
    elif isinstance(keep_ratio, Sequence) and not isinstance(keep_ratio, str):
        if any(isinstance(r, bool) or not isinstance(r, (int, float)) for r in keep_ratio):
            raise TypeError(f"keep_ratio: every entry must be a float in (0, 1], got {list(keep_ratio)!r}")
        values = [float(r) for r in keep_ratio]
        if len(values) != n_sites:
            raise ValueError(
                f"keep_ratio: got {len(values)} values for {n_sites} sites; give one float or one value per site"
            )
    else:
        raise TypeError(f"keep_ratio: expected a float in (0, 1] or a list of them, got {keep_ratio!r}")
    for r in values:
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise ValueError(f"keep_ratio: every ratio must be in (0, 1], got {r}")
    return values


def make_plan(
    model_map: ModelMap, method: Method, locs: Sequence[Loc] | None, keep_ratio: float | Sequence[float]
) -> Plan:
    """Validate ``locs`` and ``keep_ratio`` against ``model_map`` and compute each site's counts."""
    if locs is None:
        indices = default_locs(model_map)
    else:
        if isinstance(locs, (int, str)):
            locs = [locs]
        indices = [_resolve_loc(loc, model_map) for loc in locs]
        if not indices:
            raise ValueError("locs: empty; a reduction that inserts nothing is an error. Omit locs for the defaults")
        dup = sorted({i for i in indices if indices.count(i) > 1})
        if dup:
            raise ValueError(f"locs: duplicate block(s) {[model_map.paths[i] for i in dup]}; each block takes one site")
    ratios = _ratios(keep_ratio, len(indices))
    scalar = isinstance(keep_ratio, (int, float))
    order = sorted(range(len(indices)), key=indices.__getitem__)
    indices, ratios = [indices[i] for i in order], [ratios[i] for i in order]

    scorer = method.scorer
    any_full = any(b.attn.full_keys and b.has_class_token for b in model_map.blocks)
    sites: list[Site] = []
    for s, (bi, r) in enumerate(zip(indices, ratios)):
        block = model_map.block(bi)
        prev = sites[-1] if sites and sites[-1].stage == block.stage else None
        if scorer.needs_prefix and not block.has_class_token:
            raise TokenReduceError(
                f"{method.name}: block '{block.path}' has no class token ({block.num_prefix} prefix "
                f"token(s), none of them a class token), and "
                f"{method.name} scores tokens by class-token attention. Use method='dtps' (a "
                f"learned score head) for models without a class token."
            )
        if scorer.needs_attention and not block.attn.full_keys:
            raise TokenReduceError(
                f"{method.name}: the attention of block '{block.path}' uses {block.attn.num_keys} "
                f"keys for {block.attn.num_queries} queries (spatially reduced keys), so it has no "
                f"class-token attention row over the patches; "
                + (
                    "place the site at a block with full-sequence attention or use method='dtps'."
                    if any_full
                    else f"no block of {model_map.model_name} has one: use method='dtps'."
                )
            )
        for g in model_map.to_grid:
            if g.stage == block.stage and g.grid[0] * g.grid[1] != block.num_patches:
                raise TokenReduceError(
                    f"{method.name}: stage {block.stage} of {model_map.model_name} lays {g.grid[0] * g.grid[1]} "
                    f"of its {block.num_tokens} tokens on a {g.grid[0]} x {g.grid[1]} grid, but analysis counts "
                    f"{block.num_patches} patch tokens at '{block.path}' (a leading token built from the image, "
                    f"such as PiT's class token carried between stages, is not a prefix it can see); reduce a "
                    f"stage whose grid holds all its patch tokens, or no stage of this model"
                )
        carried = next((p for p in sites if p.stage in model_map.stream_stages(block.stage)[1:]), None)
        if carried is not None:
            entry = next(b.path for b in model_map.blocks if b.stage == block.stage)
            raise TokenReduceError(
                f"{method.name}: stage {block.stage} of {model_map.model_name} (from '{entry}') continues the "
                f"token stream of stage {carried.stage} with no grid in between (its token count changes there, "
                f"as where a class token is inserted), and the site at '{carried.path}' already removed tokens of "
                f"that stream, so the token counts of the site at '{block.path}' would not hold; place every "
                f"site in one of the two stages"
            )
        extra = method.reducer.extra_tokens
        if extra and any(g.stage == block.stage for g in model_map.to_grid):
            raise TokenReduceError(
                f"{method.name}: stage {block.stage} of {model_map.model_name} lays its tokens on a "
                f"grid (spatial operators at '{block.path}' and after), and {method.name}'s "
                f"appended token has no grid position. Use method='etps' or 'dtps'."
            )
        if method.counts == "cumulative":
            if scalar:  # the s-th site of a stage keeps rho ** s of the stage's tokens
                r = r ** (1 + sum(1 for p in sites if p.stage == block.stage))
            elif prev is not None and r > prev.ratio:
                raise ValueError(
                    f"keep_ratio: {method.name} ratios are cumulative fractions of the original "
                    f"tokens and must not increase within a stage; got {prev.ratio} then {r} at '{block.path}'"
                )
        n_ref = block.num_patches
        n_in = prev.n_out if prev is not None else block.num_patches
        keep = keep_count(method.counts, r, n_in, n_ref)
        sites.append(
            Site(
                index=s,
                block=bi,
                path=block.path,
                stage=block.stage,
                placement=method.placement,
                ratio=r,
                num_prefix=block.num_prefix,
                n_in=n_in,
                keep=keep,
                extra=extra if keep < n_in else 0,  # a site that keeps everything is the identity
            )
        )
    return Plan(method=method, sites=tuple(sites), model_name=model_map.model_name)

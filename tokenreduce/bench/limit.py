"""The limit of a reduced model: the same blocks on the same token counts, with free sites.

No token reduction can run faster than its own plan (sites, placement, token counts) executed
with zero cost for scoring, choosing and merging tokens. :func:`limit_of` builds exactly that
model from a reduced one: every site becomes :class:`TruncateSite`, a view ``x[:, :P + k]``,
and every position-indexed table that follows the tokens (rotary tables, relative position
bias: ``runtime.positions.follow_positions``) becomes :func:`cut_positions`, a view of the
table's first rows, so the limit pays no gather either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TruncateSite", "cut_positions", "limit_of", "limit_key"]


class TruncateSite(nn.Module):
    """Zero-cost stand-in for a ``ReductionSite``: ``x (B, P + n, C) -> x[:, :P + k + extra]``.

    The site's own count rule gives ``k`` (per site or cumulative over the stage), and the
    reducer's appended tokens (EViT's fused token) are kept as rows of the stream. No scoring,
    no gather, no merge: the output is a view. The state says what the limit kept: the first
    patches, ``pos = arange(k + extra)`` (B, k + extra), so a position table read after it is
    cut to the same tokens (:func:`cut_positions` reads only its length).
    """

    def __init__(self, site: nn.Module) -> None:
        super().__init__()
        self.num_prefix, self.ratio, self.counts = site.num_prefix, site.ratio, site.counts
        self.extra = site.reducer.extra_tokens  # appended tokens (EViT's fused one)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:.4g}, counts={self.counts}, extra={self.extra}, num_prefix={self.num_prefix}"

    def forward(self, x: Tensor, state, q=None, k=None, scale=None, probs=None):
        from tokenreduce.plan import keep_count
        from tokenreduce.runtime.state import TokenState

        B, n = x.shape[0], x.shape[1] - self.num_prefix
        n_ref = n if state is None else state.n_ref
        keep = keep_count(self.counts, self.ratio, n, n_ref)
        out = x[:, : self.num_prefix + keep + self.extra]  # (B, P + k', C), k' <= n
        kept = out.shape[1] - self.num_prefix
        pos = torch.arange(kept, device=x.device).expand(B, kept)  # the first k' patches, in order
        return out, TokenState(pos=pos, keep=None, n_ref=n_ref)


def cut_positions(
    table: Tensor,
    state,
    axes: tuple[int, ...],
    rank: int,
    num_prefix: int,
    with_prefix: bool,
    appended: bool,
    fill: float | None = None,
) -> Tensor:
    """The limit's ``follow_positions`` (same arguments): the current tokens are the stage's
    first ``P + n`` (n = ``state.pos.shape[1]``), so their rows are the table's first rows.

    ``table`` is broadcast right-aligned against a rank-``rank`` image operand; on each token
    axis (counted in that rank) it keeps the first ``n`` rows (``P + n`` with ``with_prefix``),
    a view. ``appended`` and ``fill`` are not used: in the limit the rows a reducer would append
    are the next original tokens, which have their own positions. Returns a tensor of the
    table's own rank, e.g. a rotary table (n_ref, d) -> (n, d), a bias (1, H, N, N) -> (1, H, P + n, P + n).
    """
    n = state.pos.shape[1]
    length = n + (num_prefix if with_prefix else 0)
    shift = rank - table.dim()  # table dimension d meets operand axis d + shift
    for a in axes:
        d = a - shift
        if 0 <= d < table.dim() and table.shape[d] > length:
            table = table.narrow(d, 0, length)
    return table


def _cut_position_tables(gm: nn.Module) -> int:
    """Point every ``follow_positions`` call of ``gm``'s graph at :func:`cut_positions`; the count."""
    from tokenreduce.runtime.positions import follow_positions

    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is follow_positions]
    for node in nodes:
        node.target = cut_positions
    if nodes:
        gm.graph.lint()
        gm.recompile()
    return len(nodes)


def limit_of(reduced: nn.Module) -> nn.Module:
    """The limit of ``reduced`` (from ``tokenreduce.apply``): every site replaced by
    :class:`TruncateSite`, every position table that follows the tokens cut by
    :func:`cut_positions`. Mutates and returns ``reduced``: pass a model built for it.

    Hybrid backbones (PVT, CvT) scatter tokens back to a grid after a site; a cut of the stream
    has no grid positions, so their limit is not defined and this raises ``TokenReduceError``.
    """
    from tokenreduce.errors import TokenReduceError

    info = getattr(reduced, "meta", {}).get("tokenreduce")
    if info is None:
        raise TypeError("limit_of: expected a module returned by tokenreduce.apply")
    if info.model_map.to_grid:
        raise TokenReduceError(
            f"limit_of: the limit is not defined for {info.model_map.model_name}: its blocks return tokens to "
            f"a spatial grid, which a cut x[:, :P + k] does not have; compare it with the dense model only"
        )
    sites = reduced.get_submodule("reduce_sites")
    for i in range(len(sites)):
        sites[i] = TruncateSite(sites[i])
    _cut_position_tables(reduced)
    return reduced


def limit_key(reduced: nn.Module) -> tuple:
    """What makes two plans' limits the same model: per site, its block, placement, count rule,
    ratio and appended tokens. Methods with equal keys (dTPS and DynamicViT) share one limit."""
    info = reduced.meta["tokenreduce"]
    counts = info.plan.method.counts
    return tuple((s.block, s.placement, counts, round(s.ratio, 9), s.extra) for s in info.plan.sites)

"""The limit of a reduced model: the same blocks on the same token counts, with free sites.

No token reduction can run faster than its own plan (sites, placement, token counts) executed
with zero cost for scoring, choosing and merging tokens. :func:`limit_of` builds exactly that
model from a reduced one: every site becomes :class:`TruncateSite`, a view ``x[:, :P + k]``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TruncateSite", "limit_of", "limit_key"]


class TruncateSite(nn.Module):
    """Zero-cost stand-in for a ``ReductionSite``: ``x (B, P + n, C) -> x[:, :P + k + extra]``.

    The site's own count rule gives ``k`` (per site or cumulative over the stage), and the
    reducer's appended tokens (EViT's fused token) are kept as rows of the stream. No scoring,
    no gather, no merge: the output is a view.
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

        n = x.shape[1] - self.num_prefix
        n_ref = n if state is None else state.n_ref
        keep = keep_count(self.counts, self.ratio, n, n_ref)
        return x[:, : self.num_prefix + keep + self.extra], TokenState(pos=None, keep=None, n_ref=n_ref)


def limit_of(reduced: nn.Module) -> nn.Module:
    """The limit of ``reduced`` (from ``tokenreduce.apply``): every site replaced by
    :class:`TruncateSite`. Mutates and returns ``reduced``: pass a model built for it.

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
    return reduced


def limit_key(reduced: nn.Module) -> tuple:
    """What makes two plans' limits the same model: per site, its block, placement, count rule,
    ratio and appended tokens. Methods with equal keys (dTPS and DynamicViT) share one limit."""
    info = reduced.meta["tokenreduce"]
    counts = info.plan.method.counts
    return tuple((s.block, s.placement, counts, round(s.ratio, 9), s.extra) for s in info.plan.sites)

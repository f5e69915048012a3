"""The registry of reduction methods: a method is a scorer, a reducer and a placement.

| method       | scorer                  | reducer | placement    | keep counts |
|--------------|-------------------------|---------|--------------|-------------|
| ``etps``     | class-token attention   | squeeze | after attn   | per site    |
| ``evit``     | class-token attention   | fuse    | after attn   | per site    |
| ``dtps``     | learned score head      | squeeze | before block | cumulative  |
| ``dynamicvit`` | learned score head    | drop    | before block | cumulative  |

``register_method`` adds a combination (a random scorer serves ablations), ``register_scorer`` and
``register_reducer`` add new parts without touching the passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import ops

__all__ = [
    "Method", "Scorer", "METHODS", "SCORERS", "REDUCERS", "MASKED_REDUCERS", "INDEXED_REDUCERS",
    "register_method", "register_scorer", "register_reducer", "get_method",
]

PLACEMENTS = ("before", "after_attn")
COUNTS = ("per_site", "cumulative")


@dataclass(frozen=True)
class Method:
    """A named composition. ``counts``: how ``keep_ratio`` maps to token counts (see ``plan``)."""

    name: str
    scorer: str
    reducer: str
    placement: str
    counts: str

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Method {self.name!r}: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.counts not in COUNTS:
            raise ValueError(f"Method {self.name!r}: counts must be one of {COUNTS}, got {self.counts!r}")


class Scorer(nn.Module):
    """Scores patch tokens; higher means keep. Subclasses set the class attributes below.

    ``forward(patches (B, n, C), prev_keep (B, n, 1) | None, attn) -> (B, n)`` where ``attn`` is
    the block's :class:`AttnInputs` (used by attention-based scorers, None for others).
    ``learned`` scorers also provide ``log_probs`` for the training form (Gumbel masks). With
    ``sees_prefix`` both receive the whole stream (B, P + n, C) instead of ``patches`` and still
    score the n patch tokens.
    """

    needs_attention: bool = False
    needs_prefix: bool = False  # needs a class token leading the sequence
    learned: bool = False
    sees_prefix: bool = False  # takes the whole stream (B, P + n, C), prefix rows first


class ClsAttentionScorer(Scorer):
    """EViT's score: the class token's attention to each patch, averaged over heads."""

    needs_attention = True
    needs_prefix = True

    def __init__(self, dim: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix

    def forward(self, patches: Tensor, prev_keep: Tensor | None, attn) -> Tensor:
        if attn.probs is not None:  # explicit softmax attention: read its class row, (B, n)
            return attn.probs[:, :, 0, self.num_prefix:].float().mean(dim=1)
        scale = attn.scale if attn.scale is not None else attn.q.shape[-1] ** -0.5  # sdpa's default
        return ops.cls_attention(attn.q, attn.k, scale, self.num_prefix)


class LearnedScorer(Scorer):
    """DynamicViT's score head; the score is the keep log-probability."""

    learned = True
    sees_prefix = True  # the head's norm reads the whole stream (see ops.ScoreHead)

    def __init__(self, dim: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.head = ops.ScoreHead(dim)

    def log_probs(self, x: Tensor, prev_keep: Tensor | None) -> Tensor:
        return self.head(x, prev_keep, self.num_prefix)  # (B, n, 2)

    def forward(self, x: Tensor, prev_keep: Tensor | None, attn) -> Tensor:
        return self.head(x, prev_keep, self.num_prefix)[..., 0]


class RandomScorer(Scorer):
    """Uniform random scores: the ablation baseline."""

    def __init__(self, dim: int, num_prefix: int) -> None:
        super().__init__()

    def forward(self, patches: Tensor, prev_keep: Tensor | None, attn) -> Tensor:
        return torch.rand(patches.shape[:2], device=patches.device)


def _fuse(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    """EViT: append one token, the score-weighted sum of the pruned ones: (B, k + 1, C)."""
    extra = ops.fuse_one(pruned, pruned_scores.to(pruned.dtype))
    return torch.cat([kept, extra], dim=1)


def _squeeze(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    return ops.squeeze(kept, pruned)


def _drop(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    return ops.drop(kept, pruned)


def _squeeze_indexed(x: Tensor, num_prefix: int, kept_idx: Tensor, pruned_idx: Tensor, scores: Tensor) -> Tensor:
    return ops.squeeze_tokens(x, kept_idx, pruned_idx, num_prefix)


def _squeeze_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    return ops.squeeze_masked(x, keep, pruned_now)


def _drop_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    return x


# reducer(kept (B,k,C), pruned (B,n-k,C), pruned_scores (B,n-k)) -> (B, k [+ extra], C)
REDUCERS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "squeeze": _squeeze, "fuse": _fuse, "drop": _drop,
}
# training form of a reducer, fixed length: (x (B,n,C), keep (B,n,1), pruned_now (B,n,1)) -> (B,n,C)
MASKED_REDUCERS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "squeeze": _squeeze_masked, "drop": _drop_masked,
}
# optional fast form of a reducer that gathers for itself (one fused kernel for the whole site):
# (x (B,P+n,C), P, kept_idx (B,k), pruned_idx (B,n-k), scores (B,n)) -> (B, P + k [+ extra], C),
# prefix rows included; indices into x[:, P:], raster order. Must equal the plain form.
INDEXED_REDUCERS: dict[str, Callable[[Tensor, int, Tensor, Tensor, Tensor], Tensor]] = {
    "squeeze": _squeeze_indexed,
}
# extra tokens a reducer appends after the kept ones
EXTRA_TOKENS = {"squeeze": 0, "fuse": 1, "drop": 0}

SCORERS: dict[str, type[Scorer]] = {
    "cls_attention": ClsAttentionScorer, "learned": LearnedScorer, "random": RandomScorer,
}

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (replacing one of the same name)."""
    if method.scorer not in SCORERS:
        raise ValueError(f"register_method: unknown scorer {method.scorer!r}; known: {sorted(SCORERS)}")
    if method.reducer not in REDUCERS:
        raise ValueError(f"register_method: unknown reducer {method.reducer!r}; known: {sorted(REDUCERS)}")
    if SCORERS[method.scorer].needs_attention and method.placement != "after_attn":
        raise ValueError(
            f"register_method: scorer {method.scorer!r} reads the block's attention, which exists only "
            f"after it has run; use placement='after_attn' (or a scorer that needs no attention)"
        )
    if SCORERS[method.scorer].learned and method.reducer not in MASKED_REDUCERS:
        raise ValueError(
            f"register_method: reducer {method.reducer!r} has no fixed-length training form, which a "
            f"learned scorer needs; use one of {sorted(MASKED_REDUCERS)} or register it in MASKED_REDUCERS"
        )
    METHODS[method.name] = method
    return method


def register_scorer(name: str, cls: type[Scorer]) -> type[Scorer]:
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register_scorer: {cls!r} must subclass tokenreduce.methods.Scorer")
    SCORERS[name] = cls
    return cls


def register_reducer(
    name: str, fn: Callable, masked: Callable | None = None, extra_tokens: int = 0,
    indexed: Callable | None = None,
) -> Callable:
    REDUCERS[name] = fn
    EXTRA_TOKENS[name] = extra_tokens
    for table, form in ((MASKED_REDUCERS, masked), (INDEXED_REDUCERS, indexed)):
        if form is not None:
            table[name] = form
        else:  # re-registering a name must not keep the old reducer's other forms
            table.pop(name, None)
    return fn


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


register_method(Method("etps", "cls_attention", "squeeze", "after_attn", "per_site"))
register_method(Method("evit", "cls_attention", "fuse", "after_attn", "per_site"))
register_method(Method("dtps", "learned", "squeeze", "before", "cumulative"))
register_method(Method("dynamicvit", "learned", "drop", "before", "cumulative"))

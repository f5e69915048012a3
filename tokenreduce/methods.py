"""The registry of reduction methods: a method is a scorer, a reducer and a placement.

| method         | scorer                | reducer | placement    | keep counts |
|----------------|-----------------------|---------|--------------|-------------|
| ``etps``       | class-token attention | squeeze | after attn   | per site    |
| ``evit``       | class-token attention | fuse    | after attn   | per site    |
| ``dtps``       | learned score head    | squeeze | before block | cumulative  |
| ``dynamicvit`` | learned score head    | drop    | before block | cumulative  |

A :class:`Reducer` is one frozen record of every form of a token reducer; a :class:`Method`
holds its resolved scorer class and reducer, so nothing is looked up by name after
``register_method``. The registries are private: ``register_*`` / ``get_*`` / ``list_*`` /
``unregister_*`` are the interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
from torch import Tensor, nn

from . import ops
from .runtime.state import AttnInputs

__all__ = [
    "Method",
    "Reducer",
    "Scorer",
    "Placement",
    "Counts",
    "register_method",
    "register_scorer",
    "register_reducer",
    "get_method",
    "get_reducer",
    "get_scorer",
    "list_methods",
    "list_reducers",
    "list_scorers",
    "unregister_method",
    "unregister_reducer",
    "unregister_scorer",
]

Placement = Literal["before", "after_attn"]
Counts = Literal["per_site", "cumulative"]

# plain(kept (B, k, C), pruned (B, n - k, C), pruned_scores (B, n - k)) -> (B, k + extra, C)
PlainForm = Callable[[Tensor, Tensor, Tensor], Tensor]
# masked(x (B, n, C), keep (B, n, 1), pruned_now (B, n, 1)) -> (B, n, C): fixed-length training form
MaskedForm = Callable[[Tensor, Tensor, Tensor], Tensor]
# indexed(x (B, P + n, C), P, kept_idx (B, k), pruned_idx (B, n - k), scores (B, n)) -> (B, P + k + extra, C)
IndexedForm = Callable[[Tensor, int, Tensor, Tensor, Tensor], Tensor]
# assign(kept (B, k, C), pruned (B, n - k, C)) -> (B, n - k) int64 index into kept: each pruned token's host
AssignForm = Callable[[Tensor, Tensor], Tensor]


class Scorer(nn.Module):
    """Scores patch tokens; higher means keep. Subclasses set the class attributes below.

    ``forward(patches (B, n, C), prev_keep (B, n, 1) | None, attn: AttnInputs) -> (B, n)``;
    ``attn`` carries the block's q and k (or its probabilities) for attention-based scorers and
    is all None otherwise. ``learned`` scorers also provide ``log_probs`` for the training form
    (Gumbel masks). With ``sees_prefix`` both receive the whole stream (B, P + n, C) instead of
    ``patches`` and still score the n patch tokens.
    """

    needs_attention: bool = False
    needs_prefix: bool = False  # needs a class token leading the sequence
    learned: bool = False
    sees_prefix: bool = False  # takes the whole stream (B, P + n, C), prefix rows first

    def __init__(self, dim: int, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix


class ClsAttentionScorer(Scorer):
    """EViT's score: the class token's attention to each patch, averaged over heads."""

    needs_attention = True
    needs_prefix = True

    def forward(self, patches: Tensor, prev_keep: Tensor | None, attn: AttnInputs) -> Tensor:
        if attn.probs is not None:  # explicit softmax attention: read its class row, (B, n)
            return attn.probs[:, :, 0, self.num_prefix :].float().mean(dim=1)
        scale = attn.scale if attn.scale is not None else attn.q.shape[-1] ** -0.5  # sdpa's default
        return ops.cls_attention(attn.q, attn.k, scale, self.num_prefix)


class LearnedScorer(Scorer):
    """DynamicViT's score head; the score is the keep log-probability."""

    learned = True
    sees_prefix = True  # the head's norm reads the whole stream (see ops.ScoreHead)

    def __init__(self, dim: int, num_prefix: int) -> None:
        super().__init__(dim, num_prefix)
        self.head = ops.ScoreHead(dim)

    def log_probs(self, x: Tensor, prev_keep: Tensor | None) -> Tensor:
        return self.head(x, prev_keep, self.num_prefix)  # (B, n, 2)

    def forward(self, x: Tensor, prev_keep: Tensor | None, attn: AttnInputs) -> Tensor:
        return self.head(x, prev_keep, self.num_prefix)[..., 0]


class RandomScorer(Scorer):
    """Uniform random scores: the ablation baseline."""

    def forward(self, patches: Tensor, prev_keep: Tensor | None, attn: AttnInputs) -> Tensor:
        return torch.rand(patches.shape[:2], device=patches.device)


@dataclass(frozen=True)
class Reducer:
    """Every form of one token reducer (shapes in the module's type aliases).

    ``plain`` serves inference and methods that reduce for real in training; ``masked`` is the
    fixed-length training form a learned scorer needs (None: no such form); ``indexed`` an
    optional fused form that gathers for itself and must equal ``plain``; ``extra_tokens`` how
    many tokens ``plain`` appends after the kept ones; ``assign`` which kept token each pruned one
    joins (for ``aux`` host maps and pictures; None: pruned tokens have no host).
    """

    name: str
    plain: PlainForm
    masked: MaskedForm | None = None
    indexed: IndexedForm | None = None
    extra_tokens: int = 0
    assign: AssignForm | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Reducer: name must be a non-empty str, got {self.name!r}")
        for form in ("plain", "masked", "indexed", "assign"):
            fn = getattr(self, form)
            if not (fn is None and form != "plain") and not callable(fn):
                raise TypeError(f"Reducer {self.name!r}: `{form}` must be callable, got {fn!r}")
        if isinstance(self.extra_tokens, bool) or not isinstance(self.extra_tokens, int) or self.extra_tokens < 0:
            raise ValueError(f"Reducer {self.name!r}: extra_tokens must be an int >= 0, got {self.extra_tokens!r}")


@dataclass(frozen=True)
class Method:
    """A named composition of resolved parts. ``counts``: how ``keep_ratio`` maps to token
    counts (see :mod:`tokenreduce.plan`)."""

    name: str
    scorer: type[Scorer]
    reducer: Reducer
    placement: Placement
    counts: Counts


_SCORERS: dict[str, type[Scorer]] = {}
_REDUCERS: dict[str, Reducer] = {}
_METHODS: dict[str, Method] = {}


def _choice(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"register_method: {what} must be one of {allowed}, got {value!r}")


def register_scorer(name: str, cls: type[Scorer]) -> type[Scorer]:
    """Add (or replace) the scorer ``name``; ``cls(dim, num_prefix)`` builds one per site."""
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register_scorer: {cls!r} must subclass tokenreduce.Scorer")
    _SCORERS[name] = cls
    return cls


def register_reducer(reducer: Reducer) -> Reducer:
    """Add (or replace) ``reducer`` under ``reducer.name``. Methods already registered keep the
    record they resolved."""
    if not isinstance(reducer, Reducer):
        raise TypeError(f"register_reducer: expected a tokenreduce.Reducer, got {type(reducer).__name__}")
    _REDUCERS[reducer.name] = reducer
    return reducer


def register_method(
    name: str,
    *,
    scorer: str | type[Scorer],
    reducer: str | Reducer,
    placement: Placement,
    counts: Counts,
) -> Method:
    """Compose, validate and register a method (replacing one of the same name).

    ``scorer`` and ``reducer`` are registered names or the objects themselves; they are resolved
    here, once. Returns the frozen :class:`Method`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_method: name must be a non-empty str, got {name!r}")
    _choice("placement", placement, get_args(Placement))
    _choice("counts", counts, get_args(Counts))
    cls = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"register_method: scorer must be a registered name or a Scorer subclass, got {scorer!r}")
    red = get_reducer(reducer) if isinstance(reducer, str) else reducer
    if not isinstance(red, Reducer):
        raise TypeError(f"register_method: reducer must be a registered name or a Reducer, got {reducer!r}")
    if cls.needs_attention and placement != "after_attn":
        raise ValueError(
            f"register_method: scorer {cls.__name__} reads the block's attention, which exists only "
            f"after it has run; use placement='after_attn' (or a scorer that needs no attention)"
        )
    if cls.learned and red.masked is None:
        raise ValueError(
            f"register_method: reducer {red.name!r} has no fixed-length training form, which a "
            f"learned scorer needs; give its Reducer a `masked` form"
        )
    method = Method(name, cls, red, placement, counts)
    _METHODS[name] = method
    return method


def _get(table: dict, kind: str, name: object):
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{kind}: unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(table))}")
    return table[name]


def get_method(name: str) -> Method:
    return _get(_METHODS, "method", name)


def get_reducer(name: str) -> Reducer:
    return _get(_REDUCERS, "reducer", name)


def get_scorer(name: str) -> type[Scorer]:
    return _get(_SCORERS, "scorer", name)


def list_methods() -> list[str]:
    return sorted(_METHODS)


def list_reducers() -> list[str]:
    return sorted(_REDUCERS)


def list_scorers() -> list[str]:
    return sorted(_SCORERS)


def unregister_method(name: str) -> Method:
    return _METHODS.pop(get_method(name).name)


def unregister_reducer(name: str) -> Reducer:
    return _REDUCERS.pop(get_reducer(name).name)


def unregister_scorer(name: str) -> type[Scorer]:
    get_scorer(name)
    return _SCORERS.pop(name)


def _fuse(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    """EViT: append one token, the score-weighted sum of the pruned ones: (B, k + 1, C)."""
    extra = ops.fuse_one(pruned, pruned_scores.to(pruned.dtype))
    return torch.cat([kept, extra], dim=1)


def _squeeze(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    return ops.squeeze(kept, pruned)


def _squeeze_indexed(x: Tensor, num_prefix: int, kept_idx: Tensor, pruned_idx: Tensor, scores: Tensor) -> Tensor:
    return ops.squeeze_tokens(x, kept_idx, pruned_idx, num_prefix)


def _squeeze_hosts(kept: Tensor, pruned: Tensor) -> Tensor:
    return ops.squeeze_assign(kept, pruned).host


def _drop(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    return ops.drop(kept, pruned)


def _drop_masked(x: Tensor, keep: Tensor, pruned_now: Tensor) -> Tensor:
    return x


register_scorer("cls_attention", ClsAttentionScorer)
register_scorer("learned", LearnedScorer)
register_scorer("random", RandomScorer)
register_reducer(Reducer("squeeze", _squeeze, ops.squeeze_masked, _squeeze_indexed, 0, _squeeze_hosts))
register_reducer(Reducer("fuse", _fuse, extra_tokens=1))
register_reducer(Reducer("drop", _drop, _drop_masked))
register_method("etps", scorer="cls_attention", reducer="squeeze", placement="after_attn", counts="per_site")
register_method("evit", scorer="cls_attention", reducer="fuse", placement="after_attn", counts="per_site")
register_method("dtps", scorer="learned", reducer="squeeze", placement="before", counts="cumulative")
register_method("dynamicvit", scorer="learned", reducer="drop", placement="before", counts="cumulative")

# The paper's ablation variants (1:1 matching, average fusing, random division) register too.
from . import ablations  # noqa: E402, F401

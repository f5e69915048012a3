"""Token math as pure functions of tensors and static ints (see README-contract.md).

The public API is ``__all__``; the module layout behind it may change.
"""

from .grid import scatter_to_grid
from .attention import cls_attention, policy_attention, policy_softmax
from .reduce import drop, fuse_one
from .score_head import ScoreHead, gumbel_keep
from .select import gather_tokens, topk_split
from .squeeze import (
    SqueezeAssignment,
    squeeze,
    squeeze_assign,
    squeeze_masked,
    squeeze_op,
    squeeze_reference,
)

__all__ = [
    "ScoreHead",
    "SqueezeAssignment",
    "cls_attention",
    "drop",
    "fuse_one",
    "gather_tokens",
    "gumbel_keep",
    "policy_attention",
    "policy_softmax",
    "squeeze",
    "squeeze_assign",
    "squeeze_masked",
    "squeeze_op",
    "squeeze_reference",
    "scatter_to_grid",
    "topk_split",
]

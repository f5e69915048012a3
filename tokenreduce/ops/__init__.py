"""Token math as pure functions of tensors and static ints (see README-contract.md).

The public API is ``__all__``; the module layout behind it may change.
"""

import os

from ._kernels import enable_by_default, enable_triton_kernels, register_device_kernels, triton_kernels_enabled
from .attention import cls_attention, policy_attention, policy_softmax
from .grid import scatter_to_grid
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
    squeeze_tokens,
)

__all__ = [
    "ScoreHead",
    "SqueezeAssignment",
    "cls_attention",
    "drop",
    "enable_triton_kernels",
    "fuse_one",
    "gather_tokens",
    "gumbel_keep",
    "policy_attention",
    "policy_softmax",
    "register_device_kernels",
    "scatter_to_grid",
    "squeeze",
    "squeeze_assign",
    "squeeze_masked",
    "squeeze_op",
    "squeeze_reference",
    "squeeze_tokens",
    "topk_split",
    "triton_kernels_enabled",
]

# On CUDA with Triton installed, fused Triton kernels serve tokenreduce::squeeze, squeeze_tokens and
# split_order (the references keep serving other devices). TOKENREDUCE_TRITON=0 opts out;
# enable_triton_kernels switches them at run time.
_TRITON_DEFAULT = os.environ.get("TOKENREDUCE_TRITON", "1")
if _TRITON_DEFAULT not in ("0", "1"):
    raise ValueError(
        f"TOKENREDUCE_TRITON must be '0' (the reference kernels everywhere) or '1' (the Triton "
        f"kernels on CUDA, the default), got {_TRITON_DEFAULT!r}"
    )
if _TRITON_DEFAULT == "1":
    enable_by_default()

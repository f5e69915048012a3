"""Token math as pure functions of tensors and static ints (see README-contract.md).

The public API is ``__all__``; the module layout behind it may change.
"""

import os

from ._kernels import register_device_kernels
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
    squeeze_tokens,
    set_squeeze_impl,
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
    "register_device_kernels",
    "squeeze",
    "squeeze_assign",
    "squeeze_masked",
    "squeeze_op",
    "squeeze_reference",
    "squeeze_tokens",
    "scatter_to_grid",
    "set_squeeze_impl",
    "topk_split",
]

# On CUDA with Triton installed, fused Triton kernels serve tokenreduce::squeeze, squeeze_tokens and
# split_order (the references keep serving other devices). TOKENREDUCE_TRITON=0 opts out.
if os.environ.get("TOKENREDUCE_TRITON", "1") != "0":
    from . import select_triton, squeeze_triton

    squeeze_triton.register_cuda_kernel()
    select_triton.register_cuda_kernel()

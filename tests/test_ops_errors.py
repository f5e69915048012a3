"""Argument errors: each names the op, the argument and the rule (ops/_validate.py).

One row per rule: (function, arguments, exception type, the exact message).
"""

import re

import pytest
import torch

from tokenreduce.ops import (
    ScoreHead,
    cls_attention,
    drop,
    fuse_one,
    gather_tokens,
    gumbel_keep,
    policy_attention,
    policy_softmax,
    squeeze,
    squeeze_assign,
    squeeze_masked,
    topk_split,
)
from tokenreduce.ops.squeeze import squeeze_tokens


def T(*shape, dtype=torch.float32):
    """A valid float tensor of that shape (values do not matter for argument checks)."""
    return torch.zeros(*shape, dtype=dtype)


I64 = torch.int64


def pair_cases(fn, name):
    """The (reserved, pruned) rules shared by squeeze, squeeze_assign and drop."""
    rows = [
        ((T(2, 4, 3), T(2, 3)), ValueError, "`pruned` must have 3 dims (B, Np, C), got shape (2, 3)", "pruned-rank"),
        (
            (T(4, 3, 2, 1), T(2, 3, 3)),
            ValueError,
            "`reserved` must have 3 dims (B, Nr, C), got shape (4, 3, 2, 1)",
            "reserved-rank",
        ),
        (([[1.0]], T(2, 3, 3)), TypeError, "`reserved` must be a torch.Tensor (B, Nr, C), got list", "not-a-tensor"),
        (
            (T(2, 4, 3), T(2, 3, 3, dtype=I64)),
            TypeError,
            "`pruned` must be a floating-point tensor, got dtype torch.int64",
            "int-dtype",
        ),
        (
            (T(2, 4, 3), T(2, 3, 3, dtype=torch.float64)),
            TypeError,
            "`reserved` and `pruned` must have the same dtype, got torch.float32 and torch.float64",
            "dtype-mismatch",
        ),
        (
            (T(2, 4, 3), T(3, 3, 3)),
            ValueError,
            "`reserved` and `pruned` must have the same batch size, got 2 and 3",
            "batch",
        ),
        (
            (T(2, 4, 3), T(2, 3, 5)),
            ValueError,
            "`reserved` and `pruned` must have the same channels, got 3 and 5",
            "channels",
        ),
        (
            (T(2, 0, 3), T(2, 3, 3)),
            ValueError,
            "`reserved` must hold at least one token (Nr >= 1), got shape (2, 0, 3)",
            "no-host",
        ),
    ]
    return [pytest.param(fn, args, exc, f"{name}: {msg}", id=f"{name}-{i}") for args, exc, msg, i in rows]


M = torch.ones(2, 5, 1)
Q = T(2, 3, 6, 4)
CASES = [
    *pair_cases(squeeze, "squeeze"),
    *pair_cases(squeeze_assign, "squeeze_assign"),
    *pair_cases(drop, "drop"),
    pytest.param(
        squeeze_masked,
        (T(2, 5, 4), torch.ones(2, 5), M),
        ValueError,
        "squeeze_masked: `keep` must have 3 dims (B, n, 1), got shape (2, 5)",
        id="masked-keep-rank",
    ),
    pytest.param(
        squeeze_masked,
        (T(2, 5, 4), M, torch.ones(2, 4, 1)),
        ValueError,
        "squeeze_masked: `pruned_now` must have shape (B, n, 1) = (2, 5, 1), got (2, 4, 1)",
        id="masked-pruned-now-shape",
    ),
    pytest.param(
        squeeze_masked,
        (T(2, 5, 4), torch.ones(2, 5, 2), M),
        ValueError,
        "squeeze_masked: `keep` must have shape (B, n, 1) = (2, 5, 1), got (2, 5, 2)",
        id="masked-keep-shape",
    ),
    pytest.param(
        squeeze_masked,
        (T(2, 5, 4), M.bool(), M),
        TypeError,
        "squeeze_masked: `keep` must be a floating-point tensor, got dtype torch.bool",
        id="masked-bool-mask",
    ),
    pytest.param(
        squeeze_masked,
        (T(2, 5, 4, dtype=torch.int32), M, M),
        TypeError,
        "squeeze_masked: `x` must be a floating-point tensor, got dtype torch.int32",
        id="masked-int-x",
    ),
    pytest.param(
        topk_split,
        (T(2, 5), 0),
        ValueError,
        "topk_split: `k` must satisfy 1 <= k <= n = 5 (scores of shape (2, 5)), got k = 0",
        id="topk-k-zero",
    ),
    pytest.param(
        topk_split,
        (T(2, 5), 6),
        ValueError,
        "topk_split: `k` must satisfy 1 <= k <= n = 5 (scores of shape (2, 5)), got k = 6",
        id="topk-k-too-big",
    ),
    pytest.param(topk_split, (T(2, 5), 2.0), TypeError, "topk_split: `k` must be an int, got float", id="topk-k-float"),
    pytest.param(
        topk_split,
        (T(5), 2),
        ValueError,
        "topk_split: `scores` must have 2 dims (B, n), got shape (5,)",
        id="topk-rank",
    ),
    pytest.param(
        topk_split,
        (T(2, 5, dtype=I64), 2),
        TypeError,
        "topk_split: `scores` must be a floating-point tensor, got dtype torch.int64",
        id="topk-int-scores",
    ),
    pytest.param(
        squeeze_tokens,
        (T(2, 5, 3), T(2, 3, dtype=I64), T(2, 1), 1),
        TypeError,
        "squeeze_tokens: `pruned_idx` must be an int64 index tensor, got dtype torch.float32",
        id="squeeze-tokens-idx-dtype",
    ),
    pytest.param(
        squeeze_tokens,
        (T(2, 5, 3), T(1, 3, dtype=I64), T(2, 1, dtype=I64), 1),
        ValueError,
        "squeeze_tokens: `x` and `kept_idx` must have the same batch size, got 2 and 1",
        id="squeeze-tokens-batch",
    ),
    pytest.param(
        squeeze_tokens,
        (T(2, 5, 3), T(2, 3, dtype=I64), T(2, 1, dtype=I64), 6),
        ValueError,
        "squeeze_tokens: `num_prefix` must be an int in [0, 5] (x of shape (2, 5, 3)), got 6",
        id="squeeze-tokens-prefix",
    ),
    pytest.param(
        gather_tokens,
        (T(2, 5, 3), T(2, 3)),
        TypeError,
        "gather_tokens: `idx` must be an int64 index tensor, got dtype torch.float32",
        id="gather-float-idx",
    ),
    pytest.param(
        gather_tokens,
        (T(2, 5, 3), T(2, 3, 1, dtype=I64)),
        ValueError,
        "gather_tokens: `idx` must have 2 dims (B, m), got shape (2, 3, 1)",
        id="gather-idx-rank",
    ),
    pytest.param(
        gather_tokens,
        (T(2, 5, 3), T(1, 3, dtype=I64)),
        ValueError,
        "gather_tokens: `x` and `idx` must have the same batch size, got 2 and 1",
        id="gather-batch",
    ),
    pytest.param(
        fuse_one,
        (T(2, 4, 3), T(2, 3)),
        ValueError,
        "fuse_one: `pruned` and `weights` must have the same number of tokens, got 4 and 3",
        id="fuse-count",
    ),
    pytest.param(
        fuse_one,
        (T(2, 4, 3), T(2, 4, 1)),
        ValueError,
        "fuse_one: `weights` must have 2 dims (B, Np), got shape (2, 4, 1)",
        id="fuse-weights-rank",
    ),
    pytest.param(
        fuse_one,
        (T(2, 4, 3), T(2, 4, dtype=I64)),
        TypeError,
        "fuse_one: `weights` must be a floating-point tensor, got dtype torch.int64",
        id="fuse-int-weights",
    ),
    pytest.param(
        cls_attention,
        (Q, Q, 0.5, 6),
        ValueError,
        "cls_attention: `num_prefix` must satisfy 0 <= num_prefix < N = 6 (at least one patch token), got 6",
        id="cls-prefix-too-big",
    ),
    pytest.param(
        cls_attention,
        (Q, Q, 0.5, -1),
        ValueError,
        "cls_attention: `num_prefix` must satisfy 0 <= num_prefix < N = 6 (at least one patch token), got -1",
        id="cls-prefix-negative",
    ),
    pytest.param(
        cls_attention,
        (Q, Q, 0.5, 1.0),
        TypeError,
        "cls_attention: `num_prefix` must be an int, got float",
        id="cls-prefix-float",
    ),
    pytest.param(
        cls_attention,
        (T(2, 6, 4), Q, 0.5, 1),
        ValueError,
        "cls_attention: `q` must have 4 dims (B, H, N, d), got shape (2, 6, 4)",
        id="cls-q-rank",
    ),
    pytest.param(
        cls_attention,
        (Q, T(2, 3, 5, 4), 0.5, 1),
        ValueError,
        "cls_attention: `k` must have shape (B, H, N, d) equal to `q`'s = (2, 3, 6, 4), got (2, 3, 5, 4)",
        id="cls-k-shape",
    ),
    pytest.param(
        policy_softmax,
        (T(2, 3, 6, 6), torch.ones(2, 5)),
        ValueError,
        "policy_softmax: `policy` must have shape (B, N) = (2, 6), got (2, 5)",
        id="policy-shape",
    ),
    pytest.param(
        policy_softmax,
        (T(2, 3, 6, 5), torch.ones(2, 6)),
        ValueError,
        "policy_softmax: `scores` must have at most as many queries as keys (B, H, Nq, N) with Nq <= N, "
        "got shape (2, 3, 6, 5)",
        id="policy-more-queries-than-keys",
    ),
    pytest.param(
        policy_softmax,
        (T(2, 3, 6, 6), torch.ones(2, 6, dtype=torch.bool)),
        TypeError,
        "policy_softmax: `policy` must be a floating-point tensor, got dtype torch.bool",
        id="policy-bool",
    ),
    pytest.param(
        policy_attention,
        (Q, Q, T(2, 3, 5, 4), torch.ones(2, 6), 0.5),
        ValueError,
        "policy_attention: `v` must have shape (B, H, N, d_v) matching `k` = (2, 3, 6, 4), got (2, 3, 5, 4)",
        id="policy-attention-v",
    ),
    pytest.param(
        ScoreHead,
        (7,),
        ValueError,
        "ScoreHead: `dim` must be an even int >= 4 (it is split into halves and quarters), got 7",
        id="head-odd-dim",
    ),
    pytest.param(
        ScoreHead,
        (2,),
        ValueError,
        "ScoreHead: `dim` must be an even int >= 4 (it is split into halves and quarters), got 2",
        id="head-small-dim",
    ),
    pytest.param(
        ScoreHead(8),
        (T(2, 5, 6),),
        ValueError,
        "ScoreHead: `x` must have 8 channels (the head's dim), got shape (2, 5, 6)",
        id="head-channels",
    ),
    pytest.param(
        ScoreHead(8),
        (T(2, 5, 8), torch.ones(2, 4, 1)),
        ValueError,
        "ScoreHead: `prev_keep` must have shape (B, n, 1) = (2, 5, 1), got (2, 4, 1)",
        id="head-prev-keep",
    ),
    pytest.param(
        gumbel_keep,
        (T(2, 5, 3),),
        ValueError,
        "gumbel_keep: `log_probs` must have 2 channels (keep, drop) (B, n, 2), got shape (2, 5, 3)",
        id="gumbel-channels",
    ),
]


@pytest.mark.parametrize("fn, args, exc, message", CASES)
def test_error_message(fn, args, exc, message):
    with pytest.raises(exc, match=f"^{re.escape(message)}"):
        fn(*args)

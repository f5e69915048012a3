"""Export forms of tokenreduce's custom operators: the same math in plain aten ops.

``torch.export`` and both ONNX exporters would otherwise meet ``torch.ops.tokenreduce.*`` calls,
which have no ONNX translation and would tie a saved program to this package. While
:func:`export_forms` is active, every call of one of these operators runs its export form
instead, so the traced graph holds only standard operators:

    squeeze(reserved (B, Nr, C), pruned (B, Np, C)) -> (B, Nr, C)
    squeeze_tokens(x (B, P + n, C), kept_idx (B, k), pruned_idx (B, n - k), P) -> (B, P + k, C)
    split_order(scores (B, n), k) -> (B, n) int64

The squeeze forms build the N:1 assignment as a dense (B, Np, Nr) one-hot matrix and sum with a
matmul, instead of the reference's ``index_add``: ONNX scatter with repeated indices is not
additive in the TorchScript exporter, and a matmul exports everywhere. The host choice and its
weight come from the reference's own matching, so both forms pick the same hosts. The split's
counts are ``cumsum`` over each row, so nothing in the graph specialises on the batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .errors import TokenReduceError
from .ops.select import gather_tokens
from .ops.squeeze import SELF_WEIGHT, _match, compute_dtype

__all__ = ["EXPORT_FORMS", "export_forms", "split_order_export", "squeeze_export", "squeeze_tokens_export"]


def squeeze_export(reserved: Tensor, pruned: Tensor) -> Tensor:
    """``tokenreduce::squeeze`` in exportable ops: (B, Nr, C), (B, Np, C) -> (B, Nr, C).

    ``y_j = (e * xr_j + sum_{i: h(i)=j} exp(c_ij) * xp_i) / (e + sum_{i: h(i)=j} exp(c_ij))``;
    a reserved token hosting nothing is returned unchanged, as in the reference.
    """
    out_dtype = reserved.dtype
    work = compute_dtype(out_dtype)
    xr, xp = reserved.to(work), pruned.to(work)
    host, weight = _match(xr, xp)  # (B, Np), (B, Np, 1)
    slots = torch.arange(xr.shape[1], device=xr.device)  # (Nr,)
    onehot = (host.unsqueeze(-1) == slots).to(work)  # (B, Np, Nr): 1 where pruned i joins host j
    assign = onehot * weight  # (B, Np, Nr), exp(c_ij) on the chosen host
    num = SELF_WEIGHT * xr + assign.transpose(1, 2) @ xp  # (B, Nr, C)
    den = SELF_WEIGHT + assign.sum(dim=1).unsqueeze(-1)  # (B, Nr, 1)
    hosts_any = onehot.sum(dim=1).unsqueeze(-1) > 0  # (B, Nr, 1)
    return torch.where(hosts_any, num / den, xr).to(out_dtype)


def squeeze_tokens_export(x: Tensor, kept_idx: Tensor, pruned_idx: Tensor, num_prefix: int) -> Tensor:
    """``tokenreduce::squeeze_tokens`` in exportable ops: (B, P + n, C) -> (B, P + k, C)."""
    patches = x[:, num_prefix:]
    reserved = squeeze_export(gather_tokens(patches, kept_idx), gather_tokens(patches, pruned_idx))
    return torch.cat([x[:, :num_prefix], reserved], dim=1)


def split_order_export(scores: Tensor, k: int) -> Tensor:
    """``tokenreduce::split_order`` in exportable ops: (B, n) float, k -> (B, n) int64.

    The ``k`` highest-scoring indices ascending, then the others ascending; equal scores by index
    (lower first), NaN below every number. The k-th largest score is a threshold; the places left
    for tokens equal to it go to the lowest indices (real ones before NaN ones). Every count is an
    int64 ``cumsum`` over the batch rows, so no shape depends on the batch size.
    """
    n = scores.shape[1]
    nan = scores.isnan()
    ranked = scores.masked_fill(nan, float("-inf"))  # (B, n)
    kth = ranked.topk(k, dim=1).values.amin(dim=1, keepdim=True)  # (B, 1)
    above = ranked > kth
    tied = ranked == kth  # holds the NaN tokens too when kth is -inf
    room = k - above.sum(dim=1, keepdim=True)  # (B, 1): places left for tied tokens
    real = (tied & ~nan).long().cumsum(dim=1)  # (B, n): real tied tokens at or before i
    nans = (tied & nan).long().cumsum(dim=1)
    place = torch.where(nan, real[:, -1:] + nans, real)  # rank among the tied tokens
    keep = above | (tied & (place <= room))  # (B, n), exactly k per row
    rank = keep.long().cumsum(dim=1)  # kept tokens at or before i
    i = torch.arange(n, device=scores.device)
    slot = torch.where(keep, rank - 1, k + i - rank)  # a permutation of 0..n-1 per row
    return torch.zeros_like(slot).scatter(1, slot, i.expand_as(slot))


# operator name -> export form
EXPORT_FORMS: dict[str, Callable[..., Tensor]] = {
    "squeeze": squeeze_export,
    "squeeze_tokens": squeeze_tokens_export,
    "split_order": split_order_export,
}


def _tokenreduce_op_name(func) -> str | None:
    """``"squeeze"`` for ``torch.ops.tokenreduce.squeeze`` or its ``.default``, else None."""
    if not isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return None
    namespace, name, *_ = str(func).split(".")  # "tokenreduce.squeeze" or "tokenreduce.squeeze.default"
    return name if namespace == "tokenreduce" else None


class _ExportForms(TorchFunctionMode):
    """Runs every ``torch.ops.tokenreduce`` call as its export form."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _tokenreduce_op_name(func)
        if name is None:
            return func(*args, **kwargs)
        form = EXPORT_FORMS.get(name)
        if form is None:
            raise TokenReduceError(
                f"export: operator tokenreduce::{name} has no export form; add a plain-aten function "
                f"for it to EXPORT_FORMS in tokenreduce/_export_ops.py"
            )
        return form(*args, **kwargs)


@contextlib.contextmanager
def export_forms() -> Iterator[None]:
    """Within this context ``torch.ops.tokenreduce.*`` calls run their plain-aten export forms."""
    with _ExportForms():
        yield

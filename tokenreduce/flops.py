"""FLOP counting that counts attention on every device, reported as multiply-adds (GFLOPs).

``torch.utils.flop_counter`` has no formula for the CPU flash-attention kernel before torch 2.6
(dense DeiT-S then reads 4.24 G instead of 4.60 G); we register one where it is missing, and one
for ``tokenreduce::squeeze`` and ``tokenreduce::squeeze_tokens`` (custom ops are opaque to the
counter: their kernels' own ops are not seen).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = ["gflops"]


def _sdpa_flops(query_shape, key_shape, value_shape) -> int:
    # (B, H, Nq, d) @ (B, H, d, Nk) and (B, H, Nq, Nk) @ (B, H, Nk, dv); 2 FLOPs per multiply-add
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * (d + dv)


def _register_missing() -> None:
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_registry:

        @register_flop_formula(cpu_sdpa)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return _sdpa_flops(query_shape, key_shape, value_shape)

    ops = getattr(torch.ops, "tokenreduce", None)
    squeeze = getattr(ops, "squeeze", None)
    if squeeze is not None and squeeze not in flop_registry:

        @register_flop_formula(squeeze)
        def _squeeze(reserved_shape, pruned_shape, *args, out_shape=None, **kwargs) -> int:
            b, nr, c = reserved_shape
            return _merge_flops(b, nr, pruned_shape[1], c)

    squeeze_tokens = getattr(ops, "squeeze_tokens", None)
    if squeeze_tokens is not None and squeeze_tokens not in flop_registry:

        @register_flop_formula(squeeze_tokens)
        def _squeeze_tokens(x_shape, kept_shape, pruned_shape, *args, out_shape=None, **kwargs) -> int:
            b, _, c = x_shape
            return _merge_flops(b, kept_shape[1], pruned_shape[1], c)


def _merge_flops(b: int, nr: int, npr: int, c: int) -> int:
    """The squeeze of ``npr`` pruned into ``nr`` reserved tokens of ``c`` channels, ``b`` images."""
    return 2 * b * npr * nr * c + 2 * b * npr * c  # similarity + weighted accumulation


def gflops(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-adds (in G) of one forward of ``model`` in eval mode on ``example[:1]``."""
    _register_missing()
    was_training = model.training
    # torch's counter asserts on views of parameters that require grad taken under no_grad
    # (CaiT's, PiT's and SigLIP's heads slice them); the count needs no gradients at all.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example[:1])
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)
    return counter.get_total_flops() / 2e9

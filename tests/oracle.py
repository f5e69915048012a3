"""Plain float64 reference for the TPS squeeze (tps-reference.md, Sec. 1). Tests only.

Written for one image, as literally as the formula reads (Python loops over tokens, no matrix
tricks), then batched with ``torch.func.vmap``. It shares no code with ``tokenreduce.ops``.
The host choice is a running argmax with a strict ``>``, so ties go to the lowest index.
"""

import math

import torch
from torch import Tensor

EPS = 1e-6


def _cosine_one(reserved: Tensor, pruned: Tensor) -> Tensor:
    """(Nr, C), (Np, C) -> (Np, Nr): c[i, j] = <xp_i, xr_j> / ((|xp_i| + eps) (|xr_j| + eps))."""
    rows = []
    for i in range(pruned.shape[0]):
        row = []
        for j in range(reserved.shape[0]):
            dot = (pruned[i] * reserved[j]).sum()
            row.append(dot / ((pruned[i].norm() + EPS) * (reserved[j].norm() + EPS)))
        rows.append(torch.stack(row))
    if not rows:
        return reserved.new_zeros(0, reserved.shape[0])
    return torch.stack(rows)


def _host_one(cos: Tensor) -> Tensor:
    """(Np, Nr) -> (Np,) int64: lowest index among the maxima of each row."""
    hosts = []
    for i in range(cos.shape[0]):
        best, host = cos[i, 0], torch.zeros((), dtype=torch.int64)
        for j in range(1, cos.shape[1]):
            better = cos[i, j] > best
            best = torch.where(better, cos[i, j], best)
            host = torch.where(better, torch.tensor(j), host)
        hosts.append(host)
    if not hosts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(hosts)


def _squeeze_one(reserved: Tensor, pruned: Tensor) -> Tensor:
    """(Nr, C), (Np, C) -> (Nr, C) for one image, in float64."""
    reserved, pruned = reserved.double(), pruned.double()
    cos = _cosine_one(reserved, pruned)
    host = _host_one(cos)
    out = []
    for j in range(reserved.shape[0]):
        num = math.e * reserved[j]
        den = torch.tensor(math.e, dtype=torch.float64)
        hosts_something = torch.tensor(False)
        for i in range(pruned.shape[0]):
            m = host[i] == j  # M[i, j]
            w = torch.where(m, cos[i, j].exp(), torch.zeros((), dtype=torch.float64))
            num = num + w * pruned[i]
            den = den + w
            hosts_something = hosts_something | m
        out.append(torch.where(hosts_something, num / den, reserved[j]))
    return torch.stack(out)


def _cosine_one_double(reserved: Tensor, pruned: Tensor) -> Tensor:
    return _cosine_one(reserved.double(), pruned.double())


# Batched versions: (B, Nr, C), (B, Np, C) -> (B, Nr, C) / (B, Np, Nr) / (B, Np).
oracle_squeeze = torch.func.vmap(_squeeze_one)
oracle_cosine = torch.func.vmap(_cosine_one_double)
oracle_host = torch.func.vmap(lambda r, p: _host_one(_cosine_one_double(r, p)))


def top2_gap(cos: Tensor) -> Tensor:
    """(B, Np, Nr) -> (B, Np): best minus second-best similarity (inf with a single host)."""
    if cos.shape[-1] < 2:
        return torch.full(cos.shape[:-1], math.inf, dtype=cos.dtype)
    top = cos.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]

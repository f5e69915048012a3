"""Look inside the composite modules that tracing kept opaque (leaves timm marks as not
traceable, such as Twins' ``LocallyGroupedAttn`` and MobileViT's ``MobileVitBlock``), so that a
refusal can name the attention they hold.

Only run when analysis found no attention in the graph: the captured graph is run once on a
random input of the example shape, and inside each composite leaf a ``TorchFunctionMode`` records
every attention call (``scaled_dot_product_attention``, or ``softmax(dim=-1)`` of a square-ish
score tensor) with its shapes. It also follows the leaf's input positions through the layout ops
(reshape, view, permute, transpose, flatten, contiguous; shape-keeping ops and per-position
projections carry them), so the first attention's tokens can be placed on the input grid: a
compact window, or one pixel of every patch (an unfolded patch layout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Inside", "probe_leaves"]

log = logging.getLogger(__name__)

_SDPA = {F.scaled_dot_product_attention, getattr(torch._C._nn, "scaled_dot_product_attention", None)}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_T = torch.Tensor
_LAYOUT = {
    _T.reshape, _T.view, _T.permute, _T.transpose, _T.flatten, _T.unflatten, _T.contiguous, _T.unsqueeze,
    _T.squeeze, torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unsqueeze, torch.squeeze,
}  # fmt: skip


@dataclass(frozen=True)
class Inside:
    """One attention call inside the opaque module ``path``: ``lead`` the dims before the
    (queries, keys) of its logits ((B', heads) or (B, windows, heads)), ``queries``, ``keys``;
    ``grid`` the (H, W) of the module's (B, C, H, W) input (None for another input) and
    ``positions`` the flat grid positions of the tokens of the first sequence (None when the
    layout could not be followed)."""

    path: str
    lead: tuple[int, ...]
    queries: int
    keys: int
    grid: tuple[int, int] | None
    positions: tuple[int, ...] | None


class _Record(TorchFunctionMode):
    def __init__(self, path: str, x: torch.Tensor):
        super().__init__()
        self.path, self.found = path, []
        self.grid = tuple(x.shape[2:]) if x.dim() == 4 else None
        pos = torch.arange(x[0].numel() // x.shape[1] if x.dim() == 4 else x.shape[1])
        pos = pos.view(1, 1, *x.shape[2:]) if x.dim() == 4 else pos.view(1, -1, 1)
        self.pos = {id(x): (x, pos.expand(x.shape))}  # id -> (tensor kept alive, positions)
        self.seqs: list[torch.Tensor] = []  # position tensors of 3-D (B', N, C) tokens, in order

    def _carry(self, func, args, kwargs, out) -> torch.Tensor | None:
        src = next((a for a in args if isinstance(a, torch.Tensor) and id(a) in self.pos), None)
        if src is None or not isinstance(out, torch.Tensor):
            return None
        pos = self.pos[id(src)][1]
        if func in _LAYOUT:
            return func(pos, *args[1:], **kwargs)
        if out.shape == src.shape:
            return pos
        if out.dim() == src.dim() and out.shape[:-1] == src.shape[:-1]:  # a projection of each position
            return pos[..., :1].expand(out.shape)
        if out.dim() == 4 == src.dim() and out.shape[0] == src.shape[0] and out.shape[2:] == src.shape[2:]:
            return pos[:, :1].expand(out.shape)  # a 1x1 / same-size conv on the map
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SDPA:
            q, k = args[0], args[1]
            self.found.append((tuple(q.shape[:-2]), q.shape[-2], k.shape[-2]))
        elif (
            func in _SOFTMAX
            and out.dim() >= 3
            and kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, out.dim() - 1)
        ):
            self.found.append((tuple(out.shape[:-2]), out.shape[-2], out.shape[-1]))
        pos = self._carry(func, args, kwargs, out)
        if pos is not None:
            self.pos[id(out)] = (out, pos)
            if out.dim() == 3 and not self.found:
                self.seqs.append(pos)
        return out

    def inside(self) -> list[Inside]:
        rows = []
        for lead, nq, nk in self.found:
            seq = next((p for p in reversed(self.seqs) if p.shape[:2] == (lead[0], nq)), None) if lead else None
            positions = tuple(int(i) for i in seq[0, :, 0]) if seq is not None else None
            rows.append(Inside(self.path, lead, nq, nk, self.grid, positions))
        return rows


def _composite_leaves(gm: fx.GraphModule) -> set[str]:
    return {
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and any(True for _ in gm.get_submodule(str(n.target)).children())
    }


class _Runner(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, leaves: set[str]):
        super().__init__(gm)
        self.leaves, self.rows = leaves, []

    def call_module(self, target, args, kwargs):
        x = args[0] if args else None
        if target not in self.leaves or not isinstance(x, torch.Tensor) or x.dim() < 3:
            return super().call_module(target, args, kwargs)
        mode = _Record(str(target), x)
        with mode:
            out = super().call_module(target, args, kwargs)
        self.rows.extend(mode.inside())
        return out


def probe_leaves(gm: fx.GraphModule, example_shape: tuple[int, ...]) -> list[Inside]:
    """The attention calls inside ``gm``'s composite leaf modules, in execution order (empty when
    there are none, or when running the graph fails: this only serves a refusal message)."""
    leaves = _composite_leaves(gm)
    if not leaves:
        return []
    param = next(gm.parameters(), None)
    x = torch.randn(example_shape, device=param.device if param is not None else "cpu")
    runner = _Runner(gm, leaves)
    try:
        with torch.no_grad():
            runner.run(x.to(param.dtype) if param is not None and param.is_floating_point() else x)
    except Exception as exc:  # noqa: BLE001 - a failed probe only makes the refusal less specific
        log.debug("probing the opaque modules of %s failed: %s", type(gm).__name__, exc)
    return runner.rows

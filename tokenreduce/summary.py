"""``summary``: tokens per block and the cost of a reduced model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .anchors import marks
from .flops import gflops
from .plan import Plan
from .reduced import ReducedModel

__all__ = ["Summary", "summary"]


@dataclass(frozen=True)
class Summary:
    """Tokens per block and the cost of a reduced model, for one image of the example size."""

    rows: tuple[tuple[int, str, int, int], ...]  # (block, path, attention tokens, mlp tokens)
    gflops_dense: float
    gflops_reduced: float
    params_dense: int
    params_reduced: int
    plan: Plan

    def __str__(self) -> str:
        width = max(len("path"), *(len(path) for _, path, _, _ in self.rows))
        lines = [self.plan.table(), "", f"{'block':<5}  {'path':<{width}}  attn tokens  mlp tokens"]
        for i, path, na, nm in self.rows:
            lines.append(f"{i:<5}  {path:<{width}}  {na:>11}  {nm:>10}")
        lines += [
            "",
            f"GFLOPs (multiply-adds, 1 image): dense {self.gflops_dense:.3f}  reduced {self.gflops_reduced:.3f}"
            f"  ({self.gflops_reduced / self.gflops_dense:.1%})",
            f"params: dense {self.params_dense / 1e6:.2f} M  reduced {self.params_reduced / 1e6:.2f} M",
        ]
        return "\n".join(lines)

    __repr__ = __str__


class _ShapeProbe(fx.Interpreter):
    """Runs the graph and records the shape at the marked query and attention-residual nodes,
    leaving the graph's own metadata alone."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[tuple[str, int], tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for role, index in marks(n):
            if role in ("q", "attn_residual") and isinstance(out, torch.Tensor):
                self.shapes[(role, index)] = tuple(out.shape)
        return out


def _dense_gflops(reduced: ReducedModel, example: torch.Tensor) -> float:
    """The dense model's GFLOPs at ``example``'s size: every site at keep 1 is the identity."""
    sites = list(reduced.reduce_sites)
    ratios = [s.ratio for s in sites]
    try:
        for s in sites:
            s.ratio = 1.0
        return gflops(reduced, example)
    finally:
        for s, r in zip(sites, ratios):
            s.ratio = r


def summary(reduced: ReducedModel, example_input: torch.Tensor | None = None) -> Summary:
    """Tokens entering every block's attention and MLP, GFLOPs before/after, parameter counts.

    ``example_input``: a batch of the size to count (default: the size ``apply`` traced with);
    only its first image is run. The reduced model's graph and metadata are left as they are.
    """
    if not isinstance(reduced, ReducedModel):
        raise TypeError(f"summary: expected a module returned by tokenreduce.apply, got {type(reduced).__name__}")
    info = reduced.reduction
    param = next(reduced.parameters(), None)
    if example_input is None:
        example = torch.randn(
            1,
            *info.example_shape[1:],
            device=param.device if param is not None else "cpu",
            dtype=param.dtype if param is not None else torch.float32,
        )
    elif not isinstance(example_input, torch.Tensor) or example_input.dim() != len(info.example_shape):
        raise TypeError(
            f"summary: example_input must be a tensor batch of rank {len(info.example_shape)} "
            f"like {info.example_shape}, got {getattr(example_input, 'shape', type(example_input))}"
        )
    else:
        example = example_input
    was_training = reduced.training
    reduced.eval()
    try:
        probe = _ShapeProbe(reduced)
        with torch.no_grad():
            probe.run(example[:1])
    finally:
        reduced.train(was_training)
    attn_tokens = {i: s[-2] for (role, i), s in probe.shapes.items() if role == "q"}
    mlp_tokens = {i: s[1] for (role, i), s in probe.shapes.items() if role == "attn_residual"}
    # an after-attention site changes the stream right after the attention residual
    for site in info.plan.sites:
        if site.placement == "after_attn":
            mlp_tokens[site.block] = site.num_prefix + site.n_out
    rows = tuple((b.index, b.path, attn_tokens[b.index], mlp_tokens[b.index]) for b in info.model_map.blocks)
    same_size = tuple(example.shape[1:]) == tuple(info.example_shape[1:])
    return Summary(
        rows=rows,
        gflops_dense=info.gflops_dense if same_size else _dense_gflops(reduced, example),
        gflops_reduced=gflops(reduced, example),
        params_dense=info.params_dense,
        params_reduced=sum(p.numel() for p in reduced.parameters()),
        plan=info.plan,
    )

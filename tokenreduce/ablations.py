"""The TPS paper's ablation variants as registered methods (importing this module registers them).

| method            | scorer                | reducer     | placement    | counts     | reproduces             |
|-------------------|-----------------------|-------------|--------------|------------|------------------------|
| ``etps_match1to1`` | class-token attention | 1:1 match   | after attn   | per site   | supplement Table 1a    |
| ``dtps_match1to1`` | learned score head    | 1:1 match   | before block | cumulative | supplement Table 1a    |
| ``etps_avgfuse``  | class-token attention | average fuse | after attn  | per site   | supplement Table 1b    |
| ``dtps_avgfuse``  | learned score head    | average fuse | before block | cumulative | supplement Table 1b   |
| ``etps_random``   | uniform random        | squeeze     | after attn   | per site   | main paper Sec. 4.3    |
| ``dtps_random``   | uniform random        | squeeze     | before block | cumulative | main paper Sec. 4.3    |

Reducers (``tokenreduce.get_reducer``): ``match1to1`` (each reserved token fuses its nearest
pruned token, :func:`tokenreduce.ops.ablations.match_one_to_one`) and ``avgfuse`` (the squeeze's
N:1 matching with equal weights, :func:`tokenreduce.ops.ablations.average_fuse`); both have the
fixed-length training form a learned scorer needs. The random division keeps the squeeze and
draws the reserved/pruned split uniformly at random (the robustness test of the main paper); its
scorer has no parameters, so in training it reduces for real, as eTPS does. See docs/ablations.md.
"""

from __future__ import annotations

from torch import Tensor

from .methods import Reducer, register_method, register_reducer
from .ops import ablations as ab

__all__ = ["ABLATION_METHODS", "AVERAGE_FUSE", "MATCH_ONE_TO_ONE"]


def _match_plain(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    return ab.match_one_to_one(kept, pruned)


def _avg_plain(kept: Tensor, pruned: Tensor, pruned_scores: Tensor) -> Tensor:
    return ab.average_fuse(kept, pruned)


MATCH_ONE_TO_ONE = register_reducer(
    Reducer("match1to1", _match_plain, masked=ab.match_one_to_one_masked, assign=ab.match_one_to_one_assign)
)
AVERAGE_FUSE = register_reducer(
    Reducer("avgfuse", _avg_plain, masked=ab.average_fuse_masked, assign=ab.average_fuse_assign)
)

_ETPS = dict(scorer="cls_attention", placement="after_attn", counts="per_site")
_DTPS = dict(scorer="learned", placement="before", counts="cumulative")

ABLATION_METHODS = {
    m.name: m
    for m in (
        register_method("etps_match1to1", reducer=MATCH_ONE_TO_ONE, **_ETPS),
        register_method("dtps_match1to1", reducer=MATCH_ONE_TO_ONE, **_DTPS),
        register_method("etps_avgfuse", reducer=AVERAGE_FUSE, **_ETPS),
        register_method("dtps_avgfuse", reducer=AVERAGE_FUSE, **_DTPS),
        register_method("etps_random", scorer="random", reducer="squeeze", placement="after_attn", counts="per_site"),
        register_method("dtps_random", scorer="random", reducer="squeeze", placement="before", counts="cumulative"),
    )
}

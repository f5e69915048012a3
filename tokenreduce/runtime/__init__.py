"""What a reduced graph runs: the reduction site, the token state between sites, policy-masked
attention, the grid scatter/gather of spatial stages and the aux outputs.

Generated code calls these by their qualified names (``tokenreduce.runtime.attention.attend``);
:mod:`tokenreduce.passes` only rewrites graphs to call them.
"""

from .attention import attend, masked_probs
from .grid import from_grid_tokens, to_grid_tokens
from .outputs import Aux, final_keep, hosts_of, make_aux
from .site import ReductionSite
from .state import AttnInputs, TokenState, keep_mask

__all__ = [
    "Aux",
    "AttnInputs",
    "ReductionSite",
    "TokenState",
    "attend",
    "final_keep",
    "from_grid_tokens",
    "hosts_of",
    "keep_mask",
    "make_aux",
    "masked_probs",
    "to_grid_tokens",
]

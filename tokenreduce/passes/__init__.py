"""Rewrite passes: each a ``GraphModule -> GraphModule`` function that lints and recompiles."""

from .aux_output import add_aux_output
from .insert_sites import insert_sites
from .positions import gather_positions
from .route_policy import route_policy
from .spatial import pad_spatial

__all__ = ["insert_sites", "gather_positions", "route_policy", "add_aux_output", "pad_spatial"]

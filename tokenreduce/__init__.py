"""tokenreduce: token reduction (TPS, EViT, DynamicViT) for vision transformers as a compiler pass.

    reduced = tokenreduce.apply(model, method="etps", locs=[3, 6, 9], keep_ratio=0.7)
"""

from .api import Reduction, Summary, apply, inspect, summary
from .capture import register_leaf_function, register_leaf_module
from .errors import TokenReduceError
from .methods import METHODS, Method, Scorer, register_method, register_reducer, register_scorer

__all__ = [
    "apply",
    "inspect",
    "summary",
    "Reduction",
    "Summary",
    "TokenReduceError",
    "register_leaf_module",
    "register_leaf_function",
    "register_method",
    "register_scorer",
    "register_reducer",
    "Method",
    "Scorer",
    "METHODS",
]

__version__ = "0.1.0"

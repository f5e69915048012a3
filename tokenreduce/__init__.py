"""tokenreduce: token reduction (TPS, EViT, DynamicViT) for vision transformers as a compiler pass.

    reduced = tokenreduce.apply(model, method="etps", locs=[3, 6, 9], keep_ratio=0.7)

Names load on first use (PEP 562), so ``import tokenreduce`` and the command line's ``--help``
do not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "apply": "api",
    "inspect": "api",
    "summary": "summary",
    "Summary": "summary",
    "ReducedModel": "reduced",
    "Reduction": "reduced",
    "Aux": "runtime.outputs",
    "keep_targets": "keep",
    "set_keep_ratio": "keep",
    "save": "checkpoint",
    "load": "checkpoint",
    "load_checkpoint": "checkpoint",
    "visualize": "visualize",
    "finetune": "train.loop",
    "evaluate": "train.loop",
    "FinetuneResult": "train.loop",
    "TokenReductionLoss": "train.losses",
    "Recipe": "train.recipes",
    "get_recipe": "train.recipes",
    "RECIPES": "train.recipes",
    "load_finetuned": "train.state",
    "TokenReduceError": "errors",
    "register_leaf_module": "capture",
    "register_leaf_function": "capture",
    "TRACE_LOCK": "capture",
    "Method": "methods",
    "Reducer": "methods",
    "Scorer": "methods",
    "register_method": "methods",
    "register_reducer": "methods",
    "register_scorer": "methods",
    "get_method": "methods",
    "get_reducer": "methods",
    "get_scorer": "methods",
    "list_methods": "methods",
    "list_reducers": "methods",
    "list_scorers": "methods",
    "unregister_method": "methods",
    "unregister_reducer": "methods",
    "unregister_scorer": "methods",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenreduce' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

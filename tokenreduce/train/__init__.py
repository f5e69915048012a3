"""Fine-tuning reduced models: losses, recipes, built-in digit data and teachers, ``finetune``.

Lazy (PEP 562): ``import tokenreduce.train.command`` does not import torch.
"""

from __future__ import annotations

import importlib

__all__ = [
    "finetune",
    "evaluate",
    "FinetuneResult",
    "TokenReductionLoss",
    "ratio_loss",
    "logit_distillation",
    "token_distillation",
    "Recipe",
    "RECIPES",
    "get_recipe",
    "load_builtin",
    "load_finetuned",
    "BUILTIN_DATASETS",
]

_WHERE = {
    "finetune": "loop",
    "evaluate": "loop",
    "FinetuneResult": "loop",
    "TokenReductionLoss": "losses",
    "ratio_loss": "losses",
    "logit_distillation": "losses",
    "token_distillation": "losses",
    "Recipe": "recipes",
    "RECIPES": "recipes",
    "get_recipe": "recipes",
    "load_builtin": "data",
    "BUILTIN_DATASETS": "data",
    "load_finetuned": "state",
}


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

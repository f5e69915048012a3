"""Fine-tuning recipes: the authors' defaults as frozen records, every value overridable.

| recipe | for | lr (at ``batch_ref``) | schedule | loss |
|---|---|---|---|---|
| ``tps`` | dTPS | 2.5e-4 at 1024, all params | warm-up 5 from 1e-6, cosine to 1e-5 | CE + 2 ratio + 0.5 KL |
| ``dynamicvit`` | DynamicViT | heads 1e-3 at 1024, rest 0.01x | warm-up 5, cosine to 1e-6 | CE + 2 ratio + 0.5 MSE |
| ``evit`` | EViT, eTPS | 2e-5 at 512 | no warm-up, cosine per epoch to 2e-6 | CE |
| ``deit`` | a dense model from scratch | 5e-4 at 512 | warm-up 5, cosine to 1e-5 | CE |

"KL" and "MSE" are the logit KL plus the token term of that kind. DynamicViT also freezes the
backbone for 5 epochs and never trains cls_token and pos_embed; the paper's eTPS follows EViT's
fine-tuning. All use AdamW, 30 epochs (``deit``: 300), mixup 0.8, cutmix 1.0, label smoothing
0.1. The learning rate scales linearly with the global batch: ``lr * batch / batch_ref``.
Sources: the TPS, DynamicViT and EViT releases and DeiT's recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["Recipe", "RECIPES", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe. ``backbone_lr_scale`` scales every parameter but the score heads
    (``reduce_sites``); ``frozen`` names parameters never trained; ``train_mode`` is the module
    mode while training (EViT trains in ``eval``: dropout and drop-path off)."""

    name: str
    lr: float
    batch_ref: int
    min_lr: float
    warmup_lr: float
    warmup_epochs: int
    epochs: int = 30
    opt: str = "adamw"
    weight_decay: float = 0.05
    sched: str = "cosine"
    sched_on_epochs: bool = False
    backbone_lr_scale: float = 1.0
    freeze_backbone_epochs: int = 0
    frozen: tuple[str, ...] = ()
    ratio_weight: float = 0.0
    distill_weight: float = 0.0
    token_loss: str | None = None
    temperature: float = 1.0
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    drop_path: float = 0.0
    clip_grad: float | None = None
    train_mode: str = "train"
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for key in (
            "lr",
            "min_lr",
            "warmup_lr",
            "weight_decay",
            "backbone_lr_scale",
            "ratio_weight",
            "distill_weight",
            "mixup",
            "cutmix",
            "smoothing",
            "drop_path",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe {self.name}: {key} must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0 or self.batch_ref <= 0 or self.epochs <= 0:
            raise ValueError(
                f"recipe {self.name}: lr, batch_ref and epochs must be > 0, got lr={self.lr}, "
                f"batch_ref={self.batch_ref}, epochs={self.epochs}"
            )
        if self.warmup_epochs < 0 or self.freeze_backbone_epochs < 0:
            raise ValueError(f"recipe {self.name}: warmup_epochs and freeze_backbone_epochs must be >= 0")
        if self.train_mode not in ("train", "eval"):
            raise ValueError(f"recipe {self.name}: train_mode must be 'train' or 'eval', got {self.train_mode!r}")
        if self.token_loss not in (None, "kl", "mse"):
            raise ValueError(f"recipe {self.name}: token_loss must be 'kl', 'mse' or None, got {self.token_loss!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"recipe {self.name}: smoothing must be in [0, 1), got {self.smoothing}")
        if not 0.0 < self.model_ema_decay < 1.0:
            raise ValueError(f"recipe {self.name}: model_ema_decay must be in (0, 1), got {self.model_ema_decay}")

    def scaled_lr(self, global_batch: int) -> float:
        """The linear scaling rule: ``lr * global_batch / batch_ref``."""
        return self.lr * global_batch / self.batch_ref


RECIPES: dict[str, Recipe] = {
    "tps": Recipe(
        "tps",
        lr=2.5e-4,
        batch_ref=1024,
        min_lr=1e-5,
        warmup_lr=1e-6,
        warmup_epochs=5,
        ratio_weight=2.0,
        distill_weight=0.5,
        token_loss="kl",
        notes=("TPS release: all parameters at one lr; fp16 with a grad scaler; DeiT-T without a teacher",),
    ),
    "dynamicvit": Recipe(
        "dynamicvit",
        lr=1e-3,
        batch_ref=1024,
        min_lr=1e-6,
        warmup_lr=1e-6,
        warmup_epochs=5,
        backbone_lr_scale=0.01,
        freeze_backbone_epochs=5,
        frozen=("cls_token", "pos_embed"),
        ratio_weight=2.0,
        distill_weight=0.5,
        token_loss="mse",
        model_ema=True,
        model_ema_decay=0.9999,
        notes=("DynamicViT release: ratio weight 5 for DeiT-B",),
    ),
    "evit": Recipe(
        "evit",
        lr=2e-5,
        batch_ref=512,
        min_lr=2e-6,
        warmup_lr=2e-6,
        warmup_epochs=0,
        weight_decay=1e-6,
        sched_on_epochs=True,
        train_mode="eval",
        model_ema=True,
        model_ema_decay=0.99996,
        notes=("EViT release: keep rate constant from the first step; tokens really removed",),
    ),
    "deit": Recipe(
        "deit",
        lr=5e-4,
        batch_ref=512,
        min_lr=1e-5,
        warmup_lr=1e-6,
        warmup_epochs=5,
        epochs=300,
        drop_path=0.1,
        notes=("DeiT from scratch (no repeated augmentation here)",),
    ),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "notes"))


def get_recipe(recipe: str | Recipe = "tps", **overrides) -> Recipe:
    """A recipe by name (or as given) with ``overrides`` applied (``get_recipe("tps", epochs=5)``);
    a None override keeps the recipe's value; ``token_loss="none"`` turns the token term off."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe: unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: expected a name or a Recipe, got {type(recipe).__name__}")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"recipe: unknown setting(s) {unknown}; settings: {', '.join(_FIELDS)}")
    if "frozen" in overrides and overrides["frozen"] is not None:
        overrides["frozen"] = tuple(overrides["frozen"])
    out = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None and v != "none"})
    if overrides.get("token_loss") == "none":
        out = dataclasses.replace(out, token_loss=None)
    return out

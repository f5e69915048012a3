"""One fine-tuning step of a dense or reduced model, as ``finetune`` takes it, ready to be timed.

``TrainStep()`` runs: zero the gradients, forward under autocast (the reduced model with ``aux``
outputs), the method's loss (:func:`step_loss`: the terms of ``TokenReductionLoss`` with the
recipe's weights; with a teacher, its frozen forward under ``no_grad`` first), backward, and
timm's AdamW step over ``finetune``'s parameter groups. It returns the loss tensor and reads
nothing back to the host, so timed steps queue on a GPU as a training loop's would (``finetune``
also reads the loss parts for logging; that read is left out of the timed step).
:func:`check_step` takes one step and reports what a timing must not hide: a non-finite loss,
non-finite gradients, score heads without a gradient, parameters that did not move.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..train.losses import TokenReductionLoss, logit_distillation, ratio_loss, token_distillation
from ..train.recipes import Recipe, get_recipe

__all__ = ["TrainStep", "build_step", "check_step", "step_loss", "train_recipe"]

HEADS = "reduce_sites."  # where apply puts the learned score heads
_DISTILL_WEIGHT = 0.5  # the tps recipe's, for variants whose recipe distils nothing


def train_recipe(method: str | None, learned: bool, distill: bool) -> Recipe:
    """``finetune``'s default recipe for ``method`` (None: dense) with the terms this step uses.

    Without ``distill``: cross-entropy plus, for learned scorers, the ratio loss. With it: the
    recipe's distillation terms, and the logit KL at weight 0.5 where the recipe has none (dense,
    eTPS, EViT). Methods that really remove tokens get no ratio and no token term, as in
    ``finetune``.
    """
    from ..train.loop import DEFAULT_RECIPES

    recipe = get_recipe(DEFAULT_RECIPES.get(method, "tps"))
    changes: dict[str, Any] = {}
    if not learned:
        changes.update(ratio_weight=0.0, token_loss=None)
    if not distill:
        changes.update(distill_weight=0.0, token_loss=None)
    elif recipe.distill_weight == 0:
        changes.update(distill_weight=_DISTILL_WEIGHT, token_loss=None)
    return dataclasses.replace(recipe, **changes)


def step_loss(
    criterion: TokenReductionLoss,
    logits: Tensor,
    target: Tensor,
    *,
    keeps: Sequence[Tensor] = (),
    targets: Sequence[float] | None = None,
    teacher_logits: Tensor | None = None,
    tokens: Tensor | None = None,
    teacher_tokens: Tensor | None = None,
    token_keep: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``criterion``'s total, from the same terms and weights, without reading floats back.

    ``TokenReductionLoss.forward`` turns every part into a Python float for logging, a host sync
    per part; here the parts stay tensors. logits (B, K), target (B, K) soft or (B,) labels,
    keeps per site (B, n), tokens / teacher_tokens (B, N, C) patch rows, token_keep (B, N).
    """
    ce = criterion.base(logits.float(), target)
    total, parts = ce, {"ce": ce}
    if criterion.ratio_weight > 0:
        parts["ratio"] = ratio_loss(keeps, targets)
        total = total + criterion.ratio_weight * parts["ratio"]
    if criterion.distill_weight > 0:
        distill = parts["kl_cls"] = logit_distillation(logits, teacher_logits, criterion.temperature)
        if criterion.token_loss is not None:
            parts["token"] = token_distillation(tokens, teacher_tokens, token_keep, criterion.token_loss)
            distill = distill + parts["token"]
        total = total + criterion.distill_weight * distill
    parts["total"] = total
    return total, parts


class _TeacherOutputs(nn.Module):
    """The frozen teacher: ``x -> (logits (B, K), final tokens (B, N, C) or None)``."""

    def __init__(self, teacher: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.teacher, self.tokens = teacher, tokens

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.tokens:
            return self.teacher(x), None
        feats = self.teacher.forward_features(x)  # (B, N, C), final-normed
        return self.teacher.forward_head(feats), feats


@dataclasses.dataclass
class TrainStep:
    """A callable training step over fixed ``x`` and ``target``; ``net``/``teacher_net`` may be the
    compiled forms of ``model``/``teacher`` (:meth:`compiled`)."""

    model: nn.Module
    net: nn.Module
    teacher: nn.Module | None
    teacher_net: nn.Module | None
    optimizer: torch.optim.Optimizer
    criterion: TokenReductionLoss
    recipe: Recipe
    x: Tensor
    target: Tensor
    targets: tuple[float, ...] | None
    num_prefix: int
    amp: torch.dtype | None
    classifier: tuple[str, ...] = ()  # the classifier's module path(s): check_step wants a gradient there
    parts: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.x.device.type, dtype=self.amp)

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.net(self.x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            kw: dict[str, Any] = {}
            if self.teacher_net is not None:
                with torch.no_grad():
                    t_logits, t_tokens = self.teacher_net(self.x)
                kw["teacher_logits"] = t_logits
                if self.criterion.token_loss is not None:
                    P = self.num_prefix
                    kw.update(
                        tokens=aux.tokens[:, P:], teacher_tokens=t_tokens[:, P:], token_keep=aux.token_keep[:, P:]
                    )
            keeps = aux.keeps if aux is not None and self.targets is not None else ()
            loss, self.parts = step_loss(self.criterion, logits, self.target, keeps=keeps, targets=self.targets, **kw)
        loss.backward()
        self.optimizer.step()
        return loss

    def compiled(self, mode: str | None = None, backend: str = "inductor") -> TrainStep:
        """The same step (same model, optimizer and batch) with ``torch.compile``d forwards; the
        loss and the optimizer stay eager."""
        net = torch.compile(self.model, mode=mode, backend=backend)
        teacher_net = self.teacher_net
        if teacher_net is not None:
            teacher_net = torch.compile(teacher_net, mode=mode, backend=backend)
        return dataclasses.replace(self, net=net, teacher_net=teacher_net)


def build_step(
    student: nn.Module,
    dense: nn.Module,
    method: str | None,
    x: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    distill: bool = False,
    amp: torch.dtype | None = None,
) -> TrainStep:
    """The step ``finetune`` would take for ``student`` (``dense`` itself, or ``apply(dense,
    method, aux=True)``): its recipe's loss and AdamW groups, at the recipe's lr for ``x``'s batch.

    ``x`` (B, C, H, W) images, ``labels`` (B,) classes; the target is the recipe's smoothed one-hot
    (what mixup gives at lambda 1). With ``distill`` a frozen deep copy of ``dense`` (taken now,
    before any step) is the teacher. Puts ``student`` in train mode.
    """
    from timm.data.mixup import mixup_target
    from timm.optim import create_optimizer_v2

    from ..keep import keep_targets
    from ..train.loop import param_groups, recipe_criterion

    learned = any(n.startswith(HEADS) for n, _ in student.named_parameters())
    recipe = train_recipe(method, learned, distill)
    teacher = copy.deepcopy(dense).eval().requires_grad_(False) if recipe.distill_weight > 0 else None
    _, base = recipe_criterion(recipe, num_classes)
    criterion = TokenReductionLoss(
        base, recipe.ratio_weight, recipe.distill_weight, recipe.token_loss, recipe.temperature
    )
    groups, _ = param_groups(student, dense, recipe)
    optimizer = create_optimizer_v2(
        groups, opt=recipe.opt, lr=recipe.scaled_lr(x.shape[0]), weight_decay=recipe.weight_decay
    )
    target = mixup_target(labels, num_classes, lam=1.0, smoothing=recipe.smoothing)  # (B, K)
    teacher_net = _TeacherOutputs(teacher, criterion.needs_tokens) if teacher is not None else None
    num_prefix = student.reduction.plan.sites[0].num_prefix if method is not None else 0
    classifier = (getattr(dense, "pretrained_cfg", None) or {}).get("classifier") or ()
    return TrainStep(
        model=student.train(),
        net=student,
        teacher=teacher,
        teacher_net=teacher_net,
        optimizer=optimizer,
        criterion=criterion,
        recipe=recipe,
        x=x,
        target=target,
        targets=keep_targets(student) if learned else None,
        num_prefix=num_prefix,
        amp=amp,
        classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier),
    )


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_step(step: TrainStep) -> dict[str, Any]:
    """Take one step and check it: the loss and every gradient finite, every score head (and the
    classifier) with a non-zero gradient, every parameter with a non-zero gradient moved.

    Returns the loss parts (floats), counts, and ``ok`` with ``problems`` (sentences) when not ok.
    """
    params = _trainable(step.model)
    before = {n: p.detach().clone() for n, p in params.items()}
    loss = step()
    problems: list[str] = []
    parts = {k: float(v.detach()) for k, v in step.parts.items()}
    if not math.isfinite(float(loss.detach())):
        problems.append(f"loss is not finite: {parts}")
    no_grad, bad_grad, moved, live = [], [], 0, 0
    for name, p in params.items():
        g = p.grad
        if g is None or not bool(g.ne(0).any()):
            no_grad.append(name)
            continue
        live += 1
        if not bool(torch.isfinite(g).all()):
            bad_grad.append(name)
        if bool(p.detach().ne(before[name]).any()):
            moved += 1
        else:
            problems.append(f"{name} has a gradient but did not change in the optimizer step")
    if bad_grad:
        problems.append(f"non-finite gradients in {', '.join(bad_grad[:5])}")
    must = [n for n in no_grad if n.startswith((HEADS, *(c + "." for c in step.classifier)))]
    if must:
        problems.append(f"no gradient reached {', '.join(must[:5])}")
    return {
        "ok": not problems,
        "problems": problems[:10],
        "loss": parts,
        "trainable": len(params),
        "with_grad": live,
        "moved": moved,
        "without_grad": no_grad[:10],
    }

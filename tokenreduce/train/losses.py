"""Fine-tuning losses for reduced models (DynamicViT's recipe, used by dTPS): plain torch.

``L = CE + ratio_weight * ratio + distill_weight * (KL_cls + token)``, tps-reference.md Sec. 3.
Each term is a pure function of tensors; :class:`TokenReductionLoss` combines them with a recipe's
weights and returns every part for logging.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ratio_loss",
    "logit_distillation",
    "token_distillation",
    "TokenReductionLoss",
    "LossParts",
    "TOKEN_LOSSES",
]

TOKEN_LOSSES = ("kl", "mse")


def _wide(t: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 activations are widened; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def ratio_loss(keeps: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """DynamicViT's ratio loss: mean over sites s of mean over the batch of (mean_n keep_s - rho_s)^2.

    Args:
        keeps: per site a (B, n) mask (straight-through 0/1, or probabilities) over the stage's
            original patch positions, cumulative (a token dropped at site s stays 0 after it).
        targets: per site the cumulative kept fraction rho_s (``tokenreduce.keep_targets``).

    Returns:
        A scalar; 0 when every site keeps exactly its target.
    """
    if len(keeps) != len(targets):
        raise ValueError(
            f"ratio_loss: got {len(keeps)} keep masks for {len(targets)} targets; give one target per site"
        )
    if not keeps:
        raise ValueError("ratio_loss: no keep masks; the reduced model has no learned site (apply(..., aux=True))")
    terms = []
    for s, (keep, rho) in enumerate(zip(keeps, targets)):
        if keep.dim() != 2:
            raise ValueError(f"ratio_loss: keep mask {s} must be (B, n), got shape {tuple(keep.shape)}")
        if not 0.0 < float(rho) <= 1.0:
            raise ValueError(f"ratio_loss: target {s} must be in (0, 1], got {rho}")
        terms.append((_wide(keep).mean(dim=1) - float(rho)).pow(2).mean())  # (B,) -> scalar
    return torch.stack(terms).mean()


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) on the logits (B, K): log-softmax of both at ``temperature``,
    summed over classes, averaged over the batch (``batchmean``), times ``temperature ** 2`` so the
    gradient scale does not depend on it (Hinton et al.; the authors use T = 1)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"logit_distillation: student and teacher logits must both be (B, K), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"logit_distillation: temperature must be > 0, got {temperature}")
    s = F.log_softmax(_wide(student) / temperature, dim=-1)
    t = F.log_softmax(_wide(teacher) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def token_distillation(student: Tensor, teacher: Tensor, keep: Tensor, kind: str = "kl") -> Tensor:
    """Distil the final tokens still alive after the last site.

    Args:
        student: (B, N, C) the student's final-normed tokens (patch rows only, or the whole
            stream with the prefix rows masked out by ``keep``).
        teacher: (B, N, C) the dense teacher's tokens at the same positions.
        keep: (B, N) alive mask; rows with ``keep > 0.5`` are distilled.
        kind: ``"kl"`` (TPS: KL(teacher || student) over the channel softmax of each row, averaged
            over the alive rows) or ``"mse"`` (DynamicViT on DeiT: mean squared error over the
            alive rows and their channels).

    Returns:
        A scalar; 0 (still attached to ``student``'s graph) when no row is alive.
    """
    if kind not in TOKEN_LOSSES:
        raise ValueError(f"token_distillation: kind must be one of {TOKEN_LOSSES}, got {kind!r}")
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(
            f"token_distillation: student and teacher tokens must both be (B, N, C), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if keep.shape != student.shape[:2]:
        raise ValueError(
            f"token_distillation: keep must be (B, N) = {tuple(student.shape[:2])}, got {tuple(keep.shape)}"
        )
    alive = keep.detach() > 0.5  # (B, N)
    s = _wide(student)[alive]  # (R, C): the alive rows
    t = _wide(teacher)[alive]
    if s.shape[0] == 0:
        return student.sum() * 0.0
    if kind == "mse":
        return F.mse_loss(s, t)
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)


class LossParts(NamedTuple):
    """The total and each weighted term before weighting (floats detached, for logging)."""

    total: Tensor
    parts: Mapping[str, float]


class TokenReductionLoss(nn.Module):
    """``base(logits, target) + ratio_weight * ratio + distill_weight * (KL_cls + token)``.

    ``forward(logits (B, K), target, *, keeps=None, targets=None, teacher_logits=None,
    tokens=None, teacher_tokens=None, token_keep=None) -> LossParts``. A term is computed when
    its weight is non-zero and its inputs are given; a weighted term whose inputs are missing is
    an error (a recipe that asks for distillation without a teacher is a bug, not a no-op).

    Args:
        base: the classification loss, e.g. timm's ``SoftTargetCrossEntropy`` under mixup.
        ratio_weight: weight of :func:`ratio_loss` (2 in DynamicViT/dTPS; 0 for eTPS/EViT).
        distill_weight: weight of the logit and token distillation (0.5; 0 for no teacher).
        token_loss: ``"kl"``, ``"mse"`` or None (no token term).
        temperature: of the logit distillation.
    """

    def __init__(
        self,
        base: nn.Module,
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        token_loss: str | None = "kl",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if ratio_weight < 0 or distill_weight < 0:
            raise ValueError(
                f"TokenReductionLoss: weights must be >= 0, got ratio_weight={ratio_weight}, "
                f"distill_weight={distill_weight}"
            )
        if token_loss is not None and token_loss not in TOKEN_LOSSES:
            raise ValueError(
                f"TokenReductionLoss: token_loss must be one of {TOKEN_LOSSES} or None, got {token_loss!r}"
            )
        self.base = base
        self.ratio_weight = float(ratio_weight)
        self.distill_weight = float(distill_weight)
        self.token_loss = token_loss
        self.temperature = float(temperature)

    @property
    def needs_teacher(self) -> bool:
        return self.distill_weight > 0

    @property
    def needs_tokens(self) -> bool:
        return self.distill_weight > 0 and self.token_loss is not None

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        *,
        keeps: Sequence[Tensor] | None = None,
        targets: Sequence[float] | None = None,
        teacher_logits: Tensor | None = None,
        tokens: Tensor | None = None,
        teacher_tokens: Tensor | None = None,
        token_keep: Tensor | None = None,
    ) -> LossParts:
        ce = self.base(_wide(logits), target)
        total = ce
        parts = {"ce": float(ce.detach())}
        if self.ratio_weight > 0:
            if keeps is None or targets is None:
                raise ValueError(
                    "TokenReductionLoss: ratio_weight > 0 needs keeps and targets; pass the aux keep "
                    "masks, or set ratio_weight=0 for a method without learned sites"
                )
            ratio = ratio_loss(keeps, targets)
            total = total + self.ratio_weight * ratio
            parts["ratio"] = float(ratio.detach())
        if self.distill_weight > 0:
            if teacher_logits is None:
                raise ValueError(
                    "TokenReductionLoss: distill_weight > 0 needs teacher_logits; set distill_weight=0 "
                    "to train without a teacher"
                )
            kl = logit_distillation(logits, teacher_logits, self.temperature)
            distill = kl
            parts["kl_cls"] = float(kl.detach())
            if self.token_loss is not None:
                if tokens is None or teacher_tokens is None or token_keep is None:
                    raise ValueError(
                        "TokenReductionLoss: a token loss needs tokens, teacher_tokens and token_keep; "
                        "set token_loss=None to distil the logits only"
                    )
                tok = token_distillation(tokens, teacher_tokens, token_keep, self.token_loss)
                distill = distill + tok
                parts["token"] = float(tok.detach())
            total = total + self.distill_weight * distill
        parts["total"] = float(total.detach())
        return LossParts(total, parts)

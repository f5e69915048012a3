"""``finetune`` and ``evaluate``: train a reduced model against a frozen copy of the dense one.

One step (tps-reference.md Sec. 3): mixup/cutmix the batch, run the student (the reduced model,
``aux`` outputs on), run the teacher under ``no_grad``, combine CE, the ratio loss on the
student's keep masks and the distillation terms with :class:`TokenReductionLoss`, step AdamW and
the per-step (or per-epoch) schedule, update the EMA. The model passed in is never trained: the
student reduces a deep copy of it and the teacher is another, frozen, in eval mode.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import TokenReduceError
from . import distributed
from .data import MNIST_MEAN, MNIST_STD, DigitData, TensorLoader, folder_loaders, load_builtin
from .losses import TokenReductionLoss
from .recipes import Recipe, get_recipe
from .state import read_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["finetune", "evaluate", "FinetuneResult", "DEFAULT_RECIPES"]

log = logging.getLogger(__name__)

DEFAULT_RECIPES = {"dtps": "tps", "dynamicvit": "dynamicvit", "etps": "evit", "evit": "evit", None: "deit"}
HEADS = "reduce_sites"  # where apply puts learned score heads


@dataclass(frozen=True)
class FinetuneResult:
    """The trained student (unwrapped, on its device), its EMA (or None), one record per epoch and
    the last checkpoint written (None without ``output``)."""

    model: nn.Module
    ema: nn.Module | None
    history: tuple[dict[str, Any], ...]
    checkpoint: Path | None


class _Outputs:
    """What one forward gives: logits and, with ``apply(..., aux=True)``, the ``Aux`` fields
    (``keeps`` per site, final ``tokens`` and their alive mask ``token_keep``)."""

    def __init__(self, out: Any) -> None:
        self.keeps: Sequence[Tensor] = ()
        self.tokens: Tensor | None = None
        self.token_keep: Tensor | None = None
        if isinstance(out, tuple):
            out, aux = out
            self.keeps = tuple(aux.keeps)
            self.tokens, self.token_keep = aux.tokens, aux.token_keep
        self.logits: Tensor = out


def _is_learned(model: nn.Module) -> bool:
    return any(n.startswith(HEADS + ".") for n, _ in model.named_parameters())


def _num_prefix(reduced: nn.Module) -> int:
    return reduced.reduction.plan.sites[0].num_prefix


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def _dtype(amp: str | None) -> torch.dtype | None:
    if amp in (None, "none", "float32"):
        return None
    if amp not in ("bfloat16", "float16"):
        raise ValueError(f"amp_dtype: expected 'bfloat16', 'float16' or None, got {amp!r}")
    return getattr(torch, amp)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device | str | None = None,
    amp_dtype: str | None = None,
    info: distributed.DistInfo | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy, mean cross-entropy and (reduced models with ``aux``) the mean patch tokens
    alive after each site, over every image of ``loader`` (all ranks summed). Runs in eval mode
    and restores the module's mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dt = _dtype(amp_dtype)
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    kept: Tensor | None = None
    start = time.perf_counter()
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, dt):
                out = _Outputs(model(x))
            logits = out.logits.float()
            correct += (logits.argmax(-1) == y).sum()
            count += y.numel()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
            if out.keeps:
                k = torch.stack([m.float().sum(1).sum() for m in out.keeps]).double()  # (sites,)
                kept = k if kept is None else kept + k
    finally:
        model.train(was)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if info is not None:
        stats = torch.stack([correct, count, loss])
        distributed.all_reduce_sum(stats, info)
        correct, count, loss = stats
        if kept is not None:
            distributed.all_reduce_sum(kept, info)
    n = max(float(count), 1.0)
    result = {
        "acc1": float(correct) / n * 100.0,
        "loss": float(loss) / n,
        "images": int(count),
        "images_per_s": float(count) / seconds if seconds > 0 else float("nan"),
    }
    if kept is not None:
        result["kept_tokens"] = [round(float(v) / n, 3) for v in kept]
    return result


def param_groups(student: nn.Module, dense: nn.Module, recipe: Recipe) -> tuple[list[dict], list[nn.Parameter]]:
    """AdamW groups: score heads at lr_scale 1, the backbone at ``backbone_lr_scale``; no weight decay
    on 1-d parameters and ``no_weight_decay()`` names (timm's rule). Returns the groups and the
    backbone parameters (frozen for the first ``freeze_backbone_epochs``)."""
    nwd_fn = getattr(student, "no_weight_decay", None) or getattr(dense, "no_weight_decay", None)
    no_wd = set(nwd_fn()) if nwd_fn is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    backbone = []
    for name, p in student.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in recipe.frozen):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        head = name.startswith(HEADS + ".")
        if not head:
            backbone.append(p)
        decay = p.ndim > 1 and name not in no_wd
        groups.setdefault((head, decay), []).append(p)
    out = [
        {
            "params": ps,
            "weight_decay": recipe.weight_decay if decay else 0.0,
            "lr_scale": 1.0 if head else recipe.backbone_lr_scale,
        }
        for (head, decay), ps in groups.items()
    ]
    return out, backbone


def _loaders(
    dataset: str | DigitData | None,
    data_dir: str | Path | None,
    dense: nn.Module,
    batch_size: int,
    *,
    recipe: Recipe,
    seed: int,
    info: distributed.DistInfo,
    workers: int,
    translate: int | None,
):
    cfg = getattr(dense, "pretrained_cfg", None) or {}
    if data_dir is not None and Path(data_dir).is_dir():
        augment = dict(hflip=0.0, color_jitter=0.0)
        train, val, num_classes = folder_loaders(
            data_dir, dense, batch_size, augment=augment, workers=workers, distributed=info.enabled, device=info.device
        )
        return train, val, num_classes, tuple(cfg.get("input_size", next(iter(val))[0].shape[1:]))
    if isinstance(dataset, DigitData):
        data = dataset
    else:
        data = load_builtin(dataset or "mnist5k", npz=data_dir)
    mean, std = cfg.get("mean", MNIST_MEAN), cfg.get("std", MNIST_STD)
    if len(mean) != data.input_size[0]:
        mean, std = MNIST_MEAN * data.input_size[0], MNIST_STD * data.input_size[0]
    common = dict(mean=mean, std=std, device=info.device, seed=seed, rank=info.rank, world_size=info.world_size)
    if translate is None:  # 2 px at 28 px, none at 8 px
        translate = data.input_size[-1] // 14
    train = TensorLoader(data.train_x, data.train_y, batch_size, training=True, translate=translate, **common)
    val = TensorLoader(data.val_x, data.val_y, batch_size, training=False, **common)
    return train, val, data.num_classes, data.input_size


def recipe_criterion(recipe: Recipe, num_classes: int) -> tuple[Any, nn.Module]:
    """The recipe's batch mixing and base loss: ``(timm Mixup or None, loss)``; with mixup or
    cutmix the loss takes soft targets (timm's ``SoftTargetCrossEntropy``), else label smoothing
    or plain cross-entropy on labels."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=recipe.mixup,
            cutmix_alpha=recipe.cutmix,
            label_smoothing=recipe.smoothing,
            num_classes=num_classes,
        )
        base: nn.Module = SoftTargetCrossEntropy()
    elif recipe.smoothing > 0:
        base = LabelSmoothingCrossEntropy(recipe.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    return mixup, base


def _effective_recipe(
    recipe: Recipe, learned: bool, method: str | None, teacher_given: bool, explicit: dict[str, Any]
) -> Recipe:
    """Terms a method cannot use: a non-learned method has no differentiable keep masks (ratio
    loss) and really removes tokens (no aligned token distillation). Dropped with a log line when
    they come from the recipe; an error when the caller asked for them."""
    import dataclasses

    changes: dict[str, Any] = {}
    if not learned:
        for key, off in (("ratio_weight", 0.0), ("token_loss", None)):
            if getattr(recipe, key) not in (0.0, None):
                if explicit.get(key) not in (None, 0.0, "none"):
                    raise ValueError(
                        f"{key}: method {method or 'none'} has no learned keep masks (tokens are really removed), so "
                        f"{key}={explicit[key]!r} cannot apply; use method 'dtps' or 'dynamicvit', or leave it unset"
                    )
                changes[key] = off
    if method is None and not teacher_given and recipe.distill_weight > 0:
        if explicit.get("distill_weight"):
            raise ValueError(
                "distill_weight: a dense run distils from a teacher; pass teacher= (--teacher) or set distill_weight=0"
            )
        changes["distill_weight"] = 0.0
    if learned and recipe.train_mode == "eval":
        raise ValueError(
            f"recipe {recipe.name}: train_mode 'eval' cannot train {method}'s learned score heads "
            f"(their straight-through masks need train mode); use recipe 'tps' or 'dynamicvit', or "
            f"train_mode='train'"
        )
    if changes:
        log.info("finetune: recipe %s with method %s: %s (not applicable)", recipe.name, method, changes)
        recipe = dataclasses.replace(recipe, **changes)
    return recipe


def finetune(
    model: nn.Module,
    dataset: str | DigitData | None = "mnist5k",
    *,
    method: str | None = "dtps",
    locs: Sequence[int | str] | None = None,
    keep_ratio: float | Sequence[float] = 0.7,
    recipe: str | Recipe | None = None,
    teacher: nn.Module | None = None,
    batch_size: int = 128,
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    amp_dtype: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    workers: int = 4,
    translate: int | None = None,
    progress: bool = True,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    eval_every: int = 1,
    stop_after: int | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``tokenreduce.apply(model, method, locs, keep_ratio)``; ``model`` stays untouched.

    Args:
        model: the dense model (pretrained); the student reduces a deep copy, the teacher is a
            frozen copy in eval mode (or ``teacher``).
        dataset: a built-in set (``"mnist5k"``, ``"digits"``) or a :class:`DigitData`; ignored
            when ``data_dir`` is an ImageFolder tree (``train/``, ``val/``).
        method: a tokenreduce method, or None to train the dense model itself (the digit teachers).
        recipe: ``"tps"``, ``"dynamicvit"``, ``"evit"``, ``"deit"`` or a :class:`Recipe`; default by
            method (:data:`DEFAULT_RECIPES`). ``overrides`` replace recipe fields (``epochs=5``, ``lr=1e-3``).
        batch_size: per process; the recipe's lr scales with the global batch.
        output: folder for ``last.pth`` (every epoch) and ``log.jsonl``; ``resume``: a ``last.pth``.
        translate: built-in sets: random shift in pixels (default: image size // 14).
        amp_dtype: ``"bfloat16"``, ``"float16"`` (with a grad scaler) or None (fp32).
        eval_every: evaluate every this many epochs (and after the last).
        stop_after: return after this many epochs of this call, the schedule still spanning
            ``epochs`` (a run split over jobs with a time limit; continue it with ``resume``).
        model_name, model_kwargs: the timm name and kwargs that rebuild ``model`` (recorded in the
            checkpoint for :func:`tokenreduce.train.state.load_finetuned`).

    Returns:
        :class:`FinetuneResult`. Raises ``TokenReduceError`` on a non-finite loss; the last
        checkpoint written stays the last good one.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from ..api import apply
    from ..keep import keep_targets

    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune: model must be an nn.Module, got {type(model).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    info = distributed.init(device)
    dev = info.device
    dt = _dtype(amp_dtype)
    recipe = get_recipe(recipe if recipe is not None else DEFAULT_RECIPES.get(method, "tps"), **overrides)
    if recipe.drop_path > 0:
        log.info(
            "finetune: drop_path %.3g is a model-construction setting: it applies where the model was built "
            "with timm.create_model(..., drop_path_rate=%.3g), as the command does",
            recipe.drop_path,
            recipe.drop_path,
        )
    torch.manual_seed(seed + info.rank)
    np.random.seed(seed + info.rank)
    random.seed(seed + info.rank)

    dense = model
    train_loader, val_loader, num_classes, input_size = _loaders(
        dataset, data_dir, dense, batch_size, recipe=recipe, seed=seed, info=info, workers=workers, translate=translate
    )
    student = copy.deepcopy(dense).to(dev)
    if method is not None:
        student = apply(
            student.eval(),
            method=method,
            locs=locs,
            keep_ratio=keep_ratio,
            aux=True,
            example_input=torch.zeros(2, *input_size, device=dev),
        )
    learned = _is_learned(student)
    recipe = _effective_recipe(recipe, learned, method, teacher is not None, overrides)
    if recipe.distill_weight > 0:
        teacher = (teacher if teacher is not None else copy.deepcopy(dense)).to(dev).eval().requires_grad_(False)
    else:
        teacher = None
    targets = keep_targets(student) if learned else None
    num_prefix = _num_prefix(student) if method is not None else 0

    groups, backbone = param_groups(student, dense, recipe)
    global_batch = batch_size * info.world_size
    lr = recipe.scaled_lr(global_batch)
    optimizer = create_optimizer_v2(groups, opt=recipe.opt, lr=lr, weight_decay=recipe.weight_decay)
    scheduler, epochs = create_scheduler_v2(
        optimizer,
        sched=recipe.sched,
        num_epochs=recipe.epochs,
        warmup_epochs=recipe.warmup_epochs,
        warmup_lr=recipe.warmup_lr,
        min_lr=recipe.min_lr,
        step_on_epochs=recipe.sched_on_epochs,
        updates_per_epoch=len(train_loader),
    )
    scaler = torch.amp.GradScaler(dev.type) if dt is torch.float16 else None
    mixup, base = recipe_criterion(recipe, num_classes)
    criterion = TokenReductionLoss(
        base, recipe.ratio_weight, recipe.distill_weight, recipe.token_loss, recipe.temperature
    )
    ema = ModelEmaV3(student, decay=recipe.model_ema_decay) if recipe.model_ema else None
    net: nn.Module = student
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)

    config = {
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "method": method,
        "locs": list(locs) if locs is not None else None,
        "keep_ratio": keep_ratio,
        "input_size": list(input_size),
        "num_classes": num_classes,
        "recipe": asdict(recipe),
        "batch_size": batch_size,
        "global_batch": global_batch,
        "lr": lr,
        "seed": seed,
        "amp_dtype": amp_dtype,
        "world_size": info.world_size,
    }
    out_dir = Path(output) if output is not None else None
    ck_path = out_dir / "last.pth" if out_dir is not None else None
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume is not None:
        ck = read_checkpoint(resume, map_location=dev)
        extra = ck["extra"]
        for key in ("model", "method", "locs", "keep_ratio", "input_size", "num_classes"):
            if extra["run"].get(key) != config[key]:
                raise ValueError(
                    f"resume: {resume} was trained with {key}={extra['run'].get(key)!r}, this run has "
                    f"{config[key]!r}; resume with the same settings"
                )
        student.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if ema is not None and extra.get("ema_state_dict") is not None:
            ema.module.load_state_dict(extra["ema_state_dict"])
        rngs = extra["rng"]
        set_rng_state(rngs[min(info.rank, len(rngs) - 1)])
        start_epoch = extra["epoch"] + 1
        history = list(extra["history"])
        log.info("finetune: resumed from %s after epoch %d", resume, extra["epoch"])
    if out_dir is not None and info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=1, default=str))

    before = None
    if start_epoch == 0 and method is not None:
        before = evaluate(student, val_loader, device=dev, amp_dtype=amp_dtype, info=info)
        log.info("finetune: off-the-shelf %s acc %.2f", method, before["acc1"])
    num_updates = start_epoch * len(train_loader)
    end = epochs if stop_after is None else min(epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end):
        train_loader_epoch = getattr(train_loader, "set_epoch", None) or getattr(
            getattr(train_loader, "sampler", None), "set_epoch", None
        )
        if train_loader_epoch is not None:
            train_loader_epoch(epoch)
        student.train(recipe.train_mode == "train")
        freeze = epoch < recipe.freeze_backbone_epochs
        sums: dict[str, float] = {}
        kept_sum: Tensor | None = None
        steps = 0
        images = 0
        t0 = time.perf_counter()
        bar = _progress(train_loader, f"epoch {epoch}", progress and info.is_main)
        for x, y in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            with _autocast(dev, dt):
                out = _Outputs(net(x))
                with torch.no_grad():
                    t_logits, t_tokens = _teacher(teacher, x, criterion.needs_teacher, criterion.needs_tokens)
                kw = {}
                if criterion.needs_tokens:
                    if out.tokens is None:
                        raise TokenReduceError(
                            "finetune: token distillation needs the student's final tokens, and "
                            "apply found none in this model (aux.tokens is None); use "
                            "token_loss='none'"
                        )
                    kw = dict(
                        tokens=out.tokens[:, num_prefix:],
                        teacher_tokens=t_tokens[:, num_prefix:],
                        token_keep=out.token_keep[:, num_prefix:],
                    )
                loss, parts = criterion(
                    out.logits,
                    target,
                    keeps=out.keeps if learned else None,
                    targets=targets,
                    teacher_logits=t_logits,
                    **kw,
                )
            bad = torch.tensor(0.0 if math.isfinite(parts["total"]) else 1.0, device=dev)
            if float(distributed.all_reduce_sum(bad, info)) > 0:
                last = (
                    f"the last good checkpoint is {ck_path} (epoch {epoch - 1})"
                    if ck_path and epoch > 0
                    else "no checkpoint was written yet"
                )
                raise TokenReduceError(
                    f"finetune: non-finite loss at epoch {epoch}, step {steps} ({parts}); {last}. Lower --lr, "
                    f"use --amp-dtype bfloat16 or --clip-grad, and --resume from that checkpoint"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if freeze:
                for p in backbone:
                    p.grad = None
            if recipe.clip_grad is not None:
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], recipe.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(student, step=num_updates)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if out.keeps:
                k_now = torch.stack([m.detach().float().sum(1).mean() for m in out.keeps])
                kept_sum = k_now if kept_sum is None else kept_sum + k_now
            steps += 1
            images += x.shape[0]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        scheduler.step(epoch + 1)
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": {k: v / max(steps, 1) for k, v in sums.items()},
            "train_images_per_s": images * info.world_size / seconds if seconds > 0 else float("nan"),
            "train_seconds": seconds,
            "backbone_frozen": freeze,
        }
        if kept_sum is not None:
            record["train_kept_tokens"] = [round(float(v) / steps, 3) for v in kept_sum]
        if before is not None and epoch == 0:
            record["before"] = before
        if (epoch + 1) % eval_every == 0 or epoch + 1 == end:
            record["eval"] = evaluate(student, val_loader, device=dev, amp_dtype=amp_dtype, info=info)
            if ema is not None:
                record["eval_ema"] = evaluate(ema.module, val_loader, device=dev, amp_dtype=amp_dtype, info=info)
        history.append(record)
        _report(record, out_dir, info)
        if ck_path is not None:
            rngs = _gather_rng(info)
            if info.is_main:
                save_checkpoint(
                    ck_path,
                    student,
                    model_kwargs=model_kwargs,
                    extra={
                        "run": config,
                        "ema_state_dict": ema.module.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch,
                        "rng": rngs,
                        "history": history,
                    },
                )
            distributed.barrier(info)
    return FinetuneResult(student, ema.module if ema is not None else None, tuple(history), ck_path)


def _teacher(teacher: nn.Module | None, x: Tensor, logits: bool, tokens: bool) -> tuple[Tensor | None, Tensor | None]:
    if not logits or teacher is None:
        return None, None
    if tokens:
        if not (hasattr(teacher, "forward_features") and hasattr(teacher, "forward_head")):
            raise TokenReduceError(
                f"finetune: token distillation needs the teacher's final tokens; "
                f"{type(teacher).__name__} has no forward_features/forward_head. "
                f"Use token_loss='none'"
            )
        feats = teacher.forward_features(x)  # (B, N, C), final-normed
        return teacher.forward_head(feats), feats
    return teacher(x), None


def _gather_rng(info: distributed.DistInfo) -> list[dict[str, Any]]:
    """Every rank's generator states (rank order), so each resumes its own stream."""
    state = rng_state()
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _progress(loader, desc: str, enabled: bool):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def _report(record: dict[str, Any], out_dir: Path | None, info: distributed.DistInfo) -> None:
    if not info.is_main:
        return
    ev = record.get("eval", {})
    log.info(
        "epoch %d: loss %.4f acc %s train %.0f img/s kept %s",
        record["epoch"],
        record["loss"].get("total", 0.0),
        f"{ev['acc1']:.2f}" if ev else "-",
        record["train_images_per_s"],
        ev.get("kept_tokens"),
    )
    if out_dir is not None:
        with open(out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

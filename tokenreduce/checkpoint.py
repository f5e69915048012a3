"""Checkpoints of reduced models, and the authors' released checkpoints mapped into ours.

One format carries the ``apply`` configuration with the state dict, so :func:`load` rebuilds the
reduced model (from the timm name, or from a dense model you pass) with ``strict=True``::

    {"tokenreduce": {"format": 1, "version": ..., "model": {"name": ..., "kwargs": {...}},
                     "method": ..., "locs": [...], "keep_ratio": [...], "example_shape": [...],
                     "aux": bool},
     "state_dict": {...}, "extra": {...}}

Only plain data and tensors, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from .errors import TokenReduceError
from .reduced import ReducedModel

__all__ = ["save", "load", "load_checkpoint", "config_of", "convert_released_checkpoint"]

FORMAT = 1
PathLike = str | os.PathLike


def config_of(reduced: ReducedModel, model_kwargs: Mapping[str, Any] | None = None) -> dict:
    """The ``apply`` configuration of ``reduced`` as plain data (the checkpoint's "tokenreduce")."""
    from . import __version__

    if not isinstance(reduced, ReducedModel):
        raise TypeError(f"save: expected a module returned by tokenreduce.apply, got {type(reduced).__name__}")
    info = reduced.reduction
    return {
        "format": FORMAT,
        "version": __version__,
        "model": {"name": info.model_name, "kwargs": dict(model_kwargs or {}), "transformers": info.transformers},
        "method": info.plan.method.name,
        "locs": [s.block for s in info.plan.sites],
        "keep_ratio": [s.ratio for s in info.plan.sites],
        "example_shape": list(info.example_shape),
        "aux": info.aux,
    }


def save(
    reduced: ReducedModel,
    path: PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``reduced``'s configuration and state dict to ``path``.

    ``model_kwargs``: what ``timm.create_model`` needs besides the name to build the dense model
    again (``num_classes``, ``img_size``, ...); ``extra``: anything else to keep (optimizer state,
    epoch), returned by :func:`load_checkpoint`.
    """
    payload = {
        "tokenreduce": config_of(reduced, model_kwargs),
        "state_dict": reduced.state_dict(),
        "extra": dict(extra or {}),
    }
    torch.save(payload, path)


def load_checkpoint(path: PathLike | Mapping, map_location: Any = "cpu") -> dict:
    """The raw checkpoint dict (``path`` may also be the dict itself), checked for the format."""
    ckpt = path if isinstance(path, Mapping) else torch.load(path, map_location=map_location, weights_only=True)
    cfg = ckpt.get("tokenreduce") if isinstance(ckpt, Mapping) else None
    if not isinstance(cfg, Mapping) or "state_dict" not in ckpt:
        raise TokenReduceError(
            f"load: {path if not isinstance(path, Mapping) else 'the dict'} is not a tokenreduce checkpoint "
            f"(no 'tokenreduce' configuration and 'state_dict'); for the authors' released checkpoints "
            f"use tokenreduce.checkpoint.convert_released_checkpoint"
        )
    if cfg.get("format") != FORMAT:
        raise TokenReduceError(f"load: checkpoint format {cfg.get('format')!r}; this tokenreduce reads {FORMAT}")
    return dict(ckpt)


def _dense_model(cfg: Mapping) -> nn.Module:
    import timm

    from . import backbones  # noqa: F401  (registers pvt_* / cvt_* / lvvit_* with timm)

    name = cfg["model"]["name"]
    if cfg["model"].get("transformers"):  # a Hugging Face model: its class and config
        from . import hf

        return hf.build(cfg["model"]["transformers"])
    if not timm.is_model(name):
        raise TokenReduceError(
            f"load: the checkpoint's model {name!r} is not a timm model name; build the dense "
            f"model yourself and pass it: tokenreduce.load(path, model=...)"
        )
    return timm.create_model(name, pretrained=False, **cfg["model"]["kwargs"])


def load(
    path: PathLike | Mapping, model: nn.Module | None = None, map_location: Any = "cpu", *, aux: bool | None = None
) -> ReducedModel:
    """Rebuild the reduced model saved at ``path``, in eval mode.

    ``model``: the dense model to reduce (its weights are overwritten by the checkpoint's, which
    hold all of them); default: built from the checkpoint's timm name and kwargs with random
    weights. ``aux``: override whether it returns :class:`tokenreduce.Aux` (default: as saved).
    Eval outputs are bit-identical to the saved model's.
    """
    from .api import apply

    ckpt = load_checkpoint(path, map_location)
    cfg = ckpt["tokenreduce"]
    dense = model if model is not None else _dense_model(cfg)
    param = next(dense.parameters(), None)
    example = torch.zeros(
        cfg["example_shape"],
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32,
    ).normal_()
    reduced = apply(
        dense,
        cfg["method"],
        cfg["locs"],
        cfg["keep_ratio"],
        example_input=example,
        aux=cfg["aux"] if aux is None else aux,
    )
    reduced.load_state_dict(ckpt["state_dict"], strict=True)
    return reduced.eval()


_PREDICTOR = re.compile(r"^score_predictor\.(\d+)\.(in_conv|out_conv)\.(\d+)\.(weight|bias)$")


def convert_released_checkpoint(
    state_dict: Mapping[str, Tensor],
    reduced: ReducedModel,
    source: Literal["dynamicvit", "tps", "evit"] = "tps",
) -> dict[str, Tensor]:
    """Map an authors' release into ``reduced``'s state dict layout (then ``load_state_dict``).

    ``dynamicvit`` / ``tps``: DeiT backbone keys as timm names them, plus the score heads
    ``score_predictor.{i}.in_conv.{j}`` -> ``reduce_sites.{i}.scorer.head.embed.{j}`` and
    ``score_predictor.{i}.out_conv.{j}`` -> ``reduce_sites.{i}.scorer.head.classify.{j}``
    (site i is the i-th site of ``reduced``'s plan). ``evit``: the backbone only (EViT has no
    parameters of its own). A ``{"model": ...}`` wrapper and DDP's ``module.`` prefix are removed.
    Keys that have no place in ``reduced`` raise a TokenReduceError naming them.
    """
    if source not in ("dynamicvit", "tps", "evit"):
        raise ValueError(f"convert_released_checkpoint: source must be 'dynamicvit', 'tps' or 'evit', got {source!r}")
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    ours = reduced.state_dict()
    sites = len(reduced.reduction.plan.sites)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        hit = _PREDICTOR.match(key)
        if hit and source != "evit":
            i, part, j, kind = hit.groups()
            if int(i) >= sites:
                raise TokenReduceError(
                    f"convert_released_checkpoint: {key} is a score head for site {i}, but "
                    f"the reduced model has {sites} site(s); apply with the release's locs"
                )
            key = f"reduce_sites.{i}.scorer.head.{'embed' if part == 'in_conv' else 'classify'}.{j}.{kind}"
        if key not in ours:
            unknown.append(key)
            continue
        out[key] = value
    if unknown:
        raise TokenReduceError(
            f"convert_released_checkpoint: {len(unknown)} key(s) have no place in the reduced "
            f"model, e.g. {unknown[:3]}; is it the same architecture and method?"
        )
    return out

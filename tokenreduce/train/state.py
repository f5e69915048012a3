"""Fine-tuning checkpoints: written atomically every epoch, read back to resume or to rebuild.

A reduced student is saved with :func:`tokenreduce.save` (so :func:`tokenreduce.load` rebuilds it);
a dense run (the digit teachers) in the same layout with a ``"dense"`` header. The training state
is the checkpoint's ``extra``: ``run`` (the run's settings: timm name and kwargs, method, locs,
keep ratio, input size, recipe), ``ema_state_dict``, ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (the last one completed), ``rng`` (per rank: torch, CUDA, numpy and Python generator
states, so a resumed run draws what the uninterrupted one would) and ``history`` (one record per
epoch, as in the JSON-lines log). ``torch.load(..., weights_only=True)`` reads all of it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DENSE_FORMAT", "save_checkpoint", "read_checkpoint", "load_finetuned", "rng_state", "set_rng_state"]

DENSE_FORMAT = "tokenreduce.dense.v1"


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _is_reduced(model: nn.Module) -> bool:
    return hasattr(model, "reduction")


def save_checkpoint(
    path: str | Path, model: nn.Module, *, extra: dict[str, Any], model_kwargs: dict[str, Any] | None = None
) -> Path:
    """Write to a temporary file, then rename: a crash mid-write leaves the previous checkpoint."""
    from ..checkpoint import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if _is_reduced(model):
        save(model, tmp, extra=extra, model_kwargs=model_kwargs)
    else:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        torch.save(
            {
                "dense": {"format": DENSE_FORMAT, "model": {"name": name, "kwargs": dict(model_kwargs or {})}},
                "state_dict": model.state_dict(),
                "extra": extra,
            },
            tmp,
        )
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (``state_dict``, ``extra`` and the ``tokenreduce`` or ``dense`` header)."""
    from ..checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {path}")
    ck = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(ck, dict) and isinstance(ck.get("dense"), dict) and ck["dense"].get("format") == DENSE_FORMAT:
        return ck
    ck = load_checkpoint(ck)  # a reduced model's; raises on anything else
    return ck


def load_finetuned(
    path: str | Path, model: nn.Module | None = None, *, map_location: str | torch.device = "cpu", ema: bool = False
) -> nn.Module:
    """Rebuild a fine-tuned model from its checkpoint, in eval mode on ``map_location``.

    Reduced runs go through :func:`tokenreduce.load` (``model``: the dense model to reduce, default
    built from the recorded timm name); dense runs build ``timm.create_model(name, **kwargs)``.
    ``ema``: the EMA weights instead of the trained ones.
    """
    from ..checkpoint import load

    ck = read_checkpoint(path, map_location)
    if "dense" in ck:
        if model is None:
            import timm

            from . import teacher  # noqa: F401  (registers the digit ViTs)

            spec = ck["dense"]["model"]
            if not spec["name"]:
                raise ValueError(f"load_finetuned: {path} records no timm model name; pass model=")
            model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
        model = model.to(map_location)
        model.load_state_dict(ck["state_dict"])
    else:
        from . import teacher  # noqa: F401

        model = load(ck, model=model.to(map_location) if model is not None else None, map_location=map_location)
        model = model.to(map_location)
    if ema:
        sd = ck["extra"].get("ema_state_dict")
        if sd is None:
            raise ValueError(f"load_finetuned: {path} has no EMA weights (the run had no --model-ema)")
        model.load_state_dict(sd)
    return model.eval()

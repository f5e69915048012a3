"""Models by name for the command line and the benchmarks: timm names (tagged ones and ``hf-hub:``
included; ``pvt_*`` / ``cvt_*`` from :mod:`tokenreduce.backbones`), weights from a checkpoint.

    load_model("deit_small_patch16_224", img_size=64)           # random weights, eval mode
    load_model("deit_small_patch16_224.fb_in1k", pretrained=True)
    load_model("deit_small_patch16_224", checkpoint="deit_s.pth")   # dense timm weights
    load_model("deit_small_patch16_224", checkpoint="etps.pt")      # a tokenreduce.save file

A tokenreduce checkpoint (its dict has a ``"tokenreduce"`` key) holds a reduced model: it comes
back as ``Loaded.reduced`` (``tokenreduce.load``), and the dense model it was rebuilt on, with
the checkpoint's weights, as ``Loaded.dense``.
"""

from __future__ import annotations

import difflib
import os
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Loaded", "example_batch", "is_tokenreduce_checkpoint", "load_model", "native_img_size"]


class Loaded(NamedTuple):
    dense: nn.Module  # eval mode
    reduced: nn.Module | None  # set when the checkpoint was a tokenreduce one


def is_tokenreduce_checkpoint(path: str) -> bool:
    """The file at ``path`` is a ``tokenreduce.save`` checkpoint (its dict has a "tokenreduce" key)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no file {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(
            f"checkpoint: cannot read {path!r} with torch.load ({type(err).__name__}: {err}); "
            f"give a tokenreduce.save file or a timm/PyTorch state dict"
        ) from None
    return isinstance(obj, dict) and "tokenreduce" in obj


def _check_name(name: str) -> None:
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    source, rest = parse_model_name(name)
    if source is not None:  # hf-hub:ORG/NAME, local-dir:PATH: timm resolves it (may need the network)
        return
    arch, _ = split_model_name_tag(rest)
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; similar names: {', '.join(near)}" if near else "; `timm.list_models('*vit*')` lists them"
        raise ValueError(f"model: timm has no model {arch!r}{hint}")


def _create(name: str, pretrained: bool, img_size: int | None, **kwargs) -> nn.Module:
    import timm

    from tokenreduce import backbones  # noqa: F401  (registers pvt_* / cvt_* with timm)

    _check_name(name)
    size = {} if img_size is None else {"img_size": img_size}
    try:
        return timm.create_model(name, pretrained=pretrained, **size, **kwargs)
    except TypeError as err:  # a fully convolutional stem (CvT) takes any size and no img_size
        if "img_size" not in str(err) or not size:
            raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:  # downloads: no network, no such repo, no such tag
        if not pretrained and not name.startswith("hf-hub:"):
            raise
        why = " ".join(str(err).split())[:300]
        raise ValueError(
            f"model: timm could not fetch {name!r} ({type(err).__name__}: {why}); "
            f"check the name and the network, or give the architecture's timm name with the weights file "
            f"as --checkpoint PATH"
        ) from None


def native_img_size(name: str, default: int = 224) -> int:
    """The input size (pixels) timm's default config of ``name`` declares: 384 for
    ``deit_base_patch16_384``, 224 for ``pvt_tiny``; ``default`` when timm has no config for it."""
    from timm.models import get_pretrained_cfg, parse_model_name, split_model_name_tag

    from tokenreduce import backbones  # noqa: F401  (registers pvt_* / cvt_* with timm)

    source, rest = parse_model_name(name)
    if source is not None:
        return default
    cfg = get_pretrained_cfg(split_model_name_tag(rest)[0])
    size = getattr(cfg, "input_size", None)
    return int(size[-1]) if size else default


def _tokenreduce_load(path: str, dense: nn.Module | None) -> nn.Module:
    import tokenreduce

    return tokenreduce.load(path, model=dense).eval()


def load_model(
    name: str, *, pretrained: bool = False, checkpoint: str | None = None, img_size: int | None = None
) -> Loaded:
    """Build ``name`` with timm in eval mode; ``checkpoint``: a dense weights file (timm's
    ``load_checkpoint``) or a ``tokenreduce.save`` file (``tokenreduce.load``)."""
    if img_size is not None and img_size <= 0:
        raise ValueError(f"--img-size: must be a positive number of pixels, got {img_size}")
    if pretrained and checkpoint:
        raise ValueError("--pretrained and --checkpoint both give weights: pass one of them")
    if os.path.isfile(name):  # MODEL given as a tokenreduce checkpoint: it rebuilds its own model
        if checkpoint or pretrained or not is_tokenreduce_checkpoint(name):
            raise ValueError(
                f"model: {name!r} is a file; a file in place of MODEL must be a tokenreduce.save "
                f"checkpoint, with no --checkpoint / --pretrained (give a timm name for other weights)"
            )
        import tokenreduce

        cfg = tokenreduce.load_checkpoint(name)["tokenreduce"]["model"]
        kwargs = dict(cfg.get("kwargs", {}))
        dense = _create(cfg["name"], False, kwargs.pop("img_size", None), **kwargs)
        return Loaded(dense.eval(), _tokenreduce_load(name, dense))
    dense = _create(name, pretrained, img_size).eval()
    if checkpoint is None:
        return Loaded(dense, None)
    if is_tokenreduce_checkpoint(checkpoint):
        reduced = _tokenreduce_load(checkpoint, dense)  # its weights overwrite dense's
        return Loaded(dense.eval(), reduced)
    from timm.models import load_checkpoint

    try:
        load_checkpoint(dense, checkpoint, strict=True)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        raise ValueError(
            f"checkpoint: {checkpoint!r} does not fit {name}: {' '.join(str(err).split())[:400]}; "
            f"give the weights of this architecture (or a tokenreduce.save file)"
        ) from None
    return Loaded(dense.eval(), None)


def example_batch(img_size: int | None, batch: int = 2, device: str = "cpu") -> torch.Tensor | None:
    """``torch.randn(batch, 3, img_size, img_size)``, or None to let tokenreduce use timm's config."""
    return None if img_size is None else torch.randn(batch, 3, img_size, img_size, device=device)

"""Load the authors' released PVT v1 and CvT checkpoints into this package's module layout.

The two official layouts differ from ours only in names (tensor shapes are identical)::

    PVT v1 (github.com/whai362/PVT)        ours
    patch_embed{i}.proj.weight             stages.{i-1}.patch_embed.proj.weight
    pos_embed{i}                           stages.{i-1}.pos_embed
    block{i}.{j}.attn.sr.weight            stages.{i-1}.blocks.{j}.attn.sr.weight
    cls_token                              stages.{last}.cls_token
    norm.*, head.*                         norm.*, head.*

    CvT (github.com/microsoft/CvT)         ours
    stage{i}.patch_embed.proj.weight       stages.{i}.patch_embed.proj.weight
    stage{i}.blocks.{j}.attn.proj_q.weight stages.{i}.blocks.{j}.attn.proj_q.weight
    stage2.cls_token                       stages.2.cls_token
    norm.*, head.*                         norm.*, head.*

``checkpoint_filter_fn`` is the ``pretrained_filter_fn`` of every model in this package.
"""

import logging
import re
from typing import Dict, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

__all__ = ["checkpoint_filter_fn", "remap_pvt_official", "remap_cvt_official"]

_logger = logging.getLogger(__name__)

_PVT_STAGE_KEY = re.compile(r"^(patch_embed|pos_embed|block)(\d+)")
_CVT_STAGE_KEY = re.compile(r"^stage(\d+)\.")


def _unwrap(state_dict: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Strip training wrappers: a ``{'model': sd}`` / ``{'state_dict': sd}`` dict, ``module.``."""
    for wrapper in ("model", "state_dict"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def remap_pvt_official(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an official PVT v1 state dict (``block1.0.attn.q.weight``, ...) to ours.

    Stage numbers are 1-based there and 0-based here; the class token moves into the last stage.
    """
    last = max(int(m.group(2)) for m in map(_PVT_STAGE_KEY.match, state_dict) if m) - 1
    out = {}
    for k, v in state_dict.items():
        if k == "cls_token":
            k = f"stages.{last}.cls_token"
        elif m := _PVT_STAGE_KEY.match(k):
            name, stage = m.group(1), int(m.group(2)) - 1
            name = "blocks" if name == "block" else name
            k = f"stages.{stage}.{name}{k[m.end() :]}"
        out[k] = v
    return out


def remap_cvt_official(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an official CvT state dict (``stage0.blocks.0.attn.proj_q.weight``, ...) to ours."""
    return {_CVT_STAGE_KEY.sub(r"stages.\1.", k): v for k, v in state_dict.items()}


def _resample_pos_embeds(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Bilinearly resample ``*.pos_embed`` grids (assumed square) whose length differs from the
    model's; the owning stage gives ``grid_size`` and ``num_prefix_tokens``."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if not k.endswith("pos_embed") or k not in own or own[k].shape == v.shape:
            continue
        stage = model.get_submodule(k.rpartition(".")[0])
        prefix = stage.num_prefix_tokens
        old = int(round((v.shape[1] - prefix) ** 0.5))
        state_dict[k] = resample_abs_pos_embed(
            v,
            new_size=list(stage.grid_size),
            old_size=[old, old],
            num_prefix_tokens=prefix,
            interpolation="bilinear",
            antialias=False,
        )
        _logger.info("resampled %s from %s to %s", k, tuple(v.shape), tuple(state_dict[k].shape))
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, object], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official PVT v1 or CvT checkpoint (or one of ours) onto ``model``'s layout.

    The layout is recognised from the keys (``patch_embed1.*`` is PVT v1, ``stage0.*`` is CvT);
    a state dict already in our layout only has its wrappers stripped. Position embeddings are
    resampled to ``model``'s grid when the image size differs. The input is not modified.
    """
    state_dict = _unwrap(state_dict)
    if any(k.startswith("patch_embed1.") for k in state_dict):
        state_dict = remap_pvt_official(state_dict)
    elif any(k.startswith("stage0.") for k in state_dict):
        state_dict = remap_cvt_official(state_dict)
    return _resample_pos_embeds(state_dict, model)

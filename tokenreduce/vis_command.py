"""``tokenreduce vis MODEL IMAGE``: the picture of what each site kept, dropped and squeezed.

No torch at module level: ``add_parsers`` runs on every ``tokenreduce --help``.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_parsers", "cmd_vis"]


def add_parsers(sub) -> None:
    from .cli import add_model_arguments

    p = sub.add_parser(
        "vis",
        help="draw the dropped tokens and the squeeze groups of every site on an image",
        description="The image, then one panel per site: dropped tokens blanked, each squeeze group "
        "(a host and the tokens it absorbed) in its own colour.",
    )
    add_model_arguments(p)
    p.add_argument("image", metavar="IMAGE", help="an image file (preprocessed with the model's timm data config)")
    p.add_argument("--out", default="tokenreduce-vis.png", help="PNG to write (default tokenreduce-vis.png)")
    p.add_argument("--alpha", type=float, default=0.6, help="colour strength of a group, 0 to 1 (default 0.6)")
    p.set_defaults(func=cmd_vis)


def cmd_vis(args: argparse.Namespace) -> None:
    import torch

    import tokenreduce

    from .bench.models import example_batch, is_tokenreduce_checkpoint
    from .cli import load_from_args, parse_keep, parse_locs

    if not os.path.isfile(args.image):
        raise ValueError(f"IMAGE: no file {args.image!r}")
    loaded = load_from_args(args)
    if loaded.reduced is not None:  # a checkpoint: rebuild it with the host maps as outputs
        path = args.model if is_tokenreduce_checkpoint(args.model) else args.checkpoint
        reduced = tokenreduce.load(path, model=loaded.dense, aux=True)
    else:
        torch.manual_seed(0)
        reduced = tokenreduce.apply(
            loaded.dense,
            method=args.method,
            locs=parse_locs(args.locs),
            keep_ratio=parse_keep(args.keep_ratio),
            example_input=example_batch(args.img_size),
            aux=True,
        )
    tokenreduce.visualize(reduced, args.image, alpha=args.alpha).save(args.out)
    print(f"wrote {args.out}")

"""``tokenreduce vis MODEL IMAGE``: the picture of what each site kept, dropped and squeezed.

No torch at module level: ``add_parsers`` runs on every ``tokenreduce --help``.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_parsers", "cmd_vis"]


def add_parsers(sub) -> None:
    from .cli import add_model_command

    p = add_model_command(
        sub, "vis", cmd_vis, "draw the dropped tokens and the squeeze groups of every site on an image"
    )
    p.add_argument("image", metavar="IMAGE", help="an image file (preprocessed with the model's timm data config)")
    p.add_argument("--out", default="tokenreduce-vis.png", help="PNG to write (default tokenreduce-vis.png)")
    p.add_argument("--alpha", type=float, default=0.6, help="colour strength of a group, 0 to 1 (default 0.6)")


def cmd_vis(args: argparse.Namespace) -> None:
    """The image, then one panel per site: dropped tokens blanked, each squeeze group (a host and the
    tokens it absorbed) in its own colour."""
    import tokenreduce

    from .bench.models import is_tokenreduce_checkpoint
    from .cli import apply_from_args, load_from_args

    if not os.path.isfile(args.image):
        raise ValueError(f"IMAGE: no file {args.image!r}")
    loaded = load_from_args(args)
    if loaded.reduced is not None:  # a checkpoint: rebuild it with the host maps as outputs
        path = args.model if is_tokenreduce_checkpoint(args.model) else args.checkpoint
        reduced = tokenreduce.load(path, model=loaded.dense, aux=True)
    else:
        reduced = apply_from_args(args, loaded.dense, aux=True)
    tokenreduce.visualize(reduced, args.image, alpha=args.alpha).save(args.out)
    print(f"wrote {args.out}")

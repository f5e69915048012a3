"""The picture of a reduction: read the PNG back and count what it shows."""

import io

import numpy as np
import pytest
import timm
import torch

import tokenreduce
from tokenreduce.visualize import BLANK, group_colours, visualize

Image = pytest.importorskip("PIL.Image")


def _cells(panel, grid):
    """The colour at the centre of every patch cell of one panel (H, W, 3)."""
    gh, gw = grid
    ph, pw = panel.shape[0] // gh, panel.shape[1] // gw
    return [tuple(panel[r * ph + ph // 2, c * pw + pw // 2].tolist()) for r in range(gh) for c in range(gw)]


@pytest.mark.parametrize("method", ["etps", "dynamicvit", "evit"])
def test_the_png_shows_every_group_and_every_dropped_token(method):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    reduced = tokenreduce.apply(model, method=method, locs=[3, 6], keep_ratio=0.5, aux=True)
    x = torch.randn(1, 3, 64, 64)
    buf = io.BytesIO()
    visualize(reduced, x, alpha=1.0).save(buf, format="PNG")
    png = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    with torch.no_grad():
        _, aux = reduced(x)
    side = 256  # 64 px enlarged to at least 224: x4
    assert png.shape[1] == 3 * side + 2 * 4
    for s, hosts in enumerate(aux.hosts):
        panel = png[:, (s + 1) * (side + 4) : (s + 1) * (side + 4) + side]
        cells = _cells(panel, (4, 4))
        h = hosts[0]
        sizes = torch.bincount(h[h >= 0], minlength=16)
        groups = int((sizes > 1).sum())
        palette = set(group_colours(groups))
        shown = {c for c in cells if c in palette}
        assert len(shown) == groups
        assert sum(c == BLANK for c in cells) == int((h < 0).sum())
        if method == "etps":
            assert (h >= 0).all() and groups > 0
        else:
            assert groups == 0 and (h < 0).sum() > 0


def test_visualize_needs_the_aux_outputs():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    reduced = tokenreduce.apply(model, method="etps", locs=[3])
    with pytest.raises(tokenreduce.TokenReduceError, match="apply again with aux=True"):
        visualize(reduced, torch.randn(1, 3, 64, 64))

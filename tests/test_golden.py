"""Golden: eTPS on DeiT-T computed by hand from tps-reference.md, with no library op."""

import math

import timm
import torch


def _attention_and_cls_scores(attn, x):
    """timm Attention by hand: returns (output, class-token attention averaged over heads)."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)  # (B, H, N, N)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
    return out, probs[:, :, 0, 1:].mean(1)  # (B, N - 1)


def _squeeze_one_image(reserved, pruned):
    """Sec. 1 for one image, loop by loop."""
    out = reserved.clone()
    groups = {j: [(math.e, reserved[j])] for j in range(len(reserved))}
    for xp in pruned:
        cos = [float((xp / (xp.norm() + 1e-6)) @ (xr / (xr.norm() + 1e-6))) for xr in reserved]
        host = max(range(len(cos)), key=lambda j: (cos[j], -j))  # lowest index on ties
        groups[host].append((math.exp(cos[host]), xp))
    for j, members in groups.items():
        if len(members) > 1:
            total = sum(w for w, _ in members)
            out[j] = sum(w * t for w, t in members) / total
    return out


def _etps_by_hand(model, x, locs, rho):
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(len(t), -1, -1), t], 1) + model.pos_embed
    for i, blk in enumerate(model.blocks):
        a, scores = _attention_and_cls_scores(blk.attn, blk.norm1(t))
        t = t + a
        if i in locs:
            n = t.shape[1] - 1
            keep = math.ceil(rho * n)
            rows = []
            for b in range(len(t)):
                order = sorted(range(n), key=lambda j: -float(scores[b, j]))
                kept, pruned = sorted(order[:keep]), sorted(order[keep:])
                patches = t[b, 1:]
                rows.append(torch.cat([t[b, :1], _squeeze_one_image(patches[kept], patches[pruned])]))
            t = torch.stack(rows)
        t = t + blk.mlp(blk.norm2(t))
    return model.head(model.norm(t)[:, 0])


def test_etps_matches_a_hand_computation():
    import tokenreduce

    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(model, method="etps", locs=[2, 5], keep_ratio=0.6, example_input=x).eval()
    with torch.no_grad():
        expected = _etps_by_hand(model, x, {2, 5}, 0.6)
        got = reduced(x)
        dense = model(x)
    assert not torch.allclose(dense, expected, atol=1e-3)  # the reduction does change the output
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)

"""Attention after the last block that reads the tokens as keys: CaiT's class attention (the
class token, put in front of the stream, attends to the patches). It is not a block, but in the
training form of learned scorers (full length, dropped tokens masked as keys) it must not see
dropped tokens either, since in inference those tokens are gone. Oracle: the model's own layers
in float64 with every softmax over keys, from the site on, replaced by the authors' policy
softmax."""

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce import ops


def _cait():
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", img_size=64, depth=4, depth_token_only=2, num_classes=0)
    for m in model.modules():  # O(1) weights: timm's init keeps random blocks near the identity
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("gamma"):  # layer scale
            torch.nn.init.ones_(p)
    return model.eval().double()


def test_class_attention_is_found():
    model = _cait()
    mm = tokenreduce.inspect(model, example_input=torch.randn(2, 3, 64, 64, dtype=torch.float64))
    # sdpa, or an explicit softmax with TIMM_FUSED_ATTN=0
    assert len(mm.blocks) == 4 and len(mm.key_readers) == 2
    assert all(r.kind in ("sdpa", "softmax") for r in mm.key_readers)
    plain = tokenreduce.inspect(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2))
    assert plain.key_readers == ()  # a plain ViT has none
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, global_pool="map", class_token=False)
    assert tokenreduce.inspect(pooled).key_readers == ()  # a pooling head's learned query is not a token


@pytest.mark.parametrize("locs", [[1], [1, 3]])
def test_training_form_masks_class_attention(monkeypatch, locs):
    model = _cait()
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(model, method="dynamicvit", locs=locs, keep_ratio=0.5, example_input=img).train()
    g = torch.Generator().manual_seed(5)
    masks = [(torch.rand(2, 16, 1, generator=g) > 0.4).double() for _ in locs]
    masks = [masks[0]] + [masks[0] * m for m in masks[1:]]  # cumulative, as the sites make them
    calls = iter(masks)
    monkeypatch.setattr(ops, "gumbel_keep", lambda log_probs, tau=1.0: next(calls))
    with torch.no_grad():
        out = reduced(img)
    policy = [None]  # the current keep mask (B, n), None before the first site
    soft, sdpa = torch.Tensor.softmax, F.scaled_dot_product_attention

    def full(keys):  # (B, keys): prefix keys (the class token in front) always alive
        return torch.cat([policy[0].new_ones(2, keys - policy[0].shape[1]), policy[0]], dim=1)

    def softmax(t, dim=-1, **kw):
        if policy[0] is not None and t.dim() == 4 and dim in (-1, 3):
            return ops.policy_softmax(t, full(t.shape[-1]))
        return soft(t, dim=dim, **kw)

    def attention(q, k, v, **kw):
        if policy[0] is None:
            return sdpa(q, k, v, **kw)
        return ops.policy_softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), full(k.shape[-2])) @ v

    monkeypatch.setattr(torch.Tensor, "softmax", softmax)
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    with torch.no_grad():
        x = model.pos_drop(model.patch_embed(img) + model.pos_embed)
        for i, blk in enumerate(model.blocks):
            if i in locs:
                policy[0] = masks[locs.index(i)][..., 0]
            x = blk(x)
        cls = model.cls_token.expand(2, -1, -1)
        for blk in model.blocks_token_only:
            cls = blk(x, cls)
        want = model.forward_head(model.norm(torch.cat([cls, x], dim=1)))
        policy[0] = None
        unmasked = model(img)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    assert (out - unmasked).abs().max() > 1e-4  # the policy mattered


def test_dtps_trains_through_class_attention():
    """dTPS's training form (the squeeze too): finite loss, gradients reach the score heads and
    the class attention's projections."""
    model = _cait().float()
    reduced = tokenreduce.apply(model, method="dtps", locs=[1, 3], keep_ratio=0.5).train()
    out = reduced(torch.randn(2, 3, 64, 64))
    (out * torch.randn_like(out)).sum().backward()
    grads = {n: p.grad for n, p in reduced.named_parameters() if n.startswith("reduce_sites")}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    k = dict(reduced.named_parameters())["blocks_token_only.0.attn.k.weight"]
    assert k.grad is not None and k.grad.abs().sum() > 0


def test_leading_query_rule():
    """A class token put at the end of the keys (query = last token) is not a key reader: the
    policy's prefix keys go in front."""
    from tokenreduce.analysis import analyze
    from tokenreduce.capture import capture

    class Tail(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = timm.create_model(
                "deit_tiny_patch16_224", img_size=64, depth=2, class_token=False, global_pool="avg", num_classes=0
            )
            self.cls = torch.nn.Parameter(torch.zeros(1, 1, 192))
            self.q, self.k = torch.nn.Linear(192, 192), torch.nn.Linear(192, 192)

        def forward(self, x):
            x = self.vit.forward_features(x)
            u = torch.cat([x, self.cls.expand(x.shape[0], -1, -1)], dim=1)
            q = self.q(u[:, -1:]).reshape(x.shape[0], 1, 3, 64).transpose(1, 2)
            k = self.k(u).reshape(x.shape[0], -1, 3, 64).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, k)[:, :, 0].flatten(1)

    img = torch.randn(2, 3, 64, 64)
    gm = capture(Tail().eval(), img)
    assert analyze(gm, tuple(img.shape), "Tail").key_readers == ()

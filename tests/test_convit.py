"""ConViT's gated positional self-attention (GPSA), traced through: its blocks are reduced, and
its positional attention follows the tokens. GPSA mixes ``sigmoid(g) * softmax(pos_proj(r))``,
``r`` the (1, N, N, 3) relative offsets of every pair of patches, into the patch attention and
renormalises. After a site it must read the kept tokens' offsets, so that its softmax runs over
the kept keys. Oracles: the model's own blocks, one image at a time in float64, on the kept
tokens with ``rel_indices`` indexed by hand; in training, the same blocks with every softmax
over keys replaced by the authors' policy softmax."""

import pytest
import timm
import torch
from counting_compile import counting_compile

import tokenreduce
from tokenreduce import ops

L = 2  # blocks 0, 1: GPSA over 16 patches; then the class token is inserted; blocks 2, 3: plain attention


def _model():
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", img_size=64, depth=4, local_up_to_layer=L, num_classes=0)
    for m in model.modules():  # O(1) weights: timm's init keeps random blocks near the identity
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    return model.eval().double()


def _hand(model, img, keeps, sites, offsets=None):
    """Per image: the stem, then at each site block keep the rows the site kept (``aux.keeps``) and
    run the model's blocks on them, GPSA with ``offsets(full, cur)`` (default: the kept tokens'
    rows and columns of the full relative offsets)."""
    offsets = offsets or (lambda full, cur: full[:, cur][:, :, cur])
    x = model.pos_drop(model.patch_embed(img) + model.pos_embed)
    full = model.blocks[0].attn.get_rel_indices(x.shape[1]).double()  # (1, 16, 16, 3)
    outs = []
    for b in range(img.shape[0]):
        xb, cur = x[b : b + 1], list(range(x.shape[1]))
        for i, blk in enumerate(model.blocks):
            if i == L:
                xb = torch.cat([model.cls_token, xb], dim=1)
            P = int(i >= L)
            if i in sites:
                alive = keeps[sites.index(i)][b].nonzero()[:, 0].tolist()
                rows, cur = [j for j, p in enumerate(cur) if p in alive], [p for p in cur if p in alive]
                xb = torch.cat([xb[:, :P], xb[:, P:][:, rows]], dim=1)
            if i < L:
                blk.attn.rel_indices = offsets(full, cur)  # GPSA rebuilds it only for another length
            xb = blk(xb)
        outs.append(model.forward_head(model.norm(xb)))
    for blk in model.blocks[:L]:
        blk.attn.rel_indices = full
    return torch.cat(outs)


def test_every_block_and_the_positional_logits_are_found():
    model = _model()
    mm = tokenreduce.inspect(model, example_input=torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert [(b.path, b.stage, b.num_prefix) for b in mm.blocks] == [
        ("blocks.0", 0, 0),
        ("blocks.1", 0, 0),
        ("blocks.2", 1, 1),
        ("blocks.3", 1, 1),
    ]
    assert not mm.notes  # no opaque attention left
    assert [(p.block, p.axes, p.rank, p.with_prefix) for p in mm.positions] == [
        (0, (2, 3), 4, False),
        (1, (2, 3), 4, False),
    ]
    assert model.blocks[0].attn.rel_indices.shape == (1, 1, 1, 3)  # the user's model was not run


@pytest.mark.parametrize("locs", [[1], [0, 1], [2, 3]], ids=["gpsa", "gpsa-twice", "after-cls"])
def test_reduced_equals_hand_indexed_offsets(locs):
    model = _model()
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(
        model, method="dynamicvit", locs=locs, keep_ratio=0.5, example_input=img, aux=True
    ).eval()
    with torch.no_grad():
        out, aux = reduced(img)
        want = _hand(model, img, aux.keeps, locs)
        dense = model(img)
    assert aux.keeps[-1].sum(1).tolist() == [16 * 0.5 ** len(locs)] * 2
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    assert (out - dense).abs().max() > 1e-2 * dense.abs().max()  # the reduction changed the result
    one = tokenreduce.apply(model, method="dtps", locs=locs, keep_ratio=1.0, example_input=img).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(img), dense, rtol=0, atol=0)  # keep 1: the model itself


def test_unindexed_offsets_would_differ():
    """The oracle can fail: the first k rows of the offsets instead of the kept ones give another result."""
    model = _model()
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(
        model, method="dynamicvit", locs=[1], keep_ratio=0.5, example_input=img, aux=True
    ).eval()
    with torch.no_grad():
        out, aux = reduced(img)
        first = _hand(model, img, aux.keeps, [1], lambda full, cur: full[:, : len(cur), : len(cur)])
    assert (out - first).abs().max() > 1e-4


def test_training_form_masks_patch_and_positional_attention(monkeypatch):
    """Full length in training: from the site on, every softmax over keys (GPSA's patch and
    positional ones, then the plain attention after the class token) is the policy softmax."""
    model = _model()
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(model, method="dynamicvit", locs=[1], keep_ratio=0.5, example_input=img).train()
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(2, 16, 1, generator=g) > 0.5).double()
    monkeypatch.setattr(ops, "gumbel_keep", lambda log_probs, tau=1.0: keep)
    with torch.no_grad():
        out = reduced(img)
    soft = torch.Tensor.softmax
    policy = keep[..., 0]

    def policy_softmax(t, dim=-1, **kw):
        if t.dim() == 4 and dim in (-1, 3) and t.shape[-1] == t.shape[-2]:
            P = t.shape[-1] - policy.shape[1]
            return ops.policy_softmax(t, torch.cat([policy.new_ones(2, P), policy], dim=1))
        return soft(t, dim=dim, **kw)

    with torch.no_grad():
        x = model.pos_drop(model.patch_embed(img) + model.pos_embed)
        x = model.blocks[0](x)
        monkeypatch.setattr(torch.Tensor, "softmax", policy_softmax)
        x = model.blocks[1](x)
        x = torch.cat([model.cls_token.expand(2, -1, -1), x], dim=1)
        for blk in model.blocks[L:]:
            x = blk(x)
        monkeypatch.setattr(torch.Tensor, "softmax", soft)
        want = model.forward_head(model.norm(x))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        unmasked = model(img)
    assert (out - unmasked).abs().max() > 1e-4  # the policy mattered


def test_sites_on_both_sides_of_the_class_token_are_refused():
    model = _model()
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(tokenreduce.TokenReduceError, match=r"stage 1 of ConVit \(from 'blocks\.2'\) continues"):
        tokenreduce.apply(model, method="dtps", locs=[1, 2], example_input=img)


def test_opaque_when_tracing_through_fails(monkeypatch):
    """GPSA traced through is an improvement, never a new failure: if that trace fails, GPSA
    stays opaque and the plain blocks are still reduced."""
    from tokenreduce import _value_tracer

    def fail(self, *args, **kwargs):
        raise RuntimeError("no")

    monkeypatch.setattr(_value_tracer.ValueTracer, "trace", fail)
    mm = tokenreduce.inspect(_model(), example_input=torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert [b.path for b in mm.blocks] == ["blocks.2", "blocks.3"]
    assert any("GPSA" in note and "opaque" in note for note in mm.notes)


def test_opaque_when_the_traced_graph_differs(monkeypatch):
    """A graph traced through that does not reproduce the model's own output bit for bit is not used."""
    from tokenreduce import capture

    monkeypatch.setattr(capture, "_same", lambda got, expected: False)
    mm = tokenreduce.inspect(_model(), example_input=torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert [b.path for b in mm.blocks] == ["blocks.2", "blocks.3"]


def test_tracing_through_restores_module_modes():
    from tokenreduce.capture import capture

    model = _model().train()
    model.blocks[1].eval()  # a mixed state, as after freezing part of a model
    capture(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert not model.blocks[1].attn.training


@pytest.mark.parametrize("method,locs", [("dtps", [0, 1]), ("etps", [3])])
def test_compiles_fullgraph(method, locs):
    model = _model().float()
    x = torch.randn(2, 3, 64, 64)
    reduced = tokenreduce.apply(model, method=method, locs=locs, keep_ratio=0.5, example_input=x).eval()
    compiled, graphs = counting_compile(reduced)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1

"""Position-indexed tensors follow the tokens: rotary tables (timm's RoPE ViT,
EVA-02) and relative position bias (BEiT, vit_relpos) are indexed by the kept tokens' original
positions after a site. Oracles: the model's own blocks run, one image at a time in float64, on
the kept tokens with the tables indexed by hand."""

import pytest
import timm
import torch
from counting_compile import counting_compile

import tokenreduce
from tokenreduce.runtime.positions import follow_positions
from tokenreduce.runtime.state import TokenState

SMALL = dict(img_size=64, depth=4, embed_dim=64, num_heads=2, num_classes=0)  # pooled features: O(1) outputs


def _model(name, **kw):
    """A small member with O(1) weights (timm's init leaves random blocks near the identity, where
    a wrong table would hardly show)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kw}).eval().double()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    for name_, p in model.named_parameters():
        if "relative_position_bias_table" in name_:
            torch.nn.init.normal_(p, std=1.0)
        if name_.rsplit(".", 1)[-1].startswith("gamma"):  # layer scale
            torch.nn.init.ones_(p)
    return model


def _kept_rows(keeps, b, cur):
    """Rows of the current tokens (original positions ``cur``) alive after a site."""
    alive = keeps[b].nonzero()[:, 0].tolist()
    return [i for i, p in enumerate(cur) if p in alive], [p for p in cur if p in alive]


def _hand(model, img, keeps, site_blocks, run_block):
    """Dense stem, then per image: at each site block keep the rows the site kept (read from
    ``aux.keeps``), run the model's blocks on them with ``run_block(blk, x, pos)``."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img))[0]) if hasattr(model, "rope") else None
    if x is None:
        x = model.pos_drop(torch.cat([model.cls_token.expand(img.shape[0], -1, -1), model.patch_embed(img)], 1))
    P = model.num_prefix_tokens
    outs = []
    for b in range(img.shape[0]):
        xb, cur = x[b : b + 1], list(range(x.shape[1] - P))
        for i, blk in enumerate(model.blocks):
            if i in site_blocks:
                rows, cur = _kept_rows(keeps[site_blocks.index(i)], b, cur)
                xb = torch.cat([xb[:, :P], xb[:, P:][:, rows]], dim=1)
            xb = run_block(blk, xb, cur)
        outs.append(model.forward_head(model.norm(xb)))
    return torch.cat(outs)


def _rope_block(model):
    rope = model.rope.get_embed()  # (n, D): patch rows only; timm rotates q[:, :, P:]

    def run(blk, x, pos):
        return blk(x, rope=rope[pos])

    return run


def _bias_block(blk, x, pos):
    attn = blk.attn
    full = attn._get_rel_pos_bias()  # (1, H, P + n, P + n), prefix rows first
    P = x.shape[1] - len(pos)
    idx = list(range(P)) + [P + p for p in pos]
    original = attn._get_rel_pos_bias
    attn._get_rel_pos_bias = lambda: full[:, :, idx][:, :, :, idx]
    try:
        return blk(x)
    finally:
        attn._get_rel_pos_bias = original


@pytest.mark.parametrize(
    "name,run",
    [
        ("vit_small_patch16_rope_224", _rope_block),
        ("beit_base_patch16_224", lambda model: _bias_block),
    ],
)
@pytest.mark.parametrize("locs", [[1], [1, 2]])
def test_reduced_equals_hand_indexed_tables(name, run, locs):
    model = _model(name)
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(
        model, method="dynamicvit", locs=locs, keep_ratio=0.5, example_input=img, aux=True
    ).eval()
    with torch.no_grad():
        out, aux = reduced(img)
        want = _hand(model, img, aux.keeps, locs, run(model))
        dense = model(img)
    assert aux.keeps[-1].sum(1).tolist() == [16 * 0.5 ** len(locs)] * 2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-2 * dense.abs().max()  # the reduction changed the result


def test_unindexed_tables_would_differ():
    """The oracle can fail: the first k rotary rows instead of the kept ones give another result."""
    model = _model("vit_small_patch16_rope_224")
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(
        model, method="dynamicvit", locs=[1], keep_ratio=0.5, example_input=img, aux=True
    ).eval()
    rope = model.rope.get_embed()
    with torch.no_grad():
        out, aux = reduced(img)
        wrong = _hand(model, img, aux.keeps, [1], lambda blk, x, pos: blk(x, rope=rope[: len(pos)]))
    assert (out - wrong).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["etps", "evit"])
def test_squeeze_and_fuse_on_relative_bias(method):
    model = _model("beit_base_patch16_224")
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for keep in (1.0, 0.5):
        reduced = tokenreduce.apply(model, method=method, locs=[1], keep_ratio=keep, example_input=img).eval()
        with torch.no_grad():
            out = reduced(img)
        assert out.shape == (2, 64) and torch.isfinite(out).all()
        if keep == 1.0:
            torch.testing.assert_close(out, model(img), rtol=0, atol=1e-12)  # float64: the traced graph


def test_evit_fused_token_is_not_rotated():
    """EViT's fused token has no position: its rotary rows are cos 1, sin 0 (no rotation)."""
    model = _model("vit_small_patch16_rope_224")
    uses = tokenreduce.inspect(model).positions
    for block in range(4):  # q and k: x * cos (fill 1) + rot(x) * sin (fill 0)
        assert sorted(p.fill for p in uses if p.block == block) == [0.0, 0.0, 1.0, 1.0]
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    reduced = tokenreduce.apply(model, method="evit", locs=[1], keep_ratio=0.5, example_input=img).eval()
    calls = [n for n in reduced.graph.nodes if n.target is follow_positions]
    assert calls and all(n.args[6] is True for n in calls)  # appended: the fill rows are used
    rope = model.rope.get_embed()  # (n, 2d): sin | cos
    sin, cos = rope.tensor_split(2, -1)
    pos = torch.tensor([[0, 3, 5, 16]])  # 16 = n_ref: the fused token
    state = TokenState(pos=pos, keep=None, n_ref=16)
    got_cos = follow_positions(cos, state, (2,), 4, 1, False, True, 1.0)[0, 0]  # (4, d)
    got_sin = follow_positions(sin, state, (2,), 4, 1, False, True, 0.0)[0, 0]
    torch.testing.assert_close(got_cos[:3], cos[[0, 3, 5]])
    assert torch.equal(got_cos[3], torch.ones_like(cos[0])) and torch.equal(got_sin[3], torch.zeros_like(sin[0]))
    with torch.no_grad():
        out = reduced(img)
        same = tokenreduce.apply(model, method="evit", locs=[1], keep_ratio=1.0, example_input=img).eval()(img)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(same, model(img), rtol=0, atol=1e-12)


def test_analysis_finds_the_tables():
    rope = tokenreduce.inspect(_model("vit_small_patch16_rope_224")).positions
    assert {p.block for p in rope} == {0, 1, 2, 3}
    assert all(p.axes == (2,) and not p.with_prefix and not p.additive for p in rope)  # q[:, :, 1:] * table
    bias = tokenreduce.inspect(_model("beit_base_patch16_224")).positions
    assert [p.block for p in bias] == [0, 1, 2, 3]
    assert all(
        p.axes == (2, 3) and p.with_prefix and p.additive and p.where == "attn_mask" and p.fill is None for p in bias
    )
    assert tokenreduce.inspect(_model("deit_small_patch16_224")).positions == ()


def _loop_reference(table, pos, axes, rank, P, with_prefix, appended):
    """Unbatched loops over the token axes of a right-aligned table."""
    t = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape)).double()
    outs = []
    for b in range(pos.shape[0]):
        idx = ([*range(P)] + [P + int(p) for p in pos[b]]) if with_prefix else [int(p) for p in pos[b]]
        tb = t[0]
        for a in axes:
            L = tb.shape[a - 1]
            rows = []
            for i in idx:
                if i < L:
                    rows.append(tb.select(a - 1, i))
                else:
                    assert appended
                    rows.append(tb.narrow(a - 1, 0, L).mean(a - 1))
            tb = torch.stack(rows, dim=a - 1)
        outs.append(tb)
    return torch.stack(outs)


@pytest.mark.parametrize(
    "axes,shape,rank,with_prefix",
    [
        ((2,), (6, 5), 4, False),  # rotary (n, d) against q (B, H, n, d)
        ((2, 3), (1, 3, 7, 7), 4, True),  # bias (1, H, P + n, P + n) against logits
        ((1,), (6, 4), 3, False),  # a (B, n, C) operand
    ],
)
@pytest.mark.parametrize("appended", [False, True])
def test_follow_positions_against_loops(axes, shape, rank, with_prefix, appended):
    """Mean rule for an appended token (the default fill)."""
    torch.manual_seed(1)
    n = 6
    table = torch.randn(shape, dtype=torch.float64)
    pos = torch.stack([torch.randperm(n)[:3].sort().values for _ in range(2)])  # (2, 3)
    if appended:
        pos = torch.cat([pos, pos.new_full((2, 1), n)], dim=1)
    state = TokenState(pos=pos, keep=None, n_ref=n)
    got = follow_positions(table, state, axes, rank, 1, with_prefix, appended)
    torch.testing.assert_close(got, _loop_reference(table, pos, axes, rank, 1, with_prefix, appended))


def test_follow_positions_identity_when_nothing_removed():
    table = torch.randn(6, 5)
    state = TokenState(pos=torch.arange(6).expand(2, 6), keep=None, n_ref=6)
    assert follow_positions(table, state, (2,), 4, 1, False, False) is table


@pytest.mark.parametrize(
    "name,kw,method",
    [
        ("vit_small_patch16_rope_224", {}, "etps"),
        ("beit_base_patch16_224", {}, "evit"),
        ("eva02_tiny_patch14_224", dict(img_size=56), "dtps"),
    ],
)
def test_compiles_fullgraph(name, kw, method):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kw}).eval()
    size = kw.get("img_size", 64)
    x = torch.randn(2, 3, size, size)
    reduced = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=0.5, example_input=x).eval()
    compiled, graphs = counting_compile(reduced)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1


def test_dtps_trains_on_relative_bias():
    """Training form: full length, the bias added to the logits before the policy softmax; finite,
    non-zero gradients reach the score head."""
    model = _model("beit_base_patch16_224").float()
    reduced = tokenreduce.apply(model, method="dtps", locs=[1], keep_ratio=0.5).train()
    out = reduced(torch.randn(2, 3, 64, 64))
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of normed features has no gradient
    head = [p.grad for n, p in reduced.named_parameters() if n.startswith("reduce_sites")]
    assert head and all(g is not None and torch.isfinite(g).all() for g in head)
    assert any(g.abs().sum() > 0 for g in head)


def test_attend_adds_the_bias_before_the_policy_softmax():
    from tokenreduce import ops
    from tokenreduce.runtime.attention import attend

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)[..., None]
    state = TokenState(pos=torch.arange(4).expand(2, 4), keep=keep, n_ref=4)
    got = attend(q, k, v, state, 1, attn_mask=bias)
    policy = torch.cat([torch.ones(2, 1, dtype=torch.float64), keep[..., 0]], 1)
    want = ops.policy_softmax(q @ k.transpose(-2, -1) * 0.5 + bias, policy) @ v
    torch.testing.assert_close(got, want)
    ones = TokenState(pos=state.pos, keep=torch.ones_like(keep), n_ref=4)  # all alive: plain sdpa (to eps)
    torch.testing.assert_close(
        attend(q, k, v, ones, 1, attn_mask=bias),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        rtol=1e-5,
        atol=1e-5,
    )


def test_standalone_pass_needs_the_sites():
    from tokenreduce.analysis import analyze
    from tokenreduce.capture import capture
    from tokenreduce.passes.positions import gather_positions

    model = _model("vit_small_patch16_rope_224")
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    gm = capture(model, img)
    model_map = analyze(gm, tuple(img.shape), "Eva")
    with pytest.raises(tokenreduce.TokenReduceError, match="pass gather_positions expects insert_sites to have run"):
        gather_positions(gm, model_map)

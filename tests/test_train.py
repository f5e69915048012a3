"""Train mode: dTPS masks, gradients through them, aux decisions, and the inference graph."""

import timm
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import tokenreduce


def test_gradients_reach_the_score_heads_through_the_masks():
    model = timm.create_model("deit_tiny_patch16_224", img_size=96)
    reduced = tokenreduce.apply(model, method="dtps", aux=True).train()
    out, keeps = reduced(torch.randn(4, 3, 96, 96))
    assert out.shape == (4, 1000) and len(keeps) == 3
    for k in keeps:
        assert k.shape == (4, 36) and set(k.unique().tolist()) <= {0.0, 1.0}
    assert all((a >= b).all() for a, b in zip(keeps, keeps[1:]))  # cumulative: never revived
    (out.logsumexp(-1).mean() + sum(k.mean() for k in keeps)).backward()
    heads = {n: p.grad for n, p in reduced.named_parameters() if n.startswith("reduce_sites")}
    assert heads and all(g is not None and g.abs().sum() > 0 for g in heads.values())


def test_train_mode_keeps_full_length_and_masks_attention_keys():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64)
    reduced = tokenreduce.apply(model, method="dynamicvit", keep_ratio=0.5).train()
    s = [n for n in reduced.graph.nodes if n.op == "call_function" and n.target.__name__ == "attend"]
    assert len(s) == 12 - 3  # blocks 3..11 read a keep policy: from the first site on
    x = torch.randn(2, 3, 64, 64)
    tokens = []
    hook = reduced.get_submodule("blocks.11.mlp.fc1").register_forward_hook(lambda m, i, o: tokens.append(i[0].shape[1]))
    reduced(x)
    reduced.eval()
    with torch.no_grad():
        reduced(x)
    hook.remove()
    assert tokens == [17, 1 + int(round(16 * 0.125, 6))]  # train: full length; eval: 2 of 16 kept


def test_aux_keep_ratios_learn_the_cumulative_targets():
    """With the ratio loss alone, the straight-through masks train the heads to the schedule."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=96)
    reduced = tokenreduce.apply(model, method="dtps", keep_ratio=0.7, aux=True).train()
    heads = [p for n, p in reduced.named_parameters() if n.startswith("reduce_sites")]
    for p in reduced.parameters():
        p.requires_grad_(False)
    for p in heads:
        p.requires_grad_(True)
    opt = torch.optim.Adam(heads, lr=3e-3)
    targets = torch.tensor([0.7, 0.49, 0.343])
    x = torch.randn(16, 3, 96, 96)
    for _ in range(60):
        _, keeps = reduced(x)
        ratios = torch.stack([k.mean(1) for k in keeps])  # (sites, B)
        loss = ((ratios - targets[:, None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        means = torch.stack([torch.stack([k.mean() for k in reduced(x)[1]]) for _ in range(8)]).mean(0)
    torch.testing.assert_close(means, targets, atol=0.06, rtol=0)


_DYNAMIC_SHAPE_OPS = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")


def _dynamic_shape_ops(traced):
    """Nodes whose output shape depends on data: nonzero-like ops and boolean-mask indexing."""
    found = []
    for n in traced.graph.nodes:
        inputs = []
        torch.fx.node.map_arg(n.args, inputs.append)
        if str(n.target).startswith(_DYNAMIC_SHAPE_OPS) or (
            str(n.target).startswith("aten.index") and any(a.meta["val"].dtype == torch.bool for a in inputs)
        ):
            found.append(n)
    return found


def test_the_dynamic_shape_check_can_fail():
    traced = make_fx(lambda x: x[x > 0].sum() + x.nonzero().shape[0])(torch.randn(5))
    assert len(_dynamic_shape_ops(traced)) == 2


def _square_softmaxes(gm, x):
    """aten-level trace: the (B, H, N, N) attention matrices it materialises, and the fused calls.
    Also checks that no op with a data-dependent output shape appears (static token counts)."""
    traced = make_fx(gm)(x)
    assert _dynamic_shape_ops(traced) == []
    found = []
    for n in traced.graph.nodes:
        val = n.meta.get("val")
        if n.op == "call_function" and isinstance(val, torch.Tensor) and val.dim() == 4:
            if val.shape[-1] == val.shape[-2] > 1 and n.target is torch.ops.aten.exp.default:
                found.append(n)
    return found, [n for n in traced.graph.nodes if "scaled_dot_product" in str(n.target)]


def test_inference_graph_keeps_the_fused_attention():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    for method in ("etps", "evit", "dtps", "dynamicvit"):
        reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5).eval()
        with torch.no_grad():
            square, fused = _square_softmaxes(reduced, x)
        assert square == [], method
        assert len(fused) == 12, method
    # the check can fail: in train mode dTPS masks attention by hand
    reduced = tokenreduce.apply(model, method="dtps", keep_ratio=0.5).train()
    square, _ = _square_softmaxes(reduced, x)
    assert len(square) == 9

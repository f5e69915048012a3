"""Train mode: dTPS masks, gradients through them, aux decisions, and the inference graph."""

import dataclasses

import timm
import torch
from oracle_train import oracle_squeeze_masked
from torch.fx.experimental.proxy_tensor import make_fx

import tokenreduce
from tokenreduce.ops.squeeze import SELF_WEIGHT, cosine


def test_gradients_reach_the_score_heads_through_the_masks():
    model = timm.create_model("deit_tiny_patch16_224", img_size=96)
    reduced = tokenreduce.apply(model, method="dtps", aux=True).train()
    out, aux = reduced(torch.randn(4, 3, 96, 96))
    keeps = aux.keeps
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
    hook = reduced.get_submodule("blocks.11.mlp.fc1").register_forward_hook(
        lambda m, i, o: tokens.append(i[0].shape[1])
    )
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
        keeps = reduced(x)[1].keeps
        ratios = torch.stack([k.mean(1) for k in keeps])  # (sites, B)
        loss = ((ratios - targets[:, None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        means = torch.stack([torch.stack([k.mean() for k in reduced(x)[1].keeps]) for _ in range(8)]).mean(0)
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


# --- the training-form squeeze's gradient, through a whole model ---------------------------


def _previous_squeeze_masked(x, keep, pruned_now):
    """The earlier training form (kept here to show the test below can fail): a token may
    host itself, weights exp(c) * pruned_now, and the fused update mixed in as ``x + keep * u``."""
    B, n, C = x.shape
    cos = cosine(x, x)
    host = cos.masked_fill(keep.transpose(1, 2) <= 0.5, float("-inf")).argmax(dim=-1)  # (B, n)
    weight = cos.gather(-1, host.unsqueeze(-1)).exp() * pruned_now  # (B, n, 1)
    flat = (host + torch.arange(B).unsqueeze(-1) * n).reshape(-1)
    x_host = x.gather(1, host.unsqueeze(-1).expand(-1, -1, C))
    delta = x.new_zeros(B * n, C).index_add(0, flat, (weight * (x - x_host)).reshape(B * n, C))
    den = x.new_full((B * n, 1), SELF_WEIGHT).index_add(0, flat, weight.reshape(B * n, 1))
    return x + keep * (delta / den).reshape(B, n, C)


def _register_dtps_with(name, masked):
    """Register dTPS with ``masked`` as its squeeze's training form; returns the cleanup."""
    dtps = tokenreduce.get_method("dtps")
    reducer = tokenreduce.register_reducer(dataclasses.replace(dtps.reducer, name=name, masked=masked))
    tokenreduce.register_method(name, scorer=dtps.scorer, reducer=reducer, placement=dtps.placement, counts=dtps.counts)
    return lambda: (tokenreduce.unregister_method(name), tokenreduce.unregister_reducer(name))


def _train_grads(reduced, x, seed):
    """Logits and every parameter's gradient of one train-mode step, the Gumbel noise from ``seed``."""
    torch.manual_seed(seed)
    out, aux = reduced(x)
    keeps = aux.keeps
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + 2 * sum((k.mean(1) - 0.5).square().mean() for k in keeps)
    reduced.zero_grad(set_to_none=True)
    loss.backward()
    return out.detach(), {n: p.grad for n, p in reduced.named_parameters() if p.grad is not None}


def test_score_head_gradients_equal_the_authors_training_squeeze():
    """Same weights, same Gumbel noise: a train-mode dTPS ViT (float64) gives the same logits and
    the same gradients, score heads included, as with the oracle's squeeze substituted; the
    previous training form gives the same logits but other score-head gradients."""
    model = timm.create_model(
        "deit_tiny_patch16_224", img_size=64, depth=4, embed_dim=48, num_heads=3, num_classes=10
    ).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours = tokenreduce.apply(model, method="dtps", locs=[1, 2], keep_ratio=0.6, aux=True, example_input=x).train()
    results = {}
    for name, masked in (("dtps_oracle", oracle_squeeze_masked), ("dtps_previous", _previous_squeeze_masked)):
        cleanup = _register_dtps_with(name, masked)
        try:
            other = tokenreduce.apply(
                model, method=name, locs=[1, 2], keep_ratio=0.6, aux=True, example_input=x
            ).train()
            other.load_state_dict(ours.state_dict())
            results[name] = _train_grads(other, x, seed=3)
        finally:
            cleanup()
    out, grads = _train_grads(ours, x, seed=3)
    heads = [n for n in grads if "reduce_sites" in n]
    assert heads and all(grads[n].abs().sum() > 0 for n in heads)

    ref_out, ref_grads = results["dtps_oracle"]
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(
            grads[n],
            ref_grads[n],
            rtol=1e-6,
            atol=1e-6 * float(ref_grads[n].abs().max()),
            msg=lambda m, n=n: f"{n}: {m}",
        )

    old_out, old_grads = results["dtps_previous"]
    torch.testing.assert_close(old_out, ref_out, rtol=1e-9, atol=1e-12)  # same forward
    rel = [float((old_grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in heads]
    assert max(rel) > 0.1, rel

"""The reduced model as a finished artefact: timm's model interface, pickling, checkpoints, aux
outputs, keep ratios after apply, and analysis state that holds no graph handles."""

import copy
import io
import pickle

import pytest
import timm
import timm.optim
import torch
import torch.fx as fx
from timm.models._manipulate import group_parameters

import tokenreduce
from tokenreduce import ops
from tokenreduce.checkpoint import convert_released_checkpoint
from tokenreduce.flops import gflops
from tokenreduce.passes import route_policy
from tokenreduce.passes.infra import passes_run

ALL = ("etps", "evit", "dtps", "dynamicvit")


def _deit(**kwargs):
    return timm.create_model("deit_tiny_patch16_224", img_size=64, **kwargs).eval()


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return _deit()


def _x(b=3):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _holds_node(obj, seen=None) -> bool:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, fx.Node):
        return True
    if isinstance(obj, dict):
        return any(_holds_node(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds_node(v, seen) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return any(_holds_node(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return False


@pytest.mark.parametrize("method", ALL)
def test_meta_is_plain_data_and_the_model_pickles(dense, method):
    reduced = tokenreduce.apply(dense, method=method, locs=[3, 6, 9]).eval()
    assert not _holds_node(reduced.meta["tokenreduce"])
    x = _x()
    with torch.no_grad():
        out = reduced(x)
        buf = io.BytesIO()
        torch.save(reduced, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert torch.equal(again(x), out)
        assert torch.equal(pickle.loads(pickle.dumps(reduced))(x), out)
        assert torch.equal(copy.deepcopy(reduced)(x), out)
    # the marks survive the round trip: summary still finds every block
    assert tokenreduce.summary(again).rows == tokenreduce.summary(reduced).rows


def test_summary_leaves_the_shape_metadata_alone(dense):
    reduced = tokenreduce.apply(dense, method="etps", locs=[3])
    before = {n.name: n.meta.get("tensor_meta") for n in reduced.graph.nodes}
    tokenreduce.summary(reduced, torch.randn(1, 3, 64, 64))
    assert {n.name: n.meta.get("tensor_meta") for n in reduced.graph.nodes} == before


def test_summary_at_another_size_counts_the_dense_model_there():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()
    reduced = tokenreduce.apply(model, method="etps", locs=[3, 6, 9])
    big = torch.randn(1, 3, 96, 96)
    s = tokenreduce.summary(reduced, big)
    assert s.gflops_dense == pytest.approx(gflops(model, big), rel=1e-6)
    assert s.gflops_reduced < s.gflops_dense
    assert s.rows[0][2] == 1 + 36


@pytest.mark.parametrize("method", ALL)
def test_checkpoint_round_trip_is_bit_identical(dense, method, tmp_path):
    torch.manual_seed(2)
    reduced = tokenreduce.apply(copy.deepcopy(dense), method=method, locs=[3, 6, 9], keep_ratio=0.6).eval()
    path = tmp_path / "r.pt"
    tokenreduce.save(reduced, path, extra={"epoch": 3}, model_kwargs={"img_size": 64})
    loaded = tokenreduce.load(path)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), reduced(x))
    assert tokenreduce.load_checkpoint(path)["extra"] == {"epoch": 3}
    assert loaded.reduction.plan.sites == reduced.reduction.plan.sites
    # into a dense model the user builds: its weights are overwritten by the checkpoint's
    other = tokenreduce.load(path, model=_deit())
    with torch.no_grad():
        assert torch.equal(other(x), reduced(x))


def test_load_refuses_what_is_not_a_tokenreduce_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(tokenreduce.TokenReduceError, match="not a tokenreduce checkpoint"):
        tokenreduce.load(path)


@pytest.mark.parametrize("method", ALL)
def test_forward_features_and_head_compose_to_the_model(dense, method):
    reduced = tokenreduce.apply(dense, method=method, locs=[3, 6, 9]).eval()
    x = _x()
    with torch.no_grad():
        tokens = reduced.forward_features(x)
        assert tokens.shape[1] < 17 and tokens.shape[2] == 192
        assert torch.equal(reduced.forward_head(tokens), reduced(x))
        pre = reduced.forward_head(tokens, pre_logits=True)
        assert torch.equal(reduced.get_classifier()(pre), reduced(x))


def test_timm_optimizer_groups_match_the_dense_model(dense):
    reduced = tokenreduce.apply(dense, method="dtps", locs=[3, 6, 9])
    ours = group_parameters(reduced, reduced.group_matcher(), reverse=True)
    theirs = group_parameters(dense, dense.group_matcher(), reverse=True)
    assert {k: ours[k] for k in theirs} == theirs
    for i, block in enumerate((3, 6, 9)):
        heads = {v for k, v in ours.items() if k.startswith(f"reduce_sites.{i}.")}
        assert heads == {theirs[f"blocks.{block}.norm1.weight"]}
    assert reduced.no_weight_decay() == dense.no_weight_decay()
    opt = timm.optim.create_optimizer_v2(reduced, weight_decay=0.05, layer_decay=0.65)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(reduced.cls_token) in no_decay and id(reduced.pos_embed) in no_decay


def test_reset_classifier(dense):
    reduced = tokenreduce.apply(copy.deepcopy(dense), method="etps", locs=[3])
    reduced.reset_classifier(7)
    assert reduced.num_classes == 7 and reduced(_x()).shape == (3, 7)


@pytest.mark.parametrize("method", ALL)
def test_aux_outputs(dense, method):
    reduced = tokenreduce.apply(dense, method=method, locs=[3, 6, 9], aux=True).eval()
    x = _x()
    with torch.no_grad():
        out, aux = reduced(x)
        assert torch.equal(out, reduced.forward_head(aux.tokens))
    assert isinstance(aux, tokenreduce.Aux) and len(aux.keeps) == len(aux.hosts) == 3
    assert torch.equal(aux.token_keep, torch.ones(aux.tokens.shape[:2]))
    for keep, hosts, site in zip(aux.keeps, aux.hosts, reduced.reduction.plan.sites):
        alive = keep.bool()
        fused = site.index if method == "evit" else 0  # EViT's earlier fused tokens may be kept
        assert hosts.shape == (3, 16) and (alive.sum(1) <= site.keep).all()
        assert (alive.sum(1) >= site.keep - fused).all()
        # a kept token lives in itself; every other token in a kept one (squeeze) or nowhere
        idx = torch.arange(16).expand(3, 16)
        assert torch.equal(hosts[alive], idx[alive])
        gone = hosts[~alive]
        if method in ("etps", "dtps"):
            assert (gone >= 0).all() and keep.gather(1, hosts.clamp_min(0)).bool().all()
        else:
            assert (gone == -1).all()


def test_aux_hosts_are_the_squeeze_assignment(dense):
    """One site: the host map equals the squeeze's own matching of the pruned tokens."""
    reduced = tokenreduce.apply(dense, method="dtps", locs=[3], aux=True).eval()
    x = _x(2)
    with torch.no_grad():
        _, aux = reduced(x)
        entry = {}
        hook = reduced.get_submodule("reduce_sites.0").register_forward_pre_hook(
            lambda m, args, kwargs: entry.update(x=args[0]), with_kwargs=True
        )
        reduced(x)
        hook.remove()
    patches = entry["x"][:, 1:]
    keep = aux.keeps[0].bool()
    for b in range(2):
        kept, pruned = keep[b].nonzero()[:, 0], (~keep[b]).nonzero()[:, 0]
        host = ops.squeeze_assign(patches[b : b + 1, kept], patches[b : b + 1, pruned]).host[0]
        assert torch.equal(aux.hosts[0][b, pruned], kept[host])


def test_dtps_train_aux_reaches_the_heads(dense):
    reduced = tokenreduce.apply(copy.deepcopy(dense), method="dtps", locs=[3, 6], aux=True).train()
    out, aux = reduced(_x(2))
    assert aux.tokens.shape == (2, 17, 192)
    assert torch.equal(aux.token_keep[:, 1:], aux.keeps[-1]) and (aux.token_keep[:, 0] == 1).all()
    (out.sum() + sum(k.sum() for k in aux.keeps)).backward()
    assert all(p.grad is not None for n, p in reduced.named_parameters() if n.startswith("reduce_sites"))


def test_keep_targets_and_set_keep_ratio(dense):
    reduced = tokenreduce.apply(dense, method="dtps", locs=[3, 6, 9], keep_ratio=0.7, aux=True).eval()
    assert tokenreduce.keep_targets(reduced) == pytest.approx((0.7, 0.49, 0.343))
    etps = tokenreduce.apply(dense, method="etps", locs=[3, 6], keep_ratio=[0.5, 0.8])
    assert tokenreduce.keep_targets(etps) == pytest.approx((0.5, 0.4))
    tokenreduce.set_keep_ratio(reduced, 0.5)
    with torch.no_grad():
        _, aux = reduced(_x())
    assert [int(k[0].sum()) for k in aux.keeps] == [8, 4, 2]
    assert [s.keep for s in reduced.reduction.plan.sites] == [8, 4, 2]
    tokenreduce.set_keep_ratio(reduced, 1.0)
    with torch.no_grad():
        assert torch.equal(reduced(_x())[0], dense(_x()))
    with pytest.raises(ValueError, match="keep_ratio: every ratio must be in"):
        tokenreduce.set_keep_ratio(reduced, 1.5)


def test_apply_refuses_a_reduced_model(dense):
    reduced = tokenreduce.apply(dense, method="etps", locs=[3])
    with pytest.raises(tokenreduce.TokenReduceError, match="already reduced by tokenreduce"):
        tokenreduce.apply(reduced, method="etps", locs=[6])


def test_released_checkpoints_map_into_the_reduced_model(dense):
    """DynamicViT's and the TPS release's key layout (timm backbone names, score heads as
    ``score_predictor.{i}.in_conv/out_conv``), wrapped as they save it; EViT's is the backbone."""
    reduced = tokenreduce.apply(copy.deepcopy(dense), method="dtps", locs=[3, 6, 9])
    gen = torch.Generator().manual_seed(5)
    released = {f"module.{k}": torch.randn(v.shape, generator=gen) for k, v in dense.state_dict().items()}
    heads = {
        "in_conv.0": (192,),
        "in_conv.1": (192, 192),
        "out_conv.0": (96, 192),
        "out_conv.2": (48, 96),
        "out_conv.4": (2, 48),
    }
    for i in range(3):
        for part, shape in heads.items():
            released[f"module.score_predictor.{i}.{part}.weight"] = torch.randn(shape, generator=gen)
            released[f"module.score_predictor.{i}.{part}.bias"] = torch.randn(shape[:1], generator=gen)
    mapped = convert_released_checkpoint({"model": released}, reduced, source="dynamicvit")
    reduced.load_state_dict(mapped, strict=True)
    assert torch.equal(
        reduced.reduce_sites[2].scorer.head.classify[4].weight, released["module.score_predictor.2.out_conv.4.weight"]
    )
    assert torch.equal(reduced.get_submodule("blocks.5.mlp.fc1").weight, released["module.blocks.5.mlp.fc1.weight"])

    evit = tokenreduce.apply(_deit(), method="evit", locs=[3, 6, 9])
    backbone = {k: v for k, v in released.items() if "score_predictor" not in k}
    evit.load_state_dict(convert_released_checkpoint(backbone, evit, source="evit"), strict=True)
    with pytest.raises(tokenreduce.TokenReduceError, match="no place in the reduced model"):
        convert_released_checkpoint(released, evit, source="evit")


def test_passes_check_their_preconditions_and_name_the_passes_before(dense):
    reduced = tokenreduce.apply(dense, method="etps", locs=[3])
    assert passes_run(reduced) == ["insert_sites"]
    plain = fx.symbolic_trace(dense)
    with pytest.raises(tokenreduce.TokenReduceError, match="expects insert_sites to have run first"):
        route_policy(plain, reduced.reduction.model_map, reduced.reduction.plan)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_is_refused_with_the_alternatives(dense):
    reduced = tokenreduce.apply(dense, method="etps", locs=[3]).eval()
    with pytest.raises(tokenreduce.TokenReduceError, match="torch.jit.trace cannot record a reduction site"):
        torch.jit.trace(reduced, _x(2))

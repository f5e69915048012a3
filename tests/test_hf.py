"""Hugging Face ``transformers`` vision models, built from small configs (no weights download):
every model x every method reduces correctly or is refused with a TokenReduceError that says why.

Right means, as for timm's families: keep 1 reproduces the dense model; at keep 0.5 the output is
finite and of the dense shape, FLOPs drop, the dense model (weights and attention setting) is
unchanged, and the reduced model takes other batch sizes.
"""

from __future__ import annotations

import re

import pytest
import torch

import tokenreduce

transformers = pytest.importorskip("transformers")

METHODS = ("etps", "evit", "dtps", "dynamicvit")
NO_CLS = r"has no class token \(0 prefix token\(s\), none of them a class token\).*Use method='dtps'"
SMALL = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)


def _models() -> dict:
    t = transformers
    return {
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**SMALL, num_labels=5)),
        "vit-base": lambda: t.ViTModel(t.ViTConfig(**SMALL)),
        "deit-distilled": lambda: t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**SMALL, num_labels=5)),
        "dinov2": lambda: t.Dinov2ForImageClassification(t.Dinov2Config(**SMALL, num_labels=5)),
        "dinov2-registers": lambda: t.Dinov2WithRegistersForImageClassification(
            t.Dinov2WithRegistersConfig(**SMALL, num_labels=5, num_register_tokens=4)
        ),
        "clip-vision": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL)),
        "siglip-vision": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL)),
        "beit": lambda: t.BeitForImageClassification(  # relative position bias, per layer
            t.BeitConfig(**SMALL, num_labels=5, use_relative_position_bias=True)
        ),
        "data2vec-vision": lambda: t.Data2VecVisionForImageClassification(  # attention written out
            t.Data2VecVisionConfig(**SMALL, num_labels=5, use_shared_relative_position_bias=True)
        ),
        "dinov3": lambda: t.DINOv3ViTModel(t.DINOv3ViTConfig(**SMALL)),  # rotary, on the patches only
        "pvt": lambda: t.PvtForImageClassification(t.PvtConfig(image_size=32, num_labels=5)),  # spatial stages
        "swin": lambda: t.SwinForImageClassification(
            t.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
        ),
    }


WINDOWED = r"no self-attention block over a token stream.*windowed attention \(16 windows of 16 tokens"
REFUSED = {
    "siglip-vision": {"etps": NO_CLS, "evit": NO_CLS},
    "pvt": {"etps": NO_CLS, "evit": NO_CLS},
    "swin": {m: WINDOWED for m in METHODS},
}
PREFIX = {"vit": 1, "vit-base": 1, "deit-distilled": 2, "dinov2": 1, "dinov2-registers": 5, "clip-vision": 1}
PREFIX |= {"siglip-vision": 0, "beit": 1, "data2vec-vision": 1, "dinov3": 1, "pvt": 0}
LOCS = {"pvt": None}  # its default sites: the starts of stages 2 to 4


def _tensor(out) -> torch.Tensor:
    for name in ("logits", "pooler_output", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no tensor output in {type(out).__name__}")


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _models()[name]().eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(_models()))
def test_reduces_or_refuses(name: str, method: str):
    model = _build(name)
    attn = model.config._attn_implementation
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = model.config.image_size
    x = torch.randn(2, 3, size, size)
    locs = LOCS.get(name, [1, 2])
    want = REFUSED.get(name, {}).get(method)
    if want is not None:
        with pytest.raises(tokenreduce.TokenReduceError, match=re.compile(want, re.S)):
            tokenreduce.apply(model, method=method, keep_ratio=0.5, locs=locs)
        return
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5, locs=locs).eval()  # default input: config
    with torch.no_grad():
        dense = _tensor(model(pixel_values=x))
        out = reduced(x)
        same = tokenreduce.apply(model, method=method, keep_ratio=1.0, locs=locs).eval()(x)
        x3 = torch.randn(3, 3, size, size)
        out3 = reduced(x3)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    torch.testing.assert_close(same, dense, rtol=1e-5, atol=1e-5)
    assert out3.shape == (3,) + dense.shape[1:]
    with torch.no_grad():  # each image is reduced on its own: batch 1 gives the same rows
        one = torch.cat([reduced(x3[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(one, out3, rtol=1e-4, atol=1e-5)
    info = tokenreduce.summary(reduced)
    assert info.gflops_reduced < info.gflops_dense
    assert reduced.reduction.model_map.blocks[0].num_prefix == PREFIX[name]
    assert model.config._attn_implementation == attn  # the user's model keeps its attention
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_keys_are_the_models():
    model = _build("vit")
    reduced = tokenreduce.apply(model, method="dtps", keep_ratio=0.5, locs=[1, 2])
    keys = {k for k in reduced.state_dict() if not k.startswith("reduce_sites.")}
    assert keys and keys <= set(model.state_dict())  # vit.encoder.layer.1...: loadable from the model's
    assert any(k.startswith("reduce_sites.") for k in reduced.state_dict())


def test_fine_tune_step_reaches_the_score_heads():
    model = _build("vit").train()
    reduced = tokenreduce.apply(model, method="dtps", keep_ratio=0.5, locs=[1, 2], aux=True)
    assert reduced.training
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, aux = reduced(x)
    assert logits.shape == (4, 5) and len(aux.keeps) == 2
    loss = torch.nn.functional.cross_entropy(logits, y) + sum(k.mean() for k in aux.keeps)
    loss.backward()
    heads = [p for n, p in reduced.named_parameters() if n.startswith("reduce_sites.")]
    assert heads and all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads)
    assert any(float(p.grad.abs().sum()) > 0 for p in heads)


@pytest.mark.parametrize("name", ["vit", "dinov3"])
def test_save_and_load_rebuild_the_transformers_model(name, tmp_path):
    model = _build(name)
    reduced = tokenreduce.apply(model, method="etps", keep_ratio=0.5, locs=[1, 2]).eval()
    tokenreduce.save(reduced, tmp_path / "r.pt")
    loaded = tokenreduce.load(tmp_path / "r.pt")  # rebuilt from the saved class name and config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), reduced(x))
    whole = tmp_path / "whole.pt"
    torch.save(reduced, whole)
    again = torch.load(whole, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), reduced(x))


def test_onnx_export_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    reduced = tokenreduce.apply(_build("vit"), method="etps", keep_ratio=0.5, locs=[1, 2]).eval()
    from tokenreduce.export import export

    path = export(reduced, tmp_path / "vit.onnx", format="onnx", exporter="torchscript")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), reduced(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "beit", "dinov3"])
def test_compiles_to_one_graph(name):
    reduced = tokenreduce.apply(_build(name), method="etps", keep_ratio=0.5, locs=[1, 2]).eval()
    compiled = torch.compile(reduced, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x), rtol=1e-4, atol=1e-4)


def test_unsupported_model_is_refused_with_the_reason():
    convnext = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_labels=5, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64])
    )
    with pytest.raises(tokenreduce.TokenReduceError, match="no attention found in ConvNextForImageClassification"):
        tokenreduce.apply(convnext.eval(), method="dtps")


def support_table() -> str:
    """The README's Hugging Face rows, from the same models and checks (locs [1, 2], keep 0.5)."""
    rows = ["| model (small config) | methods that reduce | refused, and why |", "|---|---|---|"]
    for name in _models():
        model = _build(name)
        works, refused = [], []
        for method in METHODS:
            try:
                tokenreduce.apply(model, method=method, keep_ratio=0.5, locs=LOCS.get(name, [1, 2]))
                works.append(method)
            except tokenreduce.TokenReduceError as exc:
                reason = str(exc).split(": ", 1)[-1]
                reason = reason.split("can reduce: ")[-1].split(" (first at")[0]
                reason = "no class token" if "has no class token" in reason else reason
                refused.append(reason)
        why = "; ".join(dict.fromkeys(refused)) or "-"
        rows.append(f"| {name} (`{type(model).__name__}`) | {', '.join(works) or 'none'} | {why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(support_table())


@pytest.mark.parametrize("locs", [[1], [1, 2]])
def test_dinov3_rotary_tables_follow_the_tokens(locs):
    """Oracle: DINOv3's own layers run one image at a time in float64 on the kept tokens, with its
    rotary tables (patch rows only) indexed by hand, equal the reduced model."""
    model = _build("dinov3").double()
    for m in model.modules():  # O(1) weights: near the identity a wrong table would hardly show
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reduced = tokenreduce.apply(
        model, method="dynamicvit", locs=locs, keep_ratio=0.5, example_input=img, aux=True
    ).eval()
    with torch.no_grad():
        out, aux = reduced(img)
        x = model.embeddings(img)
        cos, sin = model.rope_embeddings(img)  # (n, d): the patches' rows
        P = x.shape[1] - cos.shape[-2]
        want = []
        for b in range(2):
            xb, cur = x[b : b + 1], list(range(cos.shape[-2]))
            for i, layer in enumerate(model.model.layer):
                if i in locs:
                    alive = set(aux.keeps[locs.index(i)][b].nonzero()[:, 0].tolist())
                    rows = [j for j, p in enumerate(cur) if p in alive]
                    cur = [cur[j] for j in rows]
                    xb = torch.cat([xb[:, :P], xb[:, P:][:, rows]], dim=1)
                xb = layer(xb, position_embeddings=(cos[..., cur, :], sin[..., cur, :]))
            want.append(model.norm(xb)[:, 0])
        dense = model(pixel_values=img).pooler_output
    assert aux.keeps[-1].sum(1).tolist() == [16 * 0.5 ** len(locs)] * 2
    torch.testing.assert_close(out, torch.cat(want), rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-2 * dense.abs().max()  # the reduction changed the result

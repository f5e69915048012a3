"""ONNX and pt2 export of reduced models: outputs against PyTorch's, through a dynamic batch axis.

The default suite uses a 3-block DeiT-Tiny at 32 px (16 patches, sites at blocks 0 and 1); ``-m slow`` runs DeiT-S at
224 px and PVT-Tiny with every method that applies, both exporters.
"""

import logging

import pytest
import timm
import torch

import tokenreduce
from tokenreduce._export_ops import export_forms, split_order_export, squeeze_export, squeeze_tokens_export
from tokenreduce.export import export
from tokenreduce.ops.select import split_order_reference
from tokenreduce.ops.squeeze import squeeze_reference, squeeze_tokens_reference

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

log = logging.getLogger(__name__)

METHODS = ("etps", "evit", "dtps", "dynamicvit")
TOL = 1e-4
BATCHES = (1, 3)  # through the dynamic axis; the export traced batch 2


def small_deit(depth=3, img=32):
    return timm.create_model("deit_tiny_patch16_224", img_size=img, patch_size=8, depth=depth, num_classes=10).eval()


# Block 2 and the head see the reduced tokens. A site in the last block would leave a class-token
# model's logits unchanged (its MLP is row-wise), and the comparison would test nothing.
SMALL_LOCS = [0, 1]


def _reduced(model, method, **kwargs):
    return tokenreduce.apply(model, method=method, keep_ratio=0.7, **kwargs).eval()


def _changes_output(model, reduced, shape):
    """The reduction must matter, or the comparison would not test it."""
    x = torch.randn(*shape)
    with torch.no_grad():
        dense, out = model(x), reduced(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert (dense - out).abs().max() > 1e-3


def _check_onnx(reduced, path, shape):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input"
    assert inp.shape[0] == "batch", f"batch axis not dynamic: {inp.shape}"
    assert [o.shape[0] for o in session.get_outputs()] == ["batch"]
    errors = []
    for b in BATCHES:
        x = torch.randn(b, *shape[1:])
        with torch.no_grad():
            want = reduced(x)
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == tuple(want.shape)
        errors.append(float((torch.from_numpy(got) - want).abs().max()))
    assert max(errors) <= TOL, f"onnxruntime vs PyTorch max abs error {errors}"
    return errors


def _onnx_case(model, method, exporter, shape, tmp_path, **kwargs):
    reduced = _reduced(model, method, **kwargs)
    _changes_output(model, reduced, shape)
    path = export(reduced, tmp_path / f"{method}.onnx", format="onnx", exporter=exporter)
    assert path.is_file()
    assert not any(m.training for m in reduced.modules()), "export changed the model's mode"
    errors = _check_onnx(reduced, path, shape)
    log.info(
        "%s %s %s: onnxruntime vs PyTorch max abs error, batch 1 / 3: %s",
        type(model).__name__,
        method,
        exporter,
        errors,
    )


# default suite: every method through the legacy exporter (about 1 s each); the dynamo exporter
# takes 10-20 s per model on 2 cores, so by default only test_aux_outputs runs it (eTPS, which
# meets both token operators), every method under -m slow
ONNX_CASES = [pytest.param(m, "torchscript", id=f"{m}-torchscript") for m in METHODS] + [
    pytest.param(m, "dynamo", id=f"{m}-dynamo", marks=pytest.mark.slow) for m in METHODS
]


@pytest.mark.parametrize("method, exporter", ONNX_CASES)
def test_onnx_small_deit(method, exporter, tmp_path):
    _onnx_case(small_deit(), method, exporter, (2, 3, 32, 32), tmp_path, locs=SMALL_LOCS)


@pytest.mark.parametrize("method", METHODS)
def test_pt2_roundtrip(method, tmp_path):
    model = small_deit()
    reduced = _reduced(model, method, locs=SMALL_LOCS)
    _changes_output(model, reduced, (2, 3, 32, 32))
    path = export(reduced, tmp_path / f"{method}.pt2", format="pt2")
    program = torch.export.load(str(path))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "tokenreduce" in t], targets  # loads without tokenreduce
    for b in BATCHES:
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            err = (program.module()(x) - reduced(x)).abs().max()
        assert err <= TOL, f"batch {b}: {err}"


def test_aux_outputs(tmp_path):
    model = small_deit()
    reduced = _reduced(model, "etps", locs=SMALL_LOCS, aux=True)
    _changes_output(model, reduced, (2, 3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, aux = reduced(x)
    want = [out, *aux.keeps, aux.tokens, aux.token_keep, *aux.hosts]
    sites = range(len(aux.keeps))
    names = ["output", *(f"keeps_{i}" for i in sites), "tokens", "token_keep", *(f"hosts_{i}" for i in sites)]
    program = torch.export.load(str(export(reduced, tmp_path / "aux.pt2", format="pt2")))
    with torch.no_grad():
        got = program.module()(x)
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and (g - w).abs().max() <= TOL, name
    session = ort.InferenceSession(
        str(export(reduced, tmp_path / "aux.onnx", format="onnx")), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == names
    for name, g, w in zip(names, session.run(None, {"input": x.numpy()}), want):
        assert g.dtype == w.numpy().dtype and abs(g - w.numpy()).max() <= TOL, name


def test_fixed_batch_onnx(tmp_path):
    reduced = _reduced(small_deit(), "etps", locs=SMALL_LOCS)
    x = torch.randn(1, 3, 32, 32)
    path = export(
        reduced, tmp_path / "b1.onnx", format="onnx", exporter="torchscript", example_input=x, dynamic_batch=False
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(got) - reduced(x)).abs().max() <= TOL


def _ties(b, n, c):
    """Tokens with exact ties in the cosine (duplicated rows) and a zero row."""
    x = torch.randn(b, n, c, dtype=torch.float64)
    if n >= 3:
        x[:, 1] = x[:, 0]
        x[:, 2] = 0.0
    return x


@pytest.mark.parametrize("nr, np_", [(5, 3), (4, 9), (6, 1)])
def test_squeeze_export_form_equals_reference(nr, np_):
    reserved, pruned = _ties(2, nr, 8), _ties(2, np_, 8)
    pruned[:, 0] = reserved[:, 3]  # exactly a reserved token: cosine 1
    got, want = squeeze_export(reserved, pruned), squeeze_reference(reserved, pruned)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    hosts_nothing = (got == reserved).all(-1)  # rows hosting nothing are returned bit for bit
    assert torch.equal(hosts_nothing, (want == reserved).all(-1))


def test_squeeze_tokens_export_form_equals_reference():
    x = torch.randn(3, 2 + 10, 8, dtype=torch.float64)
    perm = torch.stack([torch.randperm(10) for _ in range(3)])
    kept, pruned = perm[:, :6].sort(1).values, perm[:, 6:].sort(1).values
    got = squeeze_tokens_export(x, kept, pruned, 2)
    assert torch.allclose(got, squeeze_tokens_reference(x, kept, pruned, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4, 7, 12])
def test_split_order_export_form_equals_reference(k):
    scores = torch.randint(0, 4, (6, 12)).float()  # many exact ties
    scores[0, [2, 5]] = float("nan")
    scores[1] = float("nan")
    scores[2, [0, 3]] = float("-inf")
    scores[3, [1, 8]] = float("inf")
    scores[4, 6] = -0.0
    assert torch.equal(split_order_export(scores, k), split_order_reference(scores, k))


def test_export_forms_replace_the_operators():
    reserved, pruned = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    with export_forms():
        out = torch.ops.tokenreduce.squeeze(reserved, pruned)
        order = torch.ops.tokenreduce.split_order.default(torch.tensor([[0.1, 0.9, 0.5]]), 2)
    assert torch.allclose(out, squeeze_reference(reserved, pruned), atol=1e-6)
    assert order.tolist() == [[1, 2, 0]]


def test_unknown_operator_is_refused():
    @torch.library.custom_op("tokenreduce::_export_test_only", mutates_args=())
    def _op(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    match = "tokenreduce::_export_test_only has no export form"
    with pytest.raises(tokenreduce.TokenReduceError, match=match), export_forms():
        torch.ops.tokenreduce._export_test_only(torch.ones(1))


def test_errors(tmp_path):
    reduced = _reduced(small_deit(), "etps", locs=SMALL_LOCS)
    with pytest.raises(TypeError, match="expected a module returned by tokenreduce.apply"):
        export(small_deit(), tmp_path / "a.onnx", format="onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        export(reduced, tmp_path / "a.tflite", format="tflite")
    with pytest.raises(ValueError, match="exporter must be one of"):
        export(reduced, tmp_path / "a.onnx", format="onnx", exporter="jit")
    with pytest.raises(ValueError, match="applies to format='onnx' only"):
        export(reduced, tmp_path / "a.pt2", format="pt2", exporter="torchscript")
    with pytest.raises(ValueError, match="at least 2 images"):
        export(reduced, tmp_path / "a.onnx", format="onnx", example_input=torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        export(reduced, tmp_path / "a.onnx", format="onnx", example_input=[1, 2])
    train = tokenreduce.apply(small_deit(), method="dtps", locs=SMALL_LOCS).train()
    with pytest.raises(tokenreduce.TokenReduceError, match=r"training mode.*Call reduced.eval\(\)"):
        export(train, tmp_path / "a.onnx", format="onnx")
    assert not list(tmp_path.iterdir())  # nothing written on refusal


EXPORTER_CASES = ("dynamo", pytest.param("torchscript"))


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTER_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_onnx_deit_small_224(method, exporter, tmp_path):
    model = timm.create_model("deit_small_patch16_224", num_classes=100).eval()
    _onnx_case(model, method, exporter, (2, 3, 224, 224), tmp_path)


# PVT-Tiny: the learned methods at the start of stages 2-4; eTPS/EViT only in the last stage,
# whose tokens start with the class token.
PVT_CASES = [(m, None) for m in ("dtps", "dynamicvit")] + [(m, [6]) for m in ("etps", "evit")]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTER_CASES)
@pytest.mark.parametrize("method, locs", PVT_CASES, ids=[m for m, _ in PVT_CASES])
def test_onnx_pvt_tiny(method, locs, exporter, tmp_path):
    from tokenreduce.backbones import pvt_tiny

    model = pvt_tiny(num_classes=100).eval()
    _onnx_case(model, method, exporter, (2, 3, 224, 224), tmp_path, locs=locs)

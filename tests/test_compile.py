"""torch.compile(fullgraph=True) over reduced models: no graph break, eager agreement, and a
second batch size compiles at most once more."""

import pytest
import torch
from models import CASES, build

import tokenreduce


class CountingBackend:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def _compile_and_check(reduced, x):
    backend = CountingBackend()
    compiled = torch.compile(reduced, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x), rtol=1e-5, atol=1e-5)
        assert backend.compiles == 1
        other = torch.randn(x.shape[0] + 1, *x.shape[1:])
        torch.testing.assert_close(compiled(other), reduced(other), rtol=1e-5, atol=1e-5)
        compiled(torch.randn(x.shape[0] + 2, *x.shape[1:]))
    assert backend.compiles <= 2


# the default suite compiles one timm model with both placements and the hand-written model with
# every method; the rest of the registry runs with -m slow
FAST = [
    c
    for c in CASES
    if c.id in ("deit_small_patch16_224-etps", "deit_small_patch16_224-dtps") or c.id.startswith("handwritten-")
]


@pytest.mark.parametrize("mid,factory,shape,method", FAST)
def test_compiles_without_graph_breaks(mid, factory, shape, method):
    model, x = build(factory, shape)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5, example_input=x).eval()
    torch._dynamo.reset()
    _compile_and_check(reduced, x)


@pytest.mark.slow
@pytest.mark.parametrize("mid,factory,shape,method", [c for c in CASES if c not in FAST])
def test_compiles_every_model(mid, factory, shape, method):
    model, x = build(factory, shape)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5, example_input=x).eval()
    torch._dynamo.reset()
    _compile_and_check(reduced, x)


@pytest.mark.parametrize("method", ["etps", "dtps"])
def test_compiles_in_train_mode(method):
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=64)
    reduced = tokenreduce.apply(model, method=method, keep_ratio=0.5).train()
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(reduced, fullgraph=True, backend=backend)
    compiled(torch.randn(2, 3, 64, 64)).sum().backward()
    assert backend.compiles == 1


@pytest.mark.slow
def test_inductor_matches_eager():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    reduced = tokenreduce.apply(model, method="etps", keep_ratio=0.5).eval()
    torch._dynamo.reset()
    compiled = torch.compile(reduced, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reduced(x), rtol=1e-4, atol=1e-4)

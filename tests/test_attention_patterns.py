"""Explicit-softmax attention is found in its common spellings (analysis/attention.py).

timm's ViTs with ``fused_attn = False`` (what users set to read attention maps) compute
``softmax(maybe_add_mask((q * scale) @ k^T, bias))``: the scale comes before the product and an
fx-opaque helper sits before the softmax. Reduced, they must give the fused model's output, and
eTPS must read the same class-token scores from their probabilities as ``cls_attention`` does
from q and k. A hand-written attention covers the other spellings.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenreduce

METHODS = ("etps", "evit", "dtps", "dynamicvit")
TIMM_MODELS = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")


def _timm(name):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=64, depth=4, embed_dim=48, num_heads=3, num_classes=10).eval()


def _set_fused(model, on):
    """Switch every timm Attention's ``fused_attn``; returns the previous values to restore."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert mods
    before = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = on
    return lambda: [setattr(m, "fused_attn", b) for m, b in zip(mods, before)]


def _both(model, x, method, keep_ratio, locs=(1, 2)):
    """The model reduced with fused attention and with explicit softmax; same weights."""
    fused = tokenreduce.apply(model, method=method, locs=list(locs), keep_ratio=keep_ratio, example_input=x)
    restore = _set_fused(model, False)
    try:
        explicit = tokenreduce.apply(model, method=method, locs=list(locs), keep_ratio=keep_ratio, example_input=x)
    finally:
        restore()
    explicit.load_state_dict(fused.state_dict())  # dTPS: the same score heads
    return fused.eval(), explicit.eval()


def _scorer_outputs(reduced, x):
    """The (B, n) scores every class-attention scorer of ``reduced`` returns for ``x``."""
    scorers = [m for m in reduced.modules() if getattr(m, "needs_attention", False)]
    assert scorers
    out = []
    hooks = [m.register_forward_hook(lambda mod, args, res: out.append(res)) for m in scorers]
    try:
        with torch.no_grad():
            reduced(x)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_explicit_attention_is_found(name):
    model = _timm(name)
    x = torch.randn(2, 3, 64, 64)
    restore = _set_fused(model, False)
    try:
        info = tokenreduce.inspect(model, example_input=x)
    finally:
        restore()
    assert len(info.blocks) == 4
    for b in info.blocks:
        assert b.attn.kind == "softmax" and b.attn.num_heads == 3 and b.attn.full_keys
        assert b.attn.scale == pytest.approx(16**-0.5)  # q * scale before the product, recorded


@pytest.mark.parametrize("name", TIMM_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_timm_explicit_attention_reduces_like_the_fused_model(name, method):
    model = _timm(name)
    x = torch.randn(2, 3, 64, 64)
    fused, explicit = _both(model, x, method, keep_ratio=0.6)
    restore = _set_fused(model, False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(explicit(x), fused(x), rtol=1e-4, atol=1e-5)
            one = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=1.0, example_input=x).eval()
            assert torch.equal(one(x), model(x))  # keep 1: the explicit model itself, bit for bit
    finally:
        restore()


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_etps_scores_from_explicit_probabilities_equal_cls_attention(name):
    model = _timm(name)
    x = torch.randn(2, 3, 64, 64)
    fused, explicit = _both(model, x, "etps", keep_ratio=0.6)
    got, want = _scorer_outputs(explicit, x), _scorer_outputs(fused, x)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert a.shape == b.shape == (2, b.shape[1])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dtps_train_mode_policy_attention_matches_the_fused_model():
    """Train mode: the explicit probabilities are replaced by the policy softmax, as sdpa is."""
    model = _timm("deit_tiny_distilled_patch16_224")
    x = torch.randn(2, 3, 64, 64)
    fused, explicit = _both(model, x, "dtps", keep_ratio=0.6)
    outs = []
    for reduced in (fused, explicit):
        torch.manual_seed(5)  # the same Gumbel noise
        with torch.no_grad():
            outs.append(reduced.train()(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# --- other spellings, in a hand-written ViT ------------------------------------------------


@torch.fx.wrap
def add_mask(scores, mask):
    """An fx-opaque helper between the product and the softmax, like timm's maybe_add_mask."""
    return scores if mask is None else scores + mask


class Attn(nn.Module):
    def __init__(self, width, heads, tokens, spelling):
        super().__init__()
        self.heads, self.spelling = heads, spelling
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.bias = nn.Parameter(torch.randn(1, heads, tokens, tokens) * 0.5)  # used by "bias" only
        self.scale, self.root = (width // heads) ** -0.5, math.sqrt(width // heads)

    @staticmethod
    def key_bias(k):
        return 0.5 * k.sum(dim=-1).unsqueeze(-2)

    def logits(self, q, k):
        """(B, H, N, d) q, k -> (B, H, N, N) pre-softmax scores, as the spelling writes them."""
        s = self.scale
        if self.spelling == "post_scale":
            return (q @ k.transpose(-2, -1)) * s
        if self.spelling == "div":
            return (q @ k.transpose(-2, -1)) / self.root
        if self.spelling == "shape_scale":  # the factor is traced from the shape: not a constant
            return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if self.spelling == "pre_scale_wrapped":
            return add_mask((q * s) @ k.transpose(-2, -1), None)
        if self.spelling == "bias":  # a learned (1, H, N, N) bias: fixed to the full sequence
            return (q @ k.transpose(-2, -1)) * s + self.bias
        if self.spelling == "key_bias":  # a broadcast (B, H, 1, N) bias that follows the tokens
            return (q @ k.transpose(-2, -1)) * s + self.key_bias(k)
        raise AssertionError(self.spelling)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = self.logits(q, k).float().softmax(dim=-1).type_as(q)
        return self.out((F.dropout(weights, 0.0, self.training) @ v).transpose(1, 2).reshape(b, n, c))


class Layer(nn.Module):
    def __init__(self, width, heads, tokens, spelling):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attn(width, heads, tokens, spelling)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class SpelledViT(nn.Module):
    """4 layers, 32 px images of 8 px patches: 16 patch tokens and a class token."""

    def __init__(self, spelling, width=24, heads=2):
        super().__init__()
        self.stem = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        self.layers = nn.ModuleList([Layer(width, heads, 17, spelling) for _ in range(4)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 5)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x)[:, 0])


SPELLINGS = ("post_scale", "div", "shape_scale", "pre_scale_wrapped", "bias", "key_bias")
# a (1, H, N, N) bias cannot follow removed tokens: that model reduces only at keep 1
REDUCIBLE = tuple(s for s in SPELLINGS if s != "bias")


def _hand_cls_scores(model, x, block):
    """float64 mean over heads of softmax(logits)[class row, patches] at ``block``, by hand."""
    seen = []
    hook = model.layers[block].attn.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    attn = model.layers[block].attn
    h = seen[0].double()
    b, n, c = h.shape
    qkv = h @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, _ = qkv.reshape(b, n, 3, attn.heads, c // attn.heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * (c // attn.heads) ** -0.5
    if attn.spelling == "key_bias":
        logits = logits + attn.key_bias(k)
    return logits.softmax(-1)[:, :, 0, 1:].mean(1)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_hand_written_spellings_are_found(spelling):
    torch.manual_seed(0)
    model = SpelledViT(spelling).eval()
    x = torch.randn(2, 3, 32, 32)
    info = tokenreduce.inspect(model, example_input=x)
    assert len(info.blocks) == 4 and all(b.attn.kind == "softmax" for b in info.blocks)
    assert all(b.has_class_token and b.num_prefix == 1 for b in info.blocks)
    # the constant factor is recorded; one traced from q's shape is not a constant (None)
    expected = None if spelling == "shape_scale" else pytest.approx(12**-0.5)
    assert all(b.attn.scale == expected for b in info.blocks)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("method", METHODS)
def test_hand_written_spellings_keep_one_is_exact(spelling, method):
    torch.manual_seed(0)
    model = SpelledViT(spelling).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        one = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=1.0, example_input=x).eval()
        assert torch.equal(one(x), model(x))


@pytest.mark.parametrize("spelling", REDUCIBLE)
@pytest.mark.parametrize("method", METHODS)
def test_hand_written_spellings_reduce(spelling, method):
    torch.manual_seed(0)
    model = SpelledViT(spelling).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reduced = tokenreduce.apply(model, method=method, locs=[1, 2], keep_ratio=0.5, example_input=x).eval()
        out = reduced(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    if method == "etps":
        scores = _scorer_outputs(reduced, x)[0]  # the first site: blocks before it are unreduced
        torch.testing.assert_close(scores.double(), _hand_cls_scores(model, x, 1), rtol=1e-5, atol=1e-7)


def test_a_learned_full_shape_bias_is_not_mistaken_for_the_product():
    """With batch 1 the bias has the scores' shape: the walk must still find q @ k^T behind it."""
    torch.manual_seed(0)
    model = SpelledViT("bias").eval()
    info = tokenreduce.inspect(model, example_input=torch.randn(1, 3, 32, 32))
    assert len(info.blocks) == 4 and all(b.attn.kind == "softmax" for b in info.blocks)

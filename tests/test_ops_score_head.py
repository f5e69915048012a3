"""DynamicViT's score head and the Gumbel keep sample, ops/score_head.py."""

import pytest
import torch
import torch.nn.functional as F

from tokenreduce.ops import ScoreHead, gumbel_keep


def expected_log_probs(head, x, prev_keep):
    """Sec. 2 written out with the head's parameters, one image at a time."""
    ln, fc = head.embed[0], head.embed[1]
    l1, l2, l3 = head.classify[0], head.classify[2], head.classify[4]
    outs = []
    for b in range(x.shape[0]):
        h = F.gelu(fc(F.layer_norm(x[b], (x.shape[2],), ln.weight, ln.bias, ln.eps)))  # (n, C)
        half = x.shape[2] // 2
        w = torch.ones(x.shape[1], 1) if prev_keep is None else prev_keep[b]
        glob = (h[:, half:] * w).sum(0) / w.sum()
        z = torch.cat([h[:, :half], glob.expand(x.shape[1], -1)], dim=-1)
        logits = l3(F.gelu(l2(F.gelu(l1(z)))))
        outs.append(logits.log_softmax(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("use_prev", [False, True])
def test_score_head_matches_spec(use_prev):
    head = ScoreHead(8)
    x = torch.randn(3, 5, 8)
    prev = (torch.rand(3, 5, 1) > 0.3).float() if use_prev else None
    if prev is not None:
        prev[:, 0] = 1.0  # at least one alive token per image
    out = head(x, prev)
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out, expected_log_probs(head, x, prev))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 5))


def test_score_head_shapes_of_layers():
    head = ScoreHead(12)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 12), (12, 6), (6, 3), (3, 2)]
    assert isinstance(head.embed[0], torch.nn.LayerNorm)
    assert sorted(name for name, _ in head.named_children()) == ["classify", "embed"]


def test_all_ones_prev_keep_equals_none():
    head = ScoreHead(8)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(head(x, torch.ones(2, 6, 1)), head(x, None))


def test_dead_tokens_do_not_affect_alive_ones():
    head = ScoreHead(8)
    x = torch.randn(2, 6, 8)
    prev = torch.tensor([1.0, 1, 0, 1, 0, 0]).reshape(1, 6, 1).expand(2, -1, -1)
    out = head(x, prev)
    x2 = x.clone()
    x2[:, [2, 4, 5]] = torch.randn(2, 3, 8) * 10
    alive = [0, 1, 3]
    torch.testing.assert_close(head(x2, prev)[:, alive], out[:, alive])


def test_no_alive_token_stays_finite():
    out = ScoreHead(8)(torch.randn(2, 4, 8), torch.zeros(2, 4, 1))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gumbel_keep_is_hard_with_straight_through_gradient(tau):
    logits = torch.randn(4, 50, 2, requires_grad=True)
    keep = gumbel_keep(F.log_softmax(logits, -1), tau)
    assert keep.shape == (4, 50, 1)
    assert ((keep == 0) | (keep == 1)).all()
    assert 0 < keep.sum() < keep.numel()  # both outcomes occur at this size
    (keep * torch.randn(4, 50, 1)).sum().backward()
    assert logits.grad is not None and (logits.grad != 0).any()


def test_gumbel_keep_follows_probabilities():
    log_probs = torch.log(torch.tensor([0.9, 0.1])).expand(20000, 1, 2)
    rate = gumbel_keep(log_probs).mean().item()
    assert abs(rate - 0.9) < 0.02


@pytest.mark.parametrize("use_prev", [False, True])
def test_prefix_rows_are_embedded_and_dropped(use_prev):
    """num_prefix = P: the same log-probs as the head on the patch rows alone (the prefix rows
    go through the row-wise embedding only)."""
    head = ScoreHead(8)
    x = torch.randn(3, 2 + 5, 8)
    prev = (torch.rand(3, 5, 1) > 0.3).float() if use_prev else None
    if prev is not None:
        prev[:, 0] = 1.0
    out = head(x, prev, num_prefix=2)
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out, head(x[:, 2:], prev))
    torch.testing.assert_close(out, expected_log_probs(head, x[:, 2:], prev))


def test_num_prefix_must_leave_a_token():
    with pytest.raises(
        ValueError, match=r"ScoreHead: `num_prefix` must be an int in \[0, 3\) \(x of shape \(2, 3, 8\)\), got 3"
    ):
        ScoreHead(8)(torch.randn(2, 3, 8), None, num_prefix=3)

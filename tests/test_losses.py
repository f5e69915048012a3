"""Fine-tuning losses against hand computations in float64."""

import math

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

from tokenreduce.train.losses import TokenReductionLoss, logit_distillation, ratio_loss, token_distillation


def test_ratio_loss_matches_a_hand_computation():
    keeps = [
        torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64),
        torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64),
    ]
    # site 0: means 0.5, 0.75 vs 0.7 -> (0.04 + 0.0025) / 2; site 1: means 0.25, 0 vs 0.49
    want = ((0.2**2 + 0.05**2) / 2 + (0.24**2 + 0.49**2) / 2) / 2
    assert ratio_loss(keeps, [0.7, 0.49]).item() == pytest.approx(want, abs=1e-12)
    assert ratio_loss([torch.full((3, 10), 0.5)], [0.5]).item() == 0.0


def test_ratio_loss_reaches_soft_masks_and_rejects_bad_input():
    keep = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    ratio_loss([keep], [0.3]).backward()
    want = 2 * (keep.detach().mean(1, keepdim=True) - 0.3) / 5 / 2  # d/dk of mean_b (mean_n k - rho)^2
    torch.testing.assert_close(keep.grad, want.expand(2, 5))
    with pytest.raises(ValueError, match="got 1 keep masks for 2 targets"):
        ratio_loss([keep], [0.7, 0.49])
    with pytest.raises(ValueError, match=r"target 0 must be in \(0, 1\], got 1.5"):
        ratio_loss([keep], [1.5])
    with pytest.raises(ValueError, match=r"must be \(B, n\)"):
        ratio_loss([keep[0]], [0.5])


def test_logit_distillation_is_kl_teacher_to_student_batchmean():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    for temp in (1.0, 2.0):
        want = 0.0
        for b in range(3):
            ps = torch.softmax(s[b] / temp, 0)
            pt = torch.softmax(t[b] / temp, 0)
            want += sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(5))
        want = want / 3 * temp**2
        assert logit_distillation(s, t, temp).item() == pytest.approx(float(want), rel=1e-6)
    assert logit_distillation(t, t).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logit_distillation(s, t, 0.0)
    with pytest.raises(ValueError, match=r"must both be \(B, K\)"):
        logit_distillation(s, t[:2])


def test_token_distillation_uses_only_alive_rows():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    keep = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    rows = [(0, 0), (0, 2), (1, 3)]
    kl = 0.0
    mse = 0.0
    for b, n in rows:
        ps, pt = torch.softmax(s[b, n], 0), torch.softmax(t[b, n], 0)
        kl += float((pt * (pt / ps).log()).sum())
        mse += float(((s[b, n] - t[b, n]) ** 2).sum())
    assert token_distillation(s, t, keep, "kl").item() == pytest.approx(kl / 3, rel=1e-6)
    assert token_distillation(s, t, keep, "mse").item() == pytest.approx(mse / 9, rel=1e-6)
    # the dead rows never matter
    t2 = t.clone()
    t2[0, 1] += 100.0
    assert token_distillation(s, t2, keep, "kl").item() == pytest.approx(kl / 3, rel=1e-6)
    s.requires_grad_(True)
    none = token_distillation(s, t, torch.zeros(2, 4), "kl")
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="kind must be one of"):
        token_distillation(s, t, keep, "l1")
    with pytest.raises(ValueError, match=r"keep must be \(B, N\)"):
        token_distillation(s, t, keep[:, :3], "kl")


def test_token_reduction_loss_combines_weighted_parts():
    torch.manual_seed(2)
    logits, teacher = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    target = torch.softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    tokens, teacher_tokens = torch.randn(4, 6, 8, dtype=torch.float64), torch.randn(4, 6, 8, dtype=torch.float64)
    keeps = [torch.bernoulli(torch.full((4, 6), 0.6, dtype=torch.float64))]
    loss = TokenReductionLoss(SoftTargetCrossEntropy(), ratio_weight=2.0, distill_weight=0.5, token_loss="kl")
    out = loss(
        logits,
        target,
        keeps=keeps,
        targets=[0.7],
        teacher_logits=teacher,
        tokens=tokens,
        teacher_tokens=teacher_tokens,
        token_keep=keeps[0],
    )
    ce = float((-target * torch.log_softmax(logits, -1)).sum(-1).mean())
    ratio = ratio_loss(keeps, [0.7]).item()
    kl = logit_distillation(logits, teacher).item()
    tok = token_distillation(tokens, teacher_tokens, keeps[0]).item()
    assert out.parts["ce"] == pytest.approx(ce) and out.parts["ratio"] == pytest.approx(ratio)
    assert out.parts["kl_cls"] == pytest.approx(kl) and out.parts["token"] == pytest.approx(tok)
    assert out.total.item() == pytest.approx(ce + 2 * ratio + 0.5 * (kl + tok))
    assert out.parts["total"] == pytest.approx(out.total.item())
    plain = TokenReductionLoss(SoftTargetCrossEntropy(), ratio_weight=0, distill_weight=0)
    assert set(plain(logits, target).parts) == {"ce", "total"}


def test_token_reduction_loss_refuses_missing_inputs():
    logits, target = torch.randn(2, 3), torch.softmax(torch.randn(2, 3), -1)
    with pytest.raises(ValueError, match="ratio_weight > 0 needs keeps and targets"):
        TokenReductionLoss(SoftTargetCrossEntropy(), distill_weight=0)(logits, target)
    with pytest.raises(ValueError, match="distill_weight > 0 needs teacher_logits"):
        TokenReductionLoss(SoftTargetCrossEntropy(), ratio_weight=0)(logits, target)
    with pytest.raises(ValueError, match="a token loss needs tokens"):
        TokenReductionLoss(SoftTargetCrossEntropy(), ratio_weight=0)(logits, target, teacher_logits=logits)
    with pytest.raises(ValueError, match="token_loss must be one of"):
        TokenReductionLoss(SoftTargetCrossEntropy(), token_loss="l2")

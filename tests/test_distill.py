"""Distillation losses against a hand computation (plain exp/log/sum in float64, no F.kl_div)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcompress.distill import kd_loss, kd_loss_from_log_probs, soft_target_loss, teacher_log_probs


def hand_log_softmax(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    z = x - x.max(dim=1, keepdim=True).values
    return z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), mean over the batch; no T^2."""
    log_s = hand_log_softmax(student.double() / T)
    log_t = hand_log_softmax(teacher.double() / T)
    p_t = torch.exp(log_t)
    return (p_t * (log_t - log_s)).sum(dim=1).sum() / student.shape[0]


def hand_ce(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_p = hand_log_softmax(student)
    return -log_p[torch.arange(len(targets)), targets].sum() / len(targets)


def logits(seed: int, n: int = 16, c: int = 10, scale: float = 3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=dtype) * scale
    t = torch.randn(n, c, generator=g, dtype=dtype) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 0.5), (8.0, 0.9), (0.5, 0.7)])
def test_kd_loss_matches_hand_computation_float64(seed, T, alpha):
    s, t, y = logits(seed)
    expected = alpha * T * T * hand_kl(s, t, T) + (1 - alpha) * hand_ce(s, y)
    got = kd_loss(s, t, y, temperature=T, alpha=alpha)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


# random batches for the property tests: logits of n samples over c classes at a given scale, T and alpha
LOSS_CASES = {
    "seed": st.integers(0, 2**31 - 1),
    "T": st.floats(0.25, 20.0),
    "alpha": st.floats(0.0, 1.0),
    "n": st.integers(1, 9),
    "c": st.integers(2, 12),
    "scale": st.floats(0.01, 50.0),
}


@settings(max_examples=40, deadline=None)
@given(**LOSS_CASES)
def test_kd_loss_matches_hand_computation_property(seed, T, alpha, n, c, scale):
    s, t, y = logits(seed, n=n, c=c, scale=scale, dtype=torch.float64)
    expected = alpha * T * T * hand_kl(s, t, T) + (1 - alpha) * hand_ce(s, y)
    got = kd_loss(s, t, y, temperature=T, alpha=alpha)
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(expected.item(), rel=1e-8, abs=1e-9)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
def test_soft_target_loss_is_T_squared_times_kl(T):
    s, t, _ = logits(7)
    kl = hand_kl(s, t, T)
    got = soft_target_loss(s, t, T)
    assert got.item() == pytest.approx(T * T * kl.item(), rel=1e-10)
    assert kl.item() > 0  # the check is not trivially 0 == 0


def test_soft_target_loss_T_scaling_across_temperatures():
    """Doubling T changes the loss by the KL ratio times 4, not just by the KL ratio."""
    s, t, _ = logits(11)
    for T in (1.0, 2.0, 4.0):
        ratio = soft_target_loss(s, t, 2 * T) / soft_target_loss(s, t, T)
        kl_ratio = hand_kl(s, t, 2 * T) / hand_kl(s, t, T)
        assert ratio.item() == pytest.approx(4.0 * kl_ratio.item(), rel=1e-9)


def test_soft_target_loss_zero_when_student_equals_teacher():
    s, _, _ = logits(3)
    assert soft_target_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_alpha_zero_is_cross_entropy(seed):
    s, t, y = logits(seed)
    got = kd_loss(s, t, y, temperature=4.0, alpha=0.0)
    assert float(got) == pytest.approx(hand_ce(s, y).item(), rel=1e-10)
    assert float(got) == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-10)
    # the teacher plays no part
    assert float(kd_loss(s, t * 5 + 1, y, temperature=4.0, alpha=0.0)) == pytest.approx(float(got), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_alpha_one_is_soft_term(seed):
    s, t, y = logits(seed)
    got = kd_loss(s, t, y, temperature=4.0, alpha=1.0)
    assert float(got) == pytest.approx(soft_target_loss(s, t, 4.0).item(), rel=1e-12)
    assert float(got) == pytest.approx(16.0 * hand_kl(s, t, 4.0).item(), rel=1e-10)
    # the labels play no part
    assert float(kd_loss(s, t, (y + 1) % s.shape[1], temperature=4.0, alpha=1.0)) == pytest.approx(
        float(got), rel=1e-12
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gradient_reaches_student_not_teacher(alpha):
    s, t, y = logits(5, dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t, y, temperature=4.0, alpha=alpha).backward()
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()


def test_student_gradient_matches_hand_gradient():
    s, t, y = logits(9)
    T, alpha = 4.0, 0.5
    s1 = s.clone().requires_grad_(True)
    kd_loss(s1, t, y, temperature=T, alpha=alpha).backward()
    s2 = s.clone().requires_grad_(True)
    (alpha * T * T * hand_kl(s2, t, T) + (1 - alpha) * hand_ce(s2, y)).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_are_numerically_stable(T, dtype):
    s, t, y = logits(2, scale=1000.0, dtype=dtype)
    s.requires_grad_(True)
    loss = kd_loss(s, t, y, temperature=T, alpha=0.5)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    soft = soft_target_loss(s.detach(), t, T)
    assert torch.isfinite(soft) and soft.item() >= 0
    expected = 0.5 * T * T * hand_kl(s.detach(), t, T) + 0.5 * hand_ce(s.detach(), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # huge, identical logits: loss is exactly the CE part, the soft part zero
    same = soft_target_loss(t, t.clone(), T)
    assert same.item() == pytest.approx(0.0, abs=1e-3)


# ---------------------------------------------------------------- the fused loss's closed-form gradient


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (4.0, 0.5), (2.0, 0.9), (0.5, 1.0)])
def test_fused_gradient_passes_gradcheck(T, alpha):
    """kd_loss's hand-written backward against finite differences (float64)."""
    s, t, y = logits(13, n=6, c=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, y, temperature=T, alpha=alpha), (s,))


@settings(max_examples=40, deadline=None)
@given(**LOSS_CASES, upstream=st.floats(-3.0, 3.0))
def test_fused_gradient_matches_autograd_of_the_plain_formula(seed, T, alpha, n, c, scale, upstream):
    """The same gradient as autograd through log_softmax, kl_div and cross_entropy, scaled by any upstream factor."""
    s, t, y = logits(seed, n=n, c=c, scale=scale)
    s1 = s.clone().requires_grad_(True)
    (kd_loss(s1, t, y, temperature=T, alpha=alpha) * upstream).backward()
    s2 = s.clone().requires_grad_(True)
    plain = alpha * soft_target_loss(s2, t, T) + (1 - alpha) * torch.nn.functional.cross_entropy(s2, y)
    (plain * upstream).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-7, atol=1e-10)


def test_teacher_ruling_a_class_out_gives_finite_loss_and_gradient():
    """A teacher logit of -inf (log-probability -inf, probability 0) adds nothing, not 0 * -inf = nan."""
    s, _, y = logits(4, n=4, c=3, dtype=torch.float32)
    t = torch.tensor([[0.0, 1.0, -float("inf")]] * 4)
    assert torch.isnan(soft_target_loss(s, t, 2.0))  # the plain formula fails here
    s.requires_grad_(True)
    loss = kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    finite_t = t.clamp_min(-1e4)  # the same teacher up to a probability far below float32's resolution
    expected = 0.5 * 4.0 * hand_kl(s.detach(), finite_t, 2.0) + 0.5 * hand_ce(s.detach(), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cached_log_probs_give_the_same_loss_and_gradient():
    s, t, y = logits(21)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    a = kd_loss(s1, t, y, temperature=3.0, alpha=0.4)
    b = kd_loss_from_log_probs(s2, teacher_log_probs(t, 3.0), y, temperature=3.0, alpha=0.4)
    a.backward()
    b.backward()
    assert a.item() == b.item()
    assert torch.equal(s1.grad, s2.grad)


def test_mismatched_shapes_are_refused():
    s, t, y = logits(1, c=10)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss_from_log_probs(s, teacher_log_probs(t[:, :5], 2.0), y, 2.0, 0.5)

"""The oracle itself: hand-derived closed forms and the properties METHODS.md states."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdkernels.reference as R

f64 = torch.float64


def two_class(ds, dt):
    """Rows [0, ds] and [0, dt]: softmax is a sigmoid, so KL has a closed form."""
    return torch.tensor([[0.0, ds]], dtype=f64), torch.tensor([[0.0, dt]], dtype=f64)


def kl_bernoulli(a, b):
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("ds,dt,T", [(1.0, 2.0, 1.0), (-3.0, 0.5, 4.0), (0.0, 0.0, 2.0)])
def test_kd_two_classes_closed_form(ds, dt, T):
    s, t = two_class(ds, dt)
    y = torch.tensor([1])
    loss = R.kd_loss(s, t, y, temperature=T, kd_weight=0.7, ce_weight=0.2)
    expected = (0.7 * T * T * kl_bernoulli(sigmoid(dt / T), sigmoid(ds / T))
                + 0.2 * -math.log(sigmoid(ds)))
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_swap_two_classes_closed_form():
    # teacher prefers class 0, label is 1: swapping gives the mirrored teacher
    s, t = two_class(0.3, -2.0)
    y = torch.tensor([1])
    T = 2.0
    loss, stats = R.distillation_loss(s, t, y, T, kd_weight=1.0, ce_weight=0.0, correction="swap")
    expected = T * T * kl_bernoulli(sigmoid(2.0 / T), sigmoid(0.3 / T))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert not stats["teacher_correct"].item() and not stats["still_wrong"].item()


def test_rectify_two_classes_closed_form():
    # two classes: q_a + q_b = 1, so q'_a = (q_a + 1) / 2 and q'_b = q_b / 2 need no rescaling
    s, t = two_class(0.5, -1.0)
    y = torch.tensor([1])
    T = 1.5
    q_a = sigmoid(-1.0 / T)
    loss, _ = R.distillation_loss(s, t, y, T, kd_weight=1.0, ce_weight=0.0, correction="rectify")
    expected = T * T * kl_bernoulli((q_a + 1) / 2, sigmoid(0.5 / T))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_smooth_two_classes_closed_form():
    s, t = two_class(0.5, -1.0)
    y = torch.tensor([1])
    eps, T = 0.2, 3.0
    loss, _ = R.distillation_loss(s, t, y, T, kd_weight=1.0, ce_weight=0.0, correction="smooth",
                                  smooth_eps=eps)
    target = 1 - eps + eps / 2  # on the label; not tempered
    expected = T * T * kl_bernoulli(target, sigmoid(0.5 / T))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_tfkd_virtual_teacher_closed_form():
    s = torch.tensor([[0.2, -0.4, 1.0]], dtype=f64)
    y = torch.tensor([2])
    a, T = 0.9, 10.0
    pd = torch.tensor([0.05, 0.05, 0.9], dtype=f64)
    q = torch.softmax(torch.log(pd) / T, -1)
    p = torch.softmax(s[0] / T, -1)
    expected = 0.9 * T * T * (q * (q / p).log()).sum() - 0.1 * torch.log_softmax(s[0], -1)[2]
    assert R.tfkd_reg_loss(s, y, a=a, temperature=T).item() == pytest.approx(expected.item(),
                                                                               rel=1e-12)


def test_top_score_difference_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=f64))
    y = torch.tensor([1])
    loss = R.top_score_difference_loss(logits, y, eta=0.6, k=3)
    expected = 0.6 * -math.log(0.2) + 0.4 * (0.5 - (0.2 + 0.2) / 2)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_teacher_bias_weights_by_hand():
    # row 0: teacher right (easy), row 1: teacher wrong (hard)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64)
    t = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=f64)
    y = torch.tensor([0, 1])
    gamma, T = 0.25, 1.0
    loss = R.teacher_bias_loss(s, t, y, gamma, temperature=T)
    q = sigmoid(2.0)
    easy = kl_bernoulli(q, sigmoid(1.0))
    q_rect = (1 - q + 1) / 2  # two classes: no rescaling, on the label
    hard = kl_bernoulli(q_rect, sigmoid(1.0))
    ce = -math.log(sigmoid(1.0))
    expected = ((1 - gamma) * 2 * ce + (1 - gamma) * easy + gamma * hard) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@st.composite
def rows(draw, max_c=40):
    N, C = draw(st.integers(1, 8)), draw(st.integers(2, max_c))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    return (torch.randn(N, C, generator=g, dtype=f64) * scale,
            torch.randn(N, C, generator=g, dtype=f64) * scale,
            torch.randint(0, C, (N,), generator=g))


@settings(max_examples=80)
@given(rows(), st.floats(0.5, 10), st.sampled_from([None, "swap", "smooth", "rectify"]))
def test_kl_is_nonnegative(inputs, T, correction):
    s, t, y = inputs
    loss, _ = R.distillation_loss(s, t, y, T, kd_weight=1.0, ce_weight=0.0, correction=correction,
                                  reduction="none")
    assert (loss >= -1e-12).all()


def _targets(s, t, y, T, correction):
    """The corrected teacher distribution, read off the reference through its gradient."""
    s = s.clone().requires_grad_()
    loss, _ = R.distillation_loss(s, t, y, T, kd_weight=1.0, ce_weight=0.0, correction=correction,
                                  t2_scale=False, reduction="sum")
    (g,) = torch.autograd.grad(loss, s)
    return torch.softmax(s.detach() / T, -1) - g * T  # grad = (p - target) / T


@settings(max_examples=60)
@given(rows(), st.floats(0.5, 8))
def test_swap_touches_wrong_rows_only_and_crowns_the_label(inputs, T):
    s, t, y = inputs
    q = torch.softmax(t / T, -1)
    target = _targets(s, t, y, T, "swap")
    wrong = t.gather(1, y[:, None])[:, 0] < t.max(-1).values
    torch.testing.assert_close(target[~wrong], q[~wrong])
    if wrong.any():
        tw, yw = target[wrong], y[wrong]
        assert torch.allclose(tw.gather(1, yw[:, None])[:, 0], tw.max(-1).values)
        # a permutation: the same multiset of values
        torch.testing.assert_close(tw.sort(-1).values, q[wrong].sort(-1).values)


@settings(max_examples=60)
@given(rows(), st.floats(0.5, 8))
def test_rectify_keeps_sums_and_other_classes(inputs, T):
    s, t, y = inputs
    q = torch.softmax(t / T, -1)
    target = _targets(s, t, y, T, "rectify")
    torch.testing.assert_close(target.sum(-1), torch.ones(len(y), dtype=f64))
    b = t.argmax(-1)
    wrong = t.gather(1, y[:, None])[:, 0] < t.max(-1).values
    keep = torch.ones_like(q, dtype=torch.bool)
    keep[torch.arange(len(y)), y] = False
    keep[torch.arange(len(y)), b] = False
    torch.testing.assert_close(target[keep], q[keep])
    torch.testing.assert_close(target[~wrong], q[~wrong])
    # the label gains and the wrong argmax loses
    r = torch.arange(len(y))
    assert (target[r, y][wrong] >= q[r, y][wrong] - 1e-12).all()
    assert (target[r, b][wrong] <= q[r, b][wrong] + 1e-12).all()


@settings(max_examples=60)
@given(rows(), st.floats(0.1, 10), st.floats(0, 5), st.floats(0.05, 1))
def test_dtd_cosine_temperature_within_bounds(inputs, tau0, beta, tau_min):
    s, t, _ = inputs
    tau_min = min(tau_min, tau0)
    tau = R.dtd_temperature(s, t, tau0, beta, "cosine", False, tau_min)
    assert (tau >= tau_min - 1e-12).all() and (tau <= tau0 + 1e-12).all()


@settings(max_examples=60)
@given(rows(), st.floats(0.5, 10), st.booleans())
def test_gradient_of_t2_kl_is_t_times_p_minus_q(inputs, T, t2_scale):
    s, t, _ = inputs
    s = s.clone().requires_grad_()
    loss = R.kd_loss(s, t, temperature=T, kd_weight=1.0, ce_weight=0.0, t2_scale=t2_scale,
                     reduction="sum")
    (g,) = torch.autograd.grad(loss, s)
    p, q = torch.softmax(s.detach() / T, -1), torch.softmax(t / T, -1)
    torch.testing.assert_close(g, (T if t2_scale else 1 / T) * (p - q))


@settings(max_examples=40)
@given(rows(), st.floats(0.5, 8))
def test_reductions_and_ignore_index(inputs, T):
    s, t, y = inputs
    y = y.clone()
    y[0] = -100
    rows_ = R.kd_loss(s, t, y, temperature=T, reduction="none")
    assert rows_[0] == 0
    valid = y != -100
    torch.testing.assert_close(R.kd_loss(s, t, y, temperature=T, reduction="sum"), rows_.sum())
    mean = R.kd_loss(s, t, y, temperature=T, reduction="mean")
    torch.testing.assert_close(mean, rows_.sum() / valid.sum().clamp(min=1))


def test_general_form_equals_the_method_forms():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, 11, generator=g, dtype=f64), torch.randn(9, 11, generator=g, dtype=f64)
    y = torch.randint(0, 11, (9,), generator=g)
    torch.testing.assert_close(
        R.teacher_bias_loss(s, t, y, 0.3, temperature=2.0),
        R.distillation_loss(s, t, y, 2.0, kd_weight=0.7, ce_weight=0.7, wrong_kd_weight=0.3,
                            correction="rectify")[0])
    torch.testing.assert_close(
        R.tfkd_reg_loss(s, y, a=0.95, temperature=15.0),
        R.distillation_loss(s, None, y, 15.0, virtual_teacher=0.95)[0])
    torch.testing.assert_close(R.kd_loss(s, t, y, temperature=3.0),
                               R.distillation_loss(s, t, y, 3.0)[0])

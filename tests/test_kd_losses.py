"""KD losses against independent computations (torch.distributions, numpy), top-k = full at k = V, chunking."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from distill.losses import KD_LOSSES, KDSpec, TeacherSide, chunked_kd_loss, kd_from_logits, kd_from_topk

V = 37


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_and_reverse_kl_match_torch_distributions(logits, temperature):
    s, t = logits
    fwd = kd_from_logits(s, t, KDSpec("forward_kl", temperature))
    rev = kd_from_logits(s, t, KDSpec("reverse_kl", temperature))
    teacher, student = Categorical(logits=t / temperature), Categorical(logits=s / temperature)
    torch.testing.assert_close(fwd, kl_divergence(teacher, student) * temperature**2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rev, kl_divergence(student, teacher) * temperature**2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_numpy(logits, beta):
    s, t = logits
    got = kd_from_logits(s, t, KDSpec("jsd", 1.5, beta)).numpy()
    p_t, p_s = _softmax(t.double().numpy() / 1.5), _softmax(s.double().numpy() / 1.5)
    m = beta * p_t + (1 - beta) * p_s
    want = (beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)) * 1.5**2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert (got > 0).all() and (got <= np.log(2) * 1.5**2 + 1e-6).all()  # a JSD is bounded by log 2 (times T^2)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_divergence_is_zero_iff_student_equals_teacher(logits, name):
    s, t = logits
    assert kd_from_logits(t, t, KDSpec(name)).abs().max() < 1e-5
    assert (kd_from_logits(s, t, KDSpec(name)) > 1e-3).all()


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_topk_with_k_equal_vocab_equals_full_logits(logits, name):
    s, t = logits
    spec = KDSpec(name, temperature=2.0, beta=0.3)
    cached_logp = torch.log_softmax(t, -1).half()  # what the offline cache stores: T=1 log-probs in fp16
    ids = torch.arange(V).expand(6, V)
    torch.testing.assert_close(kd_from_topk(s, ids, cached_logp, spec), kd_from_logits(s, t, spec), rtol=2e-3, atol=2e-3)
    perm = torch.randperm(V)  # the support's order must not matter
    torch.testing.assert_close(kd_from_topk(s, ids[:, perm], cached_logp[:, perm], spec), kd_from_logits(s, t, spec), rtol=2e-3, atol=2e-3)


def test_topk_forward_kl_ignores_tokens_outside_the_support_only_through_normalisation(logits):
    s, t = logits
    k = 5
    top_logp, top_ids = torch.log_softmax(t, -1).topk(k, -1)
    got = kd_from_topk(s, top_ids, top_logp, KDSpec("forward_kl"))
    p_t = torch.softmax(top_logp, -1)  # teacher renormalised over its top-k
    log_q = torch.log_softmax(s, -1).gather(-1, top_ids)  # student over the full vocabulary
    torch.testing.assert_close(got, (p_t * (p_t.log() - log_q)).sum(-1))


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_loss_and_gradients_equal_unchunked_reference(chunk_size):
    torch.manual_seed(0)
    n, h = 11, 8
    head_s, head_t = torch.nn.Linear(h, V, bias=False), torch.nn.Linear(h, V, bias=False)
    hidden_s = torch.randn(n, h, requires_grad=True)
    hidden_t = torch.randn(n, h)
    targets = torch.randint(0, V, (n,))
    ce_mask = torch.rand(n) > 0.3
    spec = KDSpec("jsd", 2.0, 0.4)

    loss, parts = chunked_kd_loss(hidden_s, head_s, targets, TeacherSide(hidden=hidden_t, head=head_t), spec, 0.25, ce_mask, chunk_size)
    loss.backward()
    got_grad, got_head_grad = hidden_s.grad.clone(), head_s.weight.grad.clone()

    hidden_s.grad = None
    head_s.weight.grad = None
    logits = head_s(hidden_s)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[ce_mask].sum()
    kd = kd_from_logits(logits, head_t(hidden_t).detach(), spec).sum()
    want = 0.75 * kd + 0.25 * ce
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts["ce_sum"], ce.detach())
    torch.testing.assert_close(parts["kd_sum"], kd.detach())
    torch.testing.assert_close(got_grad, hidden_s.grad)
    torch.testing.assert_close(got_head_grad, head_s.weight.grad)
    assert head_t.weight.grad is None  # the teacher stays frozen


def test_without_teacher_the_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, V, (5,))
    loss, parts = chunked_kd_loss(hidden, head, targets, None, KDSpec(), ce_weight=0.0, chunk_size=2)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))
    assert parts["kd_sum"] == 0

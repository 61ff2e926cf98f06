"""Logit-distillation losses: small registered pure functions, plus the chunked driver that feeds them.

A divergence takes log-probabilities of the student and the teacher over the same support
(the full vocabulary, or the teacher's cached top-k tokens) and returns one loss per token:

    @register_kd_loss("forward_kl")
    def forward_kl(student_logp, teacher_logp, beta): ...   # [N, K], [N, K] -> [N]

``chunked_kd_loss`` projects hidden states through the lm_heads a chunk of tokens at a time under
activation checkpointing, so the [tokens, vocab] logits of student and teacher exist for one chunk
only, in the forward and in the backward (where the chunk is recomputed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
KD_LOSSES: dict[str, Divergence] = {}


def register_kd_loss(name: str) -> Callable[[Divergence], Divergence]:
    def add(fn: Divergence) -> Divergence:
        KD_LOSSES[name] = fn
        return fn

    return add


@register_kd_loss("forward_kl")
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(teacher || student): mean-seeking, the student covers every mode the teacher has."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


@register_kd_loss("reverse_kl")
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(student || teacher): mode-seeking, the student puts mass only where the teacher does."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


@register_kd_loss("jsd")
def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta * KL(teacher || m) + (1 - beta) * KL(student || m) with m = beta * teacher + (1 - beta) * student (GKD)."""
    mixture_logp = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0
    )
    return beta * forward_kl(mixture_logp, teacher_logp) + (1 - beta) * forward_kl(mixture_logp, student_logp)


# --------------------------------------------------------------------------------------------
# One chunk: logits -> per-token KD and CE
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KDSpec:
    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd only

    def divergence(self) -> Divergence:
        if self.loss not in KD_LOSSES:
            raise KeyError(f"unknown KD loss {self.loss!r}; registered: {', '.join(KD_LOSSES)}")
        return KD_LOSSES[self.loss]


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of logits / T (bf16 autocast never reduces a softmax over the vocabulary in bf16)."""
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def kd_from_log_probs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, spec: KDSpec) -> torch.Tensor:
    """Per-token KD from log-probs already taken at temperature T, scaled by T^2 so gradients keep their size as T changes."""
    return spec.divergence()(student_logp, teacher_logp, spec.beta) * spec.temperature**2


def kd_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: KDSpec) -> torch.Tensor:
    """Per-token KD over the full vocabulary."""
    t = spec.temperature
    return kd_from_log_probs(tempered_log_probs(student_logits, t), tempered_log_probs(teacher_logits, t), spec)


def kd_from_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, spec: KDSpec,
                 student_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KD against cached teacher top-k log-probs (taken at T=1 over the full vocabulary).

    The teacher is renormalised over its top-k support at temperature T (exact when k = vocabulary,
    because log p = z - log Z makes softmax(log p / T) = softmax(z / T)). The student keeps its
    full-vocabulary log-probs, gathered on that support, so mass it puts elsewhere is still penalised
    by forward KL. ``student_logp`` (the student's full log-probs at T) saves recomputing them.
    """
    t = spec.temperature
    if student_logp is None:
        student_logp = tempered_log_probs(student_logits, t)
    teacher_logp = F.log_softmax(topk_logp.float() / t, dim=-1)
    return kd_from_log_probs(student_logp.gather(-1, topk_ids.long()), teacher_logp, spec)


def nll_from_log_probs(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE from T=1 log-probs: a gather, so KD and CE share one [tokens, vocab] log-softmax."""
    return -log_probs.gather(-1, targets[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Chunked driver
# --------------------------------------------------------------------------------------------
@dataclass
class TeacherSide:
    """What the teacher contributes for the selected tokens: hidden states + head, or cached top-k."""

    hidden: torch.Tensor | None = None  # [N, H_teacher], no grad
    head: torch.nn.Module | None = None
    topk_ids: torch.Tensor | None = None  # [N, k]
    topk_logp: torch.Tensor | None = None  # [N, k]

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, ...]:
        if self.hidden is not None:
            return (self.hidden[start:end],)
        return self.topk_ids[start:end], self.topk_logp[start:end]


def chunked_kd_loss(
    student_hidden: torch.Tensor,  # [N, H] final hidden states at the trained positions (with grad)
    student_head: torch.nn.Module,
    targets: torch.Tensor,  # [N] next tokens (for CE)
    teacher: TeacherSide | None,  # None: CE only (data-based distillation)
    spec: KDSpec,
    ce_weight: float,  # loss = (1 - ce_weight) * KD + ce_weight * CE
    ce_mask: torch.Tensor | None = None,  # [N] bool: tokens that take CE (on-policy samples do not)
    chunk_size: int = 512,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over the N tokens, and the summed KD / CE parts (detached) for logging."""
    kd_w = 0.0 if teacher is None else 1.0 - ce_weight
    ce_w = 1.0 if teacher is None else ce_weight
    if ce_mask is None:
        ce_mask = torch.ones_like(targets, dtype=torch.bool)
    t = spec.temperature

    def chunk_loss(h: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor, *teacher_chunk: torch.Tensor) -> torch.Tensor:
        # Peak memory is a handful of [chunk, vocab] fp32 buffers: the student's log-softmax (shared by CE
        # at T=1), the teacher's no-grad log-probs and the divergence's temporaries.
        logits = student_head(h)
        logp_t1 = tempered_log_probs(logits, 1.0)
        ce = nll_from_log_probs(logp_t1, tgt) * mask
        if teacher is None:
            return torch.stack([ce.sum(), ce.new_zeros(())])
        student_logp = logp_t1 if t == 1.0 else tempered_log_probs(logits, t)
        if teacher.hidden is not None:
            with torch.no_grad():  # the teacher's logits exist for this chunk only and never join the graph
                teacher_logp = tempered_log_probs(teacher.head(teacher_chunk[0]), t)
            kd = kd_from_log_probs(student_logp, teacher_logp, spec)
        else:
            kd = kd_from_topk(logits, *teacher_chunk, spec, student_logp=student_logp)
        return torch.stack([ce.sum(), kd.sum()])

    totals = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        end = min(start + chunk_size, targets.numel())
        extra = teacher.chunk(start, end) if teacher is not None else ()
        args = (student_hidden[start:end], targets[start:end], ce_mask[start:end], *extra)
        part = checkpoint(chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(*args)
        totals = totals + part
    ce_sum, kd_sum = totals[0], totals[1]
    loss = ce_w * ce_sum + kd_w * kd_sum
    return loss, {"ce_sum": ce_sum.detach(), "kd_sum": kd_sum.detach()}

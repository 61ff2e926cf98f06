"""Token-level losses as small pure functions.

The one subtle piece is ``chunked_cross_entropy``: the logits of a batch are ``[tokens, vocab]``
(for SmolLM2, 49152 floats per token: 8K tokens already make 1.6 GB in fp32, more than the whole
135M model), so they must never exist at once. Two paths, same numbers:

* **Fused linear + cross-entropy** (``fused_linear_cross_entropy``, the technique of Liger's
  FusedLinearCrossEntropy and Unsloth; our own code). When the head is a plain ``nn.Linear`` whose
  weight is an ordinary tensor, a ``torch.autograd.Function`` walks the tokens chunk by chunk *in
  the forward*: logits of the chunk (in the dtype the autocast matmul would use), the per-token loss
  in fp32 (logsumexp - target logit), and at once the gradient w.r.t. those logits (softmax - onehot,
  computed in place in the fp32 buffer, then cast to the logits dtype), which goes straight into
  ``grad_hidden[chunk] = grad_logits @ W`` and, for a trainable head, ``grad_W += grad_logits^T @ h``
  (fp32 accumulator). Only ``grad_hidden`` (and ``grad_W``, ``grad_b``) are saved; the backward just
  scales them by the incoming gradient. No logits are recomputed and no logits tensor outlives its
  chunk: at most one chunk's logits in the compute dtype plus one fp32 copy are alive.
* **Checkpointed fallback** (``checkpointed_cross_entropy``): each chunk's ``cross_entropy_sum``
  inside ``torch.utils.checkpoint``; the backward calls the head again. Used for any head that must
  run *as a module* (FSDP2 DTensor weights, DeepSpeed ZeRO-3 partitioned parameters, PEFT/LoRA
  wrappers, heads with hooks or an overridden ``forward``), where reading ``.weight`` directly would
  skip the gather or the adapter.

Why fused: on an H200 (SmolLM2-135M, vocab 49,152, LoRA, bf16 autocast, 2048-token packed rows)
the checkpointed path peaked at 1.265 GiB against TRL's 1.172 GiB, the difference being the CE
backward, where one chunk held the recomputed bf16 logits, their fp32 copy, the fp32 softmax
gradient and the bf16 gradient at once (~12 bytes x chunk x vocab, on top of a second head matmul).
The fused path holds ~6 bytes x chunk x vocab, only inside the forward, and does one head matmul
per chunk instead of two.

Without autograd (``torch.no_grad()``, evaluation, or nothing requiring grad) the loss is summed
chunk by chunk through ``head`` with no checkpoint and no gradient work.

Every function returns the *sum* over tokens: dividing by the token count of the whole accumulation
window is the trainer's job (see ``trainer.methods``), which is what makes accumulation exact.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

Head = Callable[[torch.Tensor], torch.Tensor]  # [N, H] hidden -> [N, V] logits (the LM head)


def shift_for_next_token(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each position's hidden state with the *next* token's label and keep only trained pairs.

    ``labels`` are aligned with the inputs (HF convention): position t predicts ``labels[t + 1]``.
    Dropping ignored positions before the head means prompt and padding tokens cost no LM-head
    FLOPs at all. Returns ``hidden [N, H]`` and ``targets [N]``.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Head) -> torch.Tensor:
    """Plain summed CE: all logits at once (the reference the chunked version must equal)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _is_linear_class(head: Head) -> bool:
    """An ``nn.Linear`` whose class keeps Linear's own forward (not PEFT's or bitsandbytes' subclasses)."""
    return isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward


def _plain_weight(head: Head) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` when ``head`` is a plain ``nn.Linear`` the fused path may bypass, else None.

    Bypassing means never calling the module, so anything that works through the call is excluded:
    an overridden ``forward`` (PEFT LoRA layers, bitsandbytes ``Linear4bit``/``Linear8bitLt``), an
    instance-level ``forward`` (accelerate hooks), forward hooks or pre-hooks (ZeRO-3 gathers,
    user hooks), DTensor weights (FSDP2) and DeepSpeed ZeRO-3 partitioned parameters (``ds_id``).
    """
    if not _is_linear_class(head):
        return None
    if "forward" in vars(head) or head._forward_hooks or head._forward_pre_hooks:
        return None
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return None
    params = [p for p in (head.weight, head.bias) if p is not None]
    for p in params:
        if type(p) not in (torch.Tensor, torch.nn.Parameter) or hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            return None  # DTensor (FSDP2), ZeRO-3 parameter, or some other tensor subclass
        if p.is_meta:
            return None
    return head.weight, head.bias


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` produces here: the autocast dtype when autocast would cast it."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T + bias`` whose gradients are computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, compute_dtype):
        n, device = hidden.shape[0], hidden.device
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax / logsumexp / accumulators: fp32 at least
        with torch.autocast(device.type, enabled=False):  # every cast below is explicit
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
            total = torch.zeros((), dtype=acc, device=device)
            step = n if chunk_size <= 0 else chunk_size
            for start in range(0, n, step):
                h = hidden[start: start + step].to(compute_dtype)
                y = targets[start: start + step]
                logits = F.linear(h, w, b)  # [c, V] in the compute dtype, exactly as head(h) would be
                logits32 = logits.to(acc)  # the only fp32 [c, V] buffer (aliases logits when already fp32)
                # logsumexp, softmax and its gradient all in place in that buffer (torch.logsumexp
                # would allocate a second [c, V] temporary): shift by the row max, exp, normalize
                keep = y != IGNORE_INDEX
                safe_y = torch.where(keep, y, 0).unsqueeze(1)
                logits32.sub_(logits32.amax(dim=1, keepdim=True))
                shifted_target = logits32.gather(1, safe_y).squeeze(1)
                grad = logits32.exp_()
                denom = grad.sum(dim=1)  # lse = max + log(denom)
                total += torch.where(keep, denom.log() - shifted_target, 0.0).sum()
                # d loss / d logits = softmax - onehot; an ignored token's row is divided by inf (zeroed)
                grad.div_(torch.where(keep, denom, float("inf")).unsqueeze(1))
                grad.scatter_add_(1, safe_y, keep.to(grad.dtype).neg().unsqueeze(1))
                if logits.dtype != acc:
                    grad = logits.copy_(grad)  # back into the compute-dtype buffer; the fp32 one is freed
                del logits32, logits
                if want_h:
                    grad_h[start: start + step] = grad @ w
                if want_w:
                    grad_w += grad.t() @ h  # fp32 accumulation across chunks (the product is in the compute dtype)
                if want_b:
                    grad_b += grad.sum(0, dtype=acc)
                del grad
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss  # noqa: E731  (keeps g's dtype)
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               chunk_size: int) -> torch.Tensor:
    """Summed CE of ``F.linear(hidden, weight, bias)`` with the gradients taken in the forward (see the module docstring).

    Honors autocast like ``F.linear`` would (logits in the autocast dtype), reduces in fp32, ignores
    ``IGNORE_INDEX`` targets. Gradients come back in the dtypes of ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, _compute_dtype(hidden, weight))


def checkpointed_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk_size: int) -> torch.Tensor:
    """Summed CE with ``head`` called as a module on each chunk inside ``torch.utils.checkpoint`` (the fallback).

    ``chunk_size <= 0`` or ``N <= chunk_size`` is ``cross_entropy_sum`` (nothing to save). Logits are
    upcast to fp32 inside the chunk, so bf16 autocast never reduces the softmax in bf16.
    """
    n = hidden.shape[0]
    if n == 0:  # a micro-batch with no trained token still has to join the graph (DDP expects grads)
        return hidden.sum() * 0.0
    if chunk_size <= 0 or n <= chunk_size:
        return cross_entropy_sum(hidden, targets, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        h, y = hidden[start: start + chunk_size], targets[start: start + chunk_size]
        # use_reentrant=False: the head's weight may be frozen or tied, and the chunk output is a
        # scalar, so the only thing saved per chunk is its slice of hidden states.
        total = total + checkpoint(cross_entropy_sum, h, y, head, use_reentrant=False)
    return total


def _chunked_cross_entropy_no_grad(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk_size: int) -> torch.Tensor:
    """The summed CE for evaluation: chunk by chunk through ``head``, nothing kept for a backward."""
    n = hidden.shape[0]
    step = n if chunk_size <= 0 else chunk_size
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        total += cross_entropy_sum(hidden[start: start + step], targets[start: start + step], head)
    return total


def _needs_grad(hidden: torch.Tensor, weight_bias: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    return hidden.requires_grad or any(p is not None and p.requires_grad for p in weight_bias)


def uses_fused_path(hidden: torch.Tensor, head: Head) -> bool:
    """Whether ``chunked_cross_entropy`` would take the fused linear + CE path for this head and input."""
    wb = _plain_weight(head)
    return wb is not None and torch.is_grad_enabled() and _needs_grad(hidden, wb)


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk_size: int) -> torch.Tensor:
    """Summed CE over ``[N, H]`` hidden states without ever holding more than ``chunk_size`` rows of logits.

    ``chunk_size <= 0`` or ``N <= chunk_size``: one chunk. A plain ``nn.Linear`` head takes the fused
    path (gradients in the forward, nothing recomputed); any other head (sharded, wrapped, hooked)
    the checkpointed one; without autograd the loss is just summed chunk by chunk.
    """
    if torch.is_grad_enabled() and hidden.requires_grad and _zero3_frozen_linear(head):
        return _fused_through_gathered_zero3_head(hidden, targets, head, chunk_size)
    if hidden.shape[0] == 0:  # a micro-batch with no trained token still has to join the graph (DDP expects grads)
        return hidden.sum() * 0.0
    wb = _plain_weight(head)
    if not torch.is_grad_enabled() or (wb is not None and not _needs_grad(hidden, wb)):
        return _chunked_cross_entropy_no_grad(hidden, targets, head, chunk_size)  # nothing to differentiate
    if wb is not None:
        return fused_linear_cross_entropy(hidden, targets, wb[0], wb[1], chunk_size)
    return checkpointed_cross_entropy(hidden, targets, head, chunk_size)


def _zero3_frozen_linear(head: Head) -> bool:
    """A ``nn.Linear`` head whose parameters DeepSpeed ZeRO-3 partitions and nothing trains (LoRA, frozen head)."""
    if not _is_linear_class(head):
        return False
    params = [p for p in (head.weight, head.bias) if p is not None]
    return all(hasattr(p, "ds_id") and not p.requires_grad for p in params)


def _fused_through_gathered_zero3_head(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, chunk_size: int) -> torch.Tensor:
    """The fused linear + CE on a ZeRO-3 head gathered for the forward only.

    The checkpointed fallback cannot serve a frozen ZeRO-3 head: its recompute runs inside the
    backward, where DeepSpeed leaves a parameter that needs no gradient partitioned (``torch.Size([0])``),
    and checkpoint rejects the mismatch. The fused path needs the weight only in the forward (a frozen
    weight gets no gradient; the hidden-state gradient is taken there), so gathering it around the
    call is enough. The gather is a collective: every rank calls it, even with no trained token.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in (head.weight, head.bias) if p is not None]):
        return fused_linear_cross_entropy(hidden, targets, head.weight, head.bias, chunk_size)


def causal_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Head, chunk_size: int) -> tuple[torch.Tensor, int]:
    """Next-token CE summed over trained tokens, and how many tokens that was.

    ``hidden`` is the final (normed) hidden state ``[B, T, H]``; ``labels`` ``[B, T]`` as in the data contract.
    """
    h, y = shift_for_next_token(hidden, labels)
    return chunked_cross_entropy(h, y, head, chunk_size), int(y.numel())


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in a ``[B, T]`` label batch (the SFT normalizer)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

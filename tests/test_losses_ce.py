"""The chunked cross-entropy equals the plain one (loss and gradients) and never holds the full logits.

Two paths: the fused linear + CE (a plain ``nn.Linear`` head: gradients taken in the forward, no
logits recomputed) and the checkpointed fallback (any other head, called as a module).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from trainer.losses import (IGNORE_INDEX, causal_lm_loss_sum, checkpointed_cross_entropy, chunked_cross_entropy, count_trained_tokens,
                            cross_entropy_sum, fused_linear_cross_entropy, uses_fused_path)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _problem(n=300, hidden=32, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.2)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, y, head


@pytest.mark.parametrize("chunk", [16, 64, 299, 300, 1000])
def test_chunked_equals_plain_loss_and_grads(chunk):
    h, y, head = _problem()
    ref = cross_entropy_sum(h, y, head)
    ref_gh, ref_gw = torch.autograd.grad(ref, [h, head.weight])
    got = chunked_cross_entropy(h, y, head, chunk)
    gh, gw = torch.autograd.grad(got, [h, head.weight])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_matches_hf_shifted_mean():
    """Summed over trained tokens and divided by their count, it is exactly HF's shifted mean CE."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=g)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    loss_sum, n = causal_lm_loss_sum(hidden, labels, head, chunk_size=3)
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert n == count_trained_tokens(labels) == 5 + 6  # row 0: targets 4..8; row 1: targets 1..6
    torch.testing.assert_close(loss_sum / n, expected)


def test_no_trained_tokens_gives_zero_with_a_graph():
    h, y, head = _problem(n=0)
    loss = chunked_cross_entropy(h, y, head, 8)
    loss.backward()  # still differentiable: DDP needs every rank to run backward
    assert loss.item() == 0.0 and h.grad is not None


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from trainer.losses import checkpointed_cross_entropy, chunked_cross_entropy, cross_entropy_sum
    torch.manual_seed(0)
    n, hidden, vocab = 2048, 64, 16384
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(n, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    def peak_growth(loss_fn, chunk):
        # Linux resets the peak-RSS mark (VmHWM) on "5" > clear_refs, so each phase is measured on its own
        # (ru_maxrss is a lifetime maximum: an earlier transient peak, e.g. at import, would hide the phase).
        h.grad = head.weight.grad = None
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        loss_fn(h, y, head, chunk).backward()
        return status("VmHWM") - before
    plain = lambda h, y, head, chunk: cross_entropy_sum(h, y, head)  # the whole [n, vocab] logits at once
    peak_growth(chunked_cross_entropy, 64); peak_growth(checkpointed_cross_entropy, 64)  # warm-up: allocator, autograd
    fused, ckpt = peak_growth(chunked_cross_entropy, 512), peak_growth(checkpointed_cross_entropy, 512)
    chunked, full = peak_growth(chunked_cross_entropy, 128), peak_growth(plain, 0)
    print(json.dumps({{"logits_bytes": n * vocab * 4, "chunked_growth": chunked, "full_growth": full,
                      "fused_512": fused, "ckpt_512": ckpt}}))
""")


def test_chunked_peak_memory_is_a_fraction_of_full_logits():
    """Peak RSS (fresh process): the plain CE grows by several full logits tensors, the chunked one by < 1/2 of one."""
    # a fixed mmap threshold: freed logits go back to the OS at once, so RSS tracks live tensors
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                         timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    logits = m["logits_bytes"]  # 128 MiB
    assert m["full_growth"] >= 1.5 * logits, m
    assert m["chunked_growth"] <= 0.5 * logits and m["full_growth"] >= 4 * m["chunked_growth"], m
    # 512-token chunks (32 MiB of fp32 logits): the fused path holds one chunk buffer, the fallback's
    # backward the recomputed logits, their log-softmax and its gradient at once
    assert m["fused_512"] < 0.6 * m["ckpt_512"], m


# --- the fused linear + cross-entropy against the plain reference --------------------------------------------

N, H, V = 37, 24, 50
CHUNKS = [1, 8, 16, 64, 0]


def _small(bias=False, dtype=torch.float32, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[list(ignore)] = IGNORE_INDEX
    return h, y, head


def _loss_and_grads(fn, h, y, head, chunk=None, scale=1.0):
    params = [h] + [p for p in head.parameters() if p.requires_grad]
    loss = fn(h, y, head) if chunk is None else fn(h, y, head, chunk)
    return loss.detach(), torch.autograd.grad(loss * scale, params)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_fused_equals_reference(chunk, bias):
    h, y, head = _small(bias=bias)
    assert uses_fused_path(h, head)
    ref, ref_g = _loss_and_grads(cross_entropy_sum, h, y, head)
    got, got_g = _loss_and_grads(chunked_cross_entropy, h, y, head, chunk)
    assert got.dtype == torch.float32 and len(got_g) == (3 if bias else 2)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 16, 0])
def test_fused_fp64_exact_with_ignored_targets_and_a_scaled_upstream_grad(chunk):
    """In fp64 the fused loss and gradients equal an fp64 reference to ~1e-12; ignored targets cost nothing."""
    h, y, head = _small(bias=True, dtype=torch.float64, ignore=(0, 5, 36))
    ref_fn = lambda h, y, head: torch.nn.functional.cross_entropy(head(h), y, reduction="sum")  # noqa: E731
    ref, ref_g = _loss_and_grads(ref_fn, h, y, head, scale=0.37)
    got, got_g = _loss_and_grads(chunked_cross_entropy, h, y, head, chunk, scale=0.37)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got_g[0][[0, 5, 36]].abs().max() == 0  # an ignored token gets no gradient


@pytest.mark.parametrize("chunk", [8, 0])
def test_fused_frozen_head_gives_hidden_grad_only(chunk):
    h, y, head = _small()
    head.weight.requires_grad_(False)
    ref, (ref_gh,) = _loss_and_grads(cross_entropy_sum, h, y, head)
    got = chunked_cross_entropy(h, y, head, chunk)
    got.backward()
    assert uses_fused_path(h, head) and head.weight.grad is None
    torch.testing.assert_close(got.detach(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [8, 0])
def test_fused_tied_embedding_weight_grad_sums_both_uses(chunk):
    """The head's Parameter is also the input embedding: its grad is the embedding's plus the head's."""
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(V, H)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, H, generator=g) * 0.3)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight = emb.weight  # tied, as in SmolLM2
    ids = torch.randint(0, V, (N,), generator=g)
    mix = torch.randn(H, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)

    def grads(fn):
        hidden = torch.tanh(emb(ids) @ mix)  # the embedding's output feeds the loss
        loss = fn(hidden, y, head) if fn is cross_entropy_sum else fn(hidden, y, head, chunk)
        return loss.detach(), torch.autograd.grad(loss, [emb.weight, mix])

    ref, ref_g = grads(cross_entropy_sum)
    got, got_g = grads(chunked_cross_entropy)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [8, 16, 0])
def test_fused_under_bf16_autocast_matches_checkpointed_path(chunk, bias):
    """Logits in bf16 as the autocast matmul makes them, softmax in fp32: same numbers as the fallback."""
    h, y, head = _small(bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uses_fused_path(h, head)
        ref, ref_g = _loss_and_grads(checkpointed_cross_entropy, h, y, head, chunk, scale=1 / N)
        got, got_g = _loss_and_grads(chunked_cross_entropy, h, y, head, chunk, scale=1 / N)
    exact, _ = _loss_and_grads(cross_entropy_sum, h.detach().requires_grad_(), y, head)
    assert not torch.allclose(ref, exact, rtol=1e-6, atol=0)  # autocast really did round the logits to bf16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # the same bf16 logits, reduced in fp32
    for a, b in zip(got_g, ref_g):
        assert a.dtype == b.dtype == torch.float32  # hidden's and the weight's dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_fused_bf16_weights_return_bf16_grads():
    h, y, head = _small()
    head.to(torch.bfloat16)
    hb = h.detach().to(torch.bfloat16).requires_grad_()
    ref, ref_g = _loss_and_grads(checkpointed_cross_entropy, hb, y, head, 8)
    got, got_g = _loss_and_grads(chunked_cross_entropy, hb, y, head, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(got_g, ref_g):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


class _Wrapped(torch.nn.Module):
    """A head that is not a plain Linear (e.g. a PEFT/ZeRO wrapper): must be called as a module."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class _LinearSubclass(torch.nn.Linear):
    def forward(self, x):  # an overridden forward (LoRA, quantized layers): .weight alone is not the head
        return super().forward(x) * 1.0


@pytest.mark.parametrize("kind", ["lambda", "wrapper", "subclass", "hooked"])
@pytest.mark.parametrize("chunk", [8, 0])
def test_non_plain_heads_take_the_checkpointed_fallback(kind, chunk):
    h, y, lin = _small()
    head = {"lambda": lambda x: lin(x), "wrapper": _Wrapped(lin), "subclass": _LinearSubclass(H, V, bias=False), "hooked": lin}[kind]
    if kind == "subclass":
        head.load_state_dict(lin.state_dict())
        lin = head
    if kind == "hooked":
        lin.register_forward_hook(lambda mod, args, out: out)
    assert not uses_fused_path(h, head)
    ref, ref_g = _loss_and_grads(cross_entropy_sum, h, y, lin)
    got = chunked_cross_entropy(h, y, head, chunk)
    got_g = torch.autograd.grad(got, [h, lin.weight])
    torch.testing.assert_close(got.detach(), ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_weights_are_not_fused():
    """A ZeRO-3 partitioned parameter (``ds_id``) or a tensor subclass (FSDP2's DTensor) needs the module call."""
    h, y, head = _small()
    head.weight.ds_id = 7
    assert not uses_fused_path(h, head)
    del head.weight.ds_id
    assert uses_fused_path(h, head)


def test_without_autograd_the_loss_is_plain_chunked_sum():
    h, y, head = _small()
    ref = cross_entropy_sum(h, y, head).detach()
    with torch.no_grad():
        for chunk in CHUNKS:
            assert not uses_fused_path(h, head)
            got = chunked_cross_entropy(h, y, head, chunk)
            assert not got.requires_grad
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    frozen_h, _, _ = _small()
    head.weight.requires_grad_(False)
    got = chunked_cross_entropy(frozen_h.detach(), y, head, 8)  # grad mode on, nothing to differentiate
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)


def test_fused_empty_input_joins_the_graph():
    h, y, head = _small()
    loss = fused_linear_cross_entropy(h[:0], y[:0], head.weight, None, 8)
    loss.backward()
    assert loss.item() == 0.0 and h.grad is not None and h.grad.abs().sum() == 0


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op run while active, with the largest output it produced (numel)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func.overloadpacket.__name__), max([o.numel() for o in outs if isinstance(o, torch.Tensor)], default=0)))
        return out


@pytest.mark.parametrize("trainable_head", [False, True])
def test_fused_backward_recomputes_nothing(trainable_head):
    """No-recompute property: the fused backward never calls the head, runs no matmul and makes no
    ``[chunk, vocab]`` tensor; the checkpointed fallback calls the head again and rebuilds the logits."""
    h, y, head = _small()
    head.weight.requires_grad_(trainable_head)
    calls = []
    wrapped = _Wrapped(head)  # the fallback path for the same Linear
    wrapped.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    chunk = 32  # [chunk, vocab] = 1600 elements: more than any [N, H] or [V, H] gradient
    for fn, h_head in [(chunked_cross_entropy, head), (chunked_cross_entropy, wrapped)]:
        calls.clear()
        loss = fn(h, y, h_head, chunk)
        forward_calls = len(calls)
        with _OpLog() as log:
            loss.backward()
        matmuls = [op for op, _ in log.ops if op in ("mm", "addmm", "bmm", "matmul", "linear")]
        biggest = max(numel for _, numel in log.ops)
        if h_head is head:  # fused: the head module is never called; the backward only scales saved grads
            assert uses_fused_path(h, head)
            assert forward_calls == 0 and not matmuls, log.ops
            assert biggest == (V * H if trainable_head else N * H) and biggest < chunk * V, log.ops
        else:  # fallback: every chunk's head call is made again in the backward
            assert forward_calls == -(-N // chunk) and len(calls) == 2 * forward_calls
            assert matmuls and biggest >= chunk * V
        h.grad = head.weight.grad = None

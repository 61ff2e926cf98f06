"""The chunked cross-entropy equals the plain one (loss and gradients) and never holds the full logits."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from trainer.losses import IGNORE_INDEX, causal_lm_loss_sum, chunked_cross_entropy, count_trained_tokens, cross_entropy_sum

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
    from trainer.losses import chunked_cross_entropy
    torch.manual_seed(0)
    n, hidden, vocab = 2048, 64, 16384
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(n, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    def peak_growth(chunk):
        # Linux resets the peak-RSS mark (VmHWM) on "5" > clear_refs, so each phase is measured on its own
        # (ru_maxrss is a lifetime maximum: an earlier transient peak, e.g. at import, would hide the phase).
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        chunked_cross_entropy(h, y, head, chunk).backward()
        return status("VmHWM") - before
    peak_growth(64)  # warm-up: allocator pools, autograd engine
    chunked, full = peak_growth(128), peak_growth(0)  # 0 = plain: the whole [n, vocab] logits at once
    print(json.dumps({{"logits_bytes": n * vocab * 4, "chunked_growth": chunked, "full_growth": full}}))
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

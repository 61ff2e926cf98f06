"""Chunked vs plain cross-entropy on a GPU: equal loss and gradients, and the peak-memory saving.

    python bench/chunked_ce_gpu.py                      # SmolLM2 head (576 x 49152), 16K tokens, bf16 autocast
    python bench/chunked_ce_gpu.py --tokens 65536 --hidden 4096 --vocab 128256   # a Llama-3-8B head

Prints a rich table (peak CUDA memory above the inputs, time, max |grad diff|) and exits non-zero
when the chunked loss or gradients differ from the plain ones beyond bf16 tolerance.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.losses import chunked_cross_entropy  # noqa: E402


def measure(h, y, head, chunk: int) -> tuple[float, torch.Tensor, torch.Tensor, float, float]:
    h.grad, head.weight.grad = None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, y, head, chunk)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    return loss.item(), h.grad.clone(), head.weight.grad.clone(), peak / 2**30, seconds


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunks", type=str, default="0,8192,2048,1024")
    a = p.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False, device="cuda")
    h = torch.randn(a.tokens, a.hidden, device="cuda", requires_grad=True)
    y = torch.randint(0, a.vocab, (a.tokens,), device="cuda")
    measure(h, y, head, 1024)  # warm-up: cuBLAS handles, allocator
    table = Table(title=f"cross-entropy of {a.tokens:,} tokens x vocab {a.vocab:,} (hidden {a.hidden}, bf16 autocast)")
    for col in ("chunk", "loss / token", "peak GiB", "ms", "max |dh| diff", "max |dW| diff"):
        table.add_column(col, justify="right")
    ref = None
    ok = True
    for chunk in (int(c) for c in a.chunks.split(",")):
        loss, gh, gw, peak, sec = measure(h, y, head, chunk)
        if ref is None:
            ref = (loss, gh, gw)
        dh, dw = (gh - ref[1]).abs().max().item(), (gw - ref[2]).abs().max().item()
        ok &= abs(loss - ref[0]) <= 1e-3 * abs(ref[0]) and dh <= 1e-2 * ref[1].abs().max().item() and dw <= 1e-2 * ref[2].abs().max().item()
        table.add_row("plain" if chunk == 0 else str(chunk), f"{loss / a.tokens:.5f}", f"{peak:.3f}", f"{1e3 * sec:.1f}", f"{dh:.2e}", f"{dw:.2e}")
    Console().print(table)
    print("OK: chunked == plain" if ok else "MISMATCH between chunked and plain cross-entropy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

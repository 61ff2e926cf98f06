"""Chunked vs plain cross-entropy on a GPU: equal loss and gradients, and the peak-memory saving.

    python bench/chunked_ce_gpu.py --out ce.json        # SmolLM2 head (576 x 49152), 16K tokens, bf16 autocast
    python bench/chunked_ce_gpu.py --tokens 65536 --hidden 4096 --vocab 128256   # a Llama-3-8B head
    python bench/chunked_ce_gpu.py --smoke              # CPU, small head: checks the code path

Prints a table (peak memory above the inputs, time, max |grad diff| against the plain loss), writes
the rows as JSON, and exits non-zero when a chunked loss or gradient differs from the plain one
beyond bf16 tolerance. On CPU there is no peak-memory counter (that column is empty).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from trainer.losses import chunked_cross_entropy  # noqa: E402

# bf16 autocast tolerances: the plain loss is the reference; chunking only reorders fp32 sums
LOSS_RTOL, GRAD_RTOL = 1e-3, 1e-2


def measure(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, chunk: int) -> dict[str, Any]:
    """One forward + backward of the summed CE; loss, gradients, peak memory above the inputs, seconds."""
    hidden.grad, head.weight.grad = None, None
    on_gpu = hidden.is_cuda
    common.synchronize()
    common.reset_peak_memory()
    base = torch.cuda.memory_allocated() if on_gpu else 0
    start = common.now()
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, targets, head, chunk)
    loss.backward()
    seconds = common.now() - start
    peak = (torch.cuda.max_memory_allocated() - base) / common.GIB if on_gpu else None
    return {"loss": loss.item(), "grad_h": hidden.grad.clone(), "grad_w": head.weight.grad.clone(), "peak_gib": peak, "seconds": seconds}


def compare_to_plain(result: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """Max |difference| of the gradients and whether loss and gradients agree within bf16 tolerance."""
    dh = (result["grad_h"] - plain["grad_h"]).abs().max().item()
    dw = (result["grad_w"] - plain["grad_w"]).abs().max().item()
    agrees = (abs(result["loss"] - plain["loss"]) <= LOSS_RTOL * abs(plain["loss"])
              and dh <= GRAD_RTOL * plain["grad_h"].abs().max().item() and dw <= GRAD_RTOL * plain["grad_w"].abs().max().item())
    return {"max_grad_h_diff": dh, "max_grad_w_diff": dw, "agrees": agrees}


def main() -> int:
    p = common.bench_parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunks", type=common.csv_list, default=["0", "8192", "2048", "1024"], help="0 = plain (the reference, first)")
    args = p.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.chunks = 512, 32, 1000, ["0", "256", "128"]
    try:
        chunks = [int(c) for c in args.chunks]
    except ValueError:
        raise SystemExit(f"error: --chunks must be integers (got {','.join(args.chunks)})") from None
    if chunks[0] != 0:
        chunks = [0] + chunks  # every row is compared with the plain loss
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("note: no GPU; times are CPU times and peak memory is not measured", flush=True)

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    hidden = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    measure(hidden, targets, head, chunks[-1])  # warm-up: cuBLAS handles, the allocator's pools

    rows, plain = [], None
    for chunk in chunks:
        result = measure(hidden, targets, head, chunk)
        plain = plain or result
        rows.append({"case": "plain" if chunk == 0 else f"chunk {chunk}", "chunk": chunk,
                     "loss_per_token": result["loss"] / args.tokens, "peak_gib": result["peak_gib"],
                     "ms": 1e3 * result["seconds"], **compare_to_plain(result, plain)})
        print(f"{rows[-1]['case']}: {rows[-1]['ms']:.1f} ms, peak {common.fmt(rows[-1]['peak_gib'], 3)} GiB", flush=True)
    ok = all(r["agrees"] for r in rows)
    common.save_results(args.out, "chunked_ce_gpu", args, rows, all_agree=ok)
    common.print_table(
        f"cross-entropy of {args.tokens:,} tokens x vocab {args.vocab:,} (hidden {args.hidden}, bf16 autocast, {device})",
        [{**r, "loss_per_token": f"{r['loss_per_token']:.5f}", "max_grad_h_diff": f"{r['max_grad_h_diff']:.2e}",
          "max_grad_w_diff": f"{r['max_grad_w_diff']:.2e}"} for r in rows],
        [("case", "case"), ("loss_per_token", "loss / token"), ("peak_gib", "peak GiB"), ("ms", "ms"),
         ("max_grad_h_diff", "max |dh| diff"), ("max_grad_w_diff", "max |dW| diff"), ("agrees", "agrees")],
        notes=["peak GiB: CUDA memory above the inputs during forward + backward (the logits' footprint)"])
    print("OK: chunked == plain" if ok else "MISMATCH between chunked and plain cross-entropy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Chunked cross-entropy on a GPU: the fused linear + CE path against the checkpointed fallback, side by side.

    python bench/chunked_ce_gpu.py --out ce.json        # SmolLM2 head (576 x 49152), 16K tokens, bf16 autocast
    python bench/chunked_ce_gpu.py --frozen-head        # the LoRA case: the head's weight gets no gradient
    python bench/chunked_ce_gpu.py --tokens 65536 --hidden 4096 --vocab 128256   # a Llama-3-8B head
    python bench/chunked_ce_gpu.py --smoke              # CPU, small head: checks the code path

For each chunk size, one forward + backward of the summed CE through both paths of
``trainer.losses``: ``fused`` (``fused_linear_cross_entropy``: gradients taken in the forward, chunk by
chunk; what ``chunked_cross_entropy`` runs for a plain ``nn.Linear`` head) and ``ckpt``
(``checkpointed_cross_entropy``: each chunk in ``torch.utils.checkpoint``, logits recomputed in the
backward; the fallback for sharded or wrapped heads). The first row is the plain all-logits-at-once
``cross_entropy_sum``, the reference every path's loss and gradients are compared with.

Prints a table (peak memory above the inputs, best-of-``--repeats`` time, max |grad diff| against the
plain loss), writes the rows as JSON, and exits non-zero when a loss or gradient differs from the plain
one beyond bf16 tolerance. On CPU there is no peak-memory counter (those columns are empty).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from trainer.losses import checkpointed_cross_entropy, cross_entropy_sum, fused_linear_cross_entropy, uses_fused_path  # noqa: E402

# bf16 autocast tolerances: the plain loss is the reference; chunking only reorders fp32 sums
LOSS_RTOL, GRAD_RTOL = 1e-3, 1e-2

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.nn.Linear, int], torch.Tensor]
PATHS: dict[str, LossFn] = {
    "plain": lambda h, y, head, chunk: cross_entropy_sum(h, y, head),
    "fused": lambda h, y, head, chunk: fused_linear_cross_entropy(h, y, head.weight, head.bias, chunk),
    "ckpt": checkpointed_cross_entropy,
}


def measure(loss_fn: LossFn, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, chunk: int,
            repeats: int = 1) -> dict[str, Any]:
    """Forward + backward of the summed CE: loss, gradients, peak memory above the inputs, best seconds of ``repeats``."""
    on_gpu = hidden.is_cuda
    best, peak = float("inf"), None
    for _ in range(max(1, repeats)):
        hidden.grad, head.weight.grad = None, None
        common.synchronize()
        common.reset_peak_memory()
        base = torch.cuda.memory_allocated() if on_gpu else 0
        start = common.now()
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
            loss = loss_fn(hidden, targets, head, chunk)
        loss.backward()
        common.synchronize()
        best = min(best, common.now() - start)
        if on_gpu:
            peak = max(peak or 0.0, (torch.cuda.max_memory_allocated() - base) / common.GIB)
    grad_w = head.weight.grad.clone() if head.weight.grad is not None else None
    return {"loss": loss.item(), "grad_h": hidden.grad.clone(), "grad_w": grad_w, "peak_gib": peak, "seconds": best}


def compare_to_plain(result: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """Max |difference| of the gradients and whether loss and gradients agree within bf16 tolerance."""
    dh = (result["grad_h"] - plain["grad_h"]).abs().max().item()
    agrees = abs(result["loss"] - plain["loss"]) <= LOSS_RTOL * abs(plain["loss"]) and dh <= GRAD_RTOL * plain["grad_h"].abs().max().item()
    dw = None
    if plain["grad_w"] is not None:
        dw = (result["grad_w"] - plain["grad_w"]).abs().max().item()
        agrees = agrees and dw <= GRAD_RTOL * plain["grad_w"].abs().max().item()
    return {"max_grad_h_diff": dh, "max_grad_w_diff": dw, "agrees": agrees}


def main() -> int:
    p = common.bench_parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunks", type=common.csv_list, default=["8192", "2048", "1024"], help="chunk sizes (0 = one chunk); the plain reference always runs first")
    p.add_argument("--frozen-head", action="store_true", help="head weight requires no grad (LoRA): no weight gradient")
    p.add_argument("--repeats", type=int, default=3, help="time each case this many times, keep the best")
    args = p.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.chunks, args.repeats = 512, 32, 1000, ["256", "128"], 1
    try:
        chunks = [int(c) for c in args.chunks if c != "0" or len(args.chunks) == 1]  # "0" was the old "plain" marker
    except ValueError:
        raise SystemExit(f"error: --chunks must be integers (got {','.join(args.chunks)})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("note: no GPU; times are CPU times and peak memory is not measured", flush=True)

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    head.weight.requires_grad_(not args.frozen_head)
    hidden = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    assert uses_fused_path(hidden, head), "a plain nn.Linear head should take the fused path"
    for name in ("fused", "ckpt"):  # warm-up: cuBLAS handles, the allocator's pools
        measure(PATHS[name], hidden, targets, head, chunks[-1])

    plain = measure(PATHS["plain"], hidden, targets, head, 0, args.repeats)
    rows = [{"case": "plain", "chunk": 0, "loss_per_token": plain["loss"] / args.tokens, "peak_gib": plain["peak_gib"],
             "ms": 1e3 * plain["seconds"], "ckpt_peak_gib": None, "ckpt_ms": None, **compare_to_plain(plain, plain),
             "ckpt_max_grad_h_diff": None, "ckpt_max_grad_w_diff": None}]
    print(f"plain: {rows[0]['ms']:.1f} ms, peak {common.fmt(rows[0]['peak_gib'], 3)} GiB", flush=True)
    for chunk in chunks:
        fused = measure(PATHS["fused"], hidden, targets, head, chunk, args.repeats)
        ckpt = measure(PATHS["ckpt"], hidden, targets, head, chunk, args.repeats)
        f_cmp, c_cmp = compare_to_plain(fused, plain), compare_to_plain(ckpt, plain)
        rows.append({"case": f"chunk {chunk}", "chunk": chunk, "loss_per_token": fused["loss"] / args.tokens,
                     "ckpt_loss_per_token": ckpt["loss"] / args.tokens,
                     "peak_gib": fused["peak_gib"], "ms": 1e3 * fused["seconds"],
                     "ckpt_peak_gib": ckpt["peak_gib"], "ckpt_ms": 1e3 * ckpt["seconds"],
                     "peak_saving": (1 - fused["peak_gib"] / ckpt["peak_gib"]) if fused["peak_gib"] and ckpt["peak_gib"] else None,
                     **f_cmp, "ckpt_max_grad_h_diff": c_cmp["max_grad_h_diff"], "ckpt_max_grad_w_diff": c_cmp["max_grad_w_diff"],
                     "fused_agrees": f_cmp["agrees"], "ckpt_agrees": c_cmp["agrees"], "agrees": f_cmp["agrees"] and c_cmp["agrees"]})
        r = rows[-1]
        print(f"{r['case']}: fused {r['ms']:.1f} ms, peak {common.fmt(r['peak_gib'], 3)} GiB | "
              f"ckpt {r['ckpt_ms']:.1f} ms, peak {common.fmt(r['ckpt_peak_gib'], 3)} GiB", flush=True)
        common.save_results(args.out, "chunked_ce_gpu", args, rows, all_agree=all(x["agrees"] for x in rows))
    ok = all(r["agrees"] for r in rows)
    common.save_results(args.out, "chunked_ce_gpu", args, rows, all_agree=ok)
    sci = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    common.print_table(
        f"cross-entropy of {args.tokens:,} tokens x vocab {args.vocab:,} (hidden {args.hidden}, bf16 autocast, "
        f"{'frozen' if args.frozen_head else 'trainable'} head, {device})",
        [{**r, "loss_per_token": f"{r['loss_per_token']:.5f}", "max_grad_h_diff": sci(r["max_grad_h_diff"]),
          "max_grad_w_diff": sci(r["max_grad_w_diff"]), "ckpt_max_grad_h_diff": sci(r["ckpt_max_grad_h_diff"]),
          "ckpt_max_grad_w_diff": sci(r["ckpt_max_grad_w_diff"]),
          "peak_saving": None if r.get("peak_saving") is None else f"{100 * r['peak_saving']:.0f}%"} for r in rows],
        [("case", "case"), ("loss_per_token", "loss / token"), ("peak_gib", "fused peak GiB"), ("ms", "fused ms"),
         ("ckpt_peak_gib", "ckpt peak GiB"), ("ckpt_ms", "ckpt ms"), ("peak_saving", "peak saved"),
         ("max_grad_h_diff", "fused |dh| diff"), ("ckpt_max_grad_h_diff", "ckpt |dh| diff"),
         ("max_grad_w_diff", "fused |dW| diff"), ("ckpt_max_grad_w_diff", "ckpt |dW| diff"), ("agrees", "agrees")],
        notes=["peak GiB: CUDA memory above the inputs during forward + backward (the logits' footprint); the plain row's "
               "numbers are in the fused columns",
               "fused = fused_linear_cross_entropy (gradients in the forward); ckpt = checkpointed_cross_entropy (the fallback)"])
    print("OK: fused == ckpt == plain" if ok else "MISMATCH between a chunked and the plain cross-entropy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Full fine-tuning MFU: BF16 mixed precision on the Llama-3.2-1B shape (target >= 45% MFU).

Every weight trains: fp32 master weights, gradients and AdamW states, bf16 autocast for the
forward and backward, packed ``--seq-len`` documents. The same harness as ``sft_vs_trl.py`` (one
process per side, wall time between optimizer steps after the warm-up); TRL ``SFTTrainer`` with
the same recipe is the baseline.

    python bench/full_ft_mfu.py --out full_ft.json                  # ours and TRL, llama-3.2-1b
    python bench/full_ft_mfu.py --sides ours --profile              # + top ops by CUDA time
    python bench/full_ft_mfu.py --smoke                             # tiny model on CPU
    python bench/full_ft_mfu.py --ours-variants "compiled=train.compile=true" --time-budget 520   # + a variant side

``--ours-variants "NAME=key=value,..."`` measures our trainer again with config overrides (e.g.
``train.compile=true``) as side ``ours-NAME`` in the same call, with its MFU and its speed against
the default side (``x ours``); ``--time-budget`` keeps the whole run inside the caller's timeout.

MFU = tokens/s x model FLOPs per token / the GPU's dense BF16 peak. FLOPs per token are
6 x (non-embedding params + LM head) + 12 x layers x heads x head_dim x seq_len (attention, no
causal discount), the count torchtitan and Megatron report; activation-checkpoint recomputation is
not counted (it is overhead, not model work).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common, sft_vs_trl  # noqa: E402

TARGET_MFU = 0.45


def with_mfu(rows: list[dict[str, Any]], seq_len: int) -> list[dict[str, Any]]:
    """MFU of each measured row (None on CPU or on a GPU missing from the peak table)."""
    peak = common.bf16_peak_flops(common.gpu_info().get("gpu") or "")
    for row in rows:
        if not row.get("tokens_per_s"):
            continue
        flops_per_token = common.train_flops_per_token(common.hf_config(row["shape"]), seq_len)
        row["tflops_per_gpu"] = round(row["tokens_per_s"] * flops_per_token / 1e12, 1)
        row["mfu"] = round(row["tokens_per_s"] * flops_per_token / peak, 4) if peak else None
        row["target_met"] = row["mfu"] >= TARGET_MFU if row["mfu"] is not None and sft_vs_trl.is_ours(row["side"]) else None
    default = {r["shape"]: r["tokens_per_s"] for r in rows if r["side"] == "ours" and r.get("tokens_per_s")}
    for row in rows:
        if row["side"].startswith("ours-") and row.get("tokens_per_s") and row["shape"] in default:
            row["vs_ours"] = round(row["tokens_per_s"] / default[row["shape"]], 3)
    return rows


def main() -> None:
    p = sft_vs_trl.case_parser(__doc__.split("\n")[0], shapes=["llama-3.2-1b"], methods=["full"], sides=["ours", "trl"],
                               micro_batch=4, grad_accum=2, lr=2e-5, activation_checkpointing=False)
    args = p.parse_args()
    if args.worker:
        return sft_vs_trl.worker(args.worker)
    args.methods = ["full"]
    rows, notes = sft_vs_trl.run_cases(args, "full_ft_mfu", extra=lambda rows: {"target_mfu": TARGET_MFU})
    rows = with_mfu(rows, args.seq_len)
    notes.append(f"MFU against the dense BF16 peak of {common.gpu_info().get('gpu') or 'no GPU (CPU run: no MFU)'}; "
                 f"FLOPs/token = 6 x dense params + attention at seq_len {args.seq_len}")
    common.save_results(args.out, "full_ft_mfu", args, rows, notes=notes, target_mfu=TARGET_MFU)
    for r in rows:
        if r.get("top_ops"):
            top3 = "; ".join(f"{o['op']} {o['pct']}%" for o in r["top_ops"][:3])
            notes.append(f"{r['shape']} {r['side']}: three largest costs by self CUDA time: {top3}")
        if r.get("profile_totals"):
            t = r["profile_totals"]
            notes.append(f"{r['shape']} {r['side']}: profiled steps: wall {t['wall_ms']:.0f} ms, device busy {t['device_ms']:.0f} ms")
        if r.get("compile_stats"):
            notes.append(f"{r['shape']} {r['side']}: torch.compile: {r['compile_stats']}")
    common.print_table(
        f"full fine-tuning, bf16 autocast, {args.seq_len}-token packed, micro-batch {args.micro_batch} x accum {args.grad_accum}, "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}",
        rows, [("shape", "shape"), ("side", "side"), ("tokens_per_s", "tokens/s"), ("tflops_per_gpu", "TFLOP/s"), ("mfu", "MFU"), ("vs_ours", "x ours"),
               ("peak_mem_gib", "peak GiB"), ("final_loss", "final loss"), ("target_met", f"MFU >= {TARGET_MFU:.0%}")],
        notes=notes,
    )


if __name__ == "__main__":
    main()

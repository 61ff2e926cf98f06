"""GPU benchmark of the parallel strategies and of FP8, in one launch (2 GPUs, <= 8 minutes).

    torchrun --standalone --nproc_per_node=2 bench/parallel_gpu.py [--out bench/results] [--steps 8]

Part 1, strategies: a random 1B-shaped Llama (Llama-3.2-1B dims) trained for a few steps with
ddp, fsdp2, zero1, zero2, zero3 x {full, lora}, the same global batch and seed for every case. For
each: the loss curve (parity against ddp, bf16 tolerance), tokens/s, measured peak memory
(``torch.cuda.max_memory_allocated``) against ``trainer.memory.estimate_memory``.

Part 2, FP8 (rank 0 only): 4 decoder layers of Llama-3-8B shape trained in bf16, fp8 tensorwise
and fp8 rowwise (torchao); tokens/s and the loss gap to bf16.

Writes ``parallel_gpu.json`` and ``parallel_gpu.png`` and prints rich tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_1B = dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192, vocab_size=128256,
                tie_word_embeddings=True, max_position_embeddings=4096)
LLAMA_8B_LAYERS = dict(hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8, intermediate_size=14336, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=4096)
CASES = [(s, m) for m in ("full", "lora") for s in ("ddp", "fsdp2", "zero1", "zero2", "zero3")]


def make_config(strategy: str, mode: str, shape: dict, micro_batch: int, seq: int, precision: str = "bf16",
                recipe: str = "tensorwise", check: bool = True):
    from trainer.config import build_config, validate

    cfg = build_config({
        "model": {"path": "random", "init": "random", "arch": "llama", **shape},
        "device": "cuda", "precision": precision, "seed": 0,
        "lora": {"enabled": mode == "lora", "rank": 16},
        "parallel": {"strategy": strategy, "timeout_s": 300, "fp8_recipe": recipe},
        "train": {"micro_batch_size": micro_batch, "grad_accum": 1, "seq_len": seq, "lr": 1e-4,
                  "activation_checkpointing": "full", "loss_chunk_size": 0},
    })
    return validate(cfg) if check else cfg


def batch(step: int, rank: int, world: int, micro_batch: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    full = torch.randint(0, vocab, (micro_batch * world, seq), generator=g)
    return full[rank::world]


def run_case(cfg, steps: int, device: torch.device) -> dict:
    from parallel.activation import apply_activation_checkpointing
    from parallel.base import build_strategy
    from trainer.memory import estimate_memory
    from trainer.models import build_model, model_config

    strategy = build_strategy(cfg)
    strategy.setup()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, "cpu")  # built on the host, placed (and sharded) by the strategy
    apply_activation_checkpointing(model, cfg)
    model, opt = strategy.wrap(model, lambda ps: torch.optim.AdamW(ps, lr=cfg.train.lr, fused=True))
    vocab, t = model_config(cfg.model).vocab_size, cfg.train
    losses, times = [], []
    for step in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = batch(step, strategy.rank, strategy.world_size, t.micro_batch_size, t.seq_len, vocab).to(device)
        normalizer = ids[:, 1:].numel() * strategy.world_size
        with strategy.no_sync(model, True), torch.autocast("cuda", torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / normalizer
        del logits
        strategy.backward(loss, model)
        strategy.clip_grad_norm(model, 1.0)
        strategy.optimizer_step(model, opt)
        losses.append(float(strategy.all_reduce_sum(loss.detach())))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    timed = times[2:] or times  # the first steps include allocator warm-up and NCCL setup
    tokens = t.micro_batch_size * t.seq_len * strategy.world_size
    peak = torch.cuda.max_memory_allocated(device)
    estimate = estimate_memory(cfg, model_config(cfg.model), strategy.world_size)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return {"losses": losses, "tokens_per_s": tokens * len(timed) / sum(timed), "peak_gib": peak / 2**30,
            "estimate_gib": estimate.total / 2**30}


def fp8_comparison(steps: int, device: torch.device) -> dict:
    """bf16 vs fp8 recipes on 4 Llama-3-8B-shaped layers, single GPU."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return {"skipped": "torchao is not installed"}
    out = {}
    for name, precision, recipe in (("bf16", "bf16", "tensorwise"), ("fp8-tensorwise", "fp8", "tensorwise"), ("fp8-rowwise", "fp8", "rowwise")):
        # a one-GPU sub-benchmark inside the 2-rank launch: the "single under torchrun" rule does not apply
        cfg = make_config("single", "full", LLAMA_8B_LAYERS, micro_batch=2, seq=2048, precision=precision, recipe=recipe, check=False)
        out[name] = run_case(cfg, steps, device)
    base = out["bf16"]["losses"]
    for name, r in out.items():
        r["speedup_vs_bf16"] = r["tokens_per_s"] / out["bf16"]["tokens_per_s"]
        r["max_loss_gap"] = max(abs(a - b) for a, b in zip(r["losses"], base))
    return out


def report(results: dict, fp8: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    table = Table(title="strategies: 1B-shaped Llama, 2 GPUs, bf16, full activation checkpointing")
    for col in ("case", "loss[0]", "loss[-1]", "parity vs ddp", "tokens/s", "peak GiB", "estimate GiB", "est/peak"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for case, r in results.items():
        if "error" in r:
            table.add_row(case, "[red]" + r["error"].splitlines()[-1][:60], *[""] * 6)
            continue
        ref = results.get(f"ddp-{case.split('-')[1]}", {}).get("losses")
        gap = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)) if ref else float("nan")
        table.add_row(case, f"{r['losses'][0]:.4f}", f"{r['losses'][-1]:.4f}", f"{gap:.2e}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['peak_gib']:.2f}", f"{r['estimate_gib']:.2f}", f"{r['estimate_gib'] / r['peak_gib']:.2f}")
    console = Console()
    console.print(table)
    if fp8 and "skipped" not in fp8:
        t8 = Table(title="FP8 vs BF16: 4 Llama-3-8B layers, 1 GPU")
        for col in ("recipe", "tokens/s", "speedup", "max |loss - bf16 loss|", "peak GiB"):
            t8.add_column(col)
        for name, r in fp8.items():
            t8.add_row(name, f"{r['tokens_per_s']:,.0f}", f"{r['speedup_vs_bf16']:.2f}x", f"{r['max_loss_gap']:.4f}", f"{r['peak_gib']:.2f}")
        console.print(t8)
    elif fp8:
        console.print(f"[yellow]FP8 comparison skipped: {fp8['skipped']}")
    ok = {k: v for k, v in results.items() if "error" not in v}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(ok)
    a1.bar(names, [ok[n]["tokens_per_s"] for n in names])
    a1.set_title("tokens/s (2 GPUs)")
    x = range(len(names))
    a2.bar([i - 0.2 for i in x], [ok[n]["peak_gib"] for n in names], width=0.4, label="measured peak")
    a2.bar([i + 0.2 for i in x], [ok[n]["estimate_gib"] for n in names], width=0.4, label="estimate")
    a2.set_xticks(list(x), names)
    a2.set_title("memory per GPU (GiB)")
    a2.legend()
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "parallel_gpu.png", dpi=120)
    (out / "parallel_gpu.json").write_text(json.dumps({"strategies": results, "fp8": fp8}, indent=2))
    console.print(f"wrote {out / 'parallel_gpu.json'} and {out / 'parallel_gpu.png'}")


def main() -> None:
    import traceback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--skip-fp8", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    results = {}
    for strategy, mode in CASES:
        name = f"{strategy}-{mode}"
        if rank == 0:
            print(f"[bench] {name}", flush=True)
        try:
            results[name] = run_case(make_config(strategy, mode, LLAMA_1B, args.micro_batch, args.seq), args.steps, device)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            if rank == 0:
                print(results[name]["error"], flush=True)
    fp8 = {}
    if not args.skip_fp8 and rank == 0:
        try:
            fp8 = fp8_comparison(args.steps, device)
        except Exception:
            fp8 = {"skipped": traceback.format_exc()}
    if rank == 0:
        report(results, fp8, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier(device_ids=[local_rank])
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

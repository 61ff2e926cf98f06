"""GPU benchmark of the parallel strategies: every case in its own torchrun process group (2 GPUs).

    python bench/parallel_gpu.py --out parallel_gpu.json [--steps 6] [--cases zero2-full,zero3-lora]
    bash bench/run_gpu.sh "parallel_gpu:560"          # on nvidia-h200-x2: 10 cases, ~7 minutes
    python bench/parallel_gpu.py --smoke               # CPU, gloo, tiny model: checks the code path

A random Llama-3.2-1B-shaped model is trained for a few steps with ddp, fsdp2, zero1, zero2, zero3
x {full, lora}: the same global batch and seed for every case, bf16, full activation checkpointing.
The driver (this file without ``--worker``) launches ``torchrun --standalone --nproc_per_node=2
bench/parallel_gpu.py --worker --case <case>`` once per case, so each measured peak starts from an
empty GPU: the last run measured every case in one process and DeepSpeed engines never released
their memory, inflating every later peak. Per case: the loss curve (parity against ddp, bf16
tolerance), tokens/s over the steps after the first two, the peak ``max_memory_allocated`` (max over
ranks, reset after the model is wrapped: the training peak, not the one-off set-up) against
``trainer.memory.estimate_memory`` (target: estimate / peak within 1 +- 0.15).

DeepSpeed runs with our torch AdamW (no FusedAdam JIT build); FP8 is measured by ``bench/fp8_gpu.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_parser, csv_list, print_table, run_worker, save_results  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192, vocab_size=128256,
                tie_word_embeddings=True, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=256,
            tie_word_embeddings=True, max_position_embeddings=256)
STRATEGIES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
CASES = [f"{s}-{m}" for m in ("full", "lora") for s in STRATEGIES]
WARMUP_STEPS = 2  # allocator warm-up, NCCL communicators, DeepSpeed's first-step trace: not timed
MEMORY_TOLERANCE = 0.15


def make_config(case: str, micro_batch: int, seq: int, smoke: bool):
    from trainer.config import build_config, validate

    strategy, mode = case.split("-")
    if strategy not in STRATEGIES or mode not in ("full", "lora"):
        raise SystemExit(f"error: unknown case {case!r}; cases are <{'|'.join(STRATEGIES)}>-<full|lora>")
    cfg = build_config({
        "model": {"path": "random", "init": "random", "arch": "llama", **(TINY if smoke else LLAMA_1B)},
        "device": "cpu" if smoke else "cuda", "precision": "fp32" if smoke else "bf16", "seed": 0,
        "lora": {"enabled": mode == "lora", "rank": 16},
        "parallel": {"strategy": strategy, "timeout_s": 300},
        "train": {"micro_batch_size": micro_batch, "grad_accum": 1, "seq_len": seq, "lr": 1e-4,
                  # smoke: 64 tokens per micro-batch, so a small chunk takes the chunked loss paths the GPU run takes
                  "activation_checkpointing": "full", **({"loss_chunk_size": 16} if smoke else {})},
    })
    return validate(cfg)


def global_batch(step: int, rank: int, world: int, micro_batch: int, seq: int, vocab: int):
    """This rank's share of step ``step``'s global batch: identical for every strategy."""
    import torch

    g = torch.Generator().manual_seed(step)
    return torch.randint(0, vocab, (micro_batch * world, seq), generator=g)[rank::world]


# --------------------------------------------------------------------------------------------
# worker: one case, under torchrun
# --------------------------------------------------------------------------------------------
def run_case(cfg, steps: int) -> dict:
    """Train ``steps`` steps through the Strategy interface (the Trainer's calls); rank 0 gets the numbers."""
    import torch

    from parallel.activation import apply_activation_checkpointing
    from parallel.base import build_strategy
    from trainer.memory import estimate_memory
    from trainer.models import build_model, model_config
    from trainer.sft import lm_loss, output_head

    strategy = build_strategy(cfg)
    strategy.setup()
    device, on_gpu = strategy.device, strategy.device.type == "cuda"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the host
        model = build_model(cfg, device)
    apply_activation_checkpointing(model, cfg)
    model, opt = strategy.wrap(model, lambda ps: torch.optim.AdamW(ps, lr=cfg.train.lr, fused=on_gpu))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)  # the training peak; set-up transients are not estimated
    vocab, t = model_config(cfg.model).vocab_size, cfg.train
    head = output_head(model)
    positions = torch.arange(t.seq_len, device=device)[None]
    losses, times = [], []
    for step in range(steps):
        t0 = _now(on_gpu)
        ids = global_batch(step, strategy.rank, strategy.world_size, t.micro_batch_size, t.seq_len, vocab).to(device)
        normalizer = ids[:, 1:].numel() * strategy.world_size
        batch = {"input_ids": ids, "labels": ids, "position_ids": positions.expand_as(ids)}
        # the trainer's SFT loss (final hidden states, LM head chunk by chunk: fused linear + CE for a
        # plain head, the checkpointed fallback for a sharded one), which is what the estimator models
        with strategy.no_sync(model, True), torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = lm_loss(model, head, batch, t.loss_chunk_size).loss_sum / normalizer
        strategy.backward(loss, model)
        strategy.clip_grad_norm(model, 1.0)
        strategy.optimizer_step(model, opt)
        losses.append(float(strategy.all_reduce_sum(loss.detach())))
        times.append(_now(on_gpu) - t0)
        if strategy.is_main:
            print(f"step {step + 1}/{steps}: loss {losses[-1]:.4f}, {times[-1]:.2f}s", flush=True)
    timed = times[WARMUP_STEPS:] or times
    estimate = estimate_memory(cfg, model_config(cfg.model), strategy.world_size)
    peak = _max_over_ranks(torch.cuda.max_memory_allocated(device) if on_gpu else 0, strategy)
    reserved = _max_over_ranks(torch.cuda.max_memory_reserved(device) if on_gpu else 0, strategy)
    strategy.teardown()
    return {"losses": losses, "tokens_per_s": t.micro_batch_size * t.seq_len * strategy.world_size * len(timed) / sum(timed),
            "peak_gib": peak / 2**30 if on_gpu else None, "reserved_gib": reserved / 2**30 if on_gpu else None,
            "estimate_gib": estimate.total / 2**30, "estimate_phase": estimate.peak_phase,
            "estimate_rows": {name: round(b / 2**30, 3) for name, b in estimate.rows + estimate.step_rows}}


def _now(on_gpu: bool) -> float:
    import torch

    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter()


def _max_over_ranks(value: int, strategy) -> int:
    """Each GPU's peak differs slightly (uneven shards, rank 0's extras): report the worst."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=strategy.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def worker(args) -> None:
    cfg = make_config(args.case, args.micro_batch, args.seq, args.smoke)
    result = run_case(cfg, args.steps)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# driver: one torchrun per case, merged results
# --------------------------------------------------------------------------------------------
def launch_case(case: str, args, workdir: Path) -> dict:
    result_path = workdir / f"{case}.json"
    # coreutils timeout sends SIGTERM, which torchrun forwards to its workers; a SIGKILL of torchrun
    # alone (run_worker's last resort) would orphan them with the GPUs and the output pipe held
    limit = ["timeout", "--kill-after=15", str(int(args.case_timeout))]
    cmd = limit + [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__, "--worker",
           "--case", case, "--result", str(result_path), "--steps", str(args.steps), "--seq", str(args.seq),
           "--micro-batch", str(args.micro_batch)] + (["--smoke"] if args.smoke else [])
    return run_worker(cmd, result_path, timeout=args.case_timeout + 30, label=case)


def summarize(case: str, result: dict, results: dict) -> dict:
    """One table/JSON row: scalars only (the run_gpu.sh summary prints a row's scalars)."""
    row = {"case": case, "wall_s": result.get("wall_s")}
    if "error" in result:
        return {**row, "error": result["error"][-240:]}
    reference = results.get(f"ddp-{case.split('-')[1]}", {}).get("losses")
    ratio = result["estimate_gib"] / result["peak_gib"] if result.get("peak_gib") else None
    row.update(tokens_per_s=round(result["tokens_per_s"]), peak_gib=_round(result["peak_gib"]),
               reserved_gib=_round(result["reserved_gib"]), estimate_gib=round(result["estimate_gib"], 2),
               estimate_over_peak=_round(ratio), memory_target_met=None if ratio is None else abs(ratio - 1) <= MEMORY_TOLERANCE,
               final_loss=round(result["losses"][-1], 4))
    if reference and not case.startswith("ddp"):
        row["max_loss_gap_vs_ddp"] = max(abs(a - b) for a, b in zip(result["losses"], reference))
    return row


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r.get("peak_gib")]
    if not ok:
        return
    names = [r["case"] for r in ok]
    x = range(len(ok))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4))
    a1.bar(names, [r["tokens_per_s"] for r in ok])
    a1.set_title("tokens/s (2 GPUs)")
    a2.bar([i - 0.2 for i in x], [r["peak_gib"] for r in ok], width=0.4, label="measured peak")
    a2.bar([i + 0.2 for i in x], [r["estimate_gib"] for r in ok], width=0.4, label="estimate")
    a2.set_xticks(list(x), names)
    a2.set_title("peak memory per GPU (GiB)")
    a2.legend()
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def driver(args) -> None:
    cases = csv_list(args.cases) if args.cases else CASES
    for case in cases:
        make_config(case, 1, 8, smoke=True)  # a typo fails now, not after minutes of other cases
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="parallel_gpu-"))
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # DeepSpeed's per-collective deprecation notes
    if args.smoke:
        os.environ["OMP_NUM_THREADS"] = "1"  # two CPU ranks per case: one thread each
    results: dict[str, dict] = {}
    rows: list[dict] = []
    started = time.perf_counter()
    for i, case in enumerate(cases, 1):
        print(f"[parallel_gpu] case {i}/{len(cases)}: {case} ({time.perf_counter() - started:.0f}s elapsed)", flush=True)
        results[case] = launch_case(case, args, workdir)
        rows = [summarize(c, r, results) for c, r in results.items()]
        save_results(args.out, "parallel_gpu", args, rows, cases={c: r.get("losses") for c, r in results.items()},
                     estimates={c: r.get("estimate_rows") for c, r in results.items()})
    columns = [("case", "case"), ("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB"), ("reserved_gib", "reserved GiB"),
               ("estimate_gib", "estimate GiB"), ("estimate_over_peak", "est/peak"), ("memory_target_met", "within 15%"),
               ("max_loss_gap_vs_ddp", "max |loss - ddp|"), ("wall_s", "wall s")]
    shown = [{**r, "max_loss_gap_vs_ddp": f"{r['max_loss_gap_vs_ddp']:.1e}"} if "max_loss_gap_vs_ddp" in r else r for r in rows]
    print_table(f"strategies: {'tiny (smoke)' if args.smoke else 'Llama-3.2-1B shape'}, {args.nproc} ranks, "
                f"micro-batch {args.micro_batch} x seq {args.seq}, full activation checkpointing", shown, columns,
                notes=[f"{r['case']}: {r['error']}" for r in rows if "error" in r])
    if args.out:
        plot(rows, Path(args.out).with_suffix(".png"))
    failed = [r["case"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} case(s) failed: {', '.join(failed)}")


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per case")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--case-timeout", type=float, default=120, help="seconds before one case's process group is killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the driver's per-case launch
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seq, args.micro_batch = min(args.steps, 3), min(args.seq, 32), min(args.micro_batch, 2)
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()

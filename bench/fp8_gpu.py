"""FP8 against BF16 training on Llama-3-8B-shaped layers, every recipe compiled (1 GPU, one call <= 480 s).

    python bench/fp8_gpu.py --out fp8_gpu.json [--steps 200 --layers 8 --micro-batch 8 --grad-accum 2 --profile]
    python bench/fp8_gpu.py --recipes bf16,fp8-rowwise        # a subset (each run has its own bf16 baseline)
    bash bench/run_gpu.sh "fp8_gpu:480"          # any one H100/H200
    python bench/fp8_gpu.py --smoke               # CPU: the bf16 path compiled on a tiny model; FP8 refused

Three recipes, each in its own process (clean compile caches and peak memory): ``bf16`` (bf16
autocast over fp32 master weights, the trainer's scheme), ``fp8-tensorwise`` and ``fp8-rowwise``
(torchao float8 training). Every recipe goes through the trainer's own model passes
(``trainer.trainer._apply_model_passes``: FP8 conversion, then ``torch.compile`` per decoder layer,
i.e. ``train.compile=true``): torchao's float8 linears are only fast when compile fuses the
amax / scale / cast kernels around each FP8 GEMM; eager they ran at 0.54x bf16. bf16 is compiled
too, so the comparison is of the GEMMs, not of compiled against eager.

The model is a stack of ``--layers`` Llama-3-8B decoder layers (8 by default: with the LM head
included, fewer layers would make the bf16 head a quarter of the FLOPs, which is not what an 8B model
looks like) and the loss is the trainer's own: final hidden states through the chunked LM-head
cross-entropy (``trainer.sft.lm_loss``), so no ``[tokens, vocab]`` fp32 logits are materialized.

Training is what a user runs: micro-batches of 8 x 2,048 tokens, 2 accumulated per optimizer step
(32k tokens per step: the fixed AdamW/clip cost per step is not what FP8 speeds up), AdamW with a
linear LR warm-up over the first 20 steps, and every micro-batch fresh text (no batch is seen twice:
memorizing a few cycled batches made the curves a race of who memorizes first).

Data: the bench corpus (SmolLM2 tokenizer, vocab 49,152), packed into fixed batches. Reported per recipe:
tokens/s after the compile warm-up, peak memory, the loss curve, and the gap between the 20-step
moving averages of the FP8 and bf16 losses (single-step noise is not a divergence). Targets: FP8
>= 1.25x bf16 tokens/s, and curves that match within noise: after the first ``CURVE_SKIP`` steps
(where the loss falls by several nats per ten steps and any perturbation shifts the curve sideways),
the largest relative gap between the smoothed FP8 and bf16 losses is at most ``NOISE_MARGIN`` times
the gap between two bf16 runs that differ only in their random init (``bf16-reseed``: the drift any
change to a run causes); without that run, a fixed ``CURVE_TOLERANCE``.
``--gpus 0,1,2`` runs the recipes at once, one per GPU (same GPU model: the speeds stay comparable).
``--profile`` adds a torch.profiler summary of three steps per recipe (top kernels by device time).
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

from bench.common import bench_parser, corpus_documents, csv_list, load_tokenizer, print_table, run_worker, save_results  # noqa: E402

LLAMA_3_8B_LAYERS = dict(hidden_size=4096, num_layers=8, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                         tie_word_embeddings=False, max_position_embeddings=8192)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
            tie_word_embeddings=False, max_position_embeddings=256)
# recipe -> (precision, float8 scaling, model-init seed); bf16-reseed is bf16 again from another random
# init: how far two bf16 runs drift apart is the noise band FP8's curve is judged against
RECIPES = {"bf16": ("bf16", "tensorwise", 0), "bf16-reseed": ("bf16", "tensorwise", 1),
           "fp8-tensorwise": ("fp8", "tensorwise", 0), "fp8-rowwise": ("fp8", "rowwise", 0)}
WARMUP_STEPS = 10  # compilation (forward, backward, optimizer) happens in the first steps: not timed
LR_WARMUP_STEPS = 20
SMOOTHING = 20  # steps in the moving average the loss curves are compared on
SPEEDUP_TARGET = 1.25
CURVE_SKIP = 30  # steps before the curves are compared (the loss falls several nats in these)
CURVE_TOLERANCE = 0.05  # max relative gap of the smoothed losses after CURVE_SKIP, when no bf16-reseed band exists
NOISE_MARGIN = 1.5  # FP8 matches when its gap to bf16 is within 1.5x the bf16-vs-bf16-reseed gap


def make_config(recipe: str, vocab: int, micro_batch: int, seq: int, smoke: bool, layers: int = 8, lr: float = 3e-4):
    """The run's config, validated: on a machine without an FP8 GPU an fp8 recipe raises ConfigError."""
    from trainer.config import build_config, validate

    precision, scaling, seed = RECIPES[recipe]
    shape = TINY if smoke else dict(LLAMA_3_8B_LAYERS, num_layers=layers)
    return validate(build_config({
        "model": {"path": "random", "init": "random", "arch": "llama", "vocab_size": vocab, **shape},
        "device": "cpu" if smoke else "cuda", "precision": precision, "seed": seed, "lora": {"enabled": False},
        "parallel": {"fp8_recipe": scaling},
        "train": {"micro_batch_size": micro_batch, "seq_len": seq, "lr": lr, "compile": True, "activation_checkpointing": "none"},
    }))


def write_batches(path: Path, micro_batch: int, seq: int, batches: int) -> int:
    """``batches`` packed [micro_batch, seq] rows of the bench corpus, saved as one tensor; returns the vocab size."""
    import torch

    tokenizer = load_tokenizer()
    need = micro_batch * seq * batches
    docs = corpus_documents(tokenizer, num_tokens=need, max_doc_tokens=seq)
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    ids = (ids * -(-need // len(ids)))[:need]  # the corpus may come up a few documents short: wrap around
    torch.save(torch.tensor(ids, dtype=torch.long).view(batches, micro_batch, seq), path)
    return len(tokenizer)


# --------------------------------------------------------------------------------------------
# worker: one recipe
# --------------------------------------------------------------------------------------------
def run_recipe(cfg, batches, steps: int, accum: int, profile: bool = False) -> dict:
    import torch

    from bench.profiling import OpProfiler
    from parallel.base import build_strategy
    from trainer.models import build_model
    from trainer.precision import autocast_context
    from trainer.sft import lm_loss
    from trainer.trainer import _apply_model_passes

    strategy = build_strategy(cfg)
    strategy.setup()
    device, on_gpu = strategy.device, strategy.device.type == "cuda"
    with torch.device(device):
        model = build_model(cfg, device)
    _apply_model_passes(model, cfg)  # the trainer's order: (activation checkpointing), FP8, compile per layer
    model, opt = strategy.wrap(model, lambda ps: torch.optim.AdamW(ps, lr=cfg.train.lr, fused=on_gpu))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / LR_WARMUP_STEPS))
    fp8_layers = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    head = model.get_output_embeddings()
    positions = torch.arange(batches.shape[2], device=device).expand(batches.shape[1], -1)
    profiler, top_ops = OpProfiler(), None
    losses, times = [], []
    for step in range(steps + (3 if profile else 0)):
        if profile and step == steps:  # extra steps after the measured ones: profiling never slows those
            profiler.start()
        t0 = _now(on_gpu)
        step_loss = 0.0
        for micro in range(accum):
            ids = batches[(step * accum + micro) % len(batches)].to(device, non_blocking=True)
            with autocast_context(device, cfg.precision):  # the trainer's SFT loss: chunked LM head + CE
                out = lm_loss(model, head, {"input_ids": ids, "position_ids": positions, "labels": ids}, cfg.train.loss_chunk_size)
            loss = out.loss_sum / ((ids.numel() - ids.shape[0]) * accum)
            strategy.backward(loss, model)
            step_loss = step_loss + loss.detach()
        strategy.clip_grad_norm(model, 1.0)
        strategy.optimizer_step(model, opt)
        schedule.step()
        if step >= steps:
            continue
        losses.append(float(step_loss))
        times.append(_now(on_gpu) - t0)
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {losses[-1]:.4f}, {times[-1] * 1e3:.0f} ms", flush=True)
    if profile:
        top_ops = profiler.stop()
    timed = times[WARMUP_STEPS:] or times
    tokens = ids.numel() * accum
    return {"losses": losses, "tokens_per_s": tokens * len(timed) / sum(timed), "compile_warmup_s": sum(times[:WARMUP_STEPS]),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None, "fp8_linears": fp8_layers,
            "top_ops": top_ops}


def _now(on_gpu: bool) -> float:
    import torch

    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter()


def worker(args) -> None:
    import torch

    batches = torch.load(args.batches)
    cfg = make_config(args.recipe, args.vocab, batches.shape[1], batches.shape[2], args.smoke, args.layers, args.lr)
    Path(args.result).write_text(json.dumps(run_recipe(cfg, batches, args.steps, args.grad_accum, args.profile)))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def refusal(recipe: str, vocab: int, args) -> str | None:
    """The config error that stops ``recipe`` on this machine (FP8 without an Ada/Hopper GPU), if any."""
    from trainer.config import ConfigError

    try:
        make_config(recipe, vocab, args.micro_batch, args.seq, args.smoke, args.layers, args.lr)
    except ConfigError as e:
        return str(e)
    return None


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def late_gap(ours: list[float], ref: list[float]) -> float | None:
    """Largest relative gap between two smoothed loss curves after ``CURVE_SKIP`` steps."""
    late = [abs(a - b) / b for a, b in zip(ours[CURVE_SKIP:], ref[CURVE_SKIP:])]
    return max(late) if late else None


def compare(results: dict[str, dict]) -> list[dict]:
    base = results.get("bf16", {})
    ref = moving_average(base["losses"], SMOOTHING) if "losses" in base else None
    reseed = results.get("bf16-reseed", {})
    noise = late_gap(moving_average(reseed["losses"], SMOOTHING), ref) if "losses" in reseed and ref else None
    tolerance = NOISE_MARGIN * noise if noise is not None else CURVE_TOLERANCE
    rows = []
    for recipe, r in results.items():
        if not r:  # still running (concurrent recipes save partial results)
            continue
        row = {"case": recipe, "wall_s": r.get("wall_s")}
        if "error" in r or "skipped" in r:
            rows.append({**row, "skipped": (r.get("skipped") or r["error"])[-240:]})
            continue
        row.update(tokens_per_s=round(r["tokens_per_s"]), peak_gib=None if r["peak_gib"] is None else round(r["peak_gib"], 2),
                   compile_warmup_s=round(r["compile_warmup_s"], 1), fp8_linears=r["fp8_linears"],
                   first_loss=round(r["losses"][0], 4), final_loss=round(r["losses"][-1], 4))
        if ref and recipe != "bf16":
            ours = moving_average(r["losses"], SMOOTHING)
            row["speedup_vs_bf16"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            row["max_smoothed_loss_gap"] = round(max(abs(a - b) for a, b in zip(ours, ref)), 4)
            gap = late_gap(ours, ref)
            row["max_rel_gap_after_skip"] = None if gap is None else round(gap, 4)
            row["gap_tolerance"] = round(tolerance, 4)
            row["curves_match"] = gap is not None and gap <= tolerance
            if recipe.startswith("fp8"):
                row["target_met"] = row["speedup_vs_bf16"] >= SPEEDUP_TARGET and row["curves_match"]
        rows.append(row)
    return rows


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for recipe, r in results.items():
        if "losses" in r:
            ax.plot(r["losses"], alpha=0.25)
            ax.plot(moving_average(r["losses"], SMOOTHING), label=f"{recipe} ({r['tokens_per_s']:,.0f} tok/s)",
                    color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({SMOOTHING}-step moving average)")
    ax.set_title(f"FP8 vs BF16, {len(next(iter(results.values())).get('losses', [])) or ''} steps, Llama-3-8B layers, compiled")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def driver(args) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fp8_gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    batches_path = workdir / "batches.pt"
    distinct = args.steps * args.grad_accum  # every micro-batch fresh (profiled extra steps wrap around)
    print(f"[fp8_gpu] packing {distinct} micro-batches of {args.micro_batch} x {args.seq} tokens", flush=True)
    vocab = write_batches(batches_path, args.micro_batch, args.seq, distinct)
    results: dict[str, dict] = {r: {} for r in args.recipes}  # report order = the requested order

    def run_recipe_process(recipe: str, gpu: str | None) -> None:
        reason = refusal(recipe, vocab, args)
        if reason:
            print(f"[fp8_gpu] {recipe}: refused by config validation: {reason}", flush=True)
            results[recipe] = {"skipped": f"config refused: {reason}"}
            return
        print(f"[fp8_gpu] {recipe}: {args.steps} steps" + (f" on GPU {gpu}" if gpu else ""), flush=True)
        result_path = workdir / f"{recipe}.json"
        cmd = [sys.executable, __file__, "--worker", "--recipe", recipe, "--batches", str(batches_path), "--vocab", str(vocab),
               "--result", str(result_path), "--steps", str(args.steps), "--layers", str(args.layers), "--lr", str(args.lr),
               "--grad-accum", str(args.grad_accum)]
        cmd += (["--smoke"] if args.smoke else []) + (["--profile"] if args.profile else [])
        results[recipe] = run_worker(cmd, result_path, timeout=args.recipe_timeout, label=recipe,
                                     env_overrides={"CUDA_VISIBLE_DEVICES": gpu} if gpu else None)
        save_results(args.out, "fp8_gpu", args, compare(results), curves={k: v.get("losses") for k, v in results.items()})

    if args.gpus:  # one recipe per GPU at a time, all GPUs busy
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(args.gpus)) as pool:
            queue = list(args.recipes)
            waves = [queue[i:i + len(args.gpus)] for i in range(0, len(queue), len(args.gpus))]
            for wave in waves:
                list(pool.map(run_recipe_process, wave, args.gpus[:len(wave)]))
    else:
        for recipe in args.recipes:
            run_recipe_process(recipe, None)
    rows = compare(results)
    save_results(args.out, "fp8_gpu", args, rows, curves={k: v.get("losses") for k, v in results.items()})
    columns = [("case", "recipe"), ("tokens_per_s", "tokens/s"), ("speedup_vs_bf16", "vs bf16"), ("target_met", ">= 1.25x + match"),
               ("max_smoothed_loss_gap", f"max |dloss| ({SMOOTHING}-step avg)"),
               ("max_rel_gap_after_skip", f"max rel gap after step {CURVE_SKIP}"), ("gap_tolerance", "allowed gap"),
               ("curves_match", "curves match"), ("final_loss", "final loss"),
               ("peak_gib", "peak GiB"), ("compile_warmup_s", "warm-up s"), ("fp8_linears", "FP8 linears")]
    print_table(f"FP8 vs BF16: {'tiny (smoke, CPU)' if args.smoke else f'{args.layers} Llama-3-8B layers'}, micro-batch {args.micro_batch} x "
                f"seq {args.seq} x accum {args.grad_accum}, {args.steps} steps, torch.compile per layer", rows, columns,
                notes=[f"{r['case']}: {r['skipped']}" for r in rows if "skipped" in r])
    if args.out:
        plot(results, Path(args.out).with_suffix(".png"))
    if any("error" in r for r in results.values()):
        raise SystemExit("a recipe failed (see its log above)")


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--recipes", type=csv_list, default=list(RECIPES), help=f"subset of {','.join(RECIPES)} (bf16 first)")
    parser.add_argument("--gpus", type=csv_list, default=[], help="run recipes concurrently, one per listed GPU")
    parser.add_argument("--layers", type=int, default=8, help="Llama-3-8B decoder layers in the model")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--recipe-timeout", type=float, default=200, help="seconds before one recipe's process is killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the driver's per-recipe launch
    parser.add_argument("--recipe", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seq, args.micro_batch, args.grad_accum = min(args.steps, 4), min(args.seq, 32), min(args.micro_batch, 2), 2
        os.environ["OMP_NUM_THREADS"] = "1"
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()

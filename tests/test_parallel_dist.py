"""Sharded strategies on 2 CPU processes (gloo) against the single-process run on the same global batch.

Cases are ``strategy[+offload]:mode``: ZeRO-1/2/3, FSDP2 and DDP with full fine-tuning, LoRA and QLoRA,
and the offload modes (``parallel.offload=params`` for fsdp2 / zero3, ``optimizer`` for ZeRO), which
must change where state lives, not the numbers.

Each case launches this file under torchrun as a worker that trains a tiny Llama with a minimal
loop written against the Strategy interface only (the same calls the Trainer makes), checkpoints
midway, finishes, then reloads the checkpoint into a fresh model and replays the second half.
The test asserts that

  * the loss curve equals the single-process one (rtol 1e-5: fp32 on CPU, only the order of the
    cross-rank sums differs; observed differences are ~1e-7) and so do the gradient norms (rtol 1e-4),
  * the replay after resume is exact (rtol 1e-6), and FSDP2 also resumes a 2-rank checkpoint in
    one process (DCP reshards to the new world size),
  * the consolidated export loads with transformers / PEFT and reproduces the trained model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT, GLOBAL_BATCH, SEQ, GRAD_ACCUM = 4, 2, 4, 24, 2
LOSS_CHUNK = 8  # tokens per loss chunk: 23 trained tokens per row take three chunks


# --------------------------------------------------------------------------------------------
# worker (runs under torchrun, or as one plain process for the reference)
# --------------------------------------------------------------------------------------------
def worker_config(model_dir: str, case_strategy: str, mode: str):
    """``case_strategy`` is ``strategy`` or ``strategy+offload`` (``zero2+optimizer``, ``fsdp2+params``)."""
    from trainer.config import build_config, validate

    strategy, _, offload = case_strategy.partition("+")
    tree = {
        "model": {"path": model_dir}, "device": "cpu", "precision": "fp32", "seed": 0,
        "lora": {"enabled": mode != "full", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "quant": {"load_in_4bit": mode == "qlora", "quant_storage": "fp32", "compute_dtype": "fp32"},
        "parallel": {"strategy": strategy, "offload": offload or "none", "timeout_s": 120},
        "train": {"micro_batch_size": GLOBAL_BATCH // (GRAD_ACCUM * int(os.environ.get("WORLD_SIZE", 1))), "grad_accum": GRAD_ACCUM, "lr": 1e-3, "max_grad_norm": 1.0},
    }
    return validate(build_config(tree))


def batches(step: int, vocab: int) -> torch.Tensor:
    """The global batch of ``step``: the same on every rank, independent of the world size."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g)


def train_steps(strategy, model, optimizer, steps: range, vocab: int, grad_norms: list | None = None) -> list[float]:
    """The Trainer's contract in miniature: loss sums / global normalizer, accumulation, clipping."""
    from trainer.sft import lm_loss, output_head

    losses = []
    rank, world = strategy.rank, strategy.world_size
    for step in steps:
        tokens = batches(step, vocab)
        local = tokens[rank::world]  # this rank's share of the global batch
        normalizer = GLOBAL_BATCH * (SEQ - 1)  # every shifted token is trained; summed over ranks
        micro = local.chunk(GRAD_ACCUM)
        total = torch.zeros(())
        for i, ids in enumerate(micro):
            with strategy.no_sync(model, is_last_micro_batch=i == len(micro) - 1):
                # the trainer's SFT loss in chunks smaller than a micro-batch: the fused linear + CE, the
                # checkpointed fallback for sharded heads and the gathered ZeRO-3 frozen head all run here
                batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
                loss_sum = lm_loss(model, output_head(model), batch, LOSS_CHUNK).loss_sum
                loss = loss_sum / normalizer
                strategy.backward(loss, model)
                total += loss.detach()
        norm = strategy.clip_grad_norm(model, 1.0)
        if grad_norms is not None:
            grad_norms.append(norm)
        strategy.optimizer_step(model, optimizer)
        losses.append(float(strategy.all_reduce_sum(total)))
    return losses


def run_case(model_dir: str, strategy_name: str, mode: str, out_dir: Path) -> dict:
    from parallel.base import build_strategy
    from trainer.models import build_model

    cfg = worker_config(model_dir, strategy_name, mode)
    strategy = build_strategy(cfg)
    strategy.setup()
    make_opt = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731

    def fresh():
        torch.manual_seed(cfg.seed)  # as the Trainer does on every rank: identical LoRA initialisation
        return strategy.wrap(build_model(cfg, "cpu"), make_opt)

    model, opt = fresh()
    vocab = strategy.unwrap(model).config.vocab_size
    norms: list[float] = []
    losses = train_steps(strategy, model, opt, range(SAVE_AT), vocab, norms)
    ckpt = out_dir / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    # what trainer.checkpoint does: the exported model, then the strategy's own state
    strategy.save_pretrained(model, ckpt / "model")
    strategy.save_state(ckpt, model, opt)
    losses += train_steps(strategy, model, opt, range(SAVE_AT, STEPS), vocab, norms)
    strategy.save_pretrained(model, out_dir / "export")
    # resume into a fresh model and replay the second half
    model, opt = fresh()
    strategy.load_model_weights(model, ckpt / "model")
    strategy.load_state(ckpt, model, opt)
    resumed = train_steps(strategy, model, opt, range(SAVE_AT, STEPS), vocab)
    strategy.barrier()
    return {"losses": losses, "grad_norms": norms, "resumed": resumed, "offloaded": offload_in_effect(model, opt)}


def offload_in_effect(model, optimizer) -> str:
    """What the wrapped model reports as offloaded: ``params``, ``optimizer`` or ``none``."""
    if hasattr(model, "zero_offload_param"):  # a DeepSpeed engine
        return "params" if model.zero_offload_param() else "optimizer" if model.zero_cpu_offload() else "none"
    state = getattr(model, "_get_fsdp_state", None)
    if state is not None:
        from torch.distributed.fsdp import CPUOffloadPolicy

        group = state()._fsdp_param_group
        return "params" if group is not None and isinstance(group.offload_policy, CPUOffloadPolicy) else "none"
    return "none"


def resume_case(model_dir: str, mode: str, ckpt: Path) -> dict:
    """FSDP2 on this world size, resumed from a checkpoint written by another world size (DCP reshards)."""
    from parallel.base import build_strategy
    from trainer.models import build_model

    cfg = worker_config(model_dir, "fsdp2", mode)
    strategy = build_strategy(cfg)
    strategy.setup()
    torch.manual_seed(cfg.seed)
    model, opt = strategy.wrap(build_model(cfg, "cpu"), lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    strategy.load_model_weights(model, ckpt / "model")
    strategy.load_state(ckpt, model, opt)
    return {"resumed": train_steps(strategy, model, opt, range(SAVE_AT, STEPS), strategy.unwrap(model).config.vocab_size)}


def run_worker(model_dir: str, out: str, cases: str) -> None:
    """Run every ``strategy:mode`` case in this process group (imports and rendezvous are paid once)."""
    import traceback

    rank = int(os.environ.get("RANK", 0))
    for case in cases.split(","):
        strategy, mode = case.split(":")
        out_dir = Path(out) / f"{strategy}-{mode}"
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if strategy == "fsdp2-resume":  # from the 2-rank run's checkpoint, a sibling of this run's dir
                result = resume_case(model_dir, mode, Path(out).parent / "two" / f"fsdp2-{mode}" / "ckpt")
            else:
                result = run_case(model_dir, strategy, mode, out_dir)
        except Exception:  # reported by the test that owns this case; the others still run
            result = {"error": traceback.format_exc()}
        if rank == 0:
            (out_dir / "result.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def hang_worker(timeout_s: str) -> None:
    """Rank 1 stops answering after set-up; rank 0's next collective must fail after ``parallel.timeout_s``."""
    import time

    from parallel.base import build_strategy
    from trainer.config import build_config, validate

    cfg = validate(build_config({"device": "cpu", "precision": "fp32", "parallel": {"strategy": "ddp", "timeout_s": int(timeout_s)}}))
    strategy = build_strategy(cfg)
    strategy.setup()
    strategy.barrier()  # both ranks are up: what follows is a hang, not a slow start
    if strategy.rank == 1:
        time.sleep(3600)  # stuck (a deadlock, a dead GPU): never joins the all-reduce
    strategy.all_reduce_sum(1.0)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
CASES = [("fsdp2", "full"), ("fsdp2", "lora"), ("fsdp2", "qlora"), ("zero1", "full"), ("zero1", "lora"), ("zero2", "full"),
         ("zero2", "lora"), ("zero3", "full"), ("zero3", "lora"), ("zero3", "qlora"), ("ddp", "lora"),
         ("fsdp2+params", "full"), ("zero2+optimizer", "full"), ("zero3+params", "lora")]


def _launch(model_dir: str, out: Path, nproc: int, cases: list[tuple[str, str]]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    worker = [str(Path(__file__).resolve()), model_dir, str(out), ",".join(f"{s}:{m}" for s, m in cases)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + worker, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def results(tiny_llama_dir, tmp_path_factory):
    """All cases: one 2-process torchrun launch plus one single-process reference launch."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("dist")
    _launch(tiny_llama_dir, out / "two", 2, CASES)
    _launch(tiny_llama_dir, out / "one", 1, [("single", m) for m in ("full", "lora", "qlora")] + [("fsdp2-resume", "lora")])

    def read(kind: str, strategy: str, mode: str) -> tuple[dict, Path]:
        case_dir = out / kind / f"{strategy}-{mode}"
        result = json.loads((case_dir / "result.json").read_text())
        assert "error" not in result, result.get("error")
        return result, case_dir

    return read


@pytest.mark.parametrize("strategy,mode", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_two_ranks_match_single_process(strategy, mode, results, tiny_llama_dir):
    reference, _ = results("one", "single", mode)
    result, case_dir = results("two", strategy, mode)
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    # Adam is blind to a wrong gradient scale (e.g. averaging instead of summing over ranks); the norm is
    # not. DeepSpeed ZeRO-1/2 compute it their own way over flat partitions: ~2e-5 off, hence 1e-4.
    assert result["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    assert reference["losses"][-1] < reference["losses"][0]  # it actually trained
    assert result["resumed"] == pytest.approx(result["losses"][SAVE_AT:], rel=1e-6)
    assert result["offloaded"] == (strategy.partition("+")[2] or "none")
    _check_export(case_dir / "export", tiny_llama_dir, mode)


def test_fsdp2_resumes_on_a_different_world_size(results):
    two_ranks, _ = results("two", "fsdp2", "lora")
    one_rank, _ = results("one", "fsdp2-resume", "lora")
    assert one_rank["resumed"] == pytest.approx(two_ranks["losses"][SAVE_AT:], rel=1e-5)


def test_a_hung_rank_fails_after_the_timeout_naming_the_rank():
    """Not a silent hang: the waiting rank raises within parallel.timeout_s and torchrun stops the job."""
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(Path(__file__).resolve()), "--hang", "3"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "CollectiveTimeoutError: rank 0/2: all_reduce timed out after parallel.timeout_s=3s" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 150  # start-up (imports, rendezvous) + 3 s; rank 1 alone would sleep for an hour


def _check_export(export: Path, base_dir: str, mode: str) -> None:
    import transformers
    from safetensors.torch import load_file

    if mode == "full":
        model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        delta = max((a - b).abs().max().item() for a, b in zip(model.parameters(), base.parameters()))
        assert delta > 1e-4  # trained weights were exported, not the initial ones
        return
    from peft import PeftModel

    tensors = load_file(export / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # no Size([0]) adapters from ZeRO-3
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, export)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # B starts at zero: non-zero means trained weights loaded


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1] == "--hang":
        hang_worker(sys.argv[2])
    else:
        run_worker(*sys.argv[1:4])
